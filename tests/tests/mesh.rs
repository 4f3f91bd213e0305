//! The control plane end to end: a real API server, the coordinator, agents on four nodes in
//! two clouds whose node IPs overlap and which reach each other only through NAT.

use std::net::IpAddr;
use std::time::Duration;

use isthmus_api::{WireGuardPeer, WireGuardPeerSpec};
use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::eventually;
use isthmus_tests::traffic::{ping_stats, ping_within};
use isthmus_tests::wg::KeyPair;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;

const CONVERGE: Duration = Duration::from_secs(60);

async fn admitted_reason(cluster: &Cluster, name: &str) -> Option<(String, String)> {
    let peers = cluster.peers().await.ok()?;
    let p = peers.iter().find(|p| p.name_any() == name)?;
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Admitted")?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn mesh_forms_admits_joins_and_collects() {
    let mut cluster = Cluster::new().await.expect("cluster");
    for (cloud, slot) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
        cluster.add_node(cloud, slot).await.expect("node");
    }
    cluster.start_coordinator("c1").unwrap();
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "mesh did not form\n{}",
        cluster.logs()
    );

    let ips = cluster.mesh_ips().await.unwrap();
    assert_eq!(ips.len(), 4, "{ips:?}");
    let distinct: std::collections::BTreeSet<_> = ips.values().collect();
    assert_eq!(distinct.len(), 4, "mesh IPs must be unique: {ips:?}");
    // Across clouds over the mesh, although both clouds number their nodes 10.0.0.11/.12.
    for (from, to) in [
        ("vsphere-1", "aws-1"),
        ("vsphere-1", "aws-2"),
        ("aws-2", "vsphere-1"),
    ] {
        let dst: IpAddr = ips[to].parse().unwrap();
        assert!(
            ping_within(&cluster.node(from).ns, dst, Duration::from_secs(10)),
            "{from} cannot reach {to} at {dst}\n{}",
            cluster.logs()
        );
    }
    // Same location: no tunnel (traffic stays on the LAN).
    assert_eq!(cluster.node("vsphere-1").dump().unwrap().peers.len(), 2);

    // A node joins: everyone in the other cloud configures it, and the sessions already
    // up are left alone (no new handshake for an unrelated change).
    let sessions_before = cluster.node("vsphere-1").dump().unwrap();
    cluster.add_node(1, 3).await.expect("joining node");
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "join did not converge\n{}",
        cluster.logs()
    );
    let joined_key = cluster.node("aws-3").dump().unwrap().public_key;
    let sessions_after = cluster.node("vsphere-1").dump().unwrap();
    assert!(sessions_after.peer(&joined_key).is_some());
    for before in &sessions_before.peers {
        let after = sessions_after
            .peer(&before.public_key)
            .expect("existing peer kept");
        assert_eq!(
            after.latest_handshake, before.latest_handshake,
            "a join reset an unrelated session"
        );
    }

    // Forged peers: no Node, or a nodeIP its Node does not have. Never admitted, never configured.
    let admin = cluster.rig.admin().await.unwrap();
    let peers: Api<WireGuardPeer> = Api::all(admin.clone());
    let nodes: Api<Node> = Api::all(admin.clone());
    let forged_key = KeyPair::generate().unwrap().public;
    let spec = |ip: &str| WireGuardPeerSpec {
        public_key: forged_key.clone(),
        endpoint: "203.0.113.2:51899".into(),
        location: "aws".into(),
        node_ip: ip.into(),
        pod_cidrs: vec![],
        vtep: None,
        vtep6: None,
        persistent_keepalive: None,
        mtu: None,
        key_proof: None,
    };
    peers
        .create(
            &PostParams::default(),
            &WireGuardPeer::new("ghost", spec("10.0.0.50")),
        )
        .await
        .unwrap();
    let impostor: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "impostor"}})).unwrap();
    nodes
        .create(&PostParams::default(), &impostor)
        .await
        .unwrap();
    peers
        .create(
            &PostParams::default(),
            &WireGuardPeer::new("impostor", spec("10.0.0.51")),
        )
        .await
        .unwrap();
    for (name, reason) in [("ghost", "NodeNotFound"), ("impostor", "NodeIPMismatch")] {
        let ok = eventually(Duration::from_secs(20), || async {
            admitted_reason(&cluster, name).await == Some(("False".into(), reason.into()))
        })
        .await;
        assert!(
            ok,
            "{name} not refused with {reason}: {:?}\n{}",
            admitted_reason(&cluster, name).await,
            cluster.logs()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &cluster.nodes {
        assert!(
            node.dump().unwrap().peer(&forged_key).is_none(),
            "{} configured a forged peer",
            node.name
        );
    }

    // A Node is deleted: its peer is collected and disappears from every agent.
    nodes
        .delete("aws-3", &DeleteParams::default())
        .await
        .unwrap();
    let gone = eventually(Duration::from_secs(30), || async {
        ["vsphere-1", "vsphere-2"].iter().all(|n| {
            cluster
                .node(n)
                .dump()
                .is_ok_and(|d| d.peer(&joined_key).is_none())
        })
    })
    .await;
    assert!(
        gone,
        "peer of a deleted Node still configured\n{}",
        cluster.logs()
    );
    assert!(!cluster
        .peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.name_any() == "aws-3"));

    // Every real Node vanishes at once (what a wiped or truncated Node list looks like):
    // the coordinator refuses to collect most of the mesh in one pass, and says so. "At
    // once" as a coordinator sees it: deleted while none runs, so its first pass finds them
    // all gone (deleted one by one under a running coordinator, a pass between two
    // deletions sees one missing Node, within the guard, and rightly collects it).
    let aws_1_key = cluster.node("aws-1").dump().unwrap().public_key;
    cluster.coordinators[0].stop_with(libc::SIGTERM, Duration::from_secs(10));
    for name in ["vsphere-1", "vsphere-2", "aws-1", "aws-2"] {
        nodes.delete(name, &DeleteParams::default()).await.unwrap();
    }
    cluster.start_coordinator("c2").unwrap();
    let refused = eventually(Duration::from_secs(60), || async {
        cluster
            .logs()
            .contains("refusing to delete 4 of 6 WireGuardPeers")
    })
    .await;
    assert!(refused, "no refusal logged\n{}", cluster.logs());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left: Vec<String> = cluster
        .peers()
        .await
        .unwrap()
        .iter()
        .map(|p| p.name_any())
        .collect();
    for name in ["vsphere-1", "vsphere-2", "aws-1", "aws-2"] {
        assert!(left.iter().any(|l| l == name), "{name} collected: {left:?}");
    }
    assert!(
        cluster
            .node("vsphere-1")
            .dump()
            .is_ok_and(|d| d.peer(&aws_1_key).is_some()),
        "the data plane lost a peer to the mass deletion"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_and_api_outage_never_interrupt_the_data_plane() {
    let mut cluster = Cluster::new().await.expect("cluster");
    cluster.add_node(0, 1).await.unwrap();
    cluster.add_node(1, 1).await.unwrap();
    cluster.start_coordinator("c1").unwrap();
    cluster.start_coordinator("c2").unwrap();
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "mesh did not form\n{}",
        cluster.logs()
    );
    let ips_before = cluster.mesh_ips().await.unwrap();
    let dst: IpAddr = ips_before["aws-1"].parse().unwrap();

    // Kill the leader without letting it release the lease, while traffic flows.
    let holder = cluster
        .rig
        .kubectl(&[
            "get",
            "lease",
            "isthmus-coordinator",
            "-n",
            "isthmus-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap();
    let leader = if holder.trim() == "c1" { 0 } else { 1 };
    let ns = cluster.node("vsphere-1").ns.name.clone();
    let pinger = std::thread::spawn(move || ping_stats(&ns, dst, 60, "0.1"));
    cluster.coordinators[leader].stop_with(libc::SIGKILL, Duration::from_secs(2));
    // The standby takes over and admits a node that joins now.
    cluster.add_node(1, 2).await.unwrap();
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "no takeover\n{}",
        cluster.logs()
    );
    let (sent, received) = pinger.join().unwrap();
    assert_eq!((sent, received), (60, 60), "packets lost during failover");
    let ips_after = cluster.mesh_ips().await.unwrap();
    for (name, ip) in &ips_before {
        assert_eq!(
            ips_after.get(name),
            Some(ip),
            "mesh IP of {name} changed across failover"
        );
    }

    // The API server goes away: traffic keeps flowing; when it returns, agents converge again.
    cluster.rig.stop_apiserver();
    let (sent, received) = ping_stats(&cluster.node("vsphere-1").ns.name, dst, 30, "0.1");
    assert_eq!(
        (sent, received),
        (30, 30),
        "packets lost while the API server was down"
    );
    cluster.rig.start_apiserver().await.unwrap();
    cluster.add_node(0, 2).await.unwrap();
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "no convergence after the outage\n{}",
        cluster.logs()
    );
}
