//! The WireGuard cross-platform userspace API (UAPI): the text protocol `wg` speaks over
//! `/var/run/wireguard/<iface>.sock` (see wireguard.com/xplatform).
//!
//! An adapter on top of the engine: `protocol` turns request text into the engine's
//! [`Change`](crate::Change) and its [`DeviceSnapshot`](crate::DeviceSnapshot) into response
//! text, with no I/O; `server` owns the socket and hands each request to the
//! [`Tunnel`](crate::Tunnel). The engine imports nothing from here.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{format_get, parse_set, Errno, UapiError};

#[cfg(test)]
mod set_tests;
