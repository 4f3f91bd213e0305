//! `isthmus-agent run`: the DaemonSet's main loop, as wiring.
//!
//! Restore whatever a previous run left in the journal, start the tunnel with the node key,
//! publish the spec, then follow the WireGuardPeers and the kernel. Each pass observes
//! (the peer cache, flannel's VTEP), decides ([`super::pass`], pure: only a changed mesh
//! plan touches the tunnel; what routing should hold; whether to publish again) and
//! applies; routing puts back any owned entry someone rewrote. When the API server is
//! unreachable the watch retries with backoff and the node keeps the last plan it applied.
//! On SIGTERM, and when the tunnel stops (its TUN device unreadable), routing is restored
//! before the process exits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use isthmus_api::WireGuardPeer;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::Notify;

use super::keys;
use super::lock::StateLock;
use super::mesh::MeshPlan;
use super::ops::AgentOps;
use super::options::{tunnel_mtu, RunOptions};
use super::pass::{self, Fixed, MeshStep};
use super::pmtu::Timing;
use super::probe::{self, PathMtus, Targets};
use super::publish::{self, PublishOptions};
use super::rotate::{self, Rotation, Step};
use super::runtime::{self, Runtime};
use isthmus_routing::address::Netlink;
use isthmus_routing::kernel::Kernel;
use isthmus_routing::model::{EntryKey, Value as RouteValue};
use isthmus_routing::netns;
use isthmus_routing::plan::Settings;
use isthmus_routing::watch::{self, VxlanIndexes};
use isthmus_routing::{Mode, Router};
use isthmus_wg::key::Key;
use isthmus_wg::tunnel::Tunnel;
use isthmus_wg::uapi::server;

/// Retries `f` every two seconds until it succeeds.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "{what} failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

struct Agent {
    /// As the operator gave them; never changed while running.
    opts: RunOptions,
    /// What passes decide with that stays put: options and what start-up found.
    fixed: Fixed,
    /// flannel's VTEP as last read (discovered, published with our spec).
    vtep: Option<isthmus_api::Vtep>,
    /// flannel's IPv6 VTEP as last read, likewise.
    vtep6: Option<isthmus_api::Vtep>,
    /// flannel's VXLAN devices' indexes, shared with the netlink watch.
    vxlan: Arc<VxlanIndexes>,
    tunnel: Arc<Tunnel>,
    netlink: Netlink,
    router: Router,
    private_key: Key,
    /// The key in use and any rotation under way ([`super::rotate`]).
    rotation: Rotation,
    key_rotations: u64,
    peers: Api<WireGuardPeer>,
    nodes: Api<Node>,
    applied: Option<MeshPlan>,
    /// The watch's last error (`None`: healthy), for `status`.
    api_error: Arc<parking_lot::Mutex<Option<String>>>,
    routing_ok: bool,
    reported: Option<Runtime>,
    ops: Arc<AgentOps>,
    /// What path MTU discovery probes (the mesh applied), and what it found.
    probe_targets: tokio::sync::watch::Sender<Targets>,
    path_mtus: PathMtus,
}

impl Agent {
    /// Publishes our spec, with our answer to the key challenge our object's status carries
    /// (read live, so a restarted agent keeps its proof and with it its admission).
    async fn publish(&self) -> anyhow::Result<()> {
        let name = &self.opts.node_name;
        let own = self
            .peers
            .get_opt(name)
            .await
            .with_context(|| format!("reading WireGuardPeer {name}"))?;
        let key_proof = pass::key_proof(name, own.as_slice(), &self.private_key);
        let node = self
            .nodes
            .get(&self.opts.node_name)
            .await
            .with_context(|| format!("reading Node {}", self.opts.node_name))?;
        let opts = PublishOptions {
            vtep: self.vtep.clone(),
            vtep6: self.vtep6.clone(),
            mtu: Some(self.fixed.tunnel_mtu),
            ..self.opts.publish.clone()
        };
        let spec = publish::own_spec(
            &node,
            &self.private_key.public_from_private(),
            key_proof,
            &opts,
        )?;
        publish::publish(&self.peers, &self.opts.node_name, &spec).await
    }

