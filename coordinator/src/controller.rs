//! Watches WireGuardPeers and Nodes, runs `decide` on every change (and periodically), and
//! applies the plan: status through server-side apply with the coordinator's field manager,
//! only where it differs; deletions for peers whose Node is gone. Acts only while holding the
//! lease.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use isthmus_api::heartbeat::{self, Seen};
use isthmus_api::{
    KeyChallenge, Topology, WireGuardPeer, ADMITTED, COORDINATOR_MANAGER, MESH_CONNECTED,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use crate::decide::{decide, DesiredStatus, KeyPossession, NodeView, PeerView, Plan, Pool};
use crate::health::{self, Member, Report, Thresholds, Verdict};
use crate::identity::CoordinatorKey;
use crate::lease::LeaseLock;
use crate::ops::CoordinatorOps;

/// How one user cluster is served: its mesh pool, topology and pacing.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub pool: Pool,
    pub topology: Topology,
    pub resync: Duration,
    pub health: Thresholds,
    /// What agents prove their keys against ([`isthmus_api::proof`]).
    pub key: CoordinatorKey,
    /// How long after its first challenge a peer admitted before keeps its admission
    /// without an answer: an upgrade from agents without proofs drops no tunnel.
    pub key_proof_grace: Duration,
    /// Where the agents' heartbeat Leases live ([`isthmus_api::heartbeat`]).
    pub heartbeat_namespace: String,
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

/// What `health` needs of a peer: its location and its agent's last reading. The reading is
/// as fresh as the agent's heartbeat Lease, by the coordinator's clock, when it has one: the
/// report itself is written only when it changes. An agent without a Lease (RBAC from before
/// Leases, or an older agent) rewrites its report every heartbeat, so the report's own
/// time stands in.
pub fn member(p: &WireGuardPeer, heartbeat: Option<&Seen>) -> Member {
    let report = p
        .status
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .map(|h| Report {
            observed: heartbeat.map_or_else(|| timestamp(&h.observed_time), |seen| seen.alive),
            down: h.down_peers.iter().cloned().collect(),
        });
    Member {
        name: p.name_any(),
        location: p.spec.location.clone(),
        report,
        admitted: condition(p, ADMITTED)
            .filter(|c| c.status == "True")
            .map(|c| timestamp(&c.last_transition_time)),
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

/// The challenge `p`'s agent must answer: the coordinator's key, a nonce bound to the
/// object, and when it was first asked (kept while key and nonce stay the same).
pub fn key_challenge(p: &WireGuardPeer, key: &CoordinatorKey, now: &Timestamp) -> KeyChallenge {
    let uid = p.metadata.uid.clone().unwrap_or_else(|| p.name_any());
    let nonce = isthmus_api::proof::challenge_nonce(key.private(), &uid);
    let issued = p
        .status
        .as_ref()
        .and_then(|s| s.key_challenge.as_ref())
        .filter(|c| c.coordinator_key == key.public() && c.nonce == nonce)
        .map_or(Time(*now), |c| c.issued.clone());
    KeyChallenge {
        coordinator_key: key.public().to_string(),
        nonce,
        issued,
    }
}

/// Whether `p`'s `spec.keyProof` answers `challenge`. A proof that fails while the agent
/// has not yet seen this challenge (a new coordinator key) counts as unanswered, not wrong.
pub fn key_possession(
    p: &WireGuardPeer,
    key: &CoordinatorKey,
    challenge: &KeyChallenge,
    now: &Timestamp,
    grace: Duration,
) -> KeyPossession {
    let asked = p.status.as_ref().and_then(|s| s.key_challenge.as_ref());
    let in_grace = (now.as_second() - challenge.issued.0.as_second())
        < i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    match &p.spec.key_proof {
        Some(proof)
            if isthmus_api::proof::verify(
                key.private(),
                &p.spec.public_key,
                &p.name_any(),
                &challenge.nonce,
                proof,
            ) =>
        {
            KeyPossession::Proven
        }
        Some(_) if asked == Some(challenge) => KeyPossession::Wrong,
        _ => KeyPossession::Unanswered { grace: in_grace },
    }
}

pub fn peer_view(p: &WireGuardPeer, key: KeyPossession) -> PeerView {
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
        vtep6: p.spec.vtep6.as_ref().map(|v| (v.mac.clone(), v.ip.clone())),
        mesh_ip: status.and_then(|s| s.mesh_ip.clone()),
        mesh_ipv6: status.and_then(|s| s.mesh_ipv6.clone()),
        admitted,
        endpoint: p.spec.endpoint.clone(),
        deleting: p.metadata.deletion_timestamp.is_some(),
        key,
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
        vtep6: isthmus_api::node::flannel_vtep6(n),
    }
}

/// Whether the object already carries what we want (ignoring times when the verdict holds).
fn up_to_date(
    p: &WireGuardPeer,
    want: &DesiredStatus,
    mesh: Option<&MeshCondition>,
    challenge: Option<&KeyChallenge>,
) -> bool {
    let challenge_ok = p.status.as_ref().and_then(|s| s.key_challenge.as_ref()) == challenge;
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
    challenge_ok && mesh_ok && admission_up_to_date(p, want)
}

fn admission_up_to_date(p: &WireGuardPeer, want: &DesiredStatus) -> bool {
    let Some(status) = p.status.as_ref() else {
        return false;
    };
    let cond = status.conditions.iter().find(|c| c.type_ == ADMITTED);
    status.mesh_ip == want.mesh_ip
        && status.mesh_cidr.as_deref() == Some(want.mesh_cidr.as_str())
        && status.mesh_ipv6 == want.mesh_ipv6
        && status.mesh_cidr_v6 == want.mesh_cidr_v6
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

/// The status apply for `name`, conditional on the object still being at `resource_version`
/// (what the pass decided from): a write decided on a stale view — a paused leader resumed
/// after another took over, a watch behind — fails with a conflict instead of undoing
/// newer state; the next pass decides again.
fn status_patch(
    name: &str,
    want: &DesiredStatus,
    mesh: Option<&MeshCondition>,
    challenge: Option<&KeyChallenge>,
    resource_version: Option<&str>,
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
        "metadata": {"name": name, "resourceVersion": resource_version},
        "status": {
            "meshIP": want.mesh_ip,
            "meshCIDR": want.mesh_cidr,
            "meshIPv6": want.mesh_ipv6,
            "meshCIDRv6": want.mesh_cidr_v6,
            "topology": want.topology,
            "conditions": conditions,
            "keyChallenge": challenge,
        }
    })
}

struct Controller {
    peers: Api<WireGuardPeer>,
    /// For a live read before acting on a Node's absence (see [`Controller::node_exists`]).
    nodes: Api<Node>,
    peer_store: Store<WireGuardPeer>,
    node_store: Store<Node>,
    settings: ClusterSettings,
    /// The latest run of watch errors: (first, last), Unix seconds.
    outage: Arc<parking_lot::Mutex<Option<(i64, i64)>>>,
    /// The agents' heartbeats as seen, by node.
    heartbeats: Heartbeats,
}

/// The agents' heartbeats as the coordinator saw them.
type Heartbeats = Arc<parking_lot::Mutex<HeartbeatMap>>;

/// The heartbeats seen, by node, and the nodes seen so far in a re-list (after a watch
/// restart) so those whose Lease went meanwhile are forgotten when it ends.
#[derive(Default)]
struct HeartbeatMap {
    nodes: HashMap<String, Seen>,
    relisted: Option<std::collections::HashSet<String>>,
}

impl HeartbeatMap {
    /// Folds one watch event in; says whether a pass should run: a node came back (first
    /// seen, or silent for over `stale` seconds) or its Lease went. Steady renewals return
    /// false, and a node falling silent is found by the periodic pass.
    fn fold(&mut self, event: watcher::Event<Lease>, now: i64, stale: i64) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisted = Some(Default::default());
                false
            }
            watcher::Event::InitApply(lease) | watcher::Event::Apply(lease) => {
                let (Some(node), Some(renewed)) =
                    (heartbeat::node_of(&lease), heartbeat::renewed(&lease))
                else {
                    return false;
                };
                let before = self.nodes.get(&node).copied();
                let back = before.is_none_or(|b| now - b.alive > stale);
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(node.clone());
                }
                self.nodes
                    .insert(node, heartbeat::observe(before, renewed, now));
                back
            }
            watcher::Event::InitDone => match self.relisted.take() {
                Some(relisted) => {
                    let before = self.nodes.len();
                    self.nodes.retain(|node, _| relisted.contains(node));
                    self.nodes.len() != before
                }
                None => false,
            },
            watcher::Event::Delete(lease) => {
                heartbeat::node_of(&lease).is_some_and(|node| self.nodes.remove(&node).is_some())
            }
        }
    }
}

