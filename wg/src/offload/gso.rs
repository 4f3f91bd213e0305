//! Segmentation: one packet read from an offloading TUN (a virtio-net header, then up to
//! 64 KiB of TCP or UDP) becomes the MTU-sized packets a peer expects, each with its own
//! IP length and ID, TCP sequence number and flags, and complete checksums — what the
//! kernel's own GSO would have put on the wire.
//!
//! An encapsulated super-packet (a VXLAN device routed into the TUN, with
//! `TUN_F_UDP_TUNNEL_GSO`) is split the same way inside, and each segment gets its own
//! outer IP and UDP lengths, outer IPv4 ID and checksum, and outer UDP checksum; the
//! tunnel header and inner Ethernet header are copied as they are.

use super::checksum::{finish, pseudo_header, sum};
use super::virtio::{
    Encap, VirtioHdr, F_NEEDS_CSUM, F_UDP_TUNNEL_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6,
    GSO_UDP_L4, GSO_UDP_TUNNEL_IPV4, GSO_UDP_TUNNEL_IPV6,
};
use super::*;

/// Why a packet read from the TUN could not be split (each is counted as malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    #[error("GSO type does not match the IP version")]
    Family,
    #[error("transport header offset or length out of range")]
    Header,
    #[error("segment size is zero")]
    ZeroSegment,
    #[error("scratch buffer too small for one segment")]
    Scratch,
}

/// Hands `emit` every packet that `packet` (what followed `hdr` in the TUN read) stands for,
/// in order, and returns how many. A packet that needs no segmentation is emitted in place
/// (after completing a partial checksum); segments are built one at a time in `scratch`,
/// which must hold headers plus one segment's payload.
pub fn split(
    hdr: VirtioHdr,
    packet: &mut [u8],
    scratch: &mut [u8],
    emit: impl FnMut(&mut [u8]),
) -> Result<usize, SplitError> {
    split_encapsulated(hdr, None, packet, scratch, emit)
}

/// [`split`] for a TUN with the long header: `encap` holds its tunnel fields, used when
/// `hdr` says the super-packet is encapsulated in UDP (refused when it says so and there
/// are none).
pub fn split_encapsulated(
    hdr: VirtioHdr,
    encap: Option<Encap>,
    packet: &mut [u8],
    scratch: &mut [u8],
    emit: impl FnMut(&mut [u8]),
) -> Result<usize, SplitError> {
    let mut sink = Scratch { buf: scratch, emit };
    split_into(hdr, encap, packet, &mut sink)
}

/// Where [`split_into`] builds each segment, and who takes it. A caller that seals what it
/// is handed can have each segment built where it will be sealed: no copy in between.
pub trait Segments {
    /// At least `len` bytes to build the next segment in; `None`: no room (the split stops
    /// there with [`SplitError::Scratch`]).
    fn room(&mut self, len: usize) -> Option<&mut [u8]>;
    /// The segment is built: the first `len` bytes of the last [`Segments::room`].
    fn built(&mut self, len: usize);
    /// A packet that needed no segmentation, where it was read (its checksum completed).
    fn whole(&mut self, packet: &mut [u8]);
}

/// [`split`]'s way: every segment built in one scratch buffer and handed to `emit` there.
struct Scratch<'a, F> {
    buf: &'a mut [u8],
    emit: F,
}

impl<F: FnMut(&mut [u8])> Segments for Scratch<'_, F> {
    fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        self.buf.get_mut(..len)
    }

    fn built(&mut self, len: usize) {
        (self.emit)(&mut self.buf[..len]);
    }

    fn whole(&mut self, packet: &mut [u8]) {
        (self.emit)(packet);
    }
}

