//! Cryptokey routing and keys: a peer cannot spoof sources outside its allowed IPs, a
//! removed peer stops at once, and wrong keys never yield a session (nor hurt the daemon).

use std::time::Duration;

use isthmus_tests::daemon::wait_until;
use isthmus_tests::pair::{Impl, Pair, Underlay};
use isthmus_tests::traffic::{ping, ping_from, ping_within};
use isthmus_tests::wg::{genpsk, KeyPair};

/// Packets the daemon has written into its TUN device (the interface's receive side).
fn tun_rx_packets(host: &isthmus_tests::pair::Host) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/rx_packets", host.iface);
    host.ns
        .exec("cat", &[&path])
        .expect("TUN statistics")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&b.ns, a.inner_v4(), 2), "baseline\n{}", pair.logs());
    // wireguard-go encrypts whatever source we give it; isthmus must refuse it.
    b.ns.ip(&["addr", "add", "10.251.0.99/24", "dev", &b.iface])
        .unwrap();
    let spoofed = "10.251.0.99".parse().unwrap();
    let delivered_before = tun_rx_packets(a);
    assert!(
        !ping_from(&b.ns, a.inner_v4(), 3, Some(spoofed)),
        "a packet from outside the peer's allowed IPs got through"
    );
    assert_eq!(
        tun_rx_packets(a),
        delivered_before,
        "spoofed packets were written to isthmus's TUN device"
    );
    assert!(
        wait_until(Duration::from_secs(3), || a
            .daemon
            .log()
            .contains("source_not_allowed")),
        "no log line for the spoofed packets:\n{}",
        a.daemon.log()
    );
    // The legitimate source still works.
    assert!(ping(&b.ns, a.inner_v4(), 2));
}

#[test]
fn removed_peer_stops_passing_traffic_at_once() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 2), "baseline\n{}", pair.logs());
    a.wg(&["set", &a.iface, "peer", &b.keys.public, "remove"])
        .unwrap();
    assert!(a.dump().unwrap().peers.is_empty());
    assert!(
        !ping(&a.ns, b.inner_v4(), 1),
        "traffic out to a removed peer"
    );
    assert!(
        !ping(&b.ns, a.inner_v4(), 2),
        "traffic in from a removed peer"
    );
    // And it comes back when re-added.
    pair.add_peer(a, b, &[]).unwrap();
    assert!(ping(&a.ns, b.inner_v4(), 2), "{}", pair.logs());
}

#[test]
fn wrong_public_key_never_handshakes() {
    let mut pair = Pair::unconnected(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let impostor = KeyPair::generate().unwrap();
    let allowed = format!("{}/32", pair.b.inner_v4());
    let endpoint = pair.b.endpoint(Underlay::V4);
    pair.a
        .wg(&[
            "set",
            &pair.a.iface,
            "peer",
            &impostor.public,
            "allowed-ips",
            &allowed,
            "endpoint",
            &endpoint,
        ])
        .unwrap();
    pair.add_peer(&pair.b, &pair.a, &[]).unwrap();
    assert!(!ping(&pair.a.ns, pair.b.inner_v4(), 2));
    assert!(!ping(&pair.b.ns, pair.a.inner_v4(), 2));
    assert_eq!(pair.a.dump().unwrap().peers[0].latest_handshake, 0);
    assert_eq!(pair.b.dump().unwrap().peers[0].latest_handshake, 0);
    assert!(pair.a.daemon.is_running(), "{}", pair.logs());
    // Healthy: with the right key it works.
    pair.a
        .wg(&["set", &pair.a.iface, "peer", &impostor.public, "remove"])
        .unwrap();
    pair.add_peer(&pair.a, &pair.b, &[]).unwrap();
    assert!(
        ping_within(&pair.a.ns, pair.b.inner_v4(), Duration::from_secs(15)),
        "{}",
        pair.logs()
    );
}

#[test]
fn mismatched_preshared_key_never_handshakes() {
    let mut pair = Pair::unconnected(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (psk_a, psk_b) = (pair.dir.path().join("a.psk"), pair.dir.path().join("b.psk"));
    std::fs::write(&psk_a, genpsk().unwrap()).unwrap();
    std::fs::write(&psk_b, genpsk().unwrap()).unwrap();
    let (psk_a, psk_b) = (psk_a.display().to_string(), psk_b.display().to_string());
    pair.add_peer(&pair.a, &pair.b, &["preshared-key", &psk_a])
        .unwrap();
    pair.add_peer(&pair.b, &pair.a, &["preshared-key", &psk_b])
        .unwrap();
    assert!(!ping(&pair.a.ns, pair.b.inner_v4(), 2));
    assert!(!ping(&pair.b.ns, pair.a.inner_v4(), 2));
    assert_eq!(pair.a.dump().unwrap().peers[0].latest_handshake, 0);
    assert!(pair.a.daemon.is_running(), "{}", pair.logs());
    // Same key on both sides: a session forms at the next handshake retry.
    pair.add_peer(&pair.b, &pair.a, &["preshared-key", &psk_a])
        .unwrap();
    assert!(
        ping_within(&pair.a.ns, pair.b.inner_v4(), Duration::from_secs(15)),
        "{}",
        pair.logs()
    );
    assert!(pair.a.dump().unwrap().peers[0].latest_handshake > 0);
}
