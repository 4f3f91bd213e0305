//! GRO coalescing: a stream of decrypted packets — TCP segments of three flows and UDP
//! datagrams of two, over IPv4 and IPv6, in and out of order, some with bad IP or
//! transport checksums or a flipped header byte — through `Coalescer` with UDP on. Each
//! 4-byte record of the input describes one packet:
//! byte 0: bit 0 IPv6, bits 1-2 flow (3: UDP), then for TCP bit 3 PSH, bit 4 bad TCP
//! checksum, bit 5 bad IPv4 header checksum, bit 6 flip header byte (byte 3) by byte 2,
//! bit 7 sequence gap; for UDP bit 3 the flow (source port), bit 4 bad UDP checksum, bit 5
//! bad IPv4 header checksum, bit 6 flip header byte, bit 7 an IPv4 ID jump of byte 2 / 2
//! + 1 and, when byte 2 is odd, no UDP checksum (zero);
//! byte 1: payload length / 6 (UDP: plus 1);
//! byte 3: the header byte to flip, and (bit 7) DF on a UDP datagram or, on a TCP
//! segment, that it travels inside VXLAN to port 8472 (over IPv6 for flow 2, else IPv4;
//! the outer UDP checksum filled in unless byte 2's bit 0 is set), as flannel sends it:
//! the coalescer has that port set, so runs become tunnel super-packets. The bad-IPv4-
//! header bit then spoils the outer header, and the flipped byte may be any header byte,
//! outer ones included.
//!
//! The oracle is what the kernel would see: every TUN write, re-segmented by our GSO (as
//! the kernel's own segmentation would), must give back exactly the packets that went in,
//! in order — only IPv4 IDs and, with them, header checksums may be regenerated, and for
//! UDP only with DF (without DF a merge needs consecutive IDs, so they come back exact).
//! A tunnel write's outer header is 16 bytes longer (the kernel wants it so, see
//! `offload::gro`): NOP options in IPv4, a destination options header holding one
//! experimental option in IPv6. Those bytes are stripped before comparing, after checking
//! they are exactly that.
//! A packet whose checksum is bad must therefore reach the kernel as it came, never
//! "repaired" by a merge (the kernel would have dropped it).
#![no_main]

use std::cell::RefCell;

use isthmus_wg::offload::checksum::{finish, sum};
use isthmus_wg::offload::gro::Coalescer;
use isthmus_wg::offload::gso::split_encapsulated;
use isthmus_wg::offload::virtio::{
    F_NEEDS_CSUM, GSO_NONE, GSO_UDP_TUNNEL_IPV4, GSO_UDP_TUNNEL_IPV6,
};
use isthmus_wg::offload::{Encap, VirtioHdr, VIRTIO_HDR_LEN, VIRTIO_TUNNEL_HDR_LEN};
use isthmus_wg::packet::{vxlan, Tcp, Udp, TCP_PSH};
use libfuzzer_sys::fuzz_target;

fn build(rec: &[u8], seqs: &mut [u32; 8], ids: &mut [u16; 4]) -> Vec<u8> {
    let (kind, len, x, at) = (rec[0], rec[1], rec[2], rec[3]);
    let v6 = kind & 1 != 0;
    let flow = usize::from((kind >> 1) & 3);
    let l4 = if v6 { 40 } else { 20 };
    let mut p = if flow == 3 {
        let uflow = usize::from((kind >> 3) & 1);
        let slot = uflow + if v6 { 2 } else { 0 };
        let mut u = Udp::new(v6, usize::from(len) * 6 + 1);
        u.sport = 5000 + uflow as u16;
        u.df = at & 0x80 != 0;
        if kind & 0x80 != 0 {
            ids[slot] = ids[slot].wrapping_add(u16::from(x >> 1) + 1);
            u.checksum = x & 1 == 0;
        }
        u.ip_id = ids[slot];
        ids[slot] = ids[slot].wrapping_add(1);
        let mut p = u.build();
        if kind & 0x10 != 0 {
            p[l4 + 6] ^= 0x5a;
        }
        p
    } else {
        let slot = flow + if v6 { 4 } else { 0 };
        if kind & 0x80 != 0 {
            seqs[slot] = seqs[slot].wrapping_add(u32::from(x) + 1);
        }
        let payload = usize::from(len) * 6;
        let mut t = Tcp::new(v6, seqs[slot], payload);
        seqs[slot] = seqs[slot].wrapping_add(payload as u32);
        t.sport = 40000 + flow as u16;
        if kind & 0x08 != 0 {
            t.flags |= TCP_PSH;
        }
        let mut p = t.build();
        if kind & 0x10 != 0 {
            p[l4 + 16] ^= 0x5a;
        }
        p
    };
    // Headers in front of the (inner) payload, and whether the outer header is IPv4.
    let mut hlen = if flow == 3 { l4 + 8 } else { l4 + 32 };
    let mut v4 = !v6;
    if flow != 3 && at & 0x80 != 0 {
        let outer_v6 = flow == 2;
        let (mut w, inner_nh) = vxlan(outer_v6, &p);
        let th = inner_nh - 30;
        if x & 1 != 0 {
            w[th + 6..th + 8].fill(0);
        }
        hlen += inner_nh;
        v4 = !outer_v6;
        p = w;
    }
    if kind & 0x20 != 0 && v4 {
        p[10] ^= 0xa5;
    }
    if kind & 0x40 != 0 {
        let at = usize::from(at) % hlen.min(p.len());
        p[at] ^= x;
    }
    p
}