/// Watches the heartbeat Leases in `api`'s namespace into `heartbeats`, waking a pass when
/// [`HeartbeatMap::fold`] says so.
fn watch_heartbeats(
    api: Api<Lease>,
    heartbeats: Heartbeats,
    changed: Arc<Notify>,
    stale: i64,
) -> AbortOnDrop {
    let selector = format!("{}={}", heartbeat::LABEL, heartbeat::AGENT);
    let stream = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    let now = Timestamp::now().as_second();
                    if heartbeats.lock().fold(event, now, stale) {
                        changed.notify_one();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat Lease watch error; retrying"),
            }
            futures::future::ready(())
        });
    AbortOnDrop(tokio::spawn(stream))
}

/// Seconds to add to the report threshold after an outage: its length
/// (first to last watch error of the latest run) plus a report period (the watch's backoff
/// may notice the API server's return late), for one report period after its last error. The agents report again within that period; until then a reading the outage kept
/// from being renewed does not turn every node's `MeshConnected` false.
pub fn outage_grace(outage: Option<(i64, i64)>, now: i64, report: i64) -> i64 {
    match outage {
        Some((first, last)) if now - last < report => (last - first).max(0) + report,
        _ => 0,
    }
}

/// Records watch errors into a run (errors less than `report` seconds apart belong to the
/// same outage), then tells the observer it wraps.
struct OutageObserver {
    inner: Arc<dyn Observer>,
    outage: Arc<parking_lot::Mutex<Option<(i64, i64)>>>,
    report: i64,
}

