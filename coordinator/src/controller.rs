//! Watches WireGuardPeers and Nodes, runs `decide` on every change (and periodically), and
//! applies the plan: status through server-side apply with the coordinator's field manager,
//! only where it differs; deletions for peers whose Node is gone. Acts only while holding the
//! lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use isthmus_api::{Topology, WireGuardPeer, ADMITTED, COORDINATOR_MANAGER, MESH_CONNECTED};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use crate::decide::{decide, DesiredStatus, NodeView, PeerView, Plan, Pool};
use crate::health::{self, Member, Report, Thresholds, Verdict};
use crate::lease::LeaseLock;
use crate::ops::CoordinatorOps;

pub struct Settings {
    pub pool: Pool,
    pub topology: Topology,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub resync: Duration,
    pub health: Thresholds,
}

/// The `MeshConnected` condition the coordinator wants on an admitted peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshCondition {
    pub verdict: Verdict,
    pub observed_generation: i64,
    /// Kept from the current condition while its status holds.
    pub last_transition: String,
}

fn timestamp(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_second()
}

/// What `health` needs of a peer: its location and its agent's last reading.
pub fn member(p: &WireGuardPeer) -> Member {
    let report = p
        .status
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .map(|h| Report {
            observed: timestamp(&h.observed_time),
            handshakes: h
                .peers
                .iter()
                .map(|ph| (ph.node.clone(), ph.latest_handshake.as_ref().map(timestamp)))
                .collect(),
        });
    Member {
        name: p.name_any(),
        location: p.spec.location.clone(),
        report,
    }
}

fn condition<'a>(
    p: &'a WireGuardPeer,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn true_false(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

pub fn peer_view(p: &WireGuardPeer) -> PeerView {
    let status = p.status.as_ref();
    let admitted = status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ADMITTED))
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone(),
                c.last_transition_time.0.to_string(),
            )
        });
    PeerView {
        name: p.name_any(),
        generation: p.metadata.generation.unwrap_or(0),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        public_key: p.spec.public_key.clone(),
        node_ip: p.spec.node_ip.clone(),
        pod_cidrs: p.spec.pod_cidrs.clone(),
        location: p.spec.location.clone(),
        vtep: p.spec.vtep.as_ref().map(|v| (v.mac.clone(), v.ip.clone())),
        mesh_ip: status.and_then(|s| s.mesh_ip.clone()),
        admitted,
    }
}

pub fn node_view(n: &Node) -> NodeView {
    NodeView {
        name: n.name_any(),
        addresses: isthmus_api::node::addresses(n)
            .into_iter()
            .map(|(_, a)| a)
            .collect(),
        pod_cidrs: isthmus_api::node::pod_cidrs(n),
        region: isthmus_api::node::region(n),
        vtep: isthmus_api::node::flannel_vtep(n),
    }
}

/// Whether the object already carries what we want (ignoring times when the verdict holds).
fn up_to_date(p: &WireGuardPeer, want: &DesiredStatus, mesh: Option<&MeshCondition>) -> bool {
    let mesh_ok = match (condition(p, MESH_CONNECTED), mesh) {
        (None, None) => true,
        (Some(c), Some(m)) => {
            c.status == true_false(m.verdict.connected)
                && c.reason == m.verdict.reason
                && c.message == m.verdict.message
                && c.observed_generation == Some(m.observed_generation)
        }
        _ => false,
    };
    mesh_ok && admission_up_to_date(p, want)
}

fn admission_up_to_date(p: &WireGuardPeer, want: &DesiredStatus) -> bool {
    let Some(status) = p.status.as_ref() else {
        return false;
    };
    let cond = status.conditions.iter().find(|c| c.type_ == ADMITTED);
    status.mesh_ip == want.mesh_ip
        && status.mesh_cidr.as_deref() == Some(want.mesh_cidr.as_str())
        && status.topology == Some(want.topology)
        && cond.is_some_and(|c| {
            c.status
                == if want.admission.admitted {
                    "True"
                } else {
                    "False"
                }
                && c.reason == want.admission.reason
                && c.message == want.admission.message
                && c.observed_generation == Some(want.observed_generation)
        })
}

fn status_patch(
    name: &str,
    want: &DesiredStatus,
    mesh: Option<&MeshCondition>,
) -> serde_json::Value {
    let mut conditions = vec![serde_json::json!({
        "type": ADMITTED,
        "status": true_false(want.admission.admitted),
        "reason": want.admission.reason,
        "message": want.admission.message,
        "observedGeneration": want.observed_generation,
        "lastTransitionTime": want.last_transition,
    })];
    if let Some(m) = mesh {
        conditions.push(serde_json::json!({
            "type": MESH_CONNECTED,
            "status": true_false(m.verdict.connected),
            "reason": m.verdict.reason,
            "message": m.verdict.message,
            "observedGeneration": m.observed_generation,
            "lastTransitionTime": m.last_transition,
        }));
    }
    serde_json::json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": name},
        "status": {
            "meshIP": want.mesh_ip,
            "meshCIDR": want.mesh_cidr,
            "topology": want.topology,
            "conditions": conditions,
        }
    })
}

struct Controller {
    peers: Api<WireGuardPeer>,
    peer_store: Store<WireGuardPeer>,
    node_store: Store<Node>,
    settings: Settings,
}