/// [`split_encapsulated`] with the segments built where `sink` says. A sink that runs out
/// of room mid-way has taken the segments before; [`split`] checks its scratch first.
pub fn split_into(
    hdr: VirtioHdr,
    encap: Option<Encap>,
    packet: &mut [u8],
    sink: &mut impl Segments,
) -> Result<usize, SplitError> {
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(packet, hdr.csum_start.into(), hdr.csum_offset.into())?;
        }
        sink.whole(packet);
        return Ok(1);
    }
    let tunnel_bits = hdr.gso_type & (GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6);
    let outer = match (tunnel_bits, encap) {
        (0, _) => None,
        (_, None) => return Err(SplitError::GsoType(hdr.gso_type)),
        (bits, Some(e)) => Some(Outer::parse(bits, e, hdr.flags, packet)?),
    };
    // Everything below is about the inner packet, which starts at `nh` (0 unencapsulated).
    let nh = outer.map_or(0, |o| o.inner_nh);
    let v6 = match packet.get(nh).map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(SplitError::NotIp),
    };
    let tcp = match hdr.gso_type & !(GSO_ECN | tunnel_bits) {
        GSO_TCPV4 if !v6 => true,
        GSO_TCPV6 if v6 => true,
        GSO_TCPV4 | GSO_TCPV6 => return Err(SplitError::Family),
        GSO_UDP_L4 => false,
        other => return Err(SplitError::GsoType(other)),
    };
    // Where the transport header starts: trust csum_start, not hdr_len (the kernel may set
    // hdr_len to the whole first segment on forwarded traffic), but check it against the IP
    // header so every offset below is in bounds.
    let l4 = usize::from(hdr.csum_start);
    let ip_ok = if v6 {
        l4 >= nh + 40
    } else {
        packet.len() >= nh + 20 && l4 == nh + usize::from(packet[nh] & 0x0f) * 4 && l4 >= nh + 20
    };
    if !ip_ok || packet.len() < l4 + 8 {
        return Err(SplitError::Header);
    }
    let l4_len = if tcp {
        if packet.len() < l4 + 20 {
            return Err(SplitError::Truncated);
        }
        let n = usize::from(packet[l4 + 12] >> 4) * 4;
        if !(20..=60).contains(&n) {
            return Err(SplitError::Header);
        }
        n
    } else {
        8
    };
    let hlen = l4 + l4_len;
    if packet.len() <= hlen {
        return Err(SplitError::Truncated);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(SplitError::ZeroSegment);
    }
    let payload = packet.len() - hlen;
    // The whole first segment (the largest) fits, or nothing is taken.
    if sink.room(hlen + mss.min(payload)).is_none() {
        return Err(SplitError::Scratch);
    }
    let (proto, csum_at) = if tcp {
        (IPPROTO_TCP, l4 + TCP_CSUM)
    } else {
        (IPPROTO_UDP, l4 + UDP_CSUM)
    };
    let segments = payload.div_ceil(mss);
    let seq0 = if tcp { be32(packet, l4 + 4) } else { 0 };
    let flags0 = if tcp { packet[l4 + TCP_FLAGS] } else { 0 };
    let id0 = if v6 { 0 } else { be16(packet, nh + 4) };

    for i in 0..segments {
        let start = hlen + i * mss;
        let end = (start + mss).min(packet.len());
        let len = hlen + (end - start);
        let seg = sink
            .room(len)
            .and_then(|room| room.get_mut(..len))
            .ok_or(SplitError::Scratch)?;
        seg[..hlen].copy_from_slice(&packet[..hlen]);
        seg[hlen..].copy_from_slice(&packet[start..end]);
        if v6 {
            put16(seg, nh + 4, (len - nh - 40) as u16);
        } else {
            put16(seg, nh + 2, (len - nh) as u16);
            put16(seg, nh + 4, id0.wrapping_add(i as u16));
            put16(seg, nh + 10, 0);
            let c = finish(sum(&seg[nh..l4], 0));
            put16(seg, nh + 10, c);
        }
        if tcp {
            put32(seg, l4 + 4, seq0.wrapping_add((i * mss) as u32));
            let mut flags = flags0;
            if i + 1 < segments {
                // FIN and PSH belong to the end of the data, CWR to its start.
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                flags &= !TCP_CWR;
            }
            seg[l4 + TCP_FLAGS] = flags;
        } else {
            put16(seg, l4 + 4, (len - l4) as u16);
        }
        put16(seg, csum_at, 0);
        let (src, dst) = ip_addrs(&seg[nh..], v6);
        let body = sum(&seg[l4..], 0);
        let c = finish(pseudo_header(src, dst, proto, len - l4) + body);
        // A UDP checksum of zero means "none"; its one's-complement twin is sent instead.
        let c = if c == 0 && !tcp { 0xffff } else { c };
        put16(seg, csum_at, c);
        if let Some(o) = outer {
            // The inner transport bytes now sum to `body + c`: no second pass over them.
            o.finish_segment(seg, i, l4, body + u64::from(c));
        }
        sink.built(len);
    }
    Ok(segments)
}

