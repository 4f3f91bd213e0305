//! One peer's live state: its boringtun session, where it is now, and what it moved.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use parking_lot::{Mutex, RwLock};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::PeerConfig;
use crate::key::Key;
use crate::session_index::IndexPermutation;

pub struct Peer {
    pub public_key: Key,
    /// Our receiver index for this peer (24 bits; boringtun adds 8 bits of session id).
    pub index: u32,
    /// How boringtun's session indices are shown on the wire (the engine's, one for all
    /// peers): see [`crate::session_index`].
    indices: Arc<IndexPermutation>,
    /// `None` while the device has no private key, or for ever when the peer's public key
    /// is a low-order point (see [`Peer::rebuild_session`]).
    pub tunn: Mutex<Option<Tunn>>,
    endpoint: RwLock<Option<SocketAddr>>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// The latest handshake seen, in milliseconds since the epoch (0: none). boringtun
    /// forgets it when a session expires after failed rekeys; the kernel's and
    /// wireguard-go's "latest handshake" does not, and the health report needs it to say
    /// how long a dead path has been down.
    latest_handshake_ms: AtomicU64,
    /// The largest packet the path to this peer carries through the tunnel, as the control
    /// plane measured or derived it (0: not set, the device's MTU applies): what TCP SYNs
    /// to and from the peer are clamped to ([`crate::mss`]).
    path_mtu: AtomicU16,
    /// When the latest handshake initiation left and the jitter drawn for its retry
    /// (see `engine::hold_retry`).
    pub last_initiation: Mutex<Option<(Instant, Duration)>>,
    /// The session this peer had before a key rotation (ours or its own), kept beside the
    /// new one until the new one carries traffic: see [`Previous`].
    previous: Mutex<Option<Previous>>,
    /// Whether `previous` is set: one load on the packet path instead of a lock.
    retiring: AtomicBool,
}

/// The peer as it was before a key changed on either side: its own receiver index and
/// [`Tunn`] (under the old key pair), so datagrams for the old session still open and
/// packets still leave on it until the new session is up. Dropped by the engine's timer
/// (`engine::drop_previous`) or when the rotation is retired.
#[derive(Clone)]
pub struct Previous {
    pub peer: Arc<Peer>,
    /// When it became the previous session (engine clock).
    pub since: Instant,
}

impl Peer {
    pub fn new(
        config: &PeerConfig,
        index: u32,
        indices: &Arc<IndexPermutation>,
        private: Option<&StaticSecret>,
    ) -> Peer {
        let peer = Peer {
            public_key: config.public_key,
            index,
            indices: indices.clone(),
            tunn: Mutex::new(None),
            endpoint: RwLock::new(config.endpoint),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            latest_handshake_ms: AtomicU64::new(0),
            path_mtu: AtomicU16::new(0),
            last_initiation: Mutex::new(None),
            previous: Mutex::new(None),
            retiring: AtomicBool::new(false),
        };
        peer.rebuild_session(config, private);
        peer
    }

