//! Staging for outbound datagrams: sealed back to back into one buffer and grouped into
//! runs that one UDP GSO send can carry — same destination, same size (the last of a run
//! may be shorter). Allocated once per thread; no allocation per packet.

use std::net::SocketAddr;

use crate::sockets::{MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

/// A run of equally sized datagrams to one destination, back to back in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    to: SocketAddr,
    start: usize,
    end: usize,
    segment: usize,
    count: usize,
    /// The last datagram was shorter than `segment`: nothing more may join.
    closed: bool,
}

pub struct OutBatch {
    buf: Box<[u8]>,
    used: usize,
    runs: Vec<Run>,
}

impl OutBatch {
    /// Room for `bytes` of datagrams in at most `runs` runs.
    pub fn new(bytes: usize, runs: usize) -> OutBatch {
        OutBatch {
            buf: vec![0u8; bytes].into_boxed_slice(),
            used: 0,
            runs: Vec::with_capacity(runs),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Where the next datagram starts in the buffer: the `start` of a
    /// [`crate::workers::SealJobs`] job for a datagram about to be committed.
    pub fn offset(&self) -> usize {
        self.used
    }

    /// The committed datagrams, back to back, for the workers to seal in place before the
    /// flush.
    pub fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.used]
    }

    /// The free space to seal the next datagram into, if at least `need` bytes and a run
    /// slot are left (otherwise flush first).
    pub fn space(&mut self, need: usize) -> Option<&mut [u8]> {
        let free = &mut self.buf[self.used..];
        (free.len() >= need && self.runs.len() < self.runs.capacity()).then_some(free)
    }

    /// Commits the `len` bytes just written at the start of [`OutBatch::space`] as a
    /// datagram to `to`.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        let start = self.used;
        self.used += len;
        if let Some(r) = self.runs.last_mut() {
            if r.to == to
                && !r.closed
                && len <= r.segment
                && r.count < MAX_GSO_SEGMENTS
                && r.end - r.start + len <= MAX_GSO_BYTES
            {
                r.end += len;
                r.count += 1;
                r.closed = len < r.segment;
                return;
            }
        }
        self.runs.push(Run {
            to,
            start,
            end: start + len,
            segment: len,
            count: 1,
            closed: false,
        });
    }

    /// Empties the batch without sending anything.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.used = 0;
    }

    /// Hands every run to `send(to, datagrams, segment)` in order and empties the batch.
    pub fn flush(&mut self, mut send: impl FnMut(SocketAddr, &[u8], usize)) {
        for r in &self.runs {
            send(r.to, &self.buf[r.start..r.end], r.segment);
        }
        self.runs.clear();
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(datagrams: &[(u16, usize)], bytes: usize) -> Vec<(u16, usize, usize)> {
        let mut b = OutBatch::new(bytes, 64);
        for &(port, len) in datagrams {
            let to = SocketAddr::from(([192, 0, 2, 1], port));
            let space = b.space(len).expect("room");
            space[..len].fill(port as u8);
            b.commit(to, len);
        }
        let mut out = Vec::new();
        b.flush(|to, data, seg| {
            assert!(
                data.iter().all(|&x| x == to.port() as u8),
                "bytes kept in place"
            );
            out.push((to.port(), data.len(), seg));
        });
        assert!(b.is_empty());
        out
    }

    #[test]
    fn datagrams_group_into_gso_runs() {
        // (datagrams as (destination port, length), expected runs as (port, bytes, segment))
        type Case<'a> = (&'a [(u16, usize)], &'a [(u16, usize, usize)]);
        let cases: [Case; 6] = [
            (&[(1, 1452), (1, 1452), (1, 1452)], &[(1, 4356, 1452)]),
            (&[(1, 1452), (1, 1452), (1, 100)], &[(1, 3004, 1452)]),
            // Nothing joins after a short one, nor a larger one.
            (
                &[(1, 100), (1, 100), (1, 1452)],
                &[(1, 200, 100), (1, 1452, 1452)],
            ),
            (
                &[(1, 1452), (1, 100), (1, 1452)],
                &[(1, 1552, 1452), (1, 1452, 1452)],
            ),
            // Another destination starts another run.
            (
                &[(1, 1452), (2, 1452), (1, 1452)],
                &[(1, 1452, 1452), (2, 1452, 1452), (1, 1452, 1452)],
            ),
            (&[], &[]),
        ];
        for (datagrams, want) in cases {
            assert_eq!(runs(datagrams, 1 << 20), want.to_vec(), "{datagrams:?}");
        }
    }

    #[test]
    fn runs_respect_the_gso_limits() {
        // 64 KiB of payload at most: 45 datagrams of 1452 bytes.
        let many = vec![(1u16, 1452usize); 50];
        assert_eq!(
            runs(&many, 1 << 20),
            vec![(1, 45 * 1452, 1452), (1, 5 * 1452, 1452)]
        );
        // 64 segments at most.
        let small = vec![(1u16, 100usize); 70];
        assert_eq!(runs(&small, 1 << 20), vec![(1, 6400, 100), (1, 600, 100)]);
    }

    #[test]
    fn a_full_batch_asks_for_a_flush() {
        let mut b = OutBatch::new(3000, 2);
        assert!(b.space(1452).is_some());
        b.commit(SocketAddr::from(([192, 0, 2, 1], 1)), 1452);
        b.commit(SocketAddr::from(([192, 0, 2, 1], 2)), 1452);
        assert!(b.space(100).is_none(), "no run slot left");
        let mut b = OutBatch::new(3000, 8);
        b.commit(SocketAddr::from(([192, 0, 2, 1], 1)), 1452);
        b.commit(SocketAddr::from(([192, 0, 2, 1], 1)), 1452);
        assert!(b.space(97).is_none(), "no bytes left");
        assert!(b.space(96).is_some());
    }
}
