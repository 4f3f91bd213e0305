//! The VXLAN source rewrite (`SourceRewrite::apply`) on any bytes, both families: it must
//! never panic, must only touch the source address and the checksums, and must keep a valid
//! IPv4 header checksum (and a valid UDP checksum over a whole, unfragmented datagram, IPv4
//! or IPv6) valid.
//! Input: IPv4 mesh pool address (4) and prefix length (1, 0xff: no IPv4 rewrite), the new
//! IPv4 source (4); IPv6 mesh pool address (16) and prefix length (1, 0xff: no IPv6
//! rewrite), the new IPv6 source (16); the packet.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use ip_network::{Ipv4Network, Ipv6Network};
use isthmus_wg::offload::checksum::{finish, pseudo_header, sum};
use isthmus_wg::snat::{Rewrite4, Rewrite6, SourceRewrite};
use libfuzzer_sys::fuzz_target;

const CONFIG: usize = 42;

fn ip_ok(p: &[u8], ihl: usize) -> bool {
    finish(sum(&p[..ihl], 0)) == 0
}

/// Whether `p` holds exactly one whole, unfragmented IPv4 UDP datagram with a checksum
/// that verifies (checksum 0, "none", does not count).
fn udp4_ok(p: &[u8], ihl: usize) -> bool {
    let whole = usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len()
        && u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0
        && p.len() >= ihl + 8
        && usize::from(u16::from_be_bytes([p[ihl + 4], p[ihl + 5]])) == p.len() - ihl
        && u16::from_be_bytes([p[ihl + 6], p[ihl + 7]]) != 0;
    whole
        && finish(pseudo_header(&p[12..16], &p[16..20], 17, p.len() - ihl) + sum(&p[ihl..], 0)) == 0
}

/// The same for IPv6 with the UDP header right after the fixed header.
fn udp6_ok(p: &[u8]) -> bool {
    let whole = p[6] == 17
        && p.len() >= 48
        && usize::from(u16::from_be_bytes([p[4], p[5]])) == p.len() - 40
        && usize::from(u16::from_be_bytes([p[44], p[45]])) == p.len() - 40
        && u16::from_be_bytes([p[46], p[47]]) != 0;
    whole && finish(pseudo_header(&p[8..24], &p[24..40], 17, p.len() - 40) + sum(&p[40..], 0)) == 0
}

fn rewrite(data: &[u8]) -> Option<SourceRewrite> {
    let v4 = match data[4] {
        0xff => None,
        prefix => Some(Rewrite4 {
            mesh: Ipv4Network::new_truncate(
                Ipv4Addr::new(data[0], data[1], data[2], data[3]),
                prefix % 33,
            )
            .ok()?,
            to: Ipv4Addr::new(data[5], data[6], data[7], data[8]),
        }),
    };
    let v6 = match data[25] {
        0xff => None,
        prefix => {
            let pool: [u8; 16] = data[9..25].try_into().ok()?;
            let to: [u8; 16] = data[26..42].try_into().ok()?;
            Some(Rewrite6 {
                mesh: Ipv6Network::new_truncate(Ipv6Addr::from(pool), prefix % 129).ok()?,
                to: Ipv6Addr::from(to),
            })
        }
    };
    Some(SourceRewrite { v4, v6 })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < CONFIG {
        return;
    }
    let Some(rewrite) = rewrite(data) else {
        return;
    };
    let before = data[CONFIG..].to_vec();
    let mut packet = before.clone();
    if !rewrite.apply(&mut packet) {
        assert_eq!(packet, before, "a packet left alone was changed");
        return;
    }
    assert_eq!(packet.len(), before.len());
    let changed = |may: &dyn Fn(usize) -> bool| {
        for (i, (x, y)) in packet.iter().zip(&before).enumerate() {
            if x != y {
                assert!(may(i), "byte {i} changed");
            }
        }
    };
    if before[0] >> 4 == 4 {
        let r = rewrite
            .v4
            .expect("an IPv4 packet rewritten without an IPv4 rewrite");
        assert_eq!(&packet[12..16], &r.to.octets());
        let ihl = usize::from(before[0] & 0x0f) * 4;
        let udp_check = ihl + 6..ihl + 8;
        changed(&|i| (10..16).contains(&i) || udp_check.contains(&i));
        if ip_ok(&before, ihl) {
            assert!(ip_ok(&packet, ihl), "IPv4 header checksum broken");
        }
        if udp4_ok(&before, ihl) {
            assert!(udp4_ok(&packet, ihl), "UDP checksum broken");
        }
    } else {
        let r = rewrite
            .v6
            .expect("a packet that is not IPv4 rewritten without an IPv6 rewrite");
        assert_eq!(before[0] >> 4, 6);
        assert_eq!(&packet[8..24], &r.to.octets());
        // The UDP checksum right after the fixed header, or after a fragment header.
        changed(&|i| (8..24).contains(&i) || (46..48).contains(&i) || (54..56).contains(&i));
        if udp6_ok(&before) {
            assert!(udp6_ok(&packet), "IPv6 UDP checksum broken");
        }
    }
});
