//! The flannel overlay harness on its own, no agent: four nodes, two per cloud, whose node
//! IPs overlap across the clouds. What the agent tests will rely on must hold here:
//! same-location pods reach each other through flannel.1 (ping, 100 MB checked, a counted
//! stream without loss), cross-location pods do not (flannel's FDB points at the wrong node),
//! snapshots of a node ignore traffic but see an FDB change, and the FDB timer both times
//! out and measures a restore.

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::fdb::{fdb_set, measure_fdb_reassert};
use isthmus_tests::netns::Netns;
use isthmus_tests::overlay::{Overlay, OverlayNode, BRIDGE, ENCAP_OVERHEAD, VXLAN_DEV};
use isthmus_tests::snapshot::{diff, diff_text, snapshot};
use isthmus_tests::traffic::{ping, ping_df, start_stream, tcp_transfer_timed, StreamConfig};

const TRANSFER: u64 = 100 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn overlay_harness_mtu_1500() {
    harness(1500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_harness_mtu_1400() {
    harness(1400).await;
}

async fn harness(underlay_mtu: u32) {
    let started = Instant::now();
    let mut cluster = Cluster::with_options(ClusterOptions {
        underlay_mtu,
        ..Default::default()
    })
    .await
    .expect("cluster");
    // vsphere-1, vsphere-2, aws-1, aws-2: 10.0.0.11 and 10.0.0.12 in both clouds.
    for (cloud, slot) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
        cluster.add_node_idle(cloud, slot).await.expect("node");
    }
    let mut overlay = Overlay::build(&cluster).expect("overlay");
    eprintln!(
        "MTU {underlay_mtu}: cluster and overlay built in {:?}",
        started.elapsed()
    );
    let (v1, v2, a1, a2) = (
        overlay.named("vsphere-1").unwrap(),
        overlay.named("vsphere-2").unwrap(),
        overlay.named("aws-1").unwrap(),
        overlay.named("aws-2").unwrap(),
    );
    assert_eq!(
        v1.node_ip, a1.node_ip,
        "node IPs must overlap across clouds"
    );
    check_mtus(&cluster, &overlay, underlay_mtu);

    let node0 = &cluster.node("vsphere-1").ns;
    let before = snapshot(node0).unwrap();
    let before_peer = snapshot(&cluster.node("vsphere-2").ns).unwrap();

    // Same location: straight through flannel.1 over the LAN.
    assert!(
        ping(&v1.pod, v2.pod_ip.into(), 2),
        "vsphere pods cannot ping"
    );
    assert!(ping(&a2.pod, a1.pod_ip.into(), 2), "aws pods cannot ping");
    // The largest unfragmented packet fits: pod MTU + VXLAN overhead = underlay MTU.
    let largest = v1.mtu - 28;
    assert!(
        ping_df(&v1.pod, v2.pod_ip.into(), largest),
        "a full-size packet did not fit"
    );
    assert!(
        !ping_df(&v1.pod, v2.pod_ip.into(), largest + 1),
        "a packet above the pod MTU left unfragmented"
    );
    let took = tcp_transfer_timed(&v1.pod, &v2.pod, v2.pod_ip.into(), TRANSFER)
        .expect("checked transfer between same-location pods");
    eprintln!(
        "MTU {underlay_mtu}: 100 MiB pod to pod over flannel.1 in {took:?} ({:.0} Mbit/s)",
        TRANSFER as f64 * 8.0 / took.as_secs_f64() / 1e6
    );

    // Across locations flannel's FDB sends to 10.0.0.11/12 in its own cloud: nothing arrives.
    assert!(
        !ping(&v1.pod, a1.pod_ip.into(), 1),
        "reached aws-1 without a mesh"
    );
    assert!(
        !ping(&v1.pod, a2.pod_ip.into(), 1),
        "reached aws-2 without a mesh"
    );

    let stream =
        start_stream(&v1.pod, &v2.pod, v2.pod_ip.into(), StreamConfig::default()).expect("stream");
    thread::sleep(Duration::from_secs(2));
    let stats = stream.stop().expect("stream stats");
    eprintln!("MTU {underlay_mtu}: stream {stats:?}");
    assert!(stats.sent >= 900, "sender too slow: {stats:?}");
    assert_eq!(
        stats.lost, 0,
        "same-location stream lost datagrams: {stats:?}"
    );
    assert_eq!(stats.received, stats.sent);

    // Traffic crossed node 0 (and its peer) in every form; their state is as it was.
    let after = snapshot(node0).unwrap();
    assert!(
        after == before,
        "traffic changed the snapshot of {}:\n{}",
        cluster.node("vsphere-1").name,
        diff_text(&before, &after)
    );
    let after_peer = snapshot(&cluster.node("vsphere-2").ns).unwrap();
    assert!(
        after_peer == before_peer,
        "{}",
        diff_text(&before_peer, &after_peer)
    );

    fdb_timer(&cluster, &overlay, &before);

    // flannel restarting writes the same entries again: nothing changes.
    overlay
        .flannel_resync(&cluster, cluster.index_of("vsphere-1"))
        .unwrap();
    let resynced = snapshot(node0).unwrap();
    assert!(resynced == before, "{}", diff_text(&before, &resynced));
    // A node leaving: exactly its ARP entry, FDB entry and route go from the others.
    let gone = overlay.named("aws-2").unwrap();
    let (gone_mac, gone_cidr) = (gone.vtep_mac_str(), gone.pod_cidr());
    overlay
        .remove_node(&cluster, cluster.index_of("aws-2"))
        .unwrap();
    let removed = diff(&before, &snapshot(node0).unwrap());
    assert_eq!(removed.len(), 3, "{removed:#?}");
    assert!(removed.iter().all(|l| l.starts_with('-')), "{removed:#?}");
    assert!(removed
        .iter()
        .any(|l| l.contains(&gone_mac) && l.contains("fdb|")));
    assert!(removed.iter().any(|l| l.contains(&gone_cidr)));
    eprintln!(
        "MTU {underlay_mtu}: harness test took {:?}",
        started.elapsed()
    );
}

/// Every underlay link has the underlay MTU; flannel.1, cni0 and the pods 50 less.
fn check_mtus(cluster: &Cluster, overlay: &Overlay, underlay: u32) {
    // Gateways: the lan bridge, its node-facing veth ends, the public veth.
    for cloud in &cluster.clouds {
        let links = cloud.gateway.ip(&["-o", "link", "show"]).unwrap();
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| *n != "lo")
            .collect();
        assert_eq!(names.len(), 2 + 2, "{links}");
        for name in names {
            assert_eq!(cloud.gateway.link_mtu(name).unwrap(), underlay, "{name}");
        }
    }
    for node in &cluster.nodes {
        assert_eq!(node.ns.link_mtu("eth0").unwrap(), underlay, "{}", node.name);
        for dev in [VXLAN_DEV, BRIDGE] {
            assert_eq!(
                node.ns.link_mtu(dev).unwrap(),
                underlay - ENCAP_OVERHEAD,
                "{} {dev}",
                node.name
            );
        }
    }
    for n in &overlay.nodes {
        assert_eq!(n.pod.link_mtu("eth0").unwrap(), underlay - ENCAP_OVERHEAD);
    }
}

