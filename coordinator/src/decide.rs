//! The coordinator's decisions as a pure function of what it watched: which peers are
//! admitted (checked against their Node), which mesh IP each holds, which peers are garbage.
//! No I/O here; `controller` feeds it and applies the result. Two replicas that see the same
//! objects decide the same thing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ip_network::IpNetwork;
use isthmus_api::Topology;

/// What the coordinator needs of a WireGuardPeer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub name: String,
    pub generation: i64,
    /// RFC 3339 creation time; the older of two claimants wins a contested key or IP.
    pub created: String,
    pub public_key: String,
    pub node_ip: String,
    pub pod_cidrs: Vec<String>,
    pub mesh_ip: Option<String>,
    /// The current Admitted condition, if any: (status, reason, lastTransitionTime).
    pub admitted: Option<(String, String, String)>,
}

/// What the coordinator needs of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub addresses: Vec<String>,
    pub pod_cidrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The status the coordinator wants a peer to have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub mesh_ip: Option<String>,
    pub mesh_cidr: String,
    pub topology: Topology,
    pub admission: Admission,
    pub observed_generation: i64,
    /// Kept from the current condition when the verdict did not change.
    pub last_transition: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub statuses: BTreeMap<String, DesiredStatus>,
    /// Peers whose Node is gone (after they had been admitted).
    pub deletions: Vec<String>,
}

fn normalise_cidrs(cidrs: &[String]) -> Option<BTreeSet<String>> {
    cidrs
        .iter()
        .map(|c| {
            let (addr, len) = c.split_once('/')?;
            let net =
                IpNetwork::new_truncate(addr.parse::<IpAddr>().ok()?, len.parse().ok()?).ok()?;
            Some(net.to_string())
        })
        .collect()
}

