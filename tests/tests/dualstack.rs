//! IPv6 and dual stack end to end, on real kernel devices with a real API server: two
//! dual-stack nodes in two clouds (`tests/src/cluster.rs` with `ipv6: true`) whose clouds
//! reach each other only over IPv6 (routed 2001:db8:<n>::/64 prefixes, no IPv4 NAT between
//! them). Each Node lists only its IPv6 address as InternalIP, so its agent advertises
//! `[2001:db8:…]:51820`; its pod CIDRs are an IPv4 /24 and an IPv6 /64, and its pod has an
//! address in each, behind flannel's IPv4 `flannel.1` and `cni0`.
//!
//! What an operator checks: the tunnels run over the IPv6 underlay; pods reach the other
//! cloud over IPv6 and IPv4 (ping and TCP) in both routing modes, and not before the agents
//! run; after the agents stop every node is as it was. Each node also runs flannel's IPv6
//! VXLAN device (`flannel-v6.1`), whose VXLAN the clouds' firewalls stop: without a
//! dual-stack mesh IPv6 pods are routed into the tunnel beside it; with one
//! (`--mesh-cidr-v6`) the agents point it at each other's IPv6 mesh IPs and it crosses the
//! mesh, its source rewritten to the sender's IPv6 mesh IP.

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::netns::Netns;
use isthmus_tests::overlay::{self, Overlay};
use isthmus_tests::traffic::{ping, ping_within, tcp_transfer};

const VSPHERE: &str = "vsphere-1";
const AWS: &str = "aws-1";

async fn two_dual_stack_nodes() -> (Cluster, Overlay) {
    two_dual_stack_nodes_with(&[]).await
}

/// [`two_dual_stack_nodes`], the coordinator started with `coordinator_args`.
async fn two_dual_stack_nodes_with(coordinator_args: &[&str]) -> (Cluster, Overlay) {
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
    cluster
        .start_coordinator_with("c1", coordinator_args)
        .expect("coordinator");
    (cluster, overlay)
}

/// The pod on `name`: its namespace, IPv4 and IPv6 addresses.
fn pod<'a>(overlay: &'a Overlay, name: &str) -> (&'a Netns, IpAddr, IpAddr) {
    let n = overlay.named(name).expect("overlay node");
    let v6 = n.pod_ip6.expect("a dual-stack pod");
    (&n.pod, IpAddr::V4(n.pod_ip), IpAddr::V6(v6))
}

/// Starts every node's agent in routing `mode` and waits for the mesh to converge.
async fn start_agents(cluster: &mut Cluster, mode: &str) {
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
}

