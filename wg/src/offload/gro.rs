//! Coalescing: consecutive decrypted TCP segments of one flow, or UDP datagrams of one flow,
//! become one super-segment (with a virtio-net header asking the kernel to treat it as
//! GSO), so the receiving stack and the TUN write path run once per ~64 KiB rather than
//! once per packet.
//!
//! It is a streaming coalescer with one pending flow: the packets of a bulk transfer
//! arrive in order and back to back (one UDP GRO batch from a peer is one sender's TSO or
//! UDP GSO burst), so merging only neighbours catches nearly all of it with one buffer and
//! no flow table. Anything that is not a plain in-order TCP data segment (or, with UDP on,
//! a plain UDP datagram) passes through unchanged, after whatever was pending.
//!
//! Only packets whose IPv4 header and transport checksums verify are merged, as the
//! kernel's GRO and wireguard-go's do: the merged packet's checksum is recomputed
//! (CHECKSUM_PARTIAL), so merging a bad one would hand the receiver corrupt data it would
//! otherwise drop. A bad one passes through as it came. The check runs only when a merge
//! is about to happen (the head of a run once, then each joining packet), so lone packets
//! pay nothing.
//!
//! UDP (`GSO_UDP_L4`) is off unless the TUN accepted `TUN_F_USO4|6` (kernel ≥ 6.2; see
//! [`Coalescer::with_udp`]). The rules are the kernel's `udp_gro_receive_segment` and
//! wireguard-go's `udpGRO`: same addresses, ports and IP header fields; every datagram
//! the size of the first but a shorter last one; at most [`MAX_UDP_SEGMENTS`]. Two more of
//! ours keep a re-segmented run byte-identical to what came in: an IPv4 datagram without
//! a checksum (zero) is never merged (the merged one would get checksums it never had),
//! and without DF the IPv4 IDs must be consecutive, as the kernel's GRO requires, because
//! segmentation numbers them from the first (with DF the ID means nothing, RFC 6864).

use super::checksum::{finish, fold, pseudo_header, sum};
use super::virtio::{VirtioHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VIRTIO_HDR_LEN};
use super::*;

/// The largest IP packet the coalescer builds (the IPv4 total-length limit).
pub const MAX_COALESCED: usize = 65_535;

/// The most UDP datagrams in one super-packet: the kernel's own GRO stops there
/// (`UDP_GRO_CNT_MAX`).
pub const MAX_UDP_SEGMENTS: usize = 64;

const UDP_HLEN: usize = 8;

/// A TCP data segment or UDP datagram the coalescer could merge.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    udp: bool,
    /// IP header length = transport offset.
    l4: usize,
    /// IP + transport header length.
    hlen: usize,
    /// TCP sequence number (0 for UDP).
    seq: u32,
    payload: usize,
    psh: bool,
}

impl Segment {
    /// Plain IPv4 (no options, not a fragment) or IPv6 (no extension headers) carrying TCP
    /// with payload and no flags but ACK and PSH, or UDP with payload and (over IPv4) a
    /// checksum; lengths consistent with the slice.
    fn parse(p: &[u8]) -> Option<Segment> {
        let (v6, l4, proto) = match p.first()? >> 4 {
            4 => {
                let ok = p.len() >= 28
                    && p[0] == 0x45
                    && usize::from(be16(p, 2)) == p.len()
                    && be16(p, 6) & 0x3fff == 0;
                (false, if ok { 20 } else { return None }, p[9])
            }
            6 => {
                let ok = p.len() >= 48 && usize::from(be16(p, 4)) + 40 == p.len();
                (true, if ok { 40 } else { return None }, p[6])
            }
            _ => return None,
        };
        if proto == IPPROTO_UDP {
            let hlen = l4 + UDP_HLEN;
            let ok = hlen < p.len()
                && usize::from(be16(p, l4 + 4)) == p.len() - l4
                && (v6 || be16(p, l4 + UDP_CSUM) != 0);
            return ok.then_some(Segment {
                v6,
                udp: true,
                l4,
                hlen,
                seq: 0,
                payload: p.len() - hlen,
                psh: false,
            });
        }
        if proto != IPPROTO_TCP || p.len() < l4 + 20 {
            return None;
        }
        let thlen = usize::from(p[l4 + 12] >> 4) * 4;
        let hlen = l4 + thlen;
        let flags = p[l4 + TCP_FLAGS];
        if thlen < 20
            || hlen >= p.len()
            || flags & !(TCP_ACK | TCP_PSH) != 0
            || flags & TCP_ACK == 0
        {
            return None;
        }
        Some(Segment {
            v6,
            udp: false,
            l4,
            hlen,
            seq: be32(p, l4 + 4),
            payload: p.len() - hlen,
            psh: flags & TCP_PSH != 0,
        })
    }

    fn proto(&self) -> u8 {
        if self.udp {
            IPPROTO_UDP
        } else {
            IPPROTO_TCP
        }
    }

    fn csum_offset(&self) -> usize {
        if self.udp {
            UDP_CSUM
        } else {
            TCP_CSUM
        }
    }
}

