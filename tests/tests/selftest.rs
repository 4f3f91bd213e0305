//! Scenarios ported from the kernel's WireGuard netns selftest
//! (tools/testing/selftests/wireguard/netns.sh) where they apply to a userspace daemon.

use std::time::Duration;

use isthmus_tests::capture::UdpCapture;
use isthmus_tests::pair::{Impl, Pair, Underlay};
use isthmus_tests::traffic::{ping, ping_within, tcp_transfer};
use isthmus_tests::wg::KeyPair;
use isthmus_wg::key::LOW_ORDER_POINTS;

/// netns.sh: "Test that we can change private keys keypairs and retransmit".
#[test]
fn private_key_rotation_rehandshakes() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
    let fresh = KeyPair::generate().unwrap();
    let key_file = pair.dir.path().join("rotated.key");
    std::fs::write(&key_file, &fresh.private).unwrap();
    pair.a
        .wg(&[
            "set",
            &pair.a.iface,
            "private-key",
            &key_file.display().to_string(),
        ])
        .unwrap();
    // b learns the new public key the way an operator would tell it.
    pair.b
        .wg(&["set", &pair.b.iface, "peer", &pair.a.keys.public, "remove"])
        .unwrap();
    let allowed = format!("{}/32", pair.a.inner_v4());
    let endpoint = pair.a.endpoint(Underlay::V4);
    pair.b
        .wg(&[
            "set",
            &pair.b.iface,
            "peer",
            &fresh.public,
            "allowed-ips",
            &allowed,
            "endpoint",
            &endpoint,
        ])
        .unwrap();
    assert_eq!(pair.a.dump().unwrap().public_key, fresh.public);
    assert!(
        ping_within(&pair.a.ns, pair.b.inner_v4(), Duration::from_secs(12)),
        "{}",
        pair.logs()
    );
    assert!(ping(&pair.b.ns, pair.a.inner_v4(), 2));
}

/// netns.sh: allowed-ips replacement: traffic to the old prefix stops, the new one works.
#[test]
fn replacing_allowed_ips_reroutes() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    b.ns.ip(&["addr", "add", "10.252.0.2/24", "dev", &b.iface])
        .unwrap();
    a.ns.ip(&["route", "add", "10.252.0.0/24", "dev", &a.iface])
        .unwrap();
    pair.b
        .wg(&[
            "set",
            &b.iface,
            "peer",
            &a.keys.public,
            "allowed-ips",
            "10.251.0.1/32,10.252.0.0/24",
        ])
        .unwrap();
    let peer = b.keys.public.as_str();
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        peer,
        "allowed-ips",
        "10.252.0.0/24",
    ])
    .unwrap();
    let dst = "10.252.0.2".parse().unwrap();
    // From a's address in 10.251/24: b routes the reply back via a's allowed 10.251.0.1/32.
    assert!(ping(&a.ns, dst, 2), "new prefix\n{}", pair.logs());
    assert!(!ping(&a.ns, b.inner_v4(), 1), "old prefix still routed");
    assert_eq!(a.dump().unwrap().peers[0].allowed_ips, "10.252.0.0/24");
}

/// netns.sh: big pings at the MTU with DF, and a flood: nothing lost, nothing fragmented.
#[test]
fn full_mtu_and_flood_pings() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V6).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    // 1420 MTU - 20 (IPv4) - 8 (ICMP) = 1392 bytes of payload; 1420 - 40 - 8 for IPv6.
    let v4 = b.inner_v4().to_string();
    let v6 = b.inner_v6().to_string();
    a.ns.exec(
        "ping",
        &[
            "-q", "-c", "5", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1392", &v4,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
    a.ns.exec(
        "ping",
        &[
            "-q", "-c", "5", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1372", &v6,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
    // One byte over the MTU is refused locally, not sent broken.
    assert!(a
        .ns
        .exec(
            "ping",
            &["-q", "-c", "1", "-W", "1", "-M", "do", "-s", "1393", &v4]
        )
        .is_err());
    let flood =
        a.ns.exec("ping", &["-q", "-f", "-c", "2000", "-W", "1", &v4])
            .unwrap_or_else(|e| panic!("flood ping: {e:#}\n{}", pair.logs()));
    assert!(flood.contains(" 0% packet loss"), "{flood}");
}

/// netns.sh: the device is reconfigured wholesale (`wg setconf` = replace_peers) while a
/// session exists; the peer that stays keeps working.
#[test]
fn setconf_replaces_peers_and_keeps_working() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    let ghost = KeyPair::generate().unwrap();
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.9.9.0/24\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = {}/32\nEndpoint = {}\n",
        a.keys.private,
        a.port,
        ghost.public,
        b.keys.public,
        b.inner_v4(),
        b.endpoint(Underlay::V4)
    );
    let path = pair.dir.path().join("a.conf");
    std::fs::write(&path, conf).unwrap();
    a.wg(&["setconf", &a.iface, &path.display().to_string()])
        .unwrap();
    assert_eq!(a.dump().unwrap().peers.len(), 2);
    tcp_transfer(&a.ns, &b.ns, b.inner_v4(), 4 << 20)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
}

/// netns.sh: "Ensure that we don't send handshakes to low order points": peers whose public
/// key is a small-order point, with a keepalive every second and traffic routed to them,
/// get nothing on their endpoint, and are still listed.
#[test]
fn no_handshake_is_sent_to_low_order_points() {
    let pair = Pair::unconnected(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let host = &pair.a;
    let capture = UdpCapture::start(&host.ns, 1111).expect("capture");
    for (i, point) in LOW_ORDER_POINTS.iter().enumerate() {
        let allowed = format!("10.253.{i}.0/24");
        let args = [
            "set",
            &host.iface,
            "peer",
            point,
            "persistent-keepalive",
            "1",
            "endpoint",
            "127.0.0.1:1111",
            "allowed-ips",
            &allowed,
        ];
        host.wg(&args)
            .unwrap_or_else(|e| panic!("wg set peer {point}: {e:#}"));
    }
    host.ns
        .ip(&["route", "add", "10.253.0.0/16", "dev", &host.iface])
        .expect("route");
    for i in 0..LOW_ORDER_POINTS.len() {
        // No reply can come; what matters is that nothing leaves.
        let _ = ping(&host.ns, format!("10.253.{i}.1").parse().unwrap(), 1);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let seen = capture.stop().expect("capture");
    assert!(
        seen.is_empty(),
        "datagrams to the low-order peers' endpoint: {seen:?}\n{}",
        pair.logs()
    );
    let dump = host.dump().expect("wg show still answers");
    for point in LOW_ORDER_POINTS {
        assert!(dump.peer(point).is_some(), "{point} not listed");
    }
}
