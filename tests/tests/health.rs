//! Mesh health in the API, against a real API server: agents write a summary of their
//! tunnels into their own WireGuardPeer status, the coordinator turns it into
//! `MeshConnected`, and an operator gates on it with `kubectl wait` and reads it in
//! `kubectl get wgp`. An agent that stops reporting turns its node's condition false, with
//! the reason. A steady mesh costs one Lease renewal per node per heartbeat and no write to
//! any WireGuardPeer; a tunnel going down is written within the agent's check period, not a
//! heartbeat later.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use isthmus_api::{heartbeat, MeshHealth, WireGuardPeer, MESH_CONNECTED};
use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::eventually;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

fn condition(p: &WireGuardPeer) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == MESH_CONNECTED)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn conditions(cluster: &Cluster) -> Vec<(String, Option<(String, String, String)>)> {
    let mut out: Vec<_> = cluster
        .peers()
        .await
        .expect("peers")
        .iter()
        .map(|p| (p.name_any(), condition(p)))
        .collect();
    out.sort();
    out
}

async fn wait_for(
    cluster: &Cluster,
    timeout: Duration,
    want: impl Fn(&[(String, Option<(String, String, String)>)]) -> bool,
) -> bool {
    eventually(timeout, || async { want(&conditions(cluster).await) }).await
}

fn is(
    c: &Option<(String, String, String)>,
    status: &str,
    reason: &str,
    message_prefix: &str,
) -> bool {
    c.as_ref()
        .is_some_and(|(s, r, m)| s == status && r == reason && m.starts_with(message_prefix))
}

/// `kubectl wait` for `MeshConnected` on every peer, as a migration step gates on it.
fn wait_mesh_connected(cluster: &Cluster) {
    let waited = cluster.rig.kubectl(&[
        "wait",
        "--for=condition=MeshConnected",
        "wireguardpeers",
        "--all",
        "--timeout=90s",
    ]);
    assert!(waited.is_ok(), "{waited:?}\n{}", cluster.logs());
}

/// Nodes at `(cloud, slot)` with agents reporting every `interval` seconds, a coordinator
/// with `coordinator_args`, once `kubectl wait --for=condition=MeshConnected` is met.
async fn connected(nodes: &[(usize, u8)], interval: &str, coordinator_args: &[&str]) -> Cluster {
    let mut cluster = Cluster::new().await.expect("cluster");
    for &(cloud, slot) in nodes {
        let i = cluster.add_node_idle(cloud, slot).await.expect("node");
        cluster
            .start_node_agent(i, &["--health-interval", interval])
            .expect("agent");
    }
    cluster
        .start_coordinator_with("c1", coordinator_args)
        .expect("coordinator");
    wait_mesh_connected(&cluster);
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_connected_gates_on_health_and_turns_false_when_an_agent_goes_quiet() {
    // The gate an operator uses before cordoning old nodes.
    let cluster = connected(
        &[(0, 1), (1, 1), (1, 2)],
        "1",
        &["--report-stale-seconds", "5"],
    )
    .await;
    let all = conditions(&cluster).await;
    assert!(
        is(
            &all[0].1,
            "True",
            "AllPairsUp",
            "every tunnel the topology wants is up"
        ),
        "{all:?}"
    );
    assert!(
        is(
            &all[1].1,
            "True",
            "AllPairsUp",
            "every tunnel the topology wants is up"
        ),
        "{all:?}"
    );
    assert!(
        is(
            &all[2].1,
            "True",
            "AllPairsUp",
            "every tunnel the topology wants is up"
        ),
        "{all:?}"
    );

    // What the agents wrote: a summary, both tunnels up, none down, nothing per peer at
    // full size.
    let peers = cluster.peers().await.expect("peers");
    let vsphere = peers
        .iter()
        .find(|p| p.name_any() == "vsphere-1")
        .expect("vsphere-1");
    let health = vsphere
        .status
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .expect("vsphere-1 reports its health");
    assert_eq!(
        (
            health.peers_up,
            health.peers_expected,
            health.down_peers.len()
        ),
        (2, 2, 0),
        "{health:?}"
    );

    let wide = cluster
        .rig
        .kubectl(&["get", "wgp", "-o", "wide"])
        .expect("kubectl get wgp -o wide");
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert!(header.windows(2).any(|w| w == ["UP", "EXPECTED"]), "{wide}");
    let table = cluster
        .rig
        .kubectl(&["get", "wgp"])
        .expect("kubectl get wgp");
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("CONNECTED")),
        "{table}"
    );
    let connected = table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().filter(|w| *w == "True").count() == 2)
        .count();
    assert_eq!(connected, 3, "admitted and connected, every row:\n{table}");

    // aws-2's agent freezes (SIGSTOP): it stops reporting, and its node is no longer
    // connected — the others still are, their handshakes with it are recent.
    let pid = cluster.node("aws-2").agent.as_ref().expect("agent").pid() as i32;
    // SAFETY: signalling a child this test started, by its PID.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let quiet = wait_for(&cluster, Duration::from_secs(30), |all| {
        all.iter().any(|(n, c)| {
            n == "aws-2" && is(c, "False", "ReportStale", "the agent has not reported")
        })
    })
    .await;
    let seen = conditions(&cluster).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        quiet,
        "a silent agent must turn MeshConnected false: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|(n, _)| n != "aws-2")
            .all(|(_, c)| is(c, "True", "AllPairsUp", "")),
        "{seen:?}"
    );
    // Back: reporting again, connected again.
    assert!(
        wait_for(&cluster, Duration::from_secs(30), |all| all
            .iter()
            .all(|(_, c)| is(c, "True", "AllPairsUp", "")))
        .await,
        "{:?}",
        conditions(&cluster).await
    );
}

