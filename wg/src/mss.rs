//! TCP MSS clamping for connections that cross the tunnel, as pure packet surgery.
//!
//! A TCP endpoint advertises in its SYN (or SYN-ACK) the largest segment it accepts, from
//! its own interface's MTU: a pod on a 1450-byte flannel device says 1410. When the path to
//! the other cloud carries less (the tunnel's MTU, or less again where the path between the
//! clouds drops larger packets without a word), every full-size segment the other side
//! sends is too big: it is dropped, or it costs an ICMP round trip before the sender learns.
//! Lowering the advertised MSS to what the peer's path carries makes both ends send segments
//! that fit from the first byte — what `iptables -j TCPMSS --clamp-mss-to-pmtu` does on a
//! router, done here because every packet toward a peer passes the engine, in both routing
//! modes (plain IP, or flannel's VXLAN with the TCP segment inside), for pod and host traffic
//! alike, and it leaves no kernel state behind when the agent goes.
//!
//! Only SYNs are touched, the MSS is only ever lowered, and the checksums covering it are
//! updated incrementally (RFC 1624): the TCP checksum, and the outer UDP checksum of a VXLAN
//! packet when it has one. Fragments, IPv6 extension headers and packets that do not parse
//! are left as they are.

/// UDP destination ports that carry VXLAN: Linux's (and flannel's) default and IANA's.
pub const VXLAN_PORTS: [u16; 2] = [8472, 4789];

/// The least MSS clamping sets (RFC 9293's default for IPv4), so a nonsense path MTU cannot
/// shrink segments to nothing.
pub const MIN_MSS: u16 = 536;

use crate::offload::{
    be16, put16, ETH_HLEN, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP, TCP_CSUM, TCP_FLAGS, UDP_CSUM,
    UDP_HLEN, VXLAN_HLEN,
};

const TCP_SYN: u8 = 0x02;
const TCP_HEADER: usize = 20;
const MSS_OPTION: u8 = 2;

/// Where a SYN's MSS value sits and which checksums cover it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Site {
    /// Offset of the TCP header in the packet (inside VXLAN, counted from the outer header):
    /// the packet's bytes up to it plus a bare TCP header are what the path must carry
    /// besides the segment.
    tcp: usize,
    /// Offset of the MSS option's 16-bit value.
    value: usize,
    /// Offset of the outer UDP header when the segment travels in VXLAN.
    udp: Option<usize>,
}

impl Site {
    /// The largest MSS a path of `path_mtu` bytes (the tunnel's inner MTU toward the peer)
    /// carries for this packet's headers.
    fn limit(&self, path_mtu: u16) -> u16 {
        let overhead = u16::try_from(self.tcp + TCP_HEADER).unwrap_or(u16::MAX);
        path_mtu.saturating_sub(overhead).max(MIN_MSS)
    }
}

/// Whether [`clamp`] would lower the MSS of `packet` for `path_mtu` — a read-only check,
/// so the caller copies a packet it does not own only when it must.
pub fn needs_clamp(packet: &[u8], path_mtu: u16) -> bool {
    locate(packet).is_some_and(|site| be16(packet, site.value) > site.limit(path_mtu))
}

/// Lowers the MSS option of a TCP SYN in `packet` (IPv4 or IPv6, bare or inside VXLAN) to
/// what a path of `path_mtu` bytes carries, fixing the checksums; returns the MSS before
/// and after when it changed it.
pub fn clamp(packet: &mut [u8], path_mtu: u16) -> Option<(u16, u16)> {
    let site = locate(packet)?;
    let old = be16(packet, site.value);
    let new = site.limit(path_mtu);
    if old <= new {
        return None;
    }
    let tcp_check_at = site.tcp + TCP_CSUM;
    let old_check = be16(packet, tcp_check_at);
    let new_check = adjust(old_check, (site.value - site.tcp) % 2 == 1, old, new);
    put16(packet, site.value, new);
    put16(packet, tcp_check_at, new_check);
    if let Some(udp) = site.udp {
        let udp_check_at = udp + UDP_CSUM;
        let check = be16(packet, udp_check_at);
        // Zero means the sender sent no UDP checksum (Linux VXLAN's default): keep it so.
        if check != 0 {
            let check = adjust(check, (site.value - udp) % 2 == 1, old, new);
            let check = adjust(check, (tcp_check_at - udp) % 2 == 1, old_check, new_check);
            put16(
                packet,
                udp_check_at,
                if check == 0 { 0xffff } else { check },
            );
        }
    }
    Some((old, new))
}

