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
//!
//! ## TCP inside VXLAN
//!
//! With [`Coalescer::set_vxlan_ports`] (only for a TUN that accepted UDP tunnel offload,
//! kernel ≥ 6.17), datagrams to a local VXLAN device's port that carry TCP are merged the
//! way the kernel's GRO merges them for a NIC: same outer headers (but lengths, checksums
//! and, without DF, consecutive IPv4 IDs), the same VXLAN and inner Ethernet headers, and
//! the inner segments by the TCP rules above. The write is one `GSO_TCPV4|6` +
//! `GSO_UDP_TUNNEL_IPV4|6` super-packet with the 24-byte header's tunnel offsets, which the
//! VXLAN socket takes whole: the kernel decapsulates 64 KiB at once instead of ~45
//! datagrams. Only ports a VXLAN device listens on may be named: the kernel hands such a
//! super-packet whole to whatever socket has the port.
//!
//! The kernel (6.17–6.18 at least, `virtio_net_hdr_tnl_to_skb`) refuses a tunnel
//! super-packet whose outer transport header starts before `ETH_HLEN` + the outer IP
//! header's minimum (34 for IPv4, 54 for IPv6): it counts an Ethernet header a TUN's
//! packets do not have. So the outer header of a tunnel write is made 16 bytes longer:
//! IPv4 gets 16 bytes of NOP options (36 bytes), IPv6 a destination options header (56),
//! filled by one experimental option (RFC 4727, "skip if unknown") because Linux drops a
//! packet with more than 7 bytes of padding options. The VXLAN device strips the outer
//! headers, these bytes with them, so nothing past this host sees them.

use super::checksum::{finish, fold, pseudo_header, sum};
use super::virtio::{
    Encap, VirtioHdr, F_NEEDS_CSUM, F_UDP_TUNNEL_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
    GSO_UDP_TUNNEL_IPV4, GSO_UDP_TUNNEL_IPV6, VIRTIO_HDR_LEN, VIRTIO_TUNNEL_HDR_LEN,
};
use super::*;

/// The largest IP packet the coalescer builds (the IPv4 total-length limit).
pub const MAX_COALESCED: usize = 65_535;

/// The most UDP datagrams in one super-packet: the kernel's own GRO stops there
/// (`UDP_GRO_CNT_MAX`).
pub const MAX_UDP_SEGMENTS: usize = 64;

/// How many VXLAN ports [`Coalescer::set_vxlan_ports`] keeps (flannel uses one; a
/// dual-stack node's two devices share it).
pub const MAX_VXLAN_PORTS: usize = 4;

/// The bytes a tunnel write's outer IP header grows by (see the module docs): NOP
/// options in IPv4, a destination options header in IPv6.
const OUTER_GROWTH: usize = 16;
/// IPv4 option "no operation".
const IPOPT_NOP: u8 = 1;
/// IPv6 next-header value of a destination options header.
const IPPROTO_DSTOPTS: u8 = 60;
/// The IPv6 option type RFC 4727 sets aside for experiments, with the "skip if
/// unknown" action bits: what fills a destination options header that is only there for
/// its length (Linux refuses more than 7 bytes of padding options).
const IPV6_OPT_EXPERIMENT: u8 = 0x1e;

/// An encapsulated segment's outer side: VXLAN in UDP over IPv4 without options or IPv6
/// without extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outer {
    v6: bool,
    /// The outer UDP checksum is filled in (VXLAN's `udpcsum`), not zero.
    csum: bool,
}

impl Outer {
    /// Where the outer UDP header starts.
    fn th(self) -> usize {
        if self.v6 {
            40
        } else {
            20
        }
    }

    /// Where the inner IP header starts: after the outer IP, UDP, VXLAN and inner
    /// Ethernet headers.
    fn nh(self) -> usize {
        self.th() + UDP_HLEN + VXLAN_HLEN + ETH_HLEN
    }
}

/// A TCP data segment or UDP datagram the coalescer could merge, plain or (TCP only)
/// inside VXLAN. Offsets are from the packet's first byte.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// The (inner) IP header is IPv6.
    v6: bool,
    udp: bool,
    /// Where the (inner) IP header starts: 0, or after the VXLAN encapsulation.
    nh: usize,
    /// Where the (inner) transport header starts.
    l4: usize,
    /// All header bytes in front of the payload.
    hlen: usize,
    /// TCP sequence number (0 for UDP).
    seq: u32,
    payload: usize,
    psh: bool,
    outer: Option<Outer>,
}

