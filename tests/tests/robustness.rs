//! What the network and the operator can throw at a running tunnel: garbage datagrams, a
//! peer that moves mid-stream, a shutdown.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::Duration;

use isthmus_tests::daemon::wait_until;
use isthmus_tests::pair::{Impl, Pair, Underlay};
use isthmus_tests::traffic::{ping, tcp_transfer_across, udp_socket};

/// Deterministic noise, so a failure reproduces.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Datagrams shaped like WireGuard messages (right type byte and length, random content),
/// truncated ones, and plain noise.
fn hostile_datagrams(count: usize) -> Vec<Vec<u8>> {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let shaped = [(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 1452)];
    (0..count)
        .map(|i| {
            let (kind, len) = match i % 4 {
                0 | 1 => shaped[(rng.next() % shaped.len() as u64) as usize],
                2 => {
                    let (k, l) = shaped[(rng.next() % shaped.len() as u64) as usize];
                    (k, (rng.next() as usize) % l)
                }
                _ => (rng.next() as u8, (rng.next() as usize) % 1500),
            };
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= 4 && i % 4 != 3 {
                d[..4].copy_from_slice(&[kind, 0, 0, 0]);
            }
            d
        })
        .collect()
}

#[test]
fn garbage_datagrams_change_nothing() {
    let mut pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 2), "{}", pair.logs());
    let before = pair.a.wg(&["showconf", &pair.a.iface]).unwrap();

    let target: SocketAddr = pair.a.endpoint(Underlay::V4).parse().unwrap();
    let sock = udp_socket(&pair.b.ns, "10.250.0.2:0".parse().unwrap()).unwrap();
    for d in hostile_datagrams(20_000) {
        let _ = sock.send_to(&d, target);
    }
    thread::sleep(Duration::from_millis(300));

    assert!(pair.a.daemon.is_running(), "daemon died:\n{}", pair.logs());
    let a = &pair.a;
    assert_eq!(a.wg(&["showconf", &a.iface]).unwrap(), before);
    assert!(
        ping(&a.ns, pair.b.inner_v4(), 2),
        "tunnel broken:\n{}",
        pair.logs()
    );
    let log = a.daemon.log();
    for reason in ["malformed", "unknown_index"] {
        assert!(
            log.contains(&format!("reason=\"{reason}\"")),
            "no drop logged as {reason}:\n{log}"
        );
    }
}

/// How the moved host makes itself heard at its new address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// It is the one sending the stream.
    BySending,
    /// It only receives, but sends a keepalive every second.
    ByKeepalive,
}

/// Moves one host's underlay address from `.n` to `.n+10` in the middle of a 48 MiB stream;
/// the stream must complete and the other side must show the new endpoint. A peer that says
/// nothing after moving cannot be found by anyone (WireGuard roams on authenticated
/// packets), so the mover either sends the stream or keeps a keepalive.
fn roam(mover_is_a: bool, heard: Heard) {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let (mover, other) = if mover_is_a {
        (&pair.a, &pair.b)
    } else {
        (&pair.b, &pair.a)
    };
    if heard == Heard::ByKeepalive {
        pair.add_peer(mover, other, &["persistent-keepalive", "1"])
            .unwrap();
    }
    assert!(ping(&other.ns, mover.inner_v4(), 2), "{}", pair.logs());
    // Without this, deleting the old (primary) address also deletes the new one.
    let promote = format!("net.ipv4.conf.{}.promote_secondaries=1", mover.underlay_if);
    mover.ns.exec("sysctl", &["-qw", &promote]).unwrap();
    let (old, new) = (
        format!("10.250.0.{}/24", mover.n),
        format!("10.250.0.{}/24", mover.n + 10),
    );
    // The move happens while the receiver holds the stream at half way, so it is in flight
    // across the move however fast the tunnel is.
    let move_address = || {
        mover
            .ns
            .ip(&["addr", "add", &new, "dev", &mover.underlay_if])
            .unwrap();
        mover
            .ns
            .ip(&["addr", "del", &old, "dev", &mover.underlay_if])
            .unwrap();
    };
    let bytes = 48 << 20;
    match heard {
        Heard::BySending => {
            tcp_transfer_across(&mover.ns, &other.ns, other.inner_v4(), bytes, move_address)
        }
        Heard::ByKeepalive => {
            tcp_transfer_across(&other.ns, &mover.ns, mover.inner_v4(), bytes, move_address)
        }
    }
    .unwrap_or_else(|e| panic!("stream across the move: {e:#}\n{}", pair.logs()));
    let expected = format!("10.250.0.{}:{}", mover.n + 10, mover.port);
    let seen = other.dump().unwrap();
    assert_eq!(seen.peer(&mover.keys.public).unwrap().endpoint, expected);
    assert!(ping(&other.ns, mover.inner_v4(), 2));
}

#[test]
fn isthmus_follows_a_peer_that_moves() {
    roam(false, Heard::BySending);
}

#[test]
fn isthmus_follows_a_moved_receiver_by_its_keepalives() {
    roam(false, Heard::ByKeepalive);
}

#[test]
fn a_moving_isthmus_keeps_its_peer() {
    roam(true, Heard::BySending);
}

#[test]
fn sigterm_and_sigint_leave_nothing_behind() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
        assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
        let status = pair.a.daemon.stop_with(signal, Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "exit after signal {signal}: {status:?}\n{}",
            pair.logs()
        );
        let a = &pair.a;
        assert!(
            !Path::new(&a.socket_path()).exists(),
            "UAPI socket left behind"
        );
        assert!(
            wait_until(Duration::from_secs(2), || a
                .ns
                .ip(&["link", "show", &a.iface])
                .is_err()),
            "TUN device left behind"
        );
        let port = a.port;
        let rebind =
            a.ns.enter(move || UdpSocket::bind(("0.0.0.0", port)).is_ok())
                .unwrap();
        assert!(rebind, "UDP port {port} still bound");
    }
}
