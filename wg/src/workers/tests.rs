use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use boringtun::noise::TunnResult;

use super::stream::{Delivery, StreamPair, BATCH};
use super::*;

#[test]
fn spans_must_be_ascending_and_disjoint() {
    type Case = (&'static [(usize, usize)], usize, Result<(), SpanError>);
    let cases: [Case; 8] = [
        (&[], 0, Ok(())),
        (&[(0, 10), (10, 20)], 20, Ok(())),
        // Gaps between datagrams are fine (the header room of a GRO buffer, say).
        (&[(0, 10), (15, 20)], 20, Ok(())),
        (&[(0, 0), (0, 0)], 0, Ok(())),
        (&[(0, 10), (9, 20)], 20, Err(SpanError::Overlap(1))),
        (&[(10, 20), (0, 10)], 20, Err(SpanError::Overlap(1))),
        (&[(5, 4)], 20, Err(SpanError::Overlap(0))),
        (&[(0, 10), (10, 21)], 20, Err(SpanError::OutOfBounds(1))),
    ];
    for (spans, len, want) in cases {
        let got = check_spans(spans.iter().map(|&(s, e)| s..e), len);
        assert_eq!(got, want, "{spans:?} in {len}");
    }
}

/// Fills its span with its id; counts its runs.
struct Mark {
    id: u8,
    span: Range<usize>,
    runs: usize,
}

// SAFETY: the span is a field nothing changes.
unsafe impl Job for Mark {
    type Shared = ();

    fn span(&self) -> Range<usize> {
        self.span.clone()
    }
    fn run(&mut self, _: &(), part: &mut [u8]) {
        part.fill(self.id);
        self.runs += 1;
    }
}

#[test]
fn every_job_runs_once_on_its_own_bytes_whatever_the_pool() {
    for size in [1, 2, 3] {
        let workers = Workers::new(size).expect("pool");
        assert_eq!(workers.size(), size);
        for count in [
            0usize,
            1,
            2 * pool::PER_THREAD - 1,
            2 * pool::PER_THREAD,
            64,
        ] {
            // Uneven lengths with a one-byte gap after each span.
            let mut jobs = Vec::new();
            let mut at = 0;
            for i in 0..count {
                let len = 1 + (i * 7) % 13;
                jobs.push(Mark {
                    id: i as u8 + 1,
                    span: at..at + len,
                    runs: 0,
                });
                at += len + 1;
            }
            let mut buf = vec![0u8; at];
            workers.run(&mut jobs, &(), &mut buf).expect("clean spans");
            for j in &jobs {
                assert_eq!(
                    j.runs, 1,
                    "size {size}, {count} jobs: job {} ran once",
                    j.id
                );
                assert!(buf[j.span.clone()].iter().all(|&b| b == j.id));
                assert_eq!(buf.get(j.span.end), Some(&0).filter(|_| j.span.end < at));
            }
        }
    }
}

#[test]
fn overlapping_jobs_are_refused_before_any_runs() {
    let workers = Workers::new(2).expect("pool");
    let mut jobs: Vec<Mark> = (0..8)
        .map(|i| Mark {
            id: i + 1,
            span: usize::from(i) * 4..usize::from(i) * 4 + 5,
            runs: 0,
        })
        .collect();
    let mut buf = vec![0u8; 64];
    assert_eq!(
        workers.run(&mut jobs, &(), &mut buf),
        Err(SpanError::Overlap(1))
    );
    assert!(jobs.iter().all(|j| j.runs == 0) && buf.iter().all(|&b| b == 0));
}

#[test]
fn the_default_pool_follows_the_cores_of_this_machine() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(Workers::new(0).expect("pool").size(), default_size(cores));
    assert_eq!(
        Workers::new(3).expect("pool").size(),
        3,
        "an asked size is kept"
    );
}

#[test]
fn one_peers_stream_arrives_once_and_in_order_on_any_pool() {
    for size in [1, 2, 4] {
        let workers = Workers::new(size).expect("pool");
        let mut pair = StreamPair::connected(1420);
        for n in [BATCH, 1, 7, BATCH, BATCH] {
            // `run` asserts: n packets, each the next sequence number, none refused.
            assert_eq!(
                pair.run(&workers, n),
                n * 1420,
                "{size} workers, {n} packets"
            );
        }
    }
}

