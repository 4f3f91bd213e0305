//! The VXLAN source rewrite (`SourceRewrite::apply`) on any bytes: it must never panic,
//! must only touch the source address and the two checksums, and must keep a valid IPv4
//! header checksum (and a valid UDP checksum over a whole, unfragmented datagram) valid.
//! Input: mesh pool address (4) and prefix length (1), the new source (4), the packet.
#![no_main]

use std::net::Ipv4Addr;

use ip_network::Ipv4Network;
use isthmus_wg::offload::checksum::{finish, pseudo_header, sum};
use isthmus_wg::snat::SourceRewrite;
use libfuzzer_sys::fuzz_target;

fn ip_ok(p: &[u8], ihl: usize) -> bool {
    finish(sum(&p[..ihl], 0)) == 0
}

/// Whether `p` holds exactly one whole, unfragmented UDP datagram with a checksum that
/// verifies (checksum 0, "none", does not count).
fn udp_ok(p: &[u8], ihl: usize) -> bool {
    let whole = usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len()
        && u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0
        && p.len() >= ihl + 8
        && usize::from(u16::from_be_bytes([p[ihl + 4], p[ihl + 5]])) == p.len() - ihl
        && u16::from_be_bytes([p[ihl + 6], p[ihl + 7]]) != 0;
    whole
        && finish(pseudo_header(&p[12..16], &p[16..20], 17, p.len() - ihl) + sum(&p[ihl..], 0)) == 0
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let pool = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
    let Ok(mesh) = Ipv4Network::new_truncate(pool, data[4] % 33) else {
        return;
    };
    let to = Ipv4Addr::new(data[5], data[6], data[7], data[8]);
    let rewrite = SourceRewrite { mesh, to };
    let before = data[9..].to_vec();
    let mut packet = before.clone();
    if !rewrite.apply(&mut packet) {
        assert_eq!(packet, before, "a packet left alone was changed");
        return;
    }
    assert_eq!(packet.len(), before.len());
    assert_eq!(&packet[12..16], &to.octets());
    let ihl = usize::from(before[0] & 0x0f) * 4;
    let udp_check = ihl + 6..ihl + 8;
    for (i, (x, y)) in packet.iter().zip(&before).enumerate() {
        if x != y {
            assert!(
                (10..16).contains(&i) || udp_check.contains(&i),
                "byte {i} changed"
            );
        }
    }
    if ip_ok(&before, ihl) {
        assert!(ip_ok(&packet, ihl), "IPv4 header checksum broken");
    }
    if udp_ok(&before, ihl) {
        assert!(udp_ok(&packet, ihl), "UDP checksum broken");
    }
});
