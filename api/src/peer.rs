//! The resource itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema, Resource};
use serde::{Deserialize, Serialize};

use crate::topology::Topology;

/// Server-side-apply field manager of the agents (spec).
pub const AGENT_MANAGER: &str = "isthmus-agent";
/// Server-side-apply field manager of the coordinator (status).
pub const COORDINATOR_MANAGER: &str = "isthmus-coordinator";
/// Condition type: the coordinator checked this peer against its Node and lets it in.
pub const ADMITTED: &str = "Admitted";
/// Condition type (coordinator): every tunnel the topology wants for this node is up.
/// `kubectl wait --for=condition=MeshConnected wgp --all` gates a migration step on it.
pub const MESH_CONNECTED: &str = "MeshConnected";

/// CEL: `host:port` where host is an IPv4 address or a bracketed IPv6 address.
const ENDPOINT_RULE: &str = r"self.matches(r'^(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}$') && isIP(self.substring(0, self.lastIndexOf(':')).replace('[', '').replace(']', '')) && int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535";

/// What a node's agent publishes about itself.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "WireGuardPeer",
    plural = "wireguardpeers",
    shortname = "wgp",
    status = "WireGuardPeerStatus",
    printcolumn = r#"{"name":"Location","type":"string","jsonPath":".spec.location"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint"}"#,
    printcolumn = r#"{"name":"Mesh IP","type":"string","jsonPath":".status.meshIP"}"#,
    printcolumn = r#"{"name":"Admitted","type":"string","jsonPath":".status.conditions[?(@.type==\"Admitted\")].status"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"MeshConnected\")].status"}"#,
    printcolumn = r#"{"name":"Pairs","type":"string","jsonPath":".status.conditions[?(@.type==\"MeshConnected\")].message","priority":1}"#,
    printcolumn = r#"{"name":"Up","type":"integer","jsonPath":".status.health.peersUp","priority":1}"#,
    printcolumn = r#"{"name":"Expected","type":"integer","jsonPath":".status.health.peersExpected","priority":1}"#,
    printcolumn = r#"{"name":"Path MTU","type":"integer","jsonPath":".status.health.lowestPathMTU","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardPeerSpec {
    /// The node's WireGuard public key, base64 as `wg` prints it.
    #[schemars(length(min = 44, max = 44))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$')").message("publicKey must be a WireGuard public key: 44 characters of base64 encoding 32 bytes"))]
    pub public_key: String,

    /// Where the other nodes send to: `IPv4:port` or `[IPv6]:port`, the address they can
    /// reach (often a public or NATed address, not the node IP).
    #[schemars(length(min = 3, max = 64))]
    #[x_kube(validation = Rule::new(ENDPOINT_RULE).message("endpoint must be IPv4:port or [IPv6]:port with a port from 1 to 65535"))]
    pub endpoint: String,

    /// Which cloud or region the node is in (from `topology.kubernetes.io/region` unless
    /// overridden); nodes in different locations tunnel.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$')").message("location must be lowercase letters, digits, '-', '.' or '_', starting and ending alphanumeric"))]
    pub location: String,

    /// The node's own address, as its Node object lists it.
    #[serde(rename = "nodeIP")]
    #[schemars(length(min = 2, max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("nodeIP must be an IP address"))]
    pub node_ip: String,

    /// The node's pod CIDRs, as its Node object lists them.
    #[serde(default, rename = "podCIDRs")]
    #[schemars(length(max = 2), inner(length(max = 49)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("podCIDRs must be CIDR prefixes like 10.244.1.0/24"))]
    pub pod_cidrs: Vec<String>,

    /// flannel's VXLAN endpoint on this node, when flannel runs there (`flannel.1`, IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<Vtep>,

    /// flannel's IPv6 VXLAN endpoint (`flannel-v6.1`) on a dual-stack node: the peers of a
    /// dual-stack mesh point its FDB entry at this node's `status.meshIPv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isIP(self.ip) && ip(self.ip).family() == 6").message("vtep6.ip must be an IPv6 address"))]
    pub vtep6: Option<Vtep>,

    /// Seconds between keepalives the others send to this node (0: off), for nodes behind NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,

    /// MTU of this node's tunnel device; a peer clamps its path to the smaller of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 65535))]
    pub mtu: Option<i32>,

    /// The answer to `status.keyChallenge`: proof that the agent holds the private key of
    /// `publicKey` ([`crate::proof`]). The coordinator admits no peer without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 44, max = 44))]
    pub key_proof: Option<String>,
}

