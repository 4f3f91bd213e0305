//! `isthmus-agent run`: the DaemonSet's main loop.
//!
//! Start the tunnel with the node key, publish the spec, then follow the WireGuardPeers: each
//! change becomes a `MeshPlan` and only a changed plan touches the data plane. When the API
//! server is unreachable the watch retries with backoff and the data plane keeps running on
//! the last plan it applied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use isthmus_api::WireGuardPeer;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;

use super::address::Netlink;
use super::keys;
use super::mesh::{self, MeshPlan};
use super::publish::{self, PublishOptions};
use crate::dataplane::tunnel::Tunnel;
use crate::netns;
use crate::uapi::server;

pub struct RunOptions {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub iface: String,
    pub mtu: u16,
    pub publish: PublishOptions,
    pub kubeconfig: Option<PathBuf>,
    pub netns: Option<PathBuf>,
}

async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("finding cluster credentials")?,
    };
    Ok(Client::try_from(config)?)
}

/// Retries `f` every two seconds until it succeeds or `shutdown` fires.
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
    opts: RunOptions,
    tunnel: Arc<Tunnel>,
    netlink: Netlink,
    private_key: crate::key::Key,
    peers: Api<WireGuardPeer>,
    nodes: Api<Node>,
    applied: Option<MeshPlan>,
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

    async fn converge(&mut self, store: &Store<WireGuardPeer>) {
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
        self.tunnel.apply_mesh(self.private_key, plan.peers.clone());
        tracing::info!(
            admitted = plan.admitted,
            peers = plan.peers.len(),
            address = ?plan.address,
            "mesh configuration applied"
        );
        self.applied = Some(plan);
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let private_key = keys::load_or_create(&opts.state_dir)?;
    let (iface, port, mtu) = (opts.iface.clone(), opts.publish.listen_port, opts.mtu);
    let tunnel = netns::run_in(opts.netns.as_deref(), move || {
        Tunnel::start(&iface, port, mtu)
    })?;
    tunnel.apply_mesh(private_key, Vec::new());
    let _uapi = server::serve(&opts.iface, Arc::new(tunnel.clone()))?;
    let runtime = tokio::runtime::Handle::current();
    let netlink = netns::run_in(opts.netns.as_deref(), move || {
        let _entered = runtime.enter();
        Netlink::connect()
    })?;

    let client = client(opts.kubeconfig.as_deref()).await?;
    let mut agent = Agent {
        peers: Api::all(client.clone()),
        nodes: Api::all(client),
        opts,
        tunnel,
        netlink,
        private_key,
        applied: None,
    };
    agent.netlink.set_address(&agent.opts.iface, None).await?;
    retry("publishing this node's WireGuardPeer", || agent.publish()).await;
    tracing::info!(node = %agent.opts.node_name, "published");

    let changed = Arc::new(Notify::new());
    let (store, writer) = reflector::store();
    let watch = {
        let changed = changed.clone();
        watcher(agent.peers.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(move |event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "WireGuardPeer watch error; keeping the last configuration");
                }
                changed.notify_one();
                futures::future::ready(())
            })
    };
    tokio::spawn(watch);
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => return Ok(()),
        ready = store.wait_until_ready() => ready.context("peer cache")?,
    }
    loop {
        agent.converge(&store).await;
        // Our own peer gone (deleted by hand, or a fresh API server): publish it again.
        if !store
            .state()
            .iter()
            .any(|p| p.name_any() == agent.opts.node_name)
        {
            if let Err(e) = agent.publish().await {
                tracing::warn!(error = format!("{e:#}"), "re-publishing failed; will retry");
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
    tracing::info!("shutting down");
    Ok(())
}