    /// The peer after a key rotation: a fresh session under `private` with a fresh
    /// `index`, and `old` (which keeps its own index and session) as the previous one.
    /// What the operator sees carries over: endpoint (as roamed), counters, latest
    /// handshake, path MTU. Only one previous generation is kept.
    pub fn successor(
        config: &PeerConfig,
        index: u32,
        indices: &Arc<IndexPermutation>,
        private: Option<&StaticSecret>,
        old: &Arc<Peer>,
        now: Instant,
    ) -> Peer {
        let peer = Peer::new(config, index, indices, private);
        if let Some(ep) = old.endpoint() {
            peer.set_endpoint(ep);
        }
        peer.rx_bytes.store(old.rx_bytes(), Ordering::Relaxed);
        peer.tx_bytes.store(old.tx_bytes(), Ordering::Relaxed);
        let ms = old.last_handshake().map_or(0, |t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        peer.latest_handshake_ms.store(ms, Ordering::Relaxed);
        peer.set_path_mtu(old.path_mtu());
        old.clear_previous();
        peer.set_previous(Some(Previous {
            peer: old.clone(),
            since: now,
        }));
        peer
    }

    /// The previous session, if a rotation left one.
    pub fn previous(&self) -> Option<Previous> {
        if !self.retiring.load(Ordering::Acquire) {
            return None;
        }
        self.previous.lock().clone()
    }

    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Acquire)
    }

    fn set_previous(&self, previous: Option<Previous>) {
        let mut slot = self.previous.lock();
        self.retiring.store(previous.is_some(), Ordering::Release);
        *slot = previous;
    }

    /// Forgets the previous session (its datagrams are dropped from now on).
    pub fn clear_previous(&self) {
        self.set_previous(None);
    }

    /// Whether this peer's session can seal a packet now.
    pub fn has_session(&self) -> bool {
        self.tunn
            .lock()
            .as_ref()
            .is_some_and(|t| t.time_since_last_handshake().is_some())
    }

    /// Replaces the session state (after a key, preshared key or keepalive change). The
    /// counters and endpoint survive; the next packet starts a fresh handshake.
    ///
    /// A public key that is a low-order point gives an all-zero static-static secret, which
    /// anyone can compute: the peer stays configured (and listed) but gets no session, so
    /// no handshake is ever sent to it — what the kernel and wireguard-go do. boringtun 0.7
    /// does not check (`NoiseParams::new`, handshake.rs:379).
    pub fn rebuild_session(&self, config: &PeerConfig, private: Option<&StaticSecret>) {
        let peer_public = PublicKey::from(config.public_key.0);
        let usable = |secret: &&StaticSecret| {
            let contributory = secret.diffie_hellman(&peer_public).was_contributory();
            if !contributory {
                tracing::warn!(
                    peer = %config.public_key.to_base64(),
                    "peer public key is a low-order point; no handshake will be sent to it"
                );
            }
            contributory
        };
        let tunn = private.filter(usable).map(|secret| {
            let keepalive =
                (config.persistent_keepalive > 0).then_some(config.persistent_keepalive);
            let mut tunn = Tunn::new(
                secret.clone(),
                peer_public,
                config.preshared_key.map(|k| k.0),
                keepalive,
                self.index,
                None::<Arc<RateLimiter>>,
            );
            let indices = self.indices.clone();
            tunn.set_index_map(Arc::new(move |i| indices.seal(i)));
            tunn
        });
        *self.tunn.lock() = tunn;
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read()
    }

    pub fn set_endpoint(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            *self.endpoint.write() = Some(addr);
        }
    }

    /// The path MTU set by [`crate::Engine::set_path_mtu`], if any.
    pub fn path_mtu(&self) -> Option<u16> {
        Some(self.path_mtu.load(Ordering::Relaxed)).filter(|m| *m != 0)
    }

    pub fn set_path_mtu(&self, mtu: Option<u16>) {
        self.path_mtu.store(mtu.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn add_rx(&self, n: usize) {
        self.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_tx(&self, n: usize) {
        self.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn rx_bytes(&self) -> u64 {
        self.rx_bytes.load(Ordering::Relaxed)
    }

    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed)
    }

    /// Wall-clock time of the latest completed handshake, kept after its session expired.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let live = self
            .tunn
            .lock()
            .as_ref()
            .and_then(|t| t.time_since_last_handshake())
            .and_then(|since| SystemTime::now().checked_sub(since))
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let ms = match live {
            Some(ms) => self
                .latest_handshake_ms
                .fetch_max(ms, Ordering::Relaxed)
                .max(ms),
            None => self.latest_handshake_ms.load(Ordering::Relaxed),
        };
        (ms != 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    /// What a peer without a session costs in place (its `Tunn` is inline in [`Peer`]):
    /// an agent of a 500-node mesh holds 500 of them, mostly idle. boringtun kept eight
    /// sessions inline, each with two AEAD keys and an 8192-bit replay window (isthmus patch
    /// 7), about 17 KiB a peer before any handshake; patch 9 boxes them.
    #[test]
    fn a_peer_without_a_session_stays_small() {
        let tunn = std::mem::size_of::<Tunn>();
        let peer = std::mem::size_of::<Peer>();
        eprintln!("size_of Tunn {tunn} B, Peer {peer} B");
        assert!(tunn <= 2048, "a Tunn takes {tunn} B in place");
        assert!(peer <= 2560, "a Peer takes {peer} B in place");
    }
}
