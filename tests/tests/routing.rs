//! The flannel overlay across clouds through the mesh, on real kernel devices: four nodes
//! in two clouds whose node IPs overlap, each with a flannel-style `flannel.1`, `cni0` and
//! a pod (`tests/src/overlay.rs`); the clouds reach each other only through their NAT
//! gateways. A real API server, the coordinator and one agent per node.
//!
//! What a platform team checks: pods talk across clouds once the agents run and not
//! before; pods in one cloud never touch the tunnel and never lose a packet while the mesh
//! comes and goes; full-size TCP crosses at underlay MTU 1500 and 1400 with no MTU set by
//! hand; an FDB entry flannel rewrites is put back; and after the agents go — gracefully,
//! or SIGKILLed and cleaned up — every node's links, addresses, routes, neighbours, FDB and
//! rules are exactly what they were.
//!
//! Figures print with `--nocapture`: time from agent start to cross-cloud pod traffic,
//! re-assertion latency over 100 rewrites, graceful removal time.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::fdb::{fdb_set, measure_fdb_reassert};
use isthmus_tests::overlay::{Overlay, VXLAN_DEV};
use isthmus_tests::snapshot::{diff_text, snapshot};
use isthmus_tests::traffic::{
    link_counters, ping, ping_within, start_stream, tcp_mss, tcp_transfer, StreamConfig,
};

/// The nodes: two per cloud, slots 1 and 2, so `vsphere-1` and `aws-1` are both 10.0.0.11.
const VSPHERE_1: &str = "vsphere-1";
const VSPHERE_2: &str = "vsphere-2";
const AWS_1: &str = "aws-1";
const AWS_2: &str = "aws-2";
const BIG: u64 = 100 * 1024 * 1024;

async fn four_nodes(underlay_mtu: u32) -> (Cluster, Overlay) {
    let mut cluster = Cluster::with_options(ClusterOptions {
        underlay_mtu,
        ..Default::default()
    })
    .await
    .expect("cluster");
    for (cloud, slot) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
        cluster.add_node_idle(cloud, slot).await.expect("node");
    }
    let overlay = Overlay::build(&cluster).expect("overlay");
    cluster.start_coordinator("c1").expect("coordinator");
    (cluster, overlay)
}

fn pod_ip(overlay: &Overlay, name: &str) -> IpAddr {
    IpAddr::V4(overlay.named(name).expect("overlay node").pod_ip)
}

fn start_agents(cluster: &mut Cluster, extra: &[&str]) {
    for i in 0..cluster.nodes.len() {
        cluster.start_node_agent(i, extra).expect("agent");
    }
}

/// Waits until every pod reaches every pod in the other cloud; returns how long it took.
fn wait_cross_cloud(cluster: &Cluster, overlay: &Overlay) -> Duration {
    let started = Instant::now();
    for (from, to) in [
        (VSPHERE_1, AWS_1),
        (VSPHERE_1, AWS_2),
        (VSPHERE_2, AWS_1),
        (VSPHERE_2, AWS_2),
        (AWS_2, VSPHERE_1),
    ] {
        let pod = &overlay.named(from).expect("pod").pod;
        assert!(
            ping_within(pod, pod_ip(overlay, to), Duration::from_secs(60)),
            "pod on {from} never reached the pod on {to}:\n{}",
            cluster.logs()
        );
    }
    started.elapsed()
}

fn mesh_ip(mesh: &std::collections::BTreeMap<String, String>, name: &str) -> Ipv4Addr {
    mesh.get(name)
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("{name} has no mesh IP: {mesh:?}"))
}

