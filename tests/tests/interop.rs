//! isthmus against isthmus and against wireguard-go, each side as initiator, underlay IPv4
//! and IPv6, inner IPv4 and IPv6: ping and a checked TCP stream both ways, then what
//! `wg show` reports on both sides.

use std::time::{SystemTime, UNIX_EPOCH};

use isthmus_tests::pair::{Host, Impl, Pair, Underlay};
use isthmus_tests::traffic::{ping, tcp_transfer};

const STREAM: u64 = 16 << 20;

fn check_show(host: &Host, other: &Host, underlay: Underlay) {
    let dump = host.dump().expect("wg show dump");
    assert_eq!(dump.public_key, host.keys.public);
    assert_eq!(dump.private_key, host.keys.private);
    assert_eq!(dump.listen_port, host.port.to_string());
    assert_eq!(dump.fwmark, "off");
    assert_eq!(dump.peers.len(), 1);
    let peer = dump
        .peer(&other.keys.public)
        .expect("the other host is a peer");
    assert_eq!(peer.endpoint, other.endpoint(underlay));
    assert_eq!(
        peer.allowed_ips,
        format!("{}/32,{}/128", other.inner_v4(), other.inner_v6())
    );
    assert_eq!(peer.preshared_key, "(none)");
    assert_eq!(peer.persistent_keepalive, "off");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        peer.latest_handshake > 0 && now.abs_diff(peer.latest_handshake) < 120,
        "latest handshake {} is not recent ({now})",
        peer.latest_handshake
    );
    assert!(
        peer.rx_bytes > STREAM,
        "rx {} after a {STREAM}-byte stream",
        peer.rx_bytes
    );
    assert!(
        peer.tx_bytes > STREAM,
        "tx {} after a {STREAM}-byte stream",
        peer.tx_bytes
    );
}

fn exercise(a: Impl, b: Impl, underlay: Underlay) {
    for initiator in [1, 2] {
        let pair = Pair::new(a, b, underlay).expect("pair");
        let (first, second) = if initiator == 1 {
            (&pair.a, &pair.b)
        } else {
            (&pair.b, &pair.a)
        };
        let ctx = format!("{a:?}<->{b:?} {underlay:?}, host {initiator} initiates");
        assert!(
            ping(&first.ns, second.inner_v4(), 3),
            "{ctx}: ping v4\n{}",
            pair.logs()
        );
        assert!(
            ping(&second.ns, first.inner_v6(), 3),
            "{ctx}: ping v6 back\n{}",
            pair.logs()
        );
        tcp_transfer(&first.ns, &second.ns, second.inner_v4(), STREAM)
            .unwrap_or_else(|e| panic!("{ctx}: TCP over inner v4: {e:#}\n{}", pair.logs()));
        tcp_transfer(&second.ns, &first.ns, first.inner_v6(), STREAM)
            .unwrap_or_else(|e| panic!("{ctx}: TCP over inner v6: {e:#}\n{}", pair.logs()));
        check_show(first, second, underlay);
        check_show(second, first, underlay);
    }
}

#[test]
fn isthmus_with_isthmus_over_ipv4() {
    exercise(Impl::Isthmus, Impl::Isthmus, Underlay::V4);
}

#[test]
fn isthmus_with_isthmus_over_ipv6() {
    exercise(Impl::Isthmus, Impl::Isthmus, Underlay::V6);
}

#[test]
fn isthmus_with_wireguard_go_over_ipv4() {
    exercise(Impl::Isthmus, Impl::WireguardGo, Underlay::V4);
}

#[test]
fn isthmus_with_wireguard_go_over_ipv6() {
    exercise(Impl::Isthmus, Impl::WireguardGo, Underlay::V6);
}

#[test]
fn isthmus_with_debian_wireguard_go() {
    exercise(Impl::Isthmus, Impl::WireguardGoDebian, Underlay::V4);
}
