//! One peer's stream through the [`Workers`], in memory: `a` seals batches of numbered
//! packets, `b` opens them, and every packet must arrive once and in order. What the
//! `workers` bench measures and the tests break on purpose.

use std::net::SocketAddr;
use std::ops::Range;

use boringtun::noise::{Packet, Tunn, TunnResult};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{OpenJobs, SealJobs, Workers};
use crate::batch::OutBatch;
use crate::engine::{DATA_OVERHEAD, MAX_PACKET};
use crate::packet;

/// Where the packet's sequence number sits: the first payload bytes after IPv4 and UDP.
const SEQ_AT: usize = 28;
const HEADER: usize = 16;
const TO: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(192, 0, 2, 2),
    51820,
));
/// A GRO receive's worth of messages: the most one batch holds.
pub const BATCH: usize = 64;

/// What the receiver did with one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Packets written "to the TUN", each the next expected sequence number.
    pub in_order: usize,
    /// Packets that arrived but not as the next expected (a gap or a step back).
    pub out_of_order: usize,
    /// Messages refused: replayed, tampered with, or for an unknown session.
    pub refused: usize,
}

/// Two connected peers and the batch buffers of each side, allocated once.
pub struct StreamPair {
    pub a: Tunn,
    pub b: Tunn,
    template: Vec<u8>,
    batch: OutBatch,
    seal: SealJobs,
    open: OpenJobs,
    /// The datagrams of the last sealed batch, back to back (as a GRO receive has them).
    pub wire: Vec<u8>,
    pub spans: Vec<Range<usize>>,
    next_seq: u32,
    expect_seq: u32,
}

impl StreamPair {
    /// Two peers after a handshake, sending `len`-byte IPv4/UDP packets `a -> b`.
    pub fn connected(len: usize) -> StreamPair {
        let (sa, sb) = (
            StaticSecret::from([0x11; 32]),
            StaticSecret::from([0x22; 32]),
        );
        let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
        let mut pair = StreamPair {
            a: Tunn::new(sa, pb, None, None, 1, None),
            b: Tunn::new(sb, pa, None, None, 2, None),
            template: packet::udp4([10, 0, 0, 1], [10, 0, 0, 2], len),
            batch: OutBatch::new(BATCH * (len + DATA_OVERHEAD), BATCH),
            seal: SealJobs::with_capacity(BATCH),
            open: OpenJobs::with_capacity(BATCH),
            wire: Vec::with_capacity(BATCH * (len + DATA_OVERHEAD)),
            spans: Vec::with_capacity(BATCH),
            next_seq: 0,
            expect_seq: 0,
        };
        pair.handshake();
        pair
    }

