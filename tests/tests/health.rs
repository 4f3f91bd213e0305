//! Mesh health in the API, against a real API server: agents write their tunnels' health
//! into their own WireGuardPeer status, the coordinator turns it into `MeshConnected`, and
//! an operator gates on it with `kubectl wait` and reads it in `kubectl get wgp`. An agent
//! that stops reporting turns its node's condition false, with the reason.

use std::time::Duration;

use isthmus_api::{WireGuardPeer, MESH_CONNECTED};
use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::eventually;
use kube::ResourceExt;

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
    let waited = cluster.rig.kubectl(&[
        "wait",
        "--for=condition=MeshConnected",
        "wireguardpeers",
        "--all",
        "--timeout=90s",
    ]);
    assert!(waited.is_ok(), "{waited:?}\n{}", cluster.logs());
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

    // What the agents wrote: per tunnel, a handshake and traffic.
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
    let names: Vec<&str> = health.peers.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(names, ["aws-1", "aws-2"]);
    assert!(health
        .peers
        .iter()
        .all(|p| p.latest_handshake.is_some() && p.rx_bytes > 0));

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

/// The path between the clouds breaks: no handshake can renew, and once the last one is
/// older than the threshold every node's MeshConnected turns False with the pair named.
/// (The threshold is lowered from 180 s to 125 s to keep the test short; it must stay above
/// WireGuard's 120 s rekey interval, or healthy tunnels would look stale.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_path_turns_mesh_connected_false_once_handshakes_go_stale() {
    let cluster = connected(
        &[(0, 1), (1, 1)],
        "2",
        &["--handshake-stale-seconds", "125"],
    )
    .await;

    // Everything crossing vsphere's gateway is dropped from now on.
    cluster.clouds[0]
        .gateway
        .exec("iptables", &["-I", "FORWARD", "-j", "DROP"])
        .expect("iptables");
    let stale = wait_for(&cluster, Duration::from_secs(200), |all| {
        all.len() == 2
            && all.iter().all(|(_, c)| {
                is(c, "False", "PairsDown", "down: ")
                    && c.as_ref()
                        .is_some_and(|(_, _, m)| m.ends_with("(no handshake for over 125s)"))
            })
    })
    .await;
    assert!(
        stale,
        "{:?}\n{}",
        conditions(&cluster).await,
        cluster.logs()
    );
}
