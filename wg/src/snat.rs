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
//!
//! Both families: flannel's IPv4 device (`flannel.1`) and, in dual stack, its IPv6 one
//! (`flannel-v6.1`, `local` the node's IPv6 underlay address) each get the rewrite of their
//! family once this node has a mesh IP of that family. IPv6 has no header checksum; the UDP
//! checksum covers a pseudo-header with both 16-byte addresses and is adjusted over them.

use std::net::{Ipv4Addr, Ipv6Addr};

use ip_network::{Ipv4Network, Ipv6Network};

const UDP: u8 = 17;
/// IPv6's fragment header (RFC 8200 section 4.5), 8 bytes.
const FRAGMENT: u8 = 44;

/// The rewrite per family: a family without one (no mesh IP of that family) is left alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRewrite {
    pub v4: Option<Rewrite4>,
    pub v6: Option<Rewrite6>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite4 {
    /// The mesh pool: packets to these addresses are candidates.
    pub mesh: Ipv4Network,
    /// This node's mesh IP, the new source.
    pub to: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite6 {
    /// The IPv6 mesh pool: packets to these addresses are candidates.
    pub mesh: Ipv6Network,
    /// This node's IPv6 mesh IP, the new source.
    pub to: Ipv6Addr,
}

impl SourceRewrite {
    /// Rewrites `packet` (an IP packet as read from the TUN) in place when it is UDP to a
    /// mesh IP of a family that has a rewrite, from another source; says whether it did.
    pub fn apply(&self, packet: &mut [u8]) -> bool {
        match packet.first().map(|b| b >> 4) {
            Some(4) => self.v4.is_some_and(|r| r.apply(packet)),
            Some(6) => self.v6.is_some_and(|r| r.apply(packet)),
            _ => false,
        }
    }

    /// Whether no family is rewritten (the engine then skips the call).
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

impl Rewrite4 {
    /// IPv4 UDP to a mesh IP. Fragments are rewritten too (each carries the IP header);
    /// only a first fragment carries the UDP checksum.
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
            adjust_udp(packet, ihl + 6, &old, &new);
        }
        packet[12..16].copy_from_slice(&new);
        true
    }
}

impl Rewrite6 {
    /// IPv6 UDP to a mesh IP: the UDP header right after the fixed header, or after a
    /// fragment header whose next header is UDP. Every fragment of a datagram is rewritten
    /// (each carries the addresses, and the receiver reassembles by source, destination and
    /// identification, so all or none must change); only the first (offset 0) carries the
    /// UDP checksum. Any other extension header (hop-by-hop, routing, destination options)
    /// leaves the packet alone: flannel sends none, and a routing header would change the
    /// destination the checksum covers.
    pub fn apply(&self, packet: &mut [u8]) -> bool {
        if packet.len() < 40 || packet[0] >> 4 != 6 {
            return false;
        }
        let first_fragment = match packet[6] {
            UDP => true,
            FRAGMENT if packet.len() >= 48 && packet[40] == UDP => {
                u16::from_be_bytes([packet[42], packet[43]]) >> 3 == 0
            }
            _ => return false,
        };
        let l4 = if packet[6] == UDP { 40 } else { 48 };
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&packet[24..40]);
        let mut old = [0u8; 16];
        old.copy_from_slice(&packet[8..24]);
        let new = self.to.octets();
        if !self.mesh.contains(Ipv6Addr::from(dst)) || old == new {
            return false;
        }
        if first_fragment && packet.len() >= l4 + 8 {
            adjust_udp(packet, l4 + 6, &old, &new);
        }
        packet[8..24].copy_from_slice(&new);
        true
    }
}

