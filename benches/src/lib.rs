//! Shared helpers for the criterion benches.
//!
//! The benches drive two [`boringtun::noise::Tunn`] peers entirely in memory: no sockets,
//! no TUN device, just the WireGuard data path (framing, counters, ChaCha20-Poly1305).
//!
//! The benches measure the engine, so they depend on `isthmus-wg` alone (with its `testing`
//! feature, for the packet factory) and must never pull Kubernetes, routing or tokio in.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use isthmus_wg::batch::OutBatch;
use isthmus_wg::capture::{Capture, Output};
use isthmus_wg::engine::{Queued, DATA_PLAINTEXT_AT, MAX_PACKET};
use isthmus_wg::key::Key;
use isthmus_wg::offload::gro::Coalescer;
use isthmus_wg::offload::virtio::{F_NEEDS_CSUM, GSO_TCPV4};
use isthmus_wg::offload::{gso, VirtioHdr, VIRTIO_HDR_LEN};
use isthmus_wg::packet;
use isthmus_wg::workers::{OpenJobs, SealJobs, Workers};
use isthmus_wg::{Burst, DeviceConfig, Engine, PeerConfig, Transmit};

/// Inner packet size the benches use: a full-MTU IPv4 packet on a 1420-byte WireGuard link.
pub const PACKET_LEN: usize = 1420;

/// WireGuard data-message overhead: 16-byte header (type, receiver index, counter) + 16-byte tag.
pub const DATA_OVERHEAD: usize = 32;

/// Size of every scratch buffer: room for an encapsulated full packet and for any handshake message.
pub const BUF_LEN: usize = PACKET_LEN + DATA_OVERHEAD + 128;

/// WireGuard message type of a transport data message (the first little-endian u32).
const MSG_DATA: u8 = 4;

/// The benches' packet: a full-size IPv4/UDP packet, 10.0.0.1:5000 -> 10.0.0.2:5001, from
/// the engine's one packet factory ([`isthmus_wg::packet`]).
pub fn ipv4_packet(len: usize) -> Vec<u8> {
    packet::udp4([10, 0, 0, 1], [10, 0, 0, 2], len)
}

/// Two peers with a completed handshake: `a` is the initiator and has sent its first
/// keepalive, so both sides hold a current session and `a -> b` data flows at once.
pub struct TunnPair {
    /// The initiator.
    pub a: Tunn,
    /// The responder.
    pub b: Tunn,
}

impl TunnPair {
    /// Creates two peers with fixed keys and runs the handshake in memory until both have a session.
    pub fn connected() -> Self {
        let secret_a = StaticSecret::from([0x11; 32]);
        let secret_b = StaticSecret::from([0x22; 32]);
        let public_a = PublicKey::from(&secret_a);
        let public_b = PublicKey::from(&secret_b);
        let mut pair = TunnPair {
            a: Tunn::new(secret_a, public_b, None, None, 1, None),
            b: Tunn::new(secret_b, public_a, None, None, 2, None),
        };
        pair.handshake();
        pair
    }

    /// Shuttles handshake messages between the peers until no one has anything left to send.
    fn handshake(&mut self) {
        let mut buf = vec![0u8; BUF_LEN];
        // (true = for b, datagram); starts with a's initiation.
        let mut in_flight: Vec<(bool, Vec<u8>)> = Vec::new();
        match self.a.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(init) => in_flight.push((true, init.to_vec())),
            other => panic!("expected a handshake initiation, got {}", describe(&other)),
        }
        let mut deliveries = 0;
        while let Some((to_b, datagram)) = in_flight.pop() {
            deliveries += 1;
            assert!(deliveries < 16, "handshake did not settle");
            let peer = if to_b { &mut self.b } else { &mut self.a };
            let mut input: &[u8] = &datagram;
            // Per boringtun's contract: after WriteToNetwork, call again with an empty datagram
            // to flush queued packets, until Done.
            loop {
                match peer.decapsulate(None, input, &mut buf) {
                    TunnResult::WriteToNetwork(out) => in_flight.push((!to_b, out.to_vec())),
                    TunnResult::Done => break,
                    other => panic!("unexpected result during handshake: {}", describe(&other)),
                }
                input = &[];
            }
        }
        assert!(
            self.a.time_since_last_handshake().is_some()
                && self.b.time_since_last_handshake().is_some(),
            "handshake finished without a session on both sides"
        );
    }
}

