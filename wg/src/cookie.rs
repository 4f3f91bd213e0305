//! The responder's side of WireGuard's cookie mechanism (whitepaper §5.4.7, the kernel's
//! `cookie.c`): under load an initiation must carry MAC2, a MAC keyed with a cookie the
//! sender can only have got by receiving our cookie reply at its source address.
//!
//! Why our own and not boringtun's `RateLimiter`: boringtun MACs the cookie over the source
//! IP only. The protocol binds it to the IP *and* the UDP port, so two hosts behind one NAT
//! (one public address, different ports — the usual case between clouds) each prove their
//! own return path; with the IP alone, a host that ever received a cookie can spend its
//! neighbour's, and a spoofer who shares the NAT needs no reply at all.
//!
//! The cookie secret is random and replaced every two minutes, as the kernel does, so a
//! cookie is worth at most two minutes; the reply's nonce is random per reply. Time comes in
//! as `now`, so the tests need no sleeps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use parking_lot::Mutex;
use rand_core::{OsRng, RngCore};

/// How long one cookie secret lives (the kernel's `COOKIE_SECRET_MAX_AGE`).
pub const SECRET_MAX_AGE: Duration = Duration::from_secs(120);

/// A cookie reply's length: type and index, 24-byte nonce, 16-byte cookie, 16-byte tag.
pub const COOKIE_REPLY_LEN: usize = 64;

const LABEL_MAC1: &[u8] = b"mac1----";
const LABEL_COOKIE: &[u8] = b"cookie--";
const MESSAGE_COOKIE_REPLY: u32 = 3;
const MAC_LEN: usize = 16;
/// The shortest message carrying the two MACs (a handshake response is 92 bytes).
const MIN_MESSAGE: usize = 8 + 2 * MAC_LEN;

/// What [`CookieChecker::check_mac2`] decided for a handshake message under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mac2 {
    /// MAC2 is right for this source's current cookie: the message goes on.
    Valid,
    /// MAC2 is missing or stale: send the cookie reply written to the first
    /// [`COOKIE_REPLY_LEN`] bytes of the buffer, and drop the message.
    Reply,
    /// Not a message with MACs (too short), or the buffer cannot hold a reply.
    Invalid,
}

struct Secret {
    bytes: [u8; 32],
    born: Instant,
}

/// The keys derived from the device's public key, and the changing cookie secret.
pub struct CookieChecker {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    secret: Mutex<Secret>,
}

impl std::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieChecker { .. }")
    }
}

fn hash(label: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, label);
    Digest::update(&mut h, data);
    h.finalize().into()
}

/// WireGuard's MAC: keyed BLAKE2s with a 16-byte output (not HMAC).
fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // Keys here are 16 or 32 bytes, always within BLAKE2s's 32-byte limit.
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    for part in parts {
        Update::update(&mut m, part);
    }
    m.finalize_fixed().into()
}

/// The source as the protocol binds a cookie to it: the IP address's bytes, then the UDP
/// port in network order (the kernel hashes `saddr` and `udp->source` as they sit in the
/// packet).
fn source_bytes(from: SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0u8; 18];
    let ip_len = match from {
        SocketAddr::V4(a) => {
            out[..4].copy_from_slice(&a.ip().octets());
            4
        }
        SocketAddr::V6(a) => {
            out[..16].copy_from_slice(&a.ip().octets());
            16
        }
    };
    out[ip_len..ip_len + 2].copy_from_slice(&from.port().to_be_bytes());
    (out, ip_len + 2)
}

impl CookieChecker {
    /// The checker for the device whose public key is `public`.
    pub fn new(public: &[u8; 32], now: Instant) -> CookieChecker {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        CookieChecker {
            mac1_key: hash(LABEL_MAC1, public),
            cookie_key: hash(LABEL_COOKIE, public),
            secret: Mutex::new(Secret { bytes, born: now }),
        }
    }

