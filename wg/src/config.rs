//! The device's configuration as plain data, the change requests that move it, and the one
//! pure step from one configuration to the next ([`DeviceConfig::apply`]). `wg set` (parsed
//! by the UAPI) and the control plane (through [`Change::sync`]) both speak [`Change`], so
//! there is exactly one way configuration changes.

use std::collections::HashMap;
use std::net::SocketAddr;

use ip_network::IpNetwork;

use crate::key::Key;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The configured endpoint; the live one may have roamed since.
    pub endpoint: Option<SocketAddr>,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u16,
    /// Unique across peers: adding a prefix to one peer takes it from any other.
    pub allowed_ips: Vec<IpNetwork>,
}

impl PeerConfig {
    pub fn new(public_key: Key) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }

    /// Whether the WireGuard session state must be rebuilt to honour this change.
    pub fn session_params_differ(&self, other: &PeerConfig) -> bool {
        self.preshared_key != other.preshared_key
            || self.persistent_keepalive != other.persistent_keepalive
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    /// 0 = pick a free port.
    pub listen_port: u16,
    pub fwmark: u32,
    /// In the order peers were added.
    pub peers: Vec<PeerConfig>,
}

/// One change to a peer's allowed IPs, in request order (a `ReplaceAll` only clears what
/// came before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedIpChange {
    ReplaceAll,
    Add(IpNetwork),
}

/// The changes to one peer (one `public_key=` section of `wg set`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: Key,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(Key::ZERO)` clears the preshared key.
    pub preshared_key: Option<Key>,
    /// An endpoint named here replaces a roamed one, even when the configured value stays.
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<AllowedIpChange>,
}

impl PeerChange {
    pub fn new(public_key: Key) -> Self {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// A change to the device: what one `wg set` request says, as the engine's value. `None`
/// and empty leave things as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// `Some(Key::ZERO)` removes the private key.
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the mark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

impl Change {
    /// The change that makes `current` run exactly `peers` under `private_key`, keeping its
    /// listen port and fwmark: what `wg syncconf` sends, except that it names only what
    /// differs, so an unchanged peer keeps its roamed endpoint and a keepalive starts only
    /// where it was off. As with `wg`, a configured endpoint is never cleared, only replaced.
    pub fn sync(current: &DeviceConfig, private_key: Key, peers: &[PeerConfig]) -> Change {
        let mut change = Change {
            private_key: Some(private_key),
            ..Change::default()
        };
        for old in &current.peers {
            if !peers.iter().any(|p| p.public_key == old.public_key) {
                let mut remove = PeerChange::new(old.public_key);
                remove.remove = true;
                change.peers.push(remove);
            }
        }
        for want in peers {
            let before = current.peer(&want.public_key);
            let differs = |f: &dyn Fn(&PeerConfig) -> bool| before.is_none_or(f);
            let mut pc = PeerChange::new(want.public_key);
            if differs(&|b| b.preshared_key != want.preshared_key) {
                pc.preshared_key = Some(want.preshared_key.unwrap_or(Key::ZERO));
            }
            if differs(&|b| b.endpoint != want.endpoint) {
                pc.endpoint = want.endpoint;
            }
            if differs(&|b| b.persistent_keepalive != want.persistent_keepalive) {
                pc.persistent_keepalive = Some(want.persistent_keepalive);
            }
            if differs(&|b| b.allowed_ips != want.allowed_ips) {
                pc.allowed_ips.push(AllowedIpChange::ReplaceAll);
                pc.allowed_ips
                    .extend(want.allowed_ips.iter().copied().map(AllowedIpChange::Add));
            }
            change.peers.push(pc);
        }
        change
    }
}

/// Side effects a `set` asks for beyond the new configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetEffects {
    /// Endpoints named explicitly by the request: they replace a roamed endpoint even when
    /// the configured value did not change.
    pub endpoints: Vec<(Key, SocketAddr)>,
    /// Peers whose persistent keepalive went from off to on: they get a keepalive at once,
    /// as wireguard-go does, so the peer learns our endpoint without waiting an interval.
    pub keepalive_started: Vec<Key>,
    /// (old, new): the peer with key `new` is the peer that had `old`, which rotated its
    /// key; the engine keeps the old session beside the new one (see
    /// [`crate::Engine::reconfigure`]). Only the control plane says this, never `wg set`.
    pub successors: Vec<(Key, Key)>,
}

impl DeviceConfig {
    pub fn public_key(&self) -> Option<Key> {
        self.private_key.map(|k| k.public_from_private())
    }

