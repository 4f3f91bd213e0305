//! What isthmus reads from a Node. Agent (to publish) and coordinator (to admit) must read it
//! the same way, or an honest peer would be refused.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// The label a node's location comes from (set by the cloud provider or an admin).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// flannel's annotation naming its backend on this node (`vxlan`, `host-gw`, …).
pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// flannel's annotation with its backend's data; for `vxlan`, `{"VNI":1,"VtepMAC":"…"}`.
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

/// flannel's VXLAN endpoint on a node, as flannel itself recorded it on the Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelVtep {
    /// `VtepMAC` of the backend data, lower case.
    pub mac: String,
    /// The network address of the Node's IPv4 pod CIDR: flannel's vxlan backend puts
    /// exactly that on `flannel.1` (as a /32).
    pub ip: Ipv4Addr,
}

/// The `topology.kubernetes.io/region` label, if any.
pub fn region(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(REGION_LABEL).cloned()
}

/// flannel's VTEP for this node, only from what flannel wrote (its `vxlan` backend
/// annotations) and the Node's pod CIDR; `None` when flannel did not run its vxlan backend
/// here or wrote something unreadable. Never from what an agent says.
pub fn flannel_vtep(node: &Node) -> Option<FlannelVtep> {
    #[derive(serde::Deserialize)]
    struct BackendData {
        #[serde(rename = "VtepMAC")]
        vtep_mac: String,
    }
    let annotations = node.metadata.annotations.as_ref()?;
    if annotations.get(FLANNEL_BACKEND_TYPE).map(String::as_str) != Some("vxlan") {
        return None;
    }
    let data: BackendData = serde_json::from_str(annotations.get(FLANNEL_BACKEND_DATA)?).ok()?;
    let mac = data.vtep_mac.to_ascii_lowercase();
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return None;
    }
    let ip = pod_cidrs(node).iter().find_map(|c| ipv4_network(c))?;
    Some(FlannelVtep { mac, ip })
}

/// The network address of an IPv4 prefix (`10.244.1.7/24` → `10.244.1.0`).
fn ipv4_network(cidr: &str) -> Option<Ipv4Addr> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = u32::MAX.checked_shl(32u32.checked_sub(len)?).unwrap_or(0);
    Some(Ipv4Addr::from(u32::from(addr) & mask))
}

/// The Node's pod CIDRs (`spec.podCIDRs`, else the older single `spec.podCIDR`).
pub fn pod_cidrs(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| {
            s.pod_cidrs
                .clone()
                .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
        })
        .unwrap_or_default()
}

/// Every address in `status.addresses`, with its type (`InternalIP`, `ExternalIP`, …).
pub fn addresses(node: &Node) -> Vec<(String, String)> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .map(|a| (a.type_.clone(), a.address.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_cidr_fields_and_addresses() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}
        }))
        .unwrap();
        assert_eq!(pod_cidrs(&n), vec!["10.244.1.0/24".to_string()]);
        assert_eq!(
            addresses(&n),
            vec![("InternalIP".into(), "10.0.0.5".into())]
        );
        let dual: Node = serde_json::from_value(serde_json::json!({
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]}
        }))
        .unwrap();
        assert_eq!(pod_cidrs(&dual).len(), 2);
        assert!(addresses(&dual).is_empty());
    }

    fn annotated(annotations: serde_json::Value, cidrs: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"annotations": annotations, "labels": {REGION_LABEL: "aws"}},
            "spec": {"podCIDRs": cidrs}
        }))
        .unwrap()
    }

    #[test]
    fn flannel_vtep_only_from_what_flannel_wrote() {
        let vxlan = |data: &str| serde_json::json!({FLANNEL_BACKEND_TYPE: "vxlan", FLANNEL_BACKEND_DATA: data});
        let good = r#"{"VNI":1,"VtepMAC":"0A:58:0a:f4:0b:00"}"#;
        let want = Some(FlannelVtep {
            mac: "0a:58:0a:f4:0b:00".into(),
            ip: Ipv4Addr::new(10, 244, 11, 0),
        });
        let cases = [
            (
                "as flannel writes it",
                vxlan(good),
                serde_json::json!(["10.244.11.0/24"]),
                want.clone(),
            ),
            (
                "dual stack: the IPv4 prefix",
                vxlan(good),
                serde_json::json!(["fd00::/64", "10.244.11.0/24"]),
                want,
            ),
            (
                "host bits are not the VTEP",
                vxlan(good),
                serde_json::json!(["10.244.11.9/24"]),
                Some(FlannelVtep {
                    mac: "0a:58:0a:f4:0b:00".into(),
                    ip: Ipv4Addr::new(10, 244, 11, 0),
                }),
            ),
            ("no pod CIDR", vxlan(good), serde_json::json!([]), None),
            (
                "host-gw",
                serde_json::json!({FLANNEL_BACKEND_TYPE: "host-gw", FLANNEL_BACKEND_DATA: good}),
                serde_json::json!(["10.244.11.0/24"]),
                None,
            ),
            (
                "no backend data",
                serde_json::json!({FLANNEL_BACKEND_TYPE: "vxlan"}),
                serde_json::json!(["10.244.11.0/24"]),
                None,
            ),
            (
                "not JSON",
                vxlan("0a:58:0a:f4:0b:00"),
                serde_json::json!(["10.244.11.0/24"]),
                None,
            ),
            (
                "not a MAC",
                vxlan(r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:0b"}"#),
                serde_json::json!(["10.244.11.0/24"]),
                None,
            ),
            (
                "no annotations",
                serde_json::json!({}),
                serde_json::json!(["10.244.11.0/24"]),
                None,
            ),
        ];
        for (what, annotations, cidrs, want) in cases {
            assert_eq!(flannel_vtep(&annotated(annotations, cidrs)), want, "{what}");
        }
        assert_eq!(
            region(&annotated(serde_json::json!({}), serde_json::json!([]))).as_deref(),
            Some("aws")
        );
        assert_eq!(region(&Node::default()), None);
    }
}
