//! Handshake load shedding, as the kernel (`drivers/net/wireguard/ratelimiter.c`) and
//! wireguard-go (`ratelimiter/`) do it: a device-wide meter decides when the device is under
//! load, and under load every initiation must carry a valid cookie (MAC2, checked by the
//! engine) *and* fit a token bucket kept per source address. Without the bucket, one source
//! that answers cookie replies gets all the Diffie-Hellman work it asks for and starves every
//! other peer's handshakes (and the packet thread that does that work).
//!
//! Pure: time comes in as `now`, so the tests are tables, not sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake initiations per second the device answers before it is under load and demands
/// cookies (boringtun's and wireguard-go's order of magnitude).
pub const DEVICE_HANDSHAKES_PER_SECOND: u32 = 100;

/// How long the device stays under load after the meter last went over: the kernel's
/// choice, so a flood that pauses at a window boundary does not get a free second.
pub const LOAD_HOLD: Duration = Duration::from_secs(1);

/// One source's sustained rate under load (kernel and wireguard-go: 20/s).
pub const SOURCE_PACKETS_PER_SECOND: u32 = 20;

/// How many a source may send at once before the sustained rate applies (kernel: 5).
pub const SOURCE_BURST: u32 = 5;

/// A source not seen for this long has a full bucket again, so forgetting it changes
/// nothing; the kernel collects its entries after the same second.
pub const SOURCE_IDLE: Duration = Duration::from_secs(1);

/// The most sources tracked at once (the kernel scales its cap with memory; 16 Ki entries
/// is a few hundred KiB). A new source while the table is full, every entry active within
/// the last second, is refused, as the kernel refuses it: each entry there proved with its
/// cookie that it owns its address, and letting it go would hand it a fresh burst.
pub const MAX_SOURCES: usize = 16 * 1024;

/// What the token bucket counts in: nanoseconds of credit, one packet costing a 20th of a
/// second (the kernel's representation, exact with integers).
const PACKET_COST: u64 = 1_000_000_000 / SOURCE_PACKETS_PER_SECOND as u64;
const TOKEN_MAX: u64 = PACKET_COST * SOURCE_BURST as u64;

/// The device's handshake load and the per-source buckets, behind one lock in the engine.
#[derive(Debug)]
pub struct HandshakeLimiter {
    /// Start of the current one-second counting window, and the initiations in it.
    window_start: Option<Instant>,
    window_count: u32,
    /// Under load until then.
    loaded_until: Option<Instant>,
    sources: HashMap<Source, Bucket>,
    max_sources: usize,
}

/// What a bucket is kept for: an IPv4 address, or an IPv6 /64 (one host's usual
/// allocation, so rotating the low bits of an address buys an attacker nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    fn of(addr: IpAddr) -> Source {
        match addr.to_canonical() {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => Source::V6((u128::from(a) >> 64) as u64),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    last: Instant,
    tokens: u64,
}

impl Default for HandshakeLimiter {
    fn default() -> Self {
        HandshakeLimiter::with_capacity(MAX_SOURCES)
    }
}

impl HandshakeLimiter {
    pub fn new() -> HandshakeLimiter {
        HandshakeLimiter::default()
    }

    /// A limiter tracking at most `max_sources` sources (the tests use small tables).
    pub fn with_capacity(max_sources: usize) -> HandshakeLimiter {
        HandshakeLimiter {
            window_start: None,
            window_count: 0,
            loaded_until: None,
            sources: HashMap::new(),
            max_sources,
        }
    }

    /// Counts one initiation (with a valid MAC1) arriving at `now` and says whether the
    /// device is under load: more than [`DEVICE_HANDSHAKES_PER_SECOND`] in the current
    /// second, or within [`LOAD_HOLD`] of that.
    pub fn arrive(&mut self, now: Instant) -> bool {
        let window_over = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if window_over {
            self.window_start = Some(now);
            self.window_count = 0;
        }
        self.window_count = self.window_count.saturating_add(1);
        if self.window_count > DEVICE_HANDSHAKES_PER_SECOND {
            self.loaded_until = Some(now + LOAD_HOLD);
        }
        self.under_load(now)
    }

    /// Whether the device is under load at `now`, without counting anything.
    pub fn under_load(&self, now: Instant) -> bool {
        self.loaded_until.is_some_and(|until| now < until)
    }

    /// Whether an initiation from `addr` at `now` fits its source's bucket (and takes a
    /// token if so). Asked only under load, after the cookie checked out.
    pub fn allow(&mut self, addr: IpAddr, now: Instant) -> bool {
        let source = Source::of(addr);
        if let Some(bucket) = self.sources.get_mut(&source) {
            let earned = now.saturating_duration_since(bucket.last).as_nanos();
            bucket.tokens = TOKEN_MAX.min(bucket.tokens.saturating_add(clamp_u64(earned)));
            bucket.last = now;
            if bucket.tokens < PACKET_COST {
                return false;
            }
            bucket.tokens -= PACKET_COST;
            return true;
        }
        if self.sources.len() >= self.max_sources {
            self.collect(now);
            if self.sources.len() >= self.max_sources {
                return false;
            }
        }
        self.sources.insert(
            source,
            Bucket {
                last: now,
                tokens: TOKEN_MAX - PACKET_COST,
            },
        );
        true
    }

