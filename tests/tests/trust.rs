//! Issue 15, "trust nothing a node says about others", against the real API server: a node
//! whose agent token is its own (the admission policy lets it write its own peer, nothing
//! else) publishes facts that would steer the other nodes' traffic. The coordinator checks
//! them against what flannel and the admins wrote on its Node and refuses the lie, so no
//! other agent acts on it.
//!
//! Each lie is refused with its reason in `Admitted`: a forged VTEP, a forged location, an
//! endpoint inside a pod CIDR.
//!
//! Three nodes with the flannel overlay (`tests/src/overlay.rs`, which annotates each Node
//! as flannel does): `vsphere-1` the observer, `aws-1` the victim, `aws-2` the attacker.

use std::time::Duration;

use isthmus_api::{WireGuardPeer, WireGuardPeerSpec, AGENT_MANAGER};
use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::eventually;
use isthmus_tests::fdb::fdb_entries;
use isthmus_tests::overlay::Overlay;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};

const VSPHERE_1: &str = "vsphere-1";
const AWS_1: &str = "aws-1";
const AWS_2: &str = "aws-2";
const SETTLE: Duration = Duration::from_secs(60);

async fn peer(cluster: &Cluster, name: &str) -> Option<WireGuardPeer> {
    cluster
        .peers()
        .await
        .ok()?
        .into_iter()
        .find(|p| p.name_any() == name)
}

/// (status, reason) of the Admitted condition for the peer's current generation.
async fn admitted(cluster: &Cluster, name: &str) -> Option<(String, String)> {
    let p = peer(cluster, name).await?;
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Admitted")?;
    (c.observed_generation == p.metadata.generation).then(|| (c.status.clone(), c.reason.clone()))
}

/// Waits until the attacker's peer is refused with `reason`, then checks for a moment that
/// node `observer` has not configured it (`what` names the lie in the failure).
async fn refused_and_not_configured(
    cluster: &Cluster,
    reason: &str,
    observer: &str,
    attacker_key: &str,
    what: &str,
) {
    let want = Some(("False".to_string(), reason.to_string()));
    let ok = eventually(Duration::from_secs(20), || async {
        admitted(cluster, AWS_2).await == want
    })
    .await;
    assert!(
        ok,
        "{what}: {:?}\n{}",
        admitted(cluster, AWS_2).await,
        cluster.logs()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        cluster
            .node(observer)
            .dump()
            .expect("dump")
            .peer(attacker_key)
            .is_none(),
        "{what}: {observer} configured the refused peer"
    );
}

