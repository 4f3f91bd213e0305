//! Multi-cluster mode: one coordinator in the seed serves every user cluster a `MeshCluster`
//! there declares, each with the kubeconfig from the Secret it names.
//!
//! The supervisor watches MeshClusters and Secrets in the seed and keeps one task per
//! served cluster running the same per-cluster controller as single-cluster mode
//! ([`crate::controller::serve_cluster`]), with that cluster's own client, pool and
//! topology. One Lease in the seed picks the replica that acts for all clusters; every
//! replica keeps its caches warm so a standby takes over without a relist. A cluster whose
//! API server is unreachable or refuses the credentials only stalls its own task (timeouts
//! on connect and write, watches that back off); it is reported in its MeshCluster's
//! `Reachable` condition.
//!
//! The decisions are pure: what a MeshCluster resolves to ([`resolve`]), which tasks to
//! start, stop or restart given what runs ([`changes`]), and the status to write
//! ([`desired_status`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ip_network::IpNetwork;
use isthmus_api::{
    MeshCluster, MeshClusterSpec, Topology, WireGuardPeer, COORDINATOR_MANAGER, REACHABLE,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::controller::{lead, serve_cluster, ClusterSettings, LeaseSettings, Observer};
use crate::decide::Pool;
use crate::lease::LeaseLock;
use crate::ops::CoordinatorOps;

pub struct MultiSettings {
    /// Pool, topology and pacing for clusters whose MeshCluster names none.
    pub defaults: ClusterSettings,
    pub lease: LeaseSettings,
    /// Bound on connecting to, and sending a request to, a user cluster's API server.
    pub cluster_timeout: Duration,
    /// How often statuses are refreshed (peer counts) without a change in the seed.
    pub resync: Duration,
}

/// Everything a cluster's controller is started from: a change in any of it restarts the
/// controller (new credentials, another pool).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kubeconfig: String,
    /// The cluster's pool: its MeshCluster's, else the coordinator's.
    pub pool: Pool,
    pub topology: Topology,
}

/// Why a cluster is not reachable, as its `Reachable=False` condition says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: impl Into<String>) -> Problem {
        Problem {
            reason,
            message: message.into(),
        }
    }
}

/// What a MeshCluster asks for, given the Secret it names (`None`: not found) and the
/// defaults: the target to serve, or why it cannot be served at all.
pub fn resolve(
    spec: &MeshClusterSpec,
    secret: Option<&Secret>,
    default_pool: &Pool,
    default_topology: Topology,
) -> Result<Target, Problem> {
    let r = &spec.kubeconfig;
    let secret = secret.ok_or_else(|| {
        Problem::new(
            "SecretNotFound",
            format!("no Secret {}/{} in the seed", r.namespace, r.name),
        )
    })?;
    let data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .ok_or_else(|| {
            Problem::new(
                "KubeconfigNotFound",
                format!("Secret {}/{} has no key {:?}", r.namespace, r.name, r.key),
            )
        })?;
    let kubeconfig = String::from_utf8(data.0.clone()).map_err(|_| {
        Problem::new(
            "InvalidKubeconfig",
            format!(
                "Secret {}/{} key {:?} is not UTF-8",
                r.namespace, r.name, r.key
            ),
        )
    })?;
    Kubeconfig::from_yaml(&kubeconfig).map_err(|e| {
        Problem::new(
            "InvalidKubeconfig",
            format!(
                "Secret {}/{} key {:?} is not a kubeconfig: {e}",
                r.namespace, r.name, r.key
            ),
        )
    })?;
    Ok(Target {
        kubeconfig,
        pool: pool(spec, default_pool)?,
        topology: spec.topology.unwrap_or(default_topology),
    })
}

/// The pool a MeshCluster names, with the coordinator's for what it leaves out: its own
/// `meshCIDR` else the default one; its own `meshCIDRv6`, else the default IPv6 pool when
/// the cluster's pool is IPv4 (an IPv6 pool cannot have an IPv6 second).
fn pool(spec: &MeshClusterSpec, default: &Pool) -> Result<Pool, Problem> {
    let invalid = |what: &str, text: &str, e: ip_network::IpNetworkParseError| {
        Problem::new("InvalidMeshCIDR", format!("{what} {text:?}: {e:?}"))
    };
    let cidr = match &spec.mesh_cidr {
        Some(c) => c
            .parse::<IpNetwork>()
            .map_err(|e| invalid("meshCIDR", c, e))?,
        None => default.cidr,
    };
    let v6 = match &spec.mesh_cidr_v6 {
        Some(c) => Some(
            c.parse::<IpNetwork>()
                .map_err(|e| invalid("meshCIDRv6", c, e))?,
        ),
        None => default.v6.filter(|_| cidr.is_ipv4()),
    };
    Pool::dual_stack(cidr, v6).map_err(|e| Problem::new("InvalidMeshCIDR", e))
}