/// A plain IPv4 header (no options, not a fragment) or IPv6 header (no extension headers)
/// whose length field matches the slice: (IPv6?, header length, protocol).
fn ip_header(p: &[u8]) -> Option<(bool, usize, u8)> {
    match p.first()? >> 4 {
        4 => {
            let ok = p.len() >= 28
                && p[0] == 0x45
                && usize::from(be16(p, 2)) == p.len()
                && be16(p, 6) & 0x3fff == 0;
            ok.then_some((false, 20, p[9]))
        }
        6 => {
            let ok = p.len() >= 48 && usize::from(be16(p, 4)) + 40 == p.len();
            ok.then_some((true, 40, p[6]))
        }
        _ => None,
    }
}

impl Segment {
    /// A TCP segment with payload and no flags but ACK and PSH, or a UDP datagram with
    /// payload and (over IPv4) a checksum; with `vxlan` ports, also TCP inside a VXLAN
    /// datagram to one of them. Lengths consistent with the slice.
    fn parse(p: &[u8], vxlan: &[u16; MAX_VXLAN_PORTS], vxlan_v6: bool) -> Option<Segment> {
        let (v6, l4, proto) = ip_header(p)?;
        if proto == IPPROTO_UDP {
            let to_vxlan = p.len() > l4 + UDP_HLEN && {
                let port = be16(p, l4 + 2);
                port != 0 && vxlan.contains(&port)
            };
            if to_vxlan && (vxlan_v6 || !v6) {
                if let Some(s) = Segment::in_vxlan(p, v6) {
                    return Some(s);
                }
            }
            let hlen = l4 + UDP_HLEN;
            let ok = hlen < p.len()
                && usize::from(be16(p, l4 + 4)) == p.len() - l4
                && (v6 || be16(p, l4 + UDP_CSUM) != 0);
            return ok.then_some(Segment {
                v6,
                udp: true,
                nh: 0,
                l4,
                hlen,
                seq: 0,
                payload: p.len() - hlen,
                psh: false,
                outer: None,
            });
        }
        if proto != IPPROTO_TCP {
            return None;
        }
        Segment::tcp(p, v6, l4)
    }