/// The flow being built in the pending buffer.
#[derive(Debug, Clone, Copy)]
struct Pending {
    first: Segment,
    /// Payload size of every merged segment but possibly the last.
    mss: usize,
    next_seq: u32,
    segments: usize,
    /// A short segment or PSH ended the run; nothing more may join.
    closed: bool,
    /// The first segment's checksums were checked and verify (done at the first merge).
    verified: bool,
}

/// What a coalescer wrote since [`Coalescer::take_stats`] last asked: packets that went out
/// inside super-segments, and the super-segments (TUN writes) they made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroStats {
    pub tcp_merged: u64,
    pub tcp_writes: u64,
    pub udp_merged: u64,
    pub udp_writes: u64,
}

pub struct Coalescer {
    /// Virtio header, then the pending packet.
    buf: Box<[u8]>,
    /// Bytes of the pending packet (after the header); 0 when nothing is pending.
    len: usize,
    pending: Option<Pending>,
    /// UDP datagrams are merged too (only for a TUN that accepted USO).
    udp: bool,
    stats: GroStats,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    /// A coalescer for TCP only: UDP datagrams pass through one by one.
    pub fn new() -> Coalescer {
        Coalescer::with_udp(false)
    }

    /// With `udp`, UDP datagrams are coalesced into `GSO_UDP_L4` writes as well: only for a
    /// TUN that accepted `TUN_F_USO4|TUN_F_USO6`, as an older kernel rejects such a write.
    pub fn with_udp(udp: bool) -> Coalescer {
        Coalescer {
            buf: vec![0u8; VIRTIO_HDR_LEN + MAX_COALESCED].into_boxed_slice(),
            len: 0,
            pending: None,
            udp,
            stats: GroStats::default(),
        }
    }

    /// The counts since the last call, and starts them again from zero.
    pub fn take_stats(&mut self) -> GroStats {
        std::mem::take(&mut self.stats)
    }

    /// Takes one decrypted packet. `slot` is [`VIRTIO_HDR_LEN`] bytes of headroom followed
    /// by the packet; a packet that cannot be merged is emitted from `slot` itself (header
    /// filled in). `emit` receives whole TUN writes: a virtio header and a packet.
    pub fn push(&mut self, slot: &mut [u8], emit: &mut impl FnMut(&[u8])) {
        let packet = &slot[VIRTIO_HDR_LEN..];
        match Segment::parse(packet).filter(|s| self.udp || !s.udp) {
            Some(seg)
                if self.can_merge(packet, &seg)
                    && self.head_verifies()
                    && checksums_verify(packet, &seg) =>
            {
                self.merge(packet, &seg)
            }
            Some(seg) => {
                self.flush(emit);
                self.start(packet, seg);
            }
            None => {
                self.flush(emit);
                VirtioHdr::NONE.encode(slot);
                emit(slot);
            }
        }
    }

