//! This node's WireGuardPeer spec: what the agent tells the others about itself, derived
//! from its Node object and flags, written with server-side apply as `isthmus-agent`.

use anyhow::{bail, Context};
use isthmus_api::{WireGuardPeer, WireGuardPeerSpec, AGENT_MANAGER};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};

use isthmus_wg::key::Key;

/// The label a node's location comes from unless `--location` overrides it. The coordinator
/// refuses a location other than this label's, so `--location` is for unlabelled nodes.
pub use isthmus_api::node::REGION_LABEL;

/// A Node annotation naming the `host:port` other nodes dial when the node sits behind NAT
/// (a cloud's 1:1 or port-mapped public address), set by whoever provisions the node. The
/// `--endpoint` flag overrides it; without either, the Node's ExternalIP and then its
/// InternalIP are used with the listen port.
pub const ENDPOINT_ANNOTATION: &str = "isthmus.dev/endpoint";

#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// `host:port` the other nodes dial (default: the node IP and the listen port).
    pub endpoint: Option<String>,
    pub location: Option<String>,
    pub node_ip: Option<String>,
    pub listen_port: u16,
    pub keepalive: u16,
    /// flannel's VTEP on this node, as the agent found it (routing mode `vxlan`).
    pub vtep: Option<isthmus_api::Vtep>,
    /// flannel's IPv6 VTEP (`flannel-v6.1`) on a dual-stack node, likewise.
    pub vtep6: Option<isthmus_api::Vtep>,
    /// This node's tunnel MTU.
    pub mtu: Option<u16>,
}

fn first_address(node: &Node, kind: &str) -> Option<String> {
    isthmus_api::node::addresses(node)
        .into_iter()
        .find(|(t, _)| t == kind)
        .map(|(_, a)| a)
}

/// The spec for this node. Pure: everything comes from the Node and the options.
pub fn own_spec(
    node: &Node,
    public_key: &Key,
    key_proof: Option<String>,
    opts: &PublishOptions,
) -> anyhow::Result<WireGuardPeerSpec> {
    let node_ip = opts
        .node_ip
        .clone()
        .or_else(|| first_address(node, "InternalIP"))
        .or_else(|| first_address(node, "ExternalIP"))
        .context("the Node lists no InternalIP or ExternalIP; pass --node-ip")?;
    let location = match &opts.location {
        Some(l) => l.clone(),
        None => isthmus_api::node::region(node)
            .with_context(|| format!("the Node has no {REGION_LABEL} label; pass --location"))?,
    };
    if location.is_empty() {
        bail!("location is empty");
    }
    let annotated = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ENDPOINT_ANNOTATION));
    if let Some(a) = annotated {
        a.parse::<std::net::SocketAddr>().with_context(|| {
            format!("the Node's {ENDPOINT_ANNOTATION} annotation {a:?} is not an IP:port")
        })?;
    }
    let with_port = |ip: &str| match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{}", opts.listen_port),
        _ => format!("{ip}:{}", opts.listen_port),
    };
    let endpoint = opts
        .endpoint
        .clone()
        .or_else(|| annotated.cloned())
        .or_else(|| first_address(node, "ExternalIP").map(|ip| with_port(&ip)))
        .unwrap_or_else(|| with_port(&node_ip));
    let pod_cidrs = isthmus_api::node::pod_cidrs(node);
    Ok(WireGuardPeerSpec {
        public_key: public_key.to_base64(),
        endpoint,
        location,
        node_ip,
        pod_cidrs,
        vtep: opts.vtep.clone(),
        vtep6: opts.vtep6.clone(),
        persistent_keepalive: Some(i32::from(opts.keepalive)),
        mtu: opts.mtu.map(i32::from),
        key_proof,
    })
}

/// Writes the spec; the agent owns exactly these fields.
pub async fn publish(
    api: &Api<WireGuardPeer>,
    name: &str,
    spec: &WireGuardPeerSpec,
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": name},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply(AGENT_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .with_context(|| format!("publishing WireGuardPeer {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn spec_from_node_and_overrides() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "labels": {REGION_LABEL: "eu-west-1"}},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.5"}]}
        }));
        let key = Key([1; 32]);
        let opts = PublishOptions {
            listen_port: 51820,
            keepalive: 25,
            ..Default::default()
        };
        let s = own_spec(&n, &key, None, &opts).unwrap();
        assert_eq!(
            (s.node_ip.as_str(), s.location.as_str(), s.endpoint.as_str()),
            ("10.0.0.5", "eu-west-1", "10.0.0.5:51820")
        );
        assert_eq!(s.pod_cidrs, vec!["10.244.1.0/24".to_string()]);
        assert_eq!(s.public_key, key.to_base64());
        assert_eq!((s.vtep, s.mtu), (None, None));

        let opts = PublishOptions {
            endpoint: Some("203.0.113.1:40000".into()),
            location: Some("vsphere".into()),
            vtep: Some(isthmus_api::Vtep {
                mac: "0a:58:0a:f4:01:00".into(),
                ip: "10.244.1.0".into(),
            }),
            mtu: Some(1420),
            ..opts
        };
        let s = own_spec(&n, &key, None, &opts).unwrap();
        assert_eq!(
            (s.location.as_str(), s.endpoint.as_str()),
            ("vsphere", "203.0.113.1:40000")
        );
        assert_eq!(s.vtep, opts.vtep);
        assert_eq!(s.mtu, Some(1420));
    }

    #[test]
    fn endpoint_from_flag_then_annotation_then_external_then_internal_ip() {
        let base = serde_json::json!({
            "metadata": {"name": "n1", "labels": {REGION_LABEL: "aws"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}
        });
        let opts = PublishOptions {
            listen_port: 51820,
            ..Default::default()
        };
        let key = Key([1; 32]);
        let endpoint = |n: &serde_json::Value, o: &PublishOptions| {
            own_spec(&node(n.clone()), &key, None, o).map(|s| s.endpoint)
        };
        let mut external = base.clone();
        external["status"]["addresses"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "ExternalIP", "address": "2001:db8::7"}));
        let mut annotated = external.clone();
        annotated["metadata"]["annotations"] =
            serde_json::json!({ENDPOINT_ANNOTATION: "203.0.113.2:51802"});
        let flag = PublishOptions {
            endpoint: Some("198.51.100.9:4000".into()),
            ..opts.clone()
        };
        let cases = [
            (&base, &opts, "10.0.0.5:51820"),
            (&external, &opts, "[2001:db8::7]:51820"),
            (&annotated, &opts, "203.0.113.2:51802"),
            (&annotated, &flag, "198.51.100.9:4000"),
        ];
        for (n, o, want) in cases {
            assert_eq!(endpoint(n, o).unwrap(), want, "{n}");
        }
        let mut bad = base.clone();
        bad["metadata"]["annotations"] = serde_json::json!({ENDPOINT_ANNOTATION: "nat-gw:51802"});
        let err = endpoint(&bad, &opts).unwrap_err();
        assert!(format!("{err:#}").contains(ENDPOINT_ANNOTATION), "{err:#}");
    }

    #[test]
    fn missing_location_or_address_is_a_clear_error() {
        let bare = node(serde_json::json!({"metadata": {"name": "n1"}}));
        let err = own_spec(&bare, &Key([1; 32]), None, &PublishOptions::default()).unwrap_err();
        assert!(format!("{err:#}").contains("--node-ip"));
        let no_label = node(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}
        }));
        let err = own_spec(&no_label, &Key([1; 32]), None, &PublishOptions::default()).unwrap_err();
        assert!(format!("{err:#}").contains("--location"));
    }
}