/// What to do with the cluster tasks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub start: Vec<String>,
    /// Running with another target: stop, then start with the new one.
    pub restart: Vec<String>,
    pub stop: Vec<String>,
}

/// Given the clusters to serve (with their targets) and the tasks running (with the target
/// each was started from), which to start, restart and stop. A task that ended on its own is
/// not in `running`, so it is started again.
pub fn changes(desired: &BTreeMap<String, Target>, running: &BTreeMap<String, Target>) -> Changes {
    let mut out = Changes::default();
    for (name, target) in desired {
        match running.get(name) {
            None => out.start.push(name.clone()),
            Some(was) if was != target => out.restart.push(name.clone()),
            Some(_) => {}
        }
    }
    out.stop = running
        .keys()
        .filter(|n| !desired.contains_key(*n))
        .cloned()
        .collect();
    out
}

/// What a cluster's task has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// `None`: no answer yet; else whether the last watch call succeeded, and if not why.
    pub reachable: Option<Result<(), Problem>>,
    /// Both caches held a full list once.
    pub synced: bool,
    pub peers: usize,
    pub admitted: usize,
}

/// The status a MeshCluster should have (`lastTransitionTime` aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub peers: Option<i64>,
    pub admitted: Option<i64>,
    pub mesh_cidr: Option<String>,
    pub mesh_cidr_v6: Option<String>,
    pub topology: Option<Topology>,
}

/// From what the MeshCluster resolved to and what its task has seen (`None`: no task).
pub fn desired_status(resolved: &Result<Target, Problem>, seen: Option<&Seen>) -> DesiredStatus {
    let (status, reason, message) = match (resolved, seen.and_then(|s| s.reachable.as_ref())) {
        (Err(p), _) => ("False", p.reason, p.message.clone()),
        (Ok(_), None) => (
            "Unknown",
            "Connecting",
            "the coordinator has not heard from the cluster's API server yet".to_string(),
        ),
        (Ok(_), Some(Err(p))) => ("False", p.reason, p.message.clone()),
        (Ok(_), Some(Ok(()))) if !seen.is_some_and(|s| s.synced) => (
            "Unknown",
            "Syncing",
            "listing the cluster's WireGuardPeers and Nodes".to_string(),
        ),
        (Ok(_), Some(Ok(()))) => (
            "True",
            "Watching",
            "the coordinator watches the cluster's WireGuardPeers and Nodes".to_string(),
        ),
    };
    let counts = seen.filter(|s| s.synced && status == "True");
    DesiredStatus {
        status,
        reason,
        message,
        peers: counts.map(|s| s.peers as i64),
        admitted: counts.map(|s| s.admitted as i64),
        mesh_cidr: resolved.as_ref().ok().map(|t| t.pool.cidr.to_string()),
        mesh_cidr_v6: resolved
            .as_ref()
            .ok()
            .and_then(|t| Some(t.pool.v6?.to_string())),
        topology: resolved.as_ref().ok().map(|t| t.topology),
    }
}

fn up_to_date(mc: &MeshCluster, want: &DesiredStatus) -> bool {
    let Some(s) = mc.status.as_ref() else {
        return false;
    };
    let cond = s.conditions.iter().find(|c| c.type_ == REACHABLE);
    s.peers == want.peers
        && s.admitted == want.admitted
        && s.mesh_cidr == want.mesh_cidr
        && s.mesh_cidr_v6 == want.mesh_cidr_v6
        && s.topology == want.topology
        && cond.is_some_and(|c| {
            c.status == want.status
                && c.reason == want.reason
                && c.message == want.message
                && c.observed_generation == mc.metadata.generation
        })
}

