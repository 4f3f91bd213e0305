//! Path MTU per peer, found by probing inside the tunnel: the decisions, pure.
//!
//! Paths between clouds often carry fewer bytes than the interfaces at both ends say and drop
//! the rest without an ICMP message (an MTU black hole). Classic path MTU discovery waits
//! for that ICMP; this is packetization-layer discovery (RFC 4821, RFC 8899's DPLPMTUD) that
//! needs nothing from the path:
//!
//! - **What is probed.** A UDP datagram of exactly the size under test, from this node's mesh
//!   IP to the peer's mesh IP on the probe port ([`super::probe`]), so it enters the tunnel
//!   like any other packet to the peer and leaves the node as one WireGuard datagram of that
//!   size plus the WireGuard overhead. The other agent answers each probe with a small
//!   acknowledgement, which fits any path. A size is *good* when acknowledged; it is *too
//!   big* when [`Timing::tries`] probes of it in a row went unanswered. The sizes are inner
//!   sizes, the unit of the tunnel's MTU: a path that carries 1300-byte IPv4 packets carries
//!   1232-byte packets through the tunnel (WireGuard adds 60 bytes over IPv4 and pads the
//!   inner packet to a multiple of 16, up to the device's MTU).
//! - **Why in the kernel's tunnel and not in the engine.** The probe takes exactly the path
//!   real traffic takes (TUN, engine, socket, NAT, the path, the other engine, the other TUN),
//!   so it measures what traffic gets; it needs no change to the data plane and no privilege
//!   beyond a UDP socket. The socket sets `IP_PMTUDISC_PROBE`, which makes the kernel ignore
//!   the route MTU this module itself lowers (else a lowered route would forbid probing above
//!   it) but still never fragment a probe.
//! - **The search.** Binary search between a floor that is assumed ([`FLOOR`]: 1280 bytes,
//!   the least any IPv6 path carries, less the 80 bytes WireGuard adds over IPv6) and the
//!   ceiling (the smaller of the two tunnels' MTUs). The ceiling is tried first, so a path
//!   that carries full size costs one probe and is never shrunk. The search ends when the
//!   bounds are within [`RESOLUTION`] bytes.
//! - **Staying right.** The value in effect is confirmed every [`Timing::confirm_every`] with
//!   one probe of that size; when it goes unanswered [`Timing::tries`] times the path shrank:
//!   the floor takes effect at once (traffic flows again) and a search below the old value
//!   starts. Every [`Timing::grow_every`] a value below the ceiling searches upward, since
//!   paths also grow. [`Prober::suspect`] brings the next confirmation forward when the data
//!   plane sees traffic leave without any coming back (large packets going unanswered).
//! - **No answer at all.** A peer that answers not even the floor is down or runs an agent
//!   without probing; its value stays what it was (none at first: the route keeps the
//!   static MTU, as before path MTU discovery), and the search starts over later.

use std::time::{Duration, Instant};

/// The smallest size assumed to pass: IPv6's minimum link MTU (1280) less WireGuard's
/// overhead over IPv6 (80).
pub const FLOOR: u16 = 1200;

/// The search stops when the largest good size and the smallest too-big size are closer
/// than this.
pub const RESOLUTION: u16 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a probe waits for its acknowledgement.
    pub timeout: Duration,
    /// Probes of one size that must go unanswered in a row before it counts as too big.
    pub tries: u8,
    /// How often the value in effect is confirmed.
    pub confirm_every: Duration,
    /// How often a value below the ceiling looks for more.
    pub grow_every: Duration,
    /// Two suspicions closer than this lead to one confirmation.
    pub suspect_gap: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            timeout: Duration::from_millis(500),
            tries: 2,
            confirm_every: Duration::from_secs(5),
            grow_every: Duration::from_secs(600),
            suspect_gap: Duration::from_secs(1),
        }
    }
}

/// A probe to send now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub id: u32,
    /// The IP packet's total size.
    pub size: u16,
}

