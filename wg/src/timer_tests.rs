//! The protocol's timers, driven in memory on virtual time: two engines whose datagrams the
//! test carries (or loses), and a clock the test moves in 100 ms ticks — the tunnel's
//! timer period. Whitepaper §6 and the kernel's `timers.c` are the reference.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::capture::{Capture, Output};
use crate::clock::SeededIndices;
use crate::config::{DeviceConfig, PeerConfig, SetEffects};
use crate::engine::{Engine, MAX_PACKET};
use crate::key::Key;
use crate::packet::udp4;

/// Virtual time for one test thread, seen alike by the engine's [`crate::clock::Clock`] and
/// by boringtun, which reads `clock_gettime(CLOCK_BOOTTIME)` itself (its `sleepyinstant`)
/// and offers no way to be handed the time (see [`crate::clock`]).
///
/// The override below exists only in this crate's unit-test binary (`cfg(test)`): the
/// static linker binds the executable's own calls to a `clock_gettime` defined in it, so
/// no library, no feature and no other binary is touched. `nm` on the agent binary shows
/// `clock_gettime` undefined (glibc's), see docs/protocol.md. The offset is per thread, so
/// tests running in parallel do not move each other's clocks, and every other clock
/// (std's `Instant` is `CLOCK_MONOTONIC`) passes through unchanged.
pub(crate) mod virtual_time {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    use crate::clock::Clock;

    thread_local! {
        static OFFSET_NS: Cell<u64> = const { Cell::new(0) };
    }

    fn offset() -> Duration {
        Duration::from_nanos(OFFSET_NS.try_with(Cell::get).unwrap_or(0))
    }

    /// # Safety
    /// `tp` must be valid for a write, as for libc's `clock_gettime`.
    #[no_mangle]
    pub unsafe extern "C" fn clock_gettime(
        clock: libc::clockid_t,
        tp: *mut libc::timespec,
    ) -> libc::c_int {
        // The system call itself (glibc's vDSO path is behind the symbol being replaced).
        let rc = libc::syscall(libc::SYS_clock_gettime, clock, tp) as libc::c_int;
        if rc == 0 && clock == libc::CLOCK_BOOTTIME && !tp.is_null() {
            let off = offset();
            let t = &mut *tp;
            let nanos = t.tv_nsec as u64 + u64::from(off.subsec_nanos());
            t.tv_sec += off.as_secs() as libc::time_t + (nanos / 1_000_000_000) as libc::time_t;
            t.tv_nsec = (nanos % 1_000_000_000) as _;
        }
        rc
    }

    /// Moves this thread's virtual time forward.
    pub fn advance(by: Duration) {
        OFFSET_NS.with(|o| o.set(o.get() + by.as_nanos() as u64));
    }

    /// The engine's view of the same virtual time.
    pub struct VirtualClock {
        base: Instant,
        offset_at_base: Duration,
    }

    impl VirtualClock {
        pub fn new() -> VirtualClock {
            VirtualClock {
                base: Instant::now(),
                offset_at_base: offset(),
            }
        }
    }

    impl Clock for VirtualClock {
        fn now(&self) -> Instant {
            self.base + (offset() - self.offset_at_base)
        }
    }
}

use virtual_time::{advance, VirtualClock};

const ADDR_A: &str = "192.0.2.1:51820";
const ADDR_B: &str = "192.0.2.2:51820";
const TICK: Duration = Duration::from_millis(100);

const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const DATA: u8 = 4;
/// A data message with nothing inside: 16-byte header and 16-byte tag.
const KEEPALIVE_LEN: usize = 32;

struct Node {
    engine: Engine,
    out: Capture,
    private: Key,
    addr: SocketAddr,
}

impl Node {
    fn new(seed: u8, addr: &str) -> Node {
        Node {
            engine: Engine::with_sources(
                Arc::new(VirtualClock::new()),
                Arc::new(SeededIndices::new(u64::from(seed))),
            ),
            out: Capture::default(),
            private: Key([seed; 32]),
            addr: addr.parse().unwrap(),
        }
    }

    fn configure(&self, peer: &Node, allowed: &str, keepalive: u16) {
        let mut pc = PeerConfig::new(peer.private.public_from_private());
        pc.endpoint = Some(peer.addr);
        pc.allowed_ips = vec![allowed.parse().unwrap()];
        pc.persistent_keepalive = keepalive;
        let cfg = DeviceConfig {
            private_key: Some(self.private),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![pc],
        };
        self.engine
            .reconfigure(cfg, &SetEffects::default(), &self.out);
    }
}

