//! Issue 16's defect list, the items that need no clock: each test fails on the defect the
//! kernel's selftest or GotaTun's changelog names, driven in memory like `engine_tests`.

use std::net::SocketAddr;

use crate::capture::Output;
use crate::config::{DeviceConfig, PeerConfig, SetEffects};
use crate::drops::DropReason;
use crate::engine::MAX_PACKET;
use crate::engine_tests::{
    deliver, handshake_and_send, pair, sent_lengths, Node, ADDR_A, ADDR_B, ADDR_C,
};
use crate::key::Key;
use crate::packet::{ipv4, udp4, UDP};

fn peer(node: &Node, endpoint: &str, allowed: &[&str]) -> PeerConfig {
    let mut pc = PeerConfig::new(node.public());
    pc.endpoint = Some(endpoint.parse().unwrap());
    pc.allowed_ips = allowed.iter().map(|n| n.parse().unwrap()).collect();
    pc
}

fn set_peers(node: &Node, peers: Vec<PeerConfig>) {
    let cfg = DeviceConfig {
        private_key: Some(node.private),
        listen_port: 51820,
        fwmark: 0,
        peers,
    };
    node.engine
        .reconfigure(cfg, &SetEffects::default(), &node.out);
}

fn send(from: &Node, packet: &[u8]) {
    let mut buf = vec![0u8; MAX_PACKET];
    from.engine.handle_outbound(packet, &mut buf, &from.out);
}

/// The cryptokey reverse-path filter takes the most specific allowed IP: when a's range
/// (10.0.0.0/16) contains c's (10.0.5.0/24), a may not send from c's addresses, and c may.
#[test]
fn a_more_specific_allowed_ip_on_another_peer_owns_its_sources() {
    let (a, b, c) = (Node::new(1), Node::new(2), Node::new(3));
    set_peers(
        &b,
        vec![
            peer(&a, ADDR_A, &["10.0.0.0/16"]),
            peer(&c, ADDR_C, &["10.0.5.0/24"]),
        ],
    );
    a.configure(&b, Some(ADDR_B), &["10.9.0.2/32"]);
    c.configure(&b, Some(ADDR_B), &["10.9.0.2/32"]);

    let from_a_in_cs_range = udp4([10, 0, 5, 7], [10, 9, 0, 2], 30);
    assert!(handshake_and_send(&a, &b, &from_a_in_cs_range).is_empty());
    assert_eq!(b.engine.drops().get(DropReason::SourceNotAllowed), 1);

    let from_a_in_its_own = udp4([10, 0, 6, 7], [10, 9, 0, 2], 30);
    send(&a, &from_a_in_its_own);
    assert_eq!(deliver(&a, &b, ADDR_A), vec![from_a_in_its_own]);

    let from_c = udp4([10, 0, 5, 7], [10, 9, 0, 2], 30);
    send(&c, &from_c);
    assert!(deliver(&c, &b, ADDR_C).is_empty()); // initiation -> response
    assert!(deliver(&b, &c, ADDR_B).is_empty()); // response -> keepalive + queued packet
    assert_eq!(deliver(&c, &b, ADDR_C), vec![from_c]);
    assert_eq!(b.engine.drops().get(DropReason::SourceNotAllowed), 1);
}

/// A preshared key change ends the session keyed without it: nothing more is accepted on
/// the old keys, and traffic resumes after a handshake with the new key on both sides.
#[test]
fn a_preshared_key_change_takes_effect_on_the_live_session() {
    let (a, b) = pair();
    let packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 30);
    assert_eq!(handshake_and_send(&a, &b, &packet), vec![packet.clone()]);

    let psk = Some(Key([0x5a; 32]));
    let with_psk = |node: &Node| {
        let mut cfg = node.engine.config();
        cfg.peers[0].preshared_key = psk;
        node.engine
            .reconfigure(cfg, &SetEffects::default(), &node.out);
    };
    with_psk(&b);
    // a still holds the old session; b must not accept it.
    send(&a, &packet);
    assert!(
        deliver(&a, &b, ADDR_A).is_empty(),
        "a packet on the session keyed before the PSK change was accepted"
    );

    with_psk(&a);
    assert_eq!(handshake_and_send(&a, &b, &packet), vec![packet]);
}

/// An initiation replayed from another address (an on-path attacker's copy) neither moves
/// the peer's endpoint nor gets an answer: only a newer TAI64N timestamp may.
#[test]
fn a_replayed_initiation_neither_moves_the_endpoint_nor_gets_an_answer() {
    let (a, b) = pair();
    send(&a, &udp4([10, 0, 0, 1], [10, 0, 0, 2], 30));
    let outputs = a.out.take();
    let Some(Output::Datagram(_, initiation)) = outputs.first() else {
        panic!("no initiation: {outputs:?}");
    };
    assert_eq!(initiation[0], 1);
    let initiation = initiation.clone();
    let mut buf = vec![0u8; MAX_PACKET];
    let from_a: SocketAddr = ADDR_A.parse().unwrap();
    b.engine
        .handle_inbound(from_a, &initiation, &mut buf, &b.out);
    assert!(deliver(&b, &a, ADDR_B).is_empty()); // response -> a's keepalive + packet
    assert_eq!(deliver(&a, &b, ADDR_A).len(), 1);

    let attacker: SocketAddr = "203.0.113.9:666".parse().unwrap();
    b.engine
        .handle_inbound(attacker, &initiation, &mut buf, &b.out);
    let answered: Vec<_> = b.out.take();
    assert!(answered.is_empty(), "b answered a replay: {answered:?}");
    assert_eq!(b.engine.snapshot().peers[0].endpoint, Some(from_a));

    // Data still flows on the session the replay did not disturb.
    let packet = udp4([10, 0, 0, 2], [10, 0, 0, 1], 30);
    send(&b, &packet);
    match b.out.take().as_slice() {
        [Output::Datagram(to, d)] => {
            assert_eq!((*to, d[0]), (from_a, 4), "data to a's real endpoint");
        }
        other => panic!("{other:?}"),
    }
}

