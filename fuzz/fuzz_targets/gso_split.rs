//! The virtio-net header and GSO split: what an offloading TUN read hands the engine (a
//! 10-byte header, then up to 64 KiB) on any bytes. The header must round-trip; the split
//! must never panic, must emit as many packets as it reports, each fitting the scratch
//! buffer and no longer than headers plus one segment; IPv4 segments carry valid header
//! checksums and every segment a valid transport checksum.
#![no_main]

use std::cell::RefCell;

use isthmus_wg::offload::checksum::{finish, pseudo_header, sum};
use isthmus_wg::offload::gso::split;
use isthmus_wg::offload::virtio::GSO_NONE;
use isthmus_wg::offload::{VirtioHdr, VIRTIO_HDR_LEN};
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

    let mut packet = data[VIRTIO_HDR_LEN..].to_vec();
    let mut emitted = 0usize;
    let l4 = usize::from(hdr.csum_start);
    let mss = usize::from(hdr.gso_size);
    let segmented = hdr.gso_type != GSO_NONE;
    let tcp = hdr.gso_type & 0x7f != 5;
    let result = split(hdr, &mut packet, scratch, |seg| {
        emitted += 1;
        if !segmented {
            return;
        }
        let v6 = seg[0] >> 4 == 6;
        let hlen = l4
            + if tcp {
                usize::from(seg[l4 + 12] >> 4) * 4
            } else {
                8
            };
        assert!(
            seg.len() <= hlen + mss,
            "segment longer than headers plus MSS"
        );
        if !v6 {
            assert_eq!(finish(sum(&seg[..l4], 0)), 0, "bad IPv4 header checksum");
        }
        assert!(
            l4_valid(seg, v6, l4, if tcp { 6 } else { 17 }),
            "bad transport checksum"
        );
    });
    if let Ok(n) = result {
        assert_eq!(n, emitted, "split reported a different count");
    }
}