/// The outer headers of an encapsulated super-packet: IP, then UDP at `th`, then the
/// tunnel's own headers up to the inner IP header at `inner_nh`.
#[derive(Clone, Copy)]
struct Outer {
    v6: bool,
    th: usize,
    inner_nh: usize,
    /// Fill in the outer UDP checksum ([`F_UDP_TUNNEL_CSUM`]); zero otherwise.
    csum: bool,
    id0: u16,
}

impl Outer {
    fn parse(bits: u8, e: Encap, flags: u8, packet: &[u8]) -> Result<Outer, SplitError> {
        let v6 = match bits {
            GSO_UDP_TUNNEL_IPV4 => false,
            GSO_UDP_TUNNEL_IPV6 => true,
            _ => return Err(SplitError::GsoType(bits)),
        };
        match packet.first().map(|b| b >> 4) {
            Some(4) if !v6 => {}
            Some(6) if v6 => {}
            Some(4 | 6) => return Err(SplitError::Family),
            _ => return Err(SplitError::NotIp),
        }
        let (th, inner_nh) = (usize::from(e.outer_th), usize::from(e.inner_nh));
        let ip_ok = if v6 {
            th >= 40
        } else {
            packet.len() >= 20 && th == usize::from(packet[0] & 0x0f) * 4 && th >= 20
        };
        // The inner IP header starts after the outer UDP header, and is there.
        if !ip_ok || inner_nh < th + 8 || packet.len() < inner_nh + 20 {
            return Err(SplitError::Header);
        }
        Ok(Outer {
            v6,
            th,
            inner_nh,
            csum: flags & F_UDP_TUNNEL_CSUM != 0,
            id0: if v6 { 0 } else { be16(packet, 4) },
        })
    }

    /// Fixes segment `i`'s outer headers once its inner packet is final; `inner_l4_sum` is
    /// the unfolded sum of its inner transport bytes from `l4` on, checksum included.
    fn finish_segment(&self, seg: &mut [u8], i: usize, l4: usize, inner_l4_sum: u64) {
        let len = seg.len();
        let th = self.th;
        put16(seg, th + 4, (len - th) as u16);
        put16(seg, th + UDP_CSUM, 0);
        if self.csum {
            // Summing a stretch on its own is only right when it starts on an even offset
            // from the UDP header; the odd case (never made by a real tunnel) sums it all.
            let body = if (l4 - th).is_multiple_of(2) {
                sum(&seg[th..l4], inner_l4_sum)
            } else {
                sum(&seg[th..], 0)
            };
            let (src, dst) = ip_addrs(seg, self.v6);
            let c = finish(pseudo_header(src, dst, IPPROTO_UDP, len - th) + body);
            put16(seg, th + UDP_CSUM, if c == 0 { 0xffff } else { c });
        }
        if self.v6 {
            put16(seg, 4, (len - 40) as u16);
        } else {
            put16(seg, 2, len as u16);
            put16(seg, 4, self.id0.wrapping_add(i as u16));
            put16(seg, 10, 0);
            let c = finish(sum(&seg[..th], 0));
            put16(seg, 10, c);
        }
    }
}

