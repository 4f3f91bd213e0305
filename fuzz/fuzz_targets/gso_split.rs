//! The virtio-net header and GSO split: what an offloading TUN read hands the engine (a
//! 10-byte header, or the 24-byte one when the GSO type says the packet is encapsulated in
//! UDP, then up to 64 KiB) on any bytes. The header must round-trip; the split must never
//! panic, must emit as many packets as it reports, each fitting the scratch buffer and no
//! longer than headers plus one segment; IPv4 segments carry valid header checksums and
//! every segment a valid transport checksum, inside and, encapsulated, outside too (outer
//! IPv4 header, outer UDP length, and its checksum unless it is zero).
#![no_main]

use std::cell::RefCell;

use isthmus_wg::offload::checksum::{finish, pseudo_header, sum};
use isthmus_wg::offload::gso::split_encapsulated;
use isthmus_wg::offload::virtio::GSO_NONE;
use isthmus_wg::offload::{Encap, VirtioHdr, VIRTIO_HDR_LEN, VIRTIO_TUNNEL_HDR_LEN};
use libfuzzer_sys::fuzz_target;

const SCRATCH: usize = 65_535 + 64;

fn l4_valid(seg: &[u8], v6: bool, l4: usize, proto: u8) -> bool {
    let (src, dst) = if v6 {
        (&seg[8..24], &seg[24..40])
    } else {
        (&seg[12..16], &seg[16..20])
    };
    finish(pseudo_header(src, dst, proto, seg.len() - l4) + sum(&seg[l4..], 0)) == 0
}

thread_local! {
    /// Reused across runs: zeroing 64 KiB each time would cost more than the split.
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH]);
}

fuzz_target!(|data: &[u8]| {
    SCRATCH_BUF.with(|s| run(data, &mut s.borrow_mut()));
});

fn run(data: &[u8], scratch: &mut [u8]) {
    let Some(hdr) = VirtioHdr::decode(data) else {
        return;
    };
    let mut again = [0u8; VIRTIO_HDR_LEN];
    hdr.encode(&mut again);
    assert_eq!(
        &again,
        &data[..VIRTIO_HDR_LEN],
        "virtio header does not round-trip"
    );

    // The long header when the type says "encapsulated" (0x20 or 0x40) and it is there.
    let encap = Encap::decode(data).filter(|_| hdr.gso_type & 0x60 != 0);
    let hdr_len = if encap.is_some() {
        VIRTIO_TUNNEL_HDR_LEN
    } else {
        VIRTIO_HDR_LEN
    };
    let mut packet = data[hdr_len..].to_vec();
    let mut emitted = 0usize;
    let l4 = usize::from(hdr.csum_start);
    let mss = usize::from(hdr.gso_size);
    let segmented = hdr.gso_type != GSO_NONE;
    let tcp = hdr.gso_type & 0x1f != 5;
    let nh = encap.map_or(0, |e| usize::from(e.inner_nh));
    let result = split_encapsulated(hdr, encap, &mut packet, scratch, |seg| {
        emitted += 1;
        if !segmented {
            return;
        }
        if let Some(e) = encap {
            let th = usize::from(e.outer_th);
            let outer_v6 = seg[0] >> 4 == 6;
            if !outer_v6 {
                assert_eq!(finish(sum(&seg[..th], 0)), 0, "bad outer IPv4 checksum");
            }
            let udp_len = usize::from(u16::from_be_bytes([seg[th + 4], seg[th + 5]]));
            assert_eq!(udp_len, seg.len() - th, "bad outer UDP length");
            if seg[th + 6..th + 8] != [0, 0] {
                assert!(l4_valid(seg, outer_v6, th, 17), "bad outer UDP checksum");
            }
        }
        let inner = &seg[nh..];
        let l4 = l4 - nh;
        let v6 = inner[0] >> 4 == 6;
        let hlen = l4
            + if tcp {
                usize::from(inner[l4 + 12] >> 4) * 4
            } else {
                8
            };
        assert!(
            inner.len() <= hlen + mss,
            "segment longer than headers plus MSS"
        );
        if !v6 {
            assert_eq!(finish(sum(&inner[..l4], 0)), 0, "bad IPv4 header checksum");
        }
        assert!(
            l4_valid(inner, v6, l4, if tcp { 6 } else { 17 }),
            "bad transport checksum"
        );
    });
    if let Ok(n) = result {
        assert_eq!(n, emitted, "split reported a different count");
    }
}