    /// Observes flannel's VTEPs (`flannel.1` and, on dual-stack nodes, `flannel-v6.1`);
    /// says whether either changed since the last publish.
    async fn refresh_vteps(&mut self) -> bool {
        if self.opts.routing.mode != Mode::Vxlan {
            return false;
        }
        let mut changed = false;
        let mut ports = Vec::new();
        for v6 in [false, true] {
            let routing = &self.opts.routing;
            let device = if v6 {
                &routing.vxlan_device_v6
            } else {
                &routing.vxlan_device
            };
            let kernel = self.router.kernel();
            // The port flannel's VXLAN arrives on: TCP inside it is coalesced for the TUN.
            match kernel.vxlan_port(device).await {
                Ok(Some(port)) => ports.push(port),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "reading {device}'s port failed")
                }
            }
            let (index, found) = match kernel.vtep(device, v6).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "reading {device} failed");
                    continue;
                }
            };
            self.vxlan.set(v6, index);
            let found = found.map(|v| isthmus_api::Vtep {
                mac: v.mac.to_string(),
                ip: v.ip.to_string(),
            });
            let known = if v6 { &mut self.vtep6 } else { &mut self.vtep };
            if found == *known {
                continue;
            }
            match (&found, v6) {
                (Some(v), _) => {
                    tracing::info!(device, mac = %v.mac, ip = %v.ip, "found flannel's VTEP")
                }
                (None, false) => tracing::warn!(device, "no VXLAN device with an IPv4 address yet; cross-location overlay traffic waits for it"),
                (None, true) => tracing::info!(device, "flannel's IPv6 VTEP is gone; IPv6 pod traffic is routed into the tunnel"),
            }
            *known = found;
            changed = true;
        }
        ports.sort_unstable();
        ports.dedup();
        self.tunnel.set_vxlan_ports(&ports);
        changed
    }

    /// Applies a new mesh: the address first, then the tunnel; a failure leaves the plan
    /// unapplied, so the next pass tries again.
    async fn apply_mesh(&mut self, step: MeshStep) {
        let MeshStep {
            plan,
            set_address,
            source_rewrite,
        } = step;
        if set_address {
            if let Err(e) = self
                .netlink
                .set_address(
                    &self.opts.iface,
                    &plan
                        .address
                        .into_iter()
                        .chain(plan.address6)
                        .collect::<Vec<_>>(),
                )
                .await
            {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "setting the mesh address failed; will retry"
                );
                return;
            }
        }
        let successors = super::mesh::successors(self.applied.as_ref(), &plan);
        for (old, new) in &successors {
            tracing::info!(peer = %plan.names.get(new).map_or("", String::as_str), old = %old.to_base64(), new = %new.to_base64(), "peer rotated its key; keeping its old session until the new one is up");
        }
        if let Err(e) = self
            .tunnel
            .sync_with(self.private_key, &plan.peers, &successors)
        {
            // Only a listen port or fwmark change can fail, and a sync names neither.
            tracing::warn!(error = %e, "configuring the tunnel failed; will retry");
            return;
        }
        self.tunnel.set_source_rewrite(source_rewrite);
        tracing::info!(
            admitted = plan.admitted,
            peers = plan.peers.len(),
            remotes = plan.remotes.len(),
            address = ?plan.address,
            "mesh configuration applied"
        );
        self.ops.mesh_applied(&plan);
        self.applied = Some(plan);
    }

    async fn apply_routing(&mut self, desired: BTreeMap<EntryKey, RouteValue>) {
        self.router.set_desired(desired);
        let started = Instant::now();
        let result = self.router.reconcile().await;
        self.routing_ok = matches!(&result, Ok(o) if o.failed == 0);
        match &result {
            Ok(o) if o.changed > 0 || o.failed > 0 => tracing::info!(
                changed = o.changed,
                reasserted = o.reasserted.len(),
                failed = o.failed,
                took_us = started.elapsed().as_micros() as u64,
                "routing reconciled"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "routing pass failed; will retry"),
        }
        match result {
            Ok(o) => self.ops.routing_pass(o.failed == 0, o.reasserted.len()),
            Err(_) => self.ops.routing_pass(false, 0),
        }
    }

    /// Writes `runtime.json` for `isthmus-agent status` when anything in it changed.
    fn report(&mut self, peers: &[Arc<WireGuardPeer>]) {
        let me = pass::own_peer(&self.opts.node_name, peers);
        let api_error = self.api_error.lock().clone();
        let now = Runtime {
            node: self.opts.node_name.clone(),
            iface: self.opts.iface.clone(),
            listen_port: self.opts.publish.listen_port,
            mtu: self.fixed.tunnel_mtu,
            mode: format!("{:?}", self.opts.routing.mode).to_lowercase(),
            topology: me
                .and_then(|p| p.status.as_ref()?.topology)
                .and_then(|t| serde_json::to_value(t).ok()?.as_str().map(str::to_string)),
            mesh_ip: self
                .applied
                .as_ref()
                .and_then(|p| p.address)
                .map(|(ip, _)| ip.to_string()),
            admitted: self.applied.as_ref().is_some_and(|p| p.admitted),
            api_reachable: api_error.is_none(),
            api_error,
            routing_ok: self.routing_ok,
            path_mtus: self.path_mtus.lock().clone(),
            key_rotations: self.key_rotations,
            rotating_to: self
                .rotation
                .retiring
                .map(|_| self.rotation.key.public_from_private().to_base64()),
        };
        if self.reported.as_ref() == Some(&now) {
            return;
        }
        match runtime::write(&self.opts.state_dir, &now) {
            Ok(()) => self.reported = Some(now),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "writing runtime state failed"),
        }
    }

    /// One step of key rotation: read the key files, decide (pure), apply. Cheap enough to
    /// run every second: two small files and a count of the tunnel's peers.
    async fn rotation_step(&mut self) {
        let dir = self.opts.state_dir.clone();
        let files = match keys::read_files(&dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "reading the key files failed");
                return;
            }
        };
        let now = Instant::now();
        let retiring = self.tunnel.engine().retiring_peers();
        let interval = self.opts.key_rotation_interval;
        match rotate::decide(&self.rotation, &files, retiring, now, interval) {
            Step::Wait => {}
            Step::Generate(why) => {
                let key = Key::generate_private();
                match keys::request_rotation(&dir, &key) {
                    Ok(_) => tracing::info!(?why, "rotating the node key"),
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "writing the next key failed")
                    }
                }
            }
            Step::Begin(next) => {
                let old = self.rotation.key;
                self.tunnel.rotate_key(next);
                self.private_key = next;
                self.rotation = Rotation {
                    key: next,
                    since: now,
                    retiring: Some((old, now)),
                };
                tracing::info!(old = %old.public_from_private().to_base64(), new = %next.public_from_private().to_base64(), "key rotation begun: answering both keys, publishing the new one");
                if let Err(e) = self.publish().await {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "publishing the new key failed; the next pass retries"
                    );
                }
            }
            Step::Retire => {
                if let Err(e) = keys::promote(&dir, &self.rotation.key) {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "retiring the old key failed; will retry"
                    );
                    return;
                }
                self.tunnel.engine().retire_previous_key();
                if let Some((old, began)) = self.rotation.retiring.take() {
                    self.key_rotations += 1;
                    self.ops.key_rotated();
                    tracing::info!(
                        old = %old.public_from_private().to_base64(),
                        new = %self.rotation.key.public_from_private().to_base64(),
                        peers_still_moving = retiring,
                        took_ms = now.saturating_duration_since(began).as_millis() as u64,
                        "key rotation done: old key retired"
                    );
                }
                self.rotation.since = now;
            }
        }
    }

    /// One pass over what was observed: decide (pure), apply.
    async fn pass(&mut self, peers: &[Arc<WireGuardPeer>]) {
        if let Some(step) = pass::mesh(&self.fixed, peers, self.applied.as_ref()) {
            self.apply_mesh(step).await;
        }
        let targets = pass::probe_targets(&self.fixed, self.applied.as_ref());
        let path_mtus = self.path_mtus.lock().clone();
        for (key, mtu) in pass::clamp_mtus(&targets, &path_mtus) {
            self.tunnel.engine().set_path_mtu(&key, Some(mtu));
        }
        self.probe_targets.send_if_modified(|t| {
            let changed = *t != targets;
            *t = targets;
            changed
        });
        let desired = pass::routing(
            &self.fixed,
            self.vxlan.get(),
            self.applied.as_ref(),
            &path_mtus,
        );
        self.apply_routing(desired).await;
        self.report(peers);
    }
}