    /// Emits whatever is pending; call at the end of every batch.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8])) {
        let Some(p) = self.pending.take() else { return };
        let len = std::mem::take(&mut self.len);
        let (hdr_bytes, packet) = self.buf.split_at_mut(VIRTIO_HDR_LEN);
        let packet = &mut packet[..len];
        if p.segments == 1 {
            // Untouched, checksums intact.
            VirtioHdr::NONE.encode(hdr_bytes);
        } else {
            let f = p.first;
            if f.v6 {
                put16(packet, 4, (len - 40) as u16);
            } else {
                put16(packet, 2, len as u16);
                put16(packet, 10, 0);
                let c = finish(sum(&packet[..20], 0));
                put16(packet, 10, c);
            }
            if f.udp {
                put16(packet, f.l4 + 4, (len - f.l4) as u16);
            }
            // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel (or its
            // own segmentation) completes it.
            let (src, dst) = ip_addrs(packet, f.v6);
            let partial = fold(pseudo_header(src, dst, f.proto(), len - f.l4));
            put16(packet, f.l4 + f.csum_offset(), partial);
            let gso_type = match (f.udp, f.v6) {
                (true, _) => GSO_UDP_L4,
                (false, true) => GSO_TCPV6,
                (false, false) => GSO_TCPV4,
            };
            VirtioHdr {
                flags: F_NEEDS_CSUM,
                gso_type,
                hdr_len: f.hlen as u16,
                gso_size: p.mss as u16,
                csum_start: f.l4 as u16,
                csum_offset: f.csum_offset() as u16,
            }
            .encode(hdr_bytes);
            let n = p.segments as u64;
            if f.udp {
                self.stats.udp_merged += n;
                self.stats.udp_writes += 1;
            } else {
                self.stats.tcp_merged += n;
                self.stats.tcp_writes += 1;
            }
        }
        emit(&self.buf[..VIRTIO_HDR_LEN + len]);
    }

    fn start(&mut self, packet: &[u8], seg: Segment) {
        self.buf[VIRTIO_HDR_LEN..VIRTIO_HDR_LEN + packet.len()].copy_from_slice(packet);
        self.len = packet.len();
        self.pending = Some(Pending {
            first: seg,
            mss: seg.payload,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            segments: 1,
            closed: seg.psh,
            verified: false,
        });
    }

    /// Whether the pending run's first segment has valid checksums, checked once.
    fn head_verifies(&mut self) -> bool {
        let Some(p) = self.pending.as_mut() else {
            return false;
        };
        if !p.verified {
            // Still one segment: the buffer holds it exactly as it came.
            let packet = &self.buf[VIRTIO_HDR_LEN..VIRTIO_HDR_LEN + self.len];
            p.verified = checksums_verify(packet, &p.first);
        }
        p.verified
    }

    fn can_merge(&self, packet: &[u8], seg: &Segment) -> bool {
        let Some(p) = &self.pending else { return false };
        let f = &p.first;
        if p.closed
            || seg.v6 != f.v6
            || seg.udp != f.udp
            || seg.hlen != f.hlen
            || seg.payload > p.mss
            || self.len + seg.payload > MAX_COALESCED
        {
            return false;
        }
        let head = &self.buf[VIRTIO_HDR_LEN..VIRTIO_HDR_LEN + f.hlen];
        let same_ip = if f.v6 {
            // Version, traffic class, flow label; next header, hop limit; addresses.
            head[..4] == packet[..4] && head[6..40] == packet[6..40]
        } else {
            // Version, IHL, TOS (with ECN); DF; TTL, protocol; addresses.
            head[..2] == packet[..2]
                && head[6] & 0x40 == packet[6] & 0x40
                && head[8..10] == packet[8..10]
                && head[12..20] == packet[12..20]
        };
        if f.udp {
            return same_ip && self.udp_can_join(p, head, packet);
        }
        let l4 = f.l4;
        // Ports; acknowledgement; data offset; window; urgent pointer; options (timestamps
        // included) — everything but the sequence number, the flags checked above, and the
        // checksum. The urgent pointer means nothing without URG, but a merge would copy the
        // first segment's into every later one, so a segment that carries another one is
        // delivered as it came (found by the gro_coalesce fuzz target).
        seg.seq == p.next_seq
            && same_ip
            && head[l4..l4 + 4] == packet[l4..l4 + 4]
            && head[l4 + 8..l4 + 13] == packet[l4 + 8..l4 + 13]
            && head[l4 + 14..l4 + 16] == packet[l4 + 14..l4 + 16]
            && head[l4 + 18..f.hlen] == packet[l4 + 18..f.hlen]
    }

    /// The UDP rules beyond the IP header: same ports, room for one more, and over IPv4
    /// without DF the next IP ID (segmentation numbers the datagrams from the first's).
    fn udp_can_join(&self, p: &Pending, head: &[u8], packet: &[u8]) -> bool {
        let l4 = p.first.l4;
        let ids_ok = p.first.v6
            || head[6] & 0x40 != 0
            || be16(packet, 4) == be16(head, 4).wrapping_add(p.segments as u16);
        p.segments < MAX_UDP_SEGMENTS && ids_ok && head[l4..l4 + 4] == packet[l4..l4 + 4]
    }

    fn merge(&mut self, packet: &[u8], seg: &Segment) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let at = VIRTIO_HDR_LEN + self.len;
        self.buf[at..at + seg.payload].copy_from_slice(&packet[seg.hlen..]);
        self.len += seg.payload;
        p.segments += 1;
        p.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        if seg.payload < p.mss {
            p.closed = true;
        }
        if seg.psh {
            p.closed = true;
            self.buf[VIRTIO_HDR_LEN + p.first.l4 + TCP_FLAGS] |= TCP_PSH;
        }
    }
}

/// Whether `packet` (parsed as `seg`) has a valid IPv4 header checksum and transport
/// checksum.
fn checksums_verify(packet: &[u8], seg: &Segment) -> bool {
    let ip_ok = seg.v6 || finish(sum(&packet[..seg.l4], 0)) == 0;
    let (src, dst) = ip_addrs(packet, seg.v6);
    let l4 =
        pseudo_header(src, dst, seg.proto(), packet.len() - seg.l4) + sum(&packet[seg.l4..], 0);
    ip_ok && finish(l4) == 0
}

#[cfg(test)]
mod tests {
    use super::super::gso::split;
    use super::super::virtio::GSO_NONE;
    use super::*;
    use crate::packet::{assert_valid, complete_partial, l4_offset, Tcp, Udp};

