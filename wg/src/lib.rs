//! isthmus-wg: the userspace WireGuard engine and the standard UAPI (`wg`'s protocol) that
//! configures it.
//!
//! - [`config`]: the device configuration as data, the [`Change`] requests that move it,
//!   and the one pure step from one configuration to the next;
//! - [`snapshot`]: what the engine reports (configuration, live endpoints, counters);
//! - [`engine`]: the packet engine, sans-IO ([`Engine`]: boringtun's or wireguard-go's
//!   `Device` without the I/O; tests and benches drive it directly);
//! - [`tunnel`]: one running interface ([`Tunnel`]): the TUN device, UDP sockets and threads
//!   around the engine;
//! - [`uapi`]: the text protocol `wg` speaks on `/var/run/wireguard/<iface>.sock`, an
//!   adapter on top: it turns text into engine values and back, and calls the engine, which
//!   knows nothing of it;
//! - [`clock`]: time and randomness as the engine's inputs ([`clock::Clock`],
//!   [`clock::IndexSource`]), so tests drive every timer;
//! - [`key`]: WireGuard keys;
//! - [`mss`]: TCP MSS clamping of SYNs to and from a peer, to what its path carries;
//! - [`workers`]: the crypto worker pool: data messages sealed and opened on every core,
//!   one peer's flow included, in order;
//! - [`ratelimit`]: handshake load shedding (device-wide load, per-source token buckets);
//! - `packet` (tests, and others with the `testing` feature): the one packet factory.
//!
//! This crate must never import Kubernetes (`kube`, `k8s-openapi`, `isthmus-api`), routing
//! or its netlink client (`isthmus-routing`, `rtnetlink`), or an async runtime (`tokio`): it
//! is a WireGuard implementation that happens to be driven by a control plane, and the
//! benches and `wg` use it without one. Its `Cargo.toml` holds no such dependency, and
//! `tests/layering.rs` fails if one arrives, even indirectly.

pub mod batch;
pub mod capture;
pub mod clock;
pub mod config;
pub mod cookie;
pub mod drops;
pub mod engine;
pub mod key;
pub mod loopguard;
pub mod mss;
pub mod offload;
#[cfg(any(test, feature = "testing"))]
pub mod packet;
pub mod peer;
pub mod ratelimit;
pub mod session_index;
pub mod snapshot;
pub mod snat;
pub mod sockets;
pub mod tunnel;
pub mod uapi;
pub mod workers;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod protocol_tests;
#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod timer_tests;

pub use config::{AllowedIpChange, Change, DeviceConfig, PeerChange, PeerConfig, SetEffects};
pub use engine::{Burst, Engine, Sealed, Transmit, DATA_OVERHEAD};
pub use key::Key;
pub use snapshot::{DeviceSnapshot, PeerSnapshot};
pub use tunnel::{BatchStats, Tunnel};
