//! The WireGuard cross-platform userspace API (UAPI): the text protocol `wg` speaks over
//! `/var/run/wireguard/<iface>.sock` (see wireguard.com/xplatform).
//!
//! `protocol` turns request text into typed values and snapshots into response text, with
//! no I/O; `server` owns the socket.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{
    format_get, parse_set, AllowedIpChange, DeviceSnapshot, Errno, PeerChange, PeerSnapshot,
    SetRequest, UapiError,
};
