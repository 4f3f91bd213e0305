//! Heap allocations on boringtun's steady-state data path.
//!
//! A counting global allocator wraps the system one; after the handshake and a warm-up, the
//! bench runs encapsulate+decapsulate round trips of 1420-byte packets and reports the
//! allocations made per packet (ideally zero: every buffer here is allocated beforehand).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use isthmus_benches::{
    bench_mode, ipv4_packet, round_trip, EnginePair, Pipeline, TunnPair, BUF_LEN, PACKET_LEN,
};

/// Forwards to [`System`], counting every allocation (`alloc`, `alloc_zeroed`, `realloc`).
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only relaxed counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn count(bytes: usize) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    BYTES.fetch_add(bytes as u64, Relaxed);
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// (allocations, bytes) so far.
fn snapshot() -> (u64, u64) {
    (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed))
}

fn main() {
    // Under `cargo test --benches` (no `--bench`), only smoke-test.
    let (warmup, packets): (u64, u64) = if bench_mode() {
        (10_000, 100_000)
    } else {
        (100, 1_000)
    };

    // The counter must see allocations, or a zero below would mean nothing.
    let before = snapshot().0;
    black_box(Vec::<u8>::with_capacity(black_box(64)));
    assert!(snapshot().0 > before, "counting allocator is not in use");

    let packet = ipv4_packet(PACKET_LEN);
    let mut pair = TunnPair::connected();
    let (mut net, mut tun) = (vec![0u8; BUF_LEN], vec![0u8; BUF_LEN]);
    measure("boringtun Tunn", warmup, packets, || {
        let n = round_trip(&mut pair.a, &mut pair.b, &packet, &mut net, &mut tun);
        assert_eq!(n, PACKET_LEN);
    });
    let mut engines = EnginePair::connected();
    measure("isthmus engine (seal/open)", warmup, packets, || {
        engines.round_trip(&packet);
    });
    measure(
        "isthmus engine (handle_outbound/handle_inbound)",
        warmup,
        packets,
        || {
            engines.round_trip_handle(&packet);
        },
    );
    // The batched path: per run, one 64 KiB super-segment = Pipeline::packets() packets.
    let mut pipeline = Pipeline::new();
    let per_run = Pipeline::packets() as u64;
    measure_runs(
        "isthmus batched path (GSO split, seal, batch, open, GRO)",
        warmup / per_run,
        packets / per_run,
        per_run,
        || {
            pipeline.run();
        },
    );
}

/// Like [`measure`] for a step that carries `per_run` packets.
fn measure_runs(name: &str, warmup: u64, runs: u64, per_run: u64, mut step: impl FnMut()) {
    for _ in 0..warmup {
        step();
    }
    let (allocs_0, bytes_0) = snapshot();
    for _ in 0..runs {
        step();
    }
    let (allocs_1, bytes_1) = snapshot();
    let (allocs, bytes) = (allocs_1 - allocs_0, bytes_1 - bytes_0);
    let packets = runs * per_run;
    println!(
        "{name}: {runs} super-segments ({packets} packets of {PACKET_LEN} bytes) after {warmup} \
         warm-up: {allocs} allocations, {bytes} bytes; allocations per packet on steady state: {}",
        allocs as f64 / packets as f64
    );
}

/// Counts allocations over `packets` calls of `step`, after `warmup` uncounted ones.
fn measure(name: &str, warmup: u64, packets: u64, mut step: impl FnMut()) {
    for _ in 0..warmup {
        step();
    }
    let (allocs_0, bytes_0) = snapshot();
    for _ in 0..packets {
        step();
    }
    let (allocs_1, bytes_1) = snapshot();
    let (allocs, bytes) = (allocs_1 - allocs_0, bytes_1 - bytes_0);
    println!(
        "{name}: {packets} round trips of {PACKET_LEN}-byte packets after {warmup} warm-up: \
         {allocs} allocations, {bytes} bytes; allocations per packet on steady state: {}",
        allocs as f64 / packets as f64
    );
}