/// Why a probe is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Search,
    Confirm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attempt {
    id: u32,
    size: u16,
    purpose: Purpose,
    deadline: Instant,
    /// Probes of this size sent so far, this one included.
    sent: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Searching `(lo, hi]`: `lo` is good (or the assumed floor), `hi` the largest size
    /// not yet known to be too big.
    Search {
        lo: u16,
        hi: u16,
        /// Whether some probe of this search was acknowledged (`lo` is proven).
        answered: bool,
        /// The next probe tries `hi` itself rather than the middle.
        top_first: bool,
    },
    /// Nothing to learn until `confirm` (or `grow`).
    Idle { confirm: Instant, grow: Instant },
    /// The peer answered nothing, not even the floor: search afresh at `until`.
    Wait { until: Instant },
}

/// One peer's path MTU discovery.
#[derive(Clone, Debug)]
pub struct Prober {
    ceiling: u16,
    timing: Timing,
    value: Option<u16>,
    phase: Phase,
    inflight: Option<Attempt>,
    next_id: u32,
    last_suspect: Option<Instant>,
}

impl Prober {
    /// A peer whose path is at most `ceiling` (the smaller tunnel MTU); the search starts at
    /// once.
    pub fn new(ceiling: u16, timing: Timing) -> Prober {
        let ceiling = ceiling.max(FLOOR);
        Prober {
            ceiling,
            timing,
            value: None,
            phase: Self::fresh(ceiling),
            inflight: None,
            next_id: 1,
            last_suspect: None,
        }
    }

    fn fresh(ceiling: u16) -> Phase {
        Phase::Search {
            lo: FLOOR,
            hi: ceiling,
            answered: false,
            top_first: true,
        }
    }

    /// The path MTU in effect: `None` until a search ever finished.
    pub fn value(&self) -> Option<u16> {
        self.value
    }

    pub fn ceiling(&self) -> u16 {
        self.ceiling
    }

    /// The ceiling moved (a tunnel's MTU changed): search afresh below the new one.
    pub fn set_ceiling(&mut self, ceiling: u16) {
        let ceiling = ceiling.max(FLOOR);
        if ceiling == self.ceiling {
            return;
        }
        self.ceiling = ceiling;
        self.value = self.value.map(|v| v.min(ceiling));
        self.inflight = None;
        self.phase = Self::fresh(ceiling);
    }

