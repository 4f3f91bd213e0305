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

/// How one user cluster is served: its mesh pool, topology and pacing.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub pool: Pool,
    pub topology: Topology,
    pub resync: Duration,
    pub health: Thresholds,
}

/// Which Lease picks the one replica that acts, and how long a leader's claim lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// Single-cluster mode: the cluster served is the one the Lease lives in.
pub struct Settings {
    pub cluster: ClusterSettings,
    pub lease: LeaseSettings,
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
    settings: ClusterSettings,
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

/// What a per-cluster controller tells whoever runs it. Called from its own task; cheap.
pub trait Observer: Send + Sync + 'static {
    /// Both watch caches hold a full list: the cluster is served.
    fn synced(&self, _peers: &Store<WireGuardPeer>) {}
    /// A watch failed (`Some`: the error) or delivered again (`None`).
    fn watch(&self, _error: Option<&kube::runtime::watcher::Error>) {}
    fn pass_started(&self) {}
    /// A pass ended (leader only), with how long it took and whether it failed.
    fn pass_finished(&self, _took: Option<Duration>, _error: Option<&anyhow::Error>) {}
}

impl Observer for CoordinatorOps {
    fn synced(&self, peers: &Store<WireGuardPeer>) {
        self.caches_synced(peers.clone());
    }
    fn pass_started(&self) {
        CoordinatorOps::pass_started(self);
    }
    fn pass_finished(&self, took: Option<Duration>, _error: Option<&anyhow::Error>) {
        if let Some(took) = took {
            self.observe_reconcile(took);
        }
        CoordinatorOps::pass_finished(self);
    }
}

/// Aborts a spawned task when dropped, so a cluster's watches end with its controller.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches `K` into a store, waking `changed` on every event and telling `observer`.
pub(crate) fn watch_into<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    observer: Arc<dyn Observer>,
) -> AbortOnDrop
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&()).to_string();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(move |event| {
            match &event {
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch error; retrying");
                    observer.watch(Some(e));
                }
                Ok(_) => observer.watch(None),
            }
            changed.notify_one();
            futures::future::ready(())
        });
    AbortOnDrop(tokio::spawn(stream))
}

/// Serves one cluster until dropped (or `leading`'s sender is gone): watches its peers and
/// Nodes, and while `leading` says so, reconciles on every change and every `resync`. The
/// lease is not its business: whoever runs it holds or watches the lease.
pub async fn serve_cluster(
    client: Client,
    settings: ClusterSettings,
    mut leading: tokio::sync::watch::Receiver<bool>,
    observer: Arc<dyn Observer>,
) -> anyhow::Result<()> {
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let changed = Arc::new(Notify::new());
    let (peer_store, peer_writer) = reflector::store();
    let (node_store, node_writer) = reflector::store();
    let _watches = [
        watch_into(
            peers.clone(),
            peer_writer,
            changed.clone(),
            observer.clone(),
        ),
        watch_into(nodes, node_writer, changed.clone(), observer.clone()),
    ];
    let controller = Controller {
        peers,
        peer_store,
        node_store,
        settings,
    };
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
    observer.synced(&controller.peer_store);
    loop {
        observer.pass_started();
        let is_leading = *leading.borrow_and_update();
        if is_leading {
            let started = std::time::Instant::now();
            let result = controller.reconcile().await;
            if let Err(e) = &result {
                tracing::warn!(error = format!("{e:#}"), "reconcile failed; will retry");
            }
            observer.pass_finished(Some(started.elapsed()), result.as_ref().err());
        } else {
            observer.pass_finished(None, None);
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = changed.notified() => {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep(controller.settings.resync) => {}
        }
    }
}

/// Holds or watches `lock` until `shutdown` resolves, publishing in `leading` whether this
/// replica acts; then releases the lease if held. Renews every fifth of the lease, on its
/// own task, so no reconcile pass delays a renewal.
pub async fn lead(
    lock: LeaseLock,
    settings: LeaseSettings,
    leading: tokio::sync::watch::Sender<bool>,
    ops: Arc<CoordinatorOps>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let renew_every = settings.duration / 5;
    loop {
        let was = *leading.borrow();
        let checked = lock.acquire_or_renew().await;
        let now = match &checked {
            Ok(held) => *held,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "lease check failed; not acting");
                false
            }
        };
        ops.lease_checked(checked.is_ok(), now);
        if now != was {
            tracing::info!(identity = %settings.identity, leading = now, "leadership changed");
            leading.send_replace(now);
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(renew_every) => {}
        }
    }
    if leading.send_replace(false) {
        if let Err(e) = lock.release().await {
            tracing::warn!(error = format!("{e:#}"), "could not release the lease");
        }
    }
}

/// Single-cluster mode: serves the cluster `client` points at, the Lease in that cluster too.
/// Runs until `shutdown` resolves; then releases the lease. Progress is reported to `ops`.
pub async fn run(
    client: Client,
    settings: Settings,
    ops: Arc<CoordinatorOps>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let lock = LeaseLock::new(
        client.clone(),
        &settings.lease.namespace,
        &settings.lease.name,
        &settings.lease.identity,
        settings.lease.duration,
    );
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let serve = serve_cluster(client, settings.cluster, leading_rx, ops.clone());
    let lead = lead(lock, settings.lease, leading_tx, ops, shutdown);
    tokio::pin!(serve);
    tokio::pin!(lead);
    tokio::select! {
        // The lease loop ends on shutdown, after releasing the lease.
        _ = &mut lead => Ok(()),
        result = &mut serve => result,
    }
}
