//! Our TUN offload code (`isthmus_wg::offload`) against tun-rs's port of wireguard-go's, on
//! the same input: a 64 KiB TCP super-segment as the kernel hands it to an offloading TUN,
//! split into MTU-sized segments (GSO), and those segments coalesced back (GRO).
//!
//! Each side is called the way its design asks: ours emits one segment at a time into one
//! scratch buffer, tun-rs fills an array of buffers; ours streams decrypted packets through
//! a one-flow coalescer, tun-rs's `GROTable` takes the whole batch. The results are
//! checked to match before anything is timed. `cargo bench -p isthmus-benches --bench
//! offload`; the figures and the decision are in `wg/src/offload/mod.rs`.
//!
//! A third group has no peer (tun-rs splits no tunnels): the same payload split as a plain
//! TCP super-segment and as a VXLAN one (what flannel's device hands an offloading TUN),
//! to show what the outer headers add per segment.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use isthmus_benches::bench_mode;
use isthmus_wg::offload::gro::Coalescer;
use isthmus_wg::offload::virtio::{
    F_NEEDS_CSUM, F_UDP_TUNNEL_CSUM, GSO_TCPV4, GSO_UDP_TUNNEL_IPV4,
};
use isthmus_wg::offload::{gso, Encap, VirtioHdr, VIRTIO_HDR_LEN};
use isthmus_wg::packet::{assert_valid, vxlan, Tcp};
use tun_rs::{GROTable, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

/// A 1420-byte tunnel MTU and Linux's TCP timestamps: 40 + 12 bytes of headers.
const HLEN: usize = 52;
const MSS: usize = 1420 - HLEN;
const PAYLOAD: usize = 65_535 - HLEN;

/// The super-segment with its header (ours and tun-rs's describe the same bytes).
fn super_segment() -> (VirtioHdr, Vec<u8>) {
    let hdr = VirtioHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: HLEN as u16,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    (hdr, Tcp::new(false, 1, PAYLOAD).build())
}

/// VXLAN's 50 bytes of outer headers, and the inner MSS inside flannel's MTU (1370 here).
const VXLAN_HLEN: usize = 50;
const VXLAN_MSS: usize = 1370 - HLEN;
const VXLAN_PAYLOAD: usize = 65_535 - VXLAN_HLEN - HLEN;

/// The same TCP payload as a plain super-segment and as a VXLAN one, both at
/// [`VXLAN_MSS`]: (plain header, plain packet, VXLAN header, tunnel offsets, VXLAN packet).
fn vxlan_pair() -> (VirtioHdr, Vec<u8>, VirtioHdr, Encap, Vec<u8>) {
    let plain = VirtioHdr {
        gso_size: VXLAN_MSS as u16,
        ..super_segment().0
    };
    let inner = Tcp::new(false, 1, VXLAN_PAYLOAD).build();
    let (outer, nh) = vxlan(false, &inner);
    let hdr = VirtioHdr {
        flags: F_NEEDS_CSUM | F_UDP_TUNNEL_CSUM,
        gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
        hdr_len: (nh + HLEN) as u16,
        gso_size: VXLAN_MSS as u16,
        csum_start: (nh + 20) as u16,
        csum_offset: 16,
    };
    let encap = Encap {
        outer_th: 20,
        inner_nh: nh as u16,
    };
    (plain, inner, hdr, encap, outer)
}

fn theirs(hdr: VirtioHdr) -> VirtioNetHdr {
    VirtioNetHdr {
        flags: hdr.flags,
        gso_type: hdr.gso_type,
        hdr_len: hdr.hdr_len,
        gso_size: hdr.gso_size,
        csum_start: hdr.csum_start,
        csum_offset: hdr.csum_offset,
    }
}

/// The segments the split makes: what the receiving side opens, one per datagram.
fn segments() -> Vec<Vec<u8>> {
    let (hdr, mut packet) = super_segment();
    let mut scratch = vec![0u8; 65_535];
    let mut out = Vec::new();
    gso::split(hdr, &mut packet, &mut scratch, |s| out.push(s.to_vec())).expect("split");
    out
}

/// Each segment behind a virtio-net header's room, in a buffer that can grow to 64 KiB
/// (tun-rs coalesces into the first packet's buffer, and wants room for a second header).
fn slots(segments: &[Vec<u8>]) -> Vec<Vec<u8>> {
    segments
        .iter()
        .map(|s| {
            let mut b = Vec::with_capacity(2 * VIRTIO_HDR_LEN + 65_535);
            b.resize(VIRTIO_HDR_LEN, 0);
            b.extend_from_slice(s);
            b
        })
        .collect()
}

fn ours_coalesce(gro: &mut Coalescer, slots: &mut [Vec<u8>]) -> usize {
    let mut written = 0;
    let mut emit = |h: &[u8], p: &[u8]| written += h.len() + p.len();
    for slot in slots.iter_mut() {
        gro.push(slot, &mut emit);
    }
    gro.flush(&mut emit);
    written
}

fn check() {
    // Both splits give the same, valid segments.
    let (hdr, mut packet) = super_segment();
    let ours = segments();
    let mut bufs = vec![vec![0u8; 2048]; 64];
    let mut sizes = vec![0usize; 64];
    let n = tun_rs::gso_split(&mut packet, theirs(hdr), &mut bufs, &mut sizes, 0, false)
        .expect("tun-rs split");
    assert_eq!(n, ours.len());
    for (i, s) in ours.iter().enumerate() {
        assert_valid(s);
        assert_eq!(&bufs[i][..sizes[i]], &s[..], "segment {i}");
    }
    // Both coalescers make one super-segment of it all.
    let whole = VIRTIO_HDR_LEN + HLEN + PAYLOAD;
    assert_eq!(
        ours_coalesce(&mut Coalescer::new(), &mut slots(&ours)),
        whole
    );
    let mut bufs = slots(&ours);
    GROTable::new()
        .apply_gro(&mut bufs, VIRTIO_NET_HDR_LEN, false)
        .expect("tun-rs GRO");
    assert_eq!(
        bufs[0].len(),
        whole,
        "tun-rs coalesced into the first buffer"
    );
    // The VXLAN split gives valid VXLAN packets around the plain split's segments.
    let (plain, mut inner, hdr, encap, mut outer) = vxlan_pair();
    let mut scratch = vec![0u8; 65_535];
    let mut want = Vec::new();
    gso::split(plain, &mut inner, &mut scratch, |s| want.push(s.to_vec())).expect("split");
    let mut got = Vec::new();
    gso::split_encapsulated(hdr, Some(encap), &mut outer, &mut scratch, |s| {
        assert_valid(s);
        got.push(s[usize::from(encap.inner_nh)..].to_vec());
    })
    .expect("VXLAN split");
    assert_eq!(got, want, "the same segments inside VXLAN");
}

fn main() {
    check();
    if !bench_mode() {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let (hdr, mut packet) = super_segment();
    let segs = segments();

    let mut g = c.benchmark_group("offload-split-64k");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut scratch = vec![0u8; 65_535];
    g.bench_function("isthmus", |b| {
        b.iter(|| {
            gso::split(hdr, &mut packet, &mut scratch, |s| {
                black_box(s);
            })
        })
    });
    let mut bufs = vec![vec![0u8; 2048]; 64];
    let mut sizes = vec![0usize; 64];
    g.bench_function("tun-rs", |b| {
        b.iter(|| tun_rs::gso_split(&mut packet, theirs(hdr), &mut bufs, &mut sizes, 0, false))
    });
    g.finish();

    let (plain, mut inner, vx_hdr, encap, mut outer) = vxlan_pair();
    let mut g = c.benchmark_group("offload-split-vxlan-64k");
    g.throughput(Throughput::Bytes(VXLAN_PAYLOAD as u64));
    g.bench_function("isthmus-plain", |b| {
        b.iter(|| {
            gso::split(plain, &mut inner, &mut scratch, |s| {
                black_box(s);
            })
        })
    });
    g.bench_function("isthmus-vxlan", |b| {
        b.iter(|| {
            gso::split_encapsulated(vx_hdr, Some(encap), &mut outer, &mut scratch, |s| {
                black_box(s);
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("offload-coalesce-64k");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut gro = Coalescer::new();
    g.bench_function("isthmus", |b| {
        b.iter_batched_ref(
            || slots(&segs),
            |slots| ours_coalesce(&mut gro, slots),
            BatchSize::SmallInput,
        )
    });
    let mut table = GROTable::new();
    g.bench_function("tun-rs", |b| {
        b.iter_batched_ref(
            || slots(&segs),
            |bufs| table.apply_gro(bufs, VIRTIO_NET_HDR_LEN, false),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    c.final_summary();
}