/// One data packet `a -> b`: `a` encapsulates `packet` into `net_buf`, `b` decapsulates it into
/// `tun_buf`. Returns the length of the inner packet `b` hands to its tunnel.
///
/// # Panics
/// If either step does not give the expected result (data message, then `WriteToTunnelV4`).
#[inline]
pub fn round_trip(
    a: &mut Tunn,
    b: &mut Tunn,
    packet: &[u8],
    net_buf: &mut [u8],
    tun_buf: &mut [u8],
) -> usize {
    let datagram: &[u8] = match a.encapsulate(packet, net_buf) {
        TunnResult::WriteToNetwork(d) if d.first() == Some(&MSG_DATA) => d,
        other => panic!(
            "encapsulate: expected a data message, got {}",
            describe(&other)
        ),
    };
    match b.decapsulate(None, datagram, tun_buf) {
        TunnResult::WriteToTunnelV4(inner, _src) => inner.len(),
        other => panic!(
            "decapsulate: expected WriteToTunnelV4, got {}",
            describe(&other)
        ),
    }
}

/// Two isthmus engines ([`isthmus_wg::Engine`]) as peers, in memory: the
/// whole per-packet path isthmus runs (allowed-IPs lookup, peer locks, counters, cryptokey
/// check), not just boringtun's part of it.
pub struct EnginePair {
    pub a: Engine,
    pub b: Engine,
    sink_a: LastOutput,
    sink_b: LastOutput,
    scratch: Vec<u8>,
    /// The datagram `a` sealed, and the packet `b` opened: the buffers the daemon's own
    /// threads hand to `seal` and `open`.
    net: Vec<u8>,
    tun: Vec<u8>,
    /// Each engine's view of its configuration, refreshed per packet as the daemon's
    /// threads refresh it per batch.
    burst_a: Burst,
    burst_b: Burst,
}

/// A [`Transmit`] that keeps only the last output in a reused buffer: no allocation.
struct LastOutput {
    buf: RefCell<Vec<u8>>,
    len: Cell<usize>,
}

impl LastOutput {
    fn new() -> Self {
        LastOutput {
            buf: RefCell::new(vec![0; BUF_LEN]),
            len: Cell::new(0),
        }
    }

    fn keep(&self, data: &[u8]) -> io::Result<()> {
        self.buf.borrow_mut()[..data.len()].copy_from_slice(data);
        self.len.set(data.len());
        Ok(())
    }
}

impl Transmit for LastOutput {
    fn send(&self, _to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.keep(datagram)
    }
    fn write_tun(&self, packet: &[u8]) -> io::Result<()> {
        self.keep(packet)
    }
}

const ENGINE_ADDR_A: &str = "192.0.2.1:51820";
const ENGINE_FROM_A: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 51820));
const ENGINE_ADDR_B: &str = "192.0.2.2:51820";

impl EnginePair {
    /// Two engines that are each other's peer (10.0.0.1 <-> 10.0.0.2), handshake done.
    pub fn connected() -> Self {
        let (ka, kb) = (Key([0x11; 32]), Key([0x22; 32]));
        let config = |own: Key, peer: Key, endpoint: &str, allowed: &str| {
            let mut pc = PeerConfig::new(peer.public_from_private());
            pc.endpoint = Some(endpoint.parse().expect("endpoint"));
            pc.allowed_ips = vec![allowed.parse().expect("prefix")];
            DeviceConfig {
                private_key: Some(own),
                listen_port: 51820,
                fwmark: 0,
                peers: vec![pc],
            }
        };
        let setup = Capture::default();
        let (a, b) = (Engine::new(), Engine::new());
        a.reconfigure(
            config(ka, kb, ENGINE_ADDR_B, "10.0.0.2/32"),
            &Default::default(),
            &setup,
        );
        b.reconfigure(
            config(kb, ka, ENGINE_ADDR_A, "10.0.0.1/32"),
            &Default::default(),
            &setup,
        );
        let mut scratch = vec![0; BUF_LEN];
        a.handle_outbound(&ipv4_packet(PACKET_LEN), &mut scratch, &setup);
        // Shuttle until quiet: initiation, response, keepalive and the queued packet.
        for _ in 0..8 {
            for out in setup.take() {
                if let Output::Datagram(to, d) = out {
                    let (dev, from) = if to.to_string() == ENGINE_ADDR_B {
                        (&b, ENGINE_ADDR_A)
                    } else {
                        (&a, ENGINE_ADDR_B)
                    };
                    dev.handle_inbound(from.parse().expect("addr"), &d, &mut scratch, &setup);
                }
            }
        }
        assert!(
            a.snapshot().peers[0].last_handshake.is_some(),
            "engines did not complete a handshake"
        );
        EnginePair {
            sink_a: LastOutput::new(),
            sink_b: LastOutput::new(),
            scratch,
            net: vec![0; MAX_PACKET],
            tun: vec![0; MAX_PACKET],
            burst_a: a.burst(),
            burst_b: b.burst(),
            a,
            b,
        }
    }