    /// Feeds `packets` through a coalescer (UDP on), returns the TUN writes as (header,
    /// packet).
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VirtioHdr, Vec<u8>)> {
        coalesce_with(Coalescer::with_udp(true), packets)
    }

    fn coalesce_with(mut c: Coalescer, packets: &[Vec<u8>]) -> Vec<(VirtioHdr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut emit = |b: &[u8]| {
            let h = VirtioHdr::decode(b).expect("header");
            out.push((h, b[VIRTIO_HDR_LEN..].to_vec()));
        };
        for p in packets {
            let mut slot = vec![0xee; VIRTIO_HDR_LEN];
            slot.extend_from_slice(p);
            c.push(&mut slot, &mut emit);
        }
        c.flush(&mut emit);
        out
    }

    /// A run of segments of `mss` bytes covering `total` payload bytes from `seq`.
    fn run(v6: bool, seq: u32, total: usize, mss: usize, last_psh: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < total {
            let n = mss.min(total - off);
            let mut t = Tcp::new(v6, seq.wrapping_add(off as u32), n);
            if last_psh && off + n == total {
                t.flags |= TCP_PSH;
            }
            t.ip_id = 100 + out.len() as u16;
            out.push(t.build());
            off += n;
        }
        out
    }

    /// Checks a coalesced write the way the kernel would use it: complete the checksum,
    /// then split it with our own GSO and compare with the original segments.
    fn assert_resegments_to(h: &VirtioHdr, packet: &[u8], original: &[Vec<u8>]) {
        assert_eq!(h.flags, F_NEEDS_CSUM);
        let l4 = l4_offset(packet);
        assert_eq!(usize::from(h.csum_start), l4);
        assert_eq!(usize::from(h.hdr_len), l4 + 32);
        let mut whole = packet.to_vec();
        complete_partial(&mut whole, l4, TCP_CSUM);
        assert_valid(&whole);
        let mut again = packet.to_vec();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let mut scratch = vec![0u8; 65_536];
        split(*h, &mut again, &mut scratch, |s| segs.push(s.to_vec())).expect("split");
        assert_eq!(segs.len(), original.len());
        for (got, want) in segs.iter().zip(original) {
            // IP IDs are regenerated from the first; everything else must match.
            let mut got = got.clone();
            let mut want = want.clone();
            if l4 == 20 {
                for p in [&mut got, &mut want] {
                    put16(p, 4, 0);
                    put16(p, 10, 0);
                }
            }
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_bulk_run_becomes_one_super_segment() {
        // (IPv6?, total payload, MSS, PSH on the last, expected writes)
        let cases = [
            (false, 44 * 1368, 1368, true, 1),
            (true, 44 * 1348, 1348, false, 1),
            (false, 10 * 1368 + 7, 1368, true, 1), // short tail joins, then closes
            (false, 1368 * 48 + 1000, 1368, false, 2), // over 64 KiB: two writes
        ];
        for (v6, total, mss, psh, writes) in cases {
            let packets = run(v6, 0xffff_0000, total, mss, psh);
            let out = coalesce(&packets);
            assert_eq!(out.len(), writes, "v6={v6} total={total}");
            let mut used = 0;
            for (h, p) in &out {
                let n = (p.len() - l4_offset(p) - 32).div_ceil(mss);
                assert_eq!(h.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
                assert_eq!(usize::from(h.gso_size), mss);
                assert!(p.len() <= MAX_COALESCED);
                assert_resegments_to(h, p, &packets[used..used + n]);
                let l4 = l4_offset(p);
                assert_eq!(
                    p[l4 + TCP_FLAGS] & TCP_PSH != 0,
                    psh && used + n == packets.len()
                );
                used += n;
            }
            assert_eq!(used, packets.len());
        }
    }

    #[test]
    fn what_cannot_merge_passes_through_in_order() {
        let a = run(false, 1000, 3 * 1000, 1000, false);
        let mut ack_only = Tcp::new(false, 5000, 0);
        ack_only.flags = TCP_ACK;
        let ack_only = ack_only.build();
        let mut syn = Tcp::new(false, 1, 0);
        syn.flags = 0x02;
        let syn = syn.build();
        let mut other_flow = Tcp::new(false, 4000, 1000);
        other_flow.sport = 40001;
        let other_flow = other_flow.build();
        let gap = Tcp::new(false, 4000 + 1, 1000).build(); // not a's next sequence number
        let u = Udp::new(false, 100).build();
        let v6 = Tcp::new(true, 4000, 1000).build();
        // (name, packets, segments per write)
        type Case<'a> = (&'a str, Vec<Vec<u8>>, Vec<usize>);
        let cases: Vec<Case> = vec![
            // (name, packets, segments per write)
            (
                "ack-only between",
                vec![a[0].clone(), ack_only.clone(), a[1].clone()],
                vec![1, 1, 1],
            ),
            (
                "syn",
                vec![syn.clone(), a[0].clone(), a[1].clone()],
                vec![1, 2],
            ),
            (
                "udp",
                vec![a[0].clone(), u.clone(), a[1].clone(), a[2].clone()],
                vec![1, 1, 2],
            ),
            (
                "other flow",
                vec![a[0].clone(), other_flow.clone(), a[1].clone()],
                vec![1, 1, 1],
            ),
            (
                "sequence gap",
                vec![a[0].clone(), a[1].clone(), a[2].clone(), gap.clone()],
                vec![3, 1],
            ),
            (
                "family change",
                vec![a[0].clone(), a[1].clone(), a[2].clone(), v6.clone()],
                vec![3, 1],
            ),
            ("reordered", vec![a[1].clone(), a[0].clone()], vec![1, 1]),
        ];
        for (name, packets, want) in cases {
            let out = coalesce(&packets);
            let got: Vec<usize> = out
                .iter()
                .map(|(h, p)| {
                    if h.gso_type == GSO_NONE {
                        assert_eq!(*h, VirtioHdr::NONE, "{name}");
                        1
                    } else {
                        (p.len() - l4_offset(p) - 32).div_ceil(usize::from(h.gso_size))
                    }
                })
                .collect();
            assert_eq!(got, want, "{name}");
            // Order and content: single packets come out byte for byte.
            let mut i = 0;
            for (h, p) in &out {
                if h.gso_type == GSO_NONE {
                    assert_eq!(p, &packets[i], "{name}: packet {i}");
                    i += 1;
                } else {
                    i += (p.len() - l4_offset(p) - 32).div_ceil(usize::from(h.gso_size));
                }
            }
            assert_eq!(i, packets.len(), "{name}");
        }
    }

    /// Recomputes an IPv4 TCP packet's header and TCP checksums after an edit.
    fn refresh_ipv4_checksums(p: &mut [u8]) {
        put16(p, 10, 0);
        let ip = finish(sum(&p[..20], 0));
        put16(p, 10, ip);
        put16(p, 20 + TCP_CSUM, 0);
        let acc = pseudo_header(&p[12..16], &p[16..20], 6, p.len() - 20) + sum(&p[20..], 0);
        put16(p, 20 + TCP_CSUM, finish(acc));
    }

    #[test]
    fn header_differences_stop_a_merge() {
        let base = run(false, 1, 2000, 1000, false);
        type Edit = fn(&mut Vec<u8>);
        let edits: [(&str, Edit); 6] = [
            ("ack number", |p| p[20 + 8] ^= 1),
            ("window", |p| p[20 + 15] ^= 1),
            ("timestamp option", |p| p[20 + 31] ^= 1),
            ("TTL", |p| p[8] -= 1),
            ("ECN CE", |p| p[1] |= 3),
            ("destination", |p| p[19] ^= 1),
        ];
        for (name, edit) in edits {
            let mut second = base[1].clone();
            edit(&mut second);
            // Checksums made valid again: only the header compare can refuse this merge.
            refresh_ipv4_checksums(&mut second);
            assert_valid(&second);
            let out = coalesce(&[base[0].clone(), second]);
            assert_eq!(out.len(), 2, "{name} differs: no merge");
        }
        // A segment after a PSH, or after a short one, starts a new run.
        let mut first = Tcp::new(false, 1, 1000);
        first.flags |= TCP_PSH;
        let out = coalesce(&[first.build(), Tcp::new(false, 1001, 1000).build()]);
        assert_eq!(out.len(), 2, "after PSH");
        let out = coalesce(&[
            Tcp::new(false, 1, 1000).build(),
            Tcp::new(false, 1001, 500).build(),
            Tcp::new(false, 1501, 500).build(),
        ]);
        assert_eq!(out.len(), 2, "after a short segment");
        // A larger segment than the first cannot join either.
        let out = coalesce(&[
            Tcp::new(false, 1, 500).build(),
            Tcp::new(false, 501, 1000).build(),
        ]);
        assert_eq!(out.len(), 2, "larger than the first");
    }

    /// Sets the TCP urgent pointer of `p` (TCP at `l4`) and fixes the checksum (RFC 1624),
    /// so only the pointer differs and the segment stays valid.
    fn set_urgent_pointer(p: &mut [u8], l4: usize, urg: u16) {
        let old = u16::from_be_bytes([p[l4 + 18], p[l4 + 19]]);
        let check = u16::from_be_bytes([p[l4 + 16], p[l4 + 17]]);
        let mut acc = u32::from(!check) + u32::from(!old) + u32::from(urg);
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        put16(p, l4 + 16, !(acc as u16));
        put16(p, l4 + 18, urg);
    }

    /// Found by the gro_coalesce fuzz target: a valid segment whose urgent pointer was not
    /// zero (URG unset) joined a run, and re-segmenting gave every later segment the
    /// first one's pointer. Segments whose urgent pointers differ are not merged.
    #[test]
    fn a_different_urgent_pointer_stops_a_merge() {
        for v6 in [false, true] {
            let base = run(v6, 1, 3000, 1000, false);
            let l4 = l4_offset(&base[0]);
            for at in 0..2 {
                let mut packets = base.clone();
                set_urgent_pointer(&mut packets[at], l4, 0x2600);
                assert_valid(&packets[at]);
                let out = coalesce(&packets);
                let writes: Vec<usize> = out
                    .iter()
                    .map(|(h, p)| {
                        if h.gso_type == GSO_NONE {
                            1
                        } else {
                            (p.len() - l4 - 32).div_ceil(1000)
                        }
                    })
                    .collect();
                assert_eq!(writes.iter().sum::<usize>(), 3, "v6={v6} at={at}");
                let with_pointer: Vec<&Vec<u8>> = out
                    .iter()
                    .map(|(_, p)| p)
                    .filter(|p| p[l4 + 18..l4 + 20] != [0, 0])
                    .collect();
                assert!(
                    with_pointer == vec![&packets[at]],
                    "v6={v6} at={at}: {} packets carry the urgent pointer",
                    with_pointer.len()
                );
            }
        }
    }

    /// Found by the gro_coalesce fuzz target: a segment with a bad TCP or IPv4 header
    /// checksum was merged, and the merged packet's recomputed checksum made the kernel
    /// accept its corrupt bytes. Bad segments now pass through untouched, in order.
    #[test]
    fn segments_with_bad_checksums_are_never_merged() {
        type Edit = fn(&mut Vec<u8>);
        let edits: [(&str, bool, Edit); 3] = [
            ("TCP checksum", false, |p| p[20 + 16] ^= 0x5a),
            ("IPv4 header checksum", false, |p| p[10] ^= 0xa5),
            ("TCPv6 checksum", true, |p| p[40 + 16] ^= 0x5a),
        ];
        for (name, v6, edit) in edits {
            for bad in 0..4 {
                let mut packets = run(v6, 1, 4 * 1000, 1000, false);
                edit(&mut packets[bad]);
                let out = coalesce(&packets);
                // The bad one comes out byte for byte, alone; the others still merge.
                let alone: Vec<&Vec<u8>> = out
                    .iter()
                    .filter(|(h, _)| h.gso_type == GSO_NONE)
                    .map(|(_, p)| p)
                    .collect();
                assert!(alone.contains(&&packets[bad]), "{name} at {bad}: merged");
                let merged: usize = out
                    .iter()
                    .filter(|(h, _)| h.gso_type != GSO_NONE)
                    .map(|(h, p)| (p.len() - l4_offset(p) - 32).div_ceil(usize::from(h.gso_size)))
                    .sum();
                assert_eq!(merged + alone.len(), 4, "{name} at {bad}: packets lost");
                assert!(
                    merged >= 2,
                    "{name} at {bad}: the good neighbours still merge"
                );
            }
        }
    }

    #[test]
    fn truncated_or_inconsistent_packets_pass_through() {
        let good = Tcp::new(false, 1, 100).build();
        let mut bad_len = good.clone();
        put16(&mut bad_len, 2, 9999);
        let mut frag = good.clone();
        frag[6] = 0x20; // MF
        let cases = [vec![0x45; 10], vec![], bad_len, frag, vec![0x60; 50]];
        for p in cases {
            let out = coalesce(std::slice::from_ref(&p));
            assert_eq!(out, vec![(VirtioHdr::NONE, p)]);
        }
    }

    /// Datagrams of one UDP flow with these payload sizes, each its own bytes; IPv4 IDs
    /// count up from 7.
    fn udp_run(v6: bool, df: bool, sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut u = Udp::new(v6, 0);
                u.payload = crate::packet::pattern(i as u32 * 31, n);
                u.df = df;
                u.ip_id = 7 + i as u16;
                u.build()
            })
            .collect()
    }

    /// Packets per TUN write: 1 for a plain one, else how many segments the header asks for.
    fn per_write(out: &[(VirtioHdr, Vec<u8>)]) -> Vec<usize> {
        out.iter()
            .map(|(h, p)| {
                if h.gso_type == GSO_NONE {
                    assert_eq!(*h, VirtioHdr::NONE);
                    1
                } else {
                    (p.len() - usize::from(h.hdr_len)).div_ceil(usize::from(h.gso_size))
                }
            })
            .collect()
    }

    /// Re-segments every write with our GSO (the kernel's stand-in) after checking the
    /// header and completing the checksum the way the kernel would.
    fn resegment(out: &[(VirtioHdr, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut segs = Vec::new();
        let mut scratch = vec![0u8; 65_536];
        for (h, p) in out {
            if h.gso_type == GSO_NONE {
                segs.push(p.clone());
                continue;
            }
            let l4 = l4_offset(p);
            assert_eq!(h.flags, F_NEEDS_CSUM);
            assert_eq!(usize::from(h.csum_start), l4);
            if h.gso_type == GSO_UDP_L4 {
                assert_eq!(usize::from(h.hdr_len), l4 + 8);
                assert_eq!(usize::from(h.csum_offset), UDP_CSUM);
                assert_eq!(usize::from(be16(p, l4 + 4)), p.len() - l4, "UDP length");
                let mut whole = p.clone();
                complete_partial(&mut whole, l4, UDP_CSUM);
                assert_valid(&whole);
            }
            assert!(p.len() <= MAX_COALESCED);
            let mut again = p.clone();
            split(*h, &mut again, &mut scratch, |s| segs.push(s.to_vec())).expect("split");
        }
        segs
    }

    #[test]
    fn a_udp_run_becomes_one_gso_udp_l4_write_and_splits_back_identically() {
        let tail = |n: usize, size: usize, last: usize| {
            let mut v = vec![size; n];
            v.push(last);
            v
        };
        // (name, IPv6?, DF?, payload sizes, packets per write)
        type Case = (&'static str, bool, bool, Vec<usize>, Vec<usize>);
        let cases: [Case; 6] = [
            ("v4 DF", false, true, vec![1200; 20], vec![20]),
            ("v4 no DF", false, false, tail(20, 1200, 500), vec![21]),
            ("v6", true, false, tail(10, 1380, 1), vec![11]),
            ("64 at most", false, true, vec![900; 70], vec![64, 6]),
            ("64 KiB at most", false, true, vec![1400; 60], vec![46, 14]),
            ("one", false, true, vec![1200], vec![1]),
        ];
        for (name, v6, df, sizes, want) in cases {
            let packets = udp_run(v6, df, &sizes);
            let mut c = Coalescer::with_udp(true);
            let mut out = Vec::new();
            for p in &packets {
                let mut slot = vec![0xee; VIRTIO_HDR_LEN];
                slot.extend_from_slice(p);
                c.push(&mut slot, &mut |b: &[u8]| {
                    out.push((
                        VirtioHdr::decode(b).expect("header"),
                        b[VIRTIO_HDR_LEN..].to_vec(),
                    ))
                });
            }
            c.flush(&mut |b: &[u8]| {
                out.push((
                    VirtioHdr::decode(b).expect("header"),
                    b[VIRTIO_HDR_LEN..].to_vec(),
                ))
            });
            assert_eq!(per_write(&out), want, "{name}");
            for (h, _) in out.iter().filter(|(h, _)| h.gso_type != GSO_NONE) {
                assert_eq!(
                    (h.gso_type, h.gso_size),
                    (GSO_UDP_L4, sizes[0] as u16),
                    "{name}"
                );
            }
            assert!(resegment(&out) == packets, "{name}: datagrams differ");
            let merged: usize = want.iter().filter(|&&n| n > 1).sum();
            let stats = c.take_stats();
            assert_eq!(stats.udp_merged, merged as u64, "{name}");
            assert_eq!(stats.tcp_merged, 0, "{name}");
            assert_eq!(c.take_stats(), GroStats::default(), "{name}: taken");
        }
    }

    /// Recomputes an IPv4 header checksum, and the UDP checksum when there is one.
    fn refresh_udp(p: &mut [u8]) {
        let v6 = p[0] >> 4 == 6;
        let l4 = l4_offset(p);
        if !v6 {
            put16(p, 10, 0);
            let ip = finish(sum(&p[..l4], 0));
            put16(p, 10, ip);
        }
        if v6 || be16(p, l4 + UDP_CSUM) != 0 {
            put16(p, l4 + UDP_CSUM, 0);
            let (src, dst) = ip_addrs(p, v6);
            let c = finish(pseudo_header(src, dst, IPPROTO_UDP, p.len() - l4) + sum(&p[l4..], 0));
            put16(p, l4 + UDP_CSUM, if c == 0 { 0xffff } else { c });
        }
    }

    #[test]
    fn udp_datagrams_merge_only_when_the_kernel_would_take_them_apart_unchanged() {
        type Edit = fn(&mut Vec<u8>);
        // (name, IPv6?, DF?, which of 4 datagrams, edit, checksums made valid again,
        // packets per write)
        type Case = (&'static str, bool, bool, usize, Edit, bool, Vec<usize>);
        let cases: [Case; 18] = [
            ("nothing", false, true, 0, |_| {}, false, vec![4]),
            (
                "other source port",
                false,
                true,
                2,
                |p| p[21] ^= 1,
                true,
                vec![2, 1, 1],
            ),
            (
                "other destination port",
                true,
                false,
                1,
                |p| p[43] ^= 1,
                true,
                vec![1, 1, 2],
            ),
            (
                "destination address",
                false,
                true,
                1,
                |p| p[19] ^= 1,
                true,
                vec![1, 1, 2],
            ),
            ("TTL", false, true, 3, |p| p[8] -= 1, true, vec![3, 1]),
            (
                "TOS/ECN",
                false,
                true,
                1,
                |p| p[1] |= 3,
                true,
                vec![1, 1, 2],
            ),
            ("DF", false, true, 1, |p| p[6] &= !0x40, true, vec![1, 1, 2]),
            (
                "hop limit",
                true,
                false,
                1,
                |p| p[7] -= 1,
                true,
                vec![1, 1, 2],
            ),
            (
                "flow label",
                true,
                false,
                2,
                |p| p[3] ^= 1,
                true,
                vec![2, 1, 1],
            ),
            (
                "shorter in the middle",
                false,
                true,
                1,
                |p| shorten(p, 100),
                true,
                vec![2, 2],
            ),
            (
                "longer in the middle",
                false,
                true,
                2,
                |p| lengthen(p, 1),
                true,
                vec![2, 2],
            ),
            (
                "bad UDP checksum",
                false,
                true,
                1,
                |p| p[20 + 6] ^= 0x5a,
                false,
                vec![1, 1, 2],
            ),
            (
                "bad IPv4 header checksum",
                false,
                true,
                2,
                |p| p[10] ^= 0xa5,
                false,
                vec![2, 1, 1],
            ),
            (
                "bad UDPv6 checksum",
                true,
                false,
                0,
                |p| p[40 + 6] ^= 0x5a,
                false,
                vec![1, 3],
            ),
            (
                "IP ID not the next, no DF",
                false,
                false,
                2,
                |p| p[5] ^= 0x10,
                true,
                vec![2, 1, 1],
            ),
            (
                "IP ID not the next, DF",
                false,
                true,
                2,
                |p| p[5] ^= 0x10,
                true,
                vec![4],
            ),
            (
                "fragment (MF)",
                false,
                false,
                1,
                |p| p[6] |= 0x20,
                true,
                vec![1, 1, 2],
            ),
            (
                "fragment offset",
                false,
                false,
                3,
                |p| p[7] = 1,
                true,
                vec![3, 1],
            ),
        ];
        for (name, v6, df, at, edit, refresh, want) in cases {
            let mut packets = udp_run(v6, df, &[1000; 4]);
            edit(&mut packets[at]);
            if refresh {
                refresh_udp(&mut packets[at]);
                assert_valid(&packets[at]);
            }
            let out = coalesce(&packets);
            assert_eq!(per_write(&out), want, "{name}");
            // Whatever merged splits back into exactly what came in, in order; with DF the
            // IPv4 IDs (and so the header checksums) are numbered from the first.
            let ids_free = |mut ps: Vec<Vec<u8>>| {
                for p in ps.iter_mut().filter(|p| !v6 && p[6] & 0x40 != 0) {
                    p[4..6].fill(0);
                    p[10..12].fill(0);
                }
                ps
            };
            assert!(
                ids_free(resegment(&out)) == ids_free(packets),
                "{name}: datagrams differ"
            );
        }
    }

    /// Cuts `n` bytes off a UDP datagram's payload (lengths fixed, checksums not).
    fn shorten(p: &mut Vec<u8>, n: usize) {
        p.truncate(p.len() - n);
        fix_lengths(p);
    }

    fn lengthen(p: &mut Vec<u8>, n: usize) {
        p.extend(std::iter::repeat_n(0x42, n));
        fix_lengths(p);
    }

    fn fix_lengths(p: &mut [u8]) {
        let l4 = l4_offset(p);
        if p[0] >> 4 == 6 {
            put16(p, 4, (p.len() - 40) as u16);
        } else {
            put16(p, 2, p.len() as u16);
        }
        put16(p, l4 + 4, (p.len() - l4) as u16);
    }

    #[test]
    fn udp_that_must_not_merge_passes_through_byte_for_byte() {
        let plain = |edit: fn(&mut Udp)| {
            (0..3)
                .map(|i| {
                    let mut u = Udp::new(false, 800);
                    u.df = true;
                    u.ip_id = i;
                    edit(&mut u);
                    u.build()
                })
                .collect::<Vec<_>>()
        };
        // No checksum (zero) over IPv4: a merged run would come out with checksums.
        let no_csum = plain(|u| u.checksum = false);
        // IP options: not a plain header.
        let mut options = plain(|_| {});
        for p in &mut options {
            p.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
            p[0] = 0x46;
            let n = p.len() as u16;
            put16(p, 2, n);
            put16(p, 10, 0);
            let c = finish(sum(&p[..24], 0));
            put16(p, 10, c);
        }
        // An IPv6 extension header (hop-by-hop) in front of UDP.
        let ext: Vec<Vec<u8>> = udp_run(true, false, &[800; 3])
            .into_iter()
            .map(|mut p| {
                p[6] = 0;
                p.splice(40..40, [IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
                let n = (p.len() - 40) as u16;
                put16(&mut p, 4, n);
                p
            })
            .collect();
        // A UDP length field that disagrees with the IP length.
        let mut bad_len = plain(|_| {});
        for p in &mut bad_len {
            put16(p, 20 + 4, 100);
        }
        // Empty datagrams.
        let empty = plain(|u| u.payload.clear());
        for (name, packets) in [
            ("no checksum", no_csum),
            ("IP options", options),
            ("IPv6 extension header", ext),
            ("UDP length", bad_len),
            ("empty", empty),
        ] {
            let out = coalesce(&packets);
            let want: Vec<(VirtioHdr, Vec<u8>)> = packets
                .iter()
                .map(|p| (VirtioHdr::NONE, p.clone()))
                .collect();
            assert!(out == want, "{name}: merged or changed");
        }
        // UDP off (the TUN did not accept USO): one write per datagram, untouched.
        let packets = udp_run(false, true, &[1000; 4]);
        let out = coalesce_with(Coalescer::new(), &packets);
        assert_eq!(per_write(&out), vec![1; 4], "UDP off");
        assert_eq!(resegment(&out), packets);
    }

    #[test]
    fn tcp_and_udp_of_one_host_pair_stay_apart() {
        let t = run(false, 1, 3000, 1000, false);
        let u = udp_run(false, true, &[1000; 3]);
        let packets = vec![
            t[0].clone(),
            t[1].clone(),
            u[0].clone(),
            u[1].clone(),
            u[2].clone(),
            t[2].clone(),
        ];
        let out = coalesce(&packets);
        assert_eq!(per_write(&out), vec![2, 3, 1]);
        let types: Vec<u8> = out.iter().map(|(h, _)| h.gso_type).collect();
        assert_eq!(types, vec![GSO_TCPV4, GSO_UDP_L4, GSO_NONE]);
        let mut c = Coalescer::with_udp(true);
        let mut sink = |_: &[u8]| {};
        for p in &packets {
            let mut slot = vec![0; VIRTIO_HDR_LEN];
            slot.extend_from_slice(p);
            c.push(&mut slot, &mut sink);
        }
        c.flush(&mut sink);
        let s = c.take_stats();
        assert_eq!(
            (s.tcp_merged, s.tcp_writes, s.udp_merged, s.udp_writes),
            (2, 1, 3, 1)
        );
    }
}