/// The MSS option of a TCP SYN in `packet`, bare or one VXLAN level down.
fn locate(packet: &[u8]) -> Option<Site> {
    let (proto, l4, end) = transport(packet, 0)?;
    // What follows the IP packet's own length (padding, junk) is not the packet's.
    let packet = &packet[..end];
    match proto {
        TCP => syn_mss(packet, l4).map(|value| Site {
            tcp: l4,
            value,
            udp: None,
        }),
        UDP => {
            let ports_ok = packet.len() >= l4 + UDP_HLEN
                && VXLAN_PORTS.contains(&be16(packet, l4 + 2))
                && packet.len() >= l4 + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
            if !ports_ok {
                return None;
            }
            let eth = l4 + UDP_HLEN + VXLAN_HLEN;
            let inner = eth + ETH_HLEN;
            let ip_version = match be16(packet, eth + 12) {
                0x0800 => 4,
                0x86dd => 6,
                _ => return None,
            };
            let (proto, tcp, inner_end) = transport(packet, inner)?;
            if proto != TCP || packet[inner] >> 4 != ip_version {
                return None;
            }
            syn_mss(&packet[..inner_end], tcp).map(|value| Site {
                tcp,
                value,
                udp: Some(l4),
            })
        }
        _ => None,
    }
}

/// The transport protocol, the transport header's offset and the end of the IP packet at
/// `at` (by its own length field), when it is whole — not a fragment, not cut short — and
/// its transport header follows the IP header directly.
fn transport(packet: &[u8], at: usize) -> Option<(u8, usize, usize)> {
    let ip = packet.get(at..)?;
    let (proto, header, total) = match ip.first()? >> 4 {
        4 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let more_fragments = ip[6] & 0x20 != 0;
            let offset = be16(ip, 6) & 0x1fff;
            if ihl < 20 || more_fragments || offset != 0 {
                return None;
            }
            (ip[9], ihl, usize::from(be16(ip, 2)))
        }
        6 if ip.len() >= 40 => (ip[6], 40, 40 + usize::from(be16(ip, 4))),
        _ => return None,
    };
    (header <= total && total <= ip.len()).then_some((proto, at + header, at + total))
}

/// The offset of the MSS value when the TCP header at `tcp` is a SYN that carries one.
fn syn_mss(packet: &[u8], tcp: usize) -> Option<usize> {
    let header = packet.get(tcp..tcp + TCP_HEADER)?;
    if header[TCP_FLAGS] & TCP_SYN == 0 {
        return None;
    }
    let end = tcp + usize::from(header[12] >> 4) * 4;
    if end < tcp + TCP_HEADER || end > packet.len() {
        return None;
    }
    let mut at = tcp + TCP_HEADER;
    while at < end {
        match packet[at] {
            0 => return None,
            1 => at += 1,
            kind => {
                let len = usize::from(*packet.get(at + 1)?);
                if len < 2 || at + len > end {
                    return None;
                }
                if kind == MSS_OPTION {
                    return (len == 4).then_some(at + 2);
                }
                at += len;
            }
        }
    }
    None
}

