//! TUN offloads, as pure packet surgery with no I/O.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD` the kernel hands the TUN reader TCP (and UDP)
//! super-segments of up to 64 KiB behind a virtio-net header, and accepts them back the
//! same way. Crossing the kernel once per 64 KiB instead of once per 1420 bytes is most of
//! what makes a userspace tunnel fast, on both sides:
//!
//! - [`gso`] splits a super-segment read from the TUN into MTU-sized packets (fixing IP
//!   lengths, IDs, TCP sequence numbers and flags, and checksums) before encryption;
//! - [`gro`] coalesces consecutive decrypted TCP segments of one flow back into one
//!   super-segment before it is written to the TUN, and UDP datagrams of one flow into one
//!   `GSO_UDP_L4` packet when the TUN accepted USO (kernel ≥ 6.2).
//!
//! Everything here works on byte slices so it is table-tested without a device.
//!
//! ## Why ours and not tun-rs's
//!
//! tun-rs (our TUN crate) ships a port of wireguard-go's offload code: `gso_split`, and GRO
//! that also coalesces UDP. We keep ours, measured side by side on the same 64 KiB TCPv4
//! super-segment (48 segments, 1368 bytes each but the last): `cargo bench -p
//! isthmus-benches --bench offload`, 2-core Xeon shared with other builds, 2026-11-29
//! (docs/benchmarks.md):
//!
//! | | isthmus | tun-rs 2.8.16 |
//! |---|---:|---:|
//! | split (GSO) | 8.4 µs | 8.4 µs |
//! | coalesce (GRO) | 13.7 µs | 31.2 µs |
//!
//! - Splitting costs the same, but ours builds one segment at a time wherever the caller
//!   says ([`gso::Segments`]): the TUN reader has it built in the send batch at the place
//!   of its data message, sealed there while it is in cache, never copied; tun-rs fills an
//!   array of buffers (64 × MTU) that would be walked again and copied to seal.
//! - Coalescing is 2.3× faster here (2.45× after ours also verified checksums, see
//!   below): tun-rs keys a flow table; ours merges neighbours of one flow into one buffer,
//!   as a peer's UDP GRO batch arrives (one sender's TSO burst).
//! - tun-rs's GRO is reachable only through `send_multiple` (its tables are crate-private,
//!   `GROTable::apply_gro` is hidden): every opened packet of a batch would need its own
//!   growable 64 KiB buffer, where ours opens into one slot and needs one 64 KiB buffer.
//!
//! Both coalesce UDP too (`TUN_F_USO4/6`, kernel ≥ 6.2): flannel's VXLAN mode sends
//! nearly everything as UDP to port 8472. Both check every packet's checksums before
//! merging (ours since issue 16: a merged run is re-checksummed, so a bad segment merged
//! into it would reach TCP as good data); the same run measured coalescing at 12.5 µs
//! against tun-rs's 30.7 µs with the check (docs/benchmarks.md).

pub mod checksum;
pub mod gro;
pub mod gso;
pub mod virtio;

pub use virtio::{Encap, VirtioHdr, VIRTIO_HDR_LEN, VIRTIO_TUNNEL_HDR_LEN};

pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;

/// Header sizes of what flannel's VXLAN wraps around a pod's packet (also for
/// [`crate::mss`]).
pub(crate) const UDP_HLEN: usize = 8;
pub(crate) const VXLAN_HLEN: usize = 8;
pub(crate) const ETH_HLEN: usize = 14;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Offset of the TCP flags byte, and of the checksum, in a TCP header.
pub(crate) const TCP_FLAGS: usize = 13;
pub(crate) const TCP_CSUM: usize = 16;
/// Offset of the checksum in a UDP header.
pub(crate) const UDP_CSUM: usize = 6;

/// The big-endian 16-bit word at `at` (also for [`crate::mss`]).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Source and destination address bytes of an IPv4 or IPv6 header, for the pseudo-header.
fn ip_addrs(packet: &[u8], v6: bool) -> (&[u8], &[u8]) {
    if v6 {
        (&packet[8..24], &packet[24..40])
    } else {
        (&packet[12..16], &packet[16..20])
    }
}
