//! The device's configuration as plain data, and the pure step from one configuration to the
//! next. Both the UAPI (`wg set`) and, later, the control plane produce a [`DeviceConfig`];
//! the runtime then reconciles to it, so there is exactly one way configuration changes.

use std::net::SocketAddr;

use ip_network::IpNetwork;

use crate::key::Key;
use crate::uapi::{AllowedIpChange, SetRequest};

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

/// Side effects a `set` asks for beyond the new configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetEffects {
    /// Endpoints named explicitly by the request: they replace a roamed endpoint even when
    /// the configured value did not change.
    pub endpoints: Vec<(Key, SocketAddr)>,
    /// Peers whose persistent keepalive went from off to on: they get a keepalive at once,
    /// as wireguard-go does, so the peer learns our endpoint without waiting an interval.
    pub keepalive_started: Vec<Key>,
}

impl DeviceConfig {
    pub fn public_key(&self) -> Option<Key> {
        self.private_key.map(|k| k.public_from_private())
    }

    pub fn peer(&self, key: &Key) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.public_key == *key)
    }

    /// Applies a parsed request the way wireguard-go does, returning the new configuration
    /// and the effects to carry out. Infallible: everything that can be wrong was rejected
    /// while parsing.
    pub fn apply(&self, req: &SetRequest) -> (DeviceConfig, SetEffects) {
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
            for op in &change.allowed_ips {
                match op {
                    AllowedIpChange::ReplaceAll => next.peers[i].allowed_ips.clear(),
                    AllowedIpChange::Add(net) => {
                        for (j, other) in next.peers.iter_mut().enumerate() {
                            if j != i {
                                other.allowed_ips.retain(|n| n != net);
                            }
                        }
                        let mine = &mut next.peers[i].allowed_ips;
                        if !mine.contains(net) {
                            mine.push(*net);
                        }
                    }
                }
            }
        }
        (next, effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::parse_set;

    fn k(b: u8) -> Key {
        Key([b; 32])
    }

    fn set(cfg: &DeviceConfig, text: &str) -> (DeviceConfig, SetEffects) {
        cfg.apply(&parse_set(text.lines()).expect("valid request"))
    }

    #[test]
    fn adds_updates_and_removes_peers() {
        let base = DeviceConfig::default();
        let text = format!(
            "listen_port=1000\npublic_key={}\nallowed_ip=10.0.0.0/24\nendpoint=1.1.1.1:1\n\
             persistent_keepalive_interval=5\npublic_key={}\nallowed_ip=10.0.1.0/24",
            k(1).to_hex(),
            k(2).to_hex()
        );
        let (cfg, fx) = set(&base, &text);
        assert_eq!(cfg.listen_port, 1000);
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(fx.keepalive_started, vec![k(1)]);
        assert_eq!(fx.endpoints, vec![(k(1), "1.1.1.1:1".parse().unwrap())]);

        let (cfg2, fx2) = set(&cfg, &format!("public_key={}\nremove=true", k(1).to_hex()));
        assert_eq!(cfg2.peers.len(), 1);
        assert_eq!(cfg2.peers[0].public_key, k(2));
        assert_eq!(fx2, SetEffects::default());
    }

    #[test]
    fn an_allowed_ip_moves_to_the_peer_that_claims_it_last() {
        let text = format!(
            "public_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.9.0.0/16\n\
             public_key={}\nallowed_ip=10.0.0.0/24",
            k(1).to_hex(),
            k(2).to_hex()
        );
        let (cfg, _) = set(&DeviceConfig::default(), &text);
        assert_eq!(cfg.peer(&k(1)).unwrap().allowed_ips.len(), 1);
        assert_eq!(
            cfg.peer(&k(2)).unwrap().allowed_ips,
            vec!["10.0.0.0/24".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn replace_allowed_ips_clears_only_what_came_before() {
        let text = format!(
            "public_key={0}\nallowed_ip=10.0.0.0/24\npublic_key={0}\nallowed_ip=10.1.0.0/24\n\
             replace_allowed_ips=true\nallowed_ip=10.2.0.0/24",
            k(1).to_hex()
        );
        let (cfg, _) = set(&DeviceConfig::default(), &text);
        assert_eq!(
            cfg.peers[0].allowed_ips,
            vec!["10.2.0.0/24".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn update_only_never_creates_and_replace_peers_clears() {
        let (cfg, _) = set(
            &DeviceConfig::default(),
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.0/8",
                k(1).to_hex()
            ),
        );
        assert!(cfg.peers.is_empty());

        let (cfg, _) = set(&cfg, &format!("public_key={}", k(1).to_hex()));
        let (cfg, _) = set(
            &cfg,
            &format!("replace_peers=true\npublic_key={}", k(2).to_hex()),
        );
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].public_key, k(2));
    }

    #[test]
    fn zero_keys_clear_and_own_key_is_never_a_peer() {
        let private = k(9);
        let own = private.public_from_private();
        let text = format!(
            "private_key={}\npublic_key={}\npublic_key={}\npreshared_key={}",
            private.to_hex(),
            own.to_hex(),
            k(1).to_hex(),
            k(3).to_hex()
        );
        let (cfg, _) = set(&DeviceConfig::default(), &text);
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].preshared_key, Some(k(3)));

        let text = format!(
            "private_key={}\npublic_key={}\npreshared_key={}",
            Key::ZERO.to_hex(),
            k(1).to_hex(),
            Key::ZERO.to_hex()
        );
        let (cfg, _) = set(&cfg, &text);
        assert_eq!(cfg.private_key, None);
        assert_eq!(cfg.peers[0].preshared_key, None);
    }
}