/// What a watch of every WireGuardPeer saw — what each agent's own watch receives: when
/// each write arrived, whose object, and its health report.
type Writes = Arc<Mutex<Vec<(Instant, String, Option<MeshHealth>)>>>;

/// Every write to any WireGuardPeer, as a watch like the agents' sees it (a relist that
/// repeats a resource version adds nothing).
fn record_writes(api: Api<WireGuardPeer>) -> (Writes, tokio::task::JoinHandle<()>) {
    let seen: Writes = Arc::default();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut versions = std::collections::HashMap::new();
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(event) = events.next().await {
            let p = match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                _ => continue,
            };
            let name = p.name_any();
            if versions.insert(name.clone(), p.resource_version()) == Some(p.resource_version()) {
                continue;
            }
            let health = p.status.and_then(|s| s.health);
            out.lock()
                .expect("writes")
                .push((Instant::now(), name, health));
        }
    });
    (seen, task)
}

/// When each renewal of `node`'s heartbeat Lease arrived, as the coordinator's watch sees it.
fn record_renewals(
    api: Api<Lease>,
    node: &str,
) -> (Arc<Mutex<Vec<Instant>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let out = seen.clone();
    let name = heartbeat::lease_name(node).expect("lease name");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        let mut last = None;
        let mut events = std::pin::pin!(watcher(api, config));
        while let Some(event) = events.next().await {
            let lease = match event {
                Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => l,
                _ => continue,
            };
            let renewed = lease.spec.and_then(|s| s.renew_time);
            if renewed.is_some() && renewed != last {
                last = renewed;
                out.lock().expect("renewals").push(Instant::now());
            }
        }
    });
    (seen, task)
}

/// Unix seconds of `node`'s latest handshake with `peer`, as `isthmus-agent peers` shows it.
fn latest_handshake(cluster: &Cluster, node: &str, peer: &str) -> Option<i64> {
    cluster.node(node).agent_peer_row(peer)?["latestHandshake"].as_i64()
}

