//! The scale test (issue 14, part 3): one seed with the multi-cluster coordinator and many
//! real user-cluster API servers (over one shared etcd, each under its own prefix), each
//! with nodes whose agents are emulated, plus real agents in network namespaces in the
//! first cluster.
//!
//! An emulated agent talks to its API server exactly as an agent does, with its own
//! pod-bound token: it publishes its WireGuardPeer with the agent's `own_spec`/`publish`
//! and reports health with the agent's `summary`/`due`/`write`, every tunnel its mesh plan
//! wants counted up. What it does not do is watch: one watch per cluster feeds every
//! emulated agent's plan (a real agent's watch is what the real agents show). The emulated
//! agents that real agents tunnel to answer their handshakes with boringtun from a UDP
//! socket at their published endpoint, so `MeshConnected` is earned, not granted.
//!
//! [`run`] measures; `isthmus-scale` (src/bin) prints the figures, tests/scale.rs runs a
//! short form and asserts on it.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use futures::{StreamExt, TryStreamExt};
use isthmus_agent::control::{health, mesh, pass, publish};
use isthmus_api::{heartbeat, MeshHealth, WireGuardPeer, MESH_CONNECTED};
use isthmus_wg::key::Key;
use isthmus_wg::{DeviceSnapshot, PeerSnapshot};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;

use crate::cluster::Cluster;
use crate::daemon::{eventually, Daemon};
use crate::kube::{KubeRig, RigOptions, SharedEtcd};
use crate::netns::Netns;

/// What to build and how long to watch it.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    /// User clusters (the first one holds the real agents).
    pub clusters: usize,
    /// Nodes per cluster, real agents included.
    pub nodes: usize,
    /// Real agents in the first cluster, alternately in its two locations.
    pub real_agents: usize,
    /// Every agent's `--health-interval` (60 s in production).
    pub heartbeat: Duration,
    /// How long steady-state writes are counted.
    pub window: Duration,
    /// Nodes that join the first cluster one after another once the mesh stands.
    pub joins: usize,
    /// How long the mesh may take to be admitted and connected before the run fails.
    pub settle: Duration,
}

/// What [`run`] measured.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub clusters: usize,
    pub nodes: usize,
    /// Coordinator start to every peer of every cluster admitted.
    pub admitted: Duration,
    /// Coordinator start to every peer `MeshConnected`.
    pub connected: Duration,
    /// Per join: its peer published to admitted, and to configured on every real agent
    /// that should tunnel to it.
    pub joins_admitted: Vec<Duration>,
    pub joins_configured: Vec<Duration>,
    /// The coordinator with no cluster declared yet (a replica that just took the Lease).
    pub coordinator_idle_rss: u64,
    pub coordinator_rss: u64,
    pub coordinator_peak_rss: u64,
    /// CPU seconds the coordinator spent up to everything connected, and in the window.
    pub coordinator_cpu_startup: f64,
    pub coordinator_cpu_window: f64,
    /// Writes (create, update, patch, apply, delete) to WireGuardPeers in all user
    /// clusters during the window, to Leases (the agents' heartbeats, the coordinator's
    /// election lives in the seed), and to anything at all.
    pub peer_writes_window: u64,
    pub lease_writes_window: u64,
    pub all_writes_window: u64,
    /// Per real agent: (node, peers configured, RSS, bytes received from its API server
    /// in total and during the window).
    pub agents: Vec<AgentFigures>,
    /// The WireGuardPeer list of the first cluster as served (JSON), what a full watch caches.
    pub peer_list_bytes: u64,
    pub window: Duration,
    pub heartbeat: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct AgentFigures {
    pub node: String,
    pub peers: usize,
    pub rss: u64,
    pub received_total: u64,
    pub received_window: u64,
    /// Whether its device held exactly the peers the API says it should (the admitted
    /// nodes in the other location) when the window closed.
    pub configured_as_planned: bool,
}

impl Figures {
    /// Steady-state API writes per node per heartbeat, WireGuardPeers and heartbeat Leases
    /// together (at most one is the goal: per minute with the production heartbeat).
    pub fn writes_per_node_per_heartbeat(&self) -> f64 {
        let nodes = (self.clusters * self.nodes).max(1) as f64;
        let heartbeats = self.window.as_secs_f64() / self.heartbeat.as_secs_f64();
        (self.peer_writes_window + self.lease_writes_window) as f64 / nodes / heartbeats
    }
}

