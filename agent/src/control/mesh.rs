//! From the WireGuardPeers the agent watches to the mesh it should run: a pure function, so
//! the rule "configure only admitted peers the topology pairs us with" is tested in a table.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ip_network::IpNetwork;
use isthmus_api::{Topology, WireGuardPeer};
use kube::ResourceExt;

use isthmus_routing::plan::{Remote, Vtep};
use isthmus_wg::key::Key;
use isthmus_wg::PeerConfig;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshPlan {
    /// Whether the coordinator has admitted this node (nothing is configured before).
    pub admitted: bool,
    /// This node's mesh address and the pool's prefix length, for the tunnel device.
    pub address: Option<(IpAddr, u8)>,
    /// In a dual-stack mesh, this node's IPv6 mesh address and its pool's prefix length too.
    pub address6: Option<(IpAddr, u8)>,
    /// Peers sorted by public key.
    pub peers: Vec<PeerConfig>,
    /// The peers in other locations, for routing, sorted by name.
    pub remotes: Vec<Remote>,
    /// Node name of each configured peer, by public key (metrics label peers by name).
    pub names: BTreeMap<Key, String>,
}

fn mesh_address(peer: &WireGuardPeer) -> Option<(IpAddr, u8)> {
    let status = peer.status.as_ref()?;
    let ip: IpAddr = status.mesh_ip.as_deref()?.parse().ok()?;
    let prefix = status
        .mesh_cidr
        .as_deref()
        .and_then(|c| c.parse::<IpNetwork>().ok())
        .map(|n| n.netmask())
        .unwrap_or(if ip.is_ipv4() { 32 } else { 128 });
    Some((ip, prefix))
}

/// The IPv6 mesh address of a dual-stack mesh (`status.meshIPv6`), if any.
fn mesh_address6(peer: &WireGuardPeer) -> Option<(IpAddr, u8)> {
    let status = peer.status.as_ref()?;
    let ip: IpAddr = status.mesh_ipv6.as_deref()?.parse().ok()?;
    if !ip.is_ipv6() {
        return None;
    }
    let prefix = status
        .mesh_cidr_v6
        .as_deref()
        .and_then(|c| c.parse::<IpNetwork>().ok())
        .map_or(128, |n| n.netmask());
    Some((ip, prefix))
}

fn pod_cidrs(peer: &WireGuardPeer) -> Vec<IpNetwork> {
    peer.spec
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect()
}

fn vtep(published: Option<&isthmus_api::Vtep>) -> Option<Vtep> {
    let v = published?;
    Some(Vtep {
        mac: v.mac.parse().ok()?,
        ip: v.ip.parse().ok()?,
    })
}

fn remote(peer: &WireGuardPeer, mesh_ip: IpAddr) -> Remote {
    Remote {
        name: peer.name_any(),
        mesh_ip,
        mesh_ip6: mesh_address6(peer).map(|(ip, _)| ip),
        pod_cidrs: pod_cidrs(peer),
        vtep: vtep(peer.spec.vtep.as_ref()),
        vtep6: vtep(peer.spec.vtep6.as_ref()),
        mtu: peer.spec.mtu.and_then(|m| u16::try_from(m).ok()),
        path_mtu: None,
    }
}

/// Whether the coordinator admitted a peer, for the spec it has now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Admitted,
    /// Admitted for an earlier spec; the coordinator has not looked at the current one yet
    /// (a rotated key, a moved VTEP). The last admitted view of it stands meanwhile.
    Pending,
    Out,
}

fn verdict(peer: &WireGuardPeer) -> Verdict {
    if peer.is_admitted() {
        return Verdict::Admitted;
    }
    let generation = peer.metadata.generation;
    let stale_true = peer
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == isthmus_api::ADMITTED)
        })
        .is_some_and(|c| {
            c.status == "True"
                && matches!((c.observed_generation, generation), (Some(o), Some(g)) if o < g)
        });
    if stale_true && peer.metadata.deletion_timestamp.is_none() {
        Verdict::Pending
    } else {
        Verdict::Out
    }
}

/// The mesh for node `own`, given every WireGuardPeer. A peer's allowed IPs are its mesh
/// IP, plus its pod CIDRs when it is in another location (what routed mode sends it).
pub fn plan<P: Borrow<WireGuardPeer>>(own: &str, peers: &[P]) -> MeshPlan {
    plan_after(own, peers, None)
}

