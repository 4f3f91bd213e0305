//! The multi-cluster coordinator (issue 14, part 1) against real API servers: a seed with
//! deploy/overlays/seed applied, and three user clusters with deploy/base's CRD, RBAC and
//! admission policy. Two coordinator replicas run in the seed with the ServiceAccount the
//! overlay creates; each user cluster is declared by a MeshCluster naming a Secret with a
//! kubeconfig for that cluster's coordinator identity. Nodes are written as kubelets write
//! them (admin), WireGuardPeers with each node's own pod-bound agent token.
//!
//! Shown: every cluster's peers admitted with mesh IPs from its own pool; a cluster added
//! at run time served; a wrong token and an unreachable address reported in their
//! MeshCluster's `Reachable` condition while the other clusters keep admitting promptly; a
//! deleted MeshCluster no longer served; one replica acts through the seed's Lease and the
//! other takes over when it goes.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use isthmus_api::{MeshCluster, WireGuardPeer, WireGuardPeerSpec, REACHABLE};
use isthmus_tests::daemon::{eventually, Daemon};
use isthmus_tests::kube::{KubeRig, RigOptions, NAMESPACE};
use isthmus_tests::publisher::{self, NodeKey};
use isthmus_tests::{scrape, seed};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);
/// How long a join in a healthy cluster may take while other clusters are broken.
const PROMPT: Duration = Duration::from_secs(5);

fn kubeconfig(rig: &KubeRig, server: &str, token: &str) -> String {
    seed::kubeconfig(rig, server, token).expect("kubeconfig")
}

async fn store_kubeconfig(seed: &KubeRig, name: &str, kubeconfig: &str) {
    seed::store_kubeconfig(seed, name, kubeconfig)
        .await
        .expect("kubeconfig Secret");
}

async fn declare(seed: &KubeRig, name: &str, mesh_cidr: &str, topology: &str) {
    seed::declare(seed, name, mesh_cidr, topology)
        .await
        .expect("MeshCluster");
}

/// A node joins a user cluster: its Node as the kubelet writes it, then its peer as its
/// agent publishes it (server-side apply with the node's own pod-bound token).
async fn join(rig: &KubeRig, name: &str, location: &str, n: u8) {
    let admin = rig.admin().await.expect("admin");
    let nodes: Api<Node> = Api::all(admin);
    let node_ip = format!("10.0.0.{n}");
    let pod_cidr = format!("10.244.{n}.0/24");
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": location}},
        "spec": {"podCIDRs": [pod_cidr]},
    }))
    .unwrap();
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("Node");
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {"addresses": [{"type": "InternalIP", "address": node_ip}]}
            })),
        )
        .await
        .expect("Node status");
    let token = rig.agent_token(name).await.expect("agent token");
    let agent = rig.client(&format!("agent-{name}"), &token).await.unwrap();
    let key = NodeKey([n; 32]);
    let spec = WireGuardPeerSpec {
        public_key: key.public(),
        endpoint: format!("203.0.113.{n}:51820"),
        location: location.into(),
        node_ip,
        pod_cidrs: vec![pod_cidr],
        vtep: None,
        vtep6: None,
        persistent_keepalive: None,
        mtu: None,
        key_proof: None,
    };
    let api = Api::<WireGuardPeer>::all(agent);
    publisher::apply(&api, name, key, &spec, None)
        .await
        .expect("the agent publishes its own peer");
    publisher::prove_in_background(api, name.to_string(), key, spec);
}

/// The mesh IP of `name` if admitted for its current generation.
/// The coordinators' default IPv6 pool, and the one MeshCluster b names.
const DEFAULT_POOL6: &str = "fd96::/64";
const B_POOL6: &str = "fd64:2::/120";

async fn admitted_ip(rig: &KubeRig, name: &str) -> Option<Ipv4Addr> {
    let api: Api<WireGuardPeer> = Api::all(rig.admin().await.ok()?);
    let p = api.get_opt(name).await.ok()??;
    if !p.is_admitted() {
        return None;
    }
    p.status?.mesh_ip?.parse().ok()
}

