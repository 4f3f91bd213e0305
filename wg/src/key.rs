//! 32-byte WireGuard keys (private, public, preshared) and their text forms.
//!
//! The UAPI speaks lowercase hex; `wg` and the Kubernetes API speak base64. `Debug` never
//! prints a whole key, so a private key cannot reach a log line by accident.

use std::fmt;

use base64::Engine;
use x25519_dalek::{PublicKey, StaticSecret};

/// Raw key bytes; `Debug` prints only a short public fingerprint so keys never reach logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key is 64 hex characters, got {0}")]
    HexLength(usize),
    #[error("a key is hex: {0}")]
    Hex(String),
    #[error("a key is 44 characters of base64 encoding 32 bytes")]
    Base64,
}

impl Key {
    pub const ZERO: Key = Key([0; 32]);

    pub fn is_zero(&self) -> bool {
        // Constant-time enough for configuration parsing; not on a secret-dependent path.
        self.0.iter().all(|b| *b == 0)
    }

    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        if text.len() != 64 {
            return Err(KeyError::HexLength(text.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(|e| KeyError::Hex(e.to_string()))?;
        Ok(Key(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::Base64)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Base64)?;
        Ok(Key(arr))
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Treat these bytes as a private key and derive its public key.
    pub fn public_from_private(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    /// A fresh random private key (clamped by x25519 at use).
    pub fn generate_private() -> Key {
        Key(StaticSecret::random_from_rng(rand_core::OsRng).to_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a prefix: enough to tell public keys apart, useless for a private one.
        write!(f, "Key({}…)", &hex::encode(&self.0[..4]))
    }
}

/// The small-order X25519 points (base64), as the kernel's `netns.sh` configures them as
/// peers: with any private key they give an all-zero shared secret, so no handshake may
/// ever be sent to one ([`crate::peer::Peer::rebuild_session`] checks by computing, this
/// list is for the tests that prove it).
pub const LOW_ORDER_POINTS: [&str; 7] = [
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
    "X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEVc=",
    "7P///////////////////////////////////////38=",
    "7f///////////////////////////////////////38=",
    "7v///////////////////////////////////////38=",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let k = Key([0xab; 32]);
        assert_eq!(Key::from_hex(&k.to_hex()), Ok(k));
        assert_eq!(Key::from_hex("abc"), Err(KeyError::HexLength(3)));
        assert!(matches!(
            Key::from_hex(&"zz".repeat(32)),
            Err(KeyError::Hex(_))
        ));
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let k = Key([7; 32]);
        assert_eq!(Key::from_base64(&k.to_base64()), Ok(k));
        assert_eq!(Key::from_base64("AAAA"), Err(KeyError::Base64));
    }

    #[test]
    fn debug_never_prints_whole_key() {
        let k = Key([0x11; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.to_hex()));
    }
}