/// Runs until `shutdown` resolves, then restores routing.
pub async fn run(
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let private_key = keys::load_or_create(&opts.state_dir)?;
    let _lock = StateLock::try_acquire(&opts.state_dir)?.with_context(|| {
        format!(
            "another agent is running with state directory {}",
            opts.state_dir.display()
        )
    })?;
    let ops = Arc::new(AgentOps::default());
    if let Some(addr) = opts.metrics_addr {
        isthmus_ops::serve(addr, ops.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let runtime = tokio::runtime::Handle::current();
    let netlink = {
        let runtime = runtime.clone();
        netns::run_in(opts.netns.as_deref(), move || {
            let _entered = runtime.enter();
            Netlink::connect()
        })?
    };
    let kernel = Kernel::new(netlink.handle());
    let mut router = Router::open(kernel.clone(), &opts.state_dir)?;
    if !router.journal().is_empty() {
        let o = router
            .restore()
            .await
            .context("restoring what a previous run left")?;
        tracing::info!(
            restored = o.changed,
            "restored the routing a previous run left behind"
        );
    }
    let tunnel_mtu = match opts.mtu {
        Some(m) => m,
        None => tunnel_mtu(kernel.underlay_mtu().await.unwrap_or(None)),
    };
    let (iface, port) = (opts.iface.clone(), opts.publish.listen_port);
    let tunnel = netns::run_in(opts.netns.as_deref(), move || {
        Tunnel::start(&iface, port, tunnel_mtu)
    })?;
    tunnel
        .sync(private_key, &[])
        .context("setting the node key on the tunnel")?;
    // A tunnel that stopped (its TUN device unreadable) stops the agent as SIGTERM does:
    // routing is restored first, then the process exits with the reason.
    let tunnel_failed = Arc::new(Notify::new());
    {
        let failed = tunnel_failed.clone();
        tunnel.on_failure(move || failed.notify_one());
    }
    let shutdown = async {
        tokio::select! {
            _ = shutdown => {}
            _ = tunnel_failed.notified() => {}
        }
    };
    ops.dataplane_up(tunnel.clone());
    let _uapi = server::serve(&opts.iface, Arc::new(tunnel.clone()))?;
    let tun_index = kernel
        .link(&opts.iface)
        .await?
        .map(|l| l.0)
        .with_context(|| format!("{} vanished", opts.iface))?;

    let kernel_changed = Arc::new(Notify::new());
    let vxlan = Arc::new(VxlanIndexes::default());
    {
        let (changed, vxlan) = (kernel_changed.clone(), vxlan.clone());
        netns::run_in(opts.netns.as_deref(), move || {
            let _entered = runtime.enter();
            watch::subscribe(vxlan, changed)
        })?;
    }

    let client = isthmus_ops::daemon::kube_client(opts.kubeconfig.as_deref()).await?;
    let fixed = Fixed {
        node_name: opts.node_name.clone(),
        routing: Settings {
            mode: opts.routing.mode,
            table: opts.routing.table,
            rule_priority: opts.routing.rule_priority,
        },
        tun_index,
        tunnel_mtu,
    };
    let path_mtus = PathMtus::default();
    let path_mtus_changed = Arc::new(Notify::new());
    let (probe_targets, targets_rx) = tokio::sync::watch::channel(Targets::default());
    ops.path_mtus(path_mtus.clone());
    let prober = opts.pmtu_port.map(|port| {
        tokio::spawn(probe::run(
            opts.netns.clone(),
            port,
            Timing::default(),
            targets_rx,
            tunnel.clone(),
            path_mtus.clone(),
            path_mtus_changed.clone(),
        ))
    });
    let mut agent = Agent {
        peers: Api::all(client.clone()),
        nodes: Api::all(client),
        vtep: opts.publish.vtep.clone(),
        vtep6: opts.publish.vtep6.clone(),
        opts,
        fixed,
        vxlan,
        tunnel,
        netlink,
        router,
        private_key,
        rotation: Rotation {
            key: private_key,
            since: Instant::now(),
            retiring: None,
        },
        key_rotations: 0,
        applied: None,
        api_error: Arc::new(parking_lot::Mutex::new(None)),
        routing_ok: false,
        reported: None,
        ops,
        probe_targets,
        path_mtus,
    };
    agent.netlink.set_address(&agent.opts.iface, &[]).await?;
    agent.refresh_vteps().await;
    tokio::pin!(shutdown);
    // Publishing retries for as long as the API server is unreachable, but a SIGTERM (or a
    // dead tunnel) meanwhile still stops the agent the normal way, routing restored.
    let published = tokio::select! {
        _ = &mut shutdown => false,
        () = retry("publishing this node's WireGuardPeer", || agent.publish()) => true,
    };
    let followed = if published {
        tracing::info!(node = %agent.opts.node_name, mode = ?agent.opts.routing.mode, mtu = tunnel_mtu, "published");
        follow(&mut agent, shutdown, kernel_changed, path_mtus_changed).await
    } else {
        tracing::info!("stopped before this node's WireGuardPeer was published");
        Ok(())
    };
    if let Some(p) = prober {
        p.abort();
    }
    tracing::info!("shutting down: restoring routing");
    let started = Instant::now();
    let o = agent.router.restore().await?;
    tracing::info!(
        restored = o.changed,
        failed = o.failed,
        took_ms = started.elapsed().as_millis() as u64,
        "routing restored"
    );
    followed?;
    match agent.tunnel.failure() {
        Some(why) => Err(anyhow::anyhow!("{}: {why}", agent.opts.iface)),
        None => Ok(()),
    }
}

/// Follows the WireGuardPeers and the kernel, one pass per change, until `shutdown`
/// resolves (or the peer cache cannot start). Leaves routing as it is: the caller restores.
async fn follow(
    agent: &mut Agent,
    mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    kernel_changed: Arc<Notify>,
    path_mtus_changed: Arc<Notify>,
) -> anyhow::Result<()> {
    let peers_changed = Arc::new(Notify::new());
    let (store, writer) = reflector::store();
    let watch = {
        let changed = peers_changed.clone();
        let api_error = agent.api_error.clone();
        let own = agent.opts.node_name.clone();
        watcher(agent.peers.clone(), watcher::Config::default())
            .default_backoff()
            // Other nodes' health reports are the coordinator's business: the cache keeps
            // only this node's own (the report loop compares against it). Server-side
            // apply's bookkeeping (about half of each object as served) is nobody's here.
            .modify(move |p| {
                p.metadata.managed_fields = None;
                if p.metadata.name.as_deref() != Some(own.as_str()) {
                    if let Some(s) = p.status.as_mut() {
                        s.health = None;
                    }
                }
            })
            .reflect(writer)
            .for_each(move |event| {
                match &event {
                    Err(e) => {
                        tracing::warn!(error = %e, "WireGuardPeer watch error; keeping the last configuration");
                        *api_error.lock() = Some(e.to_string());
                    }
                    Ok(_) => *api_error.lock() = None,
                }
                changed.notify_one();
                futures::future::ready(())
            })
    };
    let _watch = AbortOnDrop(tokio::spawn(watch));
    let _health = agent.opts.health_interval.map(|every| {
        AbortOnDrop(tokio::spawn(super::health::report_loop(
            agent.peers.clone(),
            agent.opts.node_name.clone(),
            agent.tunnel.clone(),
            store.clone(),
            super::health::Settings {
                heartbeat: every,
                namespace: agent.opts.heartbeat_namespace.clone(),
                handshake_stale: agent.opts.handshake_stale,
                tunnel_mtu: agent.fixed.tunnel_mtu,
            },
            agent.path_mtus.clone(),
        )))
    });
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        ready = store.wait_until_ready() => ready.context("peer cache")?,
    };
    agent.ops.peers_synced();
    // Key rotation is looked at every second (a request from `rotate-key`, a retirement
    // due), apart from the passes, which it does not need.
    let mut key_tick = tokio::time::interval(Duration::from_secs(1));
    key_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full_pass = true;
    let mut last_pass = Instant::now();
    loop {
        if full_pass {
            // Observe.
            let vtep_changed = agent.refresh_vteps().await;
            let started = Instant::now();
            last_pass = started;
            agent.ops.pass_started();
            // Shared with the cache, not copied: a pass reads them and keeps nothing.
            let peers = store.state();
            // Decide and apply.
            agent.pass(&peers).await;
            agent.ops.pass_finished(started.elapsed());
            let key = agent.private_key.public_from_private().to_base64();
            let proof = pass::key_proof(&agent.opts.node_name, &peers, &agent.private_key);
            let due = pass::republish(
                &agent.opts.node_name,
                &peers,
                vtep_changed,
                &key,
                proof.as_deref(),
            );
            if due {
                if let Err(e) = agent.publish().await {
                    tracing::warn!(error = format!("{e:#}"), "re-publishing failed; will retry");
                }
            }
        }
        let rotating = agent.rotation.retiring.is_some();
        agent.rotation_step().await;
        if rotating != agent.rotation.retiring.is_some() {
            // Started or retired: `status` says so.
            agent.report(&store.state());
        }
        let idle = Duration::from_secs(10).saturating_sub(last_pass.elapsed());
        full_pass = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = peers_changed.notified() => true,
            _ = kernel_changed.notified() => true,
            _ = path_mtus_changed.notified() => true,
            _ = tokio::time::sleep(idle) => true,
            _ = key_tick.tick() => false,
        };
    }
}

