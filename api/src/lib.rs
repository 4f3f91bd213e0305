//! The `WireGuardPeer` custom resource (`isthmus.dev/v1alpha1`, cluster-scoped, named after
//! its node), shared by agent and coordinator, and the pure rules both apply to it.
//!
//! The spec is written by the node's agent, the status by the coordinator, each with its own
//! server-side-apply field manager. Validation lives in the CRD (OpenAPI plus CEL), so the
//! API server rejects a malformed key, endpoint or CIDR with a message before any controller
//! sees it.
//!
//! Types and pure rules only, shared by both binaries: it must never import another isthmus
//! crate or a Kubernetes client (`kube`'s `client` and `runtime` features), so the CRD and the
//! rules are generated and tested without a cluster.

pub mod cluster;
pub mod heartbeat;
pub mod node;
pub mod peer;
pub mod proof;
pub mod topology;

pub use cluster::{
    KubeconfigSecretRef, MeshCluster, MeshClusterSpec, MeshClusterStatus, DEFAULT_KUBECONFIG_KEY,
    REACHABLE,
};
pub use peer::{
    KeyChallenge, MeshHealth, PeerPathMtu, Vtep, WireGuardPeer, WireGuardPeerSpec,
    WireGuardPeerStatus, ADMITTED, AGENT_MANAGER, COORDINATOR_MANAGER, MESH_CONNECTED,
};
pub use topology::Topology;

use kube::CustomResourceExt;

/// The CRD as YAML, exactly as `deploy/base/crd.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&WireGuardPeer::crd())?;
    Ok(format!(
        "# Generated from the Rust types in api/ by `cargo run -p isthmus-api --bin crdgen`.\n\
         # Do not edit: a test fails when this file differs from what the types generate.\n\
         ---\n{body}"
    ))
}

/// The MeshCluster CRD (seed only) as YAML, exactly as
/// `deploy/overlays/seed/meshcluster-crd.yaml` holds it.
pub fn meshcluster_crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&MeshCluster::crd())?;
    Ok(format!(
        "# Generated from the Rust types in api/ by\n\
         # `cargo run -p isthmus-api --bin crdgen -- meshcluster`.\n\
         # Do not edit: a test fails when this file differs from what the types generate.\n\
         ---\n{body}"
    ))
}
