//! What the engine reports about itself: the configuration plus each peer's live endpoint,
//! handshake and counters. `wg show` (through the UAPI), the agent's health reports and
//! metrics all read this one type.

use std::net::SocketAddr;
use std::time::SystemTime;

use ip_network::IpNetwork;

use crate::key::Key;

/// One peer as the engine sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The live endpoint: the configured one, or where the peer roamed to since.
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNetwork>,
}

/// The device as the engine sees it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerSnapshot>,
}