/// Where the inner IP header of a VXLAN datagram to port 8472 starts (outer IPv4 of any
/// header length, or IPv6), if `p` looks like one.
fn vxlan_inner(p: &[u8]) -> Option<usize> {
    let th = match p.first()? >> 4 {
        4 if p.len() >= 20 && p[9] == 17 => usize::from(p[0] & 0x0f) * 4,
        6 if p.len() >= 40 && p[6] == 17 => 40,
        _ => return None,
    };
    let nh = th + 30;
    (p.len() > nh + 20 && p[th + 2..th + 4] == 8472u16.to_be_bytes()).then_some(nh)
}

/// A tunnel write's segment with the 16 bytes the coalescer adds to its outer header taken
/// out (checked to be the IPv4 NOPs or the IPv6 destination options it writes), so it
/// compares with the datagram that came in.
fn strip_outer_options(mut p: Vec<u8>) -> Vec<u8> {
    if p[0] >> 4 == 6 && p[6] == 60 {
        let mut want = vec![17, 1, 0x1e, 12];
        want.extend([0; 12]);
        assert_eq!(&p[40..56], &want[..], "outer destination options");
        p.drain(40..56);
        p[6] = 17;
        let payload = u16::from_be_bytes([p[4], p[5]]) - 16;
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        return p;
    }
    if p[0] == 0x49 {
        assert!(
            p[20..36].iter().all(|&b| b == 1),
            "outer options other than NOPs"
        );
        p.drain(20..36);
        p[0] = 0x45;
        let total = u16::from_be_bytes([p[2], p[3]]) - 16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[10..12].fill(0);
        let c = finish(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        assert!(p[0] == 0x45 || p[0] >> 4 == 6, "unexpected outer header");
    }
    p
}

fn ip_csum_ok(p: &[u8]) -> bool {
    p.len() >= 20 && finish(sum(&p[..20], 0)) == 0
}

/// Clears what a merge may legitimately regenerate: an IPv4 packet's ID and header checksum,
/// when that checksum was valid to begin with (for UDP only with DF: without, the IDs of a
/// merged run are consecutive and come back exact).
fn normalise(p: &mut [u8], csum_was_valid: bool) {
    let ids_free = p.get(9) != Some(&17) || p[6] & 0x40 != 0;
    if p.first().map(|b| b >> 4) == Some(4) && p.len() >= 20 && csum_was_valid && ids_free {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
}

/// [`normalise`] for the inner IPv4 header of a VXLAN datagram too (TCP inside: its IDs are
/// regenerated by a merge); `inner_valid` says whether its checksum was valid coming in.
fn normalise_inner(p: &mut [u8], inner_valid: bool) {
    if let Some(nh) = vxlan_inner(p) {
        normalise(&mut p[nh..], inner_valid);
    }
}

thread_local! {
    /// Reused across runs (each run ends with a flush, so it holds nothing): a fresh one
    /// zeroes 64 KiB, which would cost more than the run.
    static STATE: RefCell<(Coalescer, Vec<u8>)> = RefCell::new({
        let mut c = Coalescer::with_udp(true);
        c.set_vxlan_ports([8472, 0, 0, 0]);
        (c, vec![0u8; 65_600])
    });
}

fuzz_target!(|data: &[u8]| {
    STATE.with(|s| {
        let (c, scratch) = &mut *s.borrow_mut();
        run(data, c, scratch);
    });
});

fn run(data: &[u8], c: &mut Coalescer, scratch: &mut [u8]) {
    let mut seqs = [0x1000_0000u32; 8];
    let mut ids = [0xfff0u16; 4]; // IDs wrap inside
    let inputs: Vec<Vec<u8>> = data
        .chunks_exact(4)
        .take(512)
        .map(|r| build(r, &mut seqs, &mut ids))
        .collect();

    let mut writes: Vec<Vec<u8>> = Vec::new();
    let mut emit = |h: &[u8], p: &[u8]| writes.push([h, p].concat());
    for p in &inputs {
        let mut slot = vec![0xee; VIRTIO_HDR_LEN];
        slot.extend_from_slice(p);
        c.push(&mut slot, &mut emit);
    }
    c.flush(&mut emit);

    let mut out: Vec<Vec<u8>> = Vec::new();
    for w in &writes {
        let hdr = VirtioHdr::decode(w).expect("every write starts with a virtio header");
        // A tunnel write is the only one with the long header.
        let encap = (hdr.gso_type & (GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6) != 0)
            .then(|| Encap::decode(w).expect("a tunnel write has the long header"));
        let hdr_len = if encap.is_some() {
            VIRTIO_TUNNEL_HDR_LEN
        } else {
            VIRTIO_HDR_LEN
        };
        let mut packet = w[hdr_len..].to_vec();
        if hdr.gso_type == GSO_NONE {
            assert_eq!(
                hdr.flags & F_NEEDS_CSUM,
                0,
                "a plain write asks for a checksum"
            );
            out.push(packet);
            continue;
        }
        assert!(packet.len() <= 65_535, "super-segment too long");
        split_encapsulated(hdr, encap, &mut packet, scratch, |s| {
            out.push(strip_outer_options(s.to_vec()))
        })
        .expect("a coalesced write must re-segment");
    }
    assert_eq!(out.len(), inputs.len(), "packets lost or invented");
    for (i, (got, want)) in out.iter().zip(&inputs).enumerate() {
        let valid = ip_csum_ok(want);
        let inner_valid = vxlan_inner(want).is_some_and(|nh| ip_csum_ok(&want[nh..]));
        let (mut got, mut want) = (got.clone(), want.clone());
        normalise_inner(&mut got, inner_valid);
        normalise_inner(&mut want, inner_valid);
        normalise(&mut got, valid);
        normalise(&mut want, valid);
        assert!(got == want, "packet {i} differs after coalescing");
    }
}