/// Resident and peak resident memory of `pid` in bytes.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} for {pid}"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user and system) `pid` has spent.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces: fields count from the closing parenthesis.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// Bytes `pid` has received on its TCP connections to loopback port `port` (its API
/// server), as the kernel counts them (`ss -ti`: `bytes_received`).
pub fn bytes_from(pid: u32, port: u16) -> anyhow::Result<u64> {
    let out = std::process::Command::new("ss")
        .args([
            "-tinpH",
            "state",
            "established",
            "dport",
            &format!("= :{port}"),
        ])
        .output()
        .context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    let mut ours = false;
    let tag = format!("pid={pid},");
    for line in text.lines() {
        if line.contains("users:((") {
            ours = line.contains(&tag);
            continue;
        }
        if !ours {
            continue;
        }
        if let Some(n) = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
        {
            total += n.parse::<u64>().unwrap_or(0);
        }
    }
    Ok(total)
}

/// Write requests an API server has served so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Writes {
    pub peers: u64,
    pub leases: u64,
    pub all: u64,
}

/// Write requests the API server behind `rig` has served so far.
pub fn writes(rig: &KubeRig) -> anyhow::Result<Writes> {
    let text = rig.kubectl(&["get", "--raw", "/metrics"])?;
    let samples = crate::scrape::parse(&text)?;
    let (mut peers, mut leases, mut all) = (0.0, 0.0, 0.0);
    for s in samples
        .iter()
        .filter(|s| s.name == "apiserver_request_total")
    {
        let label = |k: &str| s.labels.get(k).map(String::as_str);
        if !matches!(
            label("verb"),
            Some("POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION")
        ) {
            continue;
        }
        all += s.value;
        match label("resource") {
            Some("wireguardpeers") => peers += s.value,
            Some("leases") => leases += s.value,
            _ => {}
        }
    }
    Ok(Writes {
        peers: peers as u64,
        leases: leases as u64,
        all: all as u64,
    })
}

/// An emulated agent: its node's name and the client its own token gives it.
struct Emulated {
    name: String,
    /// Its private key, to answer the coordinator's key challenge.
    key: Key,
    /// The last answer published, so a watch that lags does not publish it twice.
    answered: Mutex<Option<String>>,
    api: Api<WireGuardPeer>,
    /// Its heartbeat Lease's namespace, with its own token.
    leases: Api<Lease>,
    /// The last report written (what the agent's loop keeps).
    written: Mutex<Option<MeshHealth>>,
    /// When its heartbeat Lease was last renewed.
    renewed: Mutex<Option<Instant>>,
}

/// A user cluster: its API server (a rig of its own or the [`Cluster`]'s) and its nodes.
struct UserCluster {
    name: String,
    emulated: Vec<Arc<Emulated>>,
    store: Option<Store<WireGuardPeer>>,
}

/// Where an emulated node is and what it publishes.
struct NodeSpec {
    name: String,
    location: &'static str,
    node_ip: Ipv4Addr,
    pod_cidr: String,
    endpoint: String,
    private_key: Key,
}

const LOCATIONS: [&str; 2] = ["vsphere", "aws"];

fn node_spec(i: usize, private_key: Key, endpoint: String) -> anyhow::Result<NodeSpec> {
    let i16 = u16::try_from(i).context("too many nodes")?;
    let [hi, lo] = i16.to_be_bytes();
    Ok(NodeSpec {
        name: format!("em-{i:04}"),
        location: LOCATIONS[i % 2],
        // Apart from the real nodes' 10.0.0.0/24 and from each other.
        node_ip: Ipv4Addr::new(10, 1 + hi, lo, 1),
        pod_cidr: format!("10.{}.{lo}.0/24", 100 + hi),
        endpoint,
        private_key,
    })
}