/// Adjusts the UDP checksum at `at` for the source address `old` becoming `new`. A zero
/// checksum means "none" and stays zero, as Linux's NAT does (`udp_manip_pkt` only updates
/// a non-zero one): over IPv4 it is what the kernel's VXLAN sends by default; over IPv6 a
/// sender only omits it (`udp6zerocsumtx`) for receivers set to accept that
/// (`udp6zerocsumrx`), which they still do after the rewrite. A result of zero is sent as
/// its one's-complement twin, 0xffff, since zero would mean "none".
fn adjust_udp(packet: &mut [u8], at: usize, old: &[u8], new: &[u8]) {
    let udp_check = u16::from_be_bytes([packet[at], packet[at + 1]]);
    if udp_check != 0 {
        let c = match adjust(udp_check, old, new) {
            0 => 0xffff,
            c => c,
        };
        packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// Incremental checksum update (RFC 1624, eqn. 3): `HC' = ~(~HC + ~m + m')` over the
/// 16-bit words of the replaced field (`old` and `new` of the same, even length).
fn adjust(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!check);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::offload::checksum::{finish, pseudo_header, sum};
    use crate::packet::{assert_valid, Udp};

    fn rewrite() -> SourceRewrite {
        SourceRewrite {
            v4: Some(Rewrite4 {
                mesh: Ipv4Network::new(Ipv4Addr::new(100, 96, 0, 0), 16).unwrap(),
                to: Ipv4Addr::new(100, 96, 0, 7),
            }),
            v6: Some(Rewrite6 {
                mesh: "fd96::/64".parse().unwrap(),
                to: MESH6,
            }),
        }
    }

    const MESH6: Ipv6Addr = Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 7);
    const UNDERLAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);
    const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, 3);
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

    /// An IPv6 VXLAN datagram, valid checksum (mandatory over IPv6).
    fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        Udp {
            src: IpAddr::V6(src),
            dst: IpAddr::V6(dst),
            sport: 4789,
            dport: 8472,
            payload: payload.to_vec(),
            checksum: true,
            ip_id: 0,
            df: false,
        }
        .build()
    }

    /// The UDP checksum of `datagram` (UDP header and payload) between `src` and `dst`,
    /// recomputed from scratch: zero when the one in it is right.
    fn udp6_residue(src: &[u8], dst: &[u8], datagram: &[u8]) -> u16 {
        finish(pseudo_header(src, dst, UDP, datagram.len()) + sum(datagram, 0))
    }

    #[test]
    fn ipv6_vxlan_from_the_underlay_ip_leaves_with_the_mesh_ip_and_a_valid_checksum() {
        // (source, destination, payload): odd and even lengths, extreme address words.
        let ones = Ipv6Addr::from([0xff; 16]);
        let cases = [
            (UNDERLAY6, REMOTE6, &b"vxlan frame"[..]),
            (UNDERLAY6, REMOTE6, b""),
            (ones, "fd96::ffff:ffff:ffff:ffff".parse().unwrap(), b"odd!!"),
            (Ipv6Addr::UNSPECIFIED, "fd96::".parse().unwrap(), b"x"),
            (
                "fe80::1".parse().unwrap(),
                REMOTE6,
                b"an odd-length payload!",
            ),
        ];
        for (src, dst, payload) in cases {
            let mut p = udp6(src, dst, payload);
            assert!(rewrite().apply(&mut p), "{src} -> {dst}");
            assert_eq!(&p[8..24], &MESH6.octets());
            assert_valid(&p);
            // Bit for bit what a sender with the mesh IP would have built.
            assert_eq!(p, udp6(MESH6, dst, payload), "{src} -> {dst}");
        }
    }

    #[test]
    fn ipv6_zero_checksum_stays_zero_as_linux_nat_keeps_it() {
        let mut p = udp6(UNDERLAY6, REMOTE6, b"udp6zerocsumtx");
        p[46..48].copy_from_slice(&[0, 0]);
        assert!(rewrite().apply(&mut p));
        assert_eq!(&p[8..24], &MESH6.octets());
        assert_eq!(&p[46..48], &[0, 0], "no checksum stays no checksum");
    }

    #[test]
    fn ipv6_other_traffic_is_left_alone() {
        let r = rewrite();
        let mut tcp = udp6(UNDERLAY6, REMOTE6, b"x");
        tcp[6] = 6;
        // A hop-by-hop header (next header 0) before the UDP header: not walked.
        let mut hop_by_hop = udp6(UNDERLAY6, REMOTE6, b"x");
        hop_by_hop[6] = 0;
        // A fragment header whose fragmentable part is not UDP.
        let mut fragment_of_tcp = fragments(UNDERLAY6, REMOTE6, b"0123456789abcdef", 8)[0].clone();
        fragment_of_tcp[40] = 6;
        let cases = [
            ("already from our mesh IP", udp6(MESH6, REMOTE6, b"x")),
            (
                "not to the mesh",
                udp6(UNDERLAY6, "fd00:244:2::5".parse().unwrap(), b"x"),
            ),
            ("TCP needs connection tracking", tcp),
            ("hop-by-hop", hop_by_hop),
            ("fragment of TCP", fragment_of_tcp),
            ("truncated", udp6(UNDERLAY6, REMOTE6, b"")[..39].to_vec()),
            (
                "fragment header cut short",
                fragments(UNDERLAY6, REMOTE6, b"0123456789abcdef", 8)[0][..47].to_vec(),
            ),
        ];
        for (case, mut p) in cases {
            let before = p.clone();
            assert!(!r.apply(&mut p), "{case}");
            assert_eq!(p, before, "{case}");
        }
    }

    #[test]
    fn each_family_only_with_its_own_rewrite() {
        let only_v4 = SourceRewrite {
            v6: None,
            ..rewrite()
        };
        let only_v6 = SourceRewrite {
            v4: None,
            ..rewrite()
        };
        let mut v6 = udp6(UNDERLAY6, REMOTE6, b"x");
        assert!(!only_v4.apply(&mut v6));
        assert!(only_v6.apply(&mut v6));
        let mut v4 = udp_packet([10, 0, 0, 11], [100, 96, 0, 3], b"x", true);
        assert!(!only_v6.apply(&mut v4));
        assert!(only_v4.apply(&mut v4));
        assert!(SourceRewrite::default().is_empty());
        assert!(!SourceRewrite::default().apply(&mut v4));
    }

    /// `datagram`'s UDP datagram (header and payload) cut into fragments of `chunk` bytes
    /// (a multiple of 8), each an IPv6 header, a fragment header and its piece.
    fn fragments(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let whole = udp6(src, dst, payload);
        let datagram = &whole[40..];
        let pieces: Vec<&[u8]> = datagram.chunks(chunk).collect();
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let mut p = whole[..40].to_vec();
                p[4..6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
                p[6] = FRAGMENT;
                let more = u16::from(i + 1 < pieces.len());
                let offset = ((i * chunk / 8) as u16) << 3 | more;
                p.extend_from_slice(&[UDP, 0]);
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                p.extend_from_slice(piece);
                p
            })
            .collect()
    }

    #[test]
    fn ipv6_fragments_all_get_the_new_source_and_the_first_the_checksum() {
        let payload = b"a VXLAN frame larger than the path, fragmented at its source";
        let mut frags = fragments(UNDERLAY6, REMOTE6, payload, 16);
        assert!(frags.len() > 2);
        let later_before: Vec<Vec<u8>> = frags[1..].iter().map(|f| f[48..].to_vec()).collect();
        for f in &mut frags {
            assert!(rewrite().apply(f));
            assert_eq!(&f[8..24], &MESH6.octets());
        }
        for (f, before) in frags[1..].iter().zip(&later_before) {
            assert_eq!(&f[48..], &before[..], "a later fragment has no UDP header");
        }
        // Reassembled, the datagram's checksum verifies with the new source.
        let datagram: Vec<u8> = frags.iter().flat_map(|f| f[48..].to_vec()).collect();
        assert_eq!(
            udp6_residue(&MESH6.octets(), &REMOTE6.octets(), &datagram),
            0
        );
        assert_ne!(
            udp6_residue(&UNDERLAY6.octets(), &REMOTE6.octets(), &datagram),
            0,
            "the check can fail"
        );
    }
}