    /// Forgets the sources idle for [`SOURCE_IDLE`] (their buckets are full again); the
    /// engine calls it from its timer tick, so memory follows the last second's sources.
    pub fn collect(&mut self, now: Instant) {
        self.sources
            .retain(|_, b| now.saturating_duration_since(b.last) < SOURCE_IDLE);
    }

    /// How many sources are tracked (for tests and diagnostics).
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }
}

fn clamp_u64(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// (milliseconds after the start, source, allowed?): the kernel's own selftest shape.
    #[test]
    fn one_source_gets_its_burst_then_twenty_a_second() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new();
        let a = "192.0.2.7";
        let table: &[(u64, &str, bool)] = &[
            // Burst of 5 at once, the 6th refused.
            (0, a, true),
            (0, a, true),
            (0, a, true),
            (0, a, true),
            (0, a, true),
            (0, a, false),
            // 49 ms later not yet a token; at 50 ms one.
            (49, a, false),
            (50, a, true),
            (50, a, false),
            // Another source is untouched by the first one's exhaustion.
            (50, "192.0.2.8", true),
            // 20/s sustained: one every 50 ms.
            (100, a, true),
            (100, a, false),
            (150, a, true),
            // Idle long enough to refill, but never past the burst.
            (10_000, a, true),
            (10_000, a, true),
            (10_000, a, true),
            (10_000, a, true),
            (10_000, a, true),
            (10_000, a, false),
        ];
        for (i, &(at, src, want)) in table.iter().enumerate() {
            assert_eq!(
                l.allow(ip(src), t0 + ms(at)),
                want,
                "row {i}: {src} at {at} ms"
            );
        }
    }

    #[test]
    fn a_sustained_flood_gets_twenty_a_second() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new();
        // 10,000 initiations a second for 3 s from one address.
        let allowed = (0..30_000u64)
            .filter(|i| l.allow(ip("198.51.100.1"), t0 + Duration::from_micros(i * 100)))
            .count();
        assert_eq!(
            allowed,
            5 + 3 * 20 - 1,
            "burst plus 20/s, less the first token"
        );
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new();
        for i in 0..5 {
            assert!(l.allow(ip(&format!("2001:db8:1:2::{i:x}")), t0), "host {i}");
        }
        assert!(!l.allow(ip("2001:db8:1:2:ffff::1"), t0), "same /64");
        assert!(l.allow(ip("2001:db8:1:3::1"), t0), "next /64");
        // An IPv4-mapped address is the IPv4 source.
        for _ in 0..5 {
            assert!(l.allow(ip("192.0.2.1"), t0));
        }
        assert!(!l.allow(ip("::ffff:192.0.2.1"), t0));
    }

    #[test]
    fn memory_is_bounded_and_idle_sources_are_forgotten() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::with_capacity(4);
        let src = |i: u8| ip(&format!("203.0.113.{i}"));
        for i in 0..4 {
            assert!(l.allow(src(i), t0));
        }
        // Full with sources active within the second: a fifth is refused, the known ones
        // keep their buckets.
        assert!(!l.allow(src(4), t0 + ms(500)));
        assert!(l.allow(src(0), t0 + ms(500)));
        assert_eq!(l.tracked_sources(), 4);
        // A second later sources 1..3 are idle: the newcomer takes a slot.
        assert!(l.allow(src(4), t0 + ms(1_000)));
        assert_eq!(l.tracked_sources(), 2, "idle sources were collected");
        // The tick's collection empties the table once everyone is idle.
        l.collect(t0 + ms(2_600));
        assert_eq!(l.tracked_sources(), 0);
    }

    #[test]
    fn the_device_is_under_load_above_a_hundred_a_second_and_a_second_after() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new();
        // 100 in the first second: not under load.
        for i in 0..100u64 {
            assert!(!l.arrive(t0 + ms(i * 5)), "initiation {i}");
        }
        // The 101st within the second is.
        assert!(l.arrive(t0 + ms(600)));
        // Still loaded while the window lasts and for a second after the last excess.
        assert!(l.under_load(t0 + ms(1_500)));
        assert!(
            l.arrive(t0 + ms(1_550)),
            "a new window, but inside the hold"
        );
        assert!(!l.under_load(t0 + ms(1_600)));
        // A trickle never loads the device.
        for i in 0..50u64 {
            assert!(!l.arrive(t0 + ms(3_000 + i * 100)));
        }
    }
}