    /// One packet a -> b through both engines as the daemon runs them: `seal` into a
    /// datagram buffer, `open` from it into a packet buffer (the daemon sends and writes
    /// from those buffers, so nothing is copied out). Returns the opened packet's length.
    #[inline]
    pub fn round_trip(&mut self, packet: &[u8]) -> usize {
        self.a.refresh(&mut self.burst_a);
        let sealed = self
            .a
            .seal(&self.burst_a, packet, &mut self.net, &self.sink_a)
            .expect("a sealed the packet");
        self.b.refresh(&mut self.burst_b);
        let n = self
            .b
            .open(
                &self.burst_b,
                ENGINE_FROM_A,
                &self.net[..sealed.len],
                &mut self.tun,
                &self.sink_b,
            )
            .expect("b opened the datagram");
        assert_eq!(n, packet.len(), "engine round trip lost the packet");
        n
    }

    /// One packet a -> b through the one-packet API (`handle_outbound` -> `handle_inbound`),
    /// whose outputs the bench sinks copy.
    #[inline]
    pub fn round_trip_handle(&mut self, packet: &[u8]) -> usize {
        self.sink_b.len.set(0);
        self.a
            .handle_outbound(packet, &mut self.scratch, &self.sink_a);
        let datagram = self.sink_a.buf.borrow();
        let from: SocketAddr = SocketAddr::from(([192, 0, 2, 1], 51820));
        self.b.handle_inbound(
            from,
            &datagram[..self.sink_a.len.get()],
            &mut self.scratch,
            &self.sink_b,
        );
        let n = self.sink_b.len.get();
        assert_eq!(n, packet.len(), "engine round trip lost the packet");
        n
    }
}

/// TCP payload of the super-segment the batched pipeline pushes: a 64 KiB IPv4 TSO packet
/// (20-byte IP and 20-byte TCP headers).
pub const SUPER_PAYLOAD: usize = 65_535 - 40;

/// Segment payload on a 1420-byte tunnel MTU (no TCP options).
pub const SUPER_MSS: usize = PACKET_LEN - 40;

/// The whole batched hot path in memory, one 64 KiB TCP super-segment at a time, as the
/// daemon's threads run it on one worker: split (GSO) with each segment built in an
/// [`OutBatch`] where its data message goes -> sealed there -> (the kernel's send and
/// receive, not modelled) -> each datagram opened where it lies -> coalesce (GRO) -> one
/// TUN write.
pub struct Pipeline {
    engines: EnginePair,
    /// Virtio header, then the super-segment.
    tun_read: Vec<u8>,
    batch: OutBatch,
    /// Where each sealed datagram lies in the batch.
    spans: Vec<std::ops::Range<usize>>,
    seal_jobs: SealJobs,
    open_jobs: OpenJobs,
    workers: Workers,
    gro: Coalescer,
}

impl Pipeline {
    pub fn new() -> Self {
        let mut tun_read = vec![0u8; VIRTIO_HDR_LEN];
        VirtioHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: SUPER_MSS as u16,
            csum_start: 20,
            csum_offset: 16,
        }
        .encode(&mut tun_read);
        tun_read.extend_from_slice(&tcp_super_segment(SUPER_PAYLOAD));
        Pipeline {
            engines: EnginePair::connected(),
            tun_read,
            batch: OutBatch::new(2 * (MAX_PACKET + 64 * DATA_OVERHEAD), 256),
            spans: Vec::with_capacity(64),
            seal_jobs: SealJobs::with_capacity(256),
            open_jobs: OpenJobs::with_capacity(64),
            workers: Workers::new(1).expect("one worker"),
            gro: Coalescer::new(),
        }
    }

    /// Packets (MTU-sized segments) one [`Pipeline::run`] carries.
    pub fn packets() -> usize {
        SUPER_PAYLOAD.div_ceil(SUPER_MSS)
    }

    /// One super-segment through; returns the bytes of TUN writes on the far side.
    pub fn run(&mut self) -> usize {
        let Pipeline {
            engines,
            tun_read,
            batch,
            spans,
            seal_jobs,
            open_jobs,
            workers,
            gro,
        } = self;
        let hdr = VirtioHdr::decode(tun_read).expect("header");
        engines.a.refresh(&mut engines.burst_a);
        let mut sink = BatchSink {
            engine: &engines.a,
            burst: &engines.burst_a,
            out: &engines.sink_a,
            batch,
            jobs: seal_jobs,
            spans,
        };
        gso::split_into(hdr, None, &mut tun_read[VIRTIO_HDR_LEN..], &mut sink).expect("split");
        seal_jobs
            .run(workers, batch.filled_mut())
            .expect("sealed in place");
        let (b, burst) = (&engines.b, &mut engines.burst_b);
        b.refresh(burst);
        let mut written = 0;
        let mut emit = |h: &[u8], p: &[u8]| written += h.len() + p.len();
        let buf = batch.filled_mut();
        for span in spans.drain(..) {
            let queued = b.open_queue(burst, buf, span, open_jobs);
            assert!(matches!(queued, Queued::Queued), "a data message");
        }
        open_jobs
            .run(workers, buf, |buf, opened| {
                let r = b
                    .open_commit(burst, ENGINE_FROM_A, opened, buf)
                    .expect("opened");
                gro.push(&mut buf[r.start - VIRTIO_HDR_LEN..r.end], &mut emit);
            })
            .expect("opened in place");
        batch.clear();
        gro.flush(&mut emit);
        written
    }
}