fn status_patch(mc: &MeshCluster, want: &DesiredStatus) -> serde_json::Value {
    let current: Option<&Condition> = mc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == REACHABLE));
    let last_transition = match current {
        Some(c) if c.status == want.status => c.last_transition_time.0.to_string(),
        _ => Timestamp::now().to_string(),
    };
    serde_json::json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "MeshCluster",
        "metadata": {"name": mc.name_any()},
        "status": {
            "conditions": [{
                "type": REACHABLE,
                "status": want.status,
                "reason": want.reason,
                "message": want.message,
                "observedGeneration": mc.metadata.generation.unwrap_or(0),
                "lastTransitionTime": last_transition,
            }],
            "peers": want.peers,
            "admitted": want.admitted,
            "meshCIDR": want.mesh_cidr,
            "meshCIDRv6": want.mesh_cidr_v6,
            "topology": want.topology,
        }
    })
}

/// A watch or client error, as the cluster's condition reports it.
pub fn classify(error: &kube::Error) -> Problem {
    match error {
        kube::Error::Api(s) if s.code == 401 => Problem::new(
            "Unauthorized",
            format!(
                "the API server refused the kubeconfig's credentials: {}",
                s.message
            ),
        ),
        kube::Error::Api(s) if s.code == 403 => Problem::new(
            "Forbidden",
            format!(
                "the kubeconfig's identity may not watch WireGuardPeers and Nodes: {}",
                s.message
            ),
        ),
        kube::Error::Api(s) if s.code == 404 => Problem::new(
            "CRDNotInstalled",
            format!(
                "the cluster does not serve WireGuardPeers (is deploy/ applied?): {}",
                s.message
            ),
        ),
        e => Problem::new("Unreachable", format!("cannot reach the API server: {e}")),
    }
}

fn classify_watch(error: &watcher::Error) -> Problem {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => classify(e),
        e => Problem::new("WatchFailed", e.to_string()),
    }
}

/// A cluster task's window to the supervisor: what it has seen, and a nudge when that
/// changes in a way the status shows.
struct ClusterObserver {
    seen: Mutex<Seen>,
    peers: Mutex<Option<Store<WireGuardPeer>>>,
    wake: Arc<Notify>,
    name: String,
    /// Where the cluster's metrics go, labelled with its name.
    ops: Arc<CoordinatorOps>,
}

impl ClusterObserver {
    fn set_reachable(&self, reachable: Result<(), Problem>) {
        let mut seen = self.seen.lock();
        if seen.reachable.as_ref() != Some(&reachable) {
            match &reachable {
                Ok(()) => tracing::info!(cluster = %self.name, "cluster reachable"),
                Err(p) => {
                    tracing::warn!(cluster = %self.name, reason = p.reason, message = %p.message, "cluster not reachable")
                }
            }
            seen.reachable = Some(reachable);
            self.wake.notify_one();
        }
    }

    /// What it has seen, with the peer counts read from its cache now.
    fn seen(&self) -> Seen {
        let mut seen = self.seen.lock().clone();
        if let Some(store) = self.peers.lock().as_ref() {
            let peers = store.state();
            seen.peers = peers.len();
            seen.admitted = peers.iter().filter(|p| p.is_admitted()).count();
        }
        seen
    }
}

impl Observer for ClusterObserver {
    fn synced(&self, peers: &Store<WireGuardPeer>) {
        *self.peers.lock() = Some(peers.clone());
        self.ops.cluster_synced(&self.name, peers.clone());
        self.seen.lock().synced = true;
        tracing::info!(cluster = %self.name, "serving");
        self.wake.notify_one();
    }

    fn watch(&self, error: Option<&watcher::Error>) {
        self.set_reachable(error.map_or(Ok(()), |e| Err(classify_watch(e))));
    }

    fn pass_finished(&self, took: Option<Duration>, _error: Option<&anyhow::Error>) {
        if let Some(took) = took {
            self.ops.cluster_pass(&self.name, took);
        }
    }
}

/// A client for a user cluster from its kubeconfig, with bounded connects and writes, so an
/// unreachable cluster fails its own calls quickly instead of hanging them.
async fn cluster_client(kubeconfig: &str, timeout: Duration) -> Result<Client, Problem> {
    let invalid = |e: &dyn std::fmt::Display| Problem::new("InvalidKubeconfig", e.to_string());
    let kc = Kubeconfig::from_yaml(kubeconfig).map_err(|e| invalid(&e))?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(&e))?;
    config.connect_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Client::try_from(config).map_err(|e| invalid(&e))
}