    /// The probe to send at `now`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<Probe> {
        if let Some(a) = self.inflight {
            if now < a.deadline {
                return None;
            }
            self.inflight = None;
            if a.sent < self.timing.tries {
                return Some(self.send(a.size, a.purpose, a.sent + 1, now));
            }
            self.too_big(a, now);
        }
        match self.phase {
            Phase::Search {
                lo, hi, top_first, ..
            } => {
                let size = if top_first {
                    hi
                } else if hi - lo < RESOLUTION {
                    // Nothing answered and nothing left above the floor: verify the floor.
                    lo
                } else {
                    lo + (hi - lo).div_ceil(2)
                };
                Some(self.send(size, Purpose::Search, 1, now))
            }
            Phase::Wait { until } => {
                if now < until {
                    return None;
                }
                self.phase = Self::fresh(self.ceiling);
                self.poll(now)
            }
            Phase::Idle { confirm, grow } => {
                let value = self.value?;
                if now >= grow && value < self.ceiling {
                    self.phase = Phase::Search {
                        lo: value,
                        hi: self.ceiling,
                        answered: true,
                        top_first: true,
                    };
                    return self.poll(now);
                }
                (now >= confirm).then(|| self.send(value, Purpose::Confirm, 1, now))
            }
        }
    }

    /// When [`Prober::poll`] next has something to do (`None`: right away).
    pub fn next_wake(&self) -> Option<Instant> {
        if let Some(a) = self.inflight {
            return Some(a.deadline);
        }
        match self.phase {
            Phase::Search { .. } => None,
            Phase::Wait { until } => Some(until),
            Phase::Idle { confirm, grow } => Some(match self.value {
                Some(v) if v < self.ceiling => confirm.min(grow),
                _ => confirm,
            }),
        }
    }

    /// An acknowledgement of probe `id` arrived at `now`; returns whether the value in
    /// effect changed.
    pub fn on_ack(&mut self, id: u32, now: Instant) -> bool {
        let Some(a) = self.inflight.filter(|a| a.id == id) else {
            return false;
        };
        self.inflight = None;
        let before = self.value;
        match (a.purpose, self.phase) {
            (
                Purpose::Search,
                Phase::Search {
                    lo,
                    answered: false,
                    ..
                },
            ) if a.size == lo && self.ceiling - lo >= RESOLUTION => {
                // Only the floor answered: the larger sizes may have failed because the
                // peer was away, not because of their size. The floor now, and look again.
                self.value = Some(lo);
                self.phase = Phase::Search {
                    lo,
                    hi: self.ceiling,
                    answered: true,
                    top_first: true,
                };
            }
            (Purpose::Search, Phase::Search { hi, .. }) => {
                if hi.saturating_sub(a.size) < RESOLUTION {
                    self.finish(a.size, now);
                } else {
                    self.phase = Phase::Search {
                        lo: a.size,
                        hi,
                        answered: true,
                        top_first: false,
                    };
                }
            }
            (Purpose::Confirm, Phase::Idle { grow, .. }) => {
                self.phase = Phase::Idle {
                    confirm: now + self.timing.confirm_every,
                    grow,
                };
            }
            _ => {}
        }
        self.value != before
    }

    /// The data plane saw traffic to the peer go unanswered: confirm now rather than at the
    /// next period (at most once per [`Timing::suspect_gap`]).
    pub fn suspect(&mut self, now: Instant) {
        if self
            .last_suspect
            .is_some_and(|t| now.duration_since(t) < self.timing.suspect_gap)
        {
            return;
        }
        self.last_suspect = Some(now);
        if let Phase::Idle { confirm, .. } = &mut self.phase {
            *confirm = (*confirm).min(now);
        }
    }

    fn send(&mut self, size: u16, purpose: Purpose, sent: u8, now: Instant) -> Probe {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.inflight = Some(Attempt {
            id,
            size,
            purpose,
            deadline: now + self.timing.timeout,
            sent,
        });
        Probe { id, size }
    }

    /// `a.size` went unanswered every time.
    fn too_big(&mut self, a: Attempt, now: Instant) {
        match (a.purpose, self.phase) {
            (Purpose::Search, Phase::Search { lo, answered, .. }) => {
                if a.size <= lo {
                    // Not even the floor: the peer is down or does not answer probes. The
                    // value stays; a fresh search later.
                    self.phase = Phase::Wait {
                        until: now + self.timing.confirm_every,
                    };
                    return;
                }
                let hi = a.size - 1;
                if answered && hi - lo < RESOLUTION {
                    self.finish(lo, now);
                } else {
                    self.phase = Phase::Search {
                        lo,
                        hi,
                        answered,
                        top_first: false,
                    };
                }
            }
            (Purpose::Confirm, Phase::Idle { .. }) => {
                // The path shrank: the floor at once, then look for the most it carries.
                self.value = Some(FLOOR);
                self.phase = Phase::Search {
                    lo: FLOOR,
                    hi: a.size.saturating_sub(1).max(FLOOR),
                    answered: false,
                    top_first: false,
                };
            }
            _ => {}
        }
    }

    fn finish(&mut self, value: u16, now: Instant) {
        self.value = Some(value);
        self.phase = Phase::Idle {
            confirm: now + self.timing.confirm_every,
            grow: now + self.timing.grow_every,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(20);

    /// A simulated peer behind a path: `carries(size, at)` says whether a probe of `size`
    /// sent `at` (seconds since the start) is acknowledged.
    struct Sim {
        prober: Prober,
        start: Instant,
        now: Instant,
        /// (when it arrives, probe id)
        ack: Option<(Instant, u32)>,
        sent: Vec<(f64, u16)>,
        /// (seconds, new value) for every change of the value in effect.
        changes: Vec<(f64, Option<u16>)>,
    }

    impl Sim {
        fn new(ceiling: u16) -> Sim {
            let start = Instant::now();
            Sim {
                prober: Prober::new(ceiling, Timing::default()),
                start,
                now: start,
                ack: None,
                sent: Vec::new(),
                changes: Vec::new(),
            }
        }

        fn secs(&self) -> f64 {
            self.now.duration_since(self.start).as_secs_f64()
        }

        /// Runs until `until` seconds.
        fn run(&mut self, until: f64, carries: impl Fn(u16, f64) -> bool) {
            let end = self.start + Duration::from_secs_f64(until);
            while self.now < end {
                let before = self.prober.value();
                if let Some((at, id)) = self.ack.filter(|(at, _)| *at <= self.now) {
                    self.ack = None;
                    self.prober.on_ack(id, at);
                } else if let Some(p) = self.prober.poll(self.now) {
                    self.sent.push((self.secs(), p.size));
                    if carries(p.size, self.secs()) {
                        self.ack = Some((self.now + RTT, p.id));
                    }
                } else {
                    let wake = [self.prober.next_wake(), self.ack.map(|a| a.0)]
                        .into_iter()
                        .flatten()
                        .min()
                        .unwrap_or(end);
                    self.now = wake.min(end).max(self.now);
                    if self.now >= end {
                        break;
                    }
                }
                if self.prober.value() != before {
                    self.changes.push((self.secs(), self.prober.value()));
                }
            }
        }

        fn probes_between(&self, from: f64, to: f64) -> usize {
            self.sent
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .count()
        }
    }

    fn limit(max: u16) -> impl Fn(u16, f64) -> bool {
        move |size, _| size <= max
    }

    #[test]
    fn table() {
        // name, ceiling, path limit (inner bytes), expected value after 30 s, max probes
        // in those 30 s.
        let cases: &[(&str, u16, u16, Option<u16>, usize)] = &[
            (
                "a full path keeps the full size with one probe",
                1420,
                1420,
                Some(1420),
                8,
            ),
            (
                "a path larger than the tunnel: the tunnel",
                1420,
                9000,
                Some(1420),
                8,
            ),
            (
                "a 1300-byte path over IPv4: 1240 inside",
                1420,
                1240,
                Some(1240),
                30,
            ),
            ("a 1380-byte path: 1320 inside", 1420, 1320, Some(1320), 30),
            (
                "a path at the floor: searched twice, as the floor alone answered",
                1420,
                FLOOR,
                Some(FLOOR),
                40,
            ),
            (
                "a smaller tunnel bounds the search",
                1320,
                1500,
                Some(1320),
                8,
            ),
            (
                "a ceiling below the floor is the floor",
                1000,
                1500,
                Some(FLOOR),
                8,
            ),
            ("nothing answers: no value, a slow retry", 1420, 0, None, 60),
        ];
        for &(name, ceiling, max, want, most) in cases {
            let mut sim = Sim::new(ceiling);
            sim.run(30.0, limit(max));
            let v = sim.prober.value();
            match (v, want) {
                (Some(v), Some(w)) => assert!(
                    v <= w && w - v < RESOLUTION,
                    "{name}: {v}, want {w} (within {RESOLUTION} below)"
                ),
                _ => assert_eq!(v, want, "{name}"),
            }
            assert!(
                sim.sent.len() <= most,
                "{name}: {} probes in 30 s: {:?}",
                sim.sent.len(),
                sim.sent
            );
            // The value never went above what the path carries.
            if max > 0 {
                for (_, c) in &sim.changes {
                    assert!(c.is_none_or(|c| c <= max.max(FLOOR)), "{name}: {c:?}");
                }
            }
        }
    }

    #[test]
    fn a_full_path_is_never_shrunk_and_costs_twelve_probes_a_minute() {
        let mut sim = Sim::new(1420);
        sim.run(600.0, limit(1500));
        assert_eq!(sim.changes, vec![(0.02, Some(1420))]);
        let per_minute = sim.probes_between(60.0, 540.0) as f64 / 8.0;
        assert!((11.0..=13.0).contains(&per_minute), "{per_minute}");
    }

    #[test]
    fn a_path_that_shrinks_drops_to_the_floor_at_once_then_finds_the_new_size() {
        let mut sim = Sim::new(1420);
        // 1380 on the wire (1320 inside) until t = 20 s, then 1300 (1240).
        let path = |size: u16, t: f64| size <= if t < 20.0 { 1320 } else { 1240 };
        sim.run(60.0, path);
        let after: Vec<_> = sim.changes.iter().filter(|(t, _)| *t >= 20.0).collect();
        let (floor_at, floor) = after[0];
        assert_eq!(*floor, Some(FLOOR), "{:?}", sim.changes);
        // Confirmations every 5 s, two unanswered 0.5 s apart.
        assert!(*floor_at - 20.0 <= 5.0 + 1.0, "{:?}", sim.changes);
        let (settled_at, settled) = after[after.len() - 1];
        assert!(
            settled.is_some_and(|v| (1237..=1240).contains(&v)),
            "{after:?}"
        );
        assert!(*settled_at - 20.0 <= 12.0, "{:?}", sim.changes);
    }

    #[test]
    fn a_suspicion_confirms_at_once() {
        let mut sim = Sim::new(1420);
        sim.run(2.0, limit(1420));
        let base = sim.sent.len();
        sim.prober.suspect(sim.now);
        sim.run(2.1, limit(1420));
        assert_eq!(sim.sent.len(), base + 1, "one confirmation at once");
        // A second suspicion within a second does nothing more.
        sim.prober.suspect(sim.now);
        sim.run(2.2, limit(1420));
        assert_eq!(sim.sent.len(), base + 1);
    }

    #[test]
    fn one_lost_probe_does_not_shrink_the_path() {
        let mut sim = Sim::new(1420);
        let lost = std::cell::Cell::new(false);
        // The first probe of 1420 is lost by chance; the second passes.
        sim.run(10.0, |size, _| {
            if size == 1420 && !lost.get() {
                lost.set(true);
                return false;
            }
            true
        });
        assert_eq!(sim.prober.value(), Some(1420), "{:?}", sim.sent);
    }

    #[test]
    fn a_path_that_grows_is_found_on_the_next_look_upward() {
        let mut sim = Sim::new(1420);
        let path = |size: u16, t: f64| size <= if t < 100.0 { 1240 } else { 1420 };
        sim.run(700.0, path);
        assert_eq!(sim.prober.value(), Some(1420), "{:?}", sim.changes);
        let (t, _) = sim.changes[sim.changes.len() - 1];
        // Found on the first look upward, ten minutes after the search ended.
        assert!((600.0..=610.0).contains(&t), "{:?}", sim.changes);
    }

    #[test]
    fn a_peer_that_comes_back_is_searched_afresh() {
        let mut sim = Sim::new(1420);
        sim.run(40.0, |size, t| t >= 20.0 && size <= 1320);
        assert!(
            sim.prober
                .value()
                .is_some_and(|v| (1317..=1320).contains(&v)),
            "{:?}",
            sim.sent
        );
    }

    #[test]
    fn a_late_or_unknown_ack_is_ignored() {
        let mut p = Prober::new(1420, Timing::default());
        let now = Instant::now();
        let probe = p.poll(now).unwrap();
        assert!(!p.on_ack(probe.id + 7, now));
        assert_eq!(p.value(), None);
        assert!(p.on_ack(probe.id, now));
        assert!(!p.on_ack(probe.id, now), "twice");
        assert_eq!(p.value(), Some(1420));
    }
}
