//! `MeshCluster` (`isthmus.dev/v1alpha1`, cluster-scoped, in the seed): one user cluster the
//! multi-cluster coordinator serves, and where its kubeconfig is. The seed holds one per user
//! cluster, beside the Secret with that cluster's credentials, as seeds already do for the
//! control planes they host. The spec is the platform team's; the status the coordinator's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::topology::Topology;

/// Condition type (coordinator): it reaches the cluster's API server with the kubeconfig
/// named in the spec, and its watches there are live.
pub const REACHABLE: &str = "Reachable";

/// Key of the kubeconfig in the Secret when the spec names none (the key seeds commonly use).
pub const DEFAULT_KUBECONFIG_KEY: &str = "kubeconfig";

fn default_key() -> String {
    DEFAULT_KUBECONFIG_KEY.to_string()
}

/// A user cluster served by the coordinator in the seed.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "MeshCluster",
    plural = "meshclusters",
    shortname = "mcl",
    status = "MeshClusterStatus",
    printcolumn = r#"{"name":"Reachable","type":"string","jsonPath":".status.conditions[?(@.type==\"Reachable\")].status"}"#,
    printcolumn = r#"{"name":"Peers","type":"integer","jsonPath":".status.peers"}"#,
    printcolumn = r#"{"name":"Admitted","type":"integer","jsonPath":".status.admitted"}"#,
    printcolumn = r#"{"name":"Mesh CIDR","type":"string","jsonPath":".spec.meshCIDR"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Reachable\")].message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshClusterSpec {
    /// The Secret in the seed holding the kubeconfig the coordinator uses for this cluster.
    pub kubeconfig: KubeconfigSecretRef,

    /// Pool this cluster's mesh IPs come from (default: the coordinator's `--mesh-cidr`).
    /// Each cluster has its own mesh; pools of different clusters may overlap.
    #[serde(default, rename = "meshCIDR", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 49))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("meshCIDR must be a CIDR prefix like 100.96.0.0/16"))]
    pub mesh_cidr: Option<String>,

    /// An IPv6 pool beside an IPv4 `meshCIDR`, for a dual-stack mesh: every admitted peer
    /// also gets an IPv6 mesh IP, which flannel's IPv6 VXLAN is pointed at (default: the
    /// coordinator's `--mesh-cidr-v6`, if any, when the cluster's pool is IPv4).
    #[serde(
        default,
        rename = "meshCIDRv6",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 49))]
    #[x_kube(validation = Rule::new("isCIDR(self) && cidr(self).ip().family() == 6").message("meshCIDRv6 must be an IPv6 CIDR prefix like fd96::/64"))]
    pub mesh_cidr_v6: Option<String>,

    /// Which pairs of this cluster's nodes tunnel (default: the coordinator's `--topology`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}

/// Where in the seed a cluster's kubeconfig is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct KubeconfigSecretRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The data key holding the kubeconfig.
    #[serde(default = "default_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Written by the leading coordinator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshClusterStatus {
    /// `Reachable`: whether the coordinator reaches the cluster, and if not why
    /// (`SecretNotFound`, `InvalidKubeconfig`, `Unauthorized`, `Forbidden`, `Unreachable`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// WireGuardPeers in the cluster, as last watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<i64>,
    /// Of those, admitted for their current generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted: Option<i64>,
    /// The pool and topology the cluster is served with (the spec's, else the defaults).
    #[serde(default, rename = "meshCIDR", skip_serializing_if = "Option::is_none")]
    pub mesh_cidr: Option<String>,
    /// The IPv6 pool of a dual-stack mesh, when the cluster is served with one.
    #[serde(
        default,
        rename = "meshCIDRv6",
        skip_serializing_if = "Option::is_none"
    )]
    pub mesh_cidr_v6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}
