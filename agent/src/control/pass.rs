//! One pass of the agent's loop, decided: from what the pass observed (every WireGuardPeer,
//! flannel's device) and what the agent last applied, to what it should do. Pure, so the
//! rules are tested in a table; `run` observes before and applies after.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ip_network::{Ipv4Network, Ipv6Network};
use isthmus_api::WireGuardPeer;
use isthmus_routing::model::{EntryKey, Value};
use isthmus_routing::plan::{self as routing_plan, Devices, Remote, Settings};
use isthmus_routing::Mode;
use isthmus_wg::snat::{Rewrite4, Rewrite6, SourceRewrite};
use isthmus_wg::Key;
use kube::ResourceExt;

use super::mesh::{self, MeshPlan};
use super::probe::{Target, Targets};

/// What a pass needs that stays put while the agent runs: options, and what the agent
/// found once at start.
#[derive(Clone, Debug)]
pub struct Fixed {
    pub node_name: String,
    pub routing: Settings,
    /// The tunnel device's index.
    pub tun_index: u32,
    pub tunnel_mtu: u16,
}

/// A mesh to apply, and what must move with it.
#[derive(Debug, PartialEq)]
pub struct MeshStep {
    pub plan: MeshPlan,
    /// The tunnel's addresses differ from the ones applied: set them (`plan.address` and
    /// `plan.address6`) first.
    pub set_address: bool,
    pub source_rewrite: Option<SourceRewrite>,
}

/// The mesh to apply, or `None` while the one applied is still right: only a changed plan
/// touches the tunnel.
pub fn mesh<P: Borrow<WireGuardPeer>>(
    fixed: &Fixed,
    peers: &[P],
    applied: Option<&MeshPlan>,
) -> Option<MeshStep> {
    let plan = mesh::plan_after(&fixed.node_name, peers, applied);
    if applied == Some(&plan) {
        return None;
    }
    Some(MeshStep {
        set_address: applied.map(|a| (a.address, a.address6))
            != Some((plan.address, plan.address6)),
        source_rewrite: source_rewrite(fixed.routing.mode, plan.address, plan.address6),
        plan,
    })
}

/// In `vxlan` mode, flannel's packets to mesh IPs leave with our mesh IP of their family as
/// source: `flannel.1`'s to IPv4 mesh IPs, and in a dual-stack mesh `flannel-v6.1`'s to
/// IPv6 ones.
fn source_rewrite(
    mode: Mode,
    address: Option<(IpAddr, u8)>,
    address6: Option<(IpAddr, u8)>,
) -> Option<SourceRewrite> {
    if mode != Mode::Vxlan {
        return None;
    }
    let v4 = match address {
        Some((IpAddr::V4(ip), prefix)) => Some(Rewrite4 {
            mesh: Ipv4Network::new_truncate(ip, prefix).ok()?,
            to: ip,
        }),
        _ => None,
    };
    // A single IPv6 pool (`--mesh-cidr` IPv6) puts the IPv6 mesh IP in `address`.
    let v6 = match address6.or(address) {
        Some((IpAddr::V6(ip), prefix)) => Some(Rewrite6 {
            mesh: Ipv6Network::new_truncate(ip, prefix).ok()?,
            to: ip,
        }),
        _ => None,
    };
    let rewrite = SourceRewrite { v4, v6 };
    (!rewrite.is_empty()).then_some(rewrite)
}

/// What routing should hold for the mesh applied, given flannel's IPv4 and IPv6 VXLAN
/// devices (each `None` when it is not there), with the path MTUs measured so far (by node
/// name).
pub fn routing(
    fixed: &Fixed,
    (vxlan, vxlan6): (Option<u32>, Option<u32>),
    applied: Option<&MeshPlan>,
    path_mtus: &BTreeMap<String, u16>,
) -> BTreeMap<EntryKey, Value> {
    let remotes: Vec<Remote> = applied
        .map(|p| p.remotes.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| Remote {
            path_mtu: path_mtus.get(&r.name).copied(),
            ..r.clone()
        })
        .collect();
    let devices = Devices {
        vxlan,
        vxlan6,
        tun: fixed.tun_index,
    };
    routing_plan::desired(&fixed.routing, devices, fixed.tunnel_mtu, &remotes)
}

