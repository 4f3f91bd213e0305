//! An etcd member pod's entrypoint: works out etcd's initial-cluster flags, then becomes
//! etcd (exec, so the kubelet signals etcd itself).
//!
//! ```text
//! isthmus-etcd-member bootstrap [-- ETCD_FLAG...]          a new one-member cluster
//! isthmus-etcd-member join URL... [-- ETCD_FLAG...]        join the cluster at URL... as a learner
//! ```
//!
//! Env: `POD_IP`, `NAME` (downward API); `DATA_DIR` (default `/var/lib/etcd`), `ETCD`
//! (default `/usr/local/bin/etcd`). The member listens on 0.0.0.0 and advertises
//! `http://$POD_IP:2379` / `:2380`: pod IPs are unique across the clouds, node IPs are not.
//!
//! Restarts are idempotent: with a data dir, etcd knows its cluster and is exec'd as is; a
//! joiner whose peer URL is already listed (added before a crash) does not add itself twice.
//! Adding a learner cannot cost quorum, so a joiner that never starts harms nobody; whoever
//! drives the cluster promotes it once it has caught up.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_sandbox::etcd::gateway::{member_add, member_list, Member};

const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a joiner tries the given endpoints before it exits (and the kubelet restarts it).
const JOIN_FOR: Duration = Duration::from_secs(30);

fn main() {
    if let Err(e) = run() {
        eprintln!("isthmus-etcd-member: {e:#}");
        std::process::exit(1);
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("${name} is not set (downward API)"))
}

fn run() -> anyhow::Result<()> {
    let pod_ip = env("POD_IP")?;
    let name = env("NAME")?;
    let data_dir = std::env::var("DATA_DIR").unwrap_or_else(|_| "/var/lib/etcd".into());
    let etcd = std::env::var("ETCD").unwrap_or_else(|_| "/usr/local/bin/etcd".into());
    let all: Vec<String> = std::env::args().skip(1).collect();
    let (ours, extra) = match all.iter().position(|a| a == "--") {
        Some(i) => (&all[..i], &all[i + 1..]),
        None => (&all[..], &[][..]),
    };
    let peer = format!("http://{pod_ip}:2380");
    let mut flags = vec![
        format!("--name={name}"),
        format!("--data-dir={data_dir}"),
        "--listen-client-urls=http://0.0.0.0:2379".into(),
        format!("--advertise-client-urls=http://{pod_ip}:2379"),
        "--listen-peer-urls=http://0.0.0.0:2380".into(),
        format!("--initial-advertise-peer-urls={peer}"),
    ];
    if Path::new(&data_dir).join("member").exists() {
        eprintln!("isthmus-etcd-member: {name}: data dir present, restarting etcd as it was");
    } else {
        match ours.first().map(String::as_str) {
            Some("bootstrap") => {
                flags.push(format!("--initial-cluster={name}={peer}"));
                flags.push("--initial-cluster-state=new".into());
            }
            Some("join") if ours.len() > 1 => {
                let cluster = join(&ours[1..], &name, &peer)?;
                eprintln!("isthmus-etcd-member: {name}: joining as a learner: {cluster}");
                flags.push(format!("--initial-cluster={cluster}"));
                flags.push("--initial-cluster-state=existing".into());
            }
            _ => bail!("usage: isthmus-etcd-member bootstrap | join URL... [-- ETCD_FLAG...]"),
        }
    }
    flags.extend(extra.iter().cloned());
    let err = Command::new(&etcd).args(&flags).exec();
    Err(err).with_context(|| format!("exec {etcd}"))
}

/// Adds this member as a learner (unless a previous run already did) through the first
/// endpoint that answers; returns etcd's `--initial-cluster` for the membership that
/// includes it.
fn join(endpoints: &[String], name: &str, peer: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + JOIN_FOR;
    let mut last = None;
    while Instant::now() < deadline {
        for ep in endpoints {
            let attempt = member_list(ep, TIMEOUT).and_then(|members| {
                if members
                    .iter()
                    .any(|m| m.peer_urls.iter().any(|u| u == peer))
                {
                    eprintln!("isthmus-etcd-member: {name}: already a member (restarted)");
                    Ok(members)
                } else {
                    member_add(ep, peer, true, TIMEOUT).map(|(_, members)| members)
                }
            });
            match attempt {
                Ok(members) => {
                    wait_until_listed(endpoints, name, peer, deadline);
                    return Ok(initial_cluster(&members, name, peer));
                }
                Err(e) => {
                    eprintln!("isthmus-etcd-member: {name}: {ep}: {e:#}");
                    last = Some(e);
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint given")))
        .with_context(|| format!("could not join through {endpoints:?} in {JOIN_FOR:?}"))
}

/// Waits (until `deadline`) for every member at `endpoints` to list this one. etcd, when it
/// starts, checks `--initial-cluster` against the membership of whichever peer answers
/// first, and a peer that has not yet applied the add answers with one member fewer: etcd
/// then exits with "member count is unequal" (seen in a CI run of the short profile).
fn wait_until_listed(endpoints: &[String], name: &str, peer: &str, deadline: Instant) {
    loop {
        let lagging: Vec<&String> = endpoints
            .iter()
            .filter(|ep| {
                !member_list(ep, TIMEOUT).is_ok_and(|members| {
                    members
                        .iter()
                        .any(|m| m.peer_urls.iter().any(|u| u == peer))
                })
            })
            .collect();
        if lagging.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "isthmus-etcd-member: {name}: not yet listed by {lagging:?}; starting anyway"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `name=peerURL,...` for every member: this one under its own name, members that have not
/// started yet (no name) under a stand-in, since etcd matches them by peer URL.
fn initial_cluster(members: &[Member], name: &str, peer: &str) -> String {
    let mut parts = Vec::new();
    for m in members {
        let n = if m.peer_urls.iter().any(|u| u == peer) {
            name.to_string()
        } else if m.name.is_empty() {
            format!("unstarted-{:x}", m.id)
        } else {
            m.name.clone()
        };
        for u in &m.peer_urls {
            parts.push(format!("{n}={u}"));
        }
    }
    parts.join(",")
}