impl Observer for OutageObserver {
    fn synced(&self, peers: &Store<WireGuardPeer>) {
        self.inner.synced(peers);
    }
    fn watch(&self, error: Option<&kube::runtime::watcher::Error>) {
        if error.is_some() {
            let now = Timestamp::now().as_second();
            let mut outage = self.outage.lock();
            *outage = match *outage {
                Some((first, last)) if now - last < self.report => Some((first, now)),
                _ => Some((now, now)),
            };
        }
        self.inner.watch(error);
    }
    fn pass_started(&self) {
        self.inner.pass_started();
    }
    fn pass_finished(&self, took: Option<Duration>, error: Option<&anyhow::Error>) {
        self.inner.pass_finished(took, error);
    }
}

/// The refusal that rests on the Node cache alone, so the one checked live first.
const NODE_NOT_FOUND: &str = "NodeNotFound";

impl Controller {
    /// Whether the Node named `name` exists, read from the API server rather than the
    /// cache. The two watches recover independently after an outage, so for a while the
    /// peer cache can hold a node that joined meanwhile while the Node cache does not yet:
    /// refusing or deleting it then would de-admit a legitimate node.
    async fn node_exists(&self, name: &str) -> anyhow::Result<bool> {
        Ok(timed(self.nodes.get_opt(name))
            .await
            .with_context(|| format!("reading Node {name}"))?
            .is_some())
    }