/// A datagram seen on the wire, when and from which side.
#[derive(Debug, Clone)]
struct Seen {
    at: Duration,
    from_a: bool,
    bytes: Vec<u8>,
}

impl Seen {
    fn kind(&self) -> u8 {
        self.bytes[0]
    }

    fn is_keepalive(&self) -> bool {
        self.kind() == DATA && self.bytes.len() == KEEPALIVE_LEN
    }

    fn is_data(&self) -> bool {
        self.kind() == DATA && self.bytes.len() > KEEPALIVE_LEN
    }
}

/// Two engines, a wire between them, and the virtual time since the start.
struct Rig {
    a: Node,
    b: Node,
    now: Duration,
    /// Everything either side sent, in order.
    log: Vec<Seen>,
    /// What b's TUN received, with the time.
    b_tun: Vec<(Duration, Vec<u8>)>,
    /// Decides per datagram whether the wire carries it.
    carries: Box<dyn Fn(&Seen) -> bool>,
}

impl Rig {
    /// a (10.0.0.1) and b (10.0.0.2), with persistent keepalive `ka` seconds on a's side.
    fn new(ka_a: u16) -> Rig {
        let a = Node::new(1, ADDR_A);
        let b = Node::new(2, ADDR_B);
        a.configure(&b, "10.0.0.2/32", ka_a);
        b.configure(&a, "10.0.0.1/32", 0);
        Rig {
            a,
            b,
            now: Duration::ZERO,
            log: Vec::new(),
            b_tun: Vec::new(),
            carries: Box::new(|_| true),
        }
    }