/// Incremental checksum update (RFC 1624, eqn. 3) for a 16-bit field changing from `old` to
/// `new`. A field at an odd offset from where the checksum's coverage starts straddles two
/// 16-bit words, which adds its bytes swapped.
fn adjust(check: u16, odd: bool, old: u16, new: u16) -> u16 {
    let (old, new) = if odd {
        (old.swap_bytes(), new.swap_bytes())
    } else {
        (old, new)
    };
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::checksum;
    use crate::packet::{assert_valid, Tcp, Udp};

    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;

    /// A TCP segment with `flags` and `options` and valid checksums.
    fn segment(v6: bool, flags: u8, options: &[u8]) -> Vec<u8> {
        let mut t = Tcp::new(v6, 1, 0);
        t.flags = flags;
        t.options = options.to_vec();
        t.build()
    }

    /// `inner` wrapped in Ethernet, VXLAN, UDP to `port` and IPv4 or IPv6.
    fn vxlan(outer_v6: bool, inner: &[u8], udp_checksum: bool, port: u16) -> Vec<u8> {
        let mut frame = vec![0u8; VXLAN_HLEN + ETH_HLEN];
        frame[0] = 0x08;
        let ethertype: u16 = if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
        put16(&mut frame, VXLAN_HLEN + 12, ethertype);
        frame.extend_from_slice(inner);
        let mut udp = Udp::new(outer_v6, 0);
        udp.dport = port;
        udp.payload = frame;
        udp.checksum = udp_checksum;
        udp.build()
    }

    fn mss(value: u16) -> Vec<u8> {
        let [hi, lo] = value.to_be_bytes();
        vec![MSS_OPTION, 4, hi, lo]
    }

    #[test]
    fn bare_syns_are_clamped_to_the_path_and_keep_a_valid_checksum() {
        let nop_nop_mss_ts = [&[1u8, 1][..], &mss(1460), &[8, 10, 0, 0, 0, 1, 0, 0, 0, 0]].concat();
        let odd_offset = [&[1u8][..], &mss(1460), &[1, 1, 1]].concat();
        // (IPv6, flags, options, path MTU, expected (before, after))
        type Case = (bool, u8, Vec<u8>, u16, Option<(u16, u16)>);
        let cases: Vec<Case> = vec![
            (false, TCP_SYN, mss(1460), 1420, Some((1460, 1380))),
            (false, SYN_ACK, mss(1460), 1300, Some((1460, 1260))),
            (true, TCP_SYN, mss(1440), 1420, Some((1440, 1360))),
            (true, SYN_ACK, mss(1440), 1232, Some((1440, 1172))),
            (false, TCP_SYN, nop_nop_mss_ts, 1420, Some((1460, 1380))),
            (false, TCP_SYN, odd_offset, 1300, Some((1460, 1260))),
            // Already small enough: untouched.
            (false, TCP_SYN, mss(1200), 1420, None),
            (false, TCP_SYN, mss(1380), 1420, None),
            // Not a SYN, or no MSS option: untouched.
            (false, ACK, mss(1460), 1300, None),
            (false, TCP_SYN, vec![1, 1, 1, 1], 1300, None),
            // A nonsense path never takes the MSS below the floor.
            (false, TCP_SYN, mss(1460), 100, Some((1460, MIN_MSS))),
        ];
        for (v6, flags, options, path_mtu, want) in cases {
            let mut p = segment(v6, flags, &options);
            let before = p.clone();
            let case = format!("v6 {v6} flags {flags:#x} options {options:?} path {path_mtu}");
            assert_eq!(needs_clamp(&p, path_mtu), want.is_some(), "{case}");
            assert_eq!(clamp(&mut p, path_mtu), want, "{case}");
            if want.is_some() {
                assert_valid(&p);
                let changed = (0..p.len()).filter(|&i| p[i] != before[i]).count();
                assert!(changed <= 4, "only the MSS and the checksum change: {case}");
            } else {
                assert_eq!(p, before, "{case}");
            }
        }
    }

    #[test]
    fn syns_inside_vxlan_are_clamped_with_both_checksums_right() {
        for (outer_v6, inner_v6, udp_checksum, port) in [
            (false, false, false, 8472),
            (false, false, true, 8472),
            (false, true, true, 4789),
            (true, false, true, 8472),
            (true, true, true, 8472),
        ] {
            let case = format!("outer v6 {outer_v6}, inner v6 {inner_v6}, UDP sum {udp_checksum}");
            let inner = segment(inner_v6, TCP_SYN, &mss(1410));
            let mut p = vxlan(outer_v6, &inner, udp_checksum, port);
            let inner_at = if outer_v6 { 40 } else { 20 } + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
            let tcp = inner_at + if inner_v6 { 40 } else { 20 };
            // The path's 1300 bytes carry outer IP, UDP, VXLAN, Ethernet, inner IP, TCP, MSS.
            let want = 1300 - (tcp + TCP_HEADER) as u16;
            assert_eq!(clamp(&mut p, 1300), Some((1410, want)), "{case}");
            assert_valid(&p[inner_at..]);
            // The outer UDP checksum, when there is one, covers the changed inner bytes too.
            assert_valid(&p);
            let udp_sum_at = if outer_v6 { 46 } else { 26 };
            assert_eq!(
                be16(&p, udp_sum_at) != 0,
                udp_checksum || outer_v6,
                "{case}"
            );
        }
    }

    #[test]
    fn what_is_not_a_whole_syn_is_left_alone() {
        let syn = segment(false, TCP_SYN, &mss(1460));
        let mut fragment = syn.clone();
        fragment[6] |= 0x20; // more fragments
        let mut bad_option_len = syn.clone();
        bad_option_len[41] = 0;
        let mut not_ip = syn.clone();
        not_ip[0] = 0x15;
        let mut short_vxlan = Udp::new(false, 4);
        short_vxlan.dport = 8472;
        // The IP header's length ends the packet before the MSS option; what follows is
        // padding or junk, even though it reads as a TCP option.
        let mut options_past_the_ip_length = syn.clone();
        put16(&mut options_past_the_ip_length, 2, 40);
        let mut longer_than_the_buffer = syn.clone();
        put16(&mut longer_than_the_buffer, 2, syn.len() as u16 + 4);
        for (name, mut p) in [
            ("fragment", fragment),
            ("options past the IP length", options_past_the_ip_length),
            ("IP length past the buffer", longer_than_the_buffer),
            ("UDP to another port", vxlan(false, &syn, false, 9999)),
            ("options cut short", syn[..syn.len() - 2].to_vec()),
            ("option length 0", bad_option_len),
            ("not IP", not_ip),
            ("VXLAN too short", short_vxlan.build()),
            ("empty", vec![]),
        ] {
            let before = p.clone();
            assert!(!needs_clamp(&p, 1200), "{name}");
            assert_eq!(clamp(&mut p, 1200), None, "{name}");
            assert_eq!(p, before, "{name}");
        }
    }

    #[test]
    fn bytes_after_the_ip_packet_neither_hide_nor_move_the_option() {
        let syn = segment(false, TCP_SYN, &mss(1460));
        let mut padded = [&syn[..], &[0u8; 12]].concat();
        assert_eq!(clamp(&mut padded, 1420), Some((1460, 1380)));
        assert_valid(&padded[..syn.len()]);
        assert_eq!(
            &padded[syn.len()..],
            &[0u8; 12],
            "the padding is not touched"
        );
    }

    #[test]
    fn incremental_update_matches_a_full_recompute_at_either_parity() {
        let mut data = vec![0x12u8, 0x34, 0xab, 0xcd, 0xff, 0x00, 0x0f, 0xf0, 0x55];
        for at in 0..data.len() - 1 {
            let check = checksum::finish(checksum::sum(&data, 0));
            let old = be16(&data, at);
            let new = old.wrapping_add(0x1357);
            put16(&mut data, at, new);
            let full = checksum::finish(checksum::sum(&data, 0));
            assert_eq!(adjust(check, at % 2 == 1, old, new), full, "at {at}");
        }
    }
}