/// What path MTU discovery should probe for the mesh applied: our mesh IP and every remote
/// node, each below the smaller of the two tunnels' MTUs.
pub fn probe_targets(fixed: &Fixed, applied: Option<&MeshPlan>) -> Targets {
    let Some(plan) = applied else {
        return Targets::default();
    };
    let remotes = plan
        .remotes
        .iter()
        .filter_map(|r| {
            let public_key = plan
                .names
                .iter()
                .find(|(_, name)| **name == r.name)
                .map(|(k, _)| *k)?;
            Some(Target {
                name: r.name.clone(),
                public_key,
                mesh_ip: r.mesh_ip,
                ceiling: Remote {
                    path_mtu: None,
                    ..r.clone()
                }
                .path_mtu(fixed.tunnel_mtu),
            })
        })
        .collect();
    Targets {
        own: plan.address.map(|(ip, _)| ip),
        remotes,
    }
}

/// The path MTU the engine clamps TCP SYNs to, per remote peer: what probing measured, else
/// the smaller of the two tunnels' MTUs — the same value the routes to that peer carry.
pub fn clamp_mtus(targets: &Targets, path_mtus: &BTreeMap<String, u16>) -> Vec<(Key, u16)> {
    targets
        .remotes
        .iter()
        .map(|t| {
            let measured = path_mtus.get(&t.name).copied().unwrap_or(t.ceiling);
            (t.public_key, measured.min(t.ceiling))
        })
        .collect()
}

/// This node's own WireGuardPeer among `peers`.
pub fn own_peer<'a, P: Borrow<WireGuardPeer>>(
    node_name: &str,
    peers: &'a [P],
) -> Option<&'a WireGuardPeer> {
    peers
        .iter()
        .map(Borrow::borrow)
        .find(|p| p.name_any() == node_name)
}

/// Our answer to the key challenge our peer's status carries (`None`: not challenged yet,
/// or the coordinator's key is unusable), proving we hold `private_key`.
pub fn key_proof<P: Borrow<WireGuardPeer>>(
    node_name: &str,
    peers: &[P],
    private_key: &Key,
) -> Option<String> {
    let own = own_peer(node_name, peers)?;
    let challenge = own.status.as_ref()?.key_challenge.as_ref()?;
    isthmus_api::proof::answer(
        &private_key.0,
        &challenge.coordinator_key,
        node_name,
        &challenge.nonce,
    )
}

