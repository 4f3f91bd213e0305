//! The migration sandbox (`make sandbox`): a cluster moves from one cloud to another under a
//! live service, with the real API server, the coordinator and one agent per node, all in
//! network namespaces this program creates and removes.
//!
//! Two clouds (old = vsphere, new = aws) share the node subnet 10.0.0.0/24 (node IPs
//! overlap) and see each other only through their gateways' public addresses. A
//! flannel-like VXLAN overlay spans the nodes. An echo service runs on the old nodes; a
//! client on a new node calls it through a stable virtual IP (iptables DNAT, as kube-proxy
//! does it) while the mesh comes up, the pods roll to the new nodes, the old nodes go, and
//! the mesh is removed. Every request is counted; the run fails if any failed.
//!
//! `isthmus-sandbox [--profile short|default]`, as root. Ctrl-C (or SIGTERM) stops the run
//! at the next step and removes everything it made.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_tests::cluster::{Cluster, ClusterOptions};
use isthmus_tests::netns::Netns;
use isthmus_tests::overlay::Overlay;
use isthmus_tests::traffic::link_counters;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use kube::ResourceExt;

/// The service's stable address (a ClusterIP) and port.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
/// The kube-proxy-like chain in the client node's nat table.
const SERVICE_CHAIN: &str = "SANDBOX-SVC";
/// One request every this long (from the start of one to the start of the next).
const REQUEST_INTERVAL: Duration = Duration::from_millis(50);
/// A request that takes longer than this (connect, or the answer) has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Old cloud (index 0 in [`Cluster::clouds`]) and new cloud (1); two nodes each.
const OLD: usize = 0;
const NEW: usize = 1;
const SLOTS: [u8; 2] = [1, 2];

/// Set by SIGINT/SIGTERM: the run stops at the next step and drops everything.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let handler: extern "C" fn(libc::c_int) = on_signal;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            bail!(
                "installing the handler for signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The error a run ends with when it was asked to stop.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted: stopped at a step boundary, everything removed")
    }
}

impl std::error::Error for Interrupted {}

fn checkpoint() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Waits `d`, or less if the run is asked to stop.
async fn hold(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        checkpoint()?;
        tokio::time::sleep(
            Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    checkpoint()
}

/// Agents report their health every 2 s, so MeshConnected follows the mesh closely.
const AGENT_ARGS: &[&str] = &["--health-interval", "2"];

/// How long each phase lasts.
#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    /// Client traffic to the old pods across the mesh before anything moves.
    steady: Duration,
    /// Old and new pods both in rotation.
    both: Duration,
    /// After the old pods leave the rotation, before they stop (in-flight requests finish).
    drain: Duration,
    /// After the old nodes are gone, and after the mesh is removed.
    after: Duration,
}

impl Profile {
    fn named(name: &str) -> anyhow::Result<Profile> {
        match name {
            "short" => Ok(Profile {
                name: "short",
                steady: Duration::from_secs(3),
                both: Duration::from_secs(2),
                drain: Duration::from_millis(REQUEST_TIMEOUT.as_millis() as u64 + 500),
                after: Duration::from_secs(3),
            }),
            "default" => Ok(Profile {
                name: "default",
                steady: Duration::from_secs(15),
                both: Duration::from_secs(10),
                drain: Duration::from_secs(5),
                after: Duration::from_secs(10),
            }),
            other => bail!("unknown profile {other:?}: short or default"),
        }
    }
}

/// Prints the story, one line per step, with the time since the start.
struct Story {
    start: Instant,
}

impl Story {
    fn say(&self, what: &str) {
        let t = self.start.elapsed().as_secs_f64();
        println!("[{t:6.1}s] {what}");
    }

    fn step(&self, n: u32, what: &str) -> anyhow::Result<()> {
        checkpoint()?;
        println!();
        self.say(&format!("step {n}: {what}"));
        Ok(())
    }
}