    fn handshake(&mut self) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut in_flight: Vec<(bool, Vec<u8>)> = Vec::new();
        if let TunnResult::WriteToNetwork(init) =
            self.a.format_handshake_initiation(&mut buf, false)
        {
            in_flight.push((true, init.to_vec()));
        }
        while let Some((to_b, datagram)) = in_flight.pop() {
            let peer = if to_b { &mut self.b } else { &mut self.a };
            let mut input: &[u8] = &datagram;
            while let TunnResult::WriteToNetwork(out) = peer.decapsulate(None, input, &mut buf) {
                in_flight.push((!to_b, out.to_vec()));
                input = &[];
            }
        }
        assert!(
            self.a.time_since_last_handshake().is_some()
                && self.b.time_since_last_handshake().is_some(),
            "no session after the handshake"
        );
    }

    /// `a` seals `n` (at most [`BATCH`]) numbered packets into its batch: counters
    /// reserved in order, plaintexts copied into the batch, the AEAD on the workers. The
    /// datagrams' spans go to [`StreamPair::spans`].
    fn seal_batch(&mut self, workers: &Workers, n: usize) {
        let len = self.template.len();
        self.spans.clear();
        for _ in 0..n.min(BATCH) {
            let Some((receiver_index, counter)) = self.a.reserve_seal(1, len) else {
                panic!("a has no session");
            };
            let start = self.batch.offset();
            let Some(space) = self.batch.space(len + DATA_OVERHEAD) else {
                panic!("the batch is full");
            };
            let plain = &mut space[HEADER..HEADER + len];
            plain.copy_from_slice(&self.template);
            plain[SEQ_AT..SEQ_AT + 4].copy_from_slice(&self.next_seq.to_be_bytes());
            self.next_seq = self.next_seq.wrapping_add(1);
            self.batch.commit(TO, len + DATA_OVERHEAD);
            let a = &self.a;
            let queued = self
                .seal
                .push(start, len, (0, receiver_index, counter), || a.seal_key());
            assert!(queued, "a has a key for its session");
            self.spans.push(start..start + len + DATA_OVERHEAD);
        }
        let failed = self
            .seal
            .run(workers, self.batch.filled_mut())
            .expect("spans from the batch are clean");
        assert_eq!(failed, 0, "every message sealed");
    }

    /// [`StreamPair::seal_batch`], then the batch "leaves" into [`StreamPair::wire`] run
    /// by run, in order, as the GSO sends would.
    pub fn seal(&mut self, workers: &Workers, n: usize) {
        self.seal_batch(workers, n);
        self.wire.clear();
        self.spans.clear();
        let (wire, spans) = (&mut self.wire, &mut self.spans);
        self.batch.flush(|_, datagrams, segment| {
            for d in datagrams.chunks(segment) {
                spans.push(wire.len()..wire.len() + d.len());
                wire.extend_from_slice(d);
            }
        });
    }

    /// `b` opens what is in [`StreamPair::wire`] at [`StreamPair::spans`] (ascending):
    /// replay check in order, the AEAD on the workers, then mark and deliver in order.
    pub fn open(&mut self, workers: &Workers) -> Delivery {
        open(
            &mut self.b,
            &mut self.open,
            &mut self.expect_seq,
            workers,
            &mut self.wire,
            &self.spans,
        )
    }

    /// One batch of `n` both ways; the bytes delivered in order.
    /// `b` opens the datagrams where `a` sealed them, in its batch: the in-memory
    /// stand-in for the kernel's copies is no copy at all.
    pub fn run(&mut self, workers: &Workers, n: usize) -> usize {
        self.seal_batch(workers, n);
        let d = open(
            &mut self.b,
            &mut self.open,
            &mut self.expect_seq,
            workers,
            self.batch.filled_mut(),
            &self.spans,
        );
        self.batch.flush(|_, _, _| {});
        assert_eq!(
            (d.in_order, d.out_of_order, d.refused),
            (n, 0, 0),
            "every packet once, in order"
        );
        d.in_order * self.template.len()
    }
}

/// `b`'s side of a batch: the datagrams at `spans` of `buf`, opened in place.
fn open(
    b: &mut Tunn,
    jobs: &mut OpenJobs,
    expect: &mut u32,
    workers: &Workers,
    buf: &mut [u8],
    spans: &[Range<usize>],
) -> Delivery {
    let mut d = Delivery::default();
    for span in spans {
        let (idx, counter) = match Tunn::parse_incoming_packet(&buf[span.clone()]) {
            Ok(Packet::PacketData(p)) if b.open_check(&p).is_ok() => (p.receiver_idx, p.counter()),
            _ => {
                d.refused += 1;
                continue;
            }
        };
        let b = &*b;
        if !jobs.push(span.clone(), idx, counter, || b.open_key(idx)) {
            d.refused += 1;
        }
    }
    jobs.run(workers, buf, |buf, o| {
        let Ok(n) = o.result else {
            d.refused += 1;
            return;
        };
        let plain = &mut buf[o.start + HEADER..o.start + HEADER + n];
        match b.open_commit(o.receiver_idx, o.counter, plain) {
            TunnResult::WriteToTunnelV4(p, _) => {
                let mut seq = [0u8; 4];
                seq.copy_from_slice(&p[SEQ_AT..SEQ_AT + 4]);
                let seq = u32::from_be_bytes(seq);
                if seq == *expect {
                    d.in_order += 1;
                } else {
                    d.out_of_order += 1;
                }
                *expect = seq.wrapping_add(1);
            }
            _ => d.refused += 1,
        }
    })
    .expect("spans of a batch are clean");
    d
}
