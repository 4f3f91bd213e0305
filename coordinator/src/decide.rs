//! The coordinator's decisions as a pure function of what it watched: which peers are
//! admitted (checked against their Node), which mesh IP each holds, which peers are garbage.
//! No I/O here; `controller` feeds it and applies the result. Two replicas that see the same
//! objects decide the same thing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ip_network::IpNetwork;
use isthmus_api::node::FlannelVtep;
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
    pub location: String,
    /// flannel's VTEP as the agent claims it: (MAC, address).
    pub vtep: Option<(String, String)>,
    /// flannel's IPv6 VTEP (`flannel-v6.1`) as the agent claims it: (MAC, address).
    pub vtep6: Option<(String, String)>,
    pub mesh_ip: Option<String>,
    /// The IPv6 mesh IP it holds, from a dual-stack mesh's IPv6 pool.
    pub mesh_ipv6: Option<String>,
    /// The current Admitted condition, if any: (status, reason, lastTransitionTime).
    pub admitted: Option<(String, String, String)>,
    /// Where the other nodes send: `IPv4:port` or `[IPv6]:port`.
    pub endpoint: String,
    /// The object has a deletionTimestamp (a finalizer holds it): out of the mesh, no status.
    pub deleting: bool,
    /// Whether the agent proved it holds the private key of `public_key`.
    pub key: KeyPossession,
}

/// What the coordinator found in a peer's `spec.keyProof` ([`isthmus_api::proof`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPossession {
    /// It verifies for this node, its challenge and its public key.
    Proven,
    /// No answer yet (a new peer before its first challenge, or an agent older than proofs).
    /// `grace`: the challenge was issued less than the grace period ago, during which a peer
    /// admitted before keeps its admission (an upgrade must not drop its tunnels).
    Unanswered { grace: bool },
    /// An answer that does not verify: made without the private key, or copied.
    Wrong,
}

/// What the coordinator needs of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub addresses: Vec<String>,
    pub pod_cidrs: Vec<String>,
    /// `topology.kubernetes.io/region`, if labelled.
    pub region: Option<String>,
    /// flannel's VTEP as flannel recorded it on the Node (`isthmus_api::node::flannel_vtep`).
    pub vtep: Option<FlannelVtep>,
    /// The same for its IPv6 VTEP (`isthmus_api::node::flannel_vtep6`).
    pub vtep6: Option<FlannelVtep>,
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
    /// With an IPv6 pool as well ([`Pool::v6`]): the peer's IPv6 mesh IP and that pool.
    pub mesh_ipv6: Option<String>,
    pub mesh_cidr_v6: Option<String>,
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
/// addresses, own exactly the peer's pod CIDRs, have the VTEP flannel wrote on it (a peer
/// without one, routed mode, claims none), and be in the location its region label names.
/// An unlabelled Node takes the agent's `--location` on trust: nodes of one location would
/// otherwise need a label to join at all, so admins who do not trust their nodes label them.
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
    for (field, claim, recorded) in [
        ("vtep", &peer.vtep, &node.vtep),
        ("vtep6", &peer.vtep6, &node.vtep6),
    ] {
        if let Some(message) = vtep_mismatch(field, claim.as_ref(), recorded.as_ref(), &node.name) {
            return deny("VtepMismatch", message);
        }
    }
    if let Some(region) = node.region.as_deref().filter(|r| *r != peer.location) {
        return deny(
            "LocationMismatch",
            format!(
                "location {} is not Node {}'s region {region}",
                peer.location, node.name
            ),
        );
    }
    Admission {
        admitted: true,
        reason: "NodeVerified",
        message: format!("matches Node {}", node.name),
    }
}

/// Why a claimed VTEP is not the one flannel recorded on the Node, if it is not (a peer that
/// claims none, in routed mode or without that family, is fine).
fn vtep_mismatch(
    field: &str,
    claim: Option<&(String, String)>,
    recorded: Option<&FlannelVtep>,
    node: &str,
) -> Option<String> {
    let (mac, ip) = claim?;
    let matches =
        recorded.is_some_and(|v| v.mac.eq_ignore_ascii_case(mac) && same_ip(&v.ip.to_string(), ip));
    if matches {
        return None;
    }
    let says = match recorded {
        Some(v) => format!("MAC {} address {}", v.mac, v.ip),
        None => "none (no flannel vxlan backend data for that family on it)".into(),
    };
    Some(format!(
        "{field} MAC {mac} address {ip} is not Node {node}'s: flannel says {says}"
    ))
}