struct Running {
    target: Target,
    observer: Arc<ClusterObserver>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
        self.observer.ops.cluster_stopped(&self.observer.name);
    }
}

fn start(
    name: &str,
    target: Target,
    defaults: &ClusterSettings,
    timeout: Duration,
    leading: watch::Receiver<bool>,
    wake: Arc<Notify>,
    ops: Arc<CoordinatorOps>,
) -> Running {
    let settings = ClusterSettings {
        pool: target.pool.clone(),
        topology: target.topology,
        ..defaults.clone()
    };
    let observer = Arc::new(ClusterObserver {
        seen: Mutex::new(Seen::default()),
        peers: Mutex::new(None),
        wake,
        name: name.to_string(),
        ops,
    });
    let task = {
        let observer = observer.clone();
        let kubeconfig = target.kubeconfig.clone();
        let span = tracing::info_span!("cluster", cluster = %name);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let client = match cluster_client(&kubeconfig, timeout).await {
                    Ok(c) => c,
                    Err(p) => {
                        observer.set_reachable(Err(p));
                        return;
                    }
                };
                if let Err(e) = serve_cluster(client, settings, leading, observer.clone()).await {
                    tracing::warn!(error = format!("{e:#}"), "cluster controller ended");
                }
            },
            span,
        ))
    };
    tracing::info!(cluster = %name, mesh_cidr = %target.pool.cidr, mesh_cidr_v6 = ?target.pool.v6, topology = target.topology.as_str(), "cluster controller started");
    Running {
        target,
        observer,
        task,
    }
}

/// The seed's own watches: errors are logged by [`watch_into`]; nobody else observes them.
struct SeedWatch;

impl crate::controller::Observer for SeedWatch {}

fn reflect<K>(api: Api<K>, changed: Arc<Notify>) -> (Store<K>, crate::controller::AbortOnDrop)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let task = crate::controller::watch_into(api, writer, changed, Arc::new(SeedWatch), |_| {});
    (store, task)
}

/// Runs until `shutdown` resolves, then stops every cluster task and releases the lease.
pub async fn run(
    seed: Client,
    settings: MultiSettings,
    ops: Arc<CoordinatorOps>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let clusters_api: Api<MeshCluster> = Api::all(seed.clone());
    let (clusters, clusters_task) = reflect(clusters_api.clone(), changed.clone());
    let (secrets, secrets_task) = reflect(Api::<Secret>::all(seed.clone()), changed.clone());

    let lock = LeaseLock::new(
        seed,
        &settings.lease.namespace,
        &settings.lease.name,
        &settings.lease.identity,
        settings.lease.duration,
    );
    let (leading_tx, mut leading) = watch::channel(false);
    let (stop_lease, lease_stopped) = tokio::sync::oneshot::channel::<()>();
    let lease_task = tokio::spawn(lead(
        lock,
        settings.lease.clone(),
        leading_tx,
        ops.clone(),
        async move {
            let _ = lease_stopped.await;
        },
    ));

    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => {}
        ready = async {
            clusters.wait_until_ready().await.context("MeshCluster cache")?;
            secrets.wait_until_ready().await.context("Secret cache")
        } => {
            ready?;
            ops.seed_synced();
            supervise(&settings, (&clusters, &secrets), &clusters_api, &mut leading, &changed, &ops, &mut shutdown).await;
        }
    }
    drop(clusters_task);
    drop(secrets_task);
    let _ = stop_lease.send(());
    if let Err(e) = lease_task.await {
        tracing::warn!(error = %e, "lease task failed");
    }
    Ok(())
}

