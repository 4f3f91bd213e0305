//! Data-path cost of boringtun against the raw AEAD it is built on, on 1420-byte packets.
//!
//! - `isthmus/boringtun encapsulate+decapsulate`: one packet `a -> b` through two connected
//!   [`boringtun::noise::Tunn`] peers (framing, counters, replay window, length checks, copies).
//! - `raw ChaCha20-Poly1305 seal+open`: ring's `seal_in_place_separate_tag` + `open_in_place`
//!   on the same size, nonce from a counter as in WireGuard data messages: the ceiling.
//! - `raw ChaCha20-Poly1305 seal`: the seal alone, so each side's share of the cipher is
//!   known (the floor any WireGuard daemon on ring pays per byte; docs/benchmarks.md).
//!
//! Criterion's figures are the primary result. Under `cargo bench` a short interleaved
//! `Instant` timing afterwards prints `encap+decap / raw AEAD = X%` (project target: >= 85%).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use isthmus_benches::{
    bench_mode, ipv4_packet, round_trip, EnginePair, Pipeline, TunnPair, BUF_LEN, PACKET_LEN,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

const GROUP: &str = "data-path-1420B";
const TUNN_ID: &str = "boringtun Tunn encapsulate+decapsulate";
const ENGINE_ID: &str = "isthmus engine outbound+inbound";
const AEAD_ID: &str = "raw ChaCha20-Poly1305 seal+open";
const SEAL_ID: &str = "raw ChaCha20-Poly1305 seal";
const PIPELINE_ID: &str = "isthmus batched path per packet (GSO split+seal+open+GRO)";
/// Project target for (boringtun round trip) / (raw AEAD) throughput.
const TARGET_RATIO: f64 = 0.85;

/// Two connected peers and buffers allocated once, outside any timed loop.
struct TunnBench {
    pair: TunnPair,
    packet: Vec<u8>,
    net: Vec<u8>,
    tun: Vec<u8>,
}

impl TunnBench {
    fn new() -> Self {
        TunnBench {
            pair: TunnPair::connected(),
            packet: ipv4_packet(PACKET_LEN),
            net: vec![0; BUF_LEN],
            tun: vec![0; BUF_LEN],
        }
    }

    /// `a.encapsulate` then `b.decapsulate` (checked to give `WriteToTunnelV4`).
    #[inline]
    fn step(&mut self) -> usize {
        let (a, b) = (&mut self.pair.a, &mut self.pair.b);
        round_trip(a, b, black_box(&self.packet), &mut self.net, &mut self.tun)
    }
}

/// ring ChaCha20-Poly1305 in place on one buffer: plaintext, then room for the tag.
struct AeadBench {
    sealer: LessSafeKey,
    opener: LessSafeKey,
    counter: u64,
    buf: Vec<u8>,
}

impl AeadBench {
    fn new() -> Self {
        let key = |k| LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("key"));
        let mut buf = ipv4_packet(PACKET_LEN);
        buf.resize(PACKET_LEN + CHACHA20_POLY1305.tag_len(), 0);
        AeadBench {
            sealer: key(&[0x42; 32]),
            opener: key(&[0x42; 32]),
            counter: 0,
            buf,
        }
    }

    /// WireGuard-style nonce: 4 zero bytes, then the little-endian message counter.
    fn nonce(counter: u64) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&counter.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    }

    /// Seal the packet in place (tag placed after it, as on the wire), then open it again.
    #[inline]
    fn step(&mut self) -> usize {
        let counter = self.counter;
        self.counter += 1;
        let (data, tag_space) = self.buf.split_at_mut(PACKET_LEN);
        let tag = self
            .sealer
            .seal_in_place_separate_tag(Self::nonce(counter), Aad::empty(), black_box(data))
            .expect("seal");
        tag_space.copy_from_slice(tag.as_ref());
        let plain = self
            .opener
            .open_in_place(Self::nonce(counter), Aad::empty(), &mut self.buf)
            .expect("open");
        plain.len()
    }

    /// Seal only: what the sending side's cipher costs (the opening side's is the
    /// seal+open figure minus this one).
    #[inline]
    fn seal(&mut self) -> usize {
        let counter = self.counter;
        self.counter += 1;
        let data = &mut self.buf[..PACKET_LEN];
        let tag = self
            .sealer
            .seal_in_place_separate_tag(Self::nonce(counter), Aad::empty(), black_box(data))
            .expect("seal");
        tag.as_ref().len()
    }
}

