//! The agent's control plane: publish this node's WireGuardPeer, watch the admitted ones,
//! turn them into the mesh this node should run (`mesh::plan`, pure) and apply only the
//! difference to the data plane.

pub mod health;
pub mod keys;
pub mod lock;
pub mod mesh;
pub mod ops;
pub mod publish;
pub mod run;
pub mod runtime;