/// Creates the Node as a kubelet would, takes a pod-bound agent token for it, and publishes
/// its WireGuardPeer with the agent's functions.
async fn join(rig: &KubeRig, spec: &NodeSpec) -> anyhow::Result<Emulated> {
    let nodes: Api<Node> = Api::all(rig.admin().await?);
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": spec.name, "labels": {publish::REGION_LABEL: spec.location}},
        "spec": {"podCIDRs": [spec.pod_cidr]},
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("Node {}", spec.name))?;
    let node = nodes
        .patch_status(
            &spec.name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {"addresses": [{"type": "InternalIP", "address": spec.node_ip.to_string()}]}
            })),
        )
        .await
        .context("Node status")?;
    let token = rig.agent_token(&spec.name).await?;
    let client = rig.client(&format!("agent-{}", spec.name), &token).await?;
    let emulated = Emulated {
        name: spec.name.clone(),
        key: spec.private_key,
        answered: Mutex::new(None),
        api: Api::all(client.clone()),
        leases: Api::namespaced(client, heartbeat::DEFAULT_NAMESPACE),
        written: Mutex::new(None),
        renewed: Mutex::new(None),
    };
    let own = publish::own_spec(
        &node,
        &spec.private_key.public_from_private(),
        None,
        &publish::PublishOptions {
            endpoint: Some(spec.endpoint.clone()),
            listen_port: 51820,
            keepalive: 25,
            ..Default::default()
        },
    )?;
    publish::publish(&emulated.api, &spec.name, &own).await?;
    Ok(emulated)
}

/// What an agent does when its own object carries a key challenge it has not answered:
/// publishes again with the answer (`pass::key_proof`). `None`: nothing to answer.
async fn prove(e: &Emulated, own: &WireGuardPeer) -> Option<anyhow::Result<()>> {
    let proof = pass::key_proof(&e.name, std::slice::from_ref(own), &e.key)?;
    if own.spec.key_proof.as_deref() == Some(proof.as_str())
        || e.answered.lock().ok()?.as_deref() == Some(proof.as_str())
    {
        return None;
    }
    let spec = isthmus_api::WireGuardPeerSpec {
        key_proof: Some(proof.clone()),
        ..own.spec.clone()
    };
    let result = publish::publish(&e.api, &e.name, &spec).await;
    if result.is_ok() {
        if let Ok(mut answered) = e.answered.lock() {
            *answered = Some(proof);
        }
    }
    Some(result)
}

/// Every emulated agent of a cluster answers its key challenge, from the shared watch (an
/// agent reacts to its watch; this looks every 100 ms). Returns writes.
async fn prove_once(cluster: &UserCluster, store: &Store<WireGuardPeer>) -> usize {
    let owns: Vec<(Arc<Emulated>, Arc<WireGuardPeer>)> = cluster
        .emulated
        .iter()
        .filter_map(|e| Some((e.clone(), store.get(&ObjectRef::new(&e.name))?)))
        .collect();
    let written: Vec<usize> = futures::stream::iter(owns)
        .map(|(e, own)| async move { usize::from(matches!(prove(&e, &own).await, Some(Ok(())))) })
        .buffer_unordered(32)
        .collect()
        .await;
    written.iter().sum()
}

/// A joiner answers its challenge as soon as the coordinator gives it (read live).
async fn answer_when_challenged(e: &Emulated, timeout: Duration) -> anyhow::Result<()> {
    let ok = eventually(timeout, || async {
        match e.api.get_opt(&e.name).await.ok().flatten() {
            Some(own) => {
                matches!(prove(e, &own).await, Some(Ok(())))
                    || own
                        .spec
                        .key_proof
                        .is_some_and(|p| e.answered.lock().ok().and_then(|a| a.clone()) == Some(p))
            }
            None => false,
        }
    })
    .await;
    if !ok {
        bail!("{} got no key challenge within {timeout:?}", e.name);
    }
    Ok(())
}

/// One pass of every emulated agent's health loop in a cluster: its plan from the shared
/// watch, every wanted tunnel up, written when the agent's `due` says so. Returns writes.
async fn report_once(
    cluster: &UserCluster,
    store: &Store<WireGuardPeer>,
    heartbeat: Duration,
    tick: Instant,
) -> usize {
    let peers: Arc<Vec<WireGuardPeer>> =
        Arc::new(store.state().iter().map(|p| (**p).clone()).collect());
    let now = SystemTime::now();
    let passes: Vec<_> = cluster
        .emulated
        .iter()
        .map(|e| report_one(e.clone(), peers.clone(), now, heartbeat, tick))
        .collect();
    let written: Vec<usize> = futures::stream::iter(passes)
        .buffer_unordered(32)
        .collect()
        .await;
    written.iter().sum()
}