/// [`plan`], where a peer whose new spec awaits the coordinator keeps what `applied` had for
/// it (a node that changed its key stays reachable under the old one until re-admitted:
/// the spec change is not yet vouched for, the old admission is), and this node stays
/// in the mesh while its own new spec awaits the coordinator. Without that every spec
/// change would take the node out of the mesh for a coordinator round trip.
pub fn plan_after<P: Borrow<WireGuardPeer>>(
    own: &str,
    peers: &[P],
    applied: Option<&MeshPlan>,
) -> MeshPlan {
    let peers: Vec<&WireGuardPeer> = peers.iter().map(Borrow::borrow).collect();
    let Some(me) = peers.iter().find(|p| p.name_any() == own) else {
        return MeshPlan::default();
    };
    match verdict(me) {
        Verdict::Admitted => {}
        Verdict::Pending if applied.is_some_and(|a| a.admitted) => {}
        _ => return MeshPlan::default(),
    }
    let topology = me
        .status
        .as_ref()
        .and_then(|s| s.topology)
        .unwrap_or(Topology::CrossLocation);
    let own_keepalive = me.spec.persistent_keepalive.unwrap_or(0);
    let mut remotes = Vec::new();
    let mut names = BTreeMap::new();
    let mut pending = Vec::new();
    let mut out: Vec<PeerConfig> = peers
        .iter()
        .filter(|p| p.name_any() != own)
        .filter(|p| match verdict(p) {
            Verdict::Admitted => true,
            Verdict::Pending => {
                pending.push(p.name_any());
                false
            }
            Verdict::Out => false,
        })
        .filter(|p| topology.wants_tunnel(&me.spec.location, &p.spec.location))
        .filter_map(|p| {
            let (mesh_ip, _) = mesh_address(p)?;
            let elsewhere = p.spec.location != me.spec.location;
            let public_key = Key::from_base64(&p.spec.public_key).ok()?;
            let endpoint: SocketAddr = p.spec.endpoint.parse().ok()?;
            let host = match mesh_ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            };
            let keepalive = own_keepalive.max(p.spec.persistent_keepalive.unwrap_or(0));
            let mut allowed_ips = vec![IpNetwork::new(mesh_ip, host).ok()?];
            if let Some((ip6, _)) = mesh_address6(p) {
                allowed_ips.extend(IpNetwork::new(ip6, 128).ok());
            }
            if elsewhere {
                allowed_ips.extend(pod_cidrs(p));
                remotes.push(remote(p, mesh_ip));
            }
            names.insert(public_key, p.name_any());
            Some(PeerConfig {
                public_key,
                preshared_key: None,
                endpoint: Some(endpoint),
                persistent_keepalive: u16::try_from(keepalive).unwrap_or(u16::MAX),
                allowed_ips,
            })
        })
        .collect();
    if let Some(applied) = applied {
        for name in &pending {
            let Some((key, _)) = applied.names.iter().find(|(_, n)| *n == name) else {
                continue;
            };
            if let Some(pc) = applied.peers.iter().find(|p| p.public_key == *key) {
                out.push(pc.clone());
                names.insert(*key, name.clone());
            }
            if let Some(r) = applied.remotes.iter().find(|r| r.name == *name) {
                remotes.push(r.clone());
            }
        }
    }
    out.sort_by_key(|p| p.public_key);
    remotes.sort_by(|a, b| a.name.cmp(&b.name));
    MeshPlan {
        admitted: true,
        address: mesh_address(me),
        address6: mesh_address6(me),
        peers: out,
        remotes,
        names,
    }
}