    /// The TCP part of [`Segment::parse`], offsets relative to `p`.
    fn tcp(p: &[u8], v6: bool, l4: usize) -> Option<Segment> {
        if p.len() < l4 + 20 {
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
            nh: 0,
            l4,
            hlen,
            seq: be32(p, l4 + 4),
            payload: p.len() - hlen,
            psh: flags & TCP_PSH != 0,
            outer: None,
        })
    }

    /// A TCP segment inside VXLAN: the UDP length right, a VXLAN header with only the
    /// VNI flag and zero reserved bytes, an untagged inner Ethernet header whose type
    /// matches the inner IP version.
    fn in_vxlan(p: &[u8], outer_v6: bool) -> Option<Segment> {
        let mut outer = Outer {
            v6: outer_v6,
            csum: false,
        };
        let (th, nh) = (outer.th(), outer.nh());
        outer.csum = be16(p, th + UDP_CSUM) != 0;
        if usize::from(be16(p, th + 4)) != p.len() - th || p.len() <= nh {
            return None;
        }
        let vx = th + UDP_HLEN;
        if p[vx] != 0x08 || p[vx + 1..vx + 4] != [0, 0, 0] || p[vx + 7] != 0 {
            return None;
        }
        let inner = &p[nh..];
        let (v6, l4, proto) = ip_header(inner)?;
        let ethertype = if v6 { 0x86dd } else { 0x0800 };
        if proto != IPPROTO_TCP || be16(p, nh - 2) != ethertype {
            return None;
        }
        let s = Segment::tcp(inner, v6, l4)?;
        Some(Segment {
            nh,
            l4: nh + s.l4,
            hlen: nh + s.hlen,
            outer: Some(outer),
            ..s
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
/// inside super-segments, and the super-segments (TUN writes) they made. TCP inside VXLAN
/// counts as `vxlan`, not `tcp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroStats {
    pub tcp_merged: u64,
    pub tcp_writes: u64,
    pub udp_merged: u64,
    pub udp_writes: u64,
    pub vxlan_merged: u64,
    pub vxlan_writes: u64,
}

/// Room in front of the pending packet for the outer IPv4 options of a tunnel write.
const HEAD: usize = OUTER_GROWTH;

pub struct Coalescer {
    /// [`HEAD`] spare bytes, then the pending packet.
    buf: Box<[u8]>,
    /// The virtio-net header of the write [`Coalescer::flush`] makes.
    hdr: [u8; VIRTIO_TUNNEL_HDR_LEN],
    /// Bytes of the pending packet; 0 when nothing is pending.
    len: usize,
    pending: Option<Pending>,
    /// UDP datagrams are merged too (only for a TUN that accepted USO).
    udp: bool,
    /// Local VXLAN ports (0: unused) whose TCP is merged into tunnel super-packets.
    vxlan: [u16; MAX_VXLAN_PORTS],
    /// VXLAN over IPv6 too ([`Coalescer::set_vxlan_over_ipv6`]).
    vxlan_v6: bool,
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
            buf: vec![0u8; HEAD + MAX_COALESCED].into_boxed_slice(),
            hdr: [0; VIRTIO_TUNNEL_HDR_LEN],
            len: 0,
            pending: None,
            udp,
            vxlan: [0; MAX_VXLAN_PORTS],
            vxlan_v6: true,
            stats: GroStats::default(),
        }
    }

    /// Merges TCP inside VXLAN datagrams to these ports (0 entries are unused) into
    /// tunnel super-packets, written with the 24-byte header: only for a TUN that accepted
    /// `TUN_F_UDP_TUNNEL_GSO` and whose header is [`VIRTIO_TUNNEL_HDR_LEN`] long, and only
    /// ports a local VXLAN device listens on. Takes effect from the next run.
    pub fn set_vxlan_ports(&mut self, ports: [u16; MAX_VXLAN_PORTS]) {
        self.vxlan = ports;
    }

    /// Whether VXLAN over IPv6 is merged too (the default): only where the kernel delivers
    /// an outer IPv6 header with the destination options header the write carries (see
    /// the module docs); without, such datagrams are merged by the UDP rules.
    pub fn set_vxlan_over_ipv6(&mut self, on: bool) {
        self.vxlan_v6 = on;
    }

    /// The counts since the last call, and starts them again from zero.
    pub fn take_stats(&mut self) -> GroStats {
        std::mem::take(&mut self.stats)
    }

    /// Takes one decrypted packet. `slot` is [`VIRTIO_HDR_LEN`] bytes of headroom followed
    /// by the packet; a packet that cannot be merged is emitted from `slot` itself (header
    /// filled in). `emit` receives whole TUN writes: the virtio-net header
    /// ([`VIRTIO_HDR_LEN`] bytes, or [`VIRTIO_TUNNEL_HDR_LEN`] for a tunnel super-packet;
    /// the writer pads a short one to the device's length with zeros) and the packet.
    pub fn push(&mut self, slot: &mut [u8], emit: &mut impl FnMut(&[u8], &[u8])) {
        let packet = &slot[VIRTIO_HDR_LEN..];
        match Segment::parse(packet, &self.vxlan, self.vxlan_v6).filter(|s| self.udp || !s.udp) {
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
                let (hdr, packet) = slot.split_at(VIRTIO_HDR_LEN);
                emit(hdr, packet);
            }
        }
    }

    /// Emits whatever is pending; call at the end of every batch.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8], &[u8])) {
        let Some(p) = self.pending.take() else { return };
        let len = std::mem::take(&mut self.len);
        let mut start = HEAD;
        let mut hdr_len = VIRTIO_HDR_LEN;
        if p.segments == 1 {
            // Untouched, checksums intact.
            VirtioHdr::NONE.encode(&mut self.hdr);
        } else {
            let f = p.first;
            let packet = &mut self.buf[HEAD..HEAD + len];
            fix_lengths_and_checksums(packet, &f);
            let mut gso_type = match (f.udp, f.v6) {
                (true, _) => GSO_UDP_L4,
                (false, true) => GSO_TCPV6,
                (false, false) => GSO_TCPV4,
            };
            let mut flags = F_NEEDS_CSUM;
            let mut grown = 0;
            if let Some(o) = f.outer {
                if o.csum {
                    flags |= F_UDP_TUNNEL_CSUM;
                }
                grown = OUTER_GROWTH;
                start = HEAD - grown;
                let b = &mut self.buf[start..HEAD + len];
                if o.v6 {
                    gso_type |= GSO_UDP_TUNNEL_IPV6;
                    add_outer_v6_destination_options(b);
                } else {
                    gso_type |= GSO_UDP_TUNNEL_IPV4;
                    add_outer_v4_options(b);
                }
                hdr_len = VIRTIO_TUNNEL_HDR_LEN;
                self.hdr[VIRTIO_HDR_LEN..].fill(0);
                Encap {
                    outer_th: (o.th() + grown) as u16,
                    inner_nh: (o.nh() + grown) as u16,
                }
                .encode(&mut self.hdr);
            }
            VirtioHdr {
                flags,
                gso_type,
                hdr_len: (f.hlen + grown) as u16,
                gso_size: p.mss as u16,
                csum_start: (f.l4 + grown) as u16,
                csum_offset: f.csum_offset() as u16,
            }
            .encode(&mut self.hdr);
            let n = p.segments as u64;
            let (merged, writes) = match (f.outer, f.udp) {
                (Some(_), _) => (&mut self.stats.vxlan_merged, &mut self.stats.vxlan_writes),
                (None, true) => (&mut self.stats.udp_merged, &mut self.stats.udp_writes),
                (None, false) => (&mut self.stats.tcp_merged, &mut self.stats.tcp_writes),
            };
            *merged += n;
            *writes += 1;
        }
        emit(&self.hdr[..hdr_len], &self.buf[start..HEAD + len]);
    }

    fn start(&mut self, packet: &[u8], seg: Segment) {
        self.buf[HEAD..HEAD + packet.len()].copy_from_slice(packet);
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
            let packet = &self.buf[HEAD..HEAD + self.len];
            p.verified = checksums_verify(packet, &p.first);
        }
        p.verified
    }

    fn can_merge(&self, packet: &[u8], seg: &Segment) -> bool {
        let Some(p) = &self.pending else { return false };
        let f = &p.first;
        let grows = f.outer.map_or(0, |_| OUTER_GROWTH);
        if p.closed
            || seg.v6 != f.v6
            || seg.udp != f.udp
            || seg.outer != f.outer
            || seg.hlen != f.hlen
            || seg.payload > p.mss
            || self.len + seg.payload + grows > MAX_COALESCED
        {
            return false;
        }
        let head = &self.buf[HEAD..HEAD + f.hlen];
        if let Some(o) = f.outer {
            // Outer IP (but lengths, checksum and IDs), ports, VXLAN and Ethernet headers.
            let th = o.th();
            if !(same_ip(head, packet, 0, o.v6)
                && id_follows(head, packet, o.v6, p.segments)
                && head[th..th + 4] == packet[th..th + 4]
                && head[th + UDP_HLEN..f.nh] == packet[th + UDP_HLEN..f.nh])
            {
                return false;
            }
        }
        let same_ip = same_ip(head, packet, f.nh, f.v6);
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
        p.segments < MAX_UDP_SEGMENTS
            && id_follows(head, packet, p.first.v6, p.segments)
            && head[l4..l4 + 4] == packet[l4..l4 + 4]
    }

    fn merge(&mut self, packet: &[u8], seg: &Segment) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        let at = HEAD + self.len;
        self.buf[at..at + seg.payload].copy_from_slice(&packet[seg.hlen..]);
        self.len += seg.payload;
        p.segments += 1;
        p.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        if seg.payload < p.mss {
            p.closed = true;
        }
        if seg.psh {
            p.closed = true;
            self.buf[HEAD + p.first.l4 + TCP_FLAGS] |= TCP_PSH;
        }
    }
}