/// What an agent's report loop does in one pass, for one emulated agent, every tunnel up.
async fn report_one(
    e: Arc<Emulated>,
    peers: Arc<Vec<WireGuardPeer>>,
    now: SystemTime,
    heartbeat: Duration,
    tick: Instant,
) -> usize {
    // The heartbeat, as the agent's loop renews it: its Lease, once a heartbeat, timed by
    // the check tick's deadline.
    let mut writes = 0;
    let renew_due = e
        .renewed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none_or(|t| tick.duration_since(t) >= heartbeat);
    let mut lease_renewed = !renew_due;
    if renew_due {
        let owner = peers
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(e.name.as_str()))
            .and_then(|p| p.metadata.uid.clone());
        let renewed = health::renew(
            &e.leases,
            heartbeat::DEFAULT_NAMESPACE,
            &e.name,
            heartbeat,
            owner.as_deref(),
        )
        .await;
        match renewed {
            Ok(()) => {
                *e.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(tick);
                lease_renewed = true;
                writes += 1;
            }
            Err(err) => eprintln!("{}: heartbeat not renewed: {err:#}", e.name),
        }
    }
    let plan = mesh::plan(&e.name, &peers);
    if !plan.admitted {
        return writes;
    }
    let snapshot = DeviceSnapshot {
        private_key: None,
        listen_port: 51820,
        fwmark: 0,
        peers: plan
            .names
            .keys()
            .map(|k| PeerSnapshot {
                public_key: *k,
                preshared_key: None,
                endpoint: None,
                last_handshake: Some(now),
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: Vec::new(),
            })
            .collect(),
    };
    let want = health::Want {
        peers: &plan.names,
        path_mtus: &BTreeMap::new(),
        tunnel_mtu: 1420,
        handshake_stale: Duration::from_secs(180),
    };
    let Some(report) = health::summary(&snapshot, &want, now) else {
        return writes;
    };
    let due = {
        let last = e.written.lock().unwrap_or_else(|p| p.into_inner());
        health::due(last.as_ref(), &report, heartbeat, lease_renewed)
    };
    if !due {
        return writes;
    }
    match health::write(&e.api, &e.name, &report).await {
        Ok(_) => {
            *e.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
            writes + 1
        }
        Err(err) => {
            eprintln!("{}: report not written: {err}", e.name);
            writes
        }
    }
}

/// A watch of every WireGuardPeer in `rig`, for the emulated agents' plans.
/// The task that drives it is the caller's to stop.
async fn watch(
    rig: &KubeRig,
) -> anyhow::Result<(Store<WireGuardPeer>, tokio::task::JoinHandle<()>)> {
    let api: Api<WireGuardPeer> = Api::all(rig.admin().await?);
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .applied_objects()
        .map_err(|e| eprintln!("watch: {e}"))
        .for_each(|_| async {});
    let task = tokio::spawn(stream);
    reader
        .wait_until_ready()
        .await
        .context("watch never ready")?;
    Ok((reader, task))
}

/// Answers the handshakes of `peers` (real agents) at `socket` as the emulated node with
/// `secret`, until the task is dropped. Data (keepalives, probes) is read and dropped.
async fn respond(
    socket: tokio::net::UdpSocket,
    secret: x25519_dalek::StaticSecret,
    peers: Vec<Key>,
) {
    let public = x25519_dalek::PublicKey::from(&secret);
    // No handshake is ever refused for load: the real agents are few.
    let limiter = Arc::new(RateLimiter::new(&public, u64::MAX));
    let mut tunns: Vec<Tunn> = peers
        .iter()
        .enumerate()
        .map(|(i, k)| {
            Tunn::new(
                secret.clone(),
                x25519_dalek::PublicKey::from(k.0),
                None,
                None,
                u32::try_from(i).unwrap_or(0) << 8,
                Some(limiter.clone()),
            )
        })
        .collect();
    let mut by_source: HashMap<SocketAddr, usize> = HashMap::new();
    let (mut buf, mut out) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let first = by_source.get(&from).copied();
        let order = first
            .into_iter()
            .chain((0..tunns.len()).filter(|i| Some(*i) != first));
        for i in order.collect::<Vec<_>>() {
            let tunn = &mut tunns[i];
            match tunn.decapsulate(Some(from.ip()), &buf[..n], &mut out) {
                TunnResult::Err(_) => continue,
                TunnResult::WriteToNetwork(packet) => {
                    let _ = socket.send_to(packet, from).await;
                    while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut out)
                    {
                        let _ = socket.send_to(p, from).await;
                    }
                }
                _ => {}
            }
            by_source.insert(from, i);
            break;
        }
    }
}

