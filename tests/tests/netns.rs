//! More of the kernel's netns selftest (tools/testing/selftests/wireguard/netns.sh), ported
//! to isthmus in namespaces; `selftest.rs` has the first scenarios.

use std::time::Duration;

use isthmus_tests::pair::{Impl, Pair, Underlay};
use isthmus_tests::traffic::ping;

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