/// Whether the IP header at the start of `packet` may join a run of `segments` whose first
/// header is `head`'s as segmentation would rebuild it: IPv6, or IPv4 with DF (the ID
/// means nothing, RFC 6864), or the next consecutive IPv4 ID (segmentation numbers the
/// segments from the first's).
fn id_follows(head: &[u8], packet: &[u8], v6: bool, segments: usize) -> bool {
    v6 || head[6] & 0x40 != 0 || be16(packet, 4) == be16(head, 4).wrapping_add(segments as u16)
}

/// Whether the IP headers at `at` agree in everything segmentation copies: for IPv6 the
/// version, traffic class, flow label, next header, hop limit and addresses; for IPv4 the
/// version, IHL, TOS (with ECN), DF, TTL, protocol and addresses.
fn same_ip(head: &[u8], packet: &[u8], at: usize, v6: bool) -> bool {
    let (h, p) = (&head[at..], &packet[at..]);
    if v6 {
        h[..4] == p[..4] && h[6..40] == p[6..40]
    } else {
        h[..2] == p[..2]
            && h[6] & 0x40 == p[6] & 0x40
            && h[8..10] == p[8..10]
            && h[12..20] == p[12..20]
    }
}

/// A merged run's length fields, IPv4 header checksums and partial transport checksum
/// (CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel or its own
/// segmentation completes it); for a tunnel run the outer lengths too (its IPv4 header
/// checksum comes with the options), the outer UDP checksum as the kernel's GRO leaves it
/// (the pseudo-header sum).
fn fix_lengths_and_checksums(packet: &mut [u8], f: &Segment) {
    let len = packet.len();
    set_ip_length(&mut packet[f.nh..], f.v6);
    if f.udp {
        put16(packet, f.l4 + 4, (len - f.l4) as u16);
    }
    let (src, dst) = ip_addrs(&packet[f.nh..], f.v6);
    let partial = fold(pseudo_header(src, dst, f.proto(), len - f.l4));
    put16(packet, f.l4 + f.csum_offset(), partial);
    if let Some(o) = f.outer {
        let th = o.th();
        // Only the length: an IPv4 header checksum is computed once, after the options go
        // in (`add_outer_v4_options`).
        if o.v6 {
            put16(packet, 4, (len - th) as u16);
        } else {
            put16(packet, 2, len as u16);
        }
        put16(packet, th + 4, (len - th) as u16);
        if o.csum {
            let (src, dst) = ip_addrs(packet, o.v6);
            let partial = fold(pseudo_header(src, dst, IPPROTO_UDP, len - th));
            put16(packet, th + UDP_CSUM, partial);
        }
    }
}

