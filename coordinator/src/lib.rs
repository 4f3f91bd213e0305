//! isthmus coordinator: admits WireGuardPeers against their Nodes, allocates mesh IPs,
//! stamps the topology, collects peers of deleted Nodes. `decide` is the pure core;
//! `controller` watches and applies; `lease` picks the one replica that acts;
//! `multi` serves many user clusters from the seed; `ops` is what `/metrics`, `/healthz` and `/readyz` report.

pub mod controller;
pub mod decide;
pub mod health;
pub mod lease;
pub mod multi;
pub mod ops;