/// On node 0 (vsphere-1), the FDB entry of aws-1's VTEP, which flannel points at
/// 10.0.0.11: nobody restores it (a timeout), then a thread restores it (a measurement);
/// the snapshot sees the rewrite and is back to `before` afterwards.
fn fdb_timer(cluster: &Cluster, overlay: &Overlay, before: &str) {
    let node0 = &cluster.node("vsphere-1").ns;
    let a1 = overlay.named("aws-1").unwrap();
    let flannel_dst = a1.node_ip;
    // Another node's address in these namespaces: the entry never points outside them.
    let elsewhere = Ipv4Addr::new(10, 0, 0, 12);

    let t = Instant::now();
    let err = measure_fdb_reassert(
        node0,
        VXLAN_DEV,
        a1.vtep_mac,
        elsewhere,
        flannel_dst,
        Duration::from_secs(1),
    )
    .expect_err("nobody restores the entry, yet the timer stopped");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the timeout took {:?}",
        t.elapsed()
    );
    eprintln!("unrestored FDB entry: {err:#}");
    let rewritten = snapshot(node0).unwrap();
    let changed = diff_text(before, &rewritten);
    assert!(
        changed.contains(&format!("dst {elsewhere}")),
        "the snapshot missed the FDB rewrite:\n{changed}"
    );

    // Restore. Writing the same destination again changes nothing, and the kernel announces
    // nothing: the helper says so at once instead of waiting for a restore it cannot see.
    restore(node0, a1, flannel_dst);
    let t = Instant::now();
    let err = measure_fdb_reassert(
        node0,
        VXLAN_DEV,
        a1.vtep_mac,
        flannel_dst,
        flannel_dst,
        Duration::from_secs(5),
    )
    .expect_err("an unchanged entry cannot be timed");
    assert!(
        format!("{err:#}").contains("changed nothing") && t.elapsed() < Duration::from_secs(1),
        "{err:#} after {:?}",
        t.elapsed()
    );

    // Rewrite again, with a "restorer" 100 ms later.
    let delay = Duration::from_millis(100);
    let took = thread::scope(|scope| {
        let restorer = scope.spawn(|| {
            thread::sleep(delay);
            fdb_set(node0, VXLAN_DEV, a1.vtep_mac, flannel_dst)
        });
        let took = measure_fdb_reassert(
            node0,
            VXLAN_DEV,
            a1.vtep_mac,
            elsewhere,
            flannel_dst,
            Duration::from_secs(5),
        );
        restorer.join().unwrap().expect("restorer");
        took.expect("restore not seen")
    });
    eprintln!("restore by a thread {delay:?} after the rewrite measured as {took:?}");
    assert!(
        took > delay / 2 && took < delay + Duration::from_millis(900),
        "measured {took:?} for a restore after {delay:?}"
    );
    let end = snapshot(node0).unwrap();
    assert!(end == before, "{}", diff_text(before, &end));
}

/// Points node `i`'s FDB entry for `node`'s VTEP at `dst`, as flannel does.
fn restore(ns: &Netns, node: &OverlayNode, dst: Ipv4Addr) {
    fdb_set(ns, VXLAN_DEV, node.vtep_mac, dst).expect("restoring the entry");
}