/// A UDP socket bound to `addr` inside `ns`, for the tokio runtime.
fn bind_in(ns: &Netns, addr: SocketAddr) -> anyhow::Result<tokio::net::UdpSocket> {
    let socket = ns.enter(move || -> anyhow::Result<std::net::UdpSocket> {
        let s = std::net::UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })??;
    Ok(tokio::net::UdpSocket::from_std(socket)?)
}

/// Whether every WireGuardPeer in `rig` is admitted (and `MeshConnected`, if asked), and
/// there are `want` of them.
async fn all(rig: &KubeRig, want: usize, connected: bool) -> bool {
    let Ok(admin) = rig.admin().await else {
        return false;
    };
    let Ok(list) = Api::<WireGuardPeer>::all(admin)
        .list(&Default::default())
        .await
    else {
        return false;
    };
    list.items.len() == want
        && list.items.iter().all(|p| {
            p.is_admitted()
                && (!connected
                    || p.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == MESH_CONNECTED && c.status == "True")
                    }))
        })
}

/// The mesh's state for a failure message: peers per (admitted, MeshConnected reason).
async fn census(rig: &KubeRig) -> String {
    let Ok(admin) = rig.admin().await else {
        return "no client".into();
    };
    let Ok(list) = Api::<WireGuardPeer>::all(admin)
        .list(&Default::default())
        .await
    else {
        return "no list".into();
    };
    let mut counts: BTreeMap<(bool, String), usize> = BTreeMap::new();
    for p in &list.items {
        let reason = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == MESH_CONNECTED))
            .map(|c| format!("{} {}", c.reason, c.message))
            .unwrap_or_default();
        *counts.entry((p.is_admitted(), reason)).or_default() += 1;
    }
    format!("{counts:?}")
}