/// Sets the length field of the IP header at the start of `packet` to the slice's length,
/// and an IPv4 header's checksum (a plain 20-byte header).
fn set_ip_length(packet: &mut [u8], v6: bool) {
    let len = packet.len();
    if v6 {
        put16(packet, 4, (len - 40) as u16);
    } else {
        put16(packet, 2, len as u16);
        put16(packet, 10, 0);
        let c = finish(sum(&packet[..20], 0));
        put16(packet, 10, c);
    }
}

/// `b` is [`OUTER_GROWTH`] spare bytes and then an IPv4 packet with a 20-byte header:
/// moves the header to the front and fills the gap with NOP options, fixing IHL, the total
/// length and the header checksum.
fn add_outer_v4_options(b: &mut [u8]) {
    let n = OUTER_GROWTH;
    b.copy_within(n..n + 20, 0);
    b[20..20 + n].fill(IPOPT_NOP);
    b[0] = 0x40 | ((20 + n) / 4) as u8;
    let total = be16(b, 2) as usize + n;
    put16(b, 2, total as u16);
    put16(b, 10, 0);
    let c = finish(sum(&b[..20 + n], 0));
    put16(b, 10, c);
}

/// `b` is [`OUTER_GROWTH`] spare bytes and then an IPv6 packet without extension headers:
/// moves the header to the front and puts a destination options header in the gap, fixing
/// the next-header chain and the payload length. It holds one experimental option (RFC
/// 4727) of zeros that any receiver skips. No checksum covers it: the UDP pseudo-header
/// counts only the UDP length.
fn add_outer_v6_destination_options(b: &mut [u8]) {
    let n = OUTER_GROWTH;
    b.copy_within(n..n + 40, 0);
    let next = b[6];
    b[6] = IPPROTO_DSTOPTS;
    let payload = be16(b, 4) as usize + n;
    put16(b, 4, payload as u16);
    // Next header, length in 8-byte units beyond the first, one option over the rest.
    b[40] = next;
    b[41] = (n / 8 - 1) as u8;
    b[42] = IPV6_OPT_EXPERIMENT;
    b[43] = (n - 4) as u8;
    b[44..40 + n].fill(0);
}