    /// Whether MAC1 (over everything before it, keyed with our public key) is right: a
    /// sender that does not know our public key gets no further.
    pub fn check_mac1(&self, message: &[u8]) -> bool {
        let Some(mac1_at) = message.len().checked_sub(2 * MAC_LEN) else {
            return false;
        };
        if message.len() < MIN_MESSAGE {
            return false;
        }
        let want = mac(&self.mac1_key, &[&message[..mac1_at]]);
        constant_time_eq(&want, &message[mac1_at..mac1_at + MAC_LEN])
    }

    /// The cookie `from` holds now: a MAC over its address and port, keyed with the
    /// current secret (renewed first when older than [`SECRET_MAX_AGE`]).
    fn cookie(&self, from: SocketAddr, now: Instant) -> [u8; MAC_LEN] {
        let mut secret = self.secret.lock();
        if now.saturating_duration_since(secret.born) >= SECRET_MAX_AGE {
            OsRng.fill_bytes(&mut secret.bytes);
            secret.born = now;
        }
        let (source, len) = source_bytes(from);
        mac(&secret.bytes, &[&source[..len]])
    }

    /// Checks MAC2 of a handshake `message` (MAC1 already checked) that arrived from `from`
    /// while the device is under load; when it is missing or stale, writes the cookie reply
    /// for `from` into `reply`.
    pub fn check_mac2(
        &self,
        message: &[u8],
        from: SocketAddr,
        now: Instant,
        reply: &mut [u8],
    ) -> Mac2 {
        if message.len() < MIN_MESSAGE || reply.len() < COOKIE_REPLY_LEN {
            return Mac2::Invalid;
        }
        let mac2_at = message.len() - MAC_LEN;
        let mac1 = &message[mac2_at - MAC_LEN..mac2_at];
        let cookie = self.cookie(from, now);
        let want = mac(&cookie, &[&message[..mac2_at]]);
        if constant_time_eq(&want, &message[mac2_at..]) {
            return Mac2::Valid;
        }
        // The reply goes to the initiation's sender index, sealed for the holder of the
        // private key's peers (the key is derived from our public key), bound to this MAC1.
        let sender_index = &message[4..8];
        reply[..4].copy_from_slice(&MESSAGE_COOKIE_REPLY.to_le_bytes());
        reply[4..8].copy_from_slice(sender_index);
        let (head, sealed) = reply[..COOKIE_REPLY_LEN].split_at_mut(32);
        OsRng.fill_bytes(&mut head[8..32]);
        let nonce = *XNonce::from_slice(&head[8..32]);
        sealed[..MAC_LEN].copy_from_slice(&cookie);
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&self.cookie_key));
        match cipher.encrypt_in_place_detached(&nonce, mac1, &mut sealed[..MAC_LEN]) {
            Ok(tag) => {
                sealed[MAC_LEN..].copy_from_slice(&tag);
                Mac2::Reply
            }
            Err(_) => Mac2::Invalid,
        }
    }
}

