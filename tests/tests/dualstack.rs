//! IPv6 and dual stack end to end, on real kernel devices with a real API server: two
//! dual-stack nodes in two clouds (`tests/src/cluster.rs` with `ipv6: true`) whose clouds
//! reach each other only over IPv6 (routed 2001:db8:<n>::/64 prefixes, no IPv4 NAT between
//! them). Each Node lists only its IPv6 address as InternalIP, so its agent advertises
//! `[2001:db8:…]:51820`; its pod CIDRs are an IPv4 /24 and an IPv6 /64, and its pod has an
//! address in each, behind flannel's IPv4 `flannel.1` and `cni0`.
//!
//! What an operator checks: the tunnels run over the IPv6 underlay; pods reach the other
//! cloud over IPv6 and IPv4 (ping and TCP) in both routing modes, and not before the agents
//! run; after the agents stop every node is as it was.

use std::net::IpAddr;
use std::time::Duration;

use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::netns::Netns;
use isthmus_tests::overlay::Overlay;
use isthmus_tests::snapshot::{diff_text, snapshot};
use isthmus_tests::traffic::{ping, ping_within, tcp_transfer};

const VSPHERE: &str = "vsphere-1";
const AWS: &str = "aws-1";

async fn two_dual_stack_nodes() -> (Cluster, Overlay) {
    let mut cluster = Cluster::with_options(ClusterOptions {
        ipv6: true,
        ..Default::default()
    })
    .await
    .expect("cluster");
    for cloud in [0, 1] {
        cluster.add_node_idle(cloud, 1).await.expect("node");
    }
    let overlay = Overlay::build(&cluster).expect("overlay");
    cluster.start_coordinator("c1").expect("coordinator");
    (cluster, overlay)
}

/// The pod on `name`: its namespace, IPv4 and IPv6 addresses.
fn pod<'a>(overlay: &'a Overlay, name: &str) -> (&'a Netns, IpAddr, IpAddr) {
    let n = overlay.named(name).expect("overlay node");
    let v6 = n.pod_ip6.expect("a dual-stack pod");
    (&n.pod, IpAddr::V4(n.pod_ip), IpAddr::V6(v6))
}

fn snapshots(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| snapshot(&n.ns).expect("snapshot"))
        .collect()
}

/// Agents in `mode` on both nodes: the mesh forms over IPv6 and dual-stack pods talk across
/// the clouds in both families; a graceful stop leaves every node as it was.
async fn pods_talk_over_both_families(mode: &str) {
    let (mut cluster, overlay) = two_dual_stack_nodes().await;
    let (v_pod, v_ip4, v_ip6) = pod(&overlay, VSPHERE);
    let (a_pod, a_ip4, a_ip6) = pod(&overlay, AWS);
    assert!(
        !ping(v_pod, a_ip6, 1),
        "{mode}: the pods' IPv6 must not cross the clouds before the mesh"
    );
    let before = snapshots(&cluster);
    for i in 0..cluster.nodes.len() {
        cluster
            .start_node_agent(i, &["--routing", mode])
            .expect("agent");
    }
    assert!(
        cluster.wait_converged(Duration::from_secs(60)).await,
        "{mode}: mesh never converged:\n{}",
        cluster.logs()
    );

    // The endpoints each agent derived from its Node, as published and as dialled.
    let peers = cluster.peers().await.expect("peers");
    for (me, other) in [(VSPHERE, AWS), (AWS, VSPHERE)] {
        let want = &cluster.node(other).endpoint;
        assert!(want.starts_with("[2001:db8:"), "{want}");
        let spec = peers
            .iter()
            .find(|p| kube::ResourceExt::name_any(*p) == other)
            .map(|p| p.spec.endpoint.clone());
        assert_eq!(spec.as_ref(), Some(want), "{other}'s published endpoint");
        let dump = cluster.node(me).dump().expect("wg dump");
        let dialled: Vec<String> = dump.peers.iter().map(|p| p.endpoint.clone()).collect();
        assert_eq!(dialled, vec![want.clone()], "{me} dials {other} over IPv6");
    }

    for (from, to, to_ip6, to_ip4) in [(v_pod, a_pod, a_ip6, a_ip4), (a_pod, v_pod, v_ip6, v_ip4)] {
        assert!(
            ping_within(from, to_ip6, Duration::from_secs(30)),
            "{mode}: pod never reached {to_ip6}:\n{}",
            cluster.logs()
        );
        assert!(
            ping_within(from, to_ip4, Duration::from_secs(30)),
            "{mode}: pod never reached {to_ip4}:\n{}",
            cluster.logs()
        );
        tcp_transfer(from, to, to_ip6, 20 << 20)
            .unwrap_or_else(|e| panic!("{mode}: TCP to {to_ip6}: {e:#}"));
        tcp_transfer(from, to, to_ip4, 20 << 20)
            .unwrap_or_else(|e| panic!("{mode}: TCP to {to_ip4}: {e:#}"));
    }
    let v = cluster.node(VSPHERE);
    let route =
        v.ns.ip(&["-6", "route", "get", &a_ip6.to_string()])
            .expect("route get");
    assert!(
        route.contains(&v.iface),
        "{mode}: IPv6 to the remote pod goes into the tunnel: {route}"
    );

    for node in &mut cluster.nodes {
        let mut agent = node.agent.take().expect("agent");
        assert!(agent
            .stop_with(libc::SIGTERM, Duration::from_secs(10))
            .is_some_and(|s| s.success()));
    }
    for (n, before) in cluster.nodes.iter().zip(&before) {
        let after = snapshot(&n.ns).expect("snapshot");
        assert!(
            &after == before,
            "{mode}: {} is not as it was before the agent:\n{}",
            n.name,
            diff_text(before, &after)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_mode_carries_dual_stack_pods_over_an_ipv6_underlay() {
    pods_talk_over_both_families("routed").await;
}

/// `vxlan`: IPv4 pods through flannel's `flannel.1` repointed at the mesh (its VXLAN source
/// rewritten to the mesh IP), IPv6 pods routed into the tunnel beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_mode_carries_dual_stack_pods_over_an_ipv6_underlay() {
    pods_talk_over_both_families("vxlan").await;
}
