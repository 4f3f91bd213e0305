//! Key rotation in memory, on virtual time: a steady stream both ways between x (which
//! rotates its key) and p (which learns x's new key a while later, as from the API), and
//! not one packet lost across the switch — also when datagrams sealed on the old session
//! arrive after the new one is up.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::capture::{Capture, Output};
use crate::clock::SeededIndices;
use crate::config::{DeviceConfig, PeerConfig, SetEffects};
use crate::drops::DropReason;
use crate::engine::{drop_previous, sender, Engine, Slot, MAX_PACKET, PREVIOUS_LINGER};
use crate::key::Key;
use crate::packet::udp4;
use crate::timer_tests::virtual_time::{advance, VirtualClock};

const ADDR_X: &str = "192.0.2.1:51820";
const ADDR_P: &str = "192.0.2.2:51820";
const TICK: Duration = Duration::from_millis(100);
const DATA: u8 = 4;

struct Node {
    engine: Engine,
    out: Capture,
    addr: SocketAddr,
    ip: [u8; 4],
    /// Sequence numbers received on the TUN.
    got: Vec<u32>,
    sent: u32,
}

impl Node {
    fn new(seed: u8, addr: &str, ip: [u8; 4]) -> Node {
        Node {
            engine: Engine::with_sources(
                Arc::new(VirtualClock::new()),
                Arc::new(SeededIndices::new(u64::from(seed))),
            ),
            out: Capture::default(),
            addr: addr.parse().unwrap(),
            ip,
            got: Vec::new(),
            sent: 0,
        }
    }

    /// Runs exactly `peer` (known by `peer_key`) under `private`.
    fn configure(&self, private: Key, peer: &Node, peer_key: Key, successors: &[(Key, Key)]) {
        let mut pc = PeerConfig::new(peer_key);
        pc.endpoint = Some(peer.addr);
        pc.allowed_ips = vec![format!(
            "{}.{}.{}.{}/32",
            peer.ip[0], peer.ip[1], peer.ip[2], peer.ip[3]
        )
        .parse()
        .unwrap()];
        pc.persistent_keepalive = 25;
        let cfg = DeviceConfig {
            private_key: Some(private),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![pc],
        };
        let effects = SetEffects {
            successors: successors.to_vec(),
            ..SetEffects::default()
        };
        self.engine.reconfigure(cfg, &effects, &self.out);
    }

    /// One sequence-numbered packet to `to`.
    fn send(&mut self, to: [u8; 4]) {
        let mut packet = udp4(self.ip, to, 100);
        packet[96..100].copy_from_slice(&self.sent.to_be_bytes());
        self.sent += 1;
        let mut buf = vec![0u8; MAX_PACKET];
        self.engine.handle_outbound(&packet, &mut buf, &self.out);
    }
}

/// Two engines and the wire between them. `hold` keeps data datagrams back instead of
/// delivering them, to be released later (reordering).
struct Rig {
    x: Node,
    p: Node,
    hold: bool,
    held: Vec<(bool, Vec<u8>)>,
}

impl Rig {
    fn new() -> (Rig, Key, Key) {
        let (kx, kp) = (Key([1; 32]), Key([2; 32]));
        let x = Node::new(1, ADDR_X, [10, 0, 0, 1]);
        let p = Node::new(2, ADDR_P, [10, 0, 0, 2]);
        x.configure(kx, &p, kp.public_from_private(), &[]);
        p.configure(kp, &x, kx.public_from_private(), &[]);
        let rig = Rig {
            x,
            p,
            hold: false,
            held: Vec::new(),
        };
        (rig, kx, kp)
    }

