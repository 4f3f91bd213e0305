//! isthmus coordinator: admits WireGuardPeers against their Nodes, allocates mesh IPs,
//! stamps the topology, collects peers of deleted Nodes. `decide` is the pure core;
//! `controller` watches and applies; `lease` picks the one replica that acts;
//! `identity` is the coordinator's key that agents prove theirs against;
//! `multi` serves many user clusters from the seed (MeshCluster); `ops` is what
//! `/metrics`, `/healthz` and `/readyz` report.
//!
//! It runs in the seed cluster and touches no node: it must never import the WireGuard
//! engine (`isthmus-wg`), routing (`isthmus-routing`) or the agent. Its decisions are a pure
//! function of the WireGuardPeers, Nodes (and, in multi-cluster mode, MeshClusters and
//! their Secrets) it watched.

pub mod controller;
pub mod decide;
pub mod health;
pub mod identity;
pub mod lease;
pub mod multi;
pub mod ops;