/// Both benchmarks in one group so criterion reports them side by side, in bytes/s.
fn bench_data_path(c: &mut Criterion) {
    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Bytes(PACKET_LEN as u64));
    let mut engine = EnginePair::connected();
    let packet = ipv4_packet(PACKET_LEN);
    group.bench_function(ENGINE_ID, |b| {
        b.iter(|| engine.round_trip(black_box(&packet)))
    });
    let mut tunn = TunnBench::new();
    group.bench_function(TUNN_ID, |b| b.iter(|| tunn.step()));
    let mut aead = AeadBench::new();
    group.bench_function(AEAD_ID, |b| b.iter(|| aead.step()));
    group.bench_function(SEAL_ID, |b| b.iter(|| aead.seal()));
    group.finish();

    // The batched path moves one 64 KiB super-segment per iteration.
    let mut group = c.benchmark_group("batched-path-64KiB");
    group.throughput(Throughput::Bytes((Pipeline::packets() * PACKET_LEN) as u64));
    let mut pipeline = Pipeline::new();
    group.bench_function(PIPELINE_ID, |b| b.iter(|| pipeline.run()));
    group.finish();
}

/// Time `iters` calls of `step`.
fn time(iters: u32, mut step: impl FnMut() -> usize) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(step());
    }
    start.elapsed()
}

/// A secondary, quick figure for the ratio: many short interleaved rounds of each, best round
/// of each (the least disturbed by other processes on a shared machine).
/// A named benchmark step, for timing several in turn.
type Step<'a> = (&'static str, Box<dyn FnMut() -> usize + 'a>);

fn print_ratio() {
    const ROUNDS: usize = 30;
    const ITERS: u32 = 20_000;
    let mut engine = EnginePair::connected();
    let packet = ipv4_packet(PACKET_LEN);
    let mut tunn = TunnBench::new();
    let mut aead = AeadBench::new();
    let mut pipeline = Pipeline::new();
    // One super-segment per call, counted as that many packets' worth of calls below.
    let per_run = Pipeline::packets();
    let mut calls = 0;
    let pipeline_step = move || {
        calls += 1;
        if calls < per_run {
            return 0;
        }
        calls = 0;
        pipeline.run()
    };
    let mut steps: [Step; 4] = [
        (
            ENGINE_ID,
            Box::new(|| engine.round_trip(black_box(&packet))),
        ),
        (TUNN_ID, Box::new(|| tunn.step())),
        (AEAD_ID, Box::new(|| aead.step())),
        (PIPELINE_ID, Box::new(pipeline_step)),
    ];
    let mut best = [Duration::MAX; 4];
    for (_, step) in steps.iter_mut() {
        time(ITERS, step);
    }
    for _ in 0..ROUNDS {
        for (i, (_, step)) in steps.iter_mut().enumerate() {
            best[i] = best[i].min(time(ITERS, step));
        }
    }
    let gib_s = |d: Duration| {
        (PACKET_LEN as f64 * f64::from(ITERS)) / d.as_secs_f64() / f64::from(1u32 << 30)
    };
    println!("\nInstant timing, best of {ROUNDS} x {ITERS} packets of {PACKET_LEN} bytes:");
    for (i, (name, _)) in steps.iter().enumerate() {
        let ratio = best[2].as_secs_f64() / best[i].as_secs_f64();
        println!(
            "  {name}: {:.3} GiB/s = {:.1}% of raw AEAD",
            gib_s(best[i]),
            ratio * 100.0
        );
    }
    let engine_ratio = best[2].as_secs_f64() / best[0].as_secs_f64();
    println!(
        "isthmus engine / raw AEAD = {:.1}% (target >= {:.0}%: {})",
        engine_ratio * 100.0,
        TARGET_RATIO * 100.0,
        if engine_ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        },
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_data_path(&mut criterion);
    criterion.final_summary();
    if bench_mode() {
        print_ratio();
    }
}
