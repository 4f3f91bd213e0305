//! Chaos on the control plane while traffic flows (issue 15): the leader coordinator paused
//! (SIGSTOP) mid-join and resumed after its standby took over, the API server gone for five
//! minutes, etcd restarted. What a platform team checks each time: not one packet of a
//! cross-cloud stream and ping lost; no legitimately joined node ever de-admitted, no
//! `MeshConnected` flapping (a kube watcher records every condition transition for the
//! whole test); a resumed old leader writes nothing; joins made meanwhile are admitted; the
//! mesh converges afterwards. And an agent that cannot publish (API server down) still
//! stops cleanly on SIGTERM.
//!
//! Figures print with `--nocapture`: takeover time after SIGSTOP, packets sent and received.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use isthmus_api::{WireGuardPeer, ADMITTED, MESH_CONNECTED};
use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::{eventually, wait_until};
use isthmus_tests::traffic::{ping_stats, start_stream, Stream, StreamConfig, StreamStats};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;

const CONVERGE: Duration = Duration::from_secs(60);
/// After an outage the watches come back on their backoff (up to tens of seconds).
const RECONVERGE: Duration = Duration::from_secs(150);

/// One condition of one WireGuardPeer changing status, as a watcher saw it.
#[derive(Clone, Debug)]
struct Transition {
    /// Since the recorder started.
    at: Duration,
    peer: String,
    condition: &'static str,
    from: Option<String>,
    to: String,
    reason: String,
}

/// Watches every WireGuardPeer (as the admin) for the whole test and records each change
/// of `Admitted` and `MeshConnected`; across outages the watcher re-lists and goes on.
struct Recorder {
    started: Instant,
    log: Arc<Mutex<Vec<Transition>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(cluster: &Cluster) -> Recorder {
        let api: Api<WireGuardPeer> = Api::all(cluster.rig.admin().await.expect("admin"));
        let started = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let log = log.clone();
            tokio::spawn(async move {
                let mut last: BTreeMap<(String, &'static str), String> = BTreeMap::new();
                let mut events =
                    std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
                while let Some(event) = events.next().await {
                    let peer = match event {
                        Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => p,
                        _ => continue,
                    };
                    for type_ in [ADMITTED, MESH_CONNECTED] {
                        let Some(c) = peer
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
                        else {
                            continue;
                        };
                        let key = (peer.name_any(), type_);
                        let from = last.get(&key).cloned();
                        if from.as_deref() != Some(c.status.as_str()) {
                            last.insert(key, c.status.clone());
                            log.lock().expect("recorder log").push(Transition {
                                at: started.elapsed(),
                                peer: peer.name_any(),
                                condition: type_,
                                from,
                                to: c.status.clone(),
                                reason: c.reason.clone(),
                            });
                        }
                    }
                }
            })
        };
        Recorder { started, log, task }
    }

    fn transitions(&self) -> Vec<Transition> {
        self.log.lock().expect("recorder log").clone()
    }

    /// When `peer` was first seen `Admitted=True`, since the recorder started.
    fn admitted_at(&self, peer: &str) -> Option<Duration> {
        self.transitions()
            .into_iter()
            .find(|t| t.peer == peer && t.condition == ADMITTED && t.to == "True")
            .map(|t| t.at)
    }