/// What the client saw during one phase.
#[derive(Debug, Clone, Default)]
struct PhaseStats {
    name: String,
    sent: u64,
    failed: u64,
    longest_gap: Duration,
    /// Successful answers by the pod that gave them.
    served_by: BTreeMap<String, u64>,
    /// The first few failures, as the client saw them.
    errors: Vec<String>,
}

/// Every request the client made, by phase.
#[derive(Debug, Default)]
struct Ledger {
    phases: Vec<PhaseStats>,
    last_ok: Option<Instant>,
}

impl Ledger {
    fn begin(&mut self, name: &str) {
        self.phases.push(PhaseStats {
            name: name.to_string(),
            ..PhaseStats::default()
        });
    }

    fn record(&mut self, at: Instant, outcome: Result<String, String>) {
        let last_ok = &mut self.last_ok;
        let Some(phase) = self.phases.last_mut() else {
            return;
        };
        phase.sent += 1;
        match outcome {
            Ok(pod) => {
                if let Some(previous) = *last_ok {
                    phase.longest_gap = phase
                        .longest_gap
                        .max(at.saturating_duration_since(previous));
                }
                *last_ok = Some(at);
                *phase.served_by.entry(pod).or_default() += 1;
            }
            Err(e) => {
                phase.failed += 1;
                if phase.errors.len() < 3 {
                    phase.errors.push(e);
                }
            }
        }
    }
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn lock(ledger: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    // A panic while holding the lock cannot leave the counters half-written: use them.
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

/// A small echo service in a pod: for each connection, reads one line and answers
/// `<pod> <line>`. Stopping it stops accepting, then lets the connections it has finish.
struct EchoServer {
    pod: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Netns, pod: &str) -> anyhow::Result<EchoServer> {
        let listener = ns
            .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, SERVICE_PORT)))?
            .with_context(|| format!("echo server in {pod}: bind port {SERVICE_PORT}"))?;
        listener
            .set_nonblocking(true)
            .context("echo server: non-blocking listener")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (pod.to_string(), stop.clone());
        let thread = thread::spawn(move || serve(listener, &name, &flag));
        Ok(EchoServer {
            pod: pod.to_string(),
            stop,
            thread: Some(thread),
        })
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("echo server in {} panicked", self.pod);
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn serve(listener: TcpListener, pod: &str, stop: &AtomicBool) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let pod = pod.to_string();
                connections.push(thread::spawn(move || {
                    // A client that goes away mid-request is its own failure, counted there.
                    let _ = answer(stream, &pod);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                eprintln!("echo server in {pod}: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
        connections.retain(|c| !c.is_finished());
    }
    drop(listener);
    for c in connections {
        let _ = c.join();
    }
}

fn answer(stream: TcpStream, pod: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let mut out = &stream;
    out.write_all(format!("{pod} {}\n", line.trim_end()).as_bytes())
}

/// The client: in a pod, calls the service's virtual IP every [`REQUEST_INTERVAL`] until
/// stopped, and records each request in the ledger.
struct Client {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Client {
    fn start(ns: &Netns, ledger: SharedLedger) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = ns.spawn_in(move || {
            let target = SocketAddr::from((SERVICE_IP, SERVICE_PORT));
            let mut seq = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                seq += 1;
                let outcome = request(target, seq);
                lock(&ledger).record(Instant::now(), outcome);
                if let Some(rest) = REQUEST_INTERVAL.checked_sub(started.elapsed()) {
                    thread::sleep(rest);
                }
            }
        });
        Client {
            stop,
            thread: Some(thread),
        }
    }

    fn shut_down(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the client thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("client: {e:#}");
        }
    }
}

/// One request: connect, send a line, read the answer, close. Ok(the pod that answered).
fn request(target: SocketAddr, seq: u64) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&target, REQUEST_TIMEOUT)
        .map_err(|e| format!("request {seq}: connect: {e}"))?;
    let io = |e: std::io::Error| format!("request {seq}: {e}");
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io)?;
    let sent = format!("hello {seq}");
    (&stream)
        .write_all(format!("{sent}\n").as_bytes())
        .map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    match reply.trim_end().split_once(' ') {
        Some((pod, echoed)) if echoed == sent => Ok(pod.to_string()),
        _ => Err(format!("request {seq}: answer {reply:?} to {sent:?}")),
    }
}