/// Completes a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum, the rest is
/// summed from `start` to the end.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), SplitError> {
    let at = start + offset;
    if at + 2 > packet.len() {
        return Err(SplitError::Truncated);
    }
    let c = finish(sum(&packet[start..], 0));
    put16(packet, at, if c == 0 { 0xffff } else { c });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::checksum::fold;
    use super::*;
    use crate::packet::{assert_valid, vxlan, Tcp, Udp};

    /// A super-segment as the kernel hands it over: real headers, the transport checksum
    /// field holding only the pseudo-header sum (CHECKSUM_PARTIAL).
    fn super_segment(v6: bool, payload: usize, mss: u16, flags: u8) -> (VirtioHdr, Vec<u8>, Tcp) {
        let mut t = Tcp::new(v6, 0xffff_f000, payload); // sequence numbers wrap inside
        t.flags = flags;
        let mut p = t.build();
        let l4 = if v6 { 40 } else { 20 };
        let (src, dst) = ip_addrs(&p, v6);
        let partial = fold(pseudo_header(src, dst, IPPROTO_TCP, p.len() - l4));
        put16(&mut p, l4 + TCP_CSUM, partial);
        let hdr = VirtioHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (l4 + 32) as u16,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: TCP_CSUM as u16,
        };
        (hdr, p, t)
    }

    fn split_all(hdr: VirtioHdr, p: &mut [u8]) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut out = Vec::new();
        let mut scratch = vec![0u8; 65_536];
        let n = split(hdr, p, &mut scratch, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn tcp_super_segments_split_into_valid_mss_packets() {
        // (IPv6?, payload, MSS, expected segments)
        let cases = [
            (false, 65_483, 1368, 48), // 64 KiB IPv4 TSO, timestamps on: MSS 1368
            (true, 65_463, 1348, 49),  // 64 KiB IPv6
            (false, 2 * 1368, 1368, 2),
            (false, 1369, 1368, 2), // one byte over: a 1-byte tail
            (false, 100, 1368, 1),  // GSO type but a single short segment
            (true, 536 * 7 + 5, 536, 8),
        ];
        for (v6, payload, mss, want) in cases {
            let (hdr, mut p, t) = super_segment(v6, payload, mss, TCP_ACK | TCP_PSH);
            let segs = split_all(hdr, &mut p).expect("split");
            assert_eq!(segs.len(), want, "v6={v6} payload={payload} mss={mss}");
            let l4 = if v6 { 40 } else { 20 };
            let mut data = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert_valid(s);
                let last = i + 1 == segs.len();
                let plen = s.len() - l4 - 32;
                assert!(plen == usize::from(mss) || (last && plen <= usize::from(mss)));
                let seq = be32(s, l4 + 4);
                assert_eq!(seq, t.seq.wrapping_add((i * usize::from(mss)) as u32));
                assert_eq!(be32(s, l4 + 8), t.ack, "ack number kept");
                let flags = s[l4 + TCP_FLAGS];
                assert_eq!(flags & TCP_PSH != 0, last, "PSH only on the last segment");
                assert!(flags & TCP_ACK != 0);
                assert_eq!(&s[l4 + 20..l4 + 32], &t.options[..], "options copied");
                if !v6 {
                    assert_eq!(be16(s, 4), t.ip_id.wrapping_add(i as u16), "IPv4 ID");
                }
                data.extend_from_slice(&s[l4 + 32..]);
            }
            assert_eq!(data, t.payload, "payload reassembles");
        }
    }

    /// An encapsulated super-packet as a VXLAN device over the TUN hands it over with
    /// `TUN_F_UDP_TUNNEL_GSO`: the inner super-segment's checksum partial, the outer
    /// headers sized for the whole, the outer UDP checksum stale.
    fn vxlan_super_segment(
        outer_v6: bool,
        inner_v6: bool,
        payload: usize,
        mss: u16,
    ) -> (VirtioHdr, Encap, Vec<u8>, Tcp) {
        let (inner_hdr, inner, t) = super_segment(inner_v6, payload, mss, TCP_ACK | TCP_PSH);
        let (mut p, nh) = vxlan(outer_v6, &inner);
        let th = if outer_v6 { 40 } else { 20 };
        put16(&mut p, th + UDP_CSUM, 0x1234);
        let tunnel = if outer_v6 {
            GSO_UDP_TUNNEL_IPV6
        } else {
            GSO_UDP_TUNNEL_IPV4
        };
        let hdr = VirtioHdr {
            flags: F_NEEDS_CSUM | F_UDP_TUNNEL_CSUM,
            gso_type: inner_hdr.gso_type | tunnel,
            hdr_len: (nh as u16) + inner_hdr.hdr_len,
            csum_start: (nh as u16) + inner_hdr.csum_start,
            ..inner_hdr
        };
        let encap = Encap {
            outer_th: th as u16,
            inner_nh: nh as u16,
        };
        (hdr, encap, p, t)
    }

    fn split_encapsulated_all(
        hdr: VirtioHdr,
        encap: Encap,
        p: &mut [u8],
    ) -> Result<Vec<Vec<u8>>, SplitError> {
        let mut out = Vec::new();
        let mut scratch = vec![0u8; 65_536];
        let n = split_encapsulated(hdr, Some(encap), p, &mut scratch, |s| out.push(s.to_vec()))?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    #[test]
    fn vxlan_super_packets_split_into_valid_vxlan_packets_of_valid_segments() {
        // (outer IPv6?, inner IPv6?, payload, inner MSS, expected segments); MSS 1268 is
        // TCP with timestamps inside flannel's VXLAN MTU of 1370 less the tunnel's 50.
        let cases = [
            (false, false, 60_000, 1268, 48),
            (true, true, 59_000, 1228, 49),
            (false, true, 10_000, 1248, 9),
            (true, false, 1268, 1268, 1),
        ];
        for (outer_v6, inner_v6, payload, mss, want) in cases {
            let (hdr, encap, mut p, t) = vxlan_super_segment(outer_v6, inner_v6, payload, mss);
            let original = p.clone();
            let segs = split_encapsulated_all(hdr, encap, &mut p).expect("split");
            let case = format!("outer v6 {outer_v6}, inner v6 {inner_v6}, {payload} bytes");
            assert_eq!(segs.len(), want, "{case}");
            let (th, nh) = (usize::from(encap.outer_th), usize::from(encap.inner_nh));
            let l4 = nh + if inner_v6 { 40 } else { 20 };
            let mut data = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                // Outer: lengths, IPv4 header checksum, UDP checksum over it all.
                assert_valid(s);
                assert_ne!(be16(s, th + UDP_CSUM), 0, "outer UDP checksum filled in");
                assert_eq!(
                    usize::from(be16(s, th + 4)),
                    s.len() - th,
                    "outer UDP length"
                );
                assert_eq!(&s[th..th + 4], &original[th..th + 4], "outer ports");
                assert_eq!(&s[th + 8..nh], &original[th + 8..nh], "VXLAN and Ethernet");
                if !outer_v6 {
                    assert_eq!(be16(s, 4), 0x1234u16.wrapping_add(i as u16), "outer ID");
                }
                // Inner: a valid segment in its place.
                let inner = &s[nh..];
                assert_valid(inner);
                let seq = be32(s, l4 + 4);
                assert_eq!(
                    seq,
                    t.seq.wrapping_add((i * usize::from(mss)) as u32),
                    "{case}"
                );
                let last = i + 1 == segs.len();
                assert_eq!(
                    s[l4 + TCP_FLAGS] & TCP_PSH != 0,
                    last,
                    "PSH on the last only"
                );
                assert!(inner.len() - (l4 - nh) - 32 <= usize::from(mss));
                data.extend_from_slice(&s[l4 + 32..]);
            }
            assert_eq!(data, t.payload, "{case}: payload reassembles");
        }
    }

    #[test]
    fn vxlan_without_outer_checksums_and_with_udp_inside() {
        // The probe's case: a UDP GSO send inside VXLAN (12,000 bytes, 1200 a datagram),
        // from a VXLAN device with `noudpcsum`: the outer checksum stays zero.
        let inner = Udp::new(false, 12_000).build();
        let (mut p, nh) = vxlan(false, &inner);
        let hdr = VirtioHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_TUNNEL_IPV4 | GSO_UDP_L4,
            hdr_len: (nh + 28) as u16,
            gso_size: 1200,
            csum_start: (nh + 20) as u16,
            csum_offset: UDP_CSUM as u16,
        };
        let encap = Encap {
            outer_th: 20,
            inner_nh: nh as u16,
        };
        let segs = split_encapsulated_all(hdr, encap, &mut p).expect("split");
        assert_eq!(segs.len(), 10);
        for s in &segs {
            assert_eq!(be16(s, 20 + UDP_CSUM), 0, "no outer checksum asked for");
            assert_valid(s);
            assert_valid(&s[nh..]);
            assert_eq!(s.len(), nh + 28 + 1200);
        }
    }

    #[test]
    fn malformed_encapsulation_is_refused() {
        let (hdr, encap, p, _) = vxlan_super_segment(false, false, 5000, 1268);
        let nh = usize::from(encap.inner_nh);
        let cases: Vec<(VirtioHdr, Option<Encap>, SplitError)> = vec![
            // Encapsulated, but the TUN gave no tunnel fields.
            (hdr, None, SplitError::GsoType(hdr.gso_type)),
            // Both outer families at once.
            (
                VirtioHdr {
                    gso_type: hdr.gso_type | GSO_UDP_TUNNEL_IPV6,
                    ..hdr
                },
                Some(encap),
                SplitError::GsoType(GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6),
            ),
            // Says IPv6 outside, is IPv4.
            (
                VirtioHdr {
                    gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV6,
                    ..hdr
                },
                Some(encap),
                SplitError::Family,
            ),
            // The outer UDP header is not where the outer IP header ends.
            (
                hdr,
                Some(Encap {
                    outer_th: 24,
                    ..encap
                }),
                SplitError::Header,
            ),
            // The inner header inside the outer UDP header.
            (
                hdr,
                Some(Encap {
                    inner_nh: 24,
                    ..encap
                }),
                SplitError::Header,
            ),
            // The inner header past the end.
            (
                hdr,
                Some(Encap {
                    inner_nh: 6000,
                    ..encap
                }),
                SplitError::Header,
            ),
            // The inner transport offset off the inner IP header.
            (
                VirtioHdr {
                    csum_start: (nh + 24) as u16,
                    ..hdr
                },
                Some(encap),
                SplitError::Header,
            ),
        ];
        for (hdr, encap, want) in cases {
            let mut p = p.clone();
            let mut scratch = vec![0u8; 65_536];
            let got = split_encapsulated(hdr, encap, &mut p, &mut scratch, |_| {});
            assert_eq!(got, Err(want), "{hdr:?} {encap:?}");
        }
        // The plain split never takes an encapsulated packet.
        let mut p = p.clone();
        assert_eq!(
            split_all(hdr, &mut p),
            Err(SplitError::GsoType(hdr.gso_type))
        );
    }

    /// Builds each segment at its own place in one buffer, `gap` bytes apart, as the TUN
    /// reader builds them in the send batch; `limit` bytes of buffer in all.
    struct Spaced {
        buf: Vec<u8>,
        at: usize,
        gap: usize,
        built: Vec<std::ops::Range<usize>>,
        wholes: usize,
    }

    impl Segments for Spaced {
        fn room(&mut self, len: usize) -> Option<&mut [u8]> {
            let start = self.at + self.gap;
            self.buf.get_mut(start..start + len)
        }

        fn built(&mut self, len: usize) {
            let start = self.at + self.gap;
            self.built.push(start..start + len);
            self.at = start + len;
        }

        fn whole(&mut self, _packet: &mut [u8]) {
            self.wholes += 1;
        }
    }

    fn spaced(limit: usize) -> Spaced {
        Spaced {
            buf: vec![0xa5; limit],
            at: 0,
            gap: 16,
            built: Vec::new(),
            wholes: 0,
        }
    }

    #[test]
    fn segments_built_where_the_sink_says_match_the_scratch_split() {
        let (hdr, mut p, _) = super_segment(false, 65_483, 1368, TCP_ACK | TCP_PSH);
        let want = split_all(hdr, &mut p.clone()).expect("split");
        let mut sink = spaced(1 << 17);
        assert_eq!(split_into(hdr, None, &mut p, &mut sink), Ok(want.len()));
        let got: Vec<Vec<u8>> = sink
            .built
            .iter()
            .map(|r| sink.buf[r.clone()].to_vec())
            .collect();
        assert_eq!(got, want, "the same segments, each where it was built");
        // The bytes between them are the sink's: untouched.
        assert!(sink
            .built
            .iter()
            .all(|r| sink.buf[r.start - 16..r.start] == [0xa5; 16]));
        assert_eq!(sink.wholes, 0);

        // A packet that needs no split is handed over where it lies.
        let single = VirtioHdr {
            gso_type: GSO_NONE,
            ..hdr
        };
        let mut sink = spaced(0);
        assert_eq!(split_into(single, None, &mut p, &mut sink), Ok(1));
        assert_eq!((sink.wholes, sink.built.len()), (1, 0));
    }

    #[test]
    fn a_sink_without_room_stops_the_split() {
        let (hdr, mut p, _) = super_segment(false, 10 * 1368, 1368, TCP_ACK);
        let seg = 52 + 1368;
        // Not even the first segment fits: nothing is taken.
        let mut sink = spaced(seg);
        assert_eq!(
            split_into(hdr, None, &mut p.clone(), &mut sink),
            Err(SplitError::Scratch)
        );
        assert!(sink.built.is_empty());
        // Room for three: three are taken, in order, then the split stops.
        let mut sink = spaced(3 * (16 + seg));
        assert_eq!(
            split_into(hdr, None, &mut p, &mut sink),
            Err(SplitError::Scratch)
        );
        assert_eq!(sink.built.len(), 3);
        for r in &sink.built {
            assert_valid(&sink.buf[r.clone()]);
        }
    }

    #[test]
    fn fin_stays_on_the_last_segment_and_cwr_on_the_first() {
        let (mut hdr, mut p, _) = super_segment(false, 3000, 1000, TCP_ACK | TCP_FIN | TCP_CWR);
        hdr.gso_type |= GSO_ECN;
        let segs = split_all(hdr, &mut p).expect("split");
        let flags: Vec<u8> = segs.iter().map(|s| s[20 + TCP_FLAGS]).collect();
        assert_eq!(
            flags,
            vec![TCP_ACK | TCP_CWR, TCP_ACK, TCP_ACK | TCP_FIN],
            "flags per segment"
        );
    }

    #[test]
    fn udp_super_segments_split() {
        for v6 in [false, true] {
            let mut p = Udp::new(v6, 3000).build();
            let l4 = if v6 { 40 } else { 20 };
            let hdr = VirtioHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_UDP_L4,
                hdr_len: (l4 + 8) as u16,
                gso_size: 1200,
                csum_start: l4 as u16,
                csum_offset: UDP_CSUM as u16,
            };
            let segs = split_all(hdr, &mut p).expect("split");
            assert_eq!(segs.len(), 3);
            for s in &segs {
                assert_valid(s);
                assert_eq!(usize::from(be16(s, l4 + 4)), s.len() - l4, "UDP length");
            }
            assert_eq!(segs[2].len(), l4 + 8 + 600);
        }
    }

    #[test]
    fn partial_checksum_of_a_single_packet_is_completed_in_place() {
        let t = Tcp::new(false, 1, 500);
        let good = t.build();
        let mut p = good.clone();
        let (src, dst) = ip_addrs(&p, false);
        let partial = fold(pseudo_header(src, dst, IPPROTO_TCP, p.len() - 20));
        put16(&mut p, 20 + TCP_CSUM, partial);
        let hdr = VirtioHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: TCP_CSUM as u16,
            ..VirtioHdr::NONE
        };
        let segs = split_all(hdr, &mut p).expect("split");
        assert_eq!(segs, vec![good]);
        // Without NEEDS_CSUM the packet passes untouched.
        let mut plain = Udp::new(true, 10).build();
        assert_eq!(
            split_all(VirtioHdr::NONE, &mut plain).expect("split"),
            vec![plain.clone()]
        );
    }

    #[test]
    fn malformed_input_is_refused() {
        let (hdr, p, _) = super_segment(false, 5000, 1368, TCP_ACK);
        let cases: Vec<(VirtioHdr, Vec<u8>, SplitError)> = vec![
            (
                VirtioHdr { gso_size: 0, ..hdr },
                p.clone(),
                SplitError::ZeroSegment,
            ),
            (
                VirtioHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
                p.clone(),
                SplitError::Family,
            ),
            (
                VirtioHdr { gso_type: 3, ..hdr },
                p.clone(),
                SplitError::GsoType(3),
            ),
            (
                VirtioHdr {
                    csum_start: 24,
                    ..hdr
                },
                p.clone(),
                SplitError::Header,
            ),
            (hdr, p[..52].to_vec(), SplitError::Truncated),
            (hdr, p[..30].to_vec(), SplitError::Truncated),
            (hdr, vec![0x20; 100], SplitError::NotIp),
            (
                VirtioHdr {
                    flags: F_NEEDS_CSUM,
                    csum_start: 20,
                    csum_offset: 200,
                    ..VirtioHdr::NONE
                },
                p[..100].to_vec(),
                SplitError::Truncated,
            ),
        ];
        for (hdr, mut p, want) in cases {
            assert_eq!(split_all(hdr, &mut p), Err(want), "{hdr:?}");
        }
        // A TCP data offset below 5 words.
        let (hdr, mut p, _) = super_segment(false, 5000, 1368, TCP_ACK);
        p[20 + 12] = 4 << 4;
        assert_eq!(split_all(hdr, &mut p), Err(SplitError::Header));
        // Scratch too small for a segment.
        let (hdr, mut p, _) = super_segment(false, 5000, 1368, TCP_ACK);
        let mut small = [0u8; 1000];
        assert_eq!(
            split(hdr, &mut p, &mut small, |_| {}),
            Err(SplitError::Scratch)
        );
    }
}