/// Waits for `names` to be admitted in `rig` with mesh IPs in `pool`; returns the time taken.
async fn wait_admitted(rig: &KubeRig, names: &[&str], pool: &str, timeout: Duration) -> Duration {
    let (net, len) = pool.split_once('/').expect("a CIDR");
    let (net, len): (Ipv4Addr, u32) = (net.parse().expect("pool"), len.parse().expect("length"));
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    let in_pool = |ip: Ipv4Addr| u32::from(ip) & mask == u32::from(net);
    let started = Instant::now();
    let ok = eventually(timeout, || async {
        for name in names {
            match admitted_ip(rig, name).await {
                Some(ip) if in_pool(ip) => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    let mut state = Vec::new();
    for name in names {
        state.push((name, admitted_ip(rig, name).await));
    }
    assert!(
        ok,
        "not all admitted in {pool} within {timeout:?}: {state:?}"
    );
    started.elapsed()
}

/// (status, reason, message, peers, admitted) of a MeshCluster's Reachable condition.
async fn reachable(
    seed: &KubeRig,
    name: &str,
) -> Option<(String, String, String, Option<i64>, Option<i64>)> {
    let api: Api<MeshCluster> = Api::all(seed.admin().await.ok()?);
    let mc = api.get_opt(name).await.ok()??;
    let s = mc.status?;
    let c = s.conditions.iter().find(|c| c.type_ == REACHABLE)?;
    Some((
        c.status.clone(),
        c.reason.clone(),
        c.message.clone(),
        s.peers,
        s.admitted,
    ))
}

async fn wait_reachable(
    seed: &KubeRig,
    name: &str,
    status: &str,
    reason: &str,
    logs: &dyn Fn() -> String,
) {
    let ok = eventually(SETTLE, || async {
        reachable(seed, name)
            .await
            .is_some_and(|r| r.0 == status && r.1 == reason)
    })
    .await;
    assert!(
        ok,
        "MeshCluster {name}: want {status}/{reason}, have {:?}\n{}",
        reachable(seed, name).await,
        logs()
    );
}

fn start_coordinator(seed: &KubeRig, kubeconfig: &str, identity: &str, extra: &[&str]) -> Daemon {
    seed::start_coordinator(seed, std::path::Path::new(kubeconfig), identity, extra)
        .expect("coordinator")
}

/// `isthmus_coordinator_peers` for `cluster` and `admitted` as scraped at `addr`.
fn peers_metric(addr: std::net::SocketAddr, cluster: &str, admitted: &str) -> Option<f64> {
    let (status, body) = scrape::get(addr, "/metrics").ok()?;
    assert_eq!(status, 200, "{body}");
    let samples = scrape::parse(&body).expect("an exposition");
    scrape::value(
        &samples,
        "isthmus_coordinator_peers",
        &[("cluster", cluster), ("admitted", admitted)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_seed_coordinator_serves_many_clusters() {
    isthmus_tests::require_root();
    let (seed, a, b, c) = tokio::join!(
        KubeRig::start_with(RigOptions::default()),
        KubeRig::start(),
        KubeRig::start(),
        KubeRig::start(),
    );
    let (seed, a, b, c) = (
        seed.expect("seed"),
        a.expect("cluster a"),
        b.expect("cluster b"),
        c.expect("cluster c"),
    );

    // The seed's install: the MeshCluster CRD, the coordinator in multi-cluster mode with
    // RBAC for MeshClusters and Secrets, and no agent.
    let built = seed::install_overlay(&seed).expect("the seed overlay");
    assert!(built.contains("- --multi-cluster"), "{built}");
    for absent in [
        "kind: DaemonSet",
        "wireguardpeers.isthmus.dev",
        "isthmus-agent",
    ] {
        assert!(
            !built.contains(absent),
            "the seed overlay still has {absent}"
        );
    }

    // One Secret per user cluster with a kubeconfig for its coordinator identity; two more
    // that cannot work: a token cluster a does not know, an address nobody listens on.
    for (name, rig) in [("a", &a), ("b", &b), ("c", &c)] {
        let token = rig.coordinator_token().await.expect("token");
        store_kubeconfig(&seed, name, &kubeconfig(rig, &rig.url(), &token)).await;
    }
    store_kubeconfig(&seed, "bad-token", &kubeconfig(&a, &a.url(), "not-a-token")).await;
    let nowhere = format!(
        "https://127.0.0.1:{}",
        isthmus_tests::ports::loopback_port().expect("a port")
    );
    store_kubeconfig(&seed, "unreachable", &kubeconfig(&a, &nowhere, "t")).await;

    // a takes the coordinators' default IPv6 pool (`--mesh-cidr-v6`), b names its own.
    declare(&seed, "a", "100.64.1.0/24", "cross-location").await;
    seed::declare_dual_stack(&seed, "b", "100.64.2.0/24", Some(B_POOL6), "full")
        .await
        .expect("MeshCluster b");
    tokio::join!(
        join(&a, "a-old-1", "old", 1),
        join(&a, "a-new-1", "new", 2),
        join(&b, "b-old-1", "old", 1),
        join(&b, "b-new-1", "new", 2),
        join(&c, "c-old-1", "old", 1),
    );

    let seed_kubeconfig = seed
        .kubeconfig(
            "coordinator",
            &seed.coordinator_token().await.expect("token"),
        )
        .expect("seed kubeconfig")
        .display()
        .to_string();
    let metrics = isthmus_tests::ports::loopback_addr().expect("a port");
    let metrics_arg = metrics.to_string();
    let mut replicas = vec![
        (
            "c1",
            Some(start_coordinator(
                &seed,
                &seed_kubeconfig,
                "c1",
                &[
                    "--metrics-addr",
                    &metrics_arg,
                    "--mesh-cidr-v6",
                    DEFAULT_POOL6,
                ],
            )),
        ),
        (
            "c2",
            Some(start_coordinator(
                &seed,
                &seed_kubeconfig,
                "c2",
                &["--mesh-cidr-v6", DEFAULT_POOL6],
            )),
        ),
    ];
    let logs = |replicas: &[(&str, Option<Daemon>)]| {
        replicas
            .iter()
            .filter_map(|(id, d)| Some(format!("--- {id} ---\n{}", d.as_ref()?.log())))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // 1. Each cluster's peers admitted from its own pool; the statuses say so.
    let started = Instant::now();
    wait_admitted(&a, &["a-old-1", "a-new-1"], "100.64.1.0/24", SETTLE).await;
    wait_admitted(&b, &["b-old-1", "b-new-1"], "100.64.2.0/24", SETTLE).await;
    eprintln!(
        "two clusters admitted {:?} after coordinator start",
        started.elapsed()
    );
    let b_topology = Api::<WireGuardPeer>::all(b.admin().await.unwrap())
        .get("b-old-1")
        .await
        .unwrap()
        .status
        .and_then(|s| s.topology);
    assert_eq!(
        b_topology,
        Some(isthmus_api::Topology::Full),
        "b's own topology"
    );
    for name in ["a", "b"] {
        let ok = eventually(SETTLE, || async {
            reachable(&seed, name).await.is_some_and(|r| {
                r.0 == "True" && r.1 == "Watching" && r.3 == Some(2) && r.4 == Some(2)
            })
        })
        .await;
        assert!(
            ok,
            "{name}: {:?}\n{}",
            reachable(&seed, name).await,
            logs(&replicas)
        );
    }
    assert_eq!(
        admitted_ip(&c, "c-old-1").await,
        None,
        "c is not declared yet"
    );
    // Dual-stack meshes: every peer also has an IPv6 mesh IP from its cluster's IPv6 pool,
    // and the MeshCluster says which pool it is served with.
    for (rig, cluster, peers, pool6) in [
        (&a, "a", ["a-old-1", "a-new-1"], DEFAULT_POOL6),
        (&b, "b", ["b-old-1", "b-new-1"], B_POOL6),
    ] {
        let (base, len) = pool6.split_once('/').expect("a CIDR");
        let base: std::net::Ipv6Addr = base.parse().expect("pool");
        let mask = u128::MAX << (128 - len.parse::<u32>().expect("length"));
        let in_pool = |ip: std::net::Ipv6Addr| u128::from(ip) & mask == u128::from(base);
        let api: Api<WireGuardPeer> = Api::all(rig.admin().await.unwrap());
        let mut ips = Vec::new();
        for name in peers {
            let s = api.get(name).await.unwrap().status.expect("status");
            assert_eq!(s.mesh_cidr_v6.as_deref(), Some(pool6), "{name}");
            let ip: std::net::Ipv6Addr = s.mesh_ipv6.expect("meshIPv6").parse().unwrap();
            assert!(in_pool(ip), "{name}: {ip} outside {pool6}");
            ips.push(ip);
        }
        assert_ne!(ips[0], ips[1], "{cluster}: one IPv6 mesh IP each");
        let status = Api::<MeshCluster>::all(seed.admin().await.unwrap())
            .get(cluster)
            .await
            .unwrap()
            .status
            .expect("status");
        assert_eq!(status.mesh_cidr_v6.as_deref(), Some(pool6), "{cluster}");
    }
    // Metrics per cluster, from either replica (both keep every cluster's cache).
    for name in ["a", "b"] {
        let ok = eventually(SETTLE, || async {
            peers_metric(metrics, name, "true") == Some(2.0)
                && peers_metric(metrics, name, "false") == Some(0.0)
        })
        .await;
        assert!(
            ok,
            "cluster {name}'s peers not in c1's metrics:\n{:?}",
            scrape::get(metrics, "/metrics")
        );
    }
    assert_eq!(peers_metric(metrics, "c", "true"), None, "c is not served");

    // 2. One replica acts: it holds the seed's Lease and is the only one writing.
    let leases: Api<Lease> = Api::namespaced(seed.admin().await.unwrap(), NAMESPACE);
    let holder = leases
        .get("isthmus-coordinator")
        .await
        .expect("the seed's Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a holder");
    let leader = replicas
        .iter()
        .position(|(id, _)| *id == holder)
        .expect("a replica leads");
    let standby = 1 - leader;
    let written = |i: usize, replicas: &[(&str, Option<Daemon>)]| {
        replicas[i]
            .1
            .as_ref()
            .map(|d| d.log())
            .unwrap_or_default()
            .contains("status written")
    };
    assert!(written(leader, &replicas), "{}", logs(&replicas));
    assert!(
        !written(standby, &replicas),
        "the standby wrote:\n{}",
        logs(&replicas)
    );

    // 3. A cluster declared at run time is served, from its own pool.
    declare(&seed, "c", "100.64.3.0/24", "cross-location").await;
    let took = wait_admitted(&c, &["c-old-1"], "100.64.3.0/24", SETTLE).await;
    eprintln!("cluster c served {took:?} after its MeshCluster was created");

    // 4. Broken clusters are reported, and the others keep admitting promptly.
    declare(&seed, "bad-token", "100.64.4.0/24", "cross-location").await;
    declare(&seed, "unreachable", "100.64.5.0/24", "cross-location").await;
    let log_fn = || logs(&replicas);
    wait_reachable(&seed, "bad-token", "False", "Unauthorized", &log_fn).await;
    wait_reachable(&seed, "unreachable", "False", "Unreachable", &log_fn).await;
    let (_, _, message, _, _) = reachable(&seed, "bad-token").await.unwrap();
    assert!(
        message.contains("credentials") && message.contains("Unauthorized"),
        "{message}"
    );
    let (_, _, message, _, _) = reachable(&seed, "unreachable").await.unwrap();
    assert!(message.contains("cannot reach the API server"), "{message}");
    join(&a, "a-new-2", "new", 3).await;
    let took = wait_admitted(&a, &["a-new-2"], "100.64.1.0/24", PROMPT).await;
    eprintln!("a join in a healthy cluster admitted in {took:?} beside two broken ones");
    join(&c, "c-new-1", "new", 2).await;
    wait_admitted(&c, &["c-new-1"], "100.64.3.0/24", PROMPT).await;

    // 5. A deleted MeshCluster is no longer served.
    Api::<MeshCluster>::all(seed.admin().await.unwrap())
        .delete("b", &DeleteParams::default())
        .await
        .expect("delete MeshCluster b");
    let stopped = eventually(SETTLE, || async {
        replicas.iter().all(|(_, d)| {
            d.as_ref().is_some_and(|d| {
                d.log()
                    .lines()
                    .any(|l| l.contains("cluster controller stopped") && l.contains("cluster=b"))
            })
        })
    })
    .await;
    assert!(stopped, "{}", logs(&replicas));
    assert_eq!(
        peers_metric(metrics, "b", "true"),
        None,
        "b's series outlive its MeshCluster:\n{:?}",
        scrape::get(metrics, "/metrics")
    );
    assert_eq!(peers_metric(metrics, "c", "true"), Some(2.0), "c's peers");
    join(&b, "b-new-2", "new", 3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(admitted_ip(&b, "b-new-2").await, None, "b is still served");
    let status = Api::<WireGuardPeer>::all(b.admin().await.unwrap())
        .get("b-new-2")
        .await
        .unwrap()
        .status;
    assert!(
        status.is_none(),
        "someone wrote b-new-2's status: {status:?}"
    );

    // 6. The leader goes (releasing the Lease); the standby takes over for every cluster.
    if let Some(mut d) = replicas[leader].1.take() {
        d.stop();
    }
    join(&a, "a-old-2", "old", 4).await;
    join(&c, "c-old-2", "old", 3).await;
    let took = wait_admitted(&a, &["a-old-2"], "100.64.1.0/24", SETTLE).await;
    wait_admitted(&c, &["c-old-2"], "100.64.3.0/24", SETTLE).await;
    eprintln!("after the leader stopped, the standby admitted a join in {took:?}");
    assert!(written(standby, &replicas), "{}", logs(&replicas));
}