fn same_ip(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Checks a peer against its Node: the node must exist, list the peer's nodeIP among its
/// addresses, and own exactly the peer's pod CIDRs.
pub fn admit(peer: &PeerView, node: Option<&NodeView>) -> Admission {
    let deny = |reason, message: String| Admission {
        admitted: false,
        reason,
        message,
    };
    let Some(node) = node else {
        return deny("NodeNotFound", format!("no Node named {}", peer.name));
    };
    if !node.addresses.iter().any(|a| same_ip(a, &peer.node_ip)) {
        return deny(
            "NodeIPMismatch",
            format!(
                "nodeIP {} is not an address of Node {} ({})",
                peer.node_ip,
                node.name,
                node.addresses.join(", ")
            ),
        );
    }
    if normalise_cidrs(&peer.pod_cidrs) != normalise_cidrs(&node.pod_cidrs) {
        return deny(
            "PodCIDRMismatch",
            format!(
                "podCIDRs [{}] are not Node {}'s [{}]",
                peer.pod_cidrs.join(", "),
                node.name,
                node.pod_cidrs.join(", ")
            ),
        );
    }
    Admission {
        admitted: true,
        reason: "NodeVerified",
        message: format!("matches Node {}", node.name),
    }
}

/// The mesh IP pool: hosts of one prefix, minus its network and broadcast addresses.
#[derive(Clone, Debug)]
pub struct Pool {
    pub cidr: IpNetwork,
}

impl Pool {
    pub fn contains(&self, ip: &str) -> bool {
        match ip.parse::<IpAddr>() {
            Ok(addr) => {
                self.cidr.contains(addr) && Some(addr) != self.first() && Some(addr) != self.last()
            }
            Err(_) => false,
        }
    }

    fn first(&self) -> Option<IpAddr> {
        Some(self.cidr.network_address())
    }

    fn last(&self) -> Option<IpAddr> {
        match self.cidr {
            IpNetwork::V4(n) => Some(IpAddr::V4(n.broadcast_address())),
            IpNetwork::V6(_) => None,
        }
    }

    /// The lowest address not in `taken`.
    pub fn allocate(&self, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        let base = match self.cidr.network_address() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let host_bits = match self.cidr {
            IpNetwork::V4(n) => 32 - u32::from(n.netmask()),
            IpNetwork::V6(n) => 128 - u32::from(n.netmask()),
        };
        let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        // Skip the network address, stop before the (v4) broadcast; bound the scan so a huge
        // v6 pool cannot spin.
        let end = size.saturating_sub(1).min(taken.len() as u128 + 2);
        (1..=end).find_map(|offset| {
            let raw = base + offset;
            let ip = match self.cidr {
                IpNetwork::V4(_) => IpAddr::V4(u32::try_from(raw).ok()?.into()),
                IpNetwork::V6(_) => IpAddr::V6(raw.into()),
            };
            (self.contains(&ip.to_string()) && !taken.contains(&ip)).then_some(ip)
        })
    }
}

/// Decides every peer's status and which peers to delete.
pub fn decide(
    peers: &[PeerView],
    nodes: &[NodeView],
    pool: &Pool,
    topology: Topology,
    now: &str,
) -> Plan {
    let nodes: HashMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut order: Vec<&PeerView> = peers.iter().collect();
    order.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));

    let mut plan = Plan::default();
    let mut keys_seen: HashMap<&str, &str> = HashMap::new();
    let mut admissions: Vec<(&PeerView, Admission)> = Vec::new();
    for peer in order {
        let node = nodes.get(peer.name.as_str()).copied();
        let was_admitted = peer.admitted.as_ref().is_some_and(|(s, _, _)| s == "True");
        if node.is_none() && (was_admitted || peer.mesh_ip.is_some()) {
            plan.deletions.push(peer.name.clone());
            continue;
        }
        let mut admission = admit(peer, node);
        if admission.admitted {
            if let Some(owner) = keys_seen.get(peer.public_key.as_str()) {
                admission = Admission {
                    admitted: false,
                    reason: "DuplicatePublicKey",
                    message: format!("public key already used by {owner}"),
                };
            } else {
                keys_seen.insert(&peer.public_key, &peer.name);
            }
        }
        admissions.push((peer, admission));
    }

    // Mesh IPs: existing valid claims first (oldest wins a clash), then new allocations.
    let mut taken = BTreeSet::new();
    let mut ips: HashMap<&str, IpAddr> = HashMap::new();
    for (peer, _) in &admissions {
        if let Some(ip) = peer.mesh_ip.as_deref().filter(|ip| pool.contains(ip)) {
            if let Ok(addr) = ip.parse::<IpAddr>() {
                if taken.insert(addr) {
                    ips.insert(&peer.name, addr);
                }
            }
        }
    }
    for (peer, admission) in &mut admissions {
        if admission.admitted && !ips.contains_key(peer.name.as_str()) {
            match pool.allocate(&taken) {
                Some(addr) => {
                    taken.insert(addr);
                    ips.insert(&peer.name, addr);
                }
                None => {
                    *admission = Admission {
                        admitted: false,
                        reason: "MeshPoolExhausted",
                        message: format!("no free address left in {}", pool.cidr),
                    }
                }
            }
        }
    }

    for (peer, admission) in admissions {
        let status = if admission.admitted { "True" } else { "False" };
        let last_transition = match &peer.admitted {
            Some((s, _, t)) if s == status => t.clone(),
            _ => now.to_string(),
        };
        plan.statuses.insert(
            peer.name.clone(),
            DesiredStatus {
                mesh_ip: ips.get(peer.name.as_str()).map(IpAddr::to_string),
                mesh_cidr: pool.cidr.to_string(),
                topology,
                admission,
                observed_generation: peer.generation,
                last_transition,
            },
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            cidr: "100.96.0.0/29".parse().unwrap(),
        }
    }

    fn node(name: &str, ip: &str, cidr: &str) -> NodeView {
        NodeView {
            name: name.into(),
            addresses: vec![ip.into()],
            pod_cidrs: vec![cidr.into()],
        }
    }

    fn peer(name: &str, created: &str, ip: &str, cidr: &str) -> PeerView {
        PeerView {
            name: name.into(),
            generation: 1,
            created: created.into(),
            public_key: format!("key-{name}"),
            node_ip: ip.into(),
            pod_cidrs: vec![cidr.into()],
            mesh_ip: None,
            admitted: None,
        }
    }

    const NOW: &str = "2026-11-24T00:00:00Z";

    fn run(peers: &[PeerView], nodes: &[NodeView]) -> Plan {
        decide(peers, nodes, &pool(), Topology::CrossLocation, NOW)
    }

    #[test]
    fn admission_table() {
        let n = node("a", "10.0.0.5", "10.244.1.0/24");
        let cases: &[(&str, PeerView, Option<&NodeView>, bool, &str)] = &[
            (
                "matching",
                peer("a", "1", "10.0.0.5", "10.244.1.0/24"),
                Some(&n),
                true,
                "NodeVerified",
            ),
            (
                "no node",
                peer("a", "1", "10.0.0.5", "10.244.1.0/24"),
                None,
                false,
                "NodeNotFound",
            ),
            (
                "other ip",
                peer("a", "1", "10.0.0.6", "10.244.1.0/24"),
                Some(&n),
                false,
                "NodeIPMismatch",
            ),
            (
                "other cidr",
                peer("a", "1", "10.0.0.5", "10.244.9.0/24"),
                Some(&n),
                false,
                "PodCIDRMismatch",
            ),
            // Host bits and order do not matter, the prefix does.
            (
                "unmasked cidr",
                peer("a", "1", "10.0.0.5", "10.244.1.7/24"),
                Some(&n),
                true,
                "NodeVerified",
            ),
        ];
        for (what, p, node, admitted, reason) in cases {
            let a = admit(p, *node);
            assert_eq!(
                (a.admitted, a.reason),
                (*admitted, *reason),
                "{what}: {}",
                a.message
            );
        }
    }

    #[test]
    fn mesh_ips_are_unique_stable_and_lowest_free() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.5", "10.244.2.0/24"),
            node("c", "10.0.0.6", "10.244.3.0/24"),
        ];
        let mut peers = vec![
            peer("a", "1", "10.0.0.5", "10.244.1.0/24"),
            peer("b", "2", "10.0.0.5", "10.244.2.0/24"),
        ];
        let plan = run(&peers, &nodes);
        assert_eq!(plan.statuses["a"].mesh_ip.as_deref(), Some("100.96.0.1"));
        assert_eq!(plan.statuses["b"].mesh_ip.as_deref(), Some("100.96.0.2"));

        // Recorded IPs are kept (a restart recomputes from status), even out of order.
        peers[0].mesh_ip = Some("100.96.0.4".into());
        peers[1].mesh_ip = Some("100.96.0.2".into());
        peers.push(peer("c", "3", "10.0.0.6", "10.244.3.0/24"));
        let plan = run(&peers, &nodes);
        assert_eq!(plan.statuses["a"].mesh_ip.as_deref(), Some("100.96.0.4"));
        assert_eq!(plan.statuses["b"].mesh_ip.as_deref(), Some("100.96.0.2"));
        assert_eq!(plan.statuses["c"].mesh_ip.as_deref(), Some("100.96.0.1"));

        // Two peers claiming one IP: the older keeps it, the newer gets another.
        peers[2].mesh_ip = Some("100.96.0.2".into());
        let plan = run(&peers, &nodes);
        assert_eq!(plan.statuses["b"].mesh_ip.as_deref(), Some("100.96.0.2"));
        assert_eq!(plan.statuses["c"].mesh_ip.as_deref(), Some("100.96.0.1"));
    }

    #[test]
    fn pool_exhaustion_is_a_reason_not_a_clash() {
        // /29: six usable addresses.
        let nodes: Vec<NodeView> = (0..7)
            .map(|i| node(&format!("n{i}"), "10.0.0.1", &format!("10.244.{i}.0/24")))
            .collect();
        let peers: Vec<PeerView> = (0..7)
            .map(|i| {
                peer(
                    &format!("n{i}"),
                    &format!("{i}"),
                    "10.0.0.1",
                    &format!("10.244.{i}.0/24"),
                )
            })
            .collect();
        let plan = run(&peers, &nodes);
        let ips: BTreeSet<_> = plan
            .statuses
            .values()
            .filter_map(|s| s.mesh_ip.clone())
            .collect();
        assert_eq!(ips.len(), 6);
        assert!(!ips.contains("100.96.0.0") && !ips.contains("100.96.0.7"));
        assert_eq!(plan.statuses["n6"].admission.reason, "MeshPoolExhausted");
    }

    #[test]
    fn duplicate_key_admits_only_the_older_peer() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.6", "10.244.2.0/24"),
        ];
        let mut b = peer("b", "2", "10.0.0.6", "10.244.2.0/24");
        b.public_key = "key-a".into();
        let plan = run(&[peer("a", "1", "10.0.0.5", "10.244.1.0/24"), b], &nodes);
        assert!(plan.statuses["a"].admission.admitted);
        assert_eq!(plan.statuses["b"].admission.reason, "DuplicatePublicKey");
        assert_eq!(plan.statuses["b"].mesh_ip, None);
    }

    #[test]
    fn peers_of_deleted_nodes_are_collected_but_forged_ones_only_refused() {
        let mut gone = peer("gone", "1", "10.0.0.5", "10.244.1.0/24");
        gone.admitted = Some(("True".into(), "NodeVerified".into(), "t".into()));
        gone.mesh_ip = Some("100.96.0.1".into());
        let forged = peer("forged", "2", "10.0.0.5", "10.244.1.0/24");
        let plan = run(&[gone, forged], &[]);
        assert_eq!(plan.deletions, vec!["gone".to_string()]);
        assert_eq!(plan.statuses["forged"].admission.reason, "NodeNotFound");
        assert!(!plan.statuses.contains_key("gone"));
    }

    #[test]
    fn transition_time_moves_only_when_the_verdict_does() {
        let nodes = [node("a", "10.0.0.5", "10.244.1.0/24")];
        let mut p = peer("a", "1", "10.0.0.5", "10.244.1.0/24");
        p.admitted = Some(("True".into(), "NodeVerified".into(), "earlier".into()));
        assert_eq!(
            run(&[p.clone()], &nodes).statuses["a"].last_transition,
            "earlier"
        );
        p.node_ip = "10.0.0.9".into();
        assert_eq!(run(&[p], &nodes).statuses["a"].last_transition, NOW);
    }

    #[test]
    fn decisions_do_not_depend_on_input_order() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.6", "10.244.2.0/24"),
        ];
        let peers = [
            peer("a", "1", "10.0.0.5", "10.244.1.0/24"),
            peer("b", "2", "10.0.0.6", "10.244.2.0/24"),
        ];
        let mut reversed = peers.to_vec();
        reversed.reverse();
        assert_eq!(run(&peers, &nodes), run(&reversed, &nodes));
    }
}
