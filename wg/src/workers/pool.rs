//! The threads under [`super::Workers`]: a parallel for-each over the indices of one batch,
//! shared by the caller and pool threads that stay hot between batches.
//!
//! Why not a general-purpose pool: a batch is ~25 µs of AEAD per thread, so a hand-off
//! must cost well under a microsecond. rayon's fork-join, measured in the `workers` bench,
//! lost ~35 µs per shared batch: its pool threads slept between batches and a caller from
//! outside the pool blocked on a latch, so every batch paid two wake-ups (a futex and, in
//! a VM, an IPI each). Here the pool threads spin for [`SPIN`] after each batch before
//! they park, the caller works through the batch itself while they join, and it waits for
//! them only while they finish the indices they already claimed. A parked thread is woken
//! for the next batch, but the caller does not wait for it: it gets what is left when it
//! arrives.
//!
//! The protocol, on one word (`state`: generation, closed bit, threads inside):
//! - the caller writes the task, the unclaimed range and how many pool threads may join
//!   ([`helpers_for`]), then publishes a new generation;
//! - a pool thread enters that generation with a compare-and-swap that fails once it is
//!   closed or full, claims ranges of indices from the back (guided: a share of what is
//!   left) until none are left, and leaves;
//! - the caller claims from the front; when none are left it closes the generation and
//!   waits until every thread that entered has left. Then nothing touches the task any
//!   more: a thread that arrives later finds the generation closed and does not enter.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a pool thread stays hot after a batch before it parks. Longer than the gap
/// between two batches of a busy peer (a batch's own sequential work: the TUN read, the
/// counters, the sends), short enough that an idle tunnel costs nothing measurable.
pub const SPIN: Duration = Duration::from_micros(50);

/// A pool thread joins a batch for at least this many indices (jobs: ~0.75 µs of AEAD
/// each, against a hand-off of about a microsecond), so a 64-job batch on a 32-core node
/// takes the caller and 7 pool threads, not 32 threads racing for one job each.
pub const PER_THREAD: usize = 8;

/// How many pool threads a batch of `len` indices admits, of `threads`.
pub fn helpers_for(len: usize, threads: usize) -> usize {
    (len / PER_THREAD).saturating_sub(1).min(threads)
}

/// The low bits of `state`: how many pool threads are inside the current generation.
const INSIDE: u64 = (1 << 31) - 1;
/// Set once the caller has closed the current generation: nobody may enter any more.
const CLOSED: u64 = 1 << 31;
/// The generation counter sits above the closed bit.
const GEN_SHIFT: u32 = 32;

fn generation(state: u64) -> u64 {
    state >> GEN_SHIFT
}

/// What each index of the current batch runs: set by the caller for one generation.
type Task = *const (dyn Fn(Range<usize>) + Sync + 'static);

/// Keeps two atomics that different threads write off one cache line.
#[repr(align(128))]
struct Padded<T>(T);

struct Shared {
    state: Padded<AtomicU64>,
    /// The indices of the current batch no one has claimed yet ([`pack`]).
    unclaimed: Padded<AtomicU64>,
    /// The current batch's task. Written only by the caller holding `busy`
    /// while no pool thread is inside (the last generation closed and emptied); read only
    /// by a thread inside the generation it was written for.
    batch: UnsafeCell<Option<Task>>,
    /// Held by the one caller whose batch the pool runs.
    busy: AtomicBool,
    /// A task panicked on a pool thread; the caller re-raises it.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Per pool thread: it is parked (or about to), and the next batch must unpark it.
    parked: Box<[Padded<AtomicBool>]>,
    /// How many pool threads the current batch admits ([`helpers_for`]); written with the
    /// batch, read after entering or trying to.
    helpers: AtomicU64,
}

// SAFETY: `batch` is the only non-Sync field. It is written by the one caller holding
// `busy` while no pool thread is inside a generation (the previous one was closed and
// emptied), before it publishes the next generation with a SeqCst (release) store; a pool
// thread reads it only after entering that generation (an acquire compare-and-swap) and
// before leaving it, and the caller does not write it again until every thread has left.
// The task it points at is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Shared {
    /// The next range of indices to run, if any: a share of what is left (so early claims
    /// are large and cheap, late ones small and even), at least one index. The caller
    /// claims from the front and pool threads from the back, so each side's indices stay
    /// together: the caller's share stays in its cache, and a batch opened after it was
    /// sealed tends to be split the same way.
    fn claim(&self, from_back: bool) -> Option<Range<usize>> {
        let mut now = self.unclaimed.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = unpack(now);
            if front >= back {
                return None;
            }
            let claimers = self.helpers.load(Ordering::Relaxed) + 1;
            let chunk = ((back - front) / (2 * claimers)).max(1);
            let (next, range) = if from_back {
                (pack(front, back - chunk), back - chunk..back)
            } else {
                (pack(front + chunk, back), front..front + chunk)
            };
            match self.unclaimed.0.compare_exchange_weak(
                now,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                // Both ends fit in 32 bits (`Pool::run` refuses longer batches).
                Ok(_) => return Some(range.start as usize..range.end as usize),
                Err(seen) => now = seen,
            }
        }
    }
}