/// The admission `checked` (which the Node vouched for) once the key is accounted for: a
/// wrong proof is refused at once; a missing one too, unless the peer was admitted before
/// and the grace after its first challenge still runs. A key nobody proved never enters the
/// duplicate check ahead of one somebody did (see the order in [`decide`]).
fn key_possession(peer: &PeerView, was_admitted: bool, checked: Admission) -> Admission {
    match peer.key {
        KeyPossession::Proven => checked,
        KeyPossession::Wrong => Admission {
            admitted: false,
            reason: "KeyNotProven",
            message: "spec.keyProof does not prove possession of publicKey's private key \
                      (made without it, or copied from another peer)"
                .into(),
        },
        KeyPossession::Unanswered { grace: true } if was_admitted => Admission {
            message: format!(
                "{}; key possession not proven yet (status.keyChallenge unanswered), \
                 admitted for the grace period",
                checked.message
            ),
            ..checked
        },
        KeyPossession::Unanswered { .. } => Admission {
            admitted: false,
            reason: "KeyNotProven",
            message: "waiting for the agent to answer status.keyChallenge in spec.keyProof \
                      (an agent older than the coordinator never does)"
                .into(),
        },
    }
}

/// Why `endpoint` may not be a peer's: it lies inside the mesh pool or a Node's pod CIDR,
/// addresses the tunnel itself carries, so every datagram to it would be routed back into
/// the tunnel (a loop the kernel bounds and a userspace tunnel must refuse up front).
/// Endpoints that do not parse are the API's to reject (the CRD validates them).
fn endpoint_inside_mesh(
    endpoint: &str,
    pool: &Pool,
    pod_networks: &[(IpNetwork, &str)],
) -> Option<String> {
    let ip = endpoint.parse::<std::net::SocketAddr>().ok()?.ip();
    if let Some(cidr) = std::iter::once(pool.cidr)
        .chain(pool.v6)
        .find(|c| c.contains(ip))
    {
        return Some(format!(
            "endpoint {endpoint} is inside the mesh pool {cidr}: its datagrams would loop into the tunnel"
        ));
    }
    pod_networks
        .iter()
        .find(|(net, _)| net.contains(ip))
        .map(|(net, node)| {
            format!(
                "endpoint {endpoint} is inside pod CIDR {net} of Node {node}: its datagrams would loop into the tunnel"
            )
        })
}

/// The mesh IP pool: hosts of one prefix, minus its network and broadcast addresses.
#[derive(Clone, Debug)]
pub struct Pool {
    pub cidr: IpNetwork,
    /// A dual-stack mesh: an IPv6 pool as well (`cidr` then IPv4), from which every admitted
    /// peer also gets an IPv6 mesh IP, for flannel's IPv6 VXLAN to cross the mesh.
    pub v6: Option<IpNetwork>,
}

impl Pool {
    /// A single pool of either family.
    pub fn single(cidr: IpNetwork) -> Pool {
        Pool { cidr, v6: None }
    }