    pub fn peer(&self, key: &Key) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.public_key == *key)
    }

    /// Applies a change the way wireguard-go applies a `set`, returning the new
    /// configuration and the effects to carry out. Infallible: everything that can be wrong
    /// was rejected while the change was made (parsed, for the UAPI).
    pub fn apply(&self, req: &Change) -> (DeviceConfig, SetEffects) {
        let mut next = self.clone();
        let mut effects = SetEffects::default();

        if let Some(k) = req.private_key {
            next.private_key = (!k.is_zero()).then_some(k);
        }
        if let Some(port) = req.listen_port {
            next.listen_port = port;
        }
        if let Some(mark) = req.fwmark {
            next.fwmark = mark;
        }
        if req.replace_peers {
            next.peers.clear();
        }
        // A peer can never be ourselves.
        let own = next.public_key();
        if let Some(own) = own {
            next.peers.retain(|p| p.public_key != own);
        }

        // Which peer holds each prefix: an added prefix moves from its holder in one lookup,
        // so a set of n prefixes costs O(n), not O(n²) (130,560 on one peer took seconds).
        let mut holder: HashMap<IpNetwork, Key> = next
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |n| (*n, p.public_key)))
            .collect();
        for change in &req.peers {
            if Some(change.public_key) == own {
                continue;
            }
            let pos = next
                .peers
                .iter()
                .position(|p| p.public_key == change.public_key);
            if change.remove {
                if let Some(i) = pos {
                    for net in &next.peers[i].allowed_ips {
                        holder.remove(net);
                    }
                    next.peers.remove(i);
                }
                continue;
            }
            let i = match pos {
                Some(i) => i,
                None if change.update_only => continue,
                None => {
                    next.peers.push(PeerConfig::new(change.public_key));
                    next.peers.len() - 1
                }
            };
            let peer = &mut next.peers[i];
            if let Some(psk) = change.preshared_key {
                peer.preshared_key = (!psk.is_zero()).then_some(psk);
            }
            if let Some(ep) = change.endpoint {
                peer.endpoint = Some(ep);
                effects.endpoints.push((change.public_key, ep));
            }
            if let Some(ka) = change.persistent_keepalive {
                if peer.persistent_keepalive == 0 && ka != 0 {
                    effects.keepalive_started.push(change.public_key);
                }
                peer.persistent_keepalive = ka;
            }
            let me = change.public_key;
            for op in &change.allowed_ips {
                match op {
                    AllowedIpChange::ReplaceAll => {
                        for net in next.peers[i].allowed_ips.drain(..) {
                            holder.remove(&net);
                        }
                    }
                    AllowedIpChange::Add(net) => match holder.insert(*net, me) {
                        Some(held) if held == me => {}
                        Some(other) => {
                            if let Some(o) = next.peers.iter_mut().find(|p| p.public_key == other) {
                                o.allowed_ips.retain(|n| n != net);
                            }
                            next.peers[i].allowed_ips.push(*net);
                        }
                        None => next.peers[i].allowed_ips.push(*net),
                    },
                }
            }
        }
        (next, effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> Key {
        Key([b; 32])
    }

    fn peer(b: u8, endpoint: &str, keepalive: u16, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: k(b),
            preshared_key: None,
            endpoint: Some(endpoint.parse().unwrap()),
            persistent_keepalive: keepalive,
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn sorted(mut peers: Vec<PeerConfig>) -> Vec<PeerConfig> {
        peers.sort_by_key(|p| p.public_key);
        peers
    }

    #[test]
    fn sync_reaches_exactly_the_wanted_peers_through_apply() {
        let a = peer(1, "192.0.2.1:1", 25, &["10.0.1.0/24"]);
        let b = peer(2, "192.0.2.2:2", 0, &["10.0.2.0/24"]);
        let c = peer(3, "192.0.2.3:3", 0, &["10.0.3.0/24"]);
        let b_keepalive = PeerConfig {
            persistent_keepalive: 25,
            ..b.clone()
        };
        let a_moved = PeerConfig {
            endpoint: Some("198.51.100.1:1".parse().unwrap()),
            ..a.clone()
        };
        let a_slower = PeerConfig {
            persistent_keepalive: 10,
            ..a.clone()
        };
        let a_takes_b = PeerConfig {
            allowed_ips: vec![
                "10.0.1.0/24".parse().unwrap(),
                "10.0.2.0/24".parse().unwrap(),
            ],
            ..a.clone()
        };
        let b_gives = PeerConfig {
            allowed_ips: Vec::new(),
            ..b.clone()
        };
        let a_psk = PeerConfig {
            preshared_key: Some(k(7)),
            ..a.clone()
        };
        let ep = |p: &PeerConfig| (p.public_key, p.endpoint.unwrap());
        // (case, configured peers, wanted peers, keepalives started, endpoints named)
        type Case = (
            &'static str,
            Vec<PeerConfig>,
            Vec<PeerConfig>,
            Vec<Key>,
            Vec<(Key, SocketAddr)>,
        );
        let cases: Vec<Case> = vec![
            (
                "from nothing",
                vec![],
                vec![a.clone(), b.clone()],
                vec![k(1)],
                vec![ep(&a), ep(&b)],
            ),
            (
                "nothing changed",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                vec![],
                vec![],
            ),
            (
                "keepalive on, a peer joins",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b_keepalive, c.clone()],
                vec![k(2)],
                vec![ep(&c)],
            ),
            (
                "a peer leaves, one moves",
                vec![a.clone(), b.clone()],
                vec![a_moved.clone()],
                vec![],
                vec![ep(&a_moved)],
            ),
            (
                "keepalive changed, not started",
                vec![a.clone()],
                vec![a_slower],
                vec![],
                vec![],
            ),
            (
                "a prefix moves between peers",
                vec![a.clone(), b.clone()],
                vec![a_takes_b, b_gives],
                vec![],
                vec![],
            ),
            (
                "preshared key set",
                vec![a.clone()],
                vec![a_psk.clone()],
                vec![],
                vec![],
            ),
            (
                "preshared key cleared",
                vec![a_psk],
                vec![a.clone()],
                vec![],
                vec![],
            ),
            (
                "everyone leaves",
                vec![a.clone(), b.clone()],
                vec![],
                vec![],
                vec![],
            ),
        ];
        for (case, configured, wanted, started, endpoints) in cases {
            let current = DeviceConfig {
                private_key: Some(k(9)),
                listen_port: 51820,
                fwmark: 7,
                peers: configured,
            };
            let (next, effects) = current.apply(&Change::sync(&current, k(9), &wanted));
            assert_eq!(
                (next.private_key, next.listen_port, next.fwmark),
                (Some(k(9)), 51820, 7),
                "{case}"
            );
            assert_eq!(sorted(next.peers), sorted(wanted), "{case}");
            assert_eq!(effects.keepalive_started, started, "{case}");
            assert_eq!(effects.endpoints, endpoints, "{case}");
        }
    }

    /// `wg set` semantics for allowed IPs, one request per row, applied in turn: a prefix
    /// added to one peer leaves any other; adding it again changes nothing; `replace` and
    /// `remove` free a peer's prefixes for the next holder.
    #[test]
    fn allowed_ips_have_one_holder_across_requests() {
        use AllowedIpChange::{Add, ReplaceAll};
        let net = |n: &str| n.parse::<IpNetwork>().unwrap();
        let add = |b: u8, ops: Vec<AllowedIpChange>| {
            let mut pc = PeerChange::new(k(b));
            pc.allowed_ips = ops;
            pc
        };
        let remove = |b: u8| PeerChange {
            remove: true,
            ..PeerChange::new(k(b))
        };
        // (request, then each peer's prefixes in order, peers in configuration order)
        type Row = (Vec<PeerChange>, Vec<(u8, Vec<&'static str>)>);
        let rows: Vec<Row> = vec![
            (
                vec![add(
                    1,
                    vec![Add(net("10.0.1.0/24")), Add(net("10.0.9.0/24"))],
                )],
                vec![(1, vec!["10.0.1.0/24", "10.0.9.0/24"])],
            ),
            (
                vec![add(
                    2,
                    vec![Add(net("10.0.9.0/24")), Add(net("10.0.9.0/24"))],
                )],
                vec![(1, vec!["10.0.1.0/24"]), (2, vec!["10.0.9.0/24"])],
            ),
            (
                vec![add(1, vec![Add(net("10.0.1.0/24"))])],
                vec![(1, vec!["10.0.1.0/24"]), (2, vec!["10.0.9.0/24"])],
            ),
            (
                vec![add(2, vec![ReplaceAll, Add(net("10.0.2.0/24"))])],
                vec![(1, vec!["10.0.1.0/24"]), (2, vec!["10.0.2.0/24"])],
            ),
            (
                vec![add(1, vec![Add(net("10.0.9.0/24"))]), remove(2)],
                vec![(1, vec!["10.0.1.0/24", "10.0.9.0/24"])],
            ),
            (
                vec![add(3, vec![Add(net("10.0.2.0/24"))])],
                vec![
                    (1, vec!["10.0.1.0/24", "10.0.9.0/24"]),
                    (3, vec!["10.0.2.0/24"]),
                ],
            ),
        ];
        let mut config = DeviceConfig::default();
        for (i, (peers, want)) in rows.into_iter().enumerate() {
            let req = Change {
                peers,
                ..Change::default()
            };
            config = config.apply(&req).0;
            let got: Vec<(u8, Vec<String>)> = config
                .peers
                .iter()
                .map(|p| {
                    let nets = p.allowed_ips.iter().map(|n| n.to_string()).collect();
                    (p.public_key.0[0], nets)
                })
                .collect();
            let want: Vec<(u8, Vec<String>)> = want
                .into_iter()
                .map(|(b, nets)| (b, nets.into_iter().map(String::from).collect()))
                .collect();
            assert_eq!(got, want, "after request {i}");
        }
    }

    #[test]
    fn sync_names_only_what_differs() {
        let a = peer(1, "192.0.2.1:1", 25, &["10.0.1.0/24"]);
        let current = DeviceConfig {
            private_key: Some(k(9)),
            peers: vec![a.clone()],
            ..DeviceConfig::default()
        };
        let change = Change::sync(&current, k(9), std::slice::from_ref(&a));
        assert_eq!(change.peers, vec![PeerChange::new(k(1))]);
        assert_eq!((change.listen_port, change.fwmark), (None, None));
        assert!(!change.replace_peers);

        let (next, effects) = current.apply(&Change::sync(&current, k(8), &[a]));
        assert_eq!(next.private_key, Some(k(8)), "a new node key is taken");
        assert_eq!(effects, SetEffects::default());
    }
}
