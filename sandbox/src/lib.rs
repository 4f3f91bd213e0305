//! The migration sandbox, `make sandbox`: a real Kubernetes cluster on this machine
//! ([`isthmus_tests::rig`]) moves from one cloud to the other while clients call its
//! Service and a writer writes to its etcd, and nothing may fail.
//!
//! - [`story`]: the move as data, phases of steps;
//! - [`run`]: each step's effect on the real cluster;
//! - [`workload`]: the echo Deployment, its Service and PDB, and the two clients;
//! - [`client`]: the request loop of the client pod and of the client outside the cluster;
//! - [`etcd`]: the control-plane phase, etcd 3 → 5 → 3 across the clouds over the mesh;
//! - [`report`]: the figures per phase;
//! - [`profile`]: `default` and `short` (CI).
//!
//! Must never import the agent or the coordinator: it drives isthmus only as a user does,
//! through its image and `kubectl`.

pub mod client;
pub mod etcd;
pub mod profile;
pub mod report;
pub mod run;
pub mod story;
pub mod workload;

pub use profile::Profile;
pub use report::Report;
pub use run::run;
