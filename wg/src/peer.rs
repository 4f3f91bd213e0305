//! One peer's live state: its boringtun session, where it is now, and what it moved.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use parking_lot::{Mutex, RwLock};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::config::PeerConfig;
use crate::key::Key;

pub struct Peer {
    pub public_key: Key,
    /// Our receiver index for this peer (24 bits; boringtun adds 8 bits of session id).
    pub index: u32,
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
}

impl Peer {
    pub fn new(config: &PeerConfig, index: u32, private: Option<&StaticSecret>) -> Peer {
        let peer = Peer {
            public_key: config.public_key,
            index,
            tunn: Mutex::new(None),
            endpoint: RwLock::new(config.endpoint),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            latest_handshake_ms: AtomicU64::new(0),
            path_mtu: AtomicU16::new(0),
            last_initiation: Mutex::new(None),
        };
        peer.rebuild_session(config, private);
        peer
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
            Tunn::new(
                secret.clone(),
                peer_public,
                config.preshared_key.map(|k| k.0),
                keepalive,
                self.index,
                None::<Arc<RateLimiter>>,
            )
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