/// `isthmus-agent peers` and `status` on node `name`, as an operator runs them in the pod.
fn check_cli(cluster: &Cluster, name: &str, expect_up: &[&str]) {
    let node = cluster.node(name);
    let agent = |args: &[&str]| {
        isthmus_tests::netns::run(&isthmus_tests::agent_binary().display().to_string(), args)
            .expect("isthmus-agent")
    };
    let kubeconfig = node.kubeconfig.display().to_string();
    let json: serde_json::Value = serde_json::from_str(&agent(&[
        "peers",
        "--iface",
        &node.iface,
        "--kubeconfig",
        &kubeconfig,
        "--json",
    ]))
    .expect("peers --json is JSON");
    let rows = json["peers"].as_array().expect("peers array");
    let up: Vec<&str> = rows
        .iter()
        .filter(|r| r["state"] == "up")
        .filter_map(|r| r["node"].as_str())
        .collect();
    assert_eq!(up, expect_up, "{json:#}");
    for r in rows {
        assert!(
            r["meshIP"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("100.96.")),
            "{r}"
        );
        assert!(r["rxBytes"].as_u64().is_some_and(|b| b > 0), "{r}");
        assert!(
            r["handshakeAgeSeconds"].as_u64().is_some_and(|a| a < 180),
            "{r}"
        );
    }
    let table = agent(&["peers", "--iface", &node.iface, "--kubeconfig", &kubeconfig]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].ends_with("STATE"),
        "{table}"
    );
    assert_eq!(lines.len(), 1 + expect_up.len(), "{table}");
    assert!(
        lines[1].starts_with(expect_up[0]) && lines[1].ends_with("up"),
        "{table}"
    );

    let state_dir = node.state_dir.display().to_string();
    let status: serde_json::Value = serde_json::from_str(&agent(&[
        "status",
        "--state-dir",
        &state_dir,
        "--iface",
        &node.iface,
        "--json",
    ]))
    .expect("status --json is JSON");
    assert_eq!(status["agentRunning"], true, "{status:#}");
    assert_eq!(status["runtime"]["mode"], "vxlan", "{status:#}");
    assert_eq!(
        status["runtime"]["topology"], "cross-location",
        "{status:#}"
    );
    assert_eq!(status["runtime"]["admitted"], true, "{status:#}");
    assert_eq!(status["runtime"]["apiReachable"], true, "{status:#}");
    assert_eq!(status["runtime"]["routingOk"], true, "{status:#}");
    assert_eq!(status["peers"]["up"], expect_up.len(), "{status:#}");
    assert!(
        status["journalEntries"].as_u64().is_some_and(|n| n > 0),
        "{status:#}"
    );
    assert!(
        status["publicKey"].as_str().is_some_and(|k| k.len() == 44),
        "{status:#}"
    );
    let human = agent(&["status", "--state-dir", &state_dir, "--iface", &node.iface]);
    assert!(
        human.contains("mode:") && human.contains("vxlan"),
        "{human}"
    );
    assert!(!human.to_lowercase().contains("private"), "{human}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_mode_carries_pods_across_clouds_and_graceful_removal_leaves_nothing() {
    let (mut cluster, overlay) = four_nodes(1500).await;
    let before = cluster.snapshots();
    let pod = |name: &str| &overlay.named(name).expect("pod").pod;
    assert!(
        !ping(pod(VSPHERE_1), pod_ip(&overlay, AWS_1), 1),
        "cross-cloud pod traffic must not work before the mesh (node IPs overlap)"
    );

    // A counted stream between the two vsphere pods runs from before the mesh to after it.
    let stream = start_stream(
        pod(VSPHERE_1),
        pod(VSPHERE_2),
        pod_ip(&overlay, VSPHERE_2),
        StreamConfig::default(),
    )
    .expect("stream");

    let started = Instant::now();
    start_agents(&mut cluster, &[]);
    wait_cross_cloud(&cluster, &overlay);
    let to_traffic = started.elapsed();

    // Same-location pod traffic never enters the tunnel.
    let v1 = cluster.node(VSPHERE_1);
    let tun_before = link_counters(&v1.ns, &v1.iface).expect("counters");
    tcp_transfer(
        pod(VSPHERE_1),
        pod(VSPHERE_2),
        pod_ip(&overlay, VSPHERE_2),
        20 << 20,
    )
    .expect("same-location TCP");
    let same = link_counters(&v1.ns, &v1.iface)
        .expect("counters")
        .since(&tun_before);
    assert_eq!(
        (same.tx_packets, same.rx_packets),
        (0, 0),
        "same-location traffic went through the tunnel"
    );

    // Full-size TCP across clouds, checked byte for byte, through the tunnel.
    let a1 = cluster.node(AWS_1);
    let vxlan_before = link_counters(&a1.ns, VXLAN_DEV).expect("counters");
    tcp_transfer(pod(VSPHERE_1), pod(AWS_1), pod_ip(&overlay, AWS_1), BIG)
        .expect("100 MiB vsphere → aws");
    let crossed = link_counters(&v1.ns, &v1.iface)
        .expect("counters")
        .since(&tun_before);
    assert!(
        crossed.tx_bytes > BIG,
        "cross-cloud traffic must ride the tunnel: {crossed:?}"
    );
    // The receiving agent read flannel.1's port and wrote its VXLAN into the TUN as tunnel
    // super-packets (kernel ≥ 6.17), which flannel.1 decapsulated whole: far fewer packets
    // into it than the ~80,000 datagrams the transfer took.
    let decapsulated = link_counters(&a1.ns, VXLAN_DEV)
        .expect("counters")
        .since(&vxlan_before);
    assert!(
        decapsulated.rx_packets * 8 < BIG / 1400,
        "flannel.1 on aws-1 took in {} packets for {BIG} bytes: VXLAN went in datagram by \
         datagram",
        decapsulated.rx_packets
    );

    // flannel rewrites the FDB entry for aws-1 back to its node IP: the agent restores it.
    let mesh = cluster.mesh_ips().await.expect("mesh IPs");
    let aws1 = overlay.named(AWS_1).expect("aws-1");
    let mut latencies: Vec<Duration> = (0..100)
        .map(|_| {
            measure_fdb_reassert(
                &cluster.node(VSPHERE_1).ns,
                VXLAN_DEV,
                aws1.vtep_mac,
                aws1.node_ip,
                mesh_ip(&mesh, AWS_1),
                Duration::from_secs(5),
            )
            .expect("re-assertion")
        })
        .collect();
    latencies.sort();
    assert!(
        cluster
            .node(VSPHERE_1)
            .agent
            .as_ref()
            .is_some_and(|a| a.log().contains("re-asserted an entry someone rewrote")),
        "the agent logs what it put back"
    );
    assert!(ping(pod(VSPHERE_1), pod_ip(&overlay, AWS_1), 1));

    check_cli(&cluster, VSPHERE_1, &["aws-1", "aws-2"]);

    // Graceful removal: SIGTERM, as when the DaemonSet is deleted.
    let mut removal = Duration::ZERO;
    for node in &mut cluster.nodes {
        let mut agent = node.agent.take().expect("agent");
        let t = Instant::now();
        let status = agent.stop_with(libc::SIGTERM, Duration::from_secs(10));
        removal = removal.max(t.elapsed());
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not exit cleanly: {status:?}\n{}",
            node.name,
            agent.log()
        );
    }
    let stats = stream.stop().expect("stream");
    assert_eq!(
        stats.lost, 0,
        "same-location pods lost packets while the mesh came and went: {stats:?}"
    );
    cluster.assert_restored(&before, "after graceful removal", "");
    assert!(!ping(pod(VSPHERE_1), pod_ip(&overlay, AWS_1), 1));

    println!(
        "FIGURES vxlan: agent start → cross-cloud pod traffic {:.0} ms; re-assertion over {} \
         rewrites p50 {:.2} ms, max {:.2} ms; graceful removal (slowest node) {:.0} ms; \
         same-location stream {} sent, {} lost, longest gap {:.1} ms",
        to_traffic.as_secs_f64() * 1e3,
        latencies.len(),
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        removal.as_secs_f64() * 1e3,
        stats.sent,
        stats.lost,
        stats.longest_gap.as_secs_f64() * 1e3,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_cleanup_restores_exactly_at_mtu_1400() {
    let (mut cluster, overlay) = four_nodes(1400).await;
    let before = cluster.snapshots();
    let pod = |name: &str| &overlay.named(name).expect("pod").pod;
    start_agents(&mut cluster, &[]);
    wait_cross_cloud(&cluster, &overlay);
    tcp_transfer(pod(AWS_2), pod(VSPHERE_2), pod_ip(&overlay, VSPHERE_2), BIG)
        .expect("100 MiB aws → vsphere at underlay MTU 1400");
    // The MTU no one set: tunnel 1400 − 80, minus VXLAN's 50 on flannel's route.
    let aws2_cidr = overlay.named(AWS_2).expect("aws-2").pod_cidr();
    let route = cluster
        .node(VSPHERE_2)
        .ns
        .ip(&["route", "show", &aws2_cidr])
        .expect("route");
    assert!(route.contains("mtu 1270"), "{route}");

    for node in &mut cluster.nodes {
        let mut agent = node.agent.take().expect("agent");
        agent.stop_with(libc::SIGKILL, Duration::from_secs(5));
    }
    // While no agent runs, flannel points aws-2's entry on vsphere-1 somewhere new (as if
    // aws-2's address changed): cleanup must leave flannel's newer value alone.
    let v1 = &cluster.node(VSPHERE_1).ns;
    let aws2 = overlay.named(AWS_2).expect("aws-2");
    // Written over netlink as flannel writes it (`bridge fdb` would add NUD_NOARP).
    let fdb = |dst: Ipv4Addr| {
        fdb_set(v1, VXLAN_DEV, aws2.vtep_mac, dst).expect("flannel's FDB write");
    };
    fdb(Ipv4Addr::new(10, 0, 0, 42));

    let cleanup = |node: &isthmus_tests::cluster::NodeHandle| {
        isthmus_tests::netns::run(
            &isthmus_tests::agent_binary().display().to_string(),
            &[
                "cleanup",
                "--state-dir",
                &node.state_dir.display().to_string(),
                "--iface",
                &node.iface,
                "--netns",
                &format!("/var/run/netns/{}", node.ns.name),
            ],
        )
        .expect("isthmus-agent cleanup")
    };
    for node in &cluster.nodes {
        cleanup(node);
        assert!(
            !node.state_dir.join("routing-journal.json").exists(),
            "{}: the journal is gone after cleanup",
            node.name
        );
    }
    let shown = v1
        .exec("bridge", &["fdb", "show", "dev", VXLAN_DEV])
        .expect("bridge fdb show");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(&aws2.vtep_mac_str()) && l.contains("dst 10.0.0.42")),
        "cleanup overwrote flannel's newer entry:\n{shown}"
    );
    // Put flannel's original back (the test's own churn), then every node is as before.
    fdb(aws2.node_ip);
    cluster.assert_restored(&before, "after SIGKILL and cleanup", "");
    for node in &cluster.nodes {
        cleanup(node);
    }
    cluster.assert_restored(&before, "after a second cleanup", "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_mode_carries_pods_across_clouds_without_touching_flannel() {
    let (mut cluster, overlay) = four_nodes(1500).await;
    let before = cluster.snapshots();
    let pod = |name: &str| &overlay.named(name).expect("pod").pod;
    start_agents(&mut cluster, &["--routing", "routed"]);
    wait_cross_cloud(&cluster, &overlay);
    tcp_transfer(
        pod(VSPHERE_2),
        pod(AWS_2),
        pod_ip(&overlay, AWS_2),
        20 << 20,
    )
    .expect("TCP vsphere → aws, routed");
    // The pods' devices say 1450; the engine clamps both SYNs to the tunnel's 1420 less IP
    // and TCP headers (1380), less the timestamp option the segments carry (12).
    let (client_mss, server_mss) =
        tcp_mss(pod(VSPHERE_2), pod(AWS_2), pod_ip(&overlay, AWS_2)).expect("TCP, routed");
    assert_eq!(
        (client_mss, server_mss),
        (1368, 1368),
        "segment sizes pod → pod and back, routed"
    );
    let v2 = cluster.node(VSPHERE_2);
    let route = v2
        .ns
        .ip(&["route", "get", &pod_ip(&overlay, AWS_2).to_string()])
        .expect("route get");
    assert!(route.contains(&v2.iface), "routed into the tunnel: {route}");
    let fdb = v2
        .ns
        .exec("bridge", &["fdb", "show", "dev", VXLAN_DEV])
        .expect("fdb");
    let aws2 = overlay.named(AWS_2).expect("aws-2");
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&aws2.vtep_mac_str())
                && l.contains(&format!("dst {}", aws2.node_ip))),
        "routed mode leaves flannel's FDB alone:\n{fdb}"
    );
    for node in &mut cluster.nodes {
        let mut agent = node.agent.take().expect("agent");
        assert!(agent
            .stop_with(libc::SIGTERM, Duration::from_secs(10))
            .is_some_and(|s| s.success()));
    }
    cluster.assert_restored(&before, "after graceful removal (routed)", "");
}

