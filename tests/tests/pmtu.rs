//! Path MTU between clouds that survives silent drops (issue 17): one node per cloud with the
//! flannel-style overlay and a pod each, a real API server, the coordinator and the agents.
//! Between the clouds, the vsphere gateway plays the hostile router: an iptables length
//! match drops every packet above a size, in both directions, and sends no ICMP.
//!
//! What an operator checks, in order, on one cluster:
//! 1. a path that carries the full size keeps it (`isthmus-agent peers` shows 1420);
//! 2. at 1380 bytes the agents find 1312 inside the tunnel (60 bytes of WireGuard, padding); 20 MB pod → pod and node → node
//!    cross, and a 2000-byte UDP datagram too;
//! 3. the limit drops to 1300 in the middle of a transfer: it completes, within a bound;
//! 4. at 1300 bytes: routes, health, transfers and the datagram as in 2, the probes' cost
//!    while idle, and throughput compared with a static MTU configured by hand (1240);
//! 5. ICMP allowed instead (the gateway's public link has MTU 1300 and says so): all of it
//!    works too.
//!
//! The nodes' eth0 segments in software (`ethtool -K eth0 gso off tso off
//! tx-udp-segmentation off`), as a real NIC does before the wire: otherwise a veth hands the
//! gateway a whole 64 KB UDP GSO batch as one skb, and a length match drops what no real
//! router would ever see.
//!
//! Figures print with `--nocapture` (`FIGURES pmtu: …`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::netns::Netns;
use isthmus_tests::overlay::Overlay;
use isthmus_tests::traffic::{
    ping_within, tcp_mss, tcp_transfer, tcp_transfer_across, tcp_transfer_timed,
};

const VSPHERE: usize = 0;
const AWS: usize = 1;
const TRANSFER: u64 = 20 << 20;
const THROUGHPUT: u64 = 100 << 20;
/// The probes' port (the agent's default).
const PROBE_PORT: &str = "51821";
/// The hostile router's chain, in the vsphere gateway (a namespace of this test's own).
const CHAIN: &str = "isth-pmtu";
/// What the agents must find through the tunnel behind a 1380- and a 1300-byte path:
/// WireGuard adds 60 bytes over IPv4 and pads the inner packet to a multiple of 16 (up to the
/// device's MTU), so 1312 and 1232 are the largest that fit; the search stops within 4 bytes.
const AT_1380: std::ops::RangeInclusive<u64> = 1309..=1312;
const AT_1300: std::ops::RangeInclusive<u64> = 1229..=1232;
/// The longest a transfer may stall when the path shrinks under it (what the README states).
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// Drops every packet above `max` bytes crossing the vsphere gateway (`None`: none), no ICMP.
fn drop_above(cluster: &Cluster, max: Option<u32>) {
    let gw = &cluster.clouds[0].gateway;
    let ipt = |args: &[&str]| gw.exec("iptables", args).expect("iptables");
    if gw.exec("iptables", &["-n", "-L", CHAIN]).is_err() {
        ipt(&["-N", CHAIN]);
        ipt(&["-I", "FORWARD", "1", "-j", CHAIN]);
    }
    ipt(&["-F", CHAIN]);
    if let Some(max) = max {
        let range = format!("{}:65535", max + 1);
        ipt(&[
            "-A", CHAIN, "-m", "length", "--length", &range, "-j", "DROP",
        ]);
    }
}

/// What `isthmus-agent peers --json` on node `i` says about `peer`'s path MTU.
fn cli_path_mtu(cluster: &Cluster, i: usize, peer: &str) -> Option<u64> {
    cluster.nodes[i].agent_peer_row(peer)?["pathMTU"].as_u64()
}

/// The path MTU node `i`'s agent found toward the other node, from its runtime state (what
/// `peers` reads), polled cheaply.
fn path_mtu(cluster: &Cluster, i: usize) -> Option<u64> {
    read_path_mtu(&cluster.nodes[i].state_dir, &cluster.nodes[1 - i].name)
}

