//! Packet builders and checkers for the offload tests.

use super::checksum::{finish, fold, pseudo_header, sum};
use super::*;

pub const SRC4: [u8; 4] = [10, 200, 0, 2];
pub const DST4: [u8; 4] = [10, 200, 0, 1];
pub const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// What a TCP segment carries.
#[derive(Clone)]
pub struct Tcp {
    pub v6: bool,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    pub ip_id: u16,
    pub sport: u16,
}

impl Tcp {
    pub fn new(v6: bool, seq: u32, payload_len: usize) -> Tcp {
        Tcp {
            v6,
            seq,
            ack: 0x1000,
            flags: TCP_ACK,
            // NOP NOP timestamps, as Linux sends them.
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            payload: (0..payload_len)
                .map(|i| (i as u32).wrapping_add(seq) as u8)
                .collect(),
            ip_id: 0x4000,
            sport: 40000,
        }
    }

    /// A complete packet with valid lengths and checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4 = if self.v6 { 40 } else { 20 };
        let thlen = 20 + self.options.len();
        let len = l4 + thlen + self.payload.len();
        let mut p = vec![0u8; len];
        if self.v6 {
            p[0] = 0x60;
            put16(&mut p, 4, (len - 40) as u16);
            p[6] = IPPROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&SRC6);
            p[24..40].copy_from_slice(&DST6);
        } else {
            p[0] = 0x45;
            put16(&mut p, 2, len as u16);
            put16(&mut p, 4, self.ip_id);
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = IPPROTO_TCP;
            p[12..16].copy_from_slice(&SRC4);
            p[16..20].copy_from_slice(&DST4);
            let c = finish(sum(&p[..20], 0));
            put16(&mut p, 10, c);
        }
        put16(&mut p, l4, self.sport);
        put16(&mut p, l4 + 2, 5201);
        put32(&mut p, l4 + 4, self.seq);
        put32(&mut p, l4 + 8, self.ack);
        p[l4 + 12] = ((thlen / 4) as u8) << 4;
        p[l4 + 13] = self.flags;
        put16(&mut p, l4 + 14, 512);
        p[l4 + 20..l4 + thlen].copy_from_slice(&self.options);
        p[l4 + thlen..].copy_from_slice(&self.payload);
        let (src, dst) = ip_addrs(&p, self.v6);
        let acc = pseudo_header(src, dst, IPPROTO_TCP, len - l4) + sum(&p[l4..], 0);
        put16(&mut p, l4 + TCP_CSUM, finish(acc));
        p
    }
}

/// A UDP packet over IPv4 or IPv6 with a valid checksum.
pub fn udp(v6: bool, payload_len: usize) -> Vec<u8> {
    let l4 = if v6 { 40 } else { 20 };
    let len = l4 + 8 + payload_len;
    let mut p = vec![0u8; len];
    if v6 {
        p[0] = 0x60;
        put16(&mut p, 4, (len - 40) as u16);
        p[6] = IPPROTO_UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&SRC6);
        p[24..40].copy_from_slice(&DST6);
    } else {
        p[0] = 0x45;
        put16(&mut p, 2, len as u16);
        p[8] = 64;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&SRC4);
        p[16..20].copy_from_slice(&DST4);
        let c = finish(sum(&p[..20], 0));
        put16(&mut p, 10, c);
    }
    put16(&mut p, l4, 5000);
    put16(&mut p, l4 + 2, 5001);
    put16(&mut p, l4 + 4, (len - l4) as u16);
    for (i, b) in p[l4 + 8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let (src, dst) = ip_addrs(&p, v6);
    let acc = pseudo_header(src, dst, IPPROTO_UDP, len - l4) + sum(&p[l4..], 0);
    put16(&mut p, l4 + UDP_CSUM, finish(acc));
    p
}

/// The transport offset of a plain IPv4 (no options) or IPv6 packet.
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
        assert_eq!(usize::from(be16(p, 4)) + 40, p.len(), "IPv6 payload length");
    } else {
        assert_eq!(usize::from(be16(p, 2)), p.len(), "IPv4 total length");
        assert_eq!(fold(sum(&p[..l4], 0)), 0xffff, "IPv4 header checksum");
    }
    let proto = if v6 { p[6] } else { p[9] };
    let (src, dst) = ip_addrs(p, v6);
    let acc = pseudo_header(src, dst, proto, p.len() - l4) + sum(&p[l4..], 0);
    assert_eq!(fold(acc), 0xffff, "transport checksum");
}

/// Completes a CHECKSUM_PARTIAL packet the way the kernel would before delivering it.
pub fn complete_partial(p: &mut [u8], csum_start: usize, csum_offset: usize) {
    let c = finish(sum(&p[csum_start..], 0));
    put16(p, csum_start + csum_offset, c);
}