/// The service's virtual IP in the client node's namespace, as kube-proxy's iptables mode
/// makes it: PREROUTING sends the VIP to a chain that DNATs to one endpoint at random
/// (`statistic`, each with equal odds); a pod calling itself through the VIP is
/// masqueraded (hairpin) so the answer comes back through the node. Each update rewrites
/// the chain in one `iptables-restore` transaction; conntrack keeps established
/// connections on the endpoint they started with. The rules go with the namespace.
struct ServiceVip {
    /// The client node's namespace.
    node: String,
}

impl ServiceVip {
    fn install(node: &Netns, client_pod: Ipv4Addr) -> anyhow::Result<ServiceVip> {
        let vip = ServiceVip {
            node: node.name.clone(),
        };
        vip.restore(&format!(
            "*nat\n:{SERVICE_CHAIN} - [0:0]\n\
             -A PREROUTING -d {SERVICE_IP}/32 -p tcp --dport {SERVICE_PORT} -j {SERVICE_CHAIN}\n\
             -A POSTROUTING -s {client_pod}/32 -d {client_pod}/32 -j MASQUERADE\n\
             COMMIT\n"
        ))?;
        Ok(vip)
    }

    /// Points the VIP at exactly `endpoints` (pod IPs, the service port).
    fn set_endpoints(&self, endpoints: &[Ipv4Addr]) -> anyhow::Result<()> {
        let mut rules = format!("*nat\n:{SERVICE_CHAIN} - [0:0]\n-F {SERVICE_CHAIN}\n");
        for (i, ep) in endpoints.iter().enumerate() {
            let left = endpoints.len() - i;
            let odds = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.5} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            rules.push_str(&format!(
                "-A {SERVICE_CHAIN} -p tcp {odds}-j DNAT --to-destination {ep}:{SERVICE_PORT}\n"
            ));
        }
        rules.push_str("COMMIT\n");
        self.restore(&rules)
    }

    fn restore(&self, rules: &str) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, "iptables-restore", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running iptables-restore")?;
        child
            .stdin
            .take()
            .context("iptables-restore stdin")?
            .write_all(rules.as_bytes())
            .context("writing to iptables-restore")?;
        let out = child.wait_with_output().context("iptables-restore")?;
        if !out.status.success() {
            bail!(
                "iptables-restore in {}: {}\n{rules}",
                self.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Calls `pod_ip` directly from `ns` until it answers or `timeout` passes.
async fn probe(ns: &Netns, pod_ip: Ipv4Addr, timeout: Duration) -> anyhow::Result<String> {
    let end = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < end {
        checkpoint()?;
        let target = SocketAddr::from((pod_ip, SERVICE_PORT));
        match ns.enter(move || request(target, 0))? {
            Ok(pod) => return Ok(pod),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{pod_ip} did not answer within {timeout:?}: {last}")
}

fn node_index(cluster: &Cluster, name: &str) -> anyhow::Result<usize> {
    cluster
        .nodes
        .iter()
        .position(|n| n.name == name)
        .with_context(|| format!("no node {name}"))
}

fn pod_of<'a>(
    overlay: &'a Overlay,
    name: &str,
) -> anyhow::Result<&'a isthmus_tests::overlay::OverlayNode> {
    overlay
        .nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("{name} is not in the overlay"))
}

/// Stops a node's agent with SIGTERM (it restores routing on the way out).
fn stop_agent(cluster: &mut Cluster, name: &str) -> anyhow::Result<()> {
    let i = node_index(cluster, name)?;
    let mut agent = cluster.nodes[i]
        .agent
        .take()
        .with_context(|| format!("{name} has no agent"))?;
    match agent.stop() {
        Some(status) if status.success() => Ok(()),
        other => bail!(
            "the agent on {name} did not exit cleanly on SIGTERM ({other:?}):\n{}",
            tail(&agent.log(), 20)
        ),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The story, steps 1 to 7. Everything it makes is dropped when it returns (the client
/// and the echo servers first, then the overlay's pods); the cluster is the caller's.
async fn migrate(
    cluster: &mut Cluster,
    profile: Profile,
    story: &Story,
    ledger: &SharedLedger,
) -> anyhow::Result<()> {
    let old_names: Vec<String> = SLOTS.iter().map(|s| format!("vsphere-{s}")).collect();
    let new_names: Vec<String> = SLOTS.iter().map(|s| format!("aws-{s}")).collect();

    story.step(
        1,
        "the old cloud: two nodes in a flannel VXLAN overlay, an echo service",
    )?;
    for slot in SLOTS {
        cluster.add_node_idle(OLD, slot).await?;
    }
    let mut overlay = Overlay::build(cluster)?;
    let mut old_echo = Vec::new();
    for name in &old_names {
        let pod = pod_of(&overlay, name)?;
        old_echo.push(EchoServer::start(&pod.pod, name)?);
        story.say(&format!(
            "  {name}: node IP {}, pod {} serves echo on port {SERVICE_PORT}",
            cluster.nodes[node_index(cluster, name)?].node_ip,
            pod.pod_ip
        ));
    }

    story.step(
        2,
        "the mesh comes up: the coordinator, and an agent on each old node",
    )?;
    cluster.start_coordinator("sandbox")?;
    for name in &old_names {
        let i = node_index(cluster, name)?;
        cluster.start_node_agent(i, AGENT_ARGS)?;
        story.say(&format!(
            "  agent on {name} started, endpoint {}",
            cluster.nodes[i].endpoint
        ));
    }

    story.step(
        3,
        "new nodes join in the new cloud (same node IPs as the old ones)",
    )?;
    for slot in SLOTS {
        let i = cluster.add_node_idle(NEW, slot).await?;
        overlay.add_node(cluster, i)?;
        cluster.start_node_agent(i, AGENT_ARGS)?;
        let node = &cluster.nodes[i];
        story.say(&format!(
            "  {} joined: node IP {}, pod CIDR {}, endpoint {}",
            node.name,
            node.node_ip,
            node.pod_cidr(),
            node.endpoint
        ));
    }
    // The gate a platform team uses: every node's MeshConnected condition, set by the
    // coordinator from the agents' health reports.
    checkpoint()?;
    cluster
        .rig
        .kubectl(&[
            "wait",
            "--for=condition=MeshConnected",
            "wireguardpeers",
            "--all",
            "--timeout=60s",
        ])
        .map_err(|e| {
            anyhow::anyhow!(
                "the mesh did not connect within 60 s: {e:#}\n{}",
                tail(&cluster.logs(), 40)
            )
        })?;
    checkpoint()?;
    let table = cluster
        .rig
        .kubectl(&["get", "wireguardpeers", "-o", "wide"])?;
    story.say("  kubectl wait --for=condition=MeshConnected wireguardpeers --all: met");
    for line in table.lines() {
        story.say(&format!("    {line}"));
    }
    let mesh_ips = cluster.mesh_ips().await?;
    story.say(&format!(
        "  mesh IPs {}",
        mesh_ips
            .iter()
            .map(|(n, ip)| format!("{n}={ip}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));

    story.step(
        4,
        &format!(
            "a client on {} calls the service at {SERVICE_IP}:{SERVICE_PORT} every {} ms",
            new_names[0],
            REQUEST_INTERVAL.as_millis()
        ),
    )?;
    let client_node = &cluster.nodes[node_index(cluster, &new_names[0])?].ns;
    let client_pod = pod_of(&overlay, &new_names[0])?;
    let old_ips: Vec<Ipv4Addr> = old_names
        .iter()
        .map(|n| Ok(pod_of(&overlay, n)?.pod_ip))
        .collect::<anyhow::Result<_>>()?;
    for ip in &old_ips {
        let pod = probe(&client_pod.pod, *ip, Duration::from_secs(20)).await?;
        story.say(&format!("  {pod} ({ip}) answers across the mesh"));
    }
    let vip = ServiceVip::install(client_node, client_pod.pod_ip)?;
    vip.set_endpoints(&old_ips)?;
    story.say(&format!(
        "  the service's endpoints: {} (old pods, through the mesh)",
        list(&old_ips)
    ));
    lock(ledger).begin("4 old pods, across the mesh");
    let mut client = Client::start(&client_pod.pod, ledger.clone());
    hold(profile.steady).await?;
    let node = &cluster.nodes[node_index(cluster, &new_names[0])?];
    let tunnel = link_counters(&node.ns, &node.iface)?;
    story.say(&format!(
        "  {}'s tunnel {} carried {} packets out, {} in: the calls ride the mesh",
        node.name, node.iface, tunnel.tx_packets, tunnel.rx_packets
    ));

    story.step(5, "the pods roll from the old nodes to the new ones")?;
    lock(ledger).begin("5 rollout to the new nodes");
    let mut new_echo = Vec::new();
    let mut new_ips = Vec::new();
    for name in &new_names {
        let pod = pod_of(&overlay, name)?;
        new_echo.push(EchoServer::start(&pod.pod, name)?);
        new_ips.push(pod.pod_ip);
        story.say(&format!("  echo pod started on {name} ({})", pod.pod_ip));
    }
    let both: Vec<Ipv4Addr> = old_ips.iter().chain(&new_ips).copied().collect();
    vip.set_endpoints(&both)?;
    story.say(&format!("  endpoints: {} (old and new)", list(&both)));
    hold(profile.both).await?;
    vip.set_endpoints(&new_ips)?;
    story.say(&format!(
        "  endpoints: {} (new only); the old pods finish what they have",
        list(&new_ips)
    ));
    hold(profile.drain).await?;
    for mut echo in old_echo.drain(..) {
        echo.shut_down();
        story.say(&format!("  echo pod on {} stopped", echo.pod));
    }

    story.step(6, "the old nodes are drained and removed")?;
    lock(ledger).begin("6 old nodes removed");
    for name in &old_names {
        stop_agent(cluster, name)?;
        story.say(&format!(
            "  agent on {name} stopped (SIGTERM, routing restored)"
        ));
    }
    for name in &old_names {
        overlay.remove_node(cluster, node_index(cluster, name)?)?;
    }
    story.say("  old nodes taken out of the overlay (flannel forgets their leases)");
    let nodes: Api<Node> = Api::all(cluster.rig.admin().await?);
    for name in &old_names {
        nodes
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting Node {name}"))?;
    }
    story.say("  Node objects deleted; waiting for the coordinator to delete their peers");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        checkpoint()?;
        let peers = cluster.peers().await?;
        if !peers.iter().any(|p| old_names.contains(&p.name_any())) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not delete the old nodes' WireGuardPeers within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    story.say("  their WireGuardPeers are gone (garbage-collected)");
    // Overlay indices are stale from here on: nodes are found by name.
    let mut gone = Vec::new();
    for name in &old_names {
        gone.push(cluster.nodes.remove(node_index(cluster, name)?));
    }
    drop(gone);
    story.say("  old node namespaces deleted");
    hold(profile.after).await?;

    story.step(
        7,
        "the mesh is removed: agents stop, the new cloud runs on plain eth0",
    )?;
    for name in &new_names {
        stop_agent(cluster, name)?;
        let node = &cluster.nodes[node_index(cluster, name)?];
        if node.ns.ip(&["link", "show", "dev", &node.iface]).is_ok() {
            bail!(
                "{}'s tunnel device {} is still there",
                node.name,
                node.iface
            );
        }
        story.say(&format!("  agent on {name} stopped (SIGTERM), tunnel gone"));
    }
    for mut c in cluster.coordinators.drain(..) {
        c.stop();
    }
    story.say("  coordinator stopped");
    lock(ledger).begin("7 no mesh");
    hold(profile.after).await?;

    client.shut_down()?;
    story.say("client stopped");
    drop(new_echo);
    Ok(())
}

fn list(ips: &[Ipv4Addr]) -> String {
    ips.iter()
        .map(|ip| format!("{ip}:{SERVICE_PORT}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the two clouds and the API server, replays the migration, and tears it all down
/// (on success, failure or interruption) before returning.
async fn run(profile: Profile, story: &Story, ledger: &SharedLedger) -> anyhow::Result<()> {
    story.say("starting etcd and kube-apiserver, building the two clouds' networks");
    let mut cluster = Cluster::with_options(ClusterOptions::default())
        .await
        .context("starting the API server and the clouds")?;
    story.say(&format!(
        "  API server at {}; clouds {} (old) and {} (new), public 203.0.113.{}/.{}",
        cluster.rig.url(),
        cluster.clouds[OLD].location,
        cluster.clouds[NEW].location,
        cluster.clouds[OLD].n,
        cluster.clouds[NEW].n
    ));
    let result = migrate(&mut cluster, profile, story, ledger).await;
    if let Err(e) = &result {
        if e.downcast_ref::<Interrupted>().is_none() {
            eprintln!(
                "--- last lines of the daemons' logs ---\n{}",
                tail(&cluster.logs(), 60)
            );
        }
    }
    println!();
    story.say("removing everything: agents, coordinator, API server, namespaces");
    drop(cluster);
    result
}

fn report(ledger: &Ledger, wall: Duration, profile: Profile) -> (u64, u64) {
    println!();
    println!("report (profile {}):", profile.name);
    println!(
        "  {:<32} {:>8} {:>7} {:>12}  answered by",
        "phase", "requests", "failed", "longest gap"
    );
    let (mut sent, mut failed, mut gap) = (0, 0, Duration::ZERO);
    for p in &ledger.phases {
        let served = p
            .served_by
            .iter()
            .map(|(pod, n)| format!("{pod} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "  {:<32} {:>8} {:>7} {:>9} ms  {served}",
            p.name,
            p.sent,
            p.failed,
            p.longest_gap.as_millis()
        );
        for e in &p.errors {
            println!("      {e}");
        }
        sent += p.sent;
        failed += p.failed;
        gap = gap.max(p.longest_gap);
    }
    println!(
        "  {:<32} {:>8} {:>7} {:>9} ms",
        "total",
        sent,
        failed,
        gap.as_millis()
    );
    println!("requests: {sent} sent, {failed} failed");
    println!("wall time: {:.1} s", wall.as_secs_f64());
    (sent, failed)
}

fn usage() -> &'static str {
    "usage: isthmus-sandbox [--profile short|default]   (as root)"
}

fn parse_args() -> anyhow::Result<Profile> {
    let mut args = std::env::args().skip(1);
    let mut profile = Profile::named("default")?;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--profile" => {
                profile = Profile::named(&args.next().context("--profile needs a value")?)?;
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    Ok(profile)
}

fn main() -> ExitCode {
    let profile = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the sandbox needs root: it creates network namespaces, TUN devices and iptables \
             rules. Run it as root (e.g. `sudo make sandbox`)."
        );
        return ExitCode::from(2);
    }
    if let Err(e) = install_signal_handlers() {
        eprintln!("{e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let story = Story {
        start: Instant::now(),
    };
    println!(
        "isthmus migration sandbox, profile {}: a live service moves from vsphere to aws",
        profile.name
    );
    let ledger: SharedLedger = Arc::default();
    let result = runtime.block_on(run(profile, &story, &ledger));
    drop(runtime);
    let (sent, failed) = report(&lock(&ledger), story.start.elapsed(), profile);
    match result {
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
            println!("RESULT: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            println!("RESULT: FAILED: {e:#}");
            ExitCode::FAILURE
        }
        Ok(()) if failed > 0 || sent == 0 => {
            println!("RESULT: FAILED: {failed} of {sent} requests failed");
            ExitCode::FAILURE
        }
        Ok(()) => {
            println!("RESULT: ok: the service answered all {sent} requests through the move");
            ExitCode::SUCCESS
        }
    }
}
