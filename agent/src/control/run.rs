//! `isthmus-agent run`: the DaemonSet's main loop.
//!
//! Restore whatever a previous run left in the journal, start the tunnel with the node key,
//! publish the spec, then follow the WireGuardPeers and the kernel: each change of peers
//! becomes a `MeshPlan` (only a changed plan touches the tunnel), and each change of either
//! re-runs routing, which puts back any owned entry someone rewrote. When the API server is
//! unreachable the watch retries with backoff and the node keeps the last plan it applied.
//! On SIGTERM routing is restored before the process exits.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use ip_network::Ipv4Network;
use isthmus_api::WireGuardPeer;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use tokio::sync::Notify;

use super::keys;
use super::lock::StateLock;
use super::mesh::{self, MeshPlan};
use super::ops::AgentOps;
use super::publish::{self, PublishOptions};
use super::runtime::{self, Runtime};
use isthmus_routing::address::Netlink;
use isthmus_routing::kernel::Kernel;
use isthmus_routing::netns;
use isthmus_routing::plan::{self as routing_plan, Devices, Settings};
use isthmus_routing::{watch, Mode, Router};
use isthmus_wg::snat::SourceRewrite;
use isthmus_wg::tunnel::{Tunnel, DEFAULT_MTU};
use isthmus_wg::uapi::server;

/// What WireGuard adds to an inner packet on an IPv6 underlay (IPv6 40, UDP 8, data
/// header and tag 32); subtracting it from the underlay MTU gives a tunnel MTU that fits
/// either family, as wireguard-go's 1420 does for 1500.
pub const TUNNEL_OVERHEAD: u16 = 80;

pub struct RunOptions {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub iface: String,
    /// Tunnel MTU; `None`: the underlay's MTU minus [`TUNNEL_OVERHEAD`].
    pub mtu: Option<u16>,
    pub publish: PublishOptions,
    pub routing: RoutingOptions,
    pub kubeconfig: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    /// How often the agent writes its health report (`None`: never).
    pub health_interval: Option<Duration>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: nowhere), in the
    /// agent's own network namespace.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct RoutingOptions {
    pub mode: Mode,
    /// flannel's VXLAN device.
    pub vxlan_device: String,
    pub table: u32,
    pub rule_priority: u32,
}