    /// Every transition away from `True` (a de-admission, a `MeshConnected` flap), and any
    /// `Admitted` other than `True`: none may happen to a node that joined legitimately
    /// (every node in these tests did). The one exception is a joiner's first verdict,
    /// `KeyNotProven` while its agent answers the key challenge (one round trip).
    fn assert_no_flap(&self, cluster: &Cluster) {
        let all = self.transitions();
        let flaps: Vec<String> = all
            .iter()
            .filter(|t| {
                let awaiting_proof = t.from.is_none() && t.reason == "KeyNotProven";
                t.from.as_deref() == Some("True")
                    || (t.condition == ADMITTED && t.to != "True" && !awaiting_proof)
            })
            .map(|t| {
                format!(
                    "{} {} {} -> {} ({}) at {:?}",
                    t.peer,
                    t.condition,
                    t.from.as_deref().unwrap_or("none"),
                    t.to,
                    t.reason,
                    t.at
                )
            })
            .collect();
        assert!(
            flaps.is_empty(),
            "conditions left True, or a node was refused: {flaps:#?}\nall transitions: \
             {all:#?}\n{}",
            cluster.logs()
        );
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Cross-cloud traffic running for the whole scenario: a UDP stream (500/s) and a ping
/// (5/s), both from `vsphere-1` to `aws-1`'s mesh IP.
struct Traffic {
    stream: Stream,
    ping: std::thread::JoinHandle<(u32, u32)>,
}

impl Traffic {
    /// `seconds`: how long the ping runs; the scenario must be over by then.
    async fn start(cluster: &Cluster, seconds: u32) -> Traffic {
        let ips = cluster.mesh_ips().await.expect("mesh IPs");
        let dst: IpAddr = ips["aws-1"].parse().expect("mesh IP");
        let stream = start_stream(
            &cluster.node("vsphere-1").ns,
            &cluster.node("aws-1").ns,
            dst,
            StreamConfig::default(),
        )
        .expect("stream");
        let ns = cluster.node("vsphere-1").ns.name.clone();
        let ping = std::thread::spawn(move || ping_stats(&ns, dst, seconds * 5, "0.2"));
        Traffic { stream, ping }
    }

    /// Stops the stream, waits for the ping to finish, and asserts nothing was lost.
    fn finish(self, scenario: &str, cluster: &Cluster) -> (StreamStats, (u32, u32)) {
        let stats = self.stream.stop().expect("stream stats");
        let ping = self.ping.join().expect("ping thread");
        println!(
            "{scenario}: stream sent {} received {} lost {} (longest gap {:?}); \
             ping sent {} received {}",
            stats.sent, stats.received, stats.lost, stats.longest_gap, ping.0, ping.1
        );
        assert!(
            stats.sent > 0 && stats.lost == 0 && stats.send_errors == 0,
            "{scenario}: the stream lost packets: {stats:?}\n{}",
            cluster.logs()
        );
        assert!(
            ping.0 > 0 && ping.0 == ping.1,
            "{scenario}: pings lost: sent {} received {}\n{}",
            ping.0,
            ping.1,
            cluster.logs()
        );
        (stats, ping)
    }
}

/// Per peer and condition: status and lastTransitionTime. The coordinator keeps a
/// condition's lastTransitionTime while its status holds, so a flap shows here even when
/// every watch (the recorder's included) was away while it happened.
type Conditions = BTreeMap<(String, &'static str), (String, String)>;

async fn conditions(cluster: &Cluster) -> Conditions {
    let mut out = Conditions::new();
    for p in cluster.peers().await.unwrap_or_default() {
        for type_ in [ADMITTED, MESH_CONNECTED] {
            if let Some(c) = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            {
                out.insert(
                    (p.name_any(), type_),
                    (c.status.clone(), c.last_transition_time.0.to_string()),
                );
            }
        }
    }
    out
}

/// Waits until every peer is both `Admitted` and `MeshConnected` (health reports lag the
/// handshakes) and returns the conditions then: what the chaos must leave untouched.
async fn all_connected(cluster: &Cluster) -> Conditions {
    let ok = eventually(CONVERGE, || async {
        let c = conditions(cluster).await;
        let peers = cluster.peers().await.map(|p| p.len()).unwrap_or(0);
        c.len() == peers * 2 && c.values().all(|(status, _)| status == "True")
    })
    .await;
    let now = conditions(cluster).await;
    assert!(ok, "not every peer connected: {now:#?}\n{}", cluster.logs());
    now
}

/// Every condition in `before` still holds, with the same lastTransitionTime: nothing was
/// de-admitted or disconnected, however briefly.
async fn assert_unchanged(cluster: &Cluster, before: &Conditions) {
    let now = conditions(cluster).await;
    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| now.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k:?}: {v:?} -> {:?}", now.get(k)))
        .collect();
    assert!(
        changed.is_empty(),
        "conditions changed across the chaos: {changed:#?}\n{}",
        cluster.logs()
    );
}

/// Debug for the coordinators: a write refused with a conflict (a stale writer fenced by
/// the resourceVersion precondition) is logged at debug.
const COORDINATOR_LOG: &str = "info,isthmus_coordinator=debug";

async fn two_nodes_two_coordinators() -> Cluster {
    let mut cluster = Cluster::new().await.expect("cluster");
    cluster.add_node(0, 1).await.expect("vsphere-1");
    cluster.add_node(1, 1).await.expect("aws-1");
    for identity in ["c1", "c2"] {
        cluster
            .start_coordinator_logging(identity, &[], COORDINATOR_LOG)
            .expect("coordinator");
    }
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "mesh did not form\n{}",
        cluster.logs()
    );
    cluster
}

async fn lease_holder(cluster: &Cluster) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(cluster.rig.admin().await.ok()?, "isthmus-system");
    api.get_opt("isthmus-coordinator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Waits until the cluster converges and the recorder has seen `peers` admitted.
async fn wait_admitted_and_converged(cluster: &Cluster, recorder: &Recorder, peers: &[&str]) {
    let admitted = eventually(RECONVERGE, || async {
        peers.iter().all(|p| recorder.admitted_at(p).is_some())
    })
    .await;
    assert!(
        admitted,
        "{peers:?} not admitted: {:#?}\n{}",
        recorder.transitions(),
        cluster.logs()
    );
    assert!(
        cluster.wait_converged(RECONVERGE).await,
        "no convergence\n{}",
        cluster.logs()
    );
}

/// The leader is paused mid-join (SIGSTOP, its lease unreleased): the standby takes over
/// only once it has seen the lease unrenewed for the whole lease, admits the joins, and the
/// old leader, resumed (SIGCONT) with a view and a belief in its leadership from before,
/// writes nothing. Nothing is de-admitted, nothing flaps, no packet is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_resumed_after_takeover_writes_nothing() {
    let mut cluster = two_nodes_two_coordinators().await;
    let recorder = Recorder::start(&cluster).await;
    let before = all_connected(&cluster).await;
    let traffic = Traffic::start(&cluster, 100).await;

    let holder = lease_holder(&cluster).await.expect("a lease holder");
    let (leader, standby) = if holder == "c1" { (0, 1) } else { (1, 0) };
    let standby_name = if holder == "c1" { "c2" } else { "c1" };
    let stopped_at = recorder.started.elapsed();
    let stopped = Instant::now();
    cluster.coordinators[leader].signal(libc::SIGSTOP);
    // Joins while nobody may act: their peers wait for the standby.
    cluster.add_node(1, 2).await.expect("aws-2 joins");
    cluster.add_node(0, 2).await.expect("vsphere-2 joins");
    let took_over = eventually(CONVERGE, || async {
        lease_holder(&cluster).await.as_deref() == Some(standby_name)
    })
    .await;
    let lease_taken = stopped.elapsed();
    assert!(
        took_over,
        "the standby never took the lease\n{}",
        cluster.logs()
    );
    wait_admitted_and_converged(&cluster, &recorder, &["aws-2", "vsphere-2"]).await;
    let first_admission = ["aws-2", "vsphere-2"]
        .iter()
        .filter_map(|p| recorder.admitted_at(p))
        .min()
        .expect("admitted")
        - stopped_at;
    println!(
        "takeover after SIGSTOP: lease taken by the standby after {lease_taken:?}, first join \
         admitted by it after {first_admission:?} (lease 4 s)"
    );
    let standby_log = cluster.coordinators[standby].log();
    assert!(
        standby_log.contains("status written") && standby_log.contains("aws-2"),
        "the standby did not admit the joins:\n{standby_log}"
    );

    // Keep it paused past its resync period (20 s) and the agents' health reports (15 s):
    // on SIGCONT a pass is due at once, decided from caches from before the pause, while it
    // still believes it leads; a join now gives it every reason to act.
    if let Some(rest) = Duration::from_secs(30).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let paused = stopped.elapsed();
    let before_resume = cluster.coordinators[leader].log().len();
    cluster.coordinators[leader].signal(libc::SIGCONT);
    cluster.add_node(1, 3).await.expect("aws-3 joins");
    wait_admitted_and_converged(&cluster, &recorder, &["aws-3"]).await;
    // Several resyncs' worth of time for a stale writer to show itself.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let resumed = cluster.coordinators[leader].log()[before_resume..].to_string();
    assert!(
        resumed.contains("leading=false"),
        "the resumed leader never stood down:\n{resumed}"
    );
    for write in ["status written", "deleted: its Node is gone"] {
        assert!(
            !resumed.contains(write),
            "the resumed old leader wrote ({write}):\n{resumed}"
        );
    }
    assert_eq!(
        lease_holder(&cluster).await.as_deref(),
        Some(standby_name),
        "the lease went back to the old leader"
    );
    // What it tried: writes refused by the resourceVersion precondition, or not sent
    // because the lease was lost by then.
    let fenced = resumed.matches("changed since read").count();
    let withheld = resumed.matches("not written").count();
    println!(
        "the old leader was paused for {paused:?}; after SIGCONT it wrote nothing, had \
         {fenced} writes refused with a conflict and withheld {withheld}"
    );
    traffic.finish("SIGSTOP failover", &cluster);
    recorder.assert_no_flap(&cluster);
    assert_unchanged(&cluster, &before).await;
    // Every node joined legitimately and is admitted.
    for name in ["vsphere-1", "aws-1", "aws-2", "vsphere-2", "aws-3"] {
        assert!(
            recorder.admitted_at(name).is_some(),
            "{name} never admitted"
        );
    }
}

/// The API server is gone for five minutes (real time) while traffic flows: the data plane
/// does not notice; afterwards agents and coordinator converge, a new join is admitted, and
/// nothing was de-admitted or flapped.
#[tokio::test(flavor = "multi_thread")]
async fn a_five_minute_api_server_outage_loses_nothing() {
    let mut cluster = two_nodes_two_coordinators().await;
    let recorder = Recorder::start(&cluster).await;
    let before = all_connected(&cluster).await;
    let traffic = Traffic::start(&cluster, 300 + 60).await;
    cluster.rig.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(300)).await;
    cluster
        .rig
        .start_apiserver()
        .await
        .expect("API server back");
    cluster.add_node(1, 2).await.expect("aws-2 joins");
    wait_admitted_and_converged(&cluster, &recorder, &["aws-2"]).await;
    traffic.finish("5 min API server outage", &cluster);
    recorder.assert_no_flap(&cluster);
    assert_unchanged(&cluster, &before).await;
}

