//! `wg set` end to end without a socket: request text through [`parse_set`] into
//! [`DeviceConfig::apply`], with wireguard-go's semantics.

use ip_network::IpNetwork;

use crate::config::{DeviceConfig, SetEffects};
use crate::key::Key;
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