    /// a sends one 100-byte packet to b (from its TUN).
    fn a_sends(&mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        let packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 100);
        self.a
            .engine
            .handle_outbound(&packet, &mut buf, &self.a.out);
        self.pump();
    }

    /// Carries datagrams across until neither side has anything more to say.
    fn pump(&mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut moved = false;
            for from_a in [true, false] {
                let (src, dst) = if from_a {
                    (&self.a, &self.b)
                } else {
                    (&self.b, &self.a)
                };
                for o in src.out.take() {
                    moved = true;
                    match o {
                        Output::Datagram(_, bytes) => {
                            let seen = Seen {
                                at: self.now,
                                from_a,
                                bytes,
                            };
                            if (self.carries)(&seen) {
                                dst.engine.handle_inbound(
                                    src.addr,
                                    &seen.bytes,
                                    &mut buf,
                                    &dst.out,
                                );
                            }
                            self.log.push(seen);
                        }
                        Output::Tun(p) if !from_a => self.b_tun.push((self.now, p)),
                        Output::Tun(_) => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// One timer period on both sides.
    fn tick(&mut self) {
        advance(TICK);
        self.now += TICK;
        let mut buf = vec![0u8; MAX_PACKET];
        self.a.engine.tick(&mut buf, &self.a.out);
        self.b.engine.tick(&mut buf, &self.b.out);
        self.pump();
    }

    /// Ticks until virtual time `until` (from the rig's start).
    fn run_until(&mut self, until: Duration) {
        while self.now + TICK <= until {
            self.tick();
        }
    }

    /// Ticks until `until`, with a sending one packet every `every`.
    fn a_sends_every(&mut self, every: Duration, until: Duration) {
        let mut next = self.now;
        while self.now + TICK <= until {
            if self.now >= next {
                self.a_sends();
                next += every;
            }
            self.tick();
        }
    }

    fn sent(&self, from_a: bool, what: impl Fn(&Seen) -> bool) -> Vec<Duration> {
        self.log
            .iter()
            .filter(|s| s.from_a == from_a && what(s))
            .map(|s| s.at)
            .collect()
    }

    /// Forgets what was sent so far (after setting up a session).
    fn clear_log(&mut self) {
        self.log.clear();
        self.b_tun.clear();
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A session up: a's packet crossed, both sides know each other; then one more packet from
/// a, a tick later (boringtun stamps events with the time of the last tick, so what
/// happens within one tick counts as simultaneous).
fn established(ka_a: u16) -> Rig {
    let mut rig = Rig::new(ka_a);
    rig.a_sends();
    assert_eq!(
        rig.b_tun.len(),
        1,
        "the first packet crossed: {:?}",
        rig.log
    );
    rig.tick();
    rig.a_sends();
    assert_eq!(
        rig.b_tun.len(),
        2,
        "the second packet crossed: {:?}",
        rig.log
    );
    rig
}

#[test]
fn the_virtual_clock_moves_boringtun_and_the_engine_together() {
    let mut rig = established(0);
    rig.clear_log();
    // b received data at 0.1 s and sent nothing back: its keepalive is due 10 s later
    // (KEEPALIVE_TIMEOUT).
    rig.run_until(secs(9.9));
    assert!(
        rig.sent(false, Seen::is_keepalive).is_empty(),
        "{:?}",
        rig.log
    );
    rig.run_until(secs(10.6));
    assert_eq!(
        rig.sent(false, Seen::is_keepalive).len(),
        1,
        "{:?}",
        rig.log
    );
}

/// Gaps between successive times.
fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A keepalive carries nothing to answer: the side that receives one must not send one
/// back, or two idle peers would ping-pong for ever (whitepaper §6.5: only *data* received
/// without anything sent back calls for a keepalive).
#[test]
fn no_keepalive_answers_a_keepalive() {
    let mut rig = established(0);
    rig.clear_log();
    rig.run_until(secs(60.0));
    let from_b = rig.sent(false, Seen::is_keepalive);
    assert_eq!(from_b.len(), 1, "b answers a's data once: {:?}", rig.log);
    assert!(
        rig.sent(true, |_| true).is_empty(),
        "a answered b's keepalive: {:?}",
        rig.log
    );
}

/// A data packet that arrives after a long silence is answered with a keepalive
/// KEEPALIVE_TIMEOUT (10 s) after it arrived, if nothing else went back meanwhile — not at
/// the next tick because the last thing sent is older than 10 s (the kernel arms its
/// keepalive timer on receipt, `wg_timers_data_received`).
#[test]
fn data_received_on_an_idle_tunnel_is_answered_10_s_later_not_at_once() {
    let mut rig = established(0);
    rig.run_until(secs(60.0));
    rig.clear_log();
    rig.a_sends();
    let received = rig.now;
    rig.run_until(secs(80.0));
    let from_b = rig.sent(false, Seen::is_keepalive);
    assert_eq!(from_b.len(), 1, "{:?}", rig.log);
    let after = from_b[0] - received;
    assert!(
        after >= secs(9.9) && after <= secs(10.5),
        "b's keepalive came {after:?} after the data"
    );
}

/// The mirror image: data sent on a tunnel idle for more than 15 s starts a new handshake
/// only if nothing comes back within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s) of *the
/// data* (the kernel arms its timer on send, `wg_timers_data_sent`). b is alive and
/// answers within 10 s, so no handshake is needed.
#[test]
fn data_sent_on_an_idle_tunnel_starts_no_handshake_when_the_peer_answers() {
    let mut rig = established(0);
    rig.run_until(secs(60.0));
    rig.clear_log();
    rig.a_sends();
    rig.run_until(secs(80.0));
    let inits = rig.sent(true, |s| s.kind() == INITIATION);
    assert!(inits.is_empty(), "a started a handshake at {inits:?}");
}

/// REKEY_AFTER_TIME is checked when sending (whitepaper §6.2: "after sending a packet"):
/// a tunnel idle since its first seconds is not rekeyed at 120 s.
#[test]
fn an_idle_initiator_does_not_rekey() {
    let mut rig = established(0);
    rig.clear_log();
    rig.run_until(secs(170.0));
    let inits = rig.sent(true, |s| s.kind() == INITIATION);
    assert!(inits.is_empty(), "a rekeyed an idle session at {inits:?}");
}

/// Persistent keepalive: on an idle tunnel, never more than the interval without a
/// keepalive from the side that asked for it.
#[test]
fn persistent_keepalive_every_interval() {
    let mut rig = established(25);
    rig.run_until(secs(30.0));
    rig.clear_log();
    rig.run_until(secs(160.0));
    let mut from_a = rig.sent(true, Seen::is_keepalive);
    assert!(from_a.len() >= 5, "{:?}", rig.log);
    from_a.insert(0, secs(30.0));
    from_a.push(secs(160.0));
    let longest = gaps(&from_a).into_iter().max().unwrap();
    assert!(longest <= secs(25.2), "persistent keepalives {from_a:?}");
}

/// Handshake initiations to a peer that never answers: retried every REKEY_TIMEOUT (5 s)
/// plus a random jitter of up to a third of a second (whitepaper §6.1, so that two peers
/// initiating at once drift apart), and given up after REKEY_ATTEMPT_TIME (90 s).
#[test]
fn handshake_retries_with_jitter_and_gives_up_after_90_s() {
    let mut rig = Rig::new(0);
    rig.carries = Box::new(|_| false);
    rig.a_sends();
    rig.run_until(secs(150.0));
    let inits = rig.sent(true, |s| s.kind() == INITIATION);
    assert!(inits.len() >= 17, "{inits:?}");
    let last = *inits.last().unwrap();
    assert!(
        last >= secs(80.0) && last <= secs(90.0),
        "last initiation at {last:?}: {inits:?}"
    );
    let gaps = gaps(&inits);
    for gap in &gaps {
        assert!(*gap >= secs(5.0) && *gap <= secs(5.5), "{gaps:?}");
    }
    let mut distinct = gaps.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "no jitter: every retry {:?} apart",
        gaps[0]
    );
}

/// After giving up, a new packet starts a new handshake, and only it is delivered: what was
/// queued during the failed attempts was dropped with them.
#[test]
fn a_packet_after_giving_up_starts_over() {
    let mut rig = Rig::new(0);
    rig.carries = Box::new(|_| false);
    rig.a_sends();
    rig.run_until(secs(100.0));
    rig.carries = Box::new(|_| true);
    rig.clear_log();
    rig.a_sends();
    assert_eq!(rig.b_tun.len(), 1, "{:?}", rig.log);
}

/// The initiator rekeys once its session is REKEY_AFTER_TIME (120 s) old and it sends.
#[test]
fn initiator_rekeys_after_120_s_of_sending() {
    let mut rig = established(0);
    rig.clear_log();
    rig.a_sends_every(secs(1.0), secs(130.0));
    let inits = rig.sent(true, |s| s.kind() == INITIATION);
    assert!(!inits.is_empty(), "no rekey");
    assert!(
        inits[0] >= secs(119.9) && inits[0] <= secs(121.0),
        "rekey at {:?}",
        inits[0]
    );
    assert_eq!(rig.b_tun.len(), 130, "every packet crossed the rekey");
}

/// No data leaves on a session older than REJECT_AFTER_TIME (180 s), even when the rekey
/// keeps failing (here: b's handshake responses are lost, everything else arrives).
#[test]
fn no_data_is_sent_on_a_session_older_than_180_s() {
    let mut rig = established(0);
    rig.carries = Box::new(|s| s.kind() != RESPONSE);
    rig.clear_log();
    rig.a_sends_every(secs(0.25), secs(200.0));
    let data = rig.sent(true, Seen::is_data);
    let last = *data.last().unwrap();
    assert!(
        last < secs(180.0),
        "a sent data at {last:?} on a session established at 0.1 s"
    );
    assert!(last >= secs(179.0), "a stopped early, at {last:?}");
    let last_b = rig.sent(false, |s| s.kind() == DATA).pop().unwrap();
    assert!(last_b < secs(180.0), "b sent at {last_b:?}");
}

/// A handshake response that arrives late still completes the handshake: after 250 ms,
/// after 4.9 s, and after the initiator has retried (a response to the previous
/// initiation).
#[test]
fn late_handshake_responses_complete_the_handshake() {
    for delay in [0.25, 1.0, 4.9, 5.3] {
        let mut rig = Rig::new(0);
        // Hold b's response back.
        rig.carries = Box::new(|s| s.kind() != RESPONSE);
        rig.a_sends();
        let response = rig
            .log
            .iter()
            .find(|s| s.kind() == RESPONSE)
            .cloned()
            .expect("b responded");
        rig.run_until(secs(delay));
        rig.carries = Box::new(|_| true);
        let mut buf = vec![0u8; MAX_PACKET];
        rig.a
            .engine
            .handle_inbound(rig.b.addr, &response.bytes, &mut buf, &rig.a.out);
        rig.pump();
        assert_eq!(
            rig.b_tun.len(),
            1,
            "response {delay} s late: the queued packet did not cross: {:?}",
            rig.log
        );
    }
}

/// Every handshake takes a fresh receiver index that says nothing about the previous one:
/// not the next value, not the same upper bits (the kernel and wireguard-go draw 32 random
/// bits per handshake). And with a seeded source the indices are reproducible.
#[test]
fn session_indices_are_random_per_handshake_and_seedable() {
    let indices = || {
        let mut rig = established(0);
        rig.clear_log();
        // Five rekeys by the initiator.
        rig.a_sends_every(secs(1.0), secs(5.0 * 125.0));
        rig.sent(true, |s| s.kind() == INITIATION)
            .iter()
            .zip(
                rig.log
                    .iter()
                    .filter(|s| s.from_a && s.kind() == INITIATION),
            )
            .map(|(_, s)| u32::from_le_bytes(s.bytes[4..8].try_into().unwrap()))
            .collect::<Vec<u32>>()
    };
    let first = indices();
    assert!(first.len() >= 4, "{first:x?}");
    assert_eq!(first, indices(), "a seeded run repeats");
    let sequential = first
        .windows(2)
        .filter(|w| w[1] >> 8 == w[0] >> 8 || w[1].wrapping_sub(w[0]) == 1)
        .count();
    assert_eq!(sequential, 0, "linkable indices: {first:x?}");
}

/// The whitepaper's message limits (§6.4), with the session's counter moved near them
/// (boringtun's test hook `Tunn::__seal_at_counter` seals one message at a chosen counter):
/// a session rekeys once it sent more than REKEY_AFTER_MESSAGES (either side, here the
/// responder b), sends nothing past REJECT_AFTER_MESSAGES - 1, and a receiver refuses a
/// message counted at or beyond REJECT_AFTER_MESSAGES even when it authenticates.
#[test]
fn message_counters_rekey_after_2_60_and_stop_at_the_reject_limit() {
    const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
    const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
    let key_a = Key([1; 32]).public_from_private();
    let key_b = Key([2; 32]).public_from_private();
    let packet = udp4([10, 0, 0, 2], [10, 0, 0, 1], 100);
    let to_b = udp4([10, 0, 0, 1], [10, 0, 0, 2], 100);
    let counter = |d: &[u8]| u64::from_le_bytes(d[8..16].try_into().unwrap());

    // Rekey: b (the responder) sends one message at counter 2^60; by the next tick it
    // starts a handshake, and data keeps flowing across it.
    let mut rig = established(0);
    rig.clear_log();
    let mut buf = vec![0u8; MAX_PACKET];
    let sealed = rig
        .b
        .engine
        .with_tunn(&key_a, |t| {
            t.__seal_at_counter(REKEY_AFTER_MESSAGES, &packet, &mut buf)
                .map(|d| d.to_vec())
        })
        .flatten()
        .expect("b has a session");
    assert_eq!(counter(&sealed), REKEY_AFTER_MESSAGES);
    rig.run_until(rig.now + secs(1.0));
    let inits = rig.sent(false, |s| s.kind() == INITIATION);
    assert_eq!(
        inits.len(),
        1,
        "b did not rekey after 2^60 messages: {:?}",
        rig.log
    );
    rig.a_sends();
    assert_eq!(rig.b_tun.len(), 1, "{:?}", rig.log);

    // Reject, sending: after the message counted REJECT_AFTER_MESSAGES - 2, a sends one
    // more data message on the session (the last counter allowed); the next packet waits
    // for a new session (a starts a handshake) and crosses on it.
    let mut rig = established(0);
    rig.a
        .engine
        .with_tunn(&key_b, |t| {
            t.__seal_at_counter(REJECT_AFTER_MESSAGES - 2, &to_b, &mut buf)
                .is_some()
        })
        .filter(|sealed| *sealed)
        .expect("a has a session");
    rig.clear_log();
    rig.a_sends();
    rig.a_sends();
    let data: Vec<(u32, u64)> = rig
        .log
        .iter()
        .filter(|s| s.from_a && s.is_data())
        .map(|s| {
            let index = u32::from_le_bytes(s.bytes[4..8].try_into().unwrap());
            (index, counter(&s.bytes))
        })
        .collect();
    assert_eq!(data.len(), 2, "{data:x?}");
    assert_eq!(data[0].1, REJECT_AFTER_MESSAGES - 1, "{data:x?}");
    assert!(
        data[1].0 != data[0].0 && data[1].1 < 2,
        "the packet after the limit went on the old session: {data:x?}"
    );
    let inits = rig.sent(true, |s| s.kind() == INITIATION);
    assert_eq!(inits.len(), 1, "{:?}", rig.log);
    assert_eq!(rig.b_tun.len(), 2);

    // Reject, receiving: b accepts a message counted REJECT_AFTER_MESSAGES - 1 and refuses
    // ones counted REJECT_AFTER_MESSAGES and beyond, though they authenticate.
    let rig = established(0);
    let from_a = |c: u64| {
        let mut buf = vec![0u8; MAX_PACKET];
        rig.a
            .engine
            .with_tunn(&key_b, |t| {
                t.__seal_at_counter(c, &to_b, &mut buf).map(|d| d.to_vec())
            })
            .flatten()
            .expect("a has a session")
    };
    let delivered = |datagram: &[u8]| {
        let mut buf = vec![0u8; MAX_PACKET];
        rig.b
            .engine
            .handle_inbound(rig.a.addr, datagram, &mut buf, &rig.b.out);
        rig.b
            .out
            .take()
            .into_iter()
            .filter(|o| matches!(o, Output::Tun(_)))
            .count()
    };
    assert_eq!(delivered(&from_a(REJECT_AFTER_MESSAGES - 1)), 1);
    assert_eq!(delivered(&from_a(REJECT_AFTER_MESSAGES)), 0);
    assert_eq!(delivered(&from_a(u64::MAX - 1)), 0);
}

/// The workers' sealing path (`Tunn::reserve_seal`, boringtun patch 10) keeps the same
/// limit as `encapsulate`: counters up to `REJECT_AFTER_MESSAGES - 1` and none beyond; a
/// batch that would cross it is refused whole and spends no counter.
#[test]
fn the_split_seal_path_stops_at_the_reject_limit_too() {
    const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
    let key_b = Key([2; 32]).public_from_private();
    let to_b = udp4([10, 0, 0, 1], [10, 0, 0, 2], 100);
    let rig = established(0);
    let mut buf = vec![0u8; MAX_PACKET];
    let reserved = rig
        .a
        .engine
        .with_tunn(&key_b, |t| {
            t.__seal_at_counter(REJECT_AFTER_MESSAGES - 3, &to_b, &mut buf)?;
            // Three counters would cross the limit and reserve nothing; two are the last.
            let batch = t.reserve_seal(3, 300);
            let last = t.reserve_seal(2, 200).map(|(_, first)| first);
            let after = t.reserve_seal(1, 100);
            Some((batch, last, after))
        })
        .flatten()
        .expect("a has a session");
    assert_eq!(reserved.0, None, "a batch crossing the limit was reserved");
    assert_eq!(reserved.2, None, "a counter past the limit was reserved");
    assert_eq!(reserved.1, Some(REJECT_AFTER_MESSAGES - 2), "{reserved:?}");
}

/// When the tick leaves a peer alone to jitter its retry (`engine::hold_retry`).
#[test]
fn the_retry_is_held_for_its_jitter_but_never_past_session_expiry() {
    use crate::engine::hold_retry;
    let t0 = std::time::Instant::now();
    let at = |s: f64| t0 + secs(s);
    let sent = Some((t0, secs(0.3)));
    let young = Some(secs(60.0));
    let old = Some(secs(179.5));
    let cases = [
        // (now, last initiation, newest session's age, held)
        (at(4.9), sent, young, false),
        (at(5.0), sent, young, true),
        (at(5.2), sent, young, true),
        (at(5.3), sent, young, false),
        (at(5.1), sent, None, true),
        (at(5.1), Some((t0, secs(0.0))), young, false),
        (at(5.1), None, young, false),
        (at(5.1), sent, old, false),
    ];
    for (now, last, age, held) in cases {
        assert_eq!(
            hold_retry(now, last, age),
            held,
            "at {:?} after the initiation, session age {age:?}",
            now - t0
        );
    }
}

/// The engine's receiver indices come from its `IndexSource`: the same seed gives the same
/// per-peer index (a test run repeats), another seed another one.
#[test]
fn a_seeded_engine_draws_reproducible_receiver_indices() {
    let first_index = |seed: u64| {
        let b = Node::new(2, ADDR_B);
        let a = Node {
            engine: Engine::with_sources(
                Arc::new(VirtualClock::new()),
                Arc::new(SeededIndices::new(seed)),
            ),
            out: Capture::default(),
            private: Key([1; 32]),
            addr: ADDR_A.parse().unwrap(),
        };
        a.configure(&b, "10.0.0.2/32", 0);
        let mut buf = vec![0u8; MAX_PACKET];
        let packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 100);
        a.engine.handle_outbound(&packet, &mut buf, &a.out);
        let init = a
            .out
            .take()
            .into_iter()
            .find_map(|o| match o {
                Output::Datagram(_, d) if d[0] == INITIATION => Some(d),
                _ => None,
            })
            .expect("an initiation");
        u32::from_le_bytes(init[4..8].try_into().unwrap())
    };
    assert_eq!(first_index(42), first_index(42));
    assert_ne!(first_index(42) >> 8, first_index(43) >> 8);
}
