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
//!   super-segment before it is written to the TUN.
//!
//! Everything here works on byte slices so it is table-tested without a device.

pub mod checksum;
pub mod gro;
pub mod gso;
pub mod virtio;

pub use virtio::{VirtioHdr, VIRTIO_HDR_LEN};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Offset of the TCP flags byte, and of the checksum, in a TCP header.
const TCP_FLAGS: usize = 13;
const TCP_CSUM: usize = 16;
/// Offset of the checksum in a UDP header.
const UDP_CSUM: usize = 6;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
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