/// The unclaimed indices `front..back`, packed into one word so that both ends move with
/// one compare-and-swap.
fn pack(front: u64, back: u64) -> u64 {
    front | back << 32
}

fn unpack(word: u64) -> (u64, u64) {
    (word & u64::from(u32::MAX), word >> 32)
}

/// Pool threads that run one batch at a time beside its caller.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads` pool threads named `crypto-<i>`.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Padded(AtomicU64::new(0)),
            unclaimed: Padded(AtomicU64::new(0)),
            batch: UnsafeCell::new(None),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: (0..threads)
                .map(|_| Padded(AtomicBool::new(false)))
                .collect(),
            helpers: AtomicU64::new(0),
        });
        let mut pool = Pool {
            shared,
            threads: Vec::with_capacity(threads),
        };
        for me in 0..threads {
            let shared = pool.shared.clone();
            // On an error `pool` drops here, which stops the threads already started.
            let handle = thread::Builder::new()
                .name(format!("crypto-{me}"))
                .spawn(move || pool_thread(&shared, me))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// Runs `task` over ranges that cover `0..len` exactly once between them, on this
    /// thread and on whichever pool threads join (at most [`helpers_for`]); returns when
    /// all have run. False, having run nothing, when the batch is too small to share, when
    /// another caller's batch holds the pool, or when `len` needs more than 32 bits: run
    /// it yourself then.
    ///
    /// A panic in `task`, here or on a pool thread, is raised here after the batch has
    /// left every pool thread.
    pub fn run(&self, len: usize, task: &(dyn Fn(Range<usize>) + Sync)) -> bool {
        let shared = &*self.shared;
        let helpers = helpers_for(len, self.threads.len());
        let Ok(end) = u32::try_from(len) else {
            return false;
        };
        if helpers == 0 {
            return false;
        }
        if shared
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        shared.panicked.store(false, Ordering::Relaxed);
        // SAFETY: only the lifetime is erased. The pointer is dropped from `batch` by
        // `Finish` below, which first closes the generation and waits until no pool thread
        // is inside it; no thread reads it outside a generation, so none uses it after
        // `task`'s borrow ends, also when this thread unwinds.
        let erased: Task = unsafe { std::mem::transmute(task) };
        // SAFETY: we hold `busy` and the previous generation was emptied before `busy` was
        // released, so no pool thread reads `batch` now.
        unsafe { *shared.batch.get() = Some(erased) };
        shared
            .unclaimed
            .0
            .store(pack(0, end.into()), Ordering::Relaxed);
        shared.helpers.store(helpers as u64, Ordering::Relaxed);
        let open = (generation(shared.state.0.load(Ordering::Relaxed)) + 1) << GEN_SHIFT;
        // SeqCst pairs with the parking thread's SeqCst store of its flag and load of
        // `state`: either it sees this generation, or this thread sees its flag.
        shared.state.0.store(open, Ordering::SeqCst);
        // Wake parked threads, no more than the batch admits (a wake-up is a syscall);
        // threads still hot come by themselves. A flag is read before it is swapped, so
        // the flags of hot threads stay shared in every cache instead of bouncing to this
        // core once per batch (a SeqCst load pairs with the parking side as well).
        let mut woken = 0;
        for (flag, thread) in shared.parked.iter().zip(&self.threads) {
            if woken == helpers {
                break;
            }
            if flag.0.load(Ordering::SeqCst) && flag.0.swap(false, Ordering::SeqCst) {
                thread.thread().unpark();
                woken += 1;
            }
        }
        let finish = Finish(shared);
        while let Some(range) = shared.claim(false) {
            task(range);
        }
        drop(finish);
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a crypto worker panicked (its message is in the log above)");
        }
        true
    }
}