impl Controller {
    fn plan(&self) -> Plan {
        let peers: Vec<PeerView> = self
            .peer_store
            .state()
            .iter()
            .map(|p| peer_view(p))
            .collect();
        let nodes: Vec<NodeView> = self
            .node_store
            .state()
            .iter()
            .map(|n| node_view(n))
            .collect();
        let now = Timestamp::now().to_string();
        decide(
            &peers,
            &nodes,
            &self.settings.pool,
            self.settings.topology,
            &now,
        )
    }

    /// `MeshConnected` for every peer the plan admits.
    fn mesh_conditions(&self, plan: &Plan, now: &Timestamp) -> BTreeMap<String, MeshCondition> {
        let peers = self.peer_store.state();
        let members: Vec<Member> = peers
            .iter()
            .filter(|p| {
                plan.statuses
                    .get(&p.name_any())
                    .is_some_and(|s| s.admission.admitted)
            })
            .map(|p| member(p))
            .collect();
        let verdicts = health::mesh_connected(
            &members,
            self.settings.topology,
            now.as_second(),
            &self.settings.health,
        );
        verdicts
            .into_iter()
            .filter_map(|(name, verdict)| {
                let peer = peers.iter().find(|p| p.name_any() == name)?;
                let last_transition = match condition(peer, MESH_CONNECTED) {
                    Some(c) if c.status == true_false(verdict.connected) => {
                        c.last_transition_time.0.to_string()
                    }
                    _ => now.to_string(),
                };
                let observed_generation = peer.metadata.generation.unwrap_or(0);
                Some((
                    name,
                    MeshCondition {
                        verdict,
                        observed_generation,
                        last_transition,
                    },
                ))
            })
            .collect()
    }

    async fn reconcile(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let plan = self.plan();
        let mesh = self.mesh_conditions(&plan, &Timestamp::now());
        let ssa = PatchParams::apply(COORDINATOR_MANAGER).force();
        let mut written = 0;
        for (name, want) in &plan.statuses {
            let current = self
                .peer_store
                .state()
                .into_iter()
                .find(|p| p.name_any() == *name);
            let mesh = mesh.get(name);
            if current
                .as_deref()
                .is_some_and(|p| up_to_date(p, want, mesh))
            {
                continue;
            }
            self.peers
                .patch_status(name, &ssa, &Patch::Apply(status_patch(name, want, mesh)))
                .await
                .with_context(|| format!("writing status of {name}"))?;
            written += 1;
            tracing::info!(
                peer = %name,
                admitted = want.admission.admitted,
                reason = want.admission.reason,
                mesh_ip = want.mesh_ip.as_deref().unwrap_or("-"),
                mesh_connected = mesh.map(|m| m.verdict.connected),
                mesh_reason = mesh.map(|m| m.verdict.reason),
                "status written"
            );
        }
        for name in &plan.deletions {
            match self.peers.delete(name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(peer = %name, "deleted: its Node is gone"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {name}")),
            }
        }
        tracing::debug!(
            written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconciled"
        );
        Ok(())
    }
}

/// Runs until `shutdown` resolves; then releases the lease. Progress is reported to `ops`.
pub async fn run(
    client: Client,
    settings: Settings,
    ops: Arc<CoordinatorOps>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let changed = Arc::new(Notify::new());

    let (peer_store, peer_writer) = reflector::store();
    let (node_store, node_writer) = reflector::store();
    let watch_peers = {
        let changed = changed.clone();
        watcher(peers.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(peer_writer)
            .for_each(move |event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "WireGuardPeer watch error; retrying");
                }
                changed.notify_one();
                futures::future::ready(())
            })
    };
    let watch_nodes = {
        let changed = changed.clone();
        watcher(nodes, watcher::Config::default())
            .default_backoff()
            .reflect(node_writer)
            .for_each(move |event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "Node watch error; retrying");
                }
                changed.notify_one();
                futures::future::ready(())
            })
    };
    tokio::spawn(watch_peers);
    tokio::spawn(watch_nodes);

    let lock = LeaseLock::new(
        client,
        &settings.lease_namespace,
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    );
    let controller = Controller {
        peers,
        peer_store,
        node_store,
        settings,
    };
    tokio::pin!(shutdown);

    controller
        .peer_store
        .wait_until_ready()
        .await
        .context("peer cache")?;
    controller
        .node_store
        .wait_until_ready()
        .await
        .context("node cache")?;
    ops.caches_synced(controller.peer_store.clone());
    let renew_every = controller.settings.lease_duration / 5;
    let mut leading = false;
    let mut next_renew = tokio::time::Instant::now();
    loop {
        ops.pass_started();
        if tokio::time::Instant::now() >= next_renew {
            let was = leading;
            let checked = lock.acquire_or_renew().await;
            leading = match &checked {
                Ok(held) => *held,
                Err(e) => {
                    tracing::warn!(error = %e, "lease check failed; not acting");
                    false
                }
            };
            ops.lease_checked(checked.is_ok(), leading);
            if leading != was {
                tracing::info!(identity = %controller.settings.identity, leading, "leadership changed");
            }
            next_renew = tokio::time::Instant::now() + renew_every;
        }
        if leading {
            let started = std::time::Instant::now();
            if let Err(e) = controller.reconcile().await {
                tracing::warn!(error = format!("{e:#}"), "reconcile failed; will retry");
            }
            ops.observe_reconcile(started.elapsed());
        }
        ops.pass_finished();
        let wake = std::cmp::min(
            next_renew,
            tokio::time::Instant::now() + controller.settings.resync,
        );
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.notified() => {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    if leading {
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "could not release the lease");
        }
    }
    Ok(())
}