/// Builds the clusters, starts the coordinator and measures. Everything started is stopped
/// when it returns.
pub async fn run(opts: &ScaleOptions) -> anyhow::Result<Figures> {
    crate::require_root();
    if opts.clusters == 0 || opts.nodes <= opts.real_agents {
        bail!("at least one cluster, and more nodes than real agents");
    }
    let etcd = SharedEtcd::start()?;
    let shared = RigOptions {
        install_isthmus: true,
        etcd_servers: Some(etcd.url()),
        ..RigOptions::default()
    };
    let seed_options = RigOptions {
        etcd_servers: Some(etcd.url()),
        ..RigOptions::default()
    };
    eprintln!("starting the seed and {} API servers", opts.clusters);
    // The first cluster is a `Cluster` (its own etcd, two NATed clouds) for the real agents.
    let (seed, first, rest) = tokio::join!(
        KubeRig::start_with(seed_options),
        Cluster::new(),
        futures::stream::iter(1..opts.clusters)
            .map(|_| KubeRig::start_with(shared.clone()))
            .buffered(3)
            .try_collect::<Vec<_>>(),
    );
    let (seed, mut first, rest) = (seed?, first?, rest?);
    crate::seed::install_overlay(&seed)?;

    // Real agents first: the emulated nodes that tunnel to them answer for their keys.
    let hb = opts.heartbeat.as_secs().to_string();
    for r in 0..opts.real_agents {
        let cloud = r % 2;
        let slot = u8::try_from(r / 2 + 1).context("too many real agents")?;
        let i = first.add_node_idle(cloud, slot).await?;
        first.start_node_agent(i, &["--health-interval", &hb])?;
    }
    let mut real_keys: [Vec<Key>; 2] = [Vec::new(), Vec::new()];
    for n in &first.nodes {
        let key = Key::from_base64(&n.dump()?.public_key).context("agent key")?;
        real_keys[n.cloud].push(key);
    }

    let salt = std::process::id();
    let emulated_key = |c: usize, i: usize| {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&salt.to_be_bytes());
        bytes[4..8].copy_from_slice(&u32::try_from(c).unwrap_or(0).to_be_bytes());
        bytes[8..12].copy_from_slice(&u32::try_from(i).unwrap_or(0).to_be_bytes());
        bytes[31] = 0x5a;
        x25519_dalek::StaticSecret::from(bytes)
    };

    // The first cluster's emulated nodes answer the real agents in the other location from
    // their cloud's gateway (203.0.113.<n>:40000+i), where the real agents' NAT leads.
    let mut tasks = AbortOnDrop(Vec::new());
    let emulated_count = opts.nodes - opts.real_agents;
    let mut first_specs = Vec::new();
    for i in 0..emulated_count + opts.joins {
        let secret = emulated_key(0, i);
        let cloud = i % 2;
        let port = 40000 + u16::try_from(i).context("too many nodes")?;
        let addr = SocketAddr::from((Ipv4Addr::new(203, 0, 113, first.clouds[cloud].n), port));
        let socket = bind_in(&first.clouds[cloud].gateway, addr)?;
        let peers = real_keys[1 - cloud].clone();
        first_specs.push(node_spec(i, Key(secret.to_bytes()), addr.to_string())?);
        tasks.0.push(tokio::spawn(respond(socket, secret, peers)));
    }
    let joiners = first_specs.split_off(emulated_count);

    eprintln!("publishing {} emulated nodes", opts.clusters * opts.nodes);
    let mut clusters = Vec::new();
    let rigs: Vec<&KubeRig> = std::iter::once(&first.rig).chain(rest.iter()).collect();
    for (c, rig) in rigs.iter().enumerate() {
        let specs = if c == 0 {
            std::mem::take(&mut first_specs)
        } else {
            (0..opts.nodes)
                .map(|i| {
                    // Nobody real tunnels to these: an address nothing answers at.
                    let ep = format!("192.0.2.1:{}", 40000 + i);
                    node_spec(i, Key(emulated_key(c, i).to_bytes()), ep)
                })
                .collect::<anyhow::Result<_>>()?
        };
        let emulated = futures::stream::iter(specs.iter())
            .map(|s| join(rig, s))
            .buffer_unordered(16)
            .map_ok(Arc::new)
            .try_collect::<Vec<_>>()
            .await?;
        clusters.push(UserCluster {
            name: format!("u{c}"),
            emulated,
            store: None,
        });
    }
    for (c, rig) in rigs.iter().enumerate() {
        let (store, task) = watch(rig).await?;
        clusters[c].store = Some(store);
        tasks.0.push(task);
    }
    let clusters: Vec<Arc<UserCluster>> = clusters.into_iter().map(Arc::new).collect();

    // The emulated agents answer their key challenges as their watch shows them.
    for cluster in &clusters {
        let cluster = cluster.clone();
        tasks.0.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(store) = &cluster.store {
                    prove_once(&cluster, store).await;
                }
            }
        }));
    }

    // The emulated agents' health loops, at the agent's own check interval.
    for cluster in &clusters {
        let cluster = cluster.clone();
        let heartbeat = opts.heartbeat;
        tasks.0.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(health::CHECK_EVERY.min(heartbeat));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let at = tick.tick().await.into_std();
                if let Some(store) = &cluster.store {
                    report_once(&cluster, store, heartbeat, at).await;
                }
            }
        }));
    }

    // The coordinator with nothing to serve yet: its baseline memory.
    let seed_kubeconfig = seed.kubeconfig("coordinator", &seed.coordinator_token().await?)?;
    let mut figures = Figures {
        clusters: opts.clusters,
        nodes: opts.nodes,
        window: opts.window,
        heartbeat: opts.heartbeat,
        ..Figures::default()
    };
    {
        let mut idle = crate::seed::start_coordinator(&seed, &seed_kubeconfig, "idle", &[])?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        figures.coordinator_idle_rss = rss(idle.pid())?.0;
        idle.stop();
    }
    for (c, rig) in rigs.iter().enumerate() {
        let third = 64 + u8::try_from(c).context("too many clusters")?;
        let cidr = format!("100.{third}.0.0/16");
        crate::seed::serve(&seed, &clusters[c].name, rig, &cidr, "cross-location").await?;
    }

    eprintln!("starting the coordinator");
    let started = Instant::now();
    let coordinator = crate::seed::start_coordinator(&seed, &seed_kubeconfig, "scale", &[])?;
    let logs = |coordinator: &Daemon| {
        format!(
            "--- coordinator ---\n{}\n{}",
            tail(&coordinator.log(), 60),
            first
                .nodes
                .iter()
                .filter_map(|n| Some(format!(
                    "--- agent {} ---\n{}",
                    n.name,
                    tail(&n.agent.as_ref()?.log(), 30)
                )))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let every = |connected: bool| {
        let rigs = &rigs;
        async move {
            for rig in rigs {
                if !all(rig, opts.nodes, connected).await {
                    return false;
                }
            }
            true
        }
    };
    if !eventually(opts.settle, || every(false)).await {
        bail!(
            "not every peer admitted within {:?}: first cluster {}\n{}",
            opts.settle,
            census(&first.rig).await,
            logs(&coordinator)
        );
    }
    figures.admitted = started.elapsed();
    eprintln!("all admitted after {:?}", figures.admitted);
    if !eventually(opts.settle, || every(true)).await {
        bail!(
            "not every peer MeshConnected within {:?}: first cluster {}\n{}",
            opts.settle,
            census(&first.rig).await,
            logs(&coordinator)
        );
    }
    figures.connected = started.elapsed();
    eprintln!("all MeshConnected after {:?}", figures.connected);
    let pid = coordinator.pid();
    figures.coordinator_cpu_startup = cpu_seconds(pid)?;

    // Steady state: writes, the coordinator's CPU, the real agents' traffic.
    let agent_pids: Vec<(String, u32)> = first
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), n.agent.as_ref()?.pid())))
        .collect();
    let port = first.rig.port;
    let received_before: Vec<u64> = agent_pids
        .iter()
        .map(|(_, p)| bytes_from(*p, port))
        .collect::<anyhow::Result<_>>()?;
    let writes_before = sum_writes(&rigs)?;
    let cpu_before = cpu_seconds(pid)?;
    eprintln!("counting writes for {:?}", opts.window);
    tokio::time::sleep(opts.window).await;
    let writes_after = sum_writes(&rigs)?;
    figures.coordinator_cpu_window = cpu_seconds(pid)? - cpu_before;
    figures.peer_writes_window = writes_after.peers - writes_before.peers;
    figures.lease_writes_window = writes_after.leases - writes_before.leases;
    figures.all_writes_window = writes_after.all - writes_before.all;
    for ((name, p), before) in agent_pids.iter().zip(received_before) {
        let total = bytes_from(*p, port)?;
        let node = first.node(name);
        let mut have: Vec<String> = node
            .dump()?
            .peers
            .iter()
            .map(|p| p.public_key.clone())
            .collect();
        have.sort();
        let want = first.expected_peers(first.index_of(name)).await?;
        figures.agents.push(AgentFigures {
            node: name.clone(),
            peers: have.len(),
            configured_as_planned: have == want,
            rss: rss(*p)?.0,
            received_total: total,
            received_window: total - before,
        });
    }
    figures.peer_list_bytes = first
        .rig
        .kubectl(&["get", "wireguardpeers", "-o", "json"])?
        .len() as u64;

    // Joins, one after another, into the first cluster: admitted, then configured on every
    // real agent in the other location.
    for spec in &joiners {
        let cloud = LOCATIONS
            .iter()
            .position(|l| *l == spec.location)
            .unwrap_or(0);
        let watchers: Vec<&crate::cluster::NodeHandle> =
            first.nodes.iter().filter(|n| n.cloud != cloud).collect();
        let key = spec.private_key.public_from_private().to_base64();
        let t0 = Instant::now();
        let e = join(&first.rig, spec).await?;
        answer_when_challenged(&e, opts.settle).await?;
        let admin: Api<WireGuardPeer> = Api::all(first.rig.admin().await?);
        let admitted = eventually(opts.settle, || async {
            admin
                .get_opt(&spec.name)
                .await
                .ok()
                .flatten()
                .is_some_and(|p| p.is_admitted())
        })
        .await;
        let t_admitted = t0.elapsed();
        let configured = eventually(opts.settle, || async {
            watchers
                .iter()
                .all(|n| n.dump().is_ok_and(|d| d.peer(&key).is_some()))
        })
        .await;
        if !admitted || !configured {
            bail!(
                "join {} not admitted ({admitted}) or configured ({configured})\n{}",
                spec.name,
                logs(&coordinator)
            );
        }
        figures.joins_admitted.push(t_admitted);
        figures.joins_configured.push(t0.elapsed());
        // Its reports are not part of what was measured; it stays silent.
        drop(e);
    }

    (figures.coordinator_rss, figures.coordinator_peak_rss) = rss(pid)?;
    drop(coordinator);
    drop(etcd);
    Ok(figures)
}

