//! The WireGuardPeer API on a real kube-apiserver: validation of every field, and what an
//! agent's identity may write.

use isthmus_api::{WireGuardPeer, WireGuardPeerSpec};
use isthmus_tests::kube::KubeRig;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

const KEY: &str = "WQL+aNNIySrhb3blZyAOhC0i5K9VtYYVqSgp1AcVmhQ=";

fn spec() -> WireGuardPeerSpec {
    WireGuardPeerSpec {
        public_key: KEY.into(),
        endpoint: "203.0.113.1:51820".into(),
        location: "aws-eu-west-1".into(),
        node_ip: "10.0.0.5".into(),
        pod_cidrs: vec!["10.244.1.0/24".into()],
        vtep: None,
        vtep6: None,
        persistent_keepalive: Some(25),
        mtu: None,
        key_proof: None,
    }
}

async fn create(
    client: &Client,
    name: &str,
    spec: WireGuardPeerSpec,
) -> Result<WireGuardPeer, kube::Error> {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    api.create(&PostParams::default(), &WireGuardPeer::new(name, spec))
        .await
}

fn rejection(result: Result<WireGuardPeer, kube::Error>) -> (u16, String) {
    match result {
        Ok(p) => panic!("accepted: {:?}", p.spec),
        Err(kube::Error::Api(status)) => (status.code, status.message),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_accepts_valid_peers_and_rejects_each_malformed_field() {
    let rig = KubeRig::start().await.expect("rig");
    let admin = rig.admin().await.unwrap();

    let mut v6 = spec();
    v6.endpoint = "[2001:db8::1]:51820".into();
    v6.node_ip = "fd00::5".into();
    v6.pod_cidrs = vec!["10.244.2.0/24".into(), "fd00:244:2::/64".into()];
    v6.vtep = Some(isthmus_api::Vtep {
        mac: "0a:58:0a:f4:01:00".into(),
        ip: "10.244.2.0".into(),
    });
    create(&admin, "valid-v4", spec())
        .await
        .expect("valid v4 peer");
    create(&admin, "valid-v6", v6).await.expect("valid v6 peer");

    type Mutation = fn(&mut WireGuardPeerSpec);
    let cases: &[(&str, Mutation, &str)] = &[
        ("short-key", |s| s.public_key = "abc".into(), "publicKey"),
        (
            "bad-key",
            |s| s.public_key = format!("{}!", &KEY[..43]),
            "publicKey must be a WireGuard public key",
        ),
        (
            "no-port",
            |s| s.endpoint = "203.0.113.1".into(),
            "endpoint must be",
        ),
        (
            "port-zero",
            |s| s.endpoint = "203.0.113.1:0".into(),
            "endpoint must be",
        ),
        (
            "port-big",
            |s| s.endpoint = "203.0.113.1:70000".into(),
            "endpoint must be",
        ),
        (
            "hostname",
            |s| s.endpoint = "node.example:51820".into(),
            "endpoint must be",
        ),
        (
            "bad-ip",
            |s| s.endpoint = "300.1.1.1:51820".into(),
            "endpoint must be",
        ),
        (
            "v6-unbracketed",
            |s| s.endpoint = "2001:db8::1:51820".into(),
            "endpoint must be",
        ),
        (
            "location",
            |s| s.location = "AWS West".into(),
            "location must be",
        ),
        (
            "node-ip",
            |s| s.node_ip = "10.0.0".into(),
            "nodeIP must be an IP address",
        ),
        (
            "pod-cidr",
            |s| s.pod_cidrs = vec!["10.244.1.0/33".into()],
            "podCIDRs must be CIDR",
        ),
        (
            "pod-cidrs-3",
            |s| s.pod_cidrs = vec!["10.0.0.0/24".into(); 3],
            "podCIDRs",
        ),
        (
            "vtep-mac",
            |s| {
                s.vtep = Some(isthmus_api::Vtep {
                    mac: "zz".into(),
                    ip: "10.244.1.0".into(),
                })
            },
            "vtep.mac must be",
        ),
        (
            "vtep6-ipv4",
            |s| {
                s.vtep6 = Some(isthmus_api::Vtep {
                    mac: "0a:58:fd:00:00:0b".into(),
                    ip: "10.244.1.0".into(),
                })
            },
            "vtep6.ip must be an IPv6 address",
        ),
        (
            "keepalive",
            |s| s.persistent_keepalive = Some(70000),
            "persistentKeepalive",
        ),
    ];
    for (name, mutate, message) in cases {
        let mut s = spec();
        mutate(&mut s);
        let (code, text) = rejection(create(&admin, name, s).await);
        assert_eq!(code, 422, "{name}: {text}");
        assert!(
            text.contains(message),
            "{name}: expected {message:?} in {text:?}"
        );
    }
}

async fn node(admin: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let n: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    nodes
        .create(&PostParams::default(), &n)
        .await
        .expect("node");
}

fn apply_spec(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": name},
        "spec": serde_json::to_value(spec()).unwrap(),
    })
}