    /// The plan, and the key challenge each peer's status should carry.
    fn plan(&self) -> (Plan, HashMap<String, KeyChallenge>) {
        let now = Timestamp::now();
        let mut challenges = HashMap::new();
        let peers: Vec<PeerView> = self
            .peer_store
            .state()
            .iter()
            .map(|p| {
                let key = &self.settings.key;
                let challenge = key_challenge(p, key, &now);
                let possession =
                    key_possession(p, key, &challenge, &now, self.settings.key_proof_grace);
                challenges.insert(p.name_any(), challenge);
                peer_view(p, possession)
            })
            .collect();
        let nodes: Vec<NodeView> = self
            .node_store
            .state()
            .iter()
            .map(|n| node_view(n))
            .collect();
        let plan = decide(
            &peers,
            &nodes,
            &self.settings.pool,
            self.settings.topology,
            &now.to_string(),
        );
        (plan, challenges)
    }

    /// `MeshConnected` for every peer the plan admits.
    fn mesh_conditions(
        &self,
        plan: &Plan,
        by_name: &HashMap<String, &Arc<WireGuardPeer>>,
        now: &Timestamp,
    ) -> BTreeMap<String, MeshCondition> {
        let heartbeats = self.heartbeats.lock();
        let members: Vec<Member> = by_name
            .values()
            .filter(|p| {
                plan.statuses
                    .get(&p.name_any())
                    .is_some_and(|s| s.admission.admitted)
            })
            .map(|p| {
                let name = p.name_any();
                member(p, heartbeats.nodes.get(&name))
            })
            .collect();
        // Agents could not report while the API server was unreachable: their summaries are
        // older by the outage, not stale.
        let grace = outage_grace(
            *self.outage.lock(),
            now.as_second(),
            self.settings.health.report,
        );
        let thresholds = Thresholds {
            report: self.settings.health.report + grace,
            ..self.settings.health
        };
        let verdicts = health::mesh_connected(
            &members,
            self.settings.topology,
            now.as_second(),
            &thresholds,
        );
        verdicts
            .into_iter()
            .filter_map(|(name, verdict)| {
                let peer = by_name.get(&name)?;
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

    /// One pass: every status that differs goes out (at most [`WRITES_IN_FLIGHT`] at a
    /// time), then the deletions the guard allows. A failed write fails only its peer: the
    /// rest of the pass, collection included, goes on, and the pass reports the failures.
    /// Nothing is written once `leading` says the lease is no longer ours.
    async fn reconcile(&self, leading: &tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let (plan, challenges) = self.plan();
        let peers = self.peer_store.state();
        let by_name: HashMap<String, &Arc<WireGuardPeer>> =
            peers.iter().map(|p| (p.name_any(), p)).collect();
        let mesh = self.mesh_conditions(&plan, &by_name, &Timestamp::now());
        let ssa = PatchParams::apply(COORDINATOR_MANAGER).force();

        // Owned work items: the futures below borrow nothing from this pass.
        let writes: Vec<(String, serde_json::Value, String, bool)> = plan
            .statuses
            .iter()
            .filter_map(|(name, want)| {
                let current = by_name.get(name.as_str())?;
                let challenge = challenges.get(name.as_str());
                (!up_to_date(current, want, mesh.get(name.as_str()), challenge))
                    .then_some((name, want, current))
            })
            .map(|(name, want, current)| {
                let mesh = mesh.get(name);
                let version = current.resource_version();
                let summary = format!(
                    "admitted={} reason={} mesh_ip={} mesh_connected={:?} mesh_reason={:?}",
                    want.admission.admitted,
                    want.admission.reason,
                    want.mesh_ip.as_deref().unwrap_or("-"),
                    mesh.map(|m| m.verdict.connected),
                    mesh.map(|m| m.verdict.reason),
                );
                (
                    name.clone(),
                    status_patch(name, want, mesh, challenges.get(name), version.as_deref()),
                    summary,
                    want.admission.reason == NODE_NOT_FOUND,
                )
            })
            .collect();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(writes)
            .map(|(name, body, summary, node_not_found)| {
                let (api, ssa, leading) = (self.peers.clone(), ssa.clone(), leading.clone());
                async move {
                    if !*leading.borrow() {
                        anyhow::bail!("lease lost; status of {name} not written");
                    }
                    if node_not_found && self.node_exists(&name).await? {
                        tracing::info!(peer = %name, "its Node exists: the Node cache is behind; not refusing it");
                        return Ok(());
                    }
                    match timed(api.patch_status(&name, &ssa, &Patch::Apply(body))).await {
                        Ok(_) => tracing::info!(peer = %name, "status written: {summary}"),
                        // Changed since the pass looked (an agent's health report, another
                        // replica): the watch brings the new object and a new pass.
                        Err(e) if is_status(&e, &[409]) => {
                            tracing::debug!(peer = %name, "changed since read; next pass decides")
                        }
                        Err(e) => return Err(e.context(format!("writing status of {name}"))),
                    }
                    Ok(())
                }
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        let written = results.iter().filter(|r| r.is_ok()).count();
        let mut failures: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();

        match deletion_guard(peers.len(), plan.deletions.len()) {
            Err(refusal) => {
                tracing::warn!(
                    deletions = plan.deletions.len(),
                    peers = peers.len(),
                    "{refusal}"
                );
                failures.push(refusal);
            }
            Ok(()) => {
                for name in &plan.deletions {
                    if !*leading.borrow() {
                        failures.push(format!("lease lost; {name} not deleted"));
                        continue;
                    }
                    // The Node cache may be behind the peer cache (its watch back later
                    // after an outage): an admitted node is deleted only if its Node is
                    // gone in a live read too.
                    match self.node_exists(name).await {
                        Ok(false) => {}
                        Ok(true) => {
                            tracing::info!(peer = %name, "its Node exists: the Node cache is behind; not deleting");
                            continue;
                        }
                        Err(e) => {
                            failures.push(format!("{e:#}"));
                            continue;
                        }
                    }
                    // Only the object this pass saw: a peer re-created under the same name
                    // since (a node that rejoined) is not deleted by mistake.
                    let seen = by_name.get(name.as_str());
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: seen.and_then(|p| p.uid()),
                            resource_version: seen.and_then(|p| p.resource_version()),
                        }),
                        ..DeleteParams::default()
                    };
                    match timed(self.peers.delete(name, &params)).await {
                        Ok(_) => tracing::info!(peer = %name, "deleted: its Node is gone"),
                        Err(e) if is_status(&e, &[404, 409]) => {}
                        Err(e) => failures.push(format!("deleting {name}: {e:#}")),
                    }
                }
            }
        }
        tracing::debug!(
            written,
            failed = failures.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconciled"
        );
        if failures.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "{} of the pass's writes failed; first: {}",
                failures.len(),
                failures[0]
            )
        }
    }
}

