//! Proof that an agent holds the private key of the public key it publishes.
//!
//! A public key alone proves nothing: every agent can read every WireGuardPeer and copy
//! another node's key into its own. So the coordinator holds an X25519 key of its own and
//! gives each peer a challenge (its public key and a nonce bound to the object) in the
//! peer's status; the agent answers in `spec.keyProof` with a MAC keyed by the
//! Diffie-Hellman secret of its private key and the coordinator's public key, over the
//! node's name, the nonce and the public key it publishes. The coordinator computes the
//! same secret from its private key and the published public key: only a holder of that
//! public key's private key (or of the coordinator's) can produce the MAC, and a proof
//! copied from another object names another node, nonce or key. It is WireGuard's own
//! static-static DH, so nothing new is trusted. Pure: both sides call these functions.

use base64::Engine;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac256, Digest};
use x25519_dalek::{PublicKey, StaticSecret};

/// Domain separation for the proof MAC: a MAC made for anything else never verifies here.
const PROOF_LABEL: &[u8] = b"isthmus.dev key possession v1";
/// Domain separation for the key the coordinator derives its nonces with.
const NONCE_LABEL: &[u8] = b"isthmus.dev key challenge nonce v1";

/// Bytes of a challenge nonce.
pub const NONCE_LEN: usize = 16;

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// 32 bytes from base64, or `None`.
pub fn key_from_base64(text: &str) -> Option<[u8; 32]> {
    b64().decode(text.trim()).ok()?.try_into().ok()
}

/// The X25519 public key of `private`.
pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// The X25519 public key of `private`, base64 as the API carries keys.
pub fn public_key_base64(private: &[u8; 32]) -> String {
    b64().encode(public_key(private))
}

/// A fresh random private key (the coordinator's, made once and kept in a Secret).
pub fn generate_private() -> [u8; 32] {
    StaticSecret::random_from_rng(rand_core::OsRng).to_bytes()
}

/// The nonce the coordinator gives the object with this UID: derived from its private key,
/// so every replica gives the same one without storing it, and a re-created object (new
/// UID) gets a new one. Base64.
pub fn challenge_nonce(coordinator_private: &[u8; 32], uid: &str) -> String {
    let key = Blake2s256::new()
        .chain_update(NONCE_LABEL)
        .chain_update(coordinator_private)
        .finalize();
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(&key)
        .unwrap_or_else(|_| unreachable!("a 32-byte key is a valid BLAKE2s MAC key"));
    mac.update(uid.as_bytes());
    let out = mac.finalize_fixed();
    b64().encode(&out[..NONCE_LEN])
}

/// The MAC, or `None` when the DH secret is all zeros (a low-order public key on either
/// side: no secret, so no proof).
fn mac(
    own_private: &[u8; 32],
    their_public: &[u8; 32],
    node: &str,
    nonce: &str,
    published: &[u8; 32],
) -> Option<[u8; 32]> {
    let shared = StaticSecret::from(*own_private).diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return None;
    }
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(shared.as_bytes())
        .unwrap_or_else(|_| unreachable!("a 32-byte key is a valid BLAKE2s MAC key"));
    mac.update(PROOF_LABEL);
    // Lengths first, so no two (node, nonce) pairs give the same bytes.
    mac.update(&(node.len() as u32).to_be_bytes());
    mac.update(node.as_bytes());
    mac.update(&(nonce.len() as u32).to_be_bytes());
    mac.update(nonce.as_bytes());
    mac.update(published);
    Some(mac.finalize_fixed().into())
}

/// The agent's answer (base64) for its node, the challenge it was given and the key pair
/// it publishes; `None` if the coordinator's key is not a usable X25519 key.
pub fn answer(
    agent_private: &[u8; 32],
    coordinator_public: &str,
    node: &str,
    nonce: &str,
) -> Option<String> {
    let coordinator = key_from_base64(coordinator_public)?;
    let published = public_key(agent_private);
    mac(agent_private, &coordinator, node, nonce, &published).map(|m| b64().encode(m))
}

/// Whether `proof` shows that whoever wrote it holds the private key of `published`
/// (base64), for this node and nonce. Compared in constant time.
pub fn verify(
    coordinator_private: &[u8; 32],
    published: &str,
    node: &str,
    nonce: &str,
    proof: &str,
) -> bool {
    let (Some(published), Some(proof)) = (key_from_base64(published), key_from_base64(proof))
    else {
        return false;
    };
    let Some(expected) = mac(coordinator_private, &published, node, nonce, &published) else {
        return false;
    };
    expected
        .iter()
        .zip(proof.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64key(k: &[u8; 32]) -> String {
        b64().encode(k)
    }

    #[test]
    fn an_answer_verifies_only_for_its_key_node_and_nonce() {
        let coordinator = generate_private();
        let coordinator_pub = b64key(&public_key(&coordinator));
        let agent = generate_private();
        let agent_pub = b64key(&public_key(&agent));
        let nonce = challenge_nonce(&coordinator, "uid-a");
        let proof = answer(&agent, &coordinator_pub, "a", &nonce).unwrap();
        assert!(verify(&coordinator, &agent_pub, "a", &nonce, &proof));

        let other = generate_private();
        let other_pub = b64key(&public_key(&other));
        let other_coordinator = generate_private();
        let other_nonce = challenge_nonce(&coordinator, "uid-b");
        // (case, coordinator private, published key, node, nonce, proof)
        type Case<'a> = (&'a str, &'a [u8; 32], &'a str, &'a str, &'a str, String);
        let cases: Vec<Case> = vec![
            (
                "copied to another node",
                &coordinator,
                &agent_pub,
                "b",
                &nonce,
                proof.clone(),
            ),
            (
                "for another nonce",
                &coordinator,
                &agent_pub,
                "a",
                &other_nonce,
                proof.clone(),
            ),
            (
                "for another key",
                &coordinator,
                &other_pub,
                "a",
                &nonce,
                proof.clone(),
            ),
            (
                "to another coordinator",
                &other_coordinator,
                &agent_pub,
                "a",
                &nonce,
                proof.clone(),
            ),
            (
                "made without the private key",
                &coordinator,
                &agent_pub,
                "a",
                &nonce,
                answer(&other, &coordinator_pub, "a", &nonce).unwrap(),
            ),
            (
                "not base64",
                &coordinator,
                &agent_pub,
                "a",
                &nonce,
                "!!".into(),
            ),
            (
                "empty",
                &coordinator,
                &agent_pub,
                "a",
                &nonce,
                String::new(),
            ),
        ];
        for (case, coordinator, published, node, nonce, proof) in cases {
            assert!(
                !verify(coordinator, published, node, nonce, &proof),
                "{case}: verified"
            );
        }
    }

    #[test]
    fn nonces_are_stable_per_object_and_differ_between_objects() {
        let coordinator = generate_private();
        assert_eq!(
            challenge_nonce(&coordinator, "u1"),
            challenge_nonce(&coordinator, "u1")
        );
        assert_ne!(
            challenge_nonce(&coordinator, "u1"),
            challenge_nonce(&coordinator, "u2")
        );
        assert_ne!(
            challenge_nonce(&coordinator, "u1"),
            challenge_nonce(&generate_private(), "u1")
        );
    }

    #[test]
    fn a_low_order_key_proves_nothing() {
        let coordinator = generate_private();
        let zero = b64key(&[0; 32]);
        assert_eq!(answer(&generate_private(), &zero, "a", "n"), None);
        let forged = b64key(&[0; 32]);
        assert!(!verify(&coordinator, &zero, "a", "n", &forged));
    }
}
