//! The one packet factory: IPv4 and IPv6 TCP and UDP packets with valid lengths and
//! checksums, and the checks that go with them, for the engine's unit tests, the offload
//! tests and the benches alike (Firezone's `ip-packet/src/make.rs` plays the same part).
//!
//! Test code only: compiled for this crate's tests, and for others behind the `testing`
//! feature (`isthmus-benches` turns it on). Checksums come from [`crate::offload::checksum`],
//! the data path's own, so there is one implementation of the Internet checksum.

use std::net::IpAddr;

use crate::offload::checksum::{finish, fold, pseudo_header, sum};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// TCP flags, as they sit in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_CWR: u8 = 0x80;

/// The addresses [`Tcp::new`] and [`Udp::new`] use: a tunnel's two ends.
pub const SRC4: [u8; 4] = [10, 200, 0, 2];
pub const DST4: [u8; 4] = [10, 200, 0, 1];
pub const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn ends(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (SRC6.into(), DST6.into())
    } else {
        (SRC4.into(), DST4.into())
    }
}

/// `len` payload bytes that differ from one offset to the next (starting at `from`), so a
/// misplaced byte shows.
pub fn pattern(from: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_add(from) as u8)
        .collect()
}

/// What a TCP segment carries; [`Tcp::build`] makes the packet.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    /// IPv4 identification (unused over IPv6).
    pub ip_id: u16,
}

impl Tcp {
    /// A data segment between [`SRC4`]/[`DST4`] (or the IPv6 pair) with Linux's timestamp
    /// options, as a bulk transfer sends them.
    pub fn new(v6: bool, seq: u32, payload_len: usize) -> Tcp {
        let (src, dst) = ends(v6);
        Tcp {
            src,
            dst,
            sport: 40000,
            dport: 5201,
            seq,
            ack: 0x1000,
            flags: TCP_ACK,
            // NOP NOP timestamps, as Linux sends them.
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            payload: pattern(seq, payload_len),
            ip_id: 0x4000,
        }
    }

    /// A complete packet (IPv4 with DF set) with valid lengths and checksums.
    pub fn build(&self) -> Vec<u8> {
        let thlen = 20 + self.options.len();
        let mut p = ip_header(
            self.src,
            self.dst,
            TCP,
            self.ip_id,
            true,
            thlen + self.payload.len(),
        );
        let l4 = p.len();
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.ack.to_be_bytes());
        p.push(((thlen / 4) as u8) << 4);
        p.push(self.flags);
        p.extend_from_slice(&512u16.to_be_bytes()); // window
        p.extend_from_slice(&[0; 4]); // checksum, urgent pointer
        p.extend_from_slice(&self.options);
        p.extend_from_slice(&self.payload);
        let c = transport_checksum(&p, l4, TCP);
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        p
    }
}

/// What a UDP datagram carries; [`Udp::build`] makes the packet.
#[derive(Clone, Debug)]
pub struct Udp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// Fill in the UDP checksum; without, it is zero ("none", allowed over IPv4 only).
    pub checksum: bool,
    /// IPv4 identification and don't-fragment bit (unused over IPv6).
    pub ip_id: u16,
    pub df: bool,
}

impl Udp {
    /// A datagram between [`SRC4`]/[`DST4`] (or the IPv6 pair), port 5000 to 5001.
    pub fn new(v6: bool, payload_len: usize) -> Udp {
        let (src, dst) = ends(v6);
        Udp {
            src,
            dst,
            sport: 5000,
            dport: 5001,
            payload: pattern(0, payload_len),
            checksum: true,
            ip_id: 0,
            df: false,
        }
    }