#[test]
fn the_split_path_speaks_the_same_wire_as_encapsulate() {
    let workers = Workers::new(2).expect("pool");
    let mut pair = StreamPair::connected(600);
    let mut buf = vec![0u8; 2048];
    // Sealed by the workers, opened by boringtun's own decapsulate.
    pair.seal(&workers, 16);
    for span in pair.spans.clone() {
        let got = pair.b.decapsulate(None, &pair.wire[span], &mut buf);
        assert!(
            matches!(got, TunnResult::WriteToTunnelV4(p, _) if p.len() == 600),
            "decapsulate takes what the workers sealed"
        );
    }
    // Sealed by encapsulate, opened by the workers; counters go on from the split path's.
    let template = crate::packet::udp4([10, 0, 0, 1], [10, 0, 0, 2], 600);
    pair.wire.clear();
    pair.spans.clear();
    for _ in 0..16 {
        let TunnResult::WriteToNetwork(d) = pair.a.encapsulate(&template, &mut buf) else {
            panic!("no data message");
        };
        let start = pair.wire.len();
        pair.wire.extend_from_slice(d);
        pair.spans.push(start..pair.wire.len());
    }
    let d = pair.open(&workers);
    assert_eq!(d.refused, 0, "the workers open what encapsulate sealed");
    assert_eq!(d.in_order + d.out_of_order, 16);
}

/// Puts the last sealed batch's datagrams on the wire in `order` (indices may repeat).
fn rewire(pair: &mut StreamPair, order: &[usize]) {
    let datagrams: Vec<Vec<u8>> = pair
        .spans
        .iter()
        .map(|s| pair.wire[s.clone()].to_vec())
        .collect();
    pair.wire.clear();
    pair.spans.clear();
    for &i in order {
        let start = pair.wire.len();
        pair.wire.extend_from_slice(&datagrams[i]);
        pair.spans.push(start..pair.wire.len());
    }
}

#[test]
fn the_replay_window_holds_under_reordering_duplicates_and_tampering() {
    let workers = Workers::new(2).expect("pool");
    let mut pair = StreamPair::connected(200);

    // Reordered on the path, one duplicated: each accepted once, in arrival order.
    pair.seal(&workers, 8);
    rewire(&mut pair, &[1, 0, 2, 3, 5, 4, 5, 6, 7]);
    let d = pair.open(&workers);
    assert_eq!(d.refused, 1, "the duplicate of 5 is refused: {d:?}");
    assert_eq!(d.in_order + d.out_of_order, 8, "every packet once: {d:?}");

    // The whole batch replayed later: nothing passes.
    pair.seal(&workers, 8);
    let replay = (pair.wire.clone(), pair.spans.clone());
    assert_eq!(pair.open(&workers).refused, 0);
    (pair.wire, pair.spans) = replay;
    assert_eq!(
        pair.open(&workers),
        Delivery {
            refused: 8,
            ..Delivery::default()
        }
    );

    // A tampered message is refused and does not burn its counter: the genuine one,
    // arriving after, still passes.
    pair.seal(&workers, 8);
    let genuine = pair.wire[pair.spans[3].clone()].to_vec();
    let at = pair.spans[3].end - 1;
    pair.wire[at] ^= 1;
    let d = pair.open(&workers);
    assert_eq!((d.refused, d.in_order + d.out_of_order), (1, 7), "{d:?}");
    pair.wire = genuine;
    pair.spans.clear();
    pair.spans.push(0..pair.wire.len());
    let d = pair.open(&workers);
    assert_eq!((d.refused, d.out_of_order), (0, 1), "{d:?}");
}

#[test]
fn sealing_never_reuses_a_counter_across_workers() {
    let workers = Workers::new(3).expect("pool");
    let mut pair = StreamPair::connected(100);
    let seen = AtomicUsize::new(0);
    let mut counters = Vec::new();
    for _ in 0..4 {
        pair.seal(&workers, BATCH);
        for s in &pair.spans {
            let mut c = [0u8; 8];
            c.copy_from_slice(&pair.wire[s.start + 8..s.start + 16]);
            counters.push(u64::from_le_bytes(c));
            seen.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The handshake's keepalive took counter 0; then one each, in wire order.
    let want: Vec<u64> = (1..=4 * BATCH as u64).collect();
    assert_eq!(counters, want);
    assert_eq!(seen.load(Ordering::Relaxed), 4 * BATCH);
}

#[test]
fn the_default_adds_workers_only_beyond_two_cores() {
    // (cores, workers): 1 = the packet threads do their own crypto.
    let cases = [(1, 1), (2, 1), (3, 3), (8, 8), (32, 32)];
    for (cores, want) in cases {
        assert_eq!(default_size(cores), want, "{cores} cores");
    }
}