/// Comparison whose time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: [u8; 32] = [7; 32];

    /// An initiation-sized message with a right MAC1 and, when `cookie` is given, the MAC2
    /// a sender holding it computes.
    fn message(checker: &CookieChecker, cookie: Option<[u8; 16]>) -> Vec<u8> {
        let mut m = vec![0u8; 148];
        m[0] = 1;
        m[4..8].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        let mac1 = mac(&checker.mac1_key, &[&m[..116]]);
        m[116..132].copy_from_slice(&mac1);
        if let Some(c) = cookie {
            let mac2 = mac(&c, &[&m[..132]]);
            m[132..148].copy_from_slice(&mac2);
        }
        m
    }

    /// What the initiator does with a reply: open it with the key derived from the
    /// responder's public key and the MAC1 it sent.
    fn open_reply(reply: &[u8], mac1: &[u8]) -> Option<[u8; 16]> {
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&hash(LABEL_COOKIE, &PUBLIC)));
        let mut cookie = [0u8; 16];
        cookie.copy_from_slice(&reply[32..48]);
        let tag = chacha20poly1305::Tag::from_slice(&reply[48..64]);
        cipher
            .decrypt_in_place_detached(XNonce::from_slice(&reply[8..32]), mac1, &mut cookie, tag)
            .ok()
            .map(|()| cookie)
    }

    /// Sends `message` from `from`, gets the reply, and returns the cookie it carries.
    fn earn(checker: &CookieChecker, from: SocketAddr, now: Instant) -> [u8; 16] {
        let m = message(checker, None);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        assert_eq!(checker.check_mac2(&m, from, now, &mut reply), Mac2::Reply);
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), 3);
        assert_eq!(
            &reply[4..8],
            &m[4..8],
            "the reply goes to the sender's index"
        );
        open_reply(&reply, &m[116..132]).expect("the initiator opens the reply")
    }

    #[test]
    fn mac1_is_checked_over_everything_before_it() {
        let c = CookieChecker::new(&PUBLIC, Instant::now());
        let mut m = message(&c, None);
        assert!(c.check_mac1(&m));
        m[10] ^= 1;
        assert!(!c.check_mac1(&m));
        assert!(!c.check_mac1(&[0u8; 20]), "too short");
        let other = CookieChecker::new(&[8; 32], Instant::now());
        assert!(
            !other.check_mac1(&message(&c, None)),
            "MAC1 for another key"
        );
    }

    #[test]
    fn a_cookie_is_bound_to_the_source_address_and_port() {
        let now = Instant::now();
        let c = CookieChecker::new(&PUBLIC, now);
        let here: SocketAddr = "198.51.100.7:40001".parse().unwrap();
        let cookie = earn(&c, here, now);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let with_cookie = message(&c, Some(cookie));
        // (source, expected): the earner passes; its NAT neighbour (same IP, other port),
        // another address, and the same address over IPv6 are each asked for their own.
        let cases: [(&str, Mac2); 5] = [
            ("198.51.100.7:40001", Mac2::Valid),
            ("198.51.100.7:40002", Mac2::Reply),
            ("198.51.100.8:40001", Mac2::Reply),
            ("[::ffff:198.51.100.7]:40001", Mac2::Reply),
            ("[2001:db8::7]:40001", Mac2::Reply),
        ];
        for (from, want) in cases {
            let from: SocketAddr = from.parse().unwrap();
            assert_eq!(
                c.check_mac2(&with_cookie, from, now, &mut reply),
                want,
                "{from}"
            );
        }
        let v6: SocketAddr = "[2001:db8::7]:51820".parse().unwrap();
        let cookie6 = earn(&c, v6, now);
        assert_eq!(
            c.check_mac2(&message(&c, Some(cookie6)), v6, now, &mut reply),
            Mac2::Valid
        );
    }

    #[test]
    fn a_cookie_lives_until_the_secret_is_two_minutes_old() {
        let t0 = Instant::now();
        let c = CookieChecker::new(&PUBLIC, t0);
        let from: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let m = message(&c, Some(earn(&c, from, t0)));
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        let almost = t0 + SECRET_MAX_AGE - Duration::from_secs(1);
        assert_eq!(c.check_mac2(&m, from, almost, &mut reply), Mac2::Valid);
        let later = t0 + SECRET_MAX_AGE;
        assert_eq!(c.check_mac2(&m, from, later, &mut reply), Mac2::Reply);
        // The new secret's cookie works at once.
        let fresh = message(&c, Some(earn(&c, from, later)));
        assert_eq!(c.check_mac2(&fresh, from, later, &mut reply), Mac2::Valid);
    }

    #[test]
    fn replies_are_bound_to_the_mac1_they_answer_and_never_repeat_a_nonce() {
        let now = Instant::now();
        let c = CookieChecker::new(&PUBLIC, now);
        let from: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let m = message(&c, None);
        let (mut r1, mut r2) = ([0u8; COOKIE_REPLY_LEN], [0u8; COOKIE_REPLY_LEN]);
        c.check_mac2(&m, from, now, &mut r1);
        c.check_mac2(&m, from, now, &mut r2);
        assert_ne!(&r1[8..32], &r2[8..32], "a fresh nonce per reply");
        assert!(
            open_reply(&r1, &[0u8; 16]).is_none(),
            "another MAC1 opens nothing"
        );
        let mut short = [0u8; 10];
        assert_eq!(c.check_mac2(&m, from, now, &mut short), Mac2::Invalid);
    }
}