/// The coordinator's challenge to a peer's agent: prove you hold your private key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyChallenge {
    /// The coordinator's X25519 public key (base64), the other half of the proof's DH.
    #[schemars(length(min = 44, max = 44))]
    pub coordinator_key: String,
    /// Bound to this object (its UID): a proof made for another object does not verify.
    #[schemars(length(max = 44))]
    pub nonce: String,
    /// When the coordinator first asked; a peer admitted before proofs existed keeps its
    /// admission for a grace period from here, so an upgrade drops no tunnel.
    pub issued: Time,
}

/// flannel's VXLAN tunnel endpoint (the `flannel.1` or `flannel-v6.1` device).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Vtep {
    /// MAC address of the VXLAN device.
    #[schemars(length(max = 17))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$')").message("vtep.mac must be a MAC address like 0a:58:0a:f4:01:00"))]
    pub mac: String,
    /// Address of the VXLAN device: the network address of the node's pod CIDR of its
    /// family (flannel's `x.y.z.0`, or the IPv6 prefix's `::`).
    #[serde(rename = "ip")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("vtep.ip must be an IP address"))]
    pub ip: String,
}

/// Written by the coordinator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardPeerStatus {
    /// This node's unique address in the mesh (unique even where node IPs overlap).
    #[serde(default, rename = "meshIP", skip_serializing_if = "Option::is_none")]
    pub mesh_ip: Option<String>,
    /// The pool the mesh IP came from; the agent puts this prefix on its tunnel device.
    #[serde(default, rename = "meshCIDR", skip_serializing_if = "Option::is_none")]
    pub mesh_cidr: Option<String>,
    /// This node's IPv6 mesh address, when the coordinator also has an IPv6 pool (dual-stack
    /// mesh): what flannel's IPv6 VXLAN device (`flannel-v6.1`) is pointed at.
    #[serde(default, rename = "meshIPv6", skip_serializing_if = "Option::is_none")]
    pub mesh_ipv6: Option<String>,
    /// The IPv6 pool `meshIPv6` came from; its prefix goes on the tunnel device too.
    #[serde(
        default,
        rename = "meshCIDRv6",
        skip_serializing_if = "Option::is_none"
    )]
    pub mesh_cidr_v6: Option<String>,
    /// The topology the coordinator admitted this peer under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// Keyed by type, so coordinator and agent each own their conditions under
    /// server-side apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Written by the node's agent (its own field manager): a summary of its tunnels, written
    /// when it changes and otherwise once a heartbeat (`--health-interval`). The coordinator
    /// turns these into `MeshConnected`. A report that does not parse (an older agent's, a
    /// hand edit) reads as no report rather than failing the whole object.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient"
    )]
    pub health: Option<MeshHealth>,
    /// Written by the coordinator: what the agent must answer in `spec.keyProof`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_challenge: Option<KeyChallenge>,
}

