//! The userspace WireGuard data plane: configuration model, sans-IO engine, and the I/O
//! that feeds it.

pub mod batch;
pub mod capture;
pub mod config;
pub mod device;
pub mod drops;
pub mod offload;
pub mod peer;
pub mod snat;
pub mod sockets;
pub mod tunnel;

#[cfg(test)]
mod engine_tests;

pub use config::{DeviceConfig, PeerConfig, SetEffects};
pub use device::{Burst, Device, Sealed, Transmit, DATA_OVERHEAD};
pub use tunnel::Tunnel;
