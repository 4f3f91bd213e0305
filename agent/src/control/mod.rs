//! The agent's control plane: publish this node's WireGuardPeer, watch the admitted ones,
//! turn them into the mesh this node should run (`mesh::plan`, pure) and apply only the
//! difference to the data plane. `options` is what the operator asked for; `pass` decides
//! each pass of the loop (pure); `run` observes, applies, and wires it all together.

pub mod health;
pub mod keys;
pub mod lock;
pub mod mesh;
pub mod ops;
pub mod options;
pub mod pass;
pub mod pmtu;
pub mod probe;
pub mod publish;
pub mod rotate;
pub mod run;
pub mod runtime;
