//! The receiver index a session shows on the wire.
//!
//! boringtun numbers a peer's sessions `peer index << 8 | counter`, so an observer sees the
//! index of a peer's next session one above the last (the kernel and wireguard-go draw 32
//! random bits per handshake and keep a table of them). The engine instead hands every
//! `Tunn` a keyed permutation (`boringtun` patch 4, `Tunn::set_index_map`): the wire index
//! is `seal(counter index)` and the engine finds the peer by `open(index) >> 8`, with no
//! table to keep in step with boringtun's sessions and nothing more than a few
//! multiplications on the packet path. The key comes from the engine's
//! [`crate::clock::IndexSource`], so a seeded test run repeats.
//!
//! The low 3 bits stay the counter's: boringtun stores a session in slot `index % 8`, and
//! the slots must take turns, so an observer still sees those 3 bits step by one. The upper
//! 29 bits go through three keyed multiply–xorshift rounds tweaked by those 3 bits, a
//! bijection on 29 bits: they change unpredictably with every session for an observer who
//! does not know the key. It is not a cipher, and (like boringtun's counter) the index of
//! the 256th next handshake repeats.

use crate::clock::IndexSource;

const MASK: u32 = (1 << 29) - 1;
const SHIFTS: [u32; 3] = [15, 16, 15];

/// A secret permutation of the 32-bit session indices that keeps the low 3 bits.
#[derive(Debug, Clone)]
pub struct IndexPermutation {
    xor: [u32; 3],
    mul: [u32; 3],
    inv: [u32; 3],
}

impl IndexPermutation {
    pub fn new(source: &dyn IndexSource) -> IndexPermutation {
        let mut xor = [0; 3];
        let mut mul = [0; 3];
        let mut inv = [0; 3];
        for i in 0..3 {
            xor[i] = source.next_u32() & MASK;
            mul[i] = source.next_u32() | 1;
            inv[i] = inverse(mul[i]);
        }
        IndexPermutation { xor, mul, inv }
    }

    /// The wire index of boringtun's session index `x`.
    pub fn seal(&self, x: u32) -> u32 {
        let mut y = x >> 3;
        for (i, shift) in SHIFTS.iter().enumerate() {
            y ^= self.round_key(i, x);
            y = y.wrapping_mul(self.mul[i]) & MASK;
            y ^= y >> shift;
        }
        (y << 3) | (x & 0x7)
    }

    /// Round `i`'s key, tweaked by the low 3 bits (which the wire index shows), so that the
    /// upper bits change with every session, not every eighth.
    fn round_key(&self, i: usize, index: u32) -> u32 {
        (self.xor[i] ^ (index & 0x7).wrapping_mul(self.mul[(i + 1) % 3])) & MASK
    }

    /// boringtun's session index behind the wire index `y`.
    pub fn open(&self, y: u32) -> u32 {
        let mut x = y >> 3;
        for (i, shift) in SHIFTS.iter().enumerate().rev() {
            // Every shift is at least half of 29 bits: one xor undoes it.
            x ^= x >> shift;
            x = x.wrapping_mul(self.inv[i]) & MASK;
            x ^= self.round_key(i, y);
        }
        (x << 3) | (y & 0x7)
    }
}

/// The inverse of an odd `m` modulo 2^32 (Newton's iteration doubles the good bits).
fn inverse(m: u32) -> u32 {
    let mut inv = m;
    for _ in 0..5 {
        inv = inv.wrapping_mul(2u32.wrapping_sub(m.wrapping_mul(inv)));
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SeededIndices;

    #[test]
    fn open_undoes_seal_and_the_slot_bits_stay() {
        for seed in [1, 2, 3, 0xdead_beef] {
            let p = IndexPermutation::new(&SeededIndices::new(seed));
            let source = SeededIndices::new(seed + 100);
            let mut samples: Vec<u32> = (0..10_000).map(|_| source.next_u32()).collect();
            samples.extend([0, 1, 7, 8, 0xff, 0x100, u32::MAX, u32::MAX - 7]);
            for x in samples {
                let y = p.seal(x);
                assert_eq!(p.open(y), x, "seed {seed}: {x:#x} -> {y:#x}");
                assert_eq!(y & 7, x & 7);
            }
        }
    }

    #[test]
    fn a_peers_successive_sessions_look_unrelated() {
        let p = IndexPermutation::new(&SeededIndices::new(9));
        let peer = 0x25_cc10u32;
        let wire: Vec<u32> = (1..=64u32).map(|c| p.seal(peer << 8 | c)).collect();
        for w in wire.windows(2) {
            assert_ne!(w[0] >> 8, w[1] >> 8, "{wire:x?}");
            assert_ne!(w[1].wrapping_sub(w[0]), 1, "{wire:x?}");
        }
        // About half the upper bits flip from one session to the next.
        let flips: u32 = wire
            .windows(2)
            .map(|w| ((w[0] ^ w[1]) >> 3).count_ones())
            .sum();
        let mean = f64::from(flips) / 63.0;
        assert!((10.0..=19.0).contains(&mean), "mean flips {mean}");
        // Another key, other indices.
        let q = IndexPermutation::new(&SeededIndices::new(10));
        assert_ne!(p.seal(peer << 8 | 1), q.seal(peer << 8 | 1));
    }
}