/// etcd restarts (stopped, then started on the same data directory) while traffic flows:
/// the same as an API server outage, seen through the API server.
#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_restart_loses_nothing() {
    let mut cluster = two_nodes_two_coordinators().await;
    let recorder = Recorder::start(&cluster).await;
    let before = all_connected(&cluster).await;
    let traffic = Traffic::start(&cluster, 120).await;
    cluster.rig.stop_etcd();
    tokio::time::sleep(Duration::from_secs(20)).await;
    cluster.rig.start_etcd().expect("etcd back");
    assert!(
        cluster.rig.wait_ready(Duration::from_secs(60)),
        "the API server never found etcd again:\n{}",
        cluster.rig.apiserver_log()
    );
    cluster.add_node(1, 2).await.expect("aws-2 joins");
    wait_admitted_and_converged(&cluster, &recorder, &["aws-2"]).await;
    traffic.finish("etcd restart", &cluster);
    recorder.assert_no_flap(&cluster);
    assert_unchanged(&cluster, &before).await;
}

/// An agent started while the API server is down retries publishing its WireGuardPeer; a
/// SIGTERM meanwhile stops it the normal way — routing restored, UAPI socket gone, exit 0 —
/// and promptly, not after a kill.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_cannot_publish_stops_cleanly_on_sigterm() {
    let mut cluster = Cluster::new().await.expect("cluster");
    let i = cluster.add_node_idle(0, 1).await.expect("node");
    cluster.rig.stop_apiserver();
    cluster.start_node_agent(i, &[]).expect("agent");
    let node = &mut cluster.nodes[i];
    let mut agent = node.agent.take().expect("agent");
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .log()
            .contains("publishing this node's WireGuardPeer failed")),
        "the agent never tried to publish:\n{}",
        agent.log()
    );
    let asked = Instant::now();
    let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10));
    let took = asked.elapsed();
    let log = agent.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after SIGTERM ({took:?}):\n{log}"
    );
    assert!(log.contains("routing restored"), "{log}");
    let sock = format!("/var/run/wireguard/{}.sock", node.iface);
    assert!(!std::path::Path::new(&sock).exists(), "{sock} left behind");
    println!("an agent stuck publishing stopped {took:?} after SIGTERM");
}