fn sum_writes(rigs: &[&KubeRig]) -> anyhow::Result<Writes> {
    rigs.iter().try_fold(Writes::default(), |sum, rig| {
        let w = writes(rig)?;
        Ok(Writes {
            peers: sum.peers + w.peers,
            leases: sum.leases + w.leases,
            all: sum.all + w.all,
        })
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops the emulation's tasks however [`run`] ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn quantiles(d: &[Duration]) -> (Duration, Duration) {
    let mut v = d.to_vec();
    v.sort();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ja50, jamax) = quantiles(&self.joins_admitted);
        let (jc50, jcmax) = quantiles(&self.joins_configured);
        let per_min = self.writes_per_node_per_heartbeat() * 60.0 / self.heartbeat.as_secs_f64();
        writeln!(f, "| figure | value |")?;
        writeln!(f, "| --- | --- |")?;
        writeln!(
            f,
            "| clusters × nodes | {} × {} |",
            self.clusters, self.nodes
        )?;
        writeln!(
            f,
            "| coordinator start → every peer admitted | {:.1} s |",
            self.admitted.as_secs_f64()
        )?;
        writeln!(
            f,
            "| coordinator start → every peer MeshConnected | {:.1} s |",
            self.connected.as_secs_f64()
        )?;
        writeln!(
            f,
            "| join admitted, p50 / max ({} joins) | {:.2} s / {:.2} s |",
            self.joins_admitted.len(),
            ja50.as_secs_f64(),
            jamax.as_secs_f64()
        )?;
        writeln!(
            f,
            "| join configured on its real peers, p50 / max | {:.2} s / {:.2} s |",
            jc50.as_secs_f64(),
            jcmax.as_secs_f64()
        )?;
        writeln!(
            f,
            "| coordinator RSS idle / now / peak | {:.1} / {:.1} / {:.1} MiB |",
            mib(self.coordinator_idle_rss),
            mib(self.coordinator_rss),
            mib(self.coordinator_peak_rss)
        )?;
        writeln!(
            f,
            "| coordinator CPU to connected / in the {:.0} s window | {:.2} s / {:.2} s |",
            self.window.as_secs_f64(),
            self.coordinator_cpu_startup,
            self.coordinator_cpu_window
        )?;
        writeln!(
            f,
            "| steady writes in the window: WireGuardPeers, heartbeat Leases (all writes) | {}, {} ({}) |",
            self.peer_writes_window, self.lease_writes_window, self.all_writes_window
        )?;
        writeln!(
            f,
            "| writes per node per heartbeat ({:.0} s) / per minute | {:.2} / {:.2} |",
            self.heartbeat.as_secs_f64(),
            self.writes_per_node_per_heartbeat(),
            per_min
        )?;
        writeln!(
            f,
            "| WireGuardPeer list as served (first cluster) | {:.2} MiB, {:.0} B per peer |",
            mib(self.peer_list_bytes),
            self.peer_list_bytes as f64 / self.nodes.max(1) as f64
        )?;
        for a in &self.agents {
            writeln!(
                f,
                "| real agent {}: peers, RSS, bytes from the API total / in the window | {}, {:.1} MiB, {:.0} KiB / {:.1} KiB |",
                a.node,
                a.peers,
                mib(a.rss),
                a.received_total as f64 / 1024.0,
                a.received_window as f64 / 1024.0
            )?;
        }
        Ok(())
    }
}