/// Status writes a pass has in flight at once: a join's writes do not queue behind
/// hundreds of others, and the API server is not flooded either.
const WRITES_IN_FLIGHT: usize = 16;

/// The longest one API request may take before the pass gives up on it (kube's client
/// sets no deadline on a request by default).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `request` under [`REQUEST_TIMEOUT`].
async fn timed<T>(
    request: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result.map_err(anyhow::Error::from),
        Err(_) => anyhow::bail!("no answer within {REQUEST_TIMEOUT:?}"),
    }
}

fn is_status(e: &anyhow::Error, codes: &[u16]) -> bool {
    matches!(e.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if codes.contains(&s.code))
}

/// Whether a pass may delete `deletions` of `peers` peers at once. Deleting more than half
/// the mesh in one pass is what an empty or truncated Node list (a broken watch, RBAC
/// changed under the coordinator) would ask for, never a migration step: a cloud is
/// drained node by node, and even deleting the whole old half at once is allowed. Refused,
/// nothing is deleted and the pass says why; an admin deletes by hand if it was meant.
pub fn deletion_guard(peers: usize, deletions: usize) -> Result<(), String> {
    if deletions * 2 > peers && deletions > 1 {
        return Err(format!(
            "refusing to delete {deletions} of {peers} WireGuardPeers in one pass (more than \
             half the mesh): is the Node list complete? Delete them by hand if this is meant"
        ));
    }
    Ok(())
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

/// What the coordinator's caches keep of a Node: what [`node_view`] reads (name, labels,
/// annotations, pod CIDRs, addresses). A kubelet's Node also lists its images, conditions
/// and capacities, several KiB per node and rewritten every few minutes.
pub(crate) fn trim_node(n: &mut Node) {
    if let Some(status) = n.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses.take(),
            ..Default::default()
        };
    }
}

