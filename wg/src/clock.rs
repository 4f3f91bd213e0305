//! Time and randomness as the engine's inputs, so every timer and every index has a
//! deterministic test in memory.
//!
//! The engine reads the time only through a [`Clock`] and draws receiver indices only from
//! an [`IndexSource`], both given to [`crate::Engine::with_sources`] (the house pattern of
//! the coordinator's and health code's `now` parameters, one level up: the engine is called
//! from threads that cannot be handed a `now` per call). Production uses [`SystemClock`]
//! and [`OsIndices`]; tests use a clock they advance and [`SeededIndices`].
//!
//! boringtun 0.7.1 has no API that takes the time: `Tunn::update_timers`, `encapsulate`
//! and `decapsulate` read `Instant::now()` themselves (its `sleepyinstant`,
//! `CLOCK_BOOTTIME` on Linux; `timers.rs:172`, `handshake.rs:636,774`). Its only hook,
//! the `mock-instant` feature, swaps the clock for the whole process (a `mock_instant`
//! global that starts at zero and never moves by itself), and cargo's feature unification
//! would switch it on in the agent binary too whenever any test in the workspace asked for
//! it. So isthmus never enables it; the engine's tests move boringtun's clock with a
//! test-only `clock_gettime(CLOCK_BOOTTIME)` override that exists in the `isthmus-wg` unit
//! test binary alone (`engine_tests::virtual_time`). See docs/protocol.md, "Time and
//! randomness".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand_core::RngCore;

/// Where the engine reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic clock of the host.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Where the engine draws receiver indices (and any other value that must not be
/// guessable by an observer, yet reproducible in a test).
pub trait IndexSource: Send + Sync {
    fn next_u32(&self) -> u32;
}

/// The operating system's random number generator: indices differ on every device and
/// every restart, and an observer cannot predict the next one.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsIndices;

impl IndexSource for OsIndices {
    fn next_u32(&self) -> u32 {
        rand_core::OsRng.next_u32()
    }
}

/// A reproducible sequence for tests: SplitMix64 from `seed`. Well spread (consecutive
/// draws are unrelated), *not* secret — never for a running device.
#[derive(Debug)]
pub struct SeededIndices {
    state: AtomicU64,
}

impl SeededIndices {
    pub fn new(seed: u64) -> SeededIndices {
        SeededIndices {
            state: AtomicU64::new(seed),
        }
    }
}

impl IndexSource for SeededIndices {
    fn next_u32(&self) -> u32 {
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut z = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_spread_sequence_and_another_seed_another() {
        let draw = |seed| {
            let s = SeededIndices::new(seed);
            (0..64).map(|_| s.next_u32()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let seq = draw(7);
        // Not a counter: no two consecutive draws are 1 apart, and all are distinct.
        assert!(seq.windows(2).all(|w| w[0].abs_diff(w[1]) > 1));
        let mut sorted = seq.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), seq.len());
    }
}
