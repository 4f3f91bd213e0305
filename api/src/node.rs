//! What isthmus reads from a Node. Agent (to publish) and coordinator (to admit) must read it
//! the same way, or an honest peer would be refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Node;

/// The label a node's location comes from (set by the cloud provider or an admin).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// flannel's annotation naming its backend on this node (`vxlan`, `host-gw`, …).
pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
/// flannel's annotation with its backend's data; for `vxlan`, `{"VNI":1,"VtepMAC":"…"}`.
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

/// flannel's annotation with its IPv6 backend's data on a dual-stack node (`flannel-v6.1`),
/// of the same shape as [`FLANNEL_BACKEND_DATA`].
pub const FLANNEL_BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";

/// flannel's VXLAN endpoint on a node, as flannel itself recorded it on the Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlannelVtep {
    /// `VtepMAC` of the backend data, lower case.
    pub mac: String,
    /// The network address of the Node's pod CIDR of the VTEP's family: flannel's vxlan
    /// backend puts exactly that on `flannel.1` (as a /32) and `flannel-v6.1` (as a /128).
    pub ip: IpAddr,
}

/// The `topology.kubernetes.io/region` label, if any.
pub fn region(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(REGION_LABEL).cloned()
}

/// flannel's IPv4 VTEP (`flannel.1`) for this node, only from what flannel wrote (its
/// `vxlan` backend annotations) and the Node's pod CIDR; `None` when flannel did not run its
/// vxlan backend here or wrote something unreadable. Never from what an agent says.
pub fn flannel_vtep(node: &Node) -> Option<FlannelVtep> {
    vtep_of_family(node, FLANNEL_BACKEND_DATA, false)
}

/// flannel's IPv6 VTEP (`flannel-v6.1`) on a dual-stack node, read as [`flannel_vtep`]
/// reads the IPv4 one: from `backend-v6-data` and the Node's IPv6 pod CIDR.
pub fn flannel_vtep6(node: &Node) -> Option<FlannelVtep> {
    vtep_of_family(node, FLANNEL_BACKEND_V6_DATA, true)
}

fn vtep_of_family(node: &Node, data_annotation: &str, v6: bool) -> Option<FlannelVtep> {
    #[derive(serde::Deserialize)]
    struct BackendData {
        #[serde(rename = "VtepMAC")]
        vtep_mac: String,
    }
    let annotations = node.metadata.annotations.as_ref()?;
    if annotations.get(FLANNEL_BACKEND_TYPE).map(String::as_str) != Some("vxlan") {
        return None;
    }
    let data: BackendData = serde_json::from_str(annotations.get(data_annotation)?).ok()?;
    let mac = data.vtep_mac.to_ascii_lowercase();
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return None;
    }
    let ip = pod_cidrs(node)
        .iter()
        .filter_map(|c| network_address(c))
        .find(|ip| ip.is_ipv6() == v6)?;
    Some(FlannelVtep { mac, ip })
}

/// The network address of a prefix (`10.244.1.7/24` → `10.244.1.0`, `fd00:1::5/64` →
/// `fd00:1::`).
fn network_address(cidr: &str) -> Option<IpAddr> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    Some(match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32u32.checked_sub(len)?).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128u32.checked_sub(len)?).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    })
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
            ip: Ipv4Addr::new(10, 244, 11, 0).into(),
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
                    ip: Ipv4Addr::new(10, 244, 11, 0).into(),
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

    #[test]
    fn flannel_vtep6_from_the_v6_backend_data_and_the_ipv6_pod_cidr() {
        let v4 = r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:0b:00"}"#;
        let v6 = r#"{"VNI":1,"VtepMAC":"8E:1C:22:33:44:55"}"#;
        let dual = |data6: Option<&str>| {
            let mut a =
                serde_json::json!({FLANNEL_BACKEND_TYPE: "vxlan", FLANNEL_BACKEND_DATA: v4});
            if let Some(d) = data6 {
                a[FLANNEL_BACKEND_V6_DATA] = d.into();
            }
            a
        };
        let want6 = Some(FlannelVtep {
            mac: "8e:1c:22:33:44:55".into(),
            ip: "fd00:244:11::".parse().unwrap(),
        });
        // (what, annotations, pod CIDRs, IPv4 VTEP wanted, IPv6 VTEP wanted)
        let cases = [
            (
                "dual stack as flannel writes it",
                dual(Some(v6)),
                serde_json::json!(["10.244.11.0/24", "fd00:244:11::/64"]),
                true,
                want6.clone(),
            ),
            (
                "host bits are not the VTEP",
                dual(Some(v6)),
                serde_json::json!(["fd00:244:11::9/64", "10.244.11.0/24"]),
                true,
                want6,
            ),
            (
                "no IPv6 backend data: IPv4 only",
                dual(None),
                serde_json::json!(["10.244.11.0/24", "fd00:244:11::/64"]),
                true,
                None,
            ),
            (
                "IPv6 backend data but no IPv6 pod CIDR",
                dual(Some(v6)),
                serde_json::json!(["10.244.11.0/24"]),
                true,
                None,
            ),
            (
                "IPv6 only",
                serde_json::json!({FLANNEL_BACKEND_TYPE: "vxlan", FLANNEL_BACKEND_V6_DATA: v6}),
                serde_json::json!(["fd00:244:11::/64"]),
                false,
                Some(FlannelVtep {
                    mac: "8e:1c:22:33:44:55".into(),
                    ip: "fd00:244:11::".parse().unwrap(),
                }),
            ),
            (
                "not a MAC",
                dual(Some(r#"{"VNI":1,"VtepMAC":"8e:1c:22:33:44"}"#)),
                serde_json::json!(["10.244.11.0/24", "fd00:244:11::/64"]),
                true,
                None,
            ),
        ];
        for (what, annotations, cidrs, v4_wanted, want) in cases {
            let node = annotated(annotations, cidrs);
            assert_eq!(flannel_vtep6(&node), want, "{what}");
            assert_eq!(flannel_vtep(&node).is_some(), v4_wanted, "{what}: IPv4");
        }
    }
}
