//! isthmus against isthmus and against wireguard-go, each side as initiator, underlay IPv4
//! and IPv6, inner IPv4 and IPv6: ping and a checked TCP stream both ways, then what
//! `wg show` reports on both sides.

use std::time::{SystemTime, UNIX_EPOCH};

use isthmus_tests::capture::UdpCapture;
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
        // The workers ran: the agent says how many it started.
        for (kind, host) in [(a, &pair.a), (b, &pair.b)] {
            if kind == Impl::IsthmusWorkers {
                assert!(
                    host.daemon.log().contains("crypto_workers=3"),
                    "{ctx}: not on 3 crypto workers\n{}",
                    pair.logs()
                );
            }
        }
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

/// One side without TUN offloads: the other's super-segments arrive split into packets it
/// writes one by one, and its single packets arrive to be coalesced.
#[test]
fn isthmus_without_tun_offloads_with_isthmus_with_them() {
    exercise(Impl::IsthmusNoOffload, Impl::Isthmus, Underlay::V4);
}

/// Sealing and opening on the crypto workers (off by default on this 2-core machine), with
/// wireguard-go and with an isthmus doing its crypto inline, over both underlays.
#[test]
fn isthmus_on_crypto_workers_with_wireguard_go_over_ipv4() {
    exercise(Impl::IsthmusWorkers, Impl::WireguardGo, Underlay::V4);
}

#[test]
fn isthmus_on_crypto_workers_with_isthmus_inline_over_ipv6() {
    exercise(Impl::IsthmusWorkers, Impl::Isthmus, Underlay::V6);
}

#[test]
fn isthmus_with_debian_wireguard_go() {
    exercise(Impl::Isthmus, Impl::WireguardGoDebian, Underlay::V4);
}

/// An underlay whose MTU is smaller than the tunnel MTU plus WireGuard's 80 bytes (as on
/// 1460-byte cloud networks with the default 1420): full-size inner packets still cross,
/// the outer datagrams being fragmented, and so does a TCP stream whose segments were
/// batched for UDP GSO (the kernel refuses GSO segments above the MTU; isthmus falls back
/// to one datagram per send).
#[test]
fn full_size_packets_cross_a_smaller_underlay_mtu() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    for host in [&pair.a, &pair.b] {
        host.ns
            .ip(&["link", "set", &host.underlay_if, "mtu", "1400"])
            .expect("underlay MTU");
    }
    let target = pair.b.inner_v4().to_string();
    // 1392 + 8 (ICMP) + 20 (IP) = 1420 bytes inside, 1452 outside: above the 1400 MTU.
    let pinged = pair.a.ns.exec(
        "ping",
        &["-c", "3", "-W", "2", "-s", "1392", "-M", "do", &target],
    );
    assert!(
        pinged.is_ok(),
        "full-size ping: {pinged:?}\n{}",
        pair.logs()
    );
    tcp_transfer(&pair.a.ns, &pair.b.ns, pair.b.inner_v4(), STREAM)
        .unwrap_or_else(|e| panic!("TCP a -> b: {e:#}\n{}", pair.logs()));
    tcp_transfer(&pair.b.ns, &pair.a.ns, pair.a.inner_v4(), STREAM)
        .unwrap_or_else(|e| panic!("TCP b -> a: {e:#}\n{}", pair.logs()));
}

/// WireGuard pads every data message's plaintext to a multiple of 16 bytes (capped at the
/// MTU) so lengths leak less (issue 16): pings of odd sizes from isthmus, as the
/// wireguard-go host receives them on the underlay.
#[test]
fn isthmus_pads_data_messages_on_the_underlay() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
    let capture = UdpCapture::start(&pair.b.ns, pair.b.port).expect("capture");
    let target = pair.b.inner_v4().to_string();
    let sizes = [1usize, 5, 13, 100, 1000];
    for size in sizes {
        let size = size.to_string();
        let args = ["-n", "-q", "-c", "1", "-W", "2", "-s", &size, &target];
        if let Err(e) = pair.a.ns.exec("ping", &args) {
            panic!("ping -s {size}: {e:#}\n{}", pair.logs());
        }
    }
    let seen = capture.stop().expect("capture");
    let data: Vec<usize> = seen
        .iter()
        .filter(|c| c.from.port() == pair.a.port && c.payload.first() == Some(&4))
        .map(|c| c.payload.len())
        .collect();
    for size in sizes {
        // ICMP header 8 and IPv4 header 20 around the ping's payload.
        let wire = 32 + (size + 28).div_ceil(16) * 16;
        assert!(
            data.contains(&wire),
            "no {wire}-byte datagram for a {size}-byte ping among {data:?}"
        );
    }
    assert!(
        data.iter().all(|len| (len - 32) % 16 == 0),
        "unpadded data messages: {data:?}"
    );
}

/// Padding stops at the TUN's MTU as it is now: after `ip link set mtu 1285`, a 1283-byte
/// packet is padded to 1285, not to 1296 as under the MTU it was opened with.
#[test]
fn padding_follows_an_mtu_change() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    a.ns.ip(&["link", "set", &a.iface, "mtu", "1285"])
        .expect("TUN MTU");
    b.ns.ip(&["link", "set", &b.iface, "mtu", "1285"])
        .expect("TUN MTU");
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    // isthmus reads the MTU every timer tick (100 ms).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let capture = UdpCapture::start(&b.ns, b.port).expect("capture");
    let target = b.inner_v4().to_string();
    // 1255 + 8 (ICMP) + 20 (IP) = 1283 bytes inside.
    let args = ["-n", "-q", "-c", "1", "-W", "2", "-s", "1255", &target];
    if let Err(e) = a.ns.exec("ping", &args) {
        panic!("ping: {e:#}\n{}", pair.logs());
    }
    let seen = capture.stop().expect("capture");
    let data: Vec<usize> = seen
        .iter()
        .filter(|c| c.from.port() == a.port && c.payload.first() == Some(&4))
        .map(|c| c.payload.len())
        .collect();
    assert!(data.contains(&(32 + 1285)), "datagrams {data:?}");
}