/// Ends the caller's batch, also when its own part unwinds: closes the generation, waits
/// until every pool thread inside has left, forgets the task and frees the pool.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        let mut state = shared.state.0.fetch_or(CLOSED, Ordering::AcqRel);
        let mut spins = 0u32;
        while state & INSIDE != 0 {
            // The threads inside are finishing ranges they claimed: a few microseconds,
            // unless one was preempted, so spin first and then let the scheduler run it.
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
            state = shared.state.0.load(Ordering::Acquire);
        }
        // SAFETY: the generation is closed and empty: no pool thread reads `batch`.
        unsafe { *shared.batch.get() = None };
        shared.busy.store(false, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            handle.thread().unpark();
            // A pool thread never panics itself (a task's panic is caught), so an error
            // here has nothing left to report.
            let _ = handle.join();
        }
    }
}

/// A pool thread: waits for a generation it has not seen (spinning for [`SPIN`], then
/// parked), enters it if still open, claims and runs ranges until none are left, leaves.
fn pool_thread(shared: &Shared, me: usize) {
    let mut seen = 0;
    loop {
        let Some(state) = wait_for_batch(shared, me, seen) else {
            return;
        };
        // `helpers` was written before the generation was published (acquired above).
        if state & INSIDE >= shared.helpers.load(Ordering::Relaxed) {
            // Full: this batch has its threads.
            seen = generation(state);
            continue;
        }
        if shared
            .state
            .0
            .compare_exchange(state, state + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Closed, or another thread entered first: look again.
            continue;
        }
        seen = generation(state);
        // SAFETY: inside an open generation the caller has written `batch` for it and
        // will not touch it until this thread leaves (see `Shared`).
        let task = unsafe { *shared.batch.get() };
        if let Some(task) = task {
            let ran = panic::catch_unwind(AssertUnwindSafe(|| {
                while let Some(range) = shared.claim(true) {
                    // SAFETY: the caller keeps the task alive until this thread leaves.
                    unsafe { (*task)(range) };
                }
            }));
            if ran.is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
        }
        shared.state.0.fetch_sub(1, Ordering::Release);
    }
}