/// The TUN device deleted under a running agent: its reader fails, and the agent stops as on
/// SIGTERM — routing restored, journal and UAPI socket gone — and exits non-zero with the
/// reason, rather than vanishing with flannel's entries still pointing into a dead tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tun_read_error_restores_routing_before_the_agent_exits() {
    let mut cluster = Cluster::new().await.expect("cluster");
    for (cloud, slot) in [(0, 1), (1, 1)] {
        cluster.add_node_idle(cloud, slot).await.expect("node");
    }
    let overlay = Overlay::build(&cluster).expect("overlay");
    cluster.start_coordinator("c1").expect("coordinator");
    let before = snapshot(&cluster.node(VSPHERE_1).ns).expect("snapshot");
    start_agents(&mut cluster, &[]);
    let pod = &overlay.named(VSPHERE_1).expect("pod").pod;
    assert!(
        ping_within(pod, pod_ip(&overlay, AWS_1), Duration::from_secs(60)),
        "pods never reached each other across clouds:\n{}",
        cluster.logs()
    );
    let node = cluster.node_mut(VSPHERE_1);
    let journal = node.state_dir.join("routing-journal.json");
    assert!(journal.exists(), "routing changed nothing");

    node.ns
        .ip(&["link", "del", &node.iface])
        .expect("deleting the TUN device");
    let mut agent = node.agent.take().expect("agent");
    let exited = isthmus_tests::daemon::wait_until(Duration::from_secs(15), || !agent.is_running());
    let log = agent.log();
    assert!(exited, "the agent kept running without its TUN:\n{log}");
    let after = snapshot(&node.ns).expect("snapshot");
    assert!(
        after == before,
        "{VSPHERE_1} after its TUN read failed:\n{}\n{log}",
        diff_text(&before, &after)
    );
    assert!(!journal.exists(), "the journal outlived the agent:\n{log}");
    let sock = format!("/var/run/wireguard/{}.sock", node.iface);
    assert!(!std::path::Path::new(&sock).exists(), "{sock} left behind");
    let status = agent.stop().expect("exit status");
    assert!(!status.success(), "{status}: a stopped tunnel is a failure");
    assert!(
        log.contains("the tunnel stopped") && log.contains("routing restored"),
        "{log}"
    );
}