/// The supervisor's loop: reconcile the running tasks with the MeshClusters, and (leader
/// only) their statuses.
async fn supervise(
    settings: &MultiSettings,
    (clusters, secrets): (&Store<MeshCluster>, &Store<Secret>),
    api: &Api<MeshCluster>,
    leading: &mut watch::Receiver<bool>,
    changed: &Arc<Notify>,
    ops: &Arc<CoordinatorOps>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) {
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    loop {
        let objects = clusters.state();
        let resolved: BTreeMap<String, Result<Target, Problem>> = objects
            .iter()
            .map(|mc| {
                let r = &mc.spec.kubeconfig;
                let secret = secrets.get(&ObjectRef::new(&r.name).within(&r.namespace));
                (
                    mc.name_any(),
                    resolve(
                        &mc.spec,
                        secret.as_deref(),
                        &settings.defaults.pool,
                        settings.defaults.topology,
                    ),
                )
            })
            .collect();
        running.retain(|name, r| {
            let alive = !r.task.is_finished();
            if !alive {
                tracing::warn!(cluster = %name, "cluster task ended; starting it again");
            }
            alive
        });
        let desired: BTreeMap<String, Target> = resolved
            .iter()
            .filter_map(|(n, r)| Some((n.clone(), r.as_ref().ok()?.clone())))
            .collect();
        let now: BTreeMap<String, Target> = running
            .iter()
            .map(|(n, r)| (n.clone(), r.target.clone()))
            .collect();
        let plan = changes(&desired, &now);
        for name in plan.stop.iter().chain(&plan.restart) {
            running.remove(name);
            tracing::info!(cluster = %name, "cluster controller stopped");
        }
        for name in plan.start.iter().chain(&plan.restart) {
            let Some(target) = desired.get(name) else {
                continue;
            };
            let r = start(
                name,
                target.clone(),
                &settings.defaults,
                settings.cluster_timeout,
                leading.clone(),
                changed.clone(),
                ops.clone(),
            );
            running.insert(name.clone(), r);
        }

        if *leading.borrow_and_update() {
            for mc in &objects {
                let name = mc.name_any();
                let resolved = resolved
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| Err(Problem::new("Pending", "not resolved yet")));
                let seen = running.get(&name).map(|r| r.observer.seen());
                let want = desired_status(&resolved, seen.as_ref());
                if up_to_date(mc, &want) {
                    continue;
                }
                let ssa = PatchParams::apply(COORDINATOR_MANAGER).force();
                match api
                    .patch_status(&name, &ssa, &Patch::Apply(status_patch(mc, &want)))
                    .await
                {
                    Ok(_) => tracing::info!(
                        cluster = %name,
                        reachable = want.status,
                        reason = want.reason,
                        message = %want.message,
                        "MeshCluster status written"
                    ),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(cluster = %name, error = %e, "writing MeshCluster status")
                    }
                }
            }
        }

        tokio::select! {
            _ = shutdown.as_mut() => break,
            _ = leading.changed() => {}
            _ = changed.notified() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep(settings.resync) => {}
        }
    }
    // Dropping the tasks aborts them (and their watches).
    running.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::KubeconfigSecretRef;
    use k8s_openapi::ByteString;

    const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";

    fn target(kubeconfig: &str, cidr: &str) -> Target {
        Target {
            kubeconfig: kubeconfig.into(),
            pool: Pool::single(cidr.parse().unwrap()),
            topology: Topology::CrossLocation,
        }
    }

    fn set(items: &[(&str, Target)]) -> BTreeMap<String, Target> {
        items
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect()
    }

    #[test]
    fn which_tasks_to_start_restart_and_stop() {
        let a = target("a", "100.64.1.0/24");
        let b = target("b", "100.64.2.0/24");
        let a_new_key = target("a2", "100.64.1.0/24");
        let a_new_pool = target("a", "100.64.9.0/24");
        // (case, desired, running, start, restart, stop)
        type Row<'a> = (
            &'a str,
            Vec<(&'a str, Target)>,
            Vec<(&'a str, Target)>,
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let rows: Vec<Row> = vec![
            ("nothing", vec![], vec![], &[], &[], &[]),
            (
                "first start",
                vec![("a", a.clone()), ("b", b.clone())],
                vec![],
                &["a", "b"],
                &[],
                &[],
            ),
            (
                "steady",
                vec![("a", a.clone())],
                vec![("a", a.clone())],
                &[],
                &[],
                &[],
            ),
            (
                "added at run time",
                vec![("a", a.clone()), ("b", b.clone())],
                vec![("a", a.clone())],
                &["b"],
                &[],
                &[],
            ),
            (
                "deleted (or its Secret gone)",
                vec![("a", a.clone())],
                vec![("a", a.clone()), ("b", b.clone())],
                &[],
                &[],
                &["b"],
            ),
            (
                "new credentials",
                vec![("a", a_new_key)],
                vec![("a", a.clone())],
                &[],
                &["a"],
                &[],
            ),
            (
                "new pool",
                vec![("a", a_new_pool)],
                vec![("a", a.clone()), ("b", b.clone())],
                &[],
                &["a"],
                &["b"],
            ),
            (
                "everything gone",
                vec![],
                vec![("a", a.clone()), ("b", b)],
                &[],
                &[],
                &["a", "b"],
            ),
        ];
        for (case, desired, running, start, restart, stop) in rows {
            let got = changes(&set(&desired), &set(&running));
            let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            assert_eq!(
                got,
                Changes {
                    start: names(start),
                    restart: names(restart),
                    stop: names(stop),
                },
                "{case}"
            );
        }
    }

    fn spec(cidr: Option<&str>, topology: Option<Topology>) -> MeshClusterSpec {
        MeshClusterSpec {
            kubeconfig: KubeconfigSecretRef {
                namespace: "shoot-a".into(),
                name: "kubeconfig".into(),
                key: "kubeconfig".into(),
            },
            mesh_cidr: cidr.map(str::to_string),
            mesh_cidr_v6: None,
            topology,
        }
    }

    fn secret(key: &str, value: &[u8]) -> Secret {
        Secret {
            data: Some([(key.to_string(), ByteString(value.to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_meshcluster_pool_takes_from_the_defaults_what_it_leaves_out() {
        let net = |c: &str| c.parse::<IpNetwork>().unwrap();
        let dual = Pool::dual_stack(net("100.96.0.0/16"), Some(net("fd96::/64"))).unwrap();
        let single = Pool::single(net("100.96.0.0/16"));
        // (case, meshCIDR, meshCIDRv6, default, Ok((pool, IPv6 pool)) or Err)
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a Pool,
            Option<(&'a str, Option<&'a str>)>,
        );
        let rows: Vec<Row> = vec![
            (
                "the defaults",
                None,
                None,
                &dual,
                Some(("100.96.0.0/16", Some("fd96::/64"))),
            ),
            (
                "single-stack defaults",
                None,
                None,
                &single,
                Some(("100.96.0.0/16", None)),
            ),
            (
                "own IPv4 pool, the default IPv6 one",
                Some("100.64.1.0/24"),
                None,
                &dual,
                Some(("100.64.1.0/24", Some("fd96::/64"))),
            ),
            (
                "own IPv6 pool: no default IPv6 second",
                Some("fd97::/64"),
                None,
                &dual,
                Some(("fd97::/64", None)),
            ),
            (
                "own IPv6 second beside the default pool",
                None,
                Some("fd98::/64"),
                &single,
                Some(("100.96.0.0/16", Some("fd98::/64"))),
            ),
            (
                "both its own",
                Some("100.64.1.0/24"),
                Some("fd98::/64"),
                &dual,
                Some(("100.64.1.0/24", Some("fd98::/64"))),
            ),
            (
                "an IPv6 second beside an IPv6 pool",
                Some("fd97::/64"),
                Some("fd98::/64"),
                &dual,
                None,
            ),
            ("an IPv4 second", None, Some("100.65.0.0/16"), &single, None),
            ("host bits", None, Some("fd98::1/64"), &single, None),
        ];
        for (case, cidr, v6, default, want) in rows {
            let spec = MeshClusterSpec {
                mesh_cidr_v6: v6.map(str::to_string),
                ..spec(cidr, None)
            };
            match (pool(&spec, default), want) {
                (Ok(p), Some((cidr, v6))) => {
                    assert_eq!(p.cidr.to_string(), cidr, "{case}");
                    assert_eq!(p.v6.map(|n| n.to_string()).as_deref(), v6, "{case}");
                }
                (Err(p), None) => assert_eq!(p.reason, "InvalidMeshCIDR", "{case}: {}", p.message),
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn what_a_meshcluster_resolves_to() {
        let good = secret("kubeconfig", KUBECONFIG.as_bytes());
        // (case, spec, secret, Ok(cidr, topology) or Err(reason))
        type Row<'a> = (
            &'a str,
            MeshClusterSpec,
            Option<Secret>,
            Result<(&'a str, Topology), &'a str>,
        );
        let rows: Vec<Row> = vec![
            (
                "defaults",
                spec(None, None),
                Some(good.clone()),
                Ok(("100.96.0.0/16", Topology::CrossLocation)),
            ),
            (
                "own pool and topology",
                spec(Some("100.64.1.0/24"), Some(Topology::Full)),
                Some(good.clone()),
                Ok(("100.64.1.0/24", Topology::Full)),
            ),
            ("no Secret", spec(None, None), None, Err("SecretNotFound")),
            (
                "no such key",
                spec(None, None),
                Some(secret("config", KUBECONFIG.as_bytes())),
                Err("KubeconfigNotFound"),
            ),
            (
                "not UTF-8",
                spec(None, None),
                Some(secret("kubeconfig", &[0xff, 0xfe])),
                Err("InvalidKubeconfig"),
            ),
            (
                "not a kubeconfig",
                spec(None, None),
                Some(secret("kubeconfig", b"clusters: 7")),
                Err("InvalidKubeconfig"),
            ),
            (
                "bad pool",
                spec(Some("100.64.1.1/24"), None),
                Some(good),
                Err("InvalidMeshCIDR"),
            ),
        ];
        for (case, spec, secret, want) in rows {
            let got = resolve(
                &spec,
                secret.as_ref(),
                &Pool::single("100.96.0.0/16".parse().unwrap()),
                Topology::CrossLocation,
            );
            match (got, want) {
                (Ok(t), Ok((cidr, topology))) => {
                    assert_eq!(
                        (t.pool.cidr.to_string().as_str(), t.topology),
                        (cidr, topology),
                        "{case}"
                    );
                    assert_eq!(t.kubeconfig, KUBECONFIG, "{case}");
                }
                (Err(p), Err(reason)) => assert_eq!(p.reason, reason, "{case}: {}", p.message),
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn status_from_what_was_seen() {
        let ok: Result<Target, Problem> = Ok(target(KUBECONFIG, "100.64.1.0/24"));
        let refused = Problem::new("Unauthorized", "the API server refused");
        let synced = Seen {
            reachable: Some(Ok(())),
            synced: true,
            peers: 3,
            admitted: 2,
        };
        // (case, resolved, seen, status, reason, counts)
        type Row<'a> = (
            &'a str,
            Result<Target, Problem>,
            Option<Seen>,
            &'a str,
            &'a str,
            Option<(i64, i64)>,
        );
        let rows: Vec<Row> = vec![
            (
                "no Secret",
                Err(Problem::new("SecretNotFound", "no Secret")),
                None,
                "False",
                "SecretNotFound",
                None,
            ),
            (
                "just started",
                ok.clone(),
                None,
                "Unknown",
                "Connecting",
                None,
            ),
            (
                "task started, no answer",
                ok.clone(),
                Some(Seen::default()),
                "Unknown",
                "Connecting",
                None,
            ),
            (
                "answered, listing",
                ok.clone(),
                Some(Seen {
                    reachable: Some(Ok(())),
                    ..Seen::default()
                }),
                "Unknown",
                "Syncing",
                None,
            ),
            (
                "served",
                ok.clone(),
                Some(synced.clone()),
                "True",
                "Watching",
                Some((3, 2)),
            ),
            (
                "credentials refused",
                ok.clone(),
                Some(Seen {
                    reachable: Some(Err(refused.clone())),
                    ..Seen::default()
                }),
                "False",
                "Unauthorized",
                None,
            ),
            (
                "refused after it was served: no stale counts",
                ok,
                Some(Seen {
                    reachable: Some(Err(refused)),
                    ..synced
                }),
                "False",
                "Unauthorized",
                None,
            ),
        ];
        for (case, resolved, seen, status, reason, counts) in rows {
            let got = desired_status(&resolved, seen.as_ref());
            assert_eq!((got.status, got.reason), (status, reason), "{case}");
            assert_eq!(got.peers.zip(got.admitted), counts, "{case}");
            assert_eq!(got.mesh_cidr.is_some(), resolved.is_ok(), "{case}");
        }
    }

    #[test]
    fn errors_name_their_cause() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                message: "nope".into(),
                ..Default::default()
            }))
        };
        assert_eq!(classify(&status(401)).reason, "Unauthorized");
        assert_eq!(classify(&status(403)).reason, "Forbidden");
        assert_eq!(classify(&status(404)).reason, "CRDNotInstalled");
        assert_eq!(classify(&status(500)).reason, "Unreachable");
    }
}
