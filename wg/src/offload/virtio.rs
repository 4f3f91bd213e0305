//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) that precedes every packet on
//! a TUN device opened with `IFF_VNET_HDR`. The legacy header TUN uses is in host byte
//! order.

/// Size of the header in front of every packet read from or written to the TUN.
pub const VIRTIO_HDR_LEN: usize = 10;

/// Size of the header once the TUN also offloads UDP tunnels (`TUNSETVNETHDRSZ`, the layout
/// of `struct virtio_net_hdr_v1_hash_tunnel`): the 10 bytes above, `num_buffers` (2), the
/// hash fields (8), then where the outer transport and the inner network header start.
pub const VIRTIO_TUNNEL_HDR_LEN: usize = 24;

/// `flags`: the checksum at `csum_start + csum_offset` holds only the pseudo-header sum and
/// must be completed over `csum_start..` (the kernel's CHECKSUM_PARTIAL).
pub const F_NEEDS_CSUM: u8 = 1;

/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// Set on top of a TCP type when the segments carry ECN (CWR only on the first).
pub const GSO_ECN: u8 = 0x80;
/// Set on top of the inner type when the super-packet is encapsulated in UDP (VXLAN,
/// Geneve) over IPv4 or IPv6 (`VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4/6`, kernel ≥ 6.17).
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;

/// `flags`: an encapsulated super-packet's outer UDP checksum is wanted on every segment
/// (the tunnel device checksums its UDP; without it the outer checksum is zero).
pub const F_UDP_TUNNEL_CSUM: u8 = 8;

/// The tunnel fields of a [`VIRTIO_TUNNEL_HDR_LEN`]-byte header: where the outer UDP
/// header and the inner IP header of an encapsulated super-packet start, counted from the
/// packet's first byte. Little-endian, as the kernel always writes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encap {
    pub outer_th: u16,
    pub inner_nh: u16,
}

impl Encap {
    /// The tunnel fields of a header of [`VIRTIO_TUNNEL_HDR_LEN`] bytes at the start of `b`.
    pub fn decode(b: &[u8]) -> Option<Encap> {
        let b = b.get(..VIRTIO_TUNNEL_HDR_LEN)?;
        Some(Encap {
            outer_th: u16::from_le_bytes([b[20], b[21]]),
            inner_nh: u16::from_le_bytes([b[22], b[23]]),
        })
    }

    /// Writes the tunnel fields into a header of [`VIRTIO_TUNNEL_HDR_LEN`] bytes at the
    /// start of `b` (the fields before them are left as they are).
    pub fn encode(&self, b: &mut [u8]) {
        b[20..22].copy_from_slice(&self.outer_th.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh.to_le_bytes());
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (IP + transport) in front of the payload.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the transport header starts (the IP header length on a TUN).
    pub csum_start: u16,
    /// Offset of the checksum field within the transport header.
    pub csum_offset: u16,
}

impl VirtioHdr {
    /// The header of a plain packet whose checksums are complete.
    pub const NONE: VirtioHdr = VirtioHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    pub fn decode(b: &[u8]) -> Option<VirtioHdr> {
        let b = b.get(..VIRTIO_HDR_LEN)?;
        let u = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        Some(VirtioHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header into the first [`VIRTIO_HDR_LEN`] bytes of `b`.
    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = VirtioHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1368,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VIRTIO_HDR_LEN];
        h.encode(&mut b);
        assert_eq!(VirtioHdr::decode(&b), Some(h));
        assert_eq!(VirtioHdr::decode(&b[..9]), None);
    }

    #[test]
    fn tunnel_fields_are_the_last_four_bytes_of_the_long_header() {
        // As the probe read it from a VXLAN device over a TUN: outer UDP at 20, inner
        // IPv4 at 20 + 8 (UDP) + 8 (VXLAN) + 14 (Ethernet).
        let mut b = [0u8; VIRTIO_TUNNEL_HDR_LEN];
        b[1] = GSO_UDP_TUNNEL_IPV4 | GSO_UDP_L4;
        b[20..22].copy_from_slice(&20u16.to_le_bytes());
        b[22..24].copy_from_slice(&50u16.to_le_bytes());
        assert_eq!(
            Encap::decode(&b),
            Some(Encap {
                outer_th: 20,
                inner_nh: 50
            })
        );
        assert_eq!(VirtioHdr::decode(&b).map(|h| h.gso_type), Some(0x25));
        assert_eq!(Encap::decode(&b[..23]), None);
    }
}