/// Watches `K` into a store, waking `changed` on every event and telling `observer`. The
/// store keeps what `trim` leaves of each object, never server-side apply's bookkeeping
/// (`managedFields`, about half of each object as served), which nothing here reads.
pub(crate) fn watch_into<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    observer: Arc<dyn Observer>,
    trim: fn(&mut K),
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
        .modify(move |o| {
            o.meta_mut().managed_fields = None;
            trim(o);
        })
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
    let nodes: Api<Node> = Api::all(client.clone());
    let outage = Arc::new(parking_lot::Mutex::new(None));
    let observer: Arc<dyn Observer> = Arc::new(OutageObserver {
        inner: observer,
        outage: outage.clone(),
        report: settings.health.report,
    });
    let changed = Arc::new(Notify::new());
    let heartbeats = Heartbeats::default();
    let _heartbeat_watch = watch_heartbeats(
        Api::namespaced(client.clone(), &settings.heartbeat_namespace),
        heartbeats.clone(),
        changed.clone(),
        settings.health.report,
    );
    let (peer_store, peer_writer) = reflector::store();
    let (node_store, node_writer) = reflector::store();
    let _watches = [
        watch_into(
            peers.clone(),
            peer_writer,
            changed.clone(),
            observer.clone(),
            |_| {},
        ),
        watch_into(
            nodes.clone(),
            node_writer,
            changed.clone(),
            observer.clone(),
            trim_node,
        ),
    ];
    let controller = Controller {
        peers,
        nodes,
        peer_store,
        node_store,
        settings,
        outage,
        heartbeats,
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
            let result = controller.reconcile(&leading).await;
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
        // A renewal that does not come back within a fifth of the lease counts as failed:
        // the leader stops acting then, long before a standby may take over (it waits the
        // whole lease after the last renewal it saw).
        let checked = match tokio::time::timeout(renew_every, lock.acquire_or_renew()).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!("no answer within {renew_every:?}")),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, renewed: i64) -> Lease {
        let now = Timestamp::from_second(renewed).expect("a valid time");
        let body = heartbeat::renewal(node, "isthmus-system", 60, None, now).expect("a body");
        serde_json::from_value(body).expect("a Lease")
    }

    #[test]
    fn the_heartbeat_map_wakes_a_pass_on_a_return_and_forgets_deleted_leases() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut map = HeartbeatMap::default();
        // (event, now, wakes a pass, nodes known after it), stale after 180 s.
        let steps = [
            (InitApply(lease("a", 1000)), 1000, true, vec!["a"]),
            (InitApply(lease("b", 1000)), 1000, true, vec!["a", "b"]),
            (InitDone, 1000, false, vec!["a", "b"]),
            // A steady renewal costs no pass.
            (Apply(lease("a", 1060)), 1060, false, vec!["a", "b"]),
            // Silent past the threshold, then back: a pass.
            (Apply(lease("a", 1300)), 1300, true, vec!["a", "b"]),
            (Delete(lease("b", 1060)), 1300, true, vec!["a"]),
            (Delete(lease("b", 1060)), 1300, false, vec!["a"]),
            // A watch restart whose re-list lacks a Lease deleted meanwhile forgets it.
            (Apply(lease("c", 1300)), 1300, true, vec!["a", "c"]),
            (Init, 1310, false, vec!["a", "c"]),
            (InitApply(lease("a", 1310)), 1310, false, vec!["a", "c"]),
            (InitDone, 1310, true, vec!["a"]),
            (InitDone, 1310, false, vec!["a"]),
        ];
        for (i, (event, now, wakes, known)) in steps.into_iter().enumerate() {
            assert_eq!(map.fold(event, now, 180), wakes, "step {i}");
            let mut nodes: Vec<&str> = map.nodes.keys().map(String::as_str).collect();
            nodes.sort_unstable();
            assert_eq!(nodes, known, "step {i}");
        }
    }

    #[test]
    fn an_outage_extends_the_thresholds_by_its_length_for_one_report_period() {
        // (outage (first, last), now, grace), report period 60 s.
        let cases = [
            (None, 1000, 0),
            (Some((700, 1000)), 1000, 360),
            (Some((700, 1000)), 1059, 360),
            (Some((700, 1000)), 1060, 0),
            (Some((1000, 1000)), 1010, 60),
        ];
        for (outage, now, want) in cases {
            assert_eq!(outage_grace(outage, now, 60), want, "{outage:?} at {now}");
        }
    }

    /// A report written on change only is as fresh as the heartbeat; without a Lease, as
    /// its own time; and a report-less peer has no report whatever its Lease says.
    #[test]
    fn a_report_is_as_fresh_as_the_agents_heartbeat() {
        let peer = |health: Option<serde_json::Value>| -> WireGuardPeer {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "isthmus.dev/v1alpha1", "kind": "WireGuardPeer",
                "metadata": {"name": "aws-1"},
                "spec": {"publicKey": "WQL+aNNIySrhb3blZyAOhC0i5K9VtYYVqSgp1AcVmhQ=",
                         "endpoint": "192.0.2.1:51820", "location": "aws", "nodeIP": "192.0.2.1"},
                "status": {"health": health},
            }))
            .unwrap()
        };
        let old = serde_json::json!({"observedTime": "2026-01-01T00:00:00Z",
            "peersUp": 1, "peersExpected": 2, "downPeers": ["gcp-1"]});
        let written = Timestamp::from_second(1_767_225_600).unwrap().as_second();
        let seen = Seen {
            renewed: 1_800_000_000,
            alive: 1_800_000_005,
        };
        // (case, report, heartbeat) → (observed, down)
        type Row<'a> = (
            &'a str,
            Option<serde_json::Value>,
            Option<Seen>,
            Option<(i64, Vec<&'a str>)>,
        );
        let rows: Vec<Row> = vec![
            (
                "Lease renewed: fresh as the Lease",
                Some(old.clone()),
                Some(seen),
                Some((seen.alive, vec!["gcp-1"])),
            ),
            (
                "no Lease: the report's own time",
                Some(old),
                None,
                Some((written, vec!["gcp-1"])),
            ),
            ("a Lease but no report", None, Some(seen), None),
        ];
        for (case, health, heartbeat, want) in rows {
            let got = member(&peer(health), heartbeat.as_ref())
                .report
                .map(|r| (r.observed, r.down.into_iter().collect::<Vec<_>>()));
            let want = want.map(|(o, d)| (o, d.into_iter().map(String::from).collect()));
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn deleting_more_than_half_the_mesh_at_once_is_refused() {
        // (peers, deletions, allowed)
        let cases = [
            (10, 0, true),
            (10, 1, true),
            (1, 1, true),
            (2, 1, true),
            (6, 3, true),
            (4, 2, true),
            (6, 4, false),
            (3, 2, false),
            (1000, 1000, false),
        ];
        for (peers, deletions, allowed) in cases {
            let got = deletion_guard(peers, deletions);
            assert_eq!(got.is_ok(), allowed, "{deletions} of {peers}: {got:?}");
        }
    }
}