    /// Carries datagrams both ways until neither side has more to say.
    fn pump(&mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut moved = false;
            for from_x in [true, false] {
                let (src, dst) = if from_x {
                    (&mut self.x, &mut self.p)
                } else {
                    (&mut self.p, &mut self.x)
                };
                for o in src.out.take() {
                    match o {
                        Output::Datagram(_, d) => {
                            moved = true;
                            if self.hold && d[0] == DATA {
                                self.held.push((from_x, d));
                                continue;
                            }
                            dst.engine.handle_inbound(src.addr, &d, &mut buf, &dst.out);
                        }
                        Output::Tun(packet) => {
                            moved = true;
                            src.got
                                .push(u32::from_be_bytes(packet[96..100].try_into().unwrap()));
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Delivers what was held back, in the order it was sent.
    fn release(&mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        for (from_x, d) in std::mem::take(&mut self.held) {
            let (src, dst) = if from_x {
                (&self.x, &self.p)
            } else {
                (&self.p, &self.x)
            };
            dst.engine.handle_inbound(src.addr, &d, &mut buf, &dst.out);
        }
        self.pump();
    }

    /// One 100 ms step: a packet each way, the timers.
    fn step(&mut self) {
        self.x.send(self.p.ip);
        self.p.send(self.x.ip);
        self.pump();
        advance(TICK);
        let mut buf = vec![0u8; MAX_PACKET];
        self.x.engine.tick(&mut buf, &self.x.out);
        self.p.engine.tick(&mut buf, &self.p.out);
        self.pump();
    }

    fn steps(&mut self, n: usize) {
        for _ in 0..n {
            self.step();
        }
    }

    /// Every packet sent arrived, each once.
    fn assert_lossless(&self) {
        for (name, from, to) in [("x -> p", &self.x, &self.p), ("p -> x", &self.p, &self.x)] {
            let got: BTreeSet<u32> = to.got.iter().copied().collect();
            let lost: Vec<u32> = (0..from.sent).filter(|s| !got.contains(s)).collect();
            assert!(
                lost.is_empty(),
                "{name}: lost {} of {}: {lost:?}",
                lost.len(),
                from.sent
            );
            assert_eq!(to.got.len(), got.len(), "{name}: duplicates");
        }
    }
}

/// x rotates; p learns the new key `publish_delay` steps later; returns the rig once both
/// sides dropped their previous sessions and x retired its old key.
fn rotate(reorder: bool, publish_delay: usize) -> Rig {
    let (mut rig, kx, _) = Rig::new();
    rig.steps(50);
    assert!(rig.x.got.len() > 45 && rig.p.got.len() > 45, "stream is up");

    let kx2 = Key([3; 32]);
    rig.x.engine.rotate_private_key(kx2, &rig.x.out);
    assert!(rig.x.engine.has_previous_key());
    rig.steps(publish_delay);
    assert_eq!(
        rig.x.engine.retiring_peers(),
        1,
        "x keeps its old session until p moves"
    );

    // p sees x's new key in the API: the old session stays as previous, p initiates.
    rig.hold = reorder;
    let (old, new) = (kx.public_from_private(), kx2.public_from_private());
    rig.p.configure(Key([2; 32]), &rig.x, new, &[(old, new)]);
    rig.steps(5);
    if reorder {
        rig.hold = false;
        rig.steps(5);
        assert!(!rig.held.is_empty(), "data was held back");
        // Old-session data arrives after newer data on the new session.
        rig.release();
    }
    for _ in 0..200 {
        if rig.x.engine.retiring_peers() == 0 && rig.p.engine.retiring_peers() == 0 {
            break;
        }
        rig.step();
    }
    assert_eq!(
        (rig.x.engine.retiring_peers(), rig.p.engine.retiring_peers()),
        (0, 0),
        "both sides dropped the previous session once the new one was up"
    );
    rig.x.engine.retire_previous_key();
    assert!(!rig.x.engine.has_previous_key());
    rig.steps(20);
    rig
}

#[test]
fn rotation_loses_no_packet_either_way() {
    // 30 s before p learns the key: more packets than boringtun queues behind a handshake
    // (256), so only sending on the old session carries them.
    let rig = rotate(false, 300);
    rig.assert_lossless();
    // After retirement the stream runs on the new key: p's peer is x's new key, with a
    // handshake, and x answers only the new key.
    let snap = rig.p.engine.snapshot();
    assert_eq!(snap.peers[0].public_key, Key([3; 32]).public_from_private());
    assert!(snap.peers[0].last_handshake.is_some());
    assert_eq!(rig.x.engine.snapshot().private_key, Some(Key([3; 32])));
    assert!(rig.x.sent > 100 && rig.p.sent > 100);
}

#[test]
fn old_session_data_arriving_after_the_switch_still_opens() {
    let rig = rotate(true, 3);
    rig.assert_lossless();
}

#[test]
fn rotation_when_the_peer_learns_the_key_at_once() {
    rotate(false, 0).assert_lossless();
}

#[test]
fn without_the_successor_hint_the_old_session_is_cut() {
    // The failure the hint exists for: p treats x's new key as a new peer and forgets the
    // old session at once, so x's packets sealed on it are lost.
    let (mut rig, kx, _) = Rig::new();
    rig.steps(50);
    let kx2 = Key([3; 32]);
    rig.x.engine.rotate_private_key(kx2, &rig.x.out);
    rig.steps(5);
    let _ = kx;
    rig.p
        .configure(Key([2; 32]), &rig.x, kx2.public_from_private(), &[]);
    rig.hold = true;
    rig.steps(3);
    rig.hold = false;
    rig.release();
    rig.steps(20);
    let got: BTreeSet<u32> = rig.p.got.iter().copied().collect();
    assert!(
        (0..rig.x.sent).any(|s| !got.contains(&s)),
        "x's in-flight packets on the old session are lost without the hint"
    );
}

#[test]
fn a_rekey_of_the_old_session_during_the_overlap_is_answered_by_the_old_key() {
    // p's session with x's old key may need a fresh handshake while x rotates (p does not
    // know the new key yet): x answers it with its previous key.
    let (mut rig, _, _) = Rig::new();
    // p starts the session, so p is the one that rekeys it.
    rig.p.send(rig.x.ip);
    rig.pump();
    rig.steps(10);
    rig.x.engine.rotate_private_key(Key([3; 32]), &rig.x.out);
    // Move past REKEY_AFTER_TIME with the stream running: boringtun rekeys on send.
    rig.steps(1250);
    assert_eq!(rig.x.engine.retiring_peers(), 1);
    rig.assert_lossless();
    assert_eq!(
        rig.x.engine.drops().get(DropReason::HandshakeRejected),
        0,
        "p's rekey under x's old key was answered"
    );
}

#[test]
fn the_newest_session_that_is_up_sends() {
    let cases = [
        (false, false, Slot::Current),
        (false, true, Slot::Previous),
        (true, false, Slot::Current),
        (true, true, Slot::Current),
    ];
    for (current_up, previous_up, want) in cases {
        assert_eq!(
            sender(current_up, previous_up),
            want,
            "{current_up} {previous_up}"
        );
    }
}

#[test]
fn the_previous_session_goes_after_the_new_one_has_been_up_a_while() {
    let s = Duration::from_secs;
    let cases = [
        // (held, previous up, current session age, drop)
        (s(1), true, None, false),
        (s(60), true, None, false),
        (s(1), true, Some(s(1)), false),
        (s(6), true, Some(PREVIOUS_LINGER), true),
        (s(1), false, None, false),
        (PREVIOUS_LINGER, false, None, true),
        (s(180), true, None, true),
    ];
    for (held, previous_up, age, want) in cases {
        assert_eq!(
            drop_previous(held, previous_up, age),
            want,
            "{held:?} {previous_up} {age:?}"
        );
    }
}
