//! More of the kernel's netns selftest (tools/testing/selftests/wireguard/netns.sh), ported
//! to isthmus in namespaces; `selftest.rs` has the first scenarios.

use std::time::Duration;

use isthmus_tests::pair::{Impl, Pair, Underlay};
use isthmus_tests::traffic::{link_counters, ping};
use isthmus_tests::wg::KeyPair;

/// netns.sh: "Test that route loops are handled". a's peer endpoint is set to an address a's
/// own tunnel carries (b's tunnel address, port 7) and b no longer answers: every datagram a
/// sends re-enters its TUN and would be sealed again, each time bigger. After a flood of 10
/// pings, a's transmitted bytes grow by less than 70,000 within the next second (the
/// selftest's bound), and the device still answers.
#[test]
fn a_routing_loop_through_the_tunnel_stays_bounded() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    b.wg(&["set", &b.iface, "peer", &a.keys.public, "remove"])
        .unwrap();
    let inside = format!("{}:7", b.inner_v4());
    a.wg(&["set", &a.iface, "peer", &b.keys.public, "endpoint", &inside])
        .unwrap();
    let tx = || a.dump().expect("wg show").peers[0].tx_bytes;
    let before = tx();
    let dst = b.inner_v4().to_string();
    // No reply can come; the ping's exit status is not the point.
    let _ = a.ns.exec("ping", &["-W", "1", "-c", "10", "-f", &dst]);
    std::thread::sleep(Duration::from_secs(1));
    let after = tx();
    eprintln!("loop: {} bytes transmitted after the flood", after - before);
    assert!(
        after - before < 70_000,
        "the loop ran on: {} bytes in a second\n{}",
        after - before,
        pair.logs()
    );
    assert!(a.dump().is_ok(), "the device stopped answering");
}

/// netns.sh: a peer with the device's own public key is silently ignored, and setting a
/// private key whose public key is a configured peer's removes that peer (the kernel's
/// `wg_peer_create` / `set_device` rule: a device never has itself as a peer).
#[test]
fn a_peer_with_our_own_public_key_is_ignored() {
    let pair = Pair::unconnected(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let host = &pair.a;
    let peers = || -> Vec<String> {
        let dump = host.dump().expect("wg show");
        dump.peers.into_iter().map(|p| p.public_key).collect()
    };
    let other = KeyPair::generate().unwrap();
    host.wg(&["set", &host.iface, "peer", &host.keys.public])
        .expect("setting our own key is not an error");
    host.wg(&["set", &host.iface, "peer", &other.public])
        .unwrap();
    assert_eq!(
        peers(),
        vec![other.public.clone()],
        "our own key became a peer"
    );

    let key_file = pair.dir.path().join("other.key");
    std::fs::write(&key_file, &other.private).unwrap();
    host.wg(&[
        "set",
        &host.iface,
        "private-key",
        &key_file.display().to_string(),
    ])
    .unwrap();
    assert_eq!(host.dump().unwrap().public_key, other.public);
    assert!(peers().is_empty(), "the peer with the new own key stayed");
}

/// netns.sh: "make sure that the stats counters are working": after a handshake and ten
/// pings from b to a, the counters are exact. On each TUN (`ip -s link`): 10 × 84 bytes of
/// ICMP each way. In `wg show transfer`, which counts the datagrams' bytes: b sent the
/// initiation (148) and ten 84-byte pings padded to 96 and sealed (+32: 128 each); a sent
/// the response (92) and ten replies: 1,372 and 1,428 (+32 with a keepalive), the
/// selftest's own figures.
#[test]
fn counters_are_exact_after_ten_pings() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    let links = || {
        (
            link_counters(&a.ns, &a.iface).unwrap(),
            link_counters(&b.ns, &b.iface).unwrap(),
        )
    };
    let (a0, b0) = links();
    let out =
        b.ns.exec(
            "ping",
            &[
                "-c",
                "10",
                "-i",
                "0.05",
                "-W",
                "1",
                &a.inner_v4().to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
    assert!(out.contains(" 0% packet loss"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (a1, b1) = links();
    let (da, db) = (a1.since(&a0), b1.since(&b0));
    eprintln!("links: a {da:?}\nb {db:?}");
    let (wa, wb) = (
        a.dump().unwrap().peers[0].clone(),
        b.dump().unwrap().peers[0].clone(),
    );
    eprintln!(
        "transfer: a rx {} tx {}, b rx {} tx {}",
        wa.rx_bytes, wa.tx_bytes, wb.rx_bytes, wb.tx_bytes
    );
    let icmp = 10 * 84;
    assert_eq!(
        (da.rx_bytes, da.tx_bytes, db.rx_bytes, db.tx_bytes),
        (icmp, icmp, icmp, icmp)
    );
    // netns.sh's own figures: 1,372 one way, 1,428 or 1,460 the other (the initiator may
    // send one keepalive, 32 bytes, right after the handshake).
    let data = 10 * (96 + 32);
    let (sent, answered) = (148 + data, 92 + data);
    assert_eq!((sent, answered), (1428, 1372));
    assert!(
        wb.tx_bytes == sent || wb.tx_bytes == sent + 32,
        "b sent {}",
        wb.tx_bytes
    );
    assert_eq!(wa.rx_bytes, wb.tx_bytes, "a received what b sent");
    assert_eq!((wb.rx_bytes, wa.tx_bytes), (answered, answered));
}
