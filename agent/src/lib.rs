//! isthmus node agent: the control loop (`control`) that turns the WireGuardPeers in the API
//! into this node's mesh, the operator's commands (`cli`), and the wiring between the
//! WireGuard engine ([`isthmus_wg`]) and routing ([`isthmus_routing`]).
//!
//! This is the only crate that sees both Kubernetes and the node's networking; it must never
//! reach below them: no boringtun, tun-rs, sockets or rtnetlink of its own — packet work
//! belongs to `isthmus-wg`, netlink to `isthmus-routing`. Its `Cargo.toml` lists neither.

pub mod cli;
pub mod control;