/// Every WireGuardPeer, for the CLI's node names and mesh IPs.
pub async fn list_peers(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<Vec<WireGuardPeer>> {
    let api: Api<WireGuardPeer> = Api::all(isthmus_ops::daemon::kube_client(kubeconfig).await?);
    Ok(api
        .list(&Default::default())
        .await
        .context("listing WireGuardPeers")?
        .items)
}

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

/// The tunnel MTU for an underlay MTU (none known: the 1500-byte default).
pub fn tunnel_mtu(underlay: Option<u32>) -> u16 {
    match underlay {
        Some(m) => u16::try_from(m)
            .unwrap_or(u16::MAX)
            .saturating_sub(TUNNEL_OVERHEAD)
            .max(1280),
        None => DEFAULT_MTU,
    }
}

struct Agent {
    opts: RunOptions,
    tunnel: Arc<Tunnel>,
    tunnel_mtu: u16,
    tun_index: u32,
    netlink: Netlink,
    router: Router,
    vxlan_index: Arc<AtomicU32>,
    private_key: isthmus_wg::key::Key,
    peers: Api<WireGuardPeer>,
    nodes: Api<Node>,
    applied: Option<MeshPlan>,
    /// The watch's last error (`None`: healthy), for `status`.
    api_error: Arc<parking_lot::Mutex<Option<String>>>,
    routing_ok: bool,
    reported: Option<Runtime>,
    ops: Arc<AgentOps>,
}

impl Agent {
    async fn publish(&self) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get(&self.opts.node_name)
            .await
            .with_context(|| format!("reading Node {}", self.opts.node_name))?;
        let spec = publish::own_spec(
            &node,
            &self.private_key.public_from_private(),
            &self.opts.publish,
        )?;
        publish::publish(&self.peers, &self.opts.node_name, &spec).await
    }

    /// Reads flannel's VTEP; says whether it changed since the last publish.
    async fn refresh_vtep(&mut self) -> bool {
        if self.opts.routing.mode != Mode::Vxlan {
            return false;
        }
        let kernel = self.router.kernel();
        let device = &self.opts.routing.vxlan_device;
        let (index, vtep) = match (kernel.link(device).await, kernel.vtep(device).await) {
            (Ok(link), Ok(vtep)) => (link.map_or(0, |l| l.0), vtep),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = format!("{e:#}"), "reading {device} failed");
                return false;
            }
        };
        self.vxlan_index.store(index, Ordering::Relaxed);
        let vtep = vtep.map(|v| isthmus_api::Vtep {
            mac: v.mac.to_string(),
            ip: v.ip.to_string(),
        });
        if vtep == self.opts.publish.vtep {
            return false;
        }
        match &vtep {
            Some(v) => tracing::info!(device, mac = %v.mac, ip = %v.ip, "found flannel's VTEP"),
            None => tracing::warn!(device, "no VXLAN device with an IPv4 address yet; cross-location overlay traffic waits for it"),
        }
        self.opts.publish.vtep = vtep;
        true
    }

    async fn converge_mesh(&mut self, store: &Store<WireGuardPeer>) {
        let all: Vec<WireGuardPeer> = store.state().iter().map(|p| (**p).clone()).collect();
        let plan = mesh::plan(&self.opts.node_name, &all);
        if self.applied.as_ref() == Some(&plan) {
            return;
        }
        if self.applied.as_ref().map(|a| a.address) != Some(plan.address) {
            if let Err(e) = self
                .netlink
                .set_address(&self.opts.iface, plan.address)
                .await
            {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "setting the mesh address failed; will retry"
                );
                return;
            }
        }
        if let Err(e) = self.tunnel.sync(self.private_key, &plan.peers) {
            // Only a listen port or fwmark change can fail, and a sync names neither.
            tracing::warn!(error = %e, "configuring the tunnel failed; will retry");
            return;
        }
        self.tunnel
            .set_source_rewrite(self.source_rewrite(plan.address));
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

    /// In `vxlan` mode, flannel's packets to mesh IPs leave with our mesh IP as source.
    fn source_rewrite(&self, address: Option<(IpAddr, u8)>) -> Option<SourceRewrite> {
        if self.opts.routing.mode != Mode::Vxlan {
            return None;
        }
        let (IpAddr::V4(ip), prefix) = address? else {
            return None;
        };
        Some(SourceRewrite {
            mesh: Ipv4Network::new_truncate(ip, prefix).ok()?,
            to: ip,
        })
    }

    async fn converge_routing(&mut self) {
        let remotes = self
            .applied
            .as_ref()
            .map(|p| p.remotes.clone())
            .unwrap_or_default();
        let settings = Settings {
            mode: self.opts.routing.mode,
            table: self.opts.routing.table,
            rule_priority: self.opts.routing.rule_priority,
        };
        let vxlan = self.vxlan_index.load(Ordering::Relaxed);
        let devices = Devices {
            vxlan: (vxlan != 0).then_some(vxlan),
            tun: self.tun_index,
        };
        let desired = routing_plan::desired(&settings, devices, self.tunnel_mtu, &remotes);
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
}

impl Agent {
    /// Writes `runtime.json` for `isthmus-agent status` when anything in it changed.
    fn report(&mut self, store: &Store<WireGuardPeer>) {
        let me = store
            .state()
            .iter()
            .find(|p| p.name_any() == self.opts.node_name)
            .cloned();
        let api_error = self.api_error.lock().clone();
        let now = Runtime {
            node: self.opts.node_name.clone(),
            iface: self.opts.iface.clone(),
            listen_port: self.opts.publish.listen_port,
            mtu: self.tunnel_mtu,
            mode: format!("{:?}", self.opts.routing.mode).to_lowercase(),
            topology: me
                .as_ref()
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
        };
        if self.reported.as_ref() == Some(&now) {
            return;
        }
        match runtime::write(&self.opts.state_dir, &now) {
            Ok(()) => self.reported = Some(now),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "writing runtime state failed"),
        }
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
    ops.dataplane_up(tunnel.clone());
    let _uapi = server::serve(&opts.iface, Arc::new(tunnel.clone()))?;
    let tun_index = kernel
        .link(&opts.iface)
        .await?
        .map(|l| l.0)
        .with_context(|| format!("{} vanished", opts.iface))?;