/// Stops every agent with SIGTERM and asserts each node is as `before` (its snapshot
/// before the agents), with the agents' logs when it is not.
fn stop_agents_and_compare(cluster: &mut Cluster, before: &[String], what: &str) {
    let mut logs = String::new();
    for node in &mut cluster.nodes {
        let mut agent = node.agent.take().expect("agent");
        assert!(agent
            .stop_with(libc::SIGTERM, Duration::from_secs(10))
            .is_some_and(|s| s.success()));
        logs.push_str(&format!("--- agent {} ---\n{}\n", node.name, agent.log()));
    }
    cluster.assert_restored(before, what, &logs);
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
    let before = cluster.snapshots();
    start_agents(&mut cluster, mode).await;

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

    stop_agents_and_compare(&mut cluster, &before, mode);
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

/// The pool of the dual-stack mesh test.
const MESH6: &str = "fd96::/120";

/// The packets `ip6tables` counted for the INPUT rule matching source `src`.
fn counted_from(ns: &Netns, src: Ipv6Addr) -> u64 {
    let listing = ns
        .exec("ip6tables", &["-w", "-L", "INPUT", "-v", "-n", "-x"])
        .expect("ip6tables -L");
    let want = [src.to_string(), format!("{src}/128")];
    listing
        .lines()
        .find(|l| l.split_whitespace().any(|t| want.iter().any(|w| w == t)))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rule for {src} in:\n{listing}"))
}

/// A dual-stack mesh (`--mesh-cidr-v6`) in `vxlan` mode over flannel's dual-stack overlay
/// (`flannel.1` and `flannel-v6.1`, as the rig builds them): each agent publishes both of
/// its VTEPs, the coordinator admits them against flannel's annotations, and each agent
/// points `flannel-v6.1`'s FDB entry for the other node at that node's IPv6 mesh IP
/// (flannel's points at its IPv6 underlay address, where the clouds' firewalls stop VXLAN).
/// IPv6 pods then talk through `flannel-v6.1` and the tunnel. The other agent only accepts
/// the sender's mesh IP, so this works only because the engine rewrites the outer IPv6
/// source; the receiver counts the VXLAN datagrams by source in `ip6tables` to show it.
/// After the agents stop, flannel's entries are back as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_ipv6_vxlan_crosses_a_dual_stack_mesh_with_its_source_rewritten() {
    let (mut cluster, overlay) = two_dual_stack_nodes_with(&["--mesh-cidr-v6", MESH6]).await;
    let (v_pod, _, v_ip6) = pod(&overlay, VSPHERE);
    let (a_pod, _, a_ip6) = pod(&overlay, AWS);
    assert!(
        !ping(v_pod, a_ip6, 1),
        "flannel-v6.1 must not cross the clouds before the mesh"
    );
    let before = cluster.snapshots();
    start_agents(&mut cluster, "vxlan").await;

    // Each node's IPv6 mesh IP, from its status, and on its tunnel; its published IPv6 VTEP
    // is flannel's.
    let peers = cluster.peers().await.expect("peers");
    let in_pool =
        |ip: Ipv6Addr| ip.segments()[..7] == [0xfd96, 0, 0, 0, 0, 0, 0] && ip.segments()[7] < 0x100;
    let mesh6 = |name: &str| -> Ipv6Addr {
        let p = peers
            .iter()
            .find(|p| kube::ResourceExt::name_any(*p) == name)
            .expect("peer");
        let flannel = overlay.named(name).expect("overlay").vtep6.expect("vtep6");
        assert_eq!(
            p.spec.vtep6,
            Some(isthmus_api::Vtep {
                mac: overlay::mac_str(&flannel.mac),
                ip: flannel.ip.to_string(),
            }),
            "{name}'s published IPv6 VTEP"
        );
        let s = p.status.as_ref().expect("status");
        assert_eq!(s.mesh_cidr_v6.as_deref(), Some(MESH6), "{name}");
        s.mesh_ipv6
            .as_deref()
            .expect("meshIPv6")
            .parse()
            .expect("an IPv6 address")
    };
    let (v_mesh6, a_mesh6) = (mesh6(VSPHERE), mesh6(AWS));
    assert!(in_pool(v_mesh6) && in_pool(a_mesh6) && v_mesh6 != a_mesh6);
    for (name, ip) in [(VSPHERE, v_mesh6), (AWS, a_mesh6)] {
        let n = cluster.node(name);
        let addrs =
            n.ns.ip(&["-6", "addr", "show", "dev", &n.iface])
                .expect("addr");
        assert!(
            addrs.contains(&format!("{ip}/120")),
            "{name}'s tunnel: {addrs}"
        );
    }

    // flannel-v6.1's FDB entry for the other node points at its IPv6 mesh IP, and the route
    // to the other node's IPv6 pods leads through flannel-v6.1, not straight into the tunnel.
    for (name, other, other_mesh6, other_pod6) in [
        (VSPHERE, AWS, a_mesh6, a_ip6),
        (AWS, VSPHERE, v_mesh6, v_ip6),
    ] {
        let n = cluster.node(name);
        let mac = overlay::mac_str(&overlay.named(other).unwrap().vtep6.unwrap().mac);
        let want = format!("{mac} dev {} dst {other_mesh6} ", overlay::VXLAN6_DEV);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut fdb = Vec::new();
        while Instant::now() < deadline {
            fdb = isthmus_tests::fdb::fdb_entries(&n.ns).expect("fdb");
            if fdb.iter().any(|l| l.starts_with(&want)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            fdb.iter().any(|l| l.starts_with(&want)),
            "{name}: no {want:?} in\n{}\n{}",
            fdb.join("\n"),
            cluster.logs()
        );
        let route =
            n.ns.ip(&["-6", "route", "get", &other_pod6.to_string()])
                .expect("route get");
        assert!(route.contains(overlay::VXLAN6_DEV), "{name}: {route}");
    }

    // The receiver counts VXLAN from the other's mesh IP and from its underlay IP.
    let (v, a) = (cluster.node(VSPHERE), cluster.node(AWS));
    let (v_under, a_under) = (v.ipv6.unwrap().0, a.ipv6.unwrap().0);
    for (n, srcs) in [(v, [a_mesh6, a_under]), (a, [v_mesh6, v_under])] {
        for src in srcs {
            n.ns.exec(
                "ip6tables",
                &[
                    "-w",
                    "-A",
                    "INPUT",
                    "-i",
                    &n.iface,
                    "-p",
                    "udp",
                    "--dport",
                    "8472",
                    "-s",
                    &src.to_string(),
                ],
            )
            .expect("ip6tables -A");
        }
    }

    for (from, to, to_ip6) in [(v_pod, a_pod, a_ip6), (a_pod, v_pod, v_ip6)] {
        assert!(
            ping_within(from, to_ip6, Duration::from_secs(30)),
            "pod never reached {to_ip6} over flannel-v6.1:\n{}",
            cluster.logs()
        );
        tcp_transfer(from, to, to_ip6, 20 << 20)
            .unwrap_or_else(|e| panic!("TCP to {to_ip6}: {e:#}"));
    }
    for (n, mesh, under) in [(a, v_mesh6, v_under), (v, a_mesh6, a_under)] {
        let (from_mesh, from_underlay) = (counted_from(&n.ns, mesh), counted_from(&n.ns, under));
        eprintln!(
            "{}: VXLAN datagrams from {mesh} (mesh): {from_mesh}, from {under} (underlay): {from_underlay}",
            n.name
        );
        assert!(from_mesh >= 5, "{}: {from_mesh} from the mesh IP", n.name);
        assert_eq!(
            from_underlay, 0,
            "{}: VXLAN arrived with the underlay source",
            n.name
        );
    }

    stop_agents_and_compare(&mut cluster, &before, "dual-stack mesh");
}