/// Aborts a spawned task when dropped: the watch and the health reports end with
/// [`follow`], before routing is restored.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `isthmus-agent cleanup`: restores what the journal under `state_dir` lists, for after a
/// crash or SIGKILL (the DaemonSet's preStop and next start run it too). A second run finds
/// an empty journal and does nothing; so does a run while a live agent holds the state
/// directory (it restores on SIGTERM, and would put back what cleanup took away).
pub async fn cleanup(
    state_dir: &std::path::Path,
    netns_path: Option<&std::path::Path>,
) -> anyhow::Result<isthmus_routing::Outcome> {
    let Some(_lock) = StateLock::try_acquire(state_dir)? else {
        tracing::info!(
            state_dir = %state_dir.display(),
            "an agent is running here; it restores routing itself when it stops"
        );
        return Ok(Default::default());
    };
    let runtime = tokio::runtime::Handle::current();
    let netlink = netns::run_in(netns_path, move || {
        let _entered = runtime.enter();
        Netlink::connect()
    })?;
    let mut router = Router::open(Kernel::new(netlink.handle()), state_dir)?;
    let listed = router.journal().len();
    let outcome = router.restore().await?;
    tracing::info!(
        journal = %router.journal().path().display(),
        listed,
        restored = outcome.changed,
        "cleanup done"
    );
    Ok(outcome)
}
