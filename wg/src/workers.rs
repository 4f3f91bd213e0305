//! Crypto on every core: the AEAD of a batch of data messages spread over a worker pool,
//! one peer's single flow included, with nothing reordered.
//!
//! The kernel's and wireguard-go's scheme, cut to a batch: what must happen in order runs
//! on the thread that owns the batch, under the peer's lock, and is cheap — reserving the
//! sending counters ([`Tunn::reserve_seal`]), the replay check ([`Tunn::open_check`]) and,
//! after decryption, the replay mark and timers ([`Tunn::open_commit`]). Each message gets
//! its slot in the batch buffer in that order; the workers seal or open the slots in place,
//! in any order and on any core; the batch then leaves (GSO sends) or is committed (into
//! GRO coalescing) slot by slot, in the order the slots were assigned. So the wire and the
//! TUN see every peer's packets in the order they came, nonces are never reused (a counter
//! is reserved once, under the lock), and the replay window sees arrivals in arrival order.
//!
//! Nothing is allocated per packet: job lists are reserved once per thread, the caller and
//! the pool threads claim ranges of a batch's jobs from one counter ([`pool`]), and the
//! messages are sealed and opened in the batch buffer itself.
//!
//! [`Tunn::reserve_seal`]: boringtun::noise::Tunn::reserve_seal
//! [`Tunn::open_check`]: boringtun::noise::Tunn::open_check
//! [`Tunn::open_commit`]: boringtun::noise::Tunn::open_commit

use std::ops::Range;

use anyhow::Context;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{OpenKey, SealKey};

/// Where a job's bytes are in the batch buffer.
///
/// # Safety
///
/// `span` must return the same range every time it is called on a job, before and after
/// `run`: the pool checks the spans once ([`check_spans`]) and then hands each job its part
/// of the buffer on any thread.
pub unsafe trait Job: Send {
    /// What every job of a batch reads (the batch's keys).
    type Shared: Sync + ?Sized;
    fn span(&self) -> Range<usize>;
    /// Does the crypto on `part`, which is the buffer's `span()`.
    fn run(&mut self, shared: &Self::Shared, part: &mut [u8]);
}

/// The job spans are unusable: each job must have its own part of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("job {0} overlaps the one before it or is out of order")]
    Overlap(usize),
    #[error("job {0} ends past the buffer")]
    OutOfBounds(usize),
}

/// Whether `spans` (in job order) give every job its own part of a `len`-byte buffer, in
/// ascending order — what lets the pool halve the buffer between jobs without a lock.
pub fn check_spans(
    spans: impl IntoIterator<Item = Range<usize>>,
    len: usize,
) -> Result<(), SpanError> {
    let mut end = 0;
    for (i, s) in spans.into_iter().enumerate() {
        if s.start < end || s.end < s.start {
            return Err(SpanError::Overlap(i));
        }
        if s.end > len {
            return Err(SpanError::OutOfBounds(i));
        }
        end = s.end;
    }
    Ok(())
}

/// How many workers a node with `cores` cores gets by default: one per core, except on two
/// cores or fewer, where none is added. There the TUN reader and the UDP receivers already
/// keep every core busy, and handing packets to more threads only adds hand-offs: on a
/// 2-core machine two workers moved 0.99x (1 stream) and 0.85x (4 streams) of the inline
/// data path's rate for more CPU (`docs/benchmarks.md`, 2026-11-30 14:10).
pub fn default_size(cores: usize) -> usize {
    if cores <= 2 {
        1
    } else {
        cores
    }
}

/// The crypto worker pool. One worker runs every job on the calling thread (no pool, no
/// hand-off: the single-threaded data path as it was); `n` run them on the calling thread
/// and `n - 1` pool threads. Callers on several threads may share it: while one caller's
/// batch holds the pool, another runs its own batch by itself.
pub struct Workers {
    pool: Option<pool::Pool>,
    size: usize,
}