/// A steady, healthy mesh: the agents renew their heartbeat Leases once a heartbeat (here
/// 20 s) and write nothing to any WireGuardPeer, whatever their tunnels' handshakes and
/// counters do, so an agent's watch receives nothing. Then the path between
/// the clouds breaks: once the last handshake is older than the agent's threshold (lowered
/// from 180 s to 125 s to keep the test short; it must stay above WireGuard's 120 s rekey),
/// the agent names the peer down within its 5 s check, not a heartbeat later, and every
/// node's MeshConnected turns False with the pair named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_mesh_renews_its_leases_writes_no_peer_and_reports_a_broken_path_at_once() {
    const HEARTBEAT: u64 = 20;
    const THRESHOLD: i64 = 125;
    const CHECK: i64 = 5;
    let mut cluster = Cluster::new().await.expect("cluster");
    for (cloud, slot) in [(0, 1), (1, 1)] {
        let i = cluster.add_node_idle(cloud, slot).await.expect("node");
        cluster
            .start_node_agent(
                i,
                &[
                    "--health-interval",
                    &HEARTBEAT.to_string(),
                    "--handshake-stale-seconds",
                    &THRESHOLD.to_string(),
                ],
            )
            .expect("agent");
    }
    cluster.start_coordinator("c1").expect("coordinator");
    wait_mesh_connected(&cluster);
    let admin = cluster.rig.admin().await.expect("admin");
    let (writes, watch) = record_writes(Api::all(admin.clone()));
    let (renewals, lease_watch) = record_renewals(
        Api::namespaced(admin, heartbeat::DEFAULT_NAMESPACE),
        "vsphere-1",
    );
    // Let the watches list the objects first, and the first path MTU settle.
    tokio::time::sleep(Duration::from_secs(10)).await;

    // 1. Steady state: count the writes over a window of 150 s.
    let window = Duration::from_secs(150);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let steady: Vec<(String, Option<MeshHealth>)> = writes
        .lock()
        .expect("writes")
        .iter()
        .filter(|(at, _, _)| *at > start)
        .map(|(_, n, h)| (n.clone(), h.clone()))
        .collect();
    let renewed = renewals
        .lock()
        .expect("renewals")
        .iter()
        .filter(|at| **at > start)
        .count() as u64;
    println!(
        "steady state in {}s with a {HEARTBEAT}s heartbeat: {} WireGuardPeer writes, \
         {renewed} renewals of vsphere-1's Lease ({:.1} per minute)",
        window.as_secs(),
        steady.len(),
        renewed as f64 * 60.0 / window.as_secs_f64()
    );
    assert!(
        steady.is_empty(),
        "a steady mesh writes nothing every agent's watch would carry: {steady:?}"
    );
    assert!(
        renewed <= window.as_secs() / HEARTBEAT + 1,
        "{renewed} renewals in {window:?}"
    );
    assert!(
        renewed >= window.as_secs() / HEARTBEAT - 1,
        "the heartbeat keeps the agent alive: {renewed} renewals in {window:?}"
    );
    lease_watch.abort();

    // 2. Everything crossing vsphere's gateway is dropped from now on.
    cluster.clouds[0]
        .gateway
        .exec("iptables", &["-I", "FORWARD", "-j", "DROP"])
        .expect("iptables");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last_handshake = latest_handshake(&cluster, "vsphere-1", "aws-1").expect("handshake");
    let stale = wait_for(&cluster, Duration::from_secs(200), |all| {
        all.len() == 2
            && all.iter().all(|(_, c)| {
                is(c, "False", "PairsDown", "down: ")
                    && c.as_ref()
                        .is_some_and(|(_, _, m)| m.ends_with("(no recent handshake)"))
            })
    })
    .await;
    assert!(
        stale,
        "{:?}\n{}",
        conditions(&cluster).await,
        cluster.logs()
    );
    let down = writes
        .lock()
        .expect("writes")
        .iter()
        .filter(|(_, n, _)| n == "vsphere-1")
        .filter_map(|(_, _, h)| h.clone())
        .find(|h| h.down_peers == ["aws-1"])
        .expect("vsphere-1 names aws-1 down");
    watch.abort();
    // When the handshake crossed the threshold, and when the agent's report says it saw it
    // down (both from this machine's clock, in whole seconds: one of rounding, one for a
    // busy machine; still far below the 20 s heartbeat).
    let crossed = last_handshake + THRESHOLD;
    let reported = down.observed_time.0.as_second();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    println!(
        "down reported {}s after the threshold was crossed",
        reported - crossed
    );
    assert!(
        reported <= crossed + CHECK + 2 && reported <= now,
        "crossed at {crossed}, reported at {reported}: within the check, not a heartbeat"
    );
    assert_eq!((down.peers_up, down.peers_expected), (0, 1), "{down:?}");
}