/// Whether `packet` (parsed as `seg`) has valid IPv4 header checksums and transport
/// checksums: for a tunnel segment the outer IPv4 header's and, unless zero, the outer UDP
/// checksum, which reuses the inner transport's sum rather than reading the payload twice.
fn checksums_verify(packet: &[u8], seg: &Segment) -> bool {
    let inner = &packet[seg.nh..];
    let ip_ok = seg.v6 || finish(sum(&inner[..seg.l4 - seg.nh], 0)) == 0;
    let (src, dst) = ip_addrs(inner, seg.v6);
    let body = sum(&packet[seg.l4..], 0);
    let l4 = pseudo_header(src, dst, seg.proto(), packet.len() - seg.l4) + body;
    if !(ip_ok && finish(l4) == 0) {
        return false;
    }
    let Some(o) = seg.outer else { return true };
    let th = o.th();
    let outer_ip_ok = o.v6 || finish(sum(&packet[..th], 0)) == 0;
    // The stretch from the UDP header to the inner transport header has an even length
    // (8 + 8 + 14 + 20 or 40), so the inner sum continues it.
    let outer_udp_ok = !o.csum || {
        let (src, dst) = ip_addrs(packet, o.v6);
        let s = pseudo_header(src, dst, IPPROTO_UDP, packet.len() - th)
            + sum(&packet[th..seg.l4], body);
        finish(s) == 0
    };
    outer_ip_ok && outer_udp_ok
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
        let mut emit = |h: &[u8], p: &[u8]| {
            assert_eq!(h.len(), VIRTIO_HDR_LEN);
            out.push((VirtioHdr::decode(h).expect("header"), p.to_vec()));
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

    /// `inner` in VXLAN to port 8472 as [`crate::packet::vxlan`] builds it, with the outer
    /// UDP checksum zeroed unless `csum`, and over IPv4 without DF and with `id` when one
    /// is given.
    fn in_vxlan(outer_v6: bool, inner: &[u8], csum: bool, id: Option<u16>) -> Vec<u8> {
        let (mut p, _) = crate::packet::vxlan(outer_v6, inner);
        let th = if outer_v6 { 40 } else { 20 };
        if !csum {
            put16(&mut p, th + UDP_CSUM, 0);
        }
        if let (false, Some(id)) = (outer_v6, id) {
            put16(&mut p, 4, id);
            p[6] &= !0x40;
            put16(&mut p, 10, 0);
            let c = finish(sum(&p[..20], 0));
            put16(&mut p, 10, c);
        }
        p
    }

    /// Feeds `packets` through a coalescer with VXLAN port 8472 (UDP on); the writes as
    /// (header bytes, packet).
    fn coalesce_vxlan(packets: &[Vec<u8>]) -> Vec<(Vec<u8>, Vec<u8>)> {
        coalesce_vxlan_with(Coalescer::with_udp(true), packets)
    }

    /// [`coalesce_vxlan`] through `c` (port 8472 set on it here).
    fn coalesce_vxlan_with(mut c: Coalescer, packets: &[Vec<u8>]) -> Vec<(Vec<u8>, Vec<u8>)> {
        c.set_vxlan_ports([8472, 0, 0, 0]);
        let mut out = Vec::new();
        let mut emit = |h: &[u8], p: &[u8]| out.push((h.to_vec(), p.to_vec()));
        for p in packets {
            let mut slot = vec![0xee; VIRTIO_HDR_LEN];
            slot.extend_from_slice(p);
            c.push(&mut slot, &mut emit);
        }
        c.flush(&mut emit);
        let s = c.take_stats();
        let tunnel_writes = out.iter().filter(|(h, _)| h.len() == 24).count();
        assert_eq!(s.vxlan_writes as usize, tunnel_writes);
        out
    }

    /// Splits a tunnel write the way the kernel would (our GSO, which the e2e tests hold to
    /// the kernel's) and compares each segment with the datagram that came in: the outer
    /// IPv4 options dropped, the IPv4 IDs and header checksums aside (regenerated).
    fn assert_tunnel_resegments_to(hdr: &[u8], packet: &[u8], original: &[Vec<u8>]) {
        let h = VirtioHdr::decode(hdr).expect("header");
        let e = Encap::decode(hdr).expect("tunnel fields");
        let outer_v6 = packet[0] >> 4 == 6;
        let th = usize::from(e.outer_th);
        assert_eq!(th, if outer_v6 { 56 } else { 36 }, "outer transport offset");
        assert_eq!(usize::from(e.inner_nh), th + 30);
        assert_eq!(
            usize::from(h.csum_start),
            usize::from(e.inner_nh) + l4_offset(&packet[usize::from(e.inner_nh)..])
        );
        assert_eq!(usize::from(h.hdr_len), usize::from(h.csum_start) + 32);
        if !outer_v6 {
            assert_eq!(packet[0], 0x49, "IPv4 outer header with options");
            assert_eq!(&packet[20..36], &[IPOPT_NOP; 16]);
            assert_eq!(usize::from(be16(packet, 2)), packet.len());
            assert_eq!(finish(sum(&packet[..36], 0)), 0, "outer header checksum");
        }
        // The lengths the receiving stack reads before anything is split: the outer UDP
        // length (a short one would trim the packet), the inner IP length.
        assert_eq!(
            usize::from(be16(packet, th + 4)),
            packet.len() - th,
            "outer UDP length"
        );
        let nh = usize::from(e.inner_nh);
        let inner_len = if packet[nh] >> 4 == 6 {
            usize::from(be16(packet, nh + 4)) + 40
        } else {
            assert_eq!(
                finish(sum(&packet[nh..nh + 20], 0)),
                0,
                "inner header checksum"
            );
            usize::from(be16(packet, nh + 2))
        };
        assert_eq!(inner_len, packet.len() - nh, "inner IP length");
        if outer_v6 {
            assert_eq!(
                usize::from(be16(packet, 4)) + 40,
                packet.len(),
                "outer IPv6 length"
            );
            assert_eq!(packet[6], IPPROTO_DSTOPTS, "destination options first");
            let mut options = vec![IPPROTO_UDP, 1, IPV6_OPT_EXPERIMENT, 12];
            options.extend([0; 12]);
            assert_eq!(&packet[40..56], &options[..], "then UDP");
        }
        let mut again = packet.to_vec();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let mut scratch = vec![0u8; 65_536];
        super::super::gso::split_encapsulated(h, Some(e), &mut again, &mut scratch, |s| {
            segs.push(s.to_vec())
        })
        .expect("split");
        assert_eq!(segs.len(), original.len());
        let grown = 16;
        for (i, (got, want)) in segs.iter().zip(original).enumerate() {
            let (mut got, mut want) = (got[th..].to_vec(), want[th - grown..].to_vec());
            // Inner IPv4 ID and header checksum.
            let nh = 30;
            if got[nh] >> 4 == 4 {
                for p in [&mut got, &mut want] {
                    put16(p, nh + 4, 0);
                    put16(p, nh + 10, 0);
                }
            }
            assert_eq!(got, want, "segment {i} from the outer UDP header on");
        }
    }

    #[test]
    fn tcp_inside_vxlan_becomes_one_tunnel_super_packet() {
        // (outer IPv6?, inner IPv6?, outer UDP checksum?, outer IPv4 without DF?)
        let cases = [
            (false, false, true, false),
            (false, false, false, true),
            (false, true, true, false),
            (false, true, false, true),
            (true, false, true, false),
            (true, true, true, false),
            (true, false, false, false),
        ];
        for (outer_v6, inner_v6, csum, no_df) in cases {
            let name =
                format!("outer v6 {outer_v6}, inner v6 {inner_v6}, csum {csum}, no DF {no_df}");
            let mss = if inner_v6 { 1298 } else { 1318 };
            let inner = run(inner_v6, 7, 40 * mss + 99, mss, true);
            let packets: Vec<Vec<u8>> = inner
                .iter()
                .enumerate()
                .map(|(i, p)| in_vxlan(outer_v6, p, csum, no_df.then_some(500 + i as u16)))
                .collect();
            let out = coalesce_vxlan(&packets);
            assert_eq!(out.len(), 1, "{name}");
            let (hdr, p) = &out[0];
            assert_eq!(hdr.len(), VIRTIO_TUNNEL_HDR_LEN, "{name}");
            let h = VirtioHdr::decode(hdr).expect("header");
            let inner_type = if inner_v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            let outer_type = if outer_v6 {
                GSO_UDP_TUNNEL_IPV6
            } else {
                GSO_UDP_TUNNEL_IPV4
            };
            assert_eq!(h.gso_type, inner_type | outer_type, "{name}");
            let csum_flag = if csum { F_UDP_TUNNEL_CSUM } else { 0 };
            assert_eq!(h.flags, F_NEEDS_CSUM | csum_flag, "{name}");
            assert_eq!(usize::from(h.gso_size), mss, "{name}");
            assert!(p.len() <= MAX_COALESCED, "{name}");
            assert_tunnel_resegments_to(hdr, p, &packets);
        }
    }

    #[test]
    fn a_tunnel_super_packet_stays_within_64_kib_options_included() {
        let inner = run(false, 1, 60 * 1318, 1318, false);
        let packets: Vec<Vec<u8>> = inner
            .iter()
            .map(|p| in_vxlan(false, p, true, None))
            .collect();
        let out = coalesce_vxlan(&packets);
        assert_eq!(out.len(), 2);
        let mut used = 0;
        for (hdr, p) in &out {
            assert!(p.len() <= MAX_COALESCED, "{} bytes", p.len());
            let n = (p.len() - usize::from(VirtioHdr::decode(hdr).expect("header").hdr_len))
                .div_ceil(1318);
            assert_tunnel_resegments_to(hdr, p, &packets[used..used + n]);
            used += n;
        }
        assert_eq!(used, packets.len());
    }

    #[test]
    fn vxlan_datagrams_that_differ_are_not_merged_into_one_tunnel_write() {
        let inner = run(false, 1000, 4 * 1000, 1000, false);
        let wrap = |p: &Vec<u8>| in_vxlan(false, p, true, None);
        let base: Vec<Vec<u8>> = inner.iter().map(wrap).collect();
        // Edits to the second datagram (outer checksums fixed up after, unless said).
        let edit = |f: &dyn Fn(&mut Vec<u8>), fix: bool| {
            let mut ps = base.clone();
            f(&mut ps[1]);
            if fix {
                let p = &mut ps[1];
                put16(p, 10, 0);
                let c = finish(sum(&p[..20], 0));
                put16(p, 10, c);
                put16(p, 20 + UDP_CSUM, 0);
                let s = pseudo_header(&p[12..16], &p[16..20], IPPROTO_UDP, p.len() - 20)
                    + sum(&p[20..], 0);
                let c = finish(s);
                put16(p, 20 + UDP_CSUM, c);
            }
            ps
        };
        // (name, datagrams, what each write holds: T n = a tunnel write of n, U n = a UDP
        // run of n, 1 = alone)
        let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
            ("all alike", base.clone(), "T4"),
            ("another VNI", edit(&|p| p[20 + 8 + 6] = 2, true), "1 1 T2"),
            (
                "another inner MAC",
                edit(&|p| p[20 + 16 + 5] = 9, true),
                "1 1 T2",
            ),
            (
                "another outer source port",
                edit(&|p| put16(p, 20, 40_001), true),
                "1 1 T2",
            ),
            ("a VXLAN flag", edit(&|p| p[20 + 8] = 0x0c, true), "1 1 T2"),
            (
                "a bad outer UDP checksum",
                edit(&|p| p[27] ^= 1, false),
                "1 1 T2",
            ),
            (
                "a bad outer IPv4 checksum",
                edit(&|p| p[11] ^= 1, false),
                "1 1 T2",
            ),
            (
                "no outer checksum on one",
                edit(&|p| put16(p, 26, 0), false),
                "1 1 T2",
            ),
        ];
        for (name, packets, want) in cases {
            let out = coalesce_vxlan(&packets);
            let got: Vec<String> = out
                .iter()
                .map(|(h, p)| {
                    let v = VirtioHdr::decode(h).expect("header");
                    let n = if v.gso_type == GSO_NONE {
                        return "1".to_string();
                    } else {
                        (p.len() - usize::from(v.hdr_len)).div_ceil(usize::from(v.gso_size))
                    };
                    if h.len() == VIRTIO_TUNNEL_HDR_LEN {
                        format!("T{n}")
                    } else {
                        format!("U{n}")
                    }
                })
                .collect();
            assert_eq!(got.join(" "), want, "{name}");
        }
        // Not VXLAN to us: the same datagrams to another port are a plain UDP run, and
        // without ports set nothing is a tunnel write.
        let other: Vec<Vec<u8>> = base
            .iter()
            .map(|p| {
                let mut p = p.clone();
                put16(&mut p, 22, 4789);
                put16(&mut p, 26, 0);
                let s = pseudo_header(&p[12..16], &p[16..20], IPPROTO_UDP, p.len() - 20)
                    + sum(&p[20..], 0);
                let c = finish(s);
                put16(&mut p, 26, c);
                p
            })
            .collect();
        let out = coalesce_vxlan(&other);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (
                out[0].0.len(),
                VirtioHdr::decode(&out[0].0).expect("header").gso_type
            ),
            (VIRTIO_HDR_LEN, GSO_UDP_L4)
        );
        let plain = coalesce(&base);
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].0.gso_type, GSO_UDP_L4);
    }

    /// Where the kernel would drop the destination options header (see
    /// `set_vxlan_over_ipv6`), VXLAN over IPv6 stays a UDP run.
    #[test]
    fn vxlan_over_ipv6_stays_a_udp_run_when_switched_off() {
        let inner = run(false, 7, 10 * 1200, 1200, false);
        let packets: Vec<Vec<u8>> = inner
            .iter()
            .map(|p| in_vxlan(true, p, true, None))
            .collect();
        let mut c = Coalescer::with_udp(true);
        c.set_vxlan_over_ipv6(false);
        let out = coalesce_vxlan_with(c, &packets);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.len(), VIRTIO_HDR_LEN);
        let h = VirtioHdr::decode(&out[0].0).expect("header");
        assert_eq!(h.gso_type, GSO_UDP_L4);
    }

    /// Over IPv6 the outer headers must agree too: another flow label, hop limit or
    /// source address ends the run.
    #[test]
    fn vxlan_over_ipv6_with_other_outer_headers_is_not_merged() {
        let inner = run(false, 1000, 4 * 1000, 1000, false);
        let base: Vec<Vec<u8>> = inner
            .iter()
            .map(|p| in_vxlan(true, p, true, None))
            .collect();
        assert_eq!(coalesce_vxlan(&base).len(), 1, "the control merges");
        // Outer IPv6 fields no checksum covers, and a source address whose sum stays the
        // same (two of its 16-bit words swapped), so only the header rule can refuse it.
        type Edit = fn(&mut Vec<u8>);
        let edits: [(&str, Edit); 3] = [
            ("flow label", |p| p[3] ^= 1),
            ("hop limit", |p| p[7] -= 1),
            ("source address", |p| {
                p.swap(8, 10);
                p.swap(9, 11);
            }),
        ];
        for (what, edit) in edits {
            let mut ps = base.clone();
            edit(&mut ps[1]);
            assert_ne!(ps[1], base[1], "{what}: no edit");
            let out = coalesce_vxlan(&ps);
            assert!(out.len() >= 2, "{what}: merged");
        }
    }

    #[test]
    fn udp_inside_vxlan_stays_a_udp_run() {
        let inner: Vec<Vec<u8>> = (0..5u16)
            .map(|i| {
                let mut u = Udp::new(false, 1000);
                u.ip_id = 10 + i;
                u.build()
            })
            .collect();
        let packets: Vec<Vec<u8>> = inner
            .iter()
            .map(|p| in_vxlan(false, p, true, None))
            .collect();
        let out = coalesce_vxlan(&packets);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.len(), VIRTIO_HDR_LEN);
        assert_eq!(
            VirtioHdr::decode(&out[0].0).expect("header").gso_type,
            GSO_UDP_L4
        );
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
                c.push(&mut slot, &mut |h: &[u8], b: &[u8]| {
                    out.push((VirtioHdr::decode(h).expect("header"), b.to_vec()))
                });
            }
            c.flush(&mut |h: &[u8], b: &[u8]| {
                out.push((VirtioHdr::decode(h).expect("header"), b.to_vec()))
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
        let mut sink = |_: &[u8], _: &[u8]| {};
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