/// A rig with Nodes node-a and node-b, the admin's client, and each node's agent client
/// (a pod-bound token, as the kubelet mints it).
async fn two_nodes() -> (KubeRig, Client, Client, Client) {
    let rig = KubeRig::start().await.expect("rig");
    let admin = rig.admin().await.unwrap();
    let mut agents = Vec::new();
    for n in ["node-a", "node-b"] {
        node(&admin, n).await;
        let token = rig.agent_token(n).await.unwrap();
        agents.push(rig.client(&format!("agent-{n}"), &token).await.unwrap());
    }
    let agent_b = agents.pop().unwrap();
    let agent_a = agents.pop().unwrap();
    (rig, admin, agent_a, agent_b)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_writes_only_its_own_peer_and_never_coordinator_fields() {
    let (rig, _admin, agent_a, agent_b) = two_nodes().await;
    let ssa = PatchParams::apply(isthmus_api::AGENT_MANAGER).force();
    let a_peers: Api<WireGuardPeer> = Api::all(agent_a.clone());
    let b_peers: Api<WireGuardPeer> = Api::all(agent_b.clone());

    a_peers
        .patch("node-a", &ssa, &Patch::Apply(apply_spec("node-a")))
        .await
        .expect("own peer");
    b_peers
        .patch("node-b", &ssa, &Patch::Apply(apply_spec("node-b")))
        .await
        .expect("own peer");

    let forbidden = |r: Result<WireGuardPeer, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => {
            assert!(s.code == 403 || s.code == 422, "{what}: {s:?}");
            s.message
        }
        Ok(_) => panic!("{what}: allowed"),
        Err(e) => panic!("{what}: {e}"),
    };
    let msg = forbidden(
        a_peers
            .patch("node-b", &ssa, &Patch::Apply(apply_spec("node-b")))
            .await,
        "A writes B",
    );
    assert!(
        msg.contains("may not write the WireGuardPeer node-b"),
        "{msg}"
    );
    forbidden(
        a_peers
            .create(
                &PostParams::default(),
                &WireGuardPeer::new("node-c", spec()),
            )
            .await,
        "A creates a peer for another node",
    );
    match a_peers.delete("node-b", &DeleteParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("A deleted B's peer: {other:?}"),
    }

    // Status: the coordinator's fields are off limits, the agent's own are not.
    let status = |fields: serde_json::Value| json!({"apiVersion": "isthmus.dev/v1alpha1", "kind": "WireGuardPeer", "metadata": {"name": "node-a"}, "status": fields});
    let msg = forbidden(
        a_peers
            .patch_status(
                "node-a",
                &ssa,
                &Patch::Apply(status(json!({"meshIP": "100.96.0.66"}))),
            )
            .await,
        "A sets its own mesh IP",
    );
    assert!(msg.contains("belong to the coordinator"), "{msg}");
    for forged in [
        json!({"meshIPv6": "fd96::66"}),
        json!({"meshCIDRv6": "fd96::/64"}),
    ] {
        let msg = forbidden(
            a_peers
                .patch_status("node-a", &ssa, &Patch::Apply(status(forged.clone())))
                .await,
            &format!("A sets {forged}"),
        );
        assert!(msg.contains("meshIPv6, meshCIDRv6"), "{msg}");
    }
    forbidden(
        a_peers
            .patch_status(
                "node-a",
                &ssa,
                &Patch::Apply(status(json!({"conditions": [{
                "type": "Admitted", "status": "True", "reason": "Forged", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))),
            )
            .await,
        "A admits itself",
    );
    let msg = forbidden(
        a_peers
            .patch_status(
                "node-a",
                &ssa,
                &Patch::Apply(status(json!({"conditions": [{
                "type": "MeshConnected", "status": "True", "reason": "AllPairsUp", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))),
            )
            .await,
        "A declares itself connected",
    );
    assert!(msg.contains("an agent writes only status.health"), "{msg}");
    let msg = forbidden(
        a_peers
            .patch_status(
                "node-a",
                &ssa,
                &Patch::Apply(status(json!({"keyChallenge": {
                "coordinatorKey": KEY, "nonce": "bm9uY2U=",
                "issued": "2026-01-01T00:00:00Z"}}))),
            )
            .await,
        "A sets its own key challenge",
    );
    assert!(msg.contains("the key challenge belong"), "{msg}");
    a_peers
        .patch_status(
            "node-a",
            &ssa,
            &Patch::Apply(status(json!({"health": {
                "observedTime": "2026-01-01T00:00:00Z", "peersUp": 0, "peersExpected": 1,
                "downPeers": ["node-b"]}}))),
        )
        .await
        .expect("the agent reports its own health");

    // A finalizer would keep the peer of a removed node around: refused.
    let msg = forbidden(
        a_peers
            .patch(
                "node-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})),
            )
            .await,
        "A adds a finalizer",
    );
    assert!(msg.contains("may not add or remove finalizers"), "{msg}");

    // A token not bound to a pod on a node says nothing about the node: refused.
    let unbound = rig
        .kubectl(&["create", "token", "isthmus-agent", "-n", "isthmus-system"])
        .unwrap();
    let (ok, out) = rig.kubectl_as(
        unbound.trim(),
        &["annotate", "wireguardpeer", "node-a", "x=y"],
    );
    assert!(!ok && out.contains("pod-bound"), "{out}");
}

/// The heartbeat: an agent renews its own Lease, and no other. Renewing another node's
/// would keep a dead node `MeshConnected`; renewing the coordinator's would fight its
/// leader election.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_renews_only_its_own_heartbeat_lease() {
    use isthmus_api::heartbeat;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::jiff::Timestamp;

    let (_rig, admin, agent_a, agent_b) = two_nodes().await;
    let a: Api<Lease> = Api::namespaced(agent_a, "isthmus-system");
    let b: Api<Lease> = Api::namespaced(agent_b, "isthmus-system");
    let ssa = PatchParams::apply(isthmus_api::AGENT_MANAGER).force();
    let body = |node: &str| heartbeat::renewal(node, "isthmus-system", 60, None, Timestamp::now());

    for (api, n) in [(&a, "node-a"), (&b, "node-b")] {
        let lease = api
            .patch(
                &heartbeat::lease_name(n).unwrap(),
                &ssa,
                &Patch::Apply(body(n).unwrap()),
            )
            .await
            .expect("an agent renews its own Lease");
        assert_eq!(heartbeat::node_of(&lease).as_deref(), Some(n));
    }

    let refused = |r: Result<Lease, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{what}: {s:?}");
            s.message
        }
        Ok(_) => panic!("{what}: allowed"),
        Err(e) => panic!("{what}: {e}"),
    };
    let msg = refused(
        a.patch(
            "isthmus-agent-node-b",
            &ssa,
            &Patch::Apply(body("node-b").unwrap()),
        )
        .await,
        "A renews B's heartbeat",
    );
    assert!(
        msg.contains("may renew only the Lease isthmus-agent-node-a"),
        "{msg}"
    );
    let mut held_by_b = body("node-a").unwrap();
    held_by_b["spec"]["holderIdentity"] = json!("node-b");
    let msg = refused(
        a.patch("isthmus-agent-node-a", &ssa, &Patch::Apply(held_by_b))
            .await,
        "A's Lease held by B",
    );
    assert!(msg.contains("must be held by it"), "{msg}");
    let mut coordinator = body("node-a").unwrap();
    coordinator["metadata"]["name"] = json!("isthmus-coordinator");
    let msg = refused(
        a.patch("isthmus-coordinator", &ssa, &Patch::Apply(coordinator))
            .await,
        "A takes the coordinator's Lease",
    );
    assert!(msg.contains("may renew only"), "{msg}");
    let deleted = a
        .delete("isthmus-agent-node-b", &DeleteParams::default())
        .await;
    assert!(
        matches!(&deleted, Err(kube::Error::Api(s)) if s.code == 403),
        "A deletes B's heartbeat: {deleted:?}"
    );
    // B's Lease is still B's, renewed by B alone.
    let still = Api::<Lease>::namespaced(admin, "isthmus-system")
        .get("isthmus-agent-node-b")
        .await
        .unwrap();
    assert_eq!(heartbeat::node_of(&still).as_deref(), Some("node-b"));
}
