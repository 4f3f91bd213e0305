//! Source rewrite for VXLAN that enters the tunnel.
//!
//! flannel's VXLAN device sends from a fixed `local` address: the node's underlay IP. Once
//! its FDB points a remote VTEP at that node's mesh IP, the encapsulated packets reach the
//! TUN with the underlay IP as source. Across clouds that address is meaningless (node IPs
//! overlap; the receiver may even own the same address and drop it as a martian), and the
//! receiving agent only accepts the sender's mesh IP. So the engine rewrites the source of
//! UDP packets bound for a mesh IP to this node's mesh IP, fixing the checksums in place.
//! VXLAN is stateless in both directions, so no connection tracking is needed; other
//! traffic to mesh IPs already leaves with the mesh IP as source and is left alone.

use std::net::Ipv4Addr;

use ip_network::Ipv4Network;

const UDP: u8 = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceRewrite {
    /// The mesh pool: packets to these addresses are candidates.
    pub mesh: Ipv4Network,
    /// This node's mesh IP, the new source.
    pub to: Ipv4Addr,
}

impl SourceRewrite {
    /// Rewrites `packet` (an IP packet as read from the TUN) in place when it is IPv4 UDP to
    /// a mesh IP from another source; says whether it did. Fragments are rewritten too (each
    /// carries the IP header); only a first fragment carries the UDP checksum.
    pub fn apply(&self, packet: &mut [u8]) -> bool {
        if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != UDP {
            return false;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl {
            return false;
        }
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let old = [packet[12], packet[13], packet[14], packet[15]];
        let new = self.to.octets();
        if !self.mesh.contains(dst) || old == new {
            return false;
        }
        let ip_check = u16::from_be_bytes([packet[10], packet[11]]);
        packet[10..12].copy_from_slice(&adjust(ip_check, &old, &new).to_be_bytes());
        let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
        if fragment_offset == 0 && packet.len() >= ihl + 8 {
            let at = ihl + 6;
            let udp_check = u16::from_be_bytes([packet[at], packet[at + 1]]);
            // Zero means "no checksum" (what Linux VXLAN sends by default): keep it so.
            if udp_check != 0 {
                let c = match adjust(udp_check, &old, &new) {
                    0 => 0xffff,
                    c => c,
                };
                packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
        }
        packet[12..16].copy_from_slice(&new);
        true
    }
}

/// Incremental checksum update (RFC 1624, eqn. 3): `HC' = ~(~HC + ~m + m')` over the
/// 16-bit words of the replaced field.
fn adjust(check: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    let mut sum = u32::from(!check);
    for i in [0, 2] {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::checksum::{finish, sum};
    use crate::packet::{assert_valid, Udp};

    fn rewrite() -> SourceRewrite {
        SourceRewrite {
            mesh: Ipv4Network::new(Ipv4Addr::new(100, 96, 0, 0), 16).unwrap(),
            to: Ipv4Addr::new(100, 96, 0, 7),
        }
    }

    /// A VXLAN datagram (Linux's source port, flannel's destination port), valid checksums;
    /// the UDP checksum only with `checksum`, as the kernel's VXLAN sends it by default.
    fn udp_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8], checksum: bool) -> Vec<u8> {
        let udp = Udp::v4(src, dst, payload);
        Udp {
            sport: 4789,
            dport: 8472,
            checksum,
            ..udp
        }
        .build()
    }

    #[test]
    fn vxlan_from_the_underlay_ip_leaves_with_the_mesh_ip_and_valid_checksums() {
        for csum in [false, true] {
            let mut p = udp_packet([10, 0, 0, 11], [100, 96, 0, 3], b"vxlan frame", csum);
            assert!(rewrite().apply(&mut p));
            assert_eq!(&p[12..16], &[100, 96, 0, 7]);
            assert_valid(&p);
            if !csum {
                assert_eq!(&p[26..28], &[0, 0], "no checksum stays no checksum");
            }
        }
    }

    #[test]
    fn other_traffic_is_left_alone() {
        let r = rewrite();
        let cases = [
            // Already from our mesh IP.
            udp_packet([100, 96, 0, 7], [100, 96, 0, 3], b"x", true),
            // Not to the mesh (routed mode: pod to pod).
            udp_packet([10, 244, 1, 2], [10, 244, 21, 2], b"x", true),
        ];
        for mut p in cases {
            let before = p.clone();
            assert!(!r.apply(&mut p));
            assert_eq!(p, before);
        }
        let mut tcp = udp_packet([10, 0, 0, 11], [100, 96, 0, 3], b"x", false);
        tcp[9] = 6;
        let before = tcp.clone();
        assert!(!r.apply(&mut tcp), "TCP would need connection tracking");
        assert_eq!(tcp, before);
        for mut short in [vec![0x45u8; 10], vec![0x60u8; 40], vec![]] {
            assert!(!r.apply(&mut short));
        }
    }

    #[test]
    fn later_fragments_get_a_new_source_and_ip_checksum_only() {
        let mut p = udp_packet(
            [10, 0, 0, 11],
            [100, 96, 0, 3],
            b"middle of a datagram",
            false,
        );
        p[6..8].copy_from_slice(&(0x2000u16 | 185).to_be_bytes()); // MF, offset 1480
        let c = finish({
            p[10..12].copy_from_slice(&[0, 0]);
            sum(&p[..20], 0)
        });
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let payload = p[20..].to_vec();
        assert!(rewrite().apply(&mut p));
        assert_valid(&p);
        assert_eq!(
            p[20..],
            payload[..],
            "a later fragment has no UDP header to touch"
        );
    }

    #[test]
    fn incremental_update_matches_a_full_recompute() {
        for (src, dst) in [
            ([10, 0, 0, 11], [100, 96, 0, 3]),
            ([255, 255, 255, 255], [100, 96, 255, 255]),
            ([0, 0, 0, 1], [100, 96, 0, 0]),
        ] {
            for payload in [&b""[..], b"a", b"an odd-length payload!"] {
                let mut p = udp_packet(src, dst, payload, true);
                assert!(rewrite().apply(&mut p));
                let mut want = udp_packet([100, 96, 0, 7], dst, payload, true);
                want[10..12].copy_from_slice(&p[10..12]);
                assert_valid(&p);
                assert_eq!(p, want);
            }
        }
    }
}
