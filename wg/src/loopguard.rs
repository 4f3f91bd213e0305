//! A routing loop through the tunnel: when a peer's endpoint lies inside what the tunnel
//! carries (an operator's `wg set … endpoint` into the allowed IPs, or two peers' endpoints
//! in each other's ranges), every datagram the device sends re-enters its own TUN and would
//! be sealed again, bigger each time and then fragmented into more packets — measured here
//! at 500 MB a second from ten pings. The kernel bounds it with its transmit recursion
//! limit; a userspace device sees the datagram come back as an ordinary packet, so it
//! recognises it instead: UDP from the device's own listen port to one of its peers'
//! endpoints is its own datagram, and is never sealed again.
//!
//! Pure: the engine asks with its listen port and its peers' live endpoints.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const UDP: u8 = 17;

/// The UDP source port and destination of `packet` (IPv4, or IPv6 without extension
/// headers), unless it is not UDP or is a fragment past the first (no UDP header).
pub fn udp_flow(packet: &[u8]) -> Option<(u16, SocketAddr)> {
    let (dst, l4) = match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            if packet[9] != UDP || ihl < 20 || offset != 0 {
                return None;
            }
            let d: [u8; 4] = packet[16..20].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(d)), ihl)
        }
        6 if packet.len() >= 40 => {
            if packet[6] != UDP {
                return None;
            }
            let d: [u8; 16] = packet[24..40].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(d)), 40)
        }
        _ => return None,
    };
    let ports = packet.get(l4..l4 + 4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Some((sport, SocketAddr::new(dst, dport)))
}

/// Whether `packet`, read from the TUN, is one of the device's own datagrams coming back:
/// UDP from `listen_port` to one of `endpoints`.
pub fn is_own_datagram(
    packet: &[u8],
    listen_port: u16,
    mut endpoints: impl Iterator<Item = SocketAddr>,
) -> bool {
    listen_port != 0
        && udp_flow(packet)
            .is_some_and(|(sport, dst)| sport == listen_port && endpoints.any(|e| e == dst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{ipv4, Tcp, Udp};

    /// A UDP packet from `sport` to `dport`, and its destination.
    fn udp(v6: bool, sport: u16, dport: u16) -> (Vec<u8>, SocketAddr) {
        let mut u = Udp::new(v6, 8);
        u.sport = sport;
        u.dport = dport;
        (u.build(), SocketAddr::new(u.dst, dport))
    }

    #[test]
    fn own_datagrams_are_recognised_and_nothing_else() {
        let (mut v4, dst4) = udp(false, 51820, 7);
        let (v6, dst6) = udp(true, 51820, 7);
        let other: SocketAddr = "192.0.2.200:51820".parse().unwrap();
        let endpoints = [other, dst4, dst6];
        // (name, packet, listen port, expected)
        let mut later_fragment = v4.clone();
        later_fragment[7] = 1;
        let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
            (
                "IPv4 from our port to a peer's endpoint",
                v4.clone(),
                51820,
                true,
            ),
            (
                "IPv6 from our port to a peer's endpoint",
                v6.clone(),
                51820,
                true,
            ),
            (
                "another source port (a pod's own WireGuard)",
                udp(false, 51821, 7).0,
                51820,
                false,
            ),
            (
                "to a port no peer has",
                udp(false, 51820, 8).0,
                51820,
                false,
            ),
            ("port unknown", v4.clone(), 0, false),
            ("TCP", Tcp::new(false, 1, 0).build(), 51820, false),
            (
                "not UDP",
                ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, 40),
                51820,
                false,
            ),
            ("a later fragment", later_fragment, 51820, false),
            ("truncated", v4[..22].to_vec(), 51820, false),
            ("empty", vec![], 51820, false),
        ];
        for (name, packet, port, want) in cases {
            assert_eq!(
                is_own_datagram(&packet, port, endpoints.iter().copied()),
                want,
                "{name}"
            );
        }
        v4[9] = 6;
        assert_eq!(udp_flow(&v4), None);
    }
}