/// Datagrams and packets of any size, up to what UDP GRO and a TSO super-segment hand over
/// and beyond, are dropped or carried, never a panic (GotaTun fixed a GRO-sized panic).
#[test]
fn oversized_datagrams_and_packets_never_panic() {
    let (a, b) = pair();
    handshake_and_send(&a, &b, &udp4([10, 0, 0, 1], [10, 0, 0, 2], 30));
    let mut buf = vec![0u8; MAX_PACKET];
    let from: SocketAddr = ADDR_A.parse().unwrap();
    for len in [65_507, 65_535, MAX_PACKET, MAX_PACKET + 1, 200_000] {
        for kind in 1u8..=4 {
            let mut datagram = vec![0u8; len];
            datagram[0] = kind;
            b.engine.handle_inbound(from, &datagram, &mut buf, &b.out);
        }
        let mut packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 30);
        packet.resize(len, 0);
        a.engine.handle_outbound(&packet, &mut buf, &a.out);
    }
    let written: Vec<_> = b
        .out
        .take()
        .into_iter()
        .filter(|o| matches!(o, Output::Tun(_)))
        .collect();
    assert!(written.is_empty(), "junk reached the TUN");
    // 65,507 and 65,535 bytes seal into one datagram each (65,567 at most); longer ones
    // cannot and are counted.
    let sent = a.out.take();
    assert_eq!(sent.len(), 2, "{} datagrams sent", sent.len());
    assert_eq!(a.engine.drops().get(DropReason::TooBig), 3);
}

/// Two peers whose endpoints lie in each other's allowed IPs: a datagram a sends to b's
/// endpoint comes back through the TUN routed to c, and is not sealed again (nor the other
/// way round); a pod's own UDP to the same address from another port still is.
#[test]
fn own_datagrams_routed_back_into_the_tunnel_are_not_sealed_again() {
    use crate::packet::Udp;

    let (a, b, c) = (Node::new(1), Node::new(2), Node::new(3));
    set_peers(
        &a,
        vec![
            peer(&b, "10.0.3.9:51820", &["10.0.2.0/24"]),
            peer(&c, "10.0.2.9:51820", &["10.0.3.0/24"]),
        ],
    );
    let datagram = |sport: u16, to: &str| {
        let to: SocketAddr = to.parse().unwrap();
        let mut u = Udp::new(false, 148);
        u.src = "10.0.9.1".parse().unwrap();
        u.dst = to.ip();
        u.sport = sport;
        u.dport = to.port();
        u.build()
    };
    send(&a, &datagram(51820, "10.0.3.9:51820"));
    send(&a, &datagram(51820, "10.0.2.9:51820"));
    assert!(a.out.take().is_empty(), "an own datagram was sealed again");
    assert_eq!(a.engine.drops().get(DropReason::RoutingLoop), 2);
    // Another port is someone else's traffic: it goes on (here: a handshake starts).
    send(&a, &datagram(40000, "10.0.3.9:51820"));
    assert_eq!(a.out.take().len(), 1);
    assert_eq!(a.engine.drops().get(DropReason::RoutingLoop), 2);
}

/// netns.sh's route-MTU padding case, as isthmus meets it: toward a peer whose path carries
/// less than the device's MTU (the agent lowers the route to it and tells the engine),
/// padding stops at that path MTU, so a packet that fits the route still fits the path.
/// Without a path MTU the device's MTU caps it, as in wireguard-go.
#[test]
fn padding_stops_at_the_peers_path_mtu() {
    let (a, b) = pair();
    a.engine.set_mtu(1420);
    handshake_and_send(&a, &b, &udp4([10, 0, 0, 1], [10, 0, 0, 2], 30));
    let wire = |len: usize| {
        let packet = ipv4([10, 0, 0, 1], [10, 0, 0, 2], UDP, len);
        send(&a, &packet);
        sent_lengths(&a)
    };
    // (path MTU, packet length, datagram length)
    let cases = [
        (None, 1297, 32 + 1312),
        (Some(1300), 1297, 32 + 1300),
        (Some(1300), 1290, 32 + 1296),
        (Some(1300), 1300, 32 + 1300),
        (Some(1299), 1297, 32 + 1299),
    ];
    for (path_mtu, len, want) in cases {
        assert!(a.engine.set_path_mtu(&b.public(), path_mtu));
        assert_eq!(wire(len), vec![want], "path {path_mtu:?}, {len} bytes");
    }
}