/// Whether to publish our WireGuardPeer again: our VTEP changed, or our peer is gone
/// (deleted by hand, or a fresh API server), or its published key is not the key in use
/// (`public_key`, base64: a rotation whose publish failed is published again), or it does
/// not carry `proof`, our answer to its key challenge.
pub fn republish<P: Borrow<WireGuardPeer>>(
    node_name: &str,
    peers: &[P],
    vtep_changed: bool,
    public_key: &str,
    proof: Option<&str>,
) -> bool {
    let own = own_peer(node_name, peers);
    vtep_changed
        || own.is_none_or(|p| {
            p.spec.public_key != public_key
                || (proof.is_some() && p.spec.key_proof.as_deref() != proof)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::mesh::tests::peer;

    fn fixed(mode: Mode) -> Fixed {
        Fixed {
            node_name: "a1".into(),
            routing: Settings {
                mode,
                table: 51820,
                rule_priority: 5210,
            },
            tun_index: 7,
            tunnel_mtu: 1420,
        }
    }

    /// Which families the VXLAN source rewrite covers: `vxlan` mode only, each family with
    /// a mesh IP of its own.
    #[test]
    fn the_source_rewrite_covers_each_family_with_a_mesh_ip() {
        let v4 = Some(("100.96.0.1".parse().unwrap(), 16));
        let v6 = Some(("fd96::1".parse().unwrap(), 64));
        let r4 = Some(Rewrite4 {
            mesh: "100.96.0.0/16".parse().unwrap(),
            to: "100.96.0.1".parse().unwrap(),
        });
        let r6 = Some(Rewrite6 {
            mesh: "fd96::/64".parse().unwrap(),
            to: "fd96::1".parse().unwrap(),
        });
        // (mode, address, address6, expected)
        let cases = [
            (Mode::Vxlan, v4, None, Some((r4, None))),
            (Mode::Vxlan, v4, v6, Some((r4, r6))),
            (Mode::Vxlan, v6, None, Some((None, r6))),
            (Mode::Vxlan, None, None, None),
            (Mode::Routed, v4, v6, None),
        ];
        for (mode, address, address6, want) in cases {
            let want = want.map(|(v4, v6)| SourceRewrite { v4, v6 });
            assert_eq!(
                source_rewrite(mode, address, address6),
                want,
                "{mode:?} {address:?} {address6:?}"
            );
        }
    }

    #[test]
    fn only_a_changed_plan_touches_the_tunnel() {
        let a1 = peer("a1", 1, "old", Some("100.96.0.1"), true);
        let a1_waiting = peer("a1", 1, "old", None, false);
        let b1 = peer("b1", 3, "new", Some("100.96.0.3"), true);
        let b2 = peer("b2", 4, "new", Some("100.96.0.4"), true);
        let plan = |peers: &[WireGuardPeer]| mesh::plan("a1", peers);
        let admitted = plan(&[a1.clone(), b1.clone()]);
        let rewrite = Some(SourceRewrite {
            v4: Some(Rewrite4 {
                mesh: "100.96.0.0/16".parse().unwrap(),
                to: "100.96.0.1".parse().unwrap(),
            }),
            v6: None,
        });
        // (case, mode, peers now, plan applied, expected: (set address, source rewrite))
        type Case<'a> = (
            &'a str,
            Mode,
            Vec<WireGuardPeer>,
            Option<MeshPlan>,
            Option<(bool, Option<SourceRewrite>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "first pass, not admitted",
                Mode::Vxlan,
                vec![a1_waiting.clone()],
                None,
                Some((true, None)),
            ),
            (
                "still not admitted",
                Mode::Vxlan,
                vec![a1_waiting.clone()],
                Some(plan(&[a1_waiting])),
                None,
            ),
            (
                "admitted: address and rewrite",
                Mode::Vxlan,
                vec![a1.clone(), b1.clone()],
                Some(MeshPlan::default()),
                Some((true, rewrite)),
            ),
            (
                "admitted, routed: no rewrite",
                Mode::Routed,
                vec![a1.clone(), b1.clone()],
                Some(MeshPlan::default()),
                Some((true, None)),
            ),
            (
                "nothing changed",
                Mode::Vxlan,
                vec![a1.clone(), b1.clone()],
                Some(admitted.clone()),
                None,
            ),
            (
                "a peer joins, address stays",
                Mode::Vxlan,
                vec![a1, b1, b2],
                Some(admitted),
                Some((false, rewrite)),
            ),
        ];
        for (case, mode, peers, applied, want) in cases {
            let step = mesh(&fixed(mode), &peers, applied.as_ref());
            if let Some(s) = &step {
                assert_eq!(s.plan, plan(&peers), "{case}");
            }
            let got = step.map(|s| (s.set_address, s.source_rewrite));
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn syns_are_clamped_to_the_measured_path_else_the_smaller_tunnel() {
        let peers = [
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
            peer("b2", 4, "new", Some("100.96.0.4"), true),
        ];
        let applied = mesh::plan("a1", &peers);
        let targets = probe_targets(&fixed(Mode::Vxlan), Some(&applied));
        let key = |name: &str| {
            targets
                .remotes
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.public_key)
                .unwrap()
        };
        // (measured per node, expected clamp for b1 and b2)
        type Case<'a> = (&'a [(&'a str, u16)], [u16; 2]);
        let cases: [Case; 3] = [
            (&[], [1420, 1420]),
            (&[("b1", 1240)], [1240, 1420]),
            // A stale measurement above the tunnels' MTU never raises the clamp.
            (&[("b1", 1232), ("b2", 9000)], [1232, 1420]),
        ];
        for (measured, want) in cases {
            let measured: BTreeMap<String, u16> =
                measured.iter().map(|(n, m)| (n.to_string(), *m)).collect();
            let got: BTreeMap<Key, u16> = clamp_mtus(&targets, &measured).into_iter().collect();
            assert_eq!(
                got,
                BTreeMap::from([(key("b1"), want[0]), (key("b2"), want[1])]),
                "{measured:?}"
            );
        }
    }

    #[test]
    fn routing_follows_the_applied_plan_only() {
        let peers = [
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
        ];
        let applied = mesh::plan("a1", &peers);
        let routed = fixed(Mode::Routed);
        let none = BTreeMap::new();
        assert!(
            routing(&routed, (None, None), None, &none).is_empty(),
            "nothing applied, nothing routed"
        );
        assert_eq!(
            routing(&routed, (None, None), Some(&applied), &none),
            routing_plan::desired(
                &routed.routing,
                Devices {
                    vxlan: None,
                    vxlan6: None,
                    tun: 7
                },
                1420,
                &applied.remotes
            )
        );
        assert!(!routing(&routed, (None, None), Some(&applied), &none).is_empty());
        let vxlan = fixed(Mode::Vxlan);
        let render = |m: BTreeMap<EntryKey, Value>| -> Vec<String> {
            m.iter().map(|(k, v)| format!("{k}: {v}")).collect()
        };
        assert_eq!(
            render(routing(&vxlan, (None, None), Some(&applied), &none)),
            vec!["route 100.96.0.3/32 table 254: dev #7 proto 4 mtu 1420"],
            "no flannel device yet: only the host route to the remote's mesh IP"
        );
        assert!(
            routing(&vxlan, (Some(9), None), Some(&applied), &none).len() > 1,
            "flannel's device, once found, carries the entries"
        );
        // A measured path clamps both the pods' route and the host route.
        let measured = BTreeMap::from([("b1".to_string(), 1240u16)]);
        let got = render(routing(&vxlan, (Some(9), None), Some(&applied), &measured));
        assert!(
            got.iter()
                .any(|l| l.starts_with("route 10.244.3.0/24") && l.ends_with("mtu 1190")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|l| l.starts_with("route 100.96.0.3/32") && l.ends_with("mtu 1240")),
            "{got:?}"
        );
    }

    #[test]
    fn probes_go_to_remote_nodes_below_the_smaller_tunnel() {
        let peers = [
            peer("a1", 1, "old", Some("100.96.0.1"), true),
            peer("a2", 2, "old", Some("100.96.0.2"), true),
            peer("b1", 3, "new", Some("100.96.0.3"), true),
        ];
        let applied = mesh::plan("a1", &peers);
        let mut small = fixed(Mode::Vxlan);
        small.tunnel_mtu = 1320;
        let t = probe_targets(&small, Some(&applied));
        assert_eq!(t.own, Some("100.96.0.1".parse().unwrap()));
        let got: Vec<_> = t
            .remotes
            .iter()
            .map(|r| (r.name.as_str(), r.mesh_ip.to_string(), r.ceiling))
            .collect();
        assert_eq!(got, vec![("b1", "100.96.0.3".to_string(), 1320)]);
        assert_eq!(probe_targets(&small, None), Targets::default());
    }

    #[test]
    fn republish_when_our_peer_is_gone_our_vtep_moved_or_our_proof_is_due() {
        let a1 = peer("a1", 1, "old", Some("100.96.0.1"), true);
        let b1 = peer("b1", 3, "new", Some("100.96.0.3"), true);
        let key = a1.spec.public_key.clone();
        let rotated = Key([7; 32]).to_base64();
        let mut answered = a1.clone();
        answered.spec.key_proof = Some("proof".into());
        // (peers, vtep changed, key in use, our answer to the challenge, republish?)
        let cases = [
            (vec![a1.clone(), b1.clone()], false, &key, None, false),
            (vec![a1.clone()], true, &key, None, true),
            (vec![b1.clone()], false, &key, None, true),
            (vec![], false, &key, None, true),
            (vec![a1.clone()], false, &rotated, None, true),
            (vec![a1.clone()], false, &key, Some("proof"), true),
            (vec![answered.clone()], false, &key, Some("proof"), false),
            (vec![answered.clone()], false, &rotated, Some("proof"), true),
            (vec![answered], false, &key, Some("another"), true),
        ];
        for (i, (peers, vtep_changed, key, proof, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                republish("a1", &peers, vtep_changed, key, proof),
                want,
                "case {i}"
            );
        }
    }

    #[test]
    fn the_answer_is_to_our_own_challenge_and_verifies() {
        let coordinator = isthmus_api::proof::generate_private();
        let private = Key::generate_private();
        let nonce = "bm9uY2U=".to_string();
        let mut a1 = peer("a1", 1, "old", Some("100.96.0.1"), true);
        assert_eq!(key_proof("a1", std::slice::from_ref(&a1), &private), None);
        a1.status.get_or_insert_default().key_challenge = Some(isthmus_api::KeyChallenge {
            coordinator_key: isthmus_api::proof::public_key_base64(&coordinator),
            nonce: nonce.clone(),
            issued: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        });
        let b1 = peer("b1", 3, "new", Some("100.96.0.3"), true);
        let proof = key_proof("a1", &[b1.clone(), a1], &private).unwrap();
        let public = private.public_from_private().to_base64();
        assert!(isthmus_api::proof::verify(
            &coordinator,
            &public,
            "a1",
            &nonce,
            &proof
        ));
        assert_eq!(key_proof("a1", &[b1], &private), None);
    }
}