/// The FDB lines of `flannel.1` on node `name` for `mac`.
fn fdb_for(cluster: &Cluster, name: &str, mac: &str) -> Vec<String> {
    fdb_entries(&cluster.node(name).ns)
        .expect("FDB")
        .into_iter()
        .filter(|l| l.starts_with(mac) && l.contains("flannel.1"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_vtep_and_location_are_refused_and_steer_nothing() {
    let mut cluster = Cluster::new().await.expect("cluster");
    for (cloud, slot) in [(0, 1), (1, 1), (1, 2)] {
        cluster.add_node_idle(cloud, slot).await.expect("node");
    }
    let overlay = Overlay::build(&cluster).expect("overlay");
    cluster.start_coordinator("c1").expect("coordinator");
    for i in 0..cluster.nodes.len() {
        cluster.start_node_agent(i, &[]).expect("agent");
    }
    let victim_mac = overlay.named(AWS_1).expect("aws-1").vtep_mac_str();

    // Honest start: every peer admitted with the VTEP flannel wrote on its Node, and the
    // observer's FDB sends the victim's MAC to the victim's mesh IP.
    let ok = eventually(SETTLE, || async {
        let Ok(ips) = cluster.mesh_ips().await else {
            return false;
        };
        ips.len() == 3
            && fdb_for(&cluster, VSPHERE_1, &victim_mac)
                .iter()
                .any(|l| l.contains(&format!("dst {} ", ips[AWS_1])))
    })
    .await;
    assert!(ok, "the honest mesh did not form\n{}", cluster.logs());
    let ips = cluster.mesh_ips().await.expect("mesh IPs");
    let attacker_ip = ips[AWS_2].clone();
    let attacker_key = cluster.node(AWS_2).dump().expect("dump").public_key;
    let honest: WireGuardPeerSpec = peer(&cluster, AWS_2).await.expect("aws-2").spec;
    assert!(honest.vtep.is_some(), "the agent publishes flannel's VTEP");

    // The attacker's agent stops; the node then writes its own peer with its agent's
    // credentials (the pod-bound token of its kubeconfig).
    let kubeconfig = Kubeconfig::read_from(&cluster.node(AWS_2).kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    let api: Api<WireGuardPeer> = Api::all(Client::try_from(config).expect("client"));
    drop(cluster.node_mut(AWS_2).agent.take());
    let publish = |spec: WireGuardPeerSpec| {
        let api = api.clone();
        async move {
            let body = serde_json::json!({
                "apiVersion": "isthmus.dev/v1alpha1",
                "kind": "WireGuardPeer",
                "metadata": {"name": "aws-2"},
                "spec": spec,
            });
            api.patch(
                "aws-2",
                &PatchParams::apply(AGENT_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .expect("the node may write its own peer");
        }
    };

    // 1. The victim's VTEP MAC: refused, and no FDB entry for it points at the attacker.
    let mut forged = honest.clone();
    if let Some(v) = forged.vtep.as_mut() {
        v.mac = victim_mac.clone();
    }
    publish(forged).await;
    let want = Some(("False".to_string(), "VtepMismatch".to_string()));
    let ok = eventually(Duration::from_secs(20), || async {
        admitted(&cluster, AWS_2).await == want
    })
    .await;
    assert!(
        ok,
        "forged vtep: {:?}\n{}",
        admitted(&cluster, AWS_2).await,
        cluster.logs()
    );
    for _ in 0..15 {
        for name in [VSPHERE_1, AWS_1] {
            let lines = fdb_for(&cluster, name, &victim_mac);
            assert!(
                !lines
                    .iter()
                    .any(|l| l.contains(&format!("dst {attacker_ip} "))),
                "{name} points the victim's MAC at the attacker: {lines:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(fdb_for(&cluster, VSPHERE_1, &victim_mac)
        .iter()
        .any(|l| l.contains(&format!("dst {} ", ips[AWS_1]))));
    assert_eq!(
        admitted(&cluster, AWS_1).await,
        Some(("True".into(), "NodeVerified".into())),
        "the victim stays admitted"
    );
    assert!(
        cluster
            .node(VSPHERE_1)
            .dump()
            .expect("dump")
            .peer(&attacker_key)
            .is_none(),
        "the observer dropped the refused peer"
    );

    // 2. A location its Node's region label does not say: refused, and aws-1 (really in the
    // same location) does not open a tunnel to it.
    let mut forged = honest.clone();
    forged.location = "vsphere".into();
    publish(forged).await;
    refused_and_not_configured(
        &cluster,
        "LocationMismatch",
        AWS_1,
        &attacker_key,
        "forged location",
    )
    .await;

    // 3. An endpoint inside the victim's pod CIDR (the tunnel carries those addresses, so the
    // observer's datagrams to it would loop into its own tunnel): refused, not configured.
    let victim_cidr = peer(&cluster, AWS_1)
        .await
        .expect("victim")
        .spec
        .pod_cidrs
        .first()
        .cloned()
        .expect("victim's pod CIDR");
    let (network, _) = victim_cidr.split_once('/').expect("a CIDR");
    let inside: std::net::Ipv4Addr = network.parse().expect("IPv4 pod CIDR");
    let mut forged = honest.clone();
    forged.endpoint = format!("{}:51820", std::net::Ipv4Addr::from(u32::from(inside) + 7));
    publish(forged).await;
    refused_and_not_configured(
        &cluster,
        "EndpointInsideMesh",
        VSPHERE_1,
        &attacker_key,
        "endpoint inside a pod CIDR",
    )
    .await;

    // 4. The victim's public key, with the victim's own proof copied (made for aws-1, not
    // for this node) and then with none: refused both times, and the victim keeps its key,
    // its admission and its tunnels.
    let victim: WireGuardPeerSpec = peer(&cluster, AWS_1).await.expect("victim").spec;
    assert!(
        victim.key_proof.is_some(),
        "the victim's agent proved its key"
    );
    let victim_endpoint = |observer: &str| {
        cluster
            .node(observer)
            .dump()
            .expect("dump")
            .peer(&victim.public_key)
            .map(|p| p.endpoint.clone())
    };
    let before = victim_endpoint(VSPHERE_1);
    assert!(before.is_some(), "the observer has a tunnel to the victim");
    for (proof, reason) in [
        (victim.key_proof.clone(), "KeyNotProven"),
        (None, "KeyNotProven"),
    ] {
        let mut forged = honest.clone();
        forged.public_key = victim.public_key.clone();
        forged.key_proof = proof;
        publish(forged).await;
        let want = Some(("False".to_string(), reason.to_string()));
        let ok = eventually(Duration::from_secs(20), || async {
            admitted(&cluster, AWS_2).await == want
        })
        .await;
        assert!(
            ok,
            "copied key, refused as {reason}: {:?}\n{}",
            admitted(&cluster, AWS_2).await,
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            admitted(&cluster, AWS_1).await,
            Some(("True".into(), "NodeVerified".into())),
            "the victim stays admitted"
        );
        assert_eq!(
            victim_endpoint(VSPHERE_1),
            before,
            "the victim's tunnel moved"
        );
    }

    // 5. The truth again: admitted again, with the mesh IP it had.
    publish(honest).await;
    let want = Some(("True".to_string(), "NodeVerified".to_string()));
    let ok = eventually(Duration::from_secs(20), || async {
        admitted(&cluster, AWS_2).await == want
    })
    .await;
    assert!(ok, "honest again: {:?}", admitted(&cluster, AWS_2).await);
    assert_eq!(
        cluster.mesh_ips().await.expect("mesh IPs").get(AWS_2),
        Some(&attacker_ip)
    );
}