    /// An IPv4 datagram from `src` to `dst`, port 5000 to 5001, carrying `payload`.
    pub fn v4(src: [u8; 4], dst: [u8; 4], payload: impl Into<Vec<u8>>) -> Udp {
        Udp {
            src: src.into(),
            dst: dst.into(),
            payload: payload.into(),
            ..Udp::new(false, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut p = ip_header(
            self.src,
            self.dst,
            UDP,
            self.ip_id,
            self.df,
            8 + self.payload.len(),
        );
        let l4 = p.len();
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0; 2]);
        p.extend_from_slice(&self.payload);
        if self.checksum || self.src.is_ipv6() {
            // Zero means "none"; a computed zero is sent as its one's-complement twin.
            let c = match transport_checksum(&p, l4, UDP) {
                0 => 0xffff,
                c => c,
            };
            p[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

/// `inner` as a Linux VXLAN device sends it (flannel's port 8472, VNI 1, an inner Ethernet
/// header), over IPv4 or IPv6, outer UDP checksum filled in; and the offset of the inner
/// IP header.
pub fn vxlan(outer_v6: bool, inner: &[u8]) -> (Vec<u8>, usize) {
    let ethertype: u16 = if inner.first().map(|b| b >> 4) == Some(6) {
        0x86dd
    } else {
        0x0800
    };
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    payload.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    payload.extend_from_slice(&ethertype.to_be_bytes());
    payload.extend_from_slice(inner);
    let (src, dst) = ends(outer_v6);
    let p = Udp {
        src,
        dst,
        sport: 40_000,
        dport: 8472,
        payload,
        checksum: true,
        ip_id: 0x1234,
        df: true,
    }
    .build();
    let inner_nh = p.len() - inner.len();
    (p, inner_nh)
}

/// An IPv4/UDP packet of exactly `len` bytes (at least 28) from `src` to `dst`, valid
/// checksums: the engine's and the benches' everyday packet (boringtun checks the inner
/// length after decryption).
pub fn udp4(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    assert!(
        (28..=usize::from(u16::MAX)).contains(&len),
        "IPv4/UDP packet length {len} out of range"
    );
    Udp::v4(src, dst, pattern(0, len - 28)).build()
}

/// An IPv4 packet of `len` bytes (at least 20) whose payload is the pattern, not a transport
/// header: for code that reads only the IP header, down to the shortest routable packet.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Vec<u8> {
    assert!(
        (20..=usize::from(u16::MAX)).contains(&len),
        "IPv4 packet length {len} out of range"
    );
    let mut p = ip_header(src.into(), dst.into(), proto, 0, false, len - 20);
    p.extend_from_slice(&pattern(0, len - 20));
    p
}

/// An IP header for `l4_len` bytes of `proto`, checksummed (IPv4) — the start of a packet.
fn ip_header(src: IpAddr, dst: IpAddr, proto: u8, id: u16, df: bool, l4_len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + l4_len);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&[if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let c = finish(sum(&p, 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => panic!("source {src} and destination {dst} are of different families"),
    }
    p
}

/// Source and destination address bytes, for the pseudo-header.
fn addrs(p: &[u8]) -> (&[u8], &[u8]) {
    if p[0] >> 4 == 6 {
        (&p[8..24], &p[24..40])
    } else {
        (&p[12..16], &p[16..20])
    }
}

/// The transport checksum over `p` from `l4` on: the value to write while the field is
/// zero, and zero once a valid one is in.
fn transport_checksum(p: &[u8], l4: usize, proto: u8) -> u16 {
    let (src, dst) = addrs(p);
    finish(pseudo_header(src, dst, proto, p.len() - l4) + sum(&p[l4..], 0))
}

/// The transport offset of a plain IPv4 (any header length) or IPv6 (no extension headers)
/// packet.
pub fn l4_offset(p: &[u8]) -> usize {
    if p[0] >> 4 == 6 {
        40
    } else {
        usize::from(p[0] & 0xf) * 4
    }
}

/// Panics unless the IP lengths and header checksum and the transport checksum are right.
pub fn assert_valid(p: &[u8]) {
    let v6 = p[0] >> 4 == 6;
    let l4 = l4_offset(p);
    if v6 {
        let len = u16::from_be_bytes([p[4], p[5]]);
        assert_eq!(usize::from(len) + 40, p.len(), "IPv6 payload length");
    } else {
        let len = u16::from_be_bytes([p[2], p[3]]);
        assert_eq!(usize::from(len), p.len(), "IPv4 total length");
        assert_eq!(fold(sum(&p[..l4], 0)), 0xffff, "IPv4 header checksum");
    }
    let proto = if v6 { p[6] } else { p[9] };
    if proto == UDP && !v6 && p[l4 + 6..l4 + 8] == [0, 0] {
        return; // no UDP checksum
    }
    let (src, dst) = addrs(p);
    let acc = pseudo_header(src, dst, proto, p.len() - l4) + sum(&p[l4..], 0);
    assert_eq!(fold(acc), 0xffff, "transport checksum");
}

/// Completes a CHECKSUM_PARTIAL packet (the field holds the pseudo-header sum) the way the
/// kernel would before delivering it.
pub fn complete_partial(p: &mut [u8], csum_start: usize, csum_offset: usize) {
    let c = finish(sum(&p[csum_start..], 0));
    let at = csum_start + csum_offset;
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_it_makes_is_valid() {
        for v6 in [false, true] {
            assert_valid(&Tcp::new(v6, 7, 1000).build());
            assert_valid(&Udp::new(v6, 100).build());
        }
        let p = udp4([10, 0, 0, 1], [10, 0, 0, 2], 1420);
        assert_eq!(p.len(), 1420);
        assert_valid(&p);
        let no_csum = Udp {
            checksum: false,
            ..Udp::v4([10, 0, 0, 1], [10, 0, 0, 2], &b"x"[..])
        };
        assert_valid(&no_csum.build());
    }
}
