//! The agent's heartbeat: a `coordination.k8s.io/v1` Lease per node, renewed by its agent,
//! watched by the coordinator alone.
//!
//! Why a Lease and not a timestamp in the WireGuardPeer: every agent watches every
//! WireGuardPeer, so a heartbeat written there reaches all N agents — N² bytes a minute and
//! a cache rewrite per event on every node (issue 14 measured 2 MiB/min per agent at 1,000
//! nodes). Kubernetes moved the kubelet's heartbeat out of the Node object into Leases for
//! the same reason. The WireGuardPeer's `status.health` is then written only when it
//! changes.
//!
//! The coordinator judges a heartbeat by its own clock: when it sees `renewTime` change it
//! notes *its* time ([`observe`]), so an agent's wrong clock cannot keep a dead node fresh.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;

/// Label on every heartbeat Lease; the coordinator watches only these.
pub const LABEL: &str = "isthmus.dev/heartbeat";
/// The label's value: the agent's heartbeat (room for others later).
pub const AGENT: &str = "agent";
/// Prefix of a node's Lease name. The admission policy lets an agent write only
/// `PREFIX + its node`, so no agent can renew another's, nor the coordinator's Lease.
pub const PREFIX: &str = "isthmus-agent-";
/// Where the Leases live unless configured: the namespace isthmus is installed in.
pub const DEFAULT_NAMESPACE: &str = "isthmus-system";
/// How many heartbeats a Lease claims to last (`leaseDurationSeconds`); informative, the
/// coordinator applies its own `--report-stale-seconds`.
const HEARTBEATS_PER_LEASE: u64 = 3;

/// The Lease name for `node`, or why there is none: a Lease name is at most 253
/// characters, and the prefix takes 14.
pub fn lease_name(node: &str) -> Result<String, String> {
    let name = format!("{PREFIX}{node}");
    if name.len() > 253 {
        return Err(format!(
            "node name {node:?} is too long for a heartbeat Lease ({} characters, at most {})",
            node.len(),
            253 - PREFIX.len()
        ));
    }
    Ok(name)
}

/// The node a heartbeat Lease belongs to, from its holder (the agent writes its node there
/// and the admission policy checks it), else from its name.
pub fn node_of(lease: &Lease) -> Option<String> {
    let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
    holder.or_else(|| {
        lease
            .metadata
            .name
            .as_deref()?
            .strip_prefix(PREFIX)
            .map(str::to_string)
    })
}

/// When the agent last renewed, by its own clock (Unix seconds).
pub fn renewed(lease: &Lease) -> Option<i64> {
    let MicroTime(t) = lease.spec.as_ref()?.renew_time.as_ref()?;
    Some(t.as_second())
}

/// The server-side-apply body an agent renews its Lease with: holder, duration and
/// `renewTime = now`. `owner` is the UID of the node's WireGuardPeer, when known: the
/// Lease is then its dependent, and the garbage collector removes it with the peer, so a
/// removed node or an uninstall leaves no Lease behind.
pub fn renewal(
    node: &str,
    namespace: &str,
    heartbeat_seconds: u64,
    owner: Option<&str>,
    now: Timestamp,
) -> Result<serde_json::Value, String> {
    let duration = heartbeat_seconds
        .saturating_mul(HEARTBEATS_PER_LEASE)
        .clamp(1, i32::MAX as u64);
    let owners: Vec<serde_json::Value> = owner
        .map(|uid| {
            serde_json::json!({
                "apiVersion": "isthmus.dev/v1alpha1",
                "kind": "WireGuardPeer",
                "name": node,
                "uid": uid,
            })
        })
        .into_iter()
        .collect();
    Ok(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(node)?,
            "namespace": namespace,
            "labels": {LABEL: AGENT},
            "ownerReferences": owners,
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "renewTime": MicroTime(now),
        },
    }))
}

/// What the coordinator remembers of one node's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The Lease's `renewTime` (agent's clock), to tell a renewal from a repeat.
    pub renewed: i64,
    /// When the agent was last known alive, by the coordinator's clock.
    pub alive: i64,
}

/// Folds one observation of a Lease into what was known. A renewal the coordinator sees
/// happen counts at the coordinator's `now`. A Lease seen for the first time (the
/// coordinator started, or the node is new) counts at its own `renewTime`, never later than
/// `now`: a node dead for an hour is not fresh just because the coordinator restarted, and
/// one with its clock ahead is no fresher than now. A repeat (a resync, another field
/// changed) is no sign of life.
pub fn observe(before: Option<Seen>, renewed: i64, now: i64) -> Seen {
    match before {
        None => Seen {
            renewed,
            alive: renewed.min(now),
        },
        Some(b) if b.renewed == renewed => b,
        Some(_) => Seen {
            renewed,
            alive: now,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_table() {
        const NOW: i64 = 1_800_000_000;
        // (case, before, renewTime seen) → alive
        let rows: Vec<(&str, Option<Seen>, i64, i64)> = vec![
            (
                "first sight counts at its renewTime",
                None,
                NOW - 40,
                NOW - 40,
            ),
            (
                "first sight of a long-dead node is old",
                None,
                NOW - 3600,
                NOW - 3600,
            ),
            (
                "first sight dated ahead counts as now",
                None,
                NOW + 3600,
                NOW,
            ),
            (
                "a renewal counts at the coordinator's clock",
                Some(Seen {
                    renewed: NOW - 60,
                    alive: NOW - 55,
                }),
                NOW - 3000,
                NOW,
            ),
            (
                "a renewal from a clock an hour ahead counts now, not an hour ahead",
                Some(Seen {
                    renewed: NOW + 3540,
                    alive: NOW - 60,
                }),
                NOW + 3600,
                NOW,
            ),
            (
                "the same renewTime again is no sign of life",
                Some(Seen {
                    renewed: NOW - 200,
                    alive: NOW - 190,
                }),
                NOW - 200,
                NOW - 190,
            ),
        ];
        for (case, before, renewed, alive) in rows {
            let seen = observe(before, renewed, NOW);
            assert_eq!((seen.alive, seen.renewed), (alive, renewed), "{case}");
        }
    }

    #[test]
    fn a_lease_names_its_node_and_is_refused_when_too_long() {
        assert_eq!(lease_name("aws-1").as_deref(), Ok("isthmus-agent-aws-1"));
        assert!(lease_name(&"n".repeat(239)).is_ok());
        let err = lease_name(&"n".repeat(240)).unwrap_err();
        assert!(err.contains("at most 239"), "{err}");
    }

    #[test]
    fn a_renewal_round_trips_into_a_lease() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let body = renewal("aws-1", "isthmus-system", 60, Some("u-1"), now).unwrap();
        let lease: Lease = serde_json::from_value(body).unwrap();
        let owners = lease.metadata.owner_references.clone().unwrap();
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("WireGuardPeer", "u-1")
        );
        assert_eq!(node_of(&lease).as_deref(), Some("aws-1"));
        assert_eq!(renewed(&lease), Some(1_800_000_000));
        let spec = lease.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(180));
        assert_eq!(
            lease
                .metadata
                .labels
                .unwrap()
                .get(LABEL)
                .map(String::as_str),
            Some(AGENT)
        );
        // No holder (written by hand): the name says whose it is.
        let bare: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "isthmus-agent-gcp-2"}, "spec": {}
        }))
        .unwrap();
        assert_eq!(node_of(&bare).as_deref(), Some("gcp-2"));
    }
}