    /// The IPv6 pool of a dual-stack mesh, as a pool of its own.
    fn second(&self) -> Option<Pool> {
        self.v6.map(Pool::single)
    }

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

/// Mesh IPs from `pool` for the admitted peers: each valid claim (`claim`, in admission
/// order, so the oldest wins a clash) is kept, the rest get the lowest free addresses; a
/// peer left without one is no longer admitted (`MeshPoolExhausted`).
fn assign_mesh_ips<'a>(
    pool: &Pool,
    admissions: &mut [(&'a PeerView, Admission)],
    claim: impl Fn(&PeerView) -> Option<&str>,
) -> HashMap<&'a str, IpAddr> {
    let mut taken = BTreeSet::new();
    let mut ips: HashMap<&str, IpAddr> = HashMap::new();
    for (peer, _) in admissions.iter() {
        let claimed = claim(peer).filter(|ip| pool.contains(ip));
        if let Some(addr) = claimed.and_then(|ip| ip.parse::<IpAddr>().ok()) {
            if taken.insert(addr) {
                ips.insert(peer.name.as_str(), addr);
            }
        }
    }
    for (peer, admission) in admissions.iter_mut() {
        if admission.admitted && !ips.contains_key(peer.name.as_str()) {
            match pool.allocate(&taken) {
                Some(addr) => {
                    taken.insert(addr);
                    ips.insert(peer.name.as_str(), addr);
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
    ips
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
    // Proven claims first, so a peer admitted on grace never keeps a key or VTEP from one
    // that proved its key; then the older claimant wins.
    order.sort_by(|a, b| {
        (a.key != KeyPossession::Proven, &a.created, &a.name).cmp(&(
            b.key != KeyPossession::Proven,
            &b.created,
            &b.name,
        ))
    });

    let mut plan = Plan::default();
    let mut keys_seen: HashMap<&str, &str> = HashMap::new();
    let mut macs_seen: HashMap<(bool, String), &str> = HashMap::new();
    let mut admissions: Vec<(&PeerView, Admission)> = Vec::new();
    let pod_networks: Vec<(IpNetwork, &str)> = nodes
        .values()
        .flat_map(|n| {
            n.pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<IpNetwork>().ok().map(|c| (c, n.name.as_str())))
        })
        .collect();
    for peer in order.into_iter().filter(|p| !p.deleting) {
        let node = nodes.get(peer.name.as_str()).copied();
        let was_admitted = peer.admitted.as_ref().is_some_and(|(s, _, _)| s == "True");
        if node.is_none() && (was_admitted || peer.mesh_ip.is_some()) {
            plan.deletions.push(peer.name.clone());
            continue;
        }
        let mut admission = admit(peer, node);
        if admission.admitted {
            if let Some(message) = endpoint_inside_mesh(&peer.endpoint, pool, &pod_networks) {
                admission = Admission {
                    admitted: false,
                    reason: "EndpointInsideMesh",
                    message,
                };
            }
        }
        if admission.admitted {
            admission = key_possession(peer, was_admitted, admission);
        }
        // A second claimant of a key or of a VTEP MAC (which would repoint the first's FDB
        // entries) is refused; the older keeps it.
        if admission.admitted {
            // A MAC is claimed per device: the IPv4 and the IPv6 VTEP are told apart.
            let macs: Vec<(bool, String)> = [(false, &peer.vtep), (true, &peer.vtep6)]
                .into_iter()
                .filter_map(|(v6, v)| Some((v6, v.as_ref()?.0.to_ascii_lowercase())))
                .collect();
            if let Some(owner) = keys_seen.get(peer.public_key.as_str()) {
                admission = Admission {
                    admitted: false,
                    reason: "DuplicatePublicKey",
                    message: format!("public key already used by {owner}"),
                };
            } else if let Some(((_, mac), owner)) =
                macs.iter().find_map(|m| Some((m, *macs_seen.get(m)?)))
            {
                admission = Admission {
                    admitted: false,
                    reason: "DuplicateVtep",
                    message: format!("vtep MAC {mac} already used by {owner}"),
                };
            } else {
                keys_seen.insert(&peer.public_key, &peer.name);
                for m in macs {
                    macs_seen.insert(m, &peer.name);
                }
            }
        }
        admissions.push((peer, admission));
    }

    // Mesh IPs: existing valid claims first (oldest wins a clash), then new allocations;
    // in a dual-stack mesh the IPv6 ones by the same rules, and an admitted peer needs both.
    let ips = assign_mesh_ips(pool, &mut admissions, |p| p.mesh_ip.as_deref());
    let ips6 = match pool.second() {
        Some(pool6) => assign_mesh_ips(&pool6, &mut admissions, |p| p.mesh_ipv6.as_deref()),
        None => HashMap::new(),
    };

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
                mesh_ipv6: ips6.get(peer.name.as_str()).map(IpAddr::to_string),
                mesh_cidr_v6: pool.v6.map(|c| c.to_string()),
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
        Pool::single("100.96.0.0/29".parse().unwrap())
    }

    fn node(name: &str, ip: &str, cidr: &str) -> NodeView {
        NodeView {
            name: name.into(),
            addresses: vec![ip.into()],
            pod_cidrs: vec![cidr.into()],
            region: None,
            vtep: None,
            vtep6: None,
        }
    }

    /// A Node flannel (vxlan) and an admin's region label describe.
    fn flannel_node(name: &str, ip: &str, cidr: &str, mac: &str) -> NodeView {
        let (net, _) = cidr.split_once('/').unwrap();
        NodeView {
            region: Some("aws".into()),
            vtep: Some(FlannelVtep {
                mac: mac.into(),
                ip: net.parse().unwrap(),
            }),
            ..node(name, ip, cidr)
        }
    }

    fn with_vtep(mut p: PeerView, mac: &str, ip: &str) -> PeerView {
        p.vtep = Some((mac.into(), ip.into()));
        p
    }

    fn with_vtep6(mut p: PeerView, mac: &str, ip: &str) -> PeerView {
        p.vtep6 = Some((mac.into(), ip.into()));
        p
    }

    /// [`flannel_node`] in dual stack: flannel's `flannel-v6.1` on the IPv6 pod CIDR too.
    fn dual_flannel_node(name: &str, ip: &str, cidrs: [&str; 2], macs: [&str; 2]) -> NodeView {
        let (net6, _) = cidrs[1].split_once('/').unwrap();
        NodeView {
            pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            vtep6: Some(FlannelVtep {
                mac: macs[1].into(),
                ip: net6.parse().unwrap(),
            }),
            ..flannel_node(name, ip, cidrs[0], macs[0])
        }
    }

    fn at(mut p: PeerView, location: &str) -> PeerView {
        p.location = location.into();
        p
    }

    fn peer(name: &str, created: &str, ip: &str, cidr: &str) -> PeerView {
        PeerView {
            name: name.into(),
            generation: 1,
            created: created.into(),
            public_key: format!("key-{name}"),
            node_ip: ip.into(),
            pod_cidrs: vec![cidr.into()],
            location: "aws".into(),
            vtep: None,
            vtep6: None,
            mesh_ip: None,
            mesh_ipv6: None,
            admitted: None,
            endpoint: "203.0.113.9:51820".into(),
            deleting: false,
            key: KeyPossession::Proven,
        }
    }

    const NOW: &str = "2026-11-24T00:00:00Z";

    fn run(peers: &[PeerView], nodes: &[NodeView]) -> Plan {
        decide(peers, nodes, &pool(), Topology::CrossLocation, NOW)
    }

    #[test]
    fn admission_table() {
        let n = node("a", "10.0.0.5", "10.244.1.0/24");
        let f = flannel_node("a", "10.0.0.5", "10.244.1.0/24", "0a:58:0a:f4:01:00");
        let honest = || peer("a", "1", "10.0.0.5", "10.244.1.0/24");
        let d = dual_flannel_node(
            "a",
            "10.0.0.5",
            ["10.244.1.0/24", "fd00:244:1::/64"],
            ["0a:58:0a:f4:01:00", "8e:00:00:00:01:06"],
        );
        let dual = || {
            let mut p = with_vtep(honest(), "0a:58:0a:f4:01:00", "10.244.1.0");
            p.pod_cidrs.push("fd00:244:1::/64".into());
            p
        };
        let cases: &[(&str, PeerView, Option<&NodeView>, bool, &str)] = &[
            (
                "dual stack: both VTEPs as flannel wrote them",
                with_vtep6(dual(), "8E:00:00:00:01:06", "fd00:244:1:0::"),
                Some(&d),
                true,
                "NodeVerified",
            ),
            (
                "dual stack: no vtep6 claimed (flannel-v6.1 not found yet)",
                dual(),
                Some(&d),
                true,
                "NodeVerified",
            ),
            (
                "vtep6 with the IPv4 VTEP's MAC",
                with_vtep6(dual(), "0a:58:0a:f4:01:00", "fd00:244:1::"),
                Some(&d),
                false,
                "VtepMismatch",
            ),
            (
                "vtep6 address not the IPv6 pod subnet's",
                with_vtep6(dual(), "8e:00:00:00:01:06", "fd00:244:2::"),
                Some(&d),
                false,
                "VtepMismatch",
            ),
            (
                "vtep6 on a Node flannel wrote no IPv6 backend data on",
                with_vtep6(honest(), "8e:00:00:00:01:06", "fd00:244:1::"),
                Some(&f),
                false,
                "VtepMismatch",
            ),
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
            (
                "vtep as flannel wrote it (MAC case aside)",
                with_vtep(honest(), "0A:58:0A:F4:01:00", "10.244.1.0"),
                Some(&f),
                true,
                "NodeVerified",
            ),
            (
                "no vtep: routed mode claims none",
                honest(),
                Some(&f),
                true,
                "NodeVerified",
            ),
            (
                "another node's vtep MAC",
                with_vtep(honest(), "0a:58:0a:f4:02:00", "10.244.1.0"),
                Some(&f),
                false,
                "VtepMismatch",
            ),
            (
                "vtep address not the pod subnet's",
                with_vtep(honest(), "0a:58:0a:f4:01:00", "10.244.2.0"),
                Some(&f),
                false,
                "VtepMismatch",
            ),
            (
                "vtep on a Node flannel wrote nothing on",
                with_vtep(honest(), "0a:58:0a:f4:01:00", "10.244.1.0"),
                Some(&n),
                false,
                "VtepMismatch",
            ),
            (
                "location other than the region label",
                at(honest(), "vsphere"),
                Some(&f),
                false,
                "LocationMismatch",
            ),
            (
                "unlabelled Node: the agent's location is taken",
                at(honest(), "vsphere"),
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

    /// A dual-stack mesh (`--mesh-cidr-v6`): every admitted peer also gets an IPv6 mesh IP,
    /// by the IPv4 rules (unique, kept, lowest free, oldest wins a clash, exhaustion is a
    /// reason), and a single pool writes no IPv6 fields (old objects and coordinators).
    #[test]
    fn a_dual_stack_mesh_gives_admitted_peers_an_ipv6_mesh_ip_too() {
        let dual = |v6: &str| Pool {
            v6: Some(v6.parse().unwrap()),
            ..pool()
        };
        let nodes: Vec<NodeView> = (0..4)
            .map(|i| node(&format!("n{i}"), "10.0.0.1", &format!("10.244.{i}.0/24")))
            .collect();
        let peer_n = |i: usize| {
            peer(
                &format!("n{i}"),
                &format!("{i}"),
                "10.0.0.1",
                &format!("10.244.{i}.0/24"),
            )
        };
        let v6_of = |plan: &Plan, name: &str| plan.statuses[name].mesh_ipv6.clone();
        let mut peers: Vec<PeerView> = (0..3).map(peer_n).collect();

        let single = run(&peers, &nodes);
        assert!(single
            .statuses
            .values()
            .all(|s| s.mesh_ipv6.is_none() && s.mesh_cidr_v6.is_none()));

        let pool6 = dual("fd96::/125");
        let decide6 = |peers: &[PeerView], pool: &Pool| {
            decide(peers, &nodes, pool, Topology::CrossLocation, NOW)
        };
        let plan = decide6(&peers, &pool6);
        for (name, v4, v6) in [
            ("n0", "100.96.0.1", "fd96::1"),
            ("n1", "100.96.0.2", "fd96::2"),
            ("n2", "100.96.0.3", "fd96::3"),
        ] {
            let s = &plan.statuses[name];
            assert!(s.admission.admitted, "{name}");
            assert_eq!(s.mesh_ip.as_deref(), Some(v4), "{name}");
            assert_eq!(s.mesh_ipv6.as_deref(), Some(v6), "{name}");
            assert_eq!(s.mesh_cidr_v6.as_deref(), Some("fd96::/125"), "{name}");
        }

        // Kept out of order; a claim outside the pool is replaced; the older of two
        // claimants keeps the address.
        peers[0].mesh_ipv6 = Some("fd96::5".into());
        peers[1].mesh_ipv6 = Some("fd00::1".into());
        peers[2].mesh_ipv6 = Some("fd96::5".into());
        let plan = decide6(&peers, &pool6);
        assert_eq!(v6_of(&plan, "n0").as_deref(), Some("fd96::5"));
        assert_eq!(v6_of(&plan, "n1").as_deref(), Some("fd96::1"));
        assert_eq!(v6_of(&plan, "n2").as_deref(), Some("fd96::2"));

        // An IPv6 pool of three: the fourth peer is refused, keeping no address.
        peers.push(peer_n(3));
        let plan = decide6(&peers, &dual("fd96::/126"));
        assert_eq!(plan.statuses["n3"].admission.reason, "MeshPoolExhausted");
        assert_eq!(
            plan.statuses["n3"].admission.message,
            "no free address left in fd96::/126"
        );
        assert_eq!(v6_of(&plan, "n3"), None);
        assert!(plan.statuses["n0"].admission.admitted);

        // An endpoint inside the IPv6 pool would loop into the tunnel.
        let mut looping = peer_n(0);
        looping.endpoint = "[fd96::6]:51820".into();
        let plan = decide6(&[looping], &pool6);
        assert_eq!(plan.statuses["n0"].admission.reason, "EndpointInsideMesh");
        assert_eq!(v6_of(&plan, "n0"), None);
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
    fn a_rotated_key_stays_admitted_with_its_mesh_ip_and_the_oldest_claimant_still_wins() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.6", "10.244.2.0/24"),
        ];
        let admitted = |mut p: PeerView, ip: &str| {
            p.admitted = Some(("True".into(), "NodeVerified".into(), "earlier".into()));
            p.mesh_ip = Some(ip.into());
            p
        };
        let a = admitted(peer("a", "1", "10.0.0.5", "10.244.1.0/24"), "100.96.0.1");
        let b = admitted(peer("b", "2", "10.0.0.6", "10.244.2.0/24"), "100.96.0.2");
        // a rotates its key: same verdict (no transition), same mesh IP.
        let mut rotated = a.clone();
        rotated.public_key = "key-a2".into();
        let plan = run(&[rotated.clone(), b.clone()], &nodes);
        let st = &plan.statuses["a"];
        assert!(st.admission.admitted, "{st:?}");
        assert_eq!(st.mesh_ip.as_deref(), Some("100.96.0.1"));
        assert_eq!(st.last_transition, "earlier", "a rotation is no transition");
        // b (newer) rotates onto a's key: refused; a (older) keeps it.
        let mut thief = b.clone();
        thief.public_key = "key-a2".into();
        let plan = run(&[rotated, thief], &nodes);
        assert!(plan.statuses["a"].admission.admitted);
        assert_eq!(plan.statuses["b"].admission.reason, "DuplicatePublicKey");
    }

    #[test]
    fn a_key_counts_only_once_its_possession_is_proven() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.6", "10.244.2.0/24"),
        ];
        let admitted = |mut p: PeerView| {
            p.admitted = Some(("True".into(), "NodeVerified".into(), NOW.into()));
            p.mesh_ip = Some(format!("100.96.0.{}", if p.name == "a" { 1 } else { 2 }));
            p
        };
        let keyed = |mut p: PeerView, key: KeyPossession| {
            p.key = key;
            p
        };
        let a = peer("a", "1", "10.0.0.5", "10.244.1.0/24");
        let b = peer("b", "2", "10.0.0.6", "10.244.2.0/24");
        // b, the newer object, holds the key; a (older) copied it.
        let copied = |p: PeerView| PeerView {
            public_key: "key-b".into(),
            ..p
        };
        let grace = KeyPossession::Unanswered { grace: true };
        let late = KeyPossession::Unanswered { grace: false };
        // (case, peers, expected (name, admitted, reason))
        type Case = (
            &'static str,
            Vec<PeerView>,
            Vec<(&'static str, bool, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                "both proven",
                vec![a.clone(), b.clone()],
                vec![("a", true, "NodeVerified"), ("b", true, "NodeVerified")],
            ),
            (
                "a new peer waits for its answer",
                vec![keyed(a.clone(), grace), b.clone()],
                vec![("a", false, "KeyNotProven"), ("b", true, "NodeVerified")],
            ),
            (
                "a wrong answer is refused even for an admitted peer",
                vec![keyed(admitted(a.clone()), KeyPossession::Wrong)],
                vec![("a", false, "KeyNotProven")],
            ),
            (
                "an admitted peer keeps its admission unanswered during the grace",
                vec![keyed(admitted(a.clone()), grace)],
                vec![("a", true, "NodeVerified")],
            ),
            (
                "and loses it after",
                vec![keyed(admitted(a.clone()), late)],
                vec![("a", false, "KeyNotProven")],
            ),
            (
                "an older copier without the key does not displace the owner",
                vec![keyed(copied(a.clone()), KeyPossession::Wrong), b.clone()],
                vec![("a", false, "KeyNotProven"), ("b", true, "NodeVerified")],
            ),
            (
                "nor does an older admitted copier on grace",
                vec![keyed(admitted(copied(a.clone())), grace), b.clone()],
                vec![
                    ("a", false, "DuplicatePublicKey"),
                    ("b", true, "NodeVerified"),
                ],
            ),
            (
                "nor one that never answers",
                vec![keyed(copied(a.clone()), late), b.clone()],
                vec![("a", false, "KeyNotProven"), ("b", true, "NodeVerified")],
            ),
        ];
        for (case, peers, expected) in cases {
            let plan = run(&peers, &nodes);
            for (name, admitted, reason) in expected {
                let got = &plan.statuses[name].admission;
                assert_eq!(
                    (got.admitted, got.reason),
                    (admitted, reason),
                    "{case}: {name}: {}",
                    got.message
                );
            }
        }
    }

    #[test]
    fn duplicate_vtep_admits_only_the_older_peer() {
        // Two Nodes flannel (or whoever can write Node annotations) gave the same MAC.
        let mac = "0a:58:0a:f4:01:00";
        let nodes = [
            flannel_node("a", "10.0.0.5", "10.244.1.0/24", mac),
            flannel_node("b", "10.0.0.6", "10.244.2.0/24", mac),
            flannel_node("c", "10.0.0.7", "10.244.3.0/24", "0a:58:0a:f4:03:00"),
        ];
        let peers = [
            with_vtep(
                peer("b", "2", "10.0.0.6", "10.244.2.0/24"),
                mac,
                "10.244.2.0",
            ),
            with_vtep(
                peer("a", "1", "10.0.0.5", "10.244.1.0/24"),
                "0A:58:0A:F4:01:00",
                "10.244.1.0",
            ),
            peer("c", "3", "10.0.0.7", "10.244.3.0/24"),
        ];
        let plan = run(&peers, &nodes);
        assert!(plan.statuses["a"].admission.admitted);
        assert_eq!(plan.statuses["b"].admission.reason, "DuplicateVtep");
        assert_eq!(plan.statuses["b"].mesh_ip, None);
        assert!(plan.statuses["c"].admission.admitted, "no vtep, no clash");
    }

    #[test]
    fn a_duplicate_vtep6_mac_is_refused_but_a_mac_shared_across_families_is_not() {
        let (v4a, v4b, shared6) = (
            "0a:58:0a:f4:01:00",
            "0a:58:0a:f4:02:00",
            "8e:00:00:00:00:06",
        );
        let cidrs = |n: u8| [format!("10.244.{n}.0/24"), format!("fd00:244:{n}::/64")];
        let dual_peer = |name: &str, created: &str, n: u8, mac4: &str, mac6: &str| {
            let [c4, c6] = cidrs(n);
            let mut p = peer(name, created, &format!("10.0.0.{n}"), &c4);
            p.pod_cidrs.push(c6.clone());
            let p = with_vtep(p, mac4, &format!("10.244.{n}.0"));
            with_vtep6(p, mac6, &format!("fd00:244:{n}::"))
        };
        let dual_node = |name: &str, n: u8, mac4: &str, mac6: &str| {
            let [c4, c6] = cidrs(n);
            dual_flannel_node(name, &format!("10.0.0.{n}"), [&c4, &c6], [mac4, mac6])
        };
        // b's IPv6 VTEP has a's IPv6 MAC; c's IPv6 VTEP has a's IPv4 MAC (another device).
        let nodes = [
            dual_node("a", 1, v4a, shared6),
            dual_node("b", 2, v4b, shared6),
            dual_node("c", 3, "0a:58:0a:f4:03:00", v4a),
        ];
        let peers = [
            dual_peer("b", "2", 2, v4b, shared6),
            dual_peer("a", "1", 1, v4a, shared6),
            dual_peer("c", "3", 3, "0a:58:0a:f4:03:00", v4a),
        ];
        let plan = run(&peers, &nodes);
        assert!(plan.statuses["a"].admission.admitted, "the older claimant");
        assert_eq!(plan.statuses["b"].admission.reason, "DuplicateVtep");
        assert!(
            plan.statuses["b"].admission.message.contains(shared6),
            "{}",
            plan.statuses["b"].admission.message
        );
        assert!(
            plan.statuses["c"].admission.admitted,
            "{:?}",
            plan.statuses["c"].admission
        );
    }

    #[test]
    fn an_endpoint_the_tunnel_carries_is_refused() {
        let nodes = [
            node("a", "10.0.0.5", "10.244.1.0/24"),
            node("b", "10.0.0.6", "10.244.2.0/24"),
        ];
        // (endpoint, admitted, message start)
        let cases = [
            ("203.0.113.9:51820", true, "matches Node a"),
            ("10.0.0.6:51820", true, "matches Node a"),
            (
                "100.96.0.3:51820",
                false,
                "endpoint 100.96.0.3:51820 is inside the mesh pool 100.96.0.0/29",
            ),
            (
                "10.244.2.7:51820",
                false,
                "endpoint 10.244.2.7:51820 is inside pod CIDR 10.244.2.0/24 of Node b",
            ),
            (
                "10.244.1.1:51820",
                false,
                "endpoint 10.244.1.1:51820 is inside pod CIDR 10.244.1.0/24 of Node a",
            ),
            ("[2001:db8::1]:51820", true, "matches Node a"),
        ];
        for (endpoint, admitted, message) in cases {
            let mut p = peer("a", "1", "10.0.0.5", "10.244.1.0/24");
            p.endpoint = endpoint.into();
            let plan = run(&[p], &nodes);
            let got = &plan.statuses["a"].admission;
            assert_eq!(got.admitted, admitted, "{endpoint}: {got:?}");
            if !admitted {
                assert_eq!(got.reason, "EndpointInsideMesh");
                assert_eq!(plan.statuses["a"].mesh_ip, None);
            }
            assert!(
                got.message.starts_with(message),
                "{endpoint}: {}",
                got.message
            );
        }
    }

    /// Dual-stack Nodes on an IPv6 underlay: the node IP and the endpoint are IPv6, the pod
    /// CIDRs both families; an endpoint inside either family's pod CIDR is refused.
    #[test]
    fn dual_stack_nodes_on_an_ipv6_underlay() {
        let dual = |name: &str, ip: &str, n: u8| NodeView {
            pod_cidrs: vec![format!("10.244.{n}.0/24"), format!("fd00:244:{n}::/64")],
            ..node(name, ip, "")
        };
        let nodes = [
            dual("a", "2001:db8:1::11", 1),
            dual("b", "2001:db8:2::11", 2),
        ];
        // (endpoint, admitted, message start)
        let cases = [
            ("[2001:db8:1::11]:51820", true, "matches Node a"),
            ("[2001:db8:2::11]:51820", true, "matches Node a"),
            (
                "[fd00:244:2::7]:51820",
                false,
                "endpoint [fd00:244:2::7]:51820 is inside pod CIDR fd00:244:2::/64 of Node b",
            ),
            (
                "10.244.1.9:51820",
                false,
                "endpoint 10.244.1.9:51820 is inside pod CIDR 10.244.1.0/24 of Node a",
            ),
        ];
        for (endpoint, admitted, message) in cases {
            let mut p = peer("a", "1", "2001:db8:1::11", "10.244.1.0/24");
            p.pod_cidrs.push("fd00:244:1::/64".into());
            p.endpoint = endpoint.into();
            let plan = run(&[p], &nodes);
            let got = &plan.statuses["a"].admission;
            assert_eq!(got.admitted, admitted, "{endpoint}: {got:?}");
            assert!(
                got.message.starts_with(message),
                "{endpoint}: {}",
                got.message
            );
            assert_eq!(plan.statuses["a"].mesh_ip.is_some(), admitted, "{endpoint}");
        }
        // A claim of only one family of a dual-stack Node's pod CIDRs is not its own.
        let p = peer("a", "1", "2001:db8:1::11", "10.244.1.0/24");
        let plan = run(&[p], &nodes);
        assert_eq!(plan.statuses["a"].admission.reason, "PodCIDRMismatch");
    }

    #[test]
    fn a_peer_held_by_a_finalizer_gets_no_status_and_frees_its_claims() {
        let nodes = [node("a", "10.0.0.5", "10.244.1.0/24")];
        let mut held = peer("a", "1", "10.0.0.5", "10.244.1.0/24");
        held.mesh_ip = Some("100.96.0.1".into());
        held.admitted = Some(("True".into(), "NodeVerified".into(), "t".into()));
        held.deleting = true;
        let mut next = peer("a2", "2", "10.0.0.5", "10.244.1.0/24");
        next.public_key = held.public_key.clone();
        let plan = run(&[held, next], &nodes);
        assert!(!plan.statuses.contains_key("a"), "{plan:?}");
        assert!(plan.deletions.is_empty(), "already being deleted");
        assert_eq!(plan.statuses["a2"].admission.reason, "NodeNotFound");
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
