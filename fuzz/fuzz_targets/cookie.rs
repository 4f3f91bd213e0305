//! The responder's cookie (`wg/src/cookie.rs`): any bytes as a handshake message from any
//! source. MAC checks never panic; a cookie reply always opens, for an initiator holding our
//! public key and the MAC1 it sent, to a cookie that makes its message valid from the same
//! address and port — and not from the next port.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use isthmus_wg::cookie::{CookieChecker, Mac2, COOKIE_REPLY_LEN};
use libfuzzer_sys::fuzz_target;

const PUBLIC: [u8; 32] = [0x42; 32];

fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).unwrap();
    Update::update(&mut m, data);
    m.finalize_fixed().into()
}

fuzz_target!(|data: &[u8]| {
    // 19 bytes of source (a v4 or v6 address and a port), one of elapsed seconds, the rest
    // is the message.
    if data.len() < 20 {
        return;
    }
    let (head, message) = data.split_at(20);
    let port = u16::from_le_bytes([head[0], head[1]]);
    let ip = if head[2] & 1 == 0 {
        IpAddr::from(<[u8; 4]>::try_from(&head[3..7]).unwrap())
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&head[3..19]).unwrap()))
    };
    let from = SocketAddr::new(ip, port);
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(u64::from(head[19]));
    let checker = CookieChecker::new(&PUBLIC, t0);

    let _ = checker.check_mac1(message);
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    if checker.check_mac2(message, from, now, &mut reply) != Mac2::Reply {
        return;
    }
    // An initiator opens the reply with HASH("cookie--" ‖ responder's key) and its MAC1.
    let mac2_at = message.len() - 16;
    let mac1 = &message[mac2_at - 16..mac2_at];
    let mut h = Blake2s256::new();
    Digest::update(&mut h, b"cookie--");
    Digest::update(&mut h, PUBLIC);
    let key: [u8; 32] = h.finalize().into();
    let mut cookie = <[u8; 16]>::try_from(&reply[32..48]).unwrap();
    XChaCha20Poly1305::new(Key::from_slice(&key))
        .decrypt_in_place_detached(
            XNonce::from_slice(&reply[8..32]),
            mac1,
            &mut cookie,
            Tag::from_slice(&reply[48..64]),
        )
        .expect("a cookie reply opens with the MAC1 it answers");
    assert_eq!(
        &reply[4..8],
        &message[4..8],
        "the reply names the sender's index"
    );

    // With that cookie the message passes from the same source, not from the next port.
    let mut answered = message.to_vec();
    let mac2 = mac(&cookie, &answered[..mac2_at]);
    answered[mac2_at..].copy_from_slice(&mac2);
    let mut scratch = [0u8; COOKIE_REPLY_LEN];
    assert_eq!(
        checker.check_mac2(&answered, from, now, &mut scratch),
        Mac2::Valid,
        "the cookie from the reply is valid from where it was sent"
    );
    let neighbour = SocketAddr::new(ip, port.wrapping_add(1));
    assert_eq!(
        checker.check_mac2(&answered, neighbour, now, &mut scratch),
        Mac2::Reply,
        "a cookie was valid from another port"
    );
});
