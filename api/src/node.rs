//! What isthmus reads from a Node. Agent (to publish) and coordinator (to admit) must read it
//! the same way, or an honest peer would be refused.

use k8s_openapi::api::core::v1::Node;

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
}