/// `Some` report when it parses, else `None`: one bad report must not hide the object (and
/// with it the node's spec) from every watcher.
fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<MeshHealth>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// One agent's summary of its tunnels. Its size does not grow with the mesh while the mesh
/// is healthy (no per-peer entry for a tunnel that is up at full size), so N nodes writing it
/// and N agents watching it cost O(N), not O(N²). Per-peer counters and handshake times stay
/// on the node (`isthmus-agent peers`, `wg show`, metrics).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshHealth {
    /// When the agent took the reading; an old one means the agent stopped reporting.
    pub observed_time: Time,
    /// Tunnels with a handshake younger than the agent's threshold (`--handshake-stale-seconds`).
    #[schemars(range(min = 0))]
    pub peers_up: i32,
    /// Tunnels the agent wants: the admitted peers its topology pairs it with.
    #[schemars(range(min = 0))]
    pub peers_expected: i32,
    /// Every wanted peer whose tunnel is not up (never handshook, handshake too old, or not
    /// configured yet), by node name, sorted; empty while the mesh is healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down_peers: Vec<String>,
    /// The smallest path MTU among the peers (`kubectl get wgp -o wide` shows it).
    #[serde(
        default,
        rename = "lowestPathMTU",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0, max = 65535))]
    pub lowest_path_mtu: Option<i32>,
    /// Per peer, the path MTU probing found, only where it is below this node's tunnel MTU
    /// (a full-size path needs no entry); sorted by node.
    #[serde(default, rename = "pathMTUs", skip_serializing_if = "Vec::is_empty")]
    pub path_mtus: Vec<PeerPathMtu>,
}

impl MeshHealth {
    /// Equal but for when it was observed: nothing worth a write.
    pub fn same_summary(&self, other: &MeshHealth) -> bool {
        (
            self.peers_up,
            self.peers_expected,
            &self.down_peers,
            self.lowest_path_mtu,
            &self.path_mtus,
        ) == (
            other.peers_up,
            other.peers_expected,
            &other.down_peers,
            other.lowest_path_mtu,
            &other.path_mtus,
        )
    }
}

/// A tunnel whose path carries less than the tunnel MTU.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerPathMtu {
    /// The peer's node (its WireGuardPeer's name).
    pub node: String,
    /// The largest packet the path to the peer carries through the tunnel, as the agent's
    /// probing found it.
    #[serde(rename = "pathMTU")]
    #[schemars(range(min = 0, max = 65535))]
    pub path_mtu: i32,
}

impl WireGuardPeer {
    /// The coordinator's current verdict: `Admitted=True` for this very generation of the
    /// spec. A spec changed since (a new key, say) is not admitted until re-checked.
    pub fn is_admitted(&self) -> bool {
        // A peer being deleted is out, whatever its conditions say: a finalizer someone added
        // must not keep a revoked node in the mesh.
        if self.meta().deletion_timestamp.is_some() {
            return false;
        }
        let generation = self.meta().generation;
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ADMITTED))
            .is_some_and(|c| c.status == "True" && c.observed_generation == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(health: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"meshIP": "100.96.0.3", "health": health})
    }

    #[test]
    fn a_report_that_does_not_parse_reads_as_none_and_keeps_the_rest() {
        // An older agent's per-peer report: no counts, so no summary.
        let old = status(serde_json::json!({
            "observedTime": "2026-11-29T19:00:00Z",
            "peers": [{"node": "aws-1", "rxBytes": 9, "txBytes": 7}],
        }));
        let s: WireGuardPeerStatus = serde_json::from_value(old).unwrap();
        assert_eq!((s.mesh_ip.as_deref(), s.health), (Some("100.96.0.3"), None));
        let junk = status(serde_json::json!("not a report"));
        let s: WireGuardPeerStatus = serde_json::from_value(junk).unwrap();
        assert_eq!(s.health, None);
    }

    #[test]
    fn a_healthy_summary_round_trips_without_lists() {
        let new = status(serde_json::json!({
            "observedTime": "2026-11-29T19:00:00Z",
            "peersUp": 2,
            "peersExpected": 2,
            "lowestPathMTU": 1420,
        }));
        let s: WireGuardPeerStatus = serde_json::from_value(new.clone()).unwrap();
        let h = s.health.as_ref().unwrap();
        assert_eq!((h.peers_up, h.peers_expected), (2, 2));
        assert!(h.down_peers.is_empty() && h.path_mtus.is_empty());
        assert_eq!(serde_json::to_value(&s).unwrap(), new);
    }
}
