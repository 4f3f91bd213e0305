//! Figures for the control plane, printed, never asserted:
//! - time from a new WireGuardPeer appearing in the API to being configured on every agent
//!   the topology pairs it with (p50 and max over JOINS joins);
//! - resident memory of the agents and the coordinator afterwards.
//!
//! `cargo run --release -p isthmus-tests --example control_plane_figures` (root; needs the
//! binaries of `cargo build --release --bins` and `scripts/build-kube.sh`).

use std::time::{Duration, Instant};

use isthmus_api::WireGuardPeer;
use isthmus_tests::cluster::Cluster;
use kube::api::Api;

const JOINS: u8 = 20;
const OLD_NODES: u8 = 3;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cluster = Cluster::new().await?;
    for slot in 1..=OLD_NODES {
        cluster.add_node(0, slot).await?;
    }
    cluster.add_node(1, 1).await?;
    cluster.start_coordinator("figures")?;
    anyhow::ensure!(
        cluster.wait_converged(Duration::from_secs(60)).await,
        "mesh did not form"
    );
    let peers: Api<WireGuardPeer> = Api::all(cluster.rig.admin().await?);

    let mut latencies = Vec::new();
    for slot in 2..JOINS + 2 {
        let name = format!("aws-{slot}");
        let i = cluster.add_node(1, slot).await?;
        let (mut appeared, deadline) = (None, Instant::now() + Duration::from_secs(60));
        loop {
            anyhow::ensure!(Instant::now() < deadline, "join of {name} did not complete");
            if appeared.is_none() && peers.get_opt(&name).await?.is_some() {
                appeared = Some(Instant::now());
            }
            if let Some(t0) = appeared {
                let key = cluster.nodes[i].dump()?.public_key;
                let everywhere = cluster.nodes[..OLD_NODES as usize]
                    .iter()
                    .all(|n| n.dump().is_ok_and(|d| d.peer(&key).is_some()));
                if everywhere {
                    latencies.push(t0.elapsed());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    latencies.sort();
    println!(
        "join: new WireGuardPeer -> configured on all {OLD_NODES} agents of the other location, {} joins: p50 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    let agents: Vec<u64> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref().map(|a| rss_kib(a.pid())))
        .collect();
    let max_agent = agents.iter().max().copied().unwrap_or(0);
    let mean_agent = agents.iter().sum::<u64>() / agents.len().max(1) as u64;
    println!(
        "RSS: agents ({} nodes, up to {} peers each) mean {} KiB, max {} KiB; coordinator {} KiB ({} peers)",
        agents.len(),
        JOINS + 1,
        mean_agent,
        max_agent,
        rss_kib(cluster.coordinators[0].pid()),
        cluster.nodes.len()
    );
    Ok(())
}