/// The TUN reader's way to take segments: built in the batch, sealed there.
struct BatchSink<'a> {
    engine: &'a Engine,
    burst: &'a Burst,
    out: &'a LastOutput,
    batch: &'a mut OutBatch,
    jobs: &'a mut SealJobs,
    spans: &'a mut Vec<std::ops::Range<usize>>,
}

impl gso::Segments for BatchSink<'_> {
    fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        let space = self.batch.space(len + DATA_OVERHEAD)?;
        space.get_mut(DATA_PLAINTEXT_AT..DATA_PLAINTEXT_AT + len)
    }

    fn built(&mut self, len: usize) {
        let start = self.batch.offset();
        assert!(
            self.engine
                .seal_placed(self.burst, len, self.batch, self.jobs, self.out),
            "sealed"
        );
        self.spans.push(start..self.batch.offset());
    }

    fn whole(&mut self, _packet: &mut [u8]) {
        unreachable!("the pipeline reads only super-segments");
    }
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

/// A 10.0.0.1 -> 10.0.0.2 IPv4/TCP packet with `payload` bytes and no options, as the
/// kernel hands a TSO super-segment to the TUN (the split rewrites every checksum).
fn tcp_super_segment(payload: usize) -> Vec<u8> {
    packet::Tcp {
        src: [10, 0, 0, 1].into(),
        dst: [10, 0, 0, 2].into(),
        seq: 1,
        ack: 1,
        flags: packet::TCP_ACK | packet::TCP_PSH,
        options: Vec::new(),
        ip_id: 0,
        ..packet::Tcp::new(false, 1, payload)
    }
    .build()
}

/// Short human-readable name of a [`TunnResult`] for panic messages.
fn describe(r: &TunnResult<'_>) -> String {
    match r {
        TunnResult::Done => "Done".into(),
        TunnResult::Err(e) => format!("Err({e:?})"),
        TunnResult::WriteToNetwork(p) => format!("WriteToNetwork({} bytes)", p.len()),
        TunnResult::WriteToTunnelV4(p, _) => format!("WriteToTunnelV4({} bytes)", p.len()),
        TunnResult::WriteToTunnelV6(p, _) => format!("WriteToTunnelV6({} bytes)", p.len()),
    }
}

/// True when the bench binary runs under `cargo bench` (which passes `--bench`), false under
/// `cargo test --benches` or `--list`, where the benches should only smoke-test.
pub fn bench_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_header_is_valid() {
        let p = ipv4_packet(PACKET_LEN);
        assert_eq!(p.len(), PACKET_LEN);
        packet::assert_valid(&p);
        packet::assert_valid(&tcp_super_segment(SUPER_PAYLOAD));
    }

    #[test]
    fn engines_round_trip() {
        let mut pair = EnginePair::connected();
        let packet = ipv4_packet(PACKET_LEN);
        for _ in 0..3 {
            assert_eq!(pair.round_trip(&packet), PACKET_LEN);
        }
    }

    #[test]
    fn engines_round_trip_through_the_one_packet_api() {
        let mut pair = EnginePair::connected();
        let packet = ipv4_packet(PACKET_LEN);
        for _ in 0..3 {
            assert_eq!(pair.round_trip_handle(&packet), PACKET_LEN);
        }
    }

    #[test]
    fn the_pipeline_delivers_a_super_segment_in_one_write() {
        let mut p = Pipeline::new();
        for _ in 0..3 {
            // One coalesced write: virtio header + IP + TCP + the whole payload.
            assert_eq!(p.run(), VIRTIO_HDR_LEN + 40 + SUPER_PAYLOAD);
        }
    }

    #[test]
    fn pair_round_trips() {
        let mut pair = TunnPair::connected();
        let packet = ipv4_packet(PACKET_LEN);
        let (mut net, mut tun) = (vec![0u8; BUF_LEN], vec![0u8; BUF_LEN]);
        for _ in 0..3 {
            let n = round_trip(&mut pair.a, &mut pair.b, &packet, &mut net, &mut tun);
            assert_eq!(&tun[..n], &packet[..]);
        }
    }
}