/// The `state` of an open generation newer than `seen`, or `None` when the pool stops.
fn wait_for_batch(shared: &Shared, me: usize, mut seen: u64) -> Option<u64> {
    let mut hot_until = Instant::now() + SPIN;
    let mut spins = 0u32;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return None;
        }
        let state = shared.state.0.load(Ordering::Acquire);
        if generation(state) != seen {
            if state & CLOSED == 0 {
                return Some(state);
            }
            // Closed before this thread came: that batch is over.
            seen = generation(state);
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || Instant::now() < hot_until {
            std::hint::spin_loop();
            continue;
        }
        let flag = &shared.parked[me].0;
        flag.store(true, Ordering::SeqCst);
        let state = shared.state.0.load(Ordering::SeqCst);
        let fresh = generation(state) != seen && state & CLOSED == 0;
        if !fresh && !shared.stop.load(Ordering::SeqCst) {
            thread::park();
        }
        flag.store(false, Ordering::Relaxed);
        // Hot again for a while: a batch tends to follow a batch.
        hot_until = Instant::now() + SPIN;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicUsize};
    use std::sync::Mutex;

    use super::*;

    /// Runs one batch of `len` indices (here if the pool refuses it, as `Workers` does) and
    /// counts how often each ran.
    fn counted(pool: &Pool, len: usize, each: impl Fn(usize) + Sync) -> Vec<u32> {
        let counts: Vec<AtomicU32> = (0..len).map(|_| AtomicU32::new(0)).collect();
        let task = |range: Range<usize>| {
            for i in range {
                counts[i].fetch_add(1, Ordering::Relaxed);
                each(i);
            }
        };
        let shared = pool.run(len, &task);
        assert_eq!(
            shared,
            helpers_for(len, pool.threads.len()) > 0,
            "{len} indices"
        );
        if !shared {
            task(0..len);
        }
        counts.into_iter().map(AtomicU32::into_inner).collect()
    }

    fn on_pool_thread() -> bool {
        thread::current()
            .name()
            .is_some_and(|n| n.starts_with("crypto-"))
    }

    /// Waits (yielding) until `count` is non-zero, or 5 s: on a loaded machine a woken
    /// thread may take a while to run, and a test must not mistake that for a lost wake-up.
    fn until_nonzero(count: &AtomicUsize) {
        let since = Instant::now();
        while count.load(Ordering::SeqCst) == 0 && since.elapsed() < Duration::from_secs(5) {
            thread::yield_now();
        }
    }

    #[test]
    fn a_batch_admits_a_pool_thread_per_eight_indices_beyond_the_callers() {
        // (indices, pool threads, admitted)
        let cases = [
            (0, 3, 0),
            (15, 3, 0),
            (16, 3, 1),
            (64, 1, 1),
            (64, 3, 3),
            (64, 31, 7),
            (256, 31, 31),
        ];
        for (len, threads, want) in cases {
            assert_eq!(helpers_for(len, threads), want, "{len} on {threads}");
        }
    }

    #[test]
    fn no_more_threads_join_than_the_batch_admits() {
        let pool = Pool::new(6).expect("pool");
        for len in [16, 24, 64] {
            let names = Mutex::new(std::collections::BTreeSet::new());
            let pool_ran = AtomicUsize::new(0);
            counted(&pool, len, |_| {
                if on_pool_thread() {
                    pool_ran.fetch_add(1, Ordering::SeqCst);
                } else {
                    // The caller holds back until a pool thread is in.
                    until_nonzero(&pool_ran);
                }
                // Slow enough that every hot or woken thread would have time to join.
                thread::sleep(Duration::from_micros(300));
                let name = thread::current().name().unwrap_or("").to_string();
                names.lock().expect("names").insert(name);
            });
            let names = names.into_inner().expect("names");
            let want = helpers_for(len, 6) + 1;
            assert!(
                names.len() <= want && names.len() > 1,
                "{len} indices: {names:?}, at most {want} threads"
            );
        }
    }

    #[test]
    fn every_index_runs_exactly_once_batch_after_batch() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).expect("pool");
            for round in 0..200 {
                let len = [0, 1, 2, 5, 64, 257][round % 6];
                let counts = counted(&pool, len, |_| {});
                assert!(
                    counts.iter().all(|&c| c == 1),
                    "{threads} threads, round {round}, {len} indices: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn a_parked_thread_is_woken_and_takes_part() {
        let pool = Pool::new(1).expect("pool");
        for _ in 0..3 {
            // Long enough for the pool thread to park.
            thread::sleep(SPIN * 100);
            let pool_ran = AtomicUsize::new(0);
            let counts = counted(&pool, 64, |_| {
                if on_pool_thread() {
                    pool_ran.fetch_add(1, Ordering::SeqCst);
                } else {
                    // Without a wake-up the caller would wait here 5 s and then run
                    // every index itself.
                    until_nonzero(&pool_ran);
                }
            });
            assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
            assert!(
                pool_ran.into_inner() > 0,
                "the parked pool thread never joined the batch"
            );
        }
    }

    #[test]
    fn callers_on_many_threads_share_one_pool() {
        let pool = Pool::new(2).expect("pool");
        let (ran, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
        thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let counts: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
                        let task = |range: Range<usize>| {
                            for i in range {
                                counts[i].fetch_add(1, Ordering::Relaxed);
                            }
                        };
                        if pool.run(64, &task) {
                            ran.fetch_add(1, Ordering::Relaxed);
                        } else {
                            // What `Workers` does when the pool is busy: run it here.
                            task(0..64);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
        let (ran, refused) = (ran.into_inner(), refused.into_inner());
        assert_eq!(ran + refused, 2000);
        assert!(ran > 0, "no batch ever got the pool");
    }

    #[test]
    fn a_panic_on_a_pool_thread_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(1).expect("pool");
        let pool_ran = AtomicUsize::new(0);
        let raised = panic::catch_unwind(AssertUnwindSafe(|| {
            counted(&pool, 64, |_| {
                if on_pool_thread() {
                    pool_ran.fetch_add(1, Ordering::SeqCst);
                    panic::resume_unwind(Box::new("injected fault on the pool thread"));
                }
                until_nonzero(&pool_ran);
            })
        }));
        assert_eq!(pool_ran.into_inner(), 1, "the pool thread ran one index");
        assert!(raised.is_err(), "the pool thread's panic was swallowed");
        let counts = counted(&pool, 64, |_| {});
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
    }

    #[test]
    fn a_panicking_caller_waits_for_the_pool_threads_before_it_unwinds() {
        let pool = Pool::new(2).expect("pool");
        // Pool threads inside an index right now.
        let inside = AtomicUsize::new(0);
        let caller = thread::current().id();
        let raised = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|range: Range<usize>| {
                for _ in range {
                    if thread::current().id() == caller {
                        // Fail while a pool thread is inside an index (or after 1 s).
                        let since = Instant::now();
                        while inside.load(Ordering::SeqCst) == 0
                            && since.elapsed() < Duration::from_secs(1)
                        {
                            thread::yield_now();
                        }
                        // Not `panic!`: no hook, no backtrace, so the unwinding is quick.
                        panic::resume_unwind(Box::new("injected fault on the caller"));
                    }
                    inside.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(2));
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }));
        assert!(raised.is_err(), "the caller's panic was swallowed");
        // The task borrowed the caller's frame: had a pool thread still been running it,
        // it would now be using a dead borrow.
        assert_eq!(
            inside.load(Ordering::SeqCst),
            0,
            "a pool thread outlived the batch"
        );
        let counts = counted(&pool, 100, |_| {});
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
    }

    #[test]
    fn dropping_a_pool_stops_its_threads_hot_or_parked() {
        for pause in [Duration::ZERO, SPIN * 40] {
            let pool = Pool::new(3).expect("pool");
            counted(&pool, 64, |_| {});
            thread::sleep(pause);
            drop(pool);
        }
    }

    #[test]
    fn claims_shrink_with_what_is_left_and_cover_everything() {
        let pool = Pool::new(1).expect("pool");
        let shared = &*pool.shared;
        shared.unclaimed.0.store(pack(0, 64), Ordering::Relaxed);
        shared.helpers.store(1, Ordering::Relaxed);
        let mut got = Vec::new();
        // The caller from the front, a pool thread from the back, taking turns.
        for turn in 0.. {
            let Some(r) = shared.claim(turn % 2 == 1) else {
                break;
            };
            got.push(r);
        }
        // Two claimers: a quarter of what is left each time, at least one.
        assert_eq!(got[..4], [0..16, 52..64, 16..25, 46..52]);
        let mut covered: Vec<usize> = got.iter().flat_map(|r| r.clone()).collect();
        covered.sort_unstable();
        assert_eq!(covered, (0..64).collect::<Vec<_>>());
        assert!(got.iter().rev().take(3).all(|r| r.len() == 1));
    }
}