impl Workers {
    /// A pool of `size` workers; 0: [`default_size`] for the cores available.
    pub fn new(size: usize) -> anyhow::Result<Workers> {
        let size = match size {
            0 => default_size(std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        let pool = if size > 1 {
            Some(
                pool::Pool::new(size - 1)
                    .with_context(|| format!("starting {size} crypto workers"))?,
            )
        } else {
            None
        };
        Ok(Workers { pool, size })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs every job on its span of `buf`, spread over the workers; returns when all are
    /// done. Refuses spans that are not [`check_spans`]-clean, running none.
    pub fn run<J: Job>(
        &self,
        jobs: &mut [J],
        shared: &J::Shared,
        buf: &mut [u8],
    ) -> Result<(), SpanError> {
        check_spans(jobs.iter().map(Job::span), buf.len())?;
        let Some(pool) = self.pool.as_ref() else {
            run_all(jobs, shared, buf);
            return Ok(());
        };
        let count = jobs.len();
        let (job_at, buf_at) = (SyncPtr(jobs.as_mut_ptr()), SyncPtr(buf.as_mut_ptr()));
        let task = |range: Range<usize>| {
            for i in range {
                // SAFETY: the pool hands out each index below `count` once, so this is the
                // only reference to job `i`; `jobs` outlives the call and is not used
                // through the slice until `pool.run` returns.
                let job = unsafe { &mut *job_at.get().add(i) };
                let s = job.span();
                // SAFETY: `Job` promises a stable span, and `check_spans` showed the spans
                // in bounds and disjoint: this part of `buf` is job `i`'s alone.
                let part = unsafe {
                    std::slice::from_raw_parts_mut(buf_at.get().add(s.start), s.end - s.start)
                };
                job.run(shared, part);
            }
        };
        if !pool.run(count, &task) {
            // Too small to share, or another thread's batch has the pool: this one runs
            // here, as with no pool.
            run_all(jobs, shared, buf);
        }
        Ok(())
    }
}

/// A pointer the jobs' task may carry to other threads: what it points at is split
/// between them by index (jobs) or by the checked spans (the buffer).
struct SyncPtr<T>(*mut T);

impl<T> SyncPtr<T> {
    /// Through a method, so that a closure captures the whole (`Sync`) wrapper and not the
    /// raw pointer field.
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: the pointee is only reached through disjoint indices or spans (see `Workers::run`)
// and is `Send` (jobs) or plain bytes.
unsafe impl<T: Send> Sync for SyncPtr<T> {}

fn run_all<J: Job>(jobs: &mut [J], shared: &J::Shared, buf: &mut [u8]) {
    for job in jobs {
        let s = job.span();
        job.run(shared, &mut buf[s]);
    }
}

/// A data message to seal in place: the header goes at `start`, the plaintext is already
/// at `start + 16`, `len` bytes, and the tag goes after it; `key` indexes the batch's keys.
pub struct SealJob {
    start: usize,
    len: usize,
    counter: u64,
    key: u16,
    sealed: bool,
}

// SAFETY: the span is computed from fields only `SealJobs::push` sets.
unsafe impl Job for SealJob {
    type Shared = [SealKey];

    fn span(&self) -> Range<usize> {
        self.start..self.start + self.len + crate::DATA_OVERHEAD
    }

    fn run(&mut self, keys: &[SealKey], part: &mut [u8]) {
        self.sealed = keys
            .get(usize::from(self.key))
            .and_then(|k| k.seal_in_place(self.counter, part, self.len))
            .is_some();
        if !self.sealed {
            // Never plaintext on the wire: what leaves instead fails authentication.
            part.fill(0);
        }
    }
}

/// The messages of one outbound batch, in the order their counters were reserved, and the
/// keys they seal under: one copy per session and batch (a key is 560 bytes; copying it
/// per packet costs a sizeable share of the packet's encryption).
pub struct SealJobs {
    jobs: Vec<SealJob>,
    keys: Vec<SealKey>,
    /// Whose the last key is: the caller's session identity and the receiver index.
    last: Option<(usize, u32)>,
}

impl SealJobs {
    /// Room for `capacity` messages per batch, allocated now.
    pub fn with_capacity(capacity: usize) -> SealJobs {
        SealJobs {
            jobs: Vec::with_capacity(capacity),
            keys: Vec::with_capacity(capacity),
            last: None,
        }
    }

    /// Whether another job fits without allocating.
    pub fn has_room(&self) -> bool {
        self.jobs.len() < self.jobs.capacity()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Queues the message at `start` (plaintext at `start + 16`, `len` bytes) to be sealed
    /// under `counter`, which [`boringtun::noise::Tunn::reserve_seal`] reserved with
    /// `receiver_index` on the session the caller names `session` (any value unique among
    /// live sessions: receiver indices are the peers' choice and may collide). `key`
    /// ([`boringtun::noise::Tunn::seal_key`]) is called only for a session the batch has
    /// no key of yet. False (nothing queued) when it gives none.
    pub fn push(
        &mut self,
        start: usize,
        len: usize,
        (session, receiver_index, counter): (usize, u32, u64),
        key: impl FnOnce() -> Option<SealKey>,
    ) -> bool {
        if self.last != Some((session, receiver_index)) {
            let Some(k) = key() else { return false };
            self.keys.push(k);
            self.last = Some((session, receiver_index));
        }
        let Ok(key) = u16::try_from(self.keys.len() - 1) else {
            return false;
        };
        self.jobs.push(SealJob {
            start,
            len,
            counter,
            key,
            sealed: false,
        });
        true
    }

    /// Seals every queued message in `buf` (the batch buffer) and empties the queue;
    /// returns how many could not be sealed (none unless a span was cut short).
    pub fn run(&mut self, workers: &Workers, buf: &mut [u8]) -> Result<usize, SpanError> {
        let result = workers.run(&mut self.jobs, &self.keys, buf);
        let failed = self.jobs.iter().filter(|j| !j.sealed).count();
        self.jobs.clear();
        self.keys.clear();
        self.last = None;
        result.map(|()| failed)
    }
}

/// A data message to open in place: the datagram is `span` of the receive buffer and its
/// plaintext lands at `span.start + 16`.
pub struct OpenJob {
    span: Range<usize>,
    receiver_idx: u32,
    counter: u64,
    key: u16,
    result: Result<usize, WireGuardError>,
}

// SAFETY: the span is a field only `OpenJobs::push` sets.
unsafe impl Job for OpenJob {
    type Shared = [OpenKey];

    fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    fn run(&mut self, keys: &[OpenKey], part: &mut [u8]) {
        self.result = keys
            .get(usize::from(self.key))
            .ok_or(WireGuardError::NoCurrentSession)
            .and_then(|k| k.open_in_place(part));
    }
}

/// One opened (or refused) message, for [`boringtun::noise::Tunn::open_commit`] in order.
#[derive(Debug)]
pub struct Opened {
    /// Where the datagram was; the plaintext is at `start + 16`.
    pub start: usize,
    pub receiver_idx: u32,
    pub counter: u64,
    /// The plaintext's length, or why the message did not authenticate.
    pub result: Result<usize, WireGuardError>,
}

/// The data messages of one inbound batch, in arrival order, and their sessions' keys (one
/// copy per session and batch).
pub struct OpenJobs {
    jobs: Vec<OpenJob>,
    keys: Vec<OpenKey>,
    /// Our receiver index of the last key (ours, so unique on the device).
    last: Option<u32>,
}

impl OpenJobs {
    /// Room for `capacity` messages per batch (a GRO receive holds at most 64), allocated now.
    pub fn with_capacity(capacity: usize) -> OpenJobs {
        OpenJobs {
            jobs: Vec::with_capacity(capacity),
            keys: Vec::with_capacity(capacity),
            last: None,
        }
    }

    pub fn has_room(&self) -> bool {
        self.jobs.len() < self.jobs.capacity()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Queues the data message at `span` of the receive buffer, which passed
    /// [`boringtun::noise::Tunn::open_check`]; `key` ([`boringtun::noise::Tunn::open_key`])
    /// is called only for a session the batch has no key of yet. False (nothing queued)
    /// when it gives none.
    pub fn push(
        &mut self,
        span: Range<usize>,
        receiver_idx: u32,
        counter: u64,
        key: impl FnOnce() -> Option<OpenKey>,
    ) -> bool {
        if self.last != Some(receiver_idx) {
            let Some(k) = key() else { return false };
            self.keys.push(k);
            self.last = Some(receiver_idx);
        }
        let Ok(key) = u16::try_from(self.keys.len() - 1) else {
            return false;
        };
        self.jobs.push(OpenJob {
            span,
            receiver_idx,
            counter,
            key,
            result: Err(WireGuardError::InvalidAeadTag),
        });
        true
    }

    /// Opens every queued message in `buf`, then hands each to `commit` in arrival order
    /// and empties the queue.
    pub fn run(
        &mut self,
        workers: &Workers,
        buf: &mut [u8],
        mut commit: impl FnMut(&mut [u8], Opened),
    ) -> Result<(), SpanError> {
        let result = workers.run(&mut self.jobs, &self.keys, buf);
        if result.is_ok() {
            for job in self.jobs.drain(..) {
                let opened = Opened {
                    start: job.span.start,
                    receiver_idx: job.receiver_idx,
                    counter: job.counter,
                    result: job.result,
                };
                commit(buf, opened);
            }
        }
        self.jobs.clear();
        self.keys.clear();
        self.last = None;
        result
    }
}

/// One peer's stream through the workers, in memory, both ways: the proof the benches and
/// tests run (a connected pair, sealed batches, opened batches, order checked).
#[cfg(any(test, feature = "testing"))]
pub mod stream;

mod pool;

#[cfg(test)]
mod tests;