    let kernel_changed = Arc::new(Notify::new());
    let vxlan_index = Arc::new(AtomicU32::new(0));
    {
        let (changed, index) = (kernel_changed.clone(), vxlan_index.clone());
        netns::run_in(opts.netns.as_deref(), move || {
            let _entered = runtime.enter();
            watch::subscribe(index, changed)
        })?;
    }

    let client = isthmus_ops::daemon::kube_client(opts.kubeconfig.as_deref()).await?;
    let mut publish_opts = opts.publish.clone();
    publish_opts.mtu = Some(tunnel_mtu);
    let mut agent = Agent {
        peers: Api::all(client.clone()),
        nodes: Api::all(client),
        opts: RunOptions {
            publish: publish_opts,
            ..opts
        },
        tunnel,
        tunnel_mtu,
        tun_index,
        netlink,
        router,
        vxlan_index,
        private_key,
        applied: None,
        api_error: Arc::new(parking_lot::Mutex::new(None)),
        routing_ok: false,
        reported: None,
        ops,
    };
    agent.netlink.set_address(&agent.opts.iface, None).await?;
    agent.refresh_vtep().await;
    retry("publishing this node's WireGuardPeer", || agent.publish()).await;
    tracing::info!(node = %agent.opts.node_name, mode = ?agent.opts.routing.mode, mtu = tunnel_mtu, "published");

    let peers_changed = Arc::new(Notify::new());
    let (store, writer) = reflector::store();
    let watch = {
        let changed = peers_changed.clone();
        let api_error = agent.api_error.clone();
        watcher(agent.peers.clone(), watcher::Config::default())
            .default_backoff()
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
    tokio::spawn(watch);
    let health = agent.opts.health_interval.map(|every| {
        tokio::spawn(super::health::report_loop(
            agent.peers.clone(),
            agent.opts.node_name.clone(),
            agent.tunnel.clone(),
            store.clone(),
            every,
        ))
    });
    tokio::pin!(shutdown);
    let stopped_early = tokio::select! {
        _ = &mut shutdown => true,
        ready = store.wait_until_ready() => { ready.context("peer cache")?; false }
    };
    if !stopped_early {
        agent.ops.peers_synced();
        loop {
            let republish = agent.refresh_vtep().await;
            let started = Instant::now();
            agent.ops.pass_started();
            agent.converge_mesh(&store).await;
            agent.converge_routing().await;
            agent.report(&store);
            agent.ops.pass_finished(started.elapsed());
            // Our own peer gone (deleted by hand, or a fresh API server), or our VTEP
            // changed: publish again.
            let missing = !store
                .state()
                .iter()
                .any(|p| p.name_any() == agent.opts.node_name);
            if republish || missing {
                if let Err(e) = agent.publish().await {
                    tracing::warn!(error = format!("{e:#}"), "re-publishing failed; will retry");
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = peers_changed.notified() => {}
                _ = kernel_changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    }
    if let Some(h) = health {
        h.abort();
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_mtu_follows_the_underlay() {
        assert_eq!(tunnel_mtu(Some(1500)), 1420);
        assert_eq!(tunnel_mtu(Some(1400)), 1320);
        assert_eq!(tunnel_mtu(Some(9001)), 8921);
        assert_eq!(tunnel_mtu(Some(1300)), 1280, "never below IPv6's minimum");
        assert_eq!(tunnel_mtu(None), 1420);
    }
}