fn read_path_mtu(state_dir: &std::path::Path, other: &str) -> Option<u64> {
    let b = std::fs::read(state_dir.join("runtime.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&b).ok()?;
    doc["pathMTUs"][other].as_u64()
}

/// Watches node `i`'s path MTU from now on: the first moments it was at most `floor_max`
/// and in `settled` (the thread ends when both were seen, or after a minute).
fn watch_path_mtu(
    cluster: &Cluster,
    i: usize,
    floor_max: u64,
    settled: std::ops::RangeInclusive<u64>,
) -> std::thread::JoinHandle<(Option<Instant>, Option<Instant>)> {
    let (dir, other) = (
        cluster.nodes[i].state_dir.clone(),
        cluster.nodes[1 - i].name.clone(),
    );
    std::thread::spawn(move || {
        let (mut below, mut done) = (None, None);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) && done.is_none() {
            let m = read_path_mtu(&dir, &other);
            if below.is_none() && m.is_some_and(|m| m <= floor_max) {
                below = Some(Instant::now());
            }
            if below.is_some() && m.is_some_and(|m| settled.contains(&m)) {
                done = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (below, done)
    })
}

/// Waits until both agents report a path MTU in `want`; returns how long it took.
fn wait_path_mtu(
    cluster: &Cluster,
    want: std::ops::RangeInclusive<u64>,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if (0..2).all(|i| path_mtu(cluster, i).is_some_and(|m| want.contains(&m))) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "path MTUs {:?} / {:?}, want {want:?} within {within:?}\n{}",
        path_mtu(cluster, 0),
        path_mtu(cluster, 1),
        cluster.logs()
    );
}

/// Node `i`'s routes toward the other node: (host route to its mesh IP, pods' route).
fn route_mtus(cluster: &Cluster, overlay: &Overlay, i: usize, mesh: Ipv4Addr) -> (String, String) {
    let ns = &cluster.nodes[i].ns;
    let other = overlay.node(1 - i).expect("overlay node");
    (
        ns.ip(&["route", "show", &format!("{mesh}/32")])
            .expect("ip route"),
        ns.ip(&["route", "show", &other.pod_cidr()])
            .expect("ip route"),
    )
}

/// The `mtu N` of a route as `ip route` prints it.
fn mtu_of(route: &str) -> Option<u64> {
    let mut words = route.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// A 2000-byte UDP datagram from `from` to `to_addr` in `to` arrives whole (a few tries: UDP).
fn udp_2000(from: &Netns, to: &Netns, to_addr: IpAddr) -> bool {
    let rx = to
        .enter(move || std::net::UdpSocket::bind(SocketAddr::new(to_addr, 0)))
        .expect("enter")
        .expect("bind");
    rx.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let dst = rx.local_addr().expect("addr");
    let tx = from
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("enter")
        .expect("bind");
    let msg: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 4096];
    (0..5).any(|_| {
        tx.send_to(&msg, dst).is_ok() && rx.recv(&mut buf).is_ok_and(|n| buf[..n] == msg[..])
    })
}

/// Packets leaving node `i` for the probe port so far, above 100 bytes (probes; the
/// acknowledgements are smaller). A counting rule in the node's own namespace.
fn probes_sent(cluster: &Cluster, i: usize) -> u64 {
    let ns = &cluster.nodes[i].ns;
    let rule = [
        "-p",
        "udp",
        "--dport",
        PROBE_PORT,
        "-m",
        "length",
        "--length",
        "101:65535",
    ];
    if ns
        .exec("iptables", &[&["-C", "OUTPUT"][..], &rule].concat())
        .is_err()
    {
        ns.exec("iptables", &[&["-A", "OUTPUT"][..], &rule].concat())
            .expect("counting rule");
    }
    let out = ns
        .exec("iptables", &["-nvx", "-L", "OUTPUT"])
        .expect("iptables -L");
    out.lines()
        .find(|l| l.contains(&format!("dpt:{PROBE_PORT}")))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mbit(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
}

/// Transfers that must cross: 20 MB pod → pod (vsphere → aws), node → node (aws → vsphere
/// over mesh IPs), and a 2000-byte datagram pod → pod.
fn crossings(cluster: &Cluster, overlay: &Overlay, mesh: &[Ipv4Addr; 2], when: &str) {
    let (v, a) = (
        overlay.node(VSPHERE).expect("pod"),
        overlay.node(AWS).expect("pod"),
    );
    tcp_transfer(&v.pod, &a.pod, a.pod_ip.into(), TRANSFER)
        .unwrap_or_else(|e| panic!("{when}: 20 MB pod → pod: {e:#}\n{}", cluster.logs()));
    tcp_transfer(
        &cluster.nodes[AWS].ns,
        &cluster.nodes[VSPHERE].ns,
        mesh[VSPHERE].into(),
        TRANSFER,
    )
    .unwrap_or_else(|e| panic!("{when}: 20 MB node → node: {e:#}\n{}", cluster.logs()));
    assert!(
        udp_2000(&v.pod, &a.pod, a.pod_ip.into()),
        "{when}: a 2000-byte datagram did not cross"
    );
}

fn restart_agents(cluster: &mut Cluster, overlay: &Overlay, extra: &[&str]) {
    for i in 0..2 {
        cluster.start_node_agent(i, extra).expect("agent");
    }
    let (v, a) = (
        overlay.node(VSPHERE).expect("pod"),
        overlay.node(AWS).expect("pod"),
    );
    assert!(
        ping_within(&v.pod, a.pod_ip.into(), Duration::from_secs(60)),
        "no cross-cloud pod traffic after a restart:\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_mtu_is_found_through_silent_drops_and_followed() {
    let mut cluster = Cluster::with_options(ClusterOptions {
        underlay_mtu: 1500,
        ..Default::default()
    })
    .await
    .expect("cluster");
    cluster.add_node_idle(0, 1).await.expect("vsphere node");
    cluster.add_node_idle(1, 1).await.expect("aws node");
    let overlay = Overlay::build(&cluster).expect("overlay");
    for n in &cluster.nodes {
        n.ns.exec(
            "ethtool",
            &[
                "-K",
                "eth0",
                "gso",
                "off",
                "tso",
                "off",
                "tx-udp-segmentation",
                "off",
            ],
        )
        .expect("ethtool");
    }
    cluster.start_coordinator("c1").expect("coordinator");
    let extra = ["--health-interval", "1"];

    // 1. A full-size path keeps the full size.
    let started = Instant::now();
    restart_agents(&mut cluster, &overlay, &extra);
    wait_path_mtu(&cluster, 1420..=1420, Duration::from_secs(30));
    let full_found = started.elapsed();
    let ips = cluster.mesh_ips().await.expect("mesh IPs");
    let mesh_of = |i: usize| -> Ipv4Addr { ips[&cluster.nodes[i].name].parse().expect("mesh IP") };
    let mesh = [mesh_of(VSPHERE), mesh_of(AWS)];
    assert_eq!(cli_path_mtu(&cluster, VSPHERE, "aws-1"), Some(1420));
    let (host, pods) = route_mtus(&cluster, &overlay, VSPHERE, mesh[AWS]);
    assert_eq!(
        (mtu_of(&host), mtu_of(&pods)),
        (Some(1420), Some(1370)),
        "{host}\n{pods}"
    );

    // A full path clamps pods' segments only to what the tunnel carries (1420 - 90).
    let (full_client_mss, _) = tcp_mss(
        &overlay.node(VSPHERE).expect("pod").pod,
        &overlay.node(AWS).expect("pod").pod,
        overlay.node(AWS).expect("pod").pod_ip.into(),
    )
    .expect("a connection pod → pod");
    assert!(
        (1310..=1330).contains(&full_client_mss),
        "segment size pod → pod on a full path: {full_client_mss}"
    );

    // 2. 1380 bytes, silently: the agents notice without any traffic (their confirmations).
    drop_above(&cluster, Some(1380));
    let found_1380 = wait_path_mtu(&cluster, AT_1380, Duration::from_secs(30));
    crossings(&cluster, &overlay, &mesh, "1380-byte path");

    // 3. 1300 in the middle of a transfer.
    let (v, a) = (
        overlay.node(VSPHERE).expect("pod"),
        overlay.node(AWS).expect("pod"),
    );
    let watcher = watch_path_mtu(&cluster, VSPHERE, *AT_1300.end(), AT_1300);
    let changed_at = Arc::new(Mutex::new(None));
    let mark = changed_at.clone();
    let shrink = || {
        drop_above(&cluster, Some(1300));
        *mark.lock().expect("lock") = Some(Instant::now());
    };
    tcp_transfer_across(&v.pod, &a.pod, a.pod_ip.into(), 2 * TRANSFER, shrink)
        .unwrap_or_else(|e| panic!("transfer across the shrink: {e:#}\n{}", cluster.logs()));
    let changed = changed_at.lock().expect("lock").expect("the path shrank");
    let recovered = changed.elapsed();
    let (below, settled) = watcher.join().expect("watcher");
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(changed).as_secs_f64());
    let (detected, settled) = (since(below), since(settled));
    assert!(
        settled.is_some(),
        "the vsphere agent never settled at {AT_1300:?} after the shrink ({detected:?})\n{}",
        cluster.logs()
    );
    assert!(
        recovered <= RECOVERY_BOUND,
        "the transfer took {recovered:?} to finish after the path shrank (bound {RECOVERY_BOUND:?})"
    );

    // 4. At 1300: what a user sees, and the transfers.
    let (host, pods) = route_mtus(&cluster, &overlay, VSPHERE, mesh[AWS]);
    let cli = cli_path_mtu(&cluster, VSPHERE, "aws-1");
    assert!(cli.is_some_and(|m| AT_1300.contains(&m)), "{cli:?}");
    assert_eq!(
        (mtu_of(&host), mtu_of(&pods)),
        (cli, cli.map(|m| m - 50)),
        "the host route carries the path MTU, the pods' route 50 less for VXLAN:\n{host}\n{pods}"
    );
    let health_deadline = Instant::now() + Duration::from_secs(20);
    // status.health: the lowest, and this peer's own entry (its path is below the tunnel MTU).
    let (lowest, listed) = loop {
        let peers = cluster.peers().await.expect("peers");
        let health = peers
            .iter()
            .find(|p| kube::ResourceExt::name_any(*p) == "vsphere-1")
            .and_then(|p| p.status.as_ref()?.health.clone());
        let lowest = health.as_ref().and_then(|h| h.lowest_path_mtu);
        let listed: Vec<(String, i32)> = health
            .iter()
            .flat_map(|h| h.path_mtus.iter().map(|p| (p.node.clone(), p.path_mtu)))
            .collect();
        let at_1300 = |m: i32| u64::try_from(m).is_ok_and(|m| AT_1300.contains(&m));
        if (lowest.is_some_and(at_1300)
            && listed.len() == 1
            && listed[0].0 == "aws-1"
            && at_1300(listed[0].1))
            || Instant::now() > health_deadline
        {
            break (lowest, listed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        lowest.is_some_and(|m| u64::try_from(m).is_ok_and(|m| AT_1300.contains(&m))),
        "status.health.lowestPathMTU {lowest:?}"
    );
    assert!(
        listed.len() == 1
            && listed[0].0 == "aws-1"
            && u64::try_from(listed[0].1).is_ok_and(|m| AT_1300.contains(&m)),
        "status.health.pathMTUs {listed:?}"
    );
    crossings(&cluster, &overlay, &mesh, "1300-byte path");
    // Both SYNs were clamped: each pod sends segments the path carries from the first byte
    // (VXLAN: 20 outer IP + 8 UDP + 8 VXLAN + 14 Ethernet + 20 inner IP + 20 TCP = 90 bytes
    // besides the segment), though its own device says 1450.
    let clamp = cli.expect("path MTU") - 90;
    let (client_mss, server_mss) =
        tcp_mss(&v.pod, &a.pod, a.pod_ip.into()).expect("a connection pod → pod");
    assert!(
        u64::from(client_mss) <= clamp && u64::from(server_mss) <= clamp,
        "segment sizes pod → pod {client_mss}, back {server_mss}: not clamped to {clamp}"
    );
    let logged = cluster.nodes[VSPHERE]
        .agent
        .as_ref()
        .map(|a| a.log().matches("path MTU changed").count())
        .unwrap_or_default();
    assert!(logged >= 3, "each change logged: {logged}");

    // The probes' cost on a quiet, settled path.
    let before = probes_sent(&cluster, VSPHERE);
    let quiet = Duration::from_secs(30);
    std::thread::sleep(quiet);
    let probes = probes_sent(&cluster, VSPHERE) - before;
    let per_minute = probes as f64 * 60.0 / quiet.as_secs_f64();

    let discovered = tcp_transfer_timed(&v.pod, &a.pod, a.pod_ip.into(), THROUGHPUT)
        .expect("throughput, discovered");
    let discovered_nodes = tcp_transfer_timed(
        &cluster.nodes[AWS].ns,
        &cluster.nodes[VSPHERE].ns,
        mesh[VSPHERE].into(),
        THROUGHPUT,
    )
    .expect("throughput node → node, discovered");

    // The same path with the MTU set by hand and no probing.
    restart_agents(
        &mut cluster,
        &overlay,
        &["--pmtu-port", "0", "--mtu", "1240"],
    );
    let static_pods = tcp_transfer_timed(&v.pod, &a.pod, a.pod_ip.into(), THROUGHPUT)
        .expect("throughput, static");
    let static_nodes = tcp_transfer_timed(
        &cluster.nodes[AWS].ns,
        &cluster.nodes[VSPHERE].ns,
        mesh[VSPHERE].into(),
        THROUGHPUT,
    )
    .expect("throughput node → node, static");

    // 5. ICMP allowed: no silent drop, the public link itself is 1300 and says so.
    drop_above(&cluster, None);
    let tag = cluster.tag.clone();
    for (cloud, end) in [(0, "a"), (1, "b")] {
        cluster.clouds[cloud]
            .gateway
            .ip(&["link", "set", &format!("{tag}p{end}"), "mtu", "1300"])
            .expect("public link MTU");
    }
    restart_agents(&mut cluster, &overlay, &extra);
    let icmp_found = wait_path_mtu(&cluster, 1200..=1420, Duration::from_secs(30));
    crossings(&cluster, &overlay, &mesh, "1300-byte path with ICMP");
    let icmp_value = path_mtu(&cluster, VSPHERE);

    println!(
        "FIGURES pmtu: full path found {full:.1} s after agent start (1420); 1380 drop found in \
         {f1380:.1} s; shrink 1380 → 1300 mid-transfer: transfer done {rec:.1} s after the \
         change (bound {bound} s), path at ≤1232 after {det:.1?} s, settled after {set:.1?} s; probes on a quiet path \
         {per_minute:.1}/min/peer ({probes} in {quiet} s); 100 MiB across the 1300-byte path \
         pod → pod {d:.0} Mbit/s discovered vs {s:.0} Mbit/s static --mtu 1240, node → node \
         {dn:.0} vs {sn:.0} Mbit/s; TCP segment sizes pod → pod: {full_client_mss} on the full \
         path, {client_mss}/{server_mss} at 1300; ICMP allowed: path MTU {icmp:?} after {icmpt:.1} s",
        full = full_found.as_secs_f64(),
        f1380 = found_1380.as_secs_f64(),
        rec = recovered.as_secs_f64(),
        bound = RECOVERY_BOUND.as_secs(),
        det = detected,
        set = settled,
        quiet = quiet.as_secs(),
        d = mbit(THROUGHPUT, discovered),
        s = mbit(THROUGHPUT, static_pods),
        dn = mbit(THROUGHPUT, discovered_nodes),
        sn = mbit(THROUGHPUT, static_nodes),
        icmp = icmp_value,
        icmpt = icmp_found.as_secs_f64(),
    );
}
