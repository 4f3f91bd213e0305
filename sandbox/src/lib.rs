//! The migration sandbox, `make sandbox`: a real Kubernetes cluster on this machine
//! ([`isthmus_tests::rig`]) moves from one cloud to the other while clients call its
//! Service and a writer writes to its etcd, and nothing may fail.
//!
//! - [`client`]: the request loop of the client pod and of the client outside the cluster;
//! - [`etcd`]: the control-plane phase, etcd 3 → 5 → 3 across the clouds over the mesh.

pub mod client;
pub mod etcd;