/// The peers whose key changed between two plans, as (old, new): the same node under a new
/// key rotated it, and the tunnel keeps the old session until the new one is up.
pub fn successors(before: Option<&MeshPlan>, next: &MeshPlan) -> Vec<(Key, Key)> {
    let Some(before) = before else {
        return Vec::new();
    };
    let old: BTreeMap<&str, Key> = before
        .names
        .iter()
        .map(|(key, name)| (name.as_str(), *key))
        .collect();
    next.names
        .iter()
        .filter_map(|(key, name)| {
            let was = *old.get(name.as_str())?;
            (was != *key).then_some((was, *key))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use isthmus_api::{WireGuardPeerSpec, WireGuardPeerStatus, ADMITTED};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    pub(crate) fn peer(
        name: &str,
        key: u8,
        location: &str,
        mesh: Option<&str>,
        admitted: bool,
    ) -> WireGuardPeer {
        let mut p = WireGuardPeer::new(
            name,
            WireGuardPeerSpec {
                public_key: Key([key; 32]).to_base64(),
                endpoint: format!("203.0.113.{key}:51820"),
                location: location.into(),
                node_ip: "10.0.0.5".into(),
                pod_cidrs: vec![format!("10.244.{key}.0/24")],
                vtep: Some(isthmus_api::Vtep {
                    mac: format!("0a:58:0a:f4:{key:02x}:00"),
                    ip: format!("10.244.{key}.0"),
                }),
                vtep6: None,
                persistent_keepalive: Some(25),
                mtu: Some(1420),
                key_proof: None,
            },
        );
        p.metadata.generation = Some(2);
        p.status = Some(WireGuardPeerStatus {
            mesh_ip: mesh.map(str::to_string),
            mesh_cidr: Some("100.96.0.0/16".into()),
            mesh_ipv6: None,
            mesh_cidr_v6: None,
            topology: Some(Topology::CrossLocation),
            conditions: vec![Condition {
                type_: ADMITTED.into(),
                status: if admitted { "True" } else { "False" }.into(),
                reason: "NodeVerified".into(),
                message: String::new(),
                observed_generation: Some(2),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            health: None,
            key_challenge: None,
        });
        p
    }

    fn keys(plan: &MeshPlan) -> Vec<u8> {
        plan.peers.iter().map(|p| p.public_key.0[0]).collect()
    }

    #[test]
    fn cross_location_pairs_only_admitted_peers_elsewhere() {
        let peers = vec![
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            peer("a2", 2, "old", Some("100.96.0.2"), true),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
            peer("b2", 4, "new", Some("100.96.0.4"), false),
            peer("b3", 5, "new", None, true),
        ];
        let plan = plan("a1", &peers);
        assert!(plan.admitted);
        assert_eq!(plan.address, Some(("100.96.0.1".parse().unwrap(), 16)));
        assert_eq!(
            keys(&plan),
            vec![3],
            "same location, unadmitted and IP-less peers are left out"
        );
        let b1 = &plan.peers[0];
        assert_eq!(b1.endpoint, Some("203.0.113.3:51820".parse().unwrap()));
        assert_eq!(
            b1.allowed_ips,
            vec![
                "100.96.0.3/32".parse::<IpNetwork>().unwrap(),
                "10.244.3.0/24".parse().unwrap()
            ],
            "mesh IP, plus pod CIDRs for a peer in another location"
        );
        assert_eq!(b1.persistent_keepalive, 25);
        assert_eq!(
            plan.remotes,
            vec![Remote {
                name: "b1".into(),
                mesh_ip: "100.96.0.3".parse().unwrap(),
                mesh_ip6: None,
                pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
                vtep: Some(Vtep {
                    mac: "0a:58:0a:f4:03:00".parse().unwrap(),
                    ip: "10.244.3.0".parse().unwrap(),
                }),
                vtep6: None,
                mtu: Some(1420),
                path_mtu: None,
            }]
        );
    }

    /// In a dual-stack mesh, a node's IPv6 mesh IP goes on its tunnel with the IPv6 pool's
    /// prefix, and is in its peers' allowed IPs (flannel-v6.1's VXLAN arrives from it).
    #[test]
    fn a_dual_stack_mesh_adds_the_ipv6_mesh_ip_to_address_and_allowed_ips() {
        let dual = |mut p: WireGuardPeer, ip6: &str| {
            let s = p.status.as_mut().unwrap();
            s.mesh_ipv6 = Some(ip6.into());
            s.mesh_cidr_v6 = Some("fd96::/64".into());
            p
        };
        let peers = vec![
            dual(peer("a1", 1, "old", Some("100.96.0.1"), true), "fd96::1"),
            dual(peer("b1", 3, "new", Some("100.96.0.3"), true), "fd96::3"),
            // An old coordinator (single pool): IPv4 only, as before.
            peer("b2", 4, "new", Some("100.96.0.4"), true),
        ];
        let plan = plan("a1", &peers);
        assert_eq!(plan.address, Some(("100.96.0.1".parse().unwrap(), 16)));
        assert_eq!(plan.address6, Some(("fd96::1".parse().unwrap(), 64)));
        let allowed: Vec<Vec<String>> = plan
            .peers
            .iter()
            .map(|p| p.allowed_ips.iter().map(|n| n.to_string()).collect())
            .collect();
        assert_eq!(
            allowed,
            vec![
                vec!["100.96.0.3/32", "fd96::3/128", "10.244.3.0/24"],
                vec!["100.96.0.4/32", "10.244.4.0/24"],
            ]
        );
        let single = plan_after("b2", &peers, None);
        assert_eq!(single.address6, None);

        // Routing learns each remote's IPv6 mesh IP and the flannel-v6.1 VTEP it published
        // (b1), so its FDB entry can point there; b2 has neither.
        let mut with_vtep6 = peers.clone();
        with_vtep6[1].spec.vtep6 = Some(isthmus_api::Vtep {
            mac: "8e:00:00:00:03:06".into(),
            ip: "fd00:244:3::".into(),
        });
        let remotes = super::plan("a1", &with_vtep6).remotes;
        let got: Vec<_> = remotes
            .iter()
            .map(|r| (r.name.as_str(), r.mesh_ip6, r.vtep6))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "b1",
                    Some("fd96::3".parse().unwrap()),
                    Some(Vtep {
                        mac: "8e:00:00:00:03:06".parse().unwrap(),
                        ip: "fd00:244:3::".parse().unwrap(),
                    })
                ),
                ("b2", None, None),
            ]
        );
    }

    #[test]
    fn a_peer_held_by_a_finalizer_leaves_the_mesh_at_once() {
        let mut held = peer("b1", 3, "new", Some("100.96.0.3"), true);
        held.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        let peers = vec![
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            held,
            peer("b2", 4, "new", Some("100.96.0.4"), true),
        ];
        assert_eq!(keys(&plan("a1", &peers)), vec![4]);
        assert_eq!(
            plan("b1", &peers),
            MeshPlan::default(),
            "nor does it mesh itself"
        );
    }

    #[test]
    fn full_topology_pairs_everyone_admitted() {
        let mut peers = vec![
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            peer("a2", 2, "old", Some("100.96.0.2"), true),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
        ];
        if let Some(s) = peers[0].status.as_mut() {
            s.topology = Some(Topology::Full);
        }
        let full = plan("a1", &peers);
        assert_eq!(keys(&full), vec![2, 3]);
        assert_eq!(
            full.peers[0].allowed_ips.len(),
            1,
            "a same-location peer gets its mesh IP only"
        );
        let names: Vec<&str> = full.remotes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["b1"], "routing only concerns other locations");
    }

    #[test]
    fn nothing_before_own_admission_and_stale_admissions_do_not_count() {
        let mut peers = vec![
            peer("a1", 1, "old", Some("100.96.0.1"), false),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
        ];
        assert_eq!(plan("a1", &peers), MeshPlan::default());
        assert_eq!(plan("nobody", &peers), MeshPlan::default());
        peers[0] = peer("a1", 1, "old", Some("100.96.0.1"), true);
        // b1 changed its spec (generation 3) since it was admitted: not trusted yet.
        peers[1].metadata.generation = Some(3);
        assert!(plan("a1", &peers).peers.is_empty());
    }

    #[test]
    fn a_node_under_a_new_key_succeeds_its_old_key() {
        let me = peer("a1", 1, "old", Some("100.96.0.1"), true);
        let b = peer("b1", 3, "new", Some("100.96.0.3"), true);
        let c = peer("c1", 4, "new", Some("100.96.0.4"), true);
        let before = plan("a1", &[me.clone(), b.clone(), c.clone()]);
        let mut b2 = b.clone();
        b2.spec.public_key = Key([9; 32]).to_base64();
        let d = peer("d1", 5, "new", Some("100.96.0.5"), true);
        let next = plan("a1", &[me.clone(), b2, d]);
        assert_eq!(
            successors(Some(&before), &next),
            vec![(Key([3; 32]), Key([9; 32]))],
            "b1 rotated; c1 left and d1 came, which is no succession"
        );
        assert!(successors(None, &next).is_empty());
        assert!(successors(Some(&before), &before).is_empty());
    }

    #[test]
    fn a_peer_awaiting_re_admission_keeps_its_last_admitted_view() {
        let me = peer("a1", 1, "old", Some("100.96.0.1"), true);
        let b = peer("b1", 3, "new", Some("100.96.0.3"), true);
        let before = plan("a1", &[me.clone(), b.clone()]);
        // b1 publishes a new key: its generation moves past the admission's.
        let mut b2 = b.clone();
        b2.spec.public_key = Key([9; 32]).to_base64();
        b2.metadata.generation = Some(3);
        let pending = plan_after("a1", &[me.clone(), b2.clone()], Some(&before));
        assert_eq!(
            pending, before,
            "the old key stays until the coordinator re-admits"
        );
        assert!(
            plan("a1", &[me.clone(), b2.clone()]).peers.is_empty(),
            "never admitted under our eyes: nothing to keep"
        );
        // And this node's own new spec awaiting re-admission keeps its mesh.
        let mut me2 = me.clone();
        me2.spec.public_key = Key([8; 32]).to_base64();
        me2.metadata.generation = Some(3);
        assert_eq!(
            plan_after("a1", &[me2.clone(), b.clone()], Some(&before)),
            before
        );
        assert_eq!(
            plan_after("a1", &[me2, b.clone()], None),
            MeshPlan::default()
        );
        // A refusal is not pending: the peer goes.
        let mut refused = b2;
        if let Some(s) = refused.status.as_mut() {
            s.conditions[0].status = "False".into();
        }
        assert!(plan_after("a1", &[me, refused], Some(&before))
            .peers
            .is_empty());
    }
}
