//! The control-plane phase: the user cluster's etcd as pods, moved from one cloud to the
//! other over the mesh while a writer writes and reads back continuously.
//!
//! - Members are bare pods `etcd-<n>` (`restartPolicy: Always`, pinned with `nodeName`), whose
//!   entrypoint `isthmus-etcd-member` adds them as learners ([`gateway`]) and execs etcd. They
//!   advertise pod IPs: unique across the clouds and routed between them by flannel's VXLAN
//!   over the mesh, while node IPs overlap.
//! - Bootstrap starts `etcd-1` alone and adds the others exactly as later members join: the
//!   pods' IPs are unknown until they run, and one join path is one path to get right.
//! - Every change is one member at a time, as learner first, so quorum is never at stake:
//!   a learner does not vote, and it is promoted only once etcd agrees it is in sync. A
//!   leader that is to leave hands leadership to a member in the other cloud first.
//! - The writer and every membership call run in a node's host network namespace (pod IPs
//!   are not routed from the machine's own namespace), on threads of their own.
//! - Data dirs are `emptyDir` in memory: the machine's disk is shared with builds, and the
//!   phase measures the move over the mesh, not fsync.

pub mod gateway;

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_tests::rig::RealCluster;
use serde::{Deserialize, Serialize};

/// The etcd image (etcd, `isthmus-etcd-member`, `isthmus-sandbox-client`), built by
/// `scripts/build-sandbox-image.sh`.
pub const SANDBOX_IMAGE: &str = "localhost/isthmus-sandbox:0.1.0";
/// The Kubernetes namespace of the member pods.
pub const NAMESPACE: &str = "isthmus-etcd";
/// Where the writer's keys live (one per write, `<prefix><seq>`).
const PREFIX: &str = "/sandbox/writer/";
/// Write one key this often.
const WRITE_EVERY: Duration = Duration::from_millis(20);
/// A write no member acknowledged (and answered back) within this is failed.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// One attempt on one member; the rest of the deadline goes to the others.
const ATTEMPT: Duration = Duration::from_secs(2);
const POLL_LEADER_EVERY: Duration = Duration::from_millis(200);
const CALL: Duration = Duration::from_secs(3);
/// etcd's raft timing: heartbeat as etcd's default; the election timeout above the default
/// 1 s, as etcd's tuning guide advises for members across a WAN, and because this machine's
/// two cores are shared (a starved member should not cost a leader).
const ETCD_FLAGS: &[&str] = &["--heartbeat-interval=100", "--election-timeout=2500"];

/// What the writer saw during one step (since the last [`Etcd::take_figures`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteFigures {
    /// Writes acknowledged and read back.
    pub writes: u64,
    /// Writes that were not acknowledged within the writer's deadline.
    pub failed: u64,
    /// Acknowledged writes that a later read did not return.
    pub lost: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub leader_changes: u32,
    /// Members after the step, by name.
    pub members: Vec<String>,
}

/// One member pod as the sandbox placed it.
#[derive(Debug, Clone)]
struct Placed {
    name: String,
    node: String,
    ip: String,
    id: u64,
}

impl Placed {
    fn client_url(&self) -> String {
        format!("http://{}:2379", self.ip)
    }

    /// The cloud of its node (`vsphere-1` → `vsphere`), as the rig names nodes.
    fn cloud(&self) -> &str {
        self.node.split('-').next().unwrap_or_default()
    }
}

/// What the writer's threads share with the sandbox.
#[derive(Default)]
struct Shared {
    /// Client URLs of the voting members, in the order the writer tries them.
    endpoints: Vec<String>,
    writes: u64,
    failed: u64,
    latencies: Vec<Duration>,
    leader_changes: u32,
    /// Keys (base64) of every write acknowledged and read back, for [`Etcd::finish`].
    acked: Vec<String>,
    last_error: Option<String>,
}

struct Writer {
    node: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// A running etcd cluster of pods and its writer.
pub struct Etcd {
    members: Vec<Placed>,
    next: usize,
    /// The node whose network namespace membership calls run in: the first member's until
    /// the writer starts, then the writer's.
    control_node: String,
    shared: Arc<Mutex<Shared>>,
    writer: Option<Writer>,
    /// How long [`Etcd::add`] waits for a new member to run, join and catch up.
    pub join_timeout: Duration,
    manifests: std::path::PathBuf,
}

impl Etcd {
    /// Starts one member pod per entry of `nodes` (pinned there), named `etcd-1`, `etcd-2`, …,
    /// as a new cluster; returns once it is healthy.
    pub async fn bootstrap(c: &RealCluster, nodes: &[&str]) -> anyhow::Result<Etcd> {
        let first = nodes.first().context("no node for etcd-1")?;
        let manifests = c.rig.dir.path().join("etcd");
        std::fs::create_dir_all(&manifests).context("creating the manifest directory")?;
        let ns = manifests.join("namespace.yaml");
        std::fs::write(
            &ns,
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"),
        )?;
        c.kubectl(&["apply", "-f", &ns.display().to_string()])?;
        let mut e = Etcd {
            members: Vec::new(),
            next: 1,
            control_node: first.to_string(),
            shared: Arc::default(),
            writer: None,
            join_timeout: Duration::from_secs(90),
            manifests,
        };
        let name = e.next_name();
        e.create_pod(c, &name, first, &["bootstrap"])?;
        let ip = pod_ip(c, &name, Duration::from_secs(60))?;
        let url = format!("http://{ip}:2379");
        let id = e
            .ctl(c, move || {
                retry(Duration::from_secs(60), || {
                    let s = gateway::status(&url, CALL)?;
                    if s.leader == 0 {
                        bail!("no leader yet");
                    }
                    Ok(s.member_id)
                })
            })
            .await
            .with_context(|| format!("{name} never became a one-member cluster"))
            .with_context(|| pod_logs(c, &name))?;
        e.members.push(Placed {
            name,
            node: first.to_string(),
            ip,
            id,
        });
        for node in &nodes[1..] {
            e.add(c, node).await?;
        }
        e.healthy(c).await?;
        Ok(e)
    }

    /// Starts the writer in `node`'s host network namespace.
    pub fn start_writer(&mut self, c: &RealCluster, node: &str) -> anyhow::Result<()> {
        if self.writer.is_some() {
            bail!("the writer already runs");
        }
        let ns = &c.node(node)?.ns;
        self.lock().endpoints = self.members.iter().map(Placed::client_url).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, st1) = (self.shared.clone(), stop.clone());
        let (s2, st2) = (self.shared.clone(), stop.clone());
        let threads = vec![
            ns.spawn_in(move || write_loop(&s1, &st1)),
            ns.spawn_in(move || leader_loop(&s2, &st2)),
        ];
        self.control_node = node.to_string();
        self.writer = Some(Writer {
            node: node.to_string(),
            stop,
            threads,
        });
        Ok(())
    }

    /// Adds a member on `node` (as a learner, promoted once caught up); returns its name.
    pub async fn add(&mut self, c: &RealCluster, node: &str) -> anyhow::Result<String> {
        let name = self.next_name();
        let mut args = vec!["join".to_string()];
        args.extend(self.members.iter().map(Placed::client_url));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.create_pod(c, &name, node, &args)?;
        match self.join(c, &name, node).await {
            Ok(p) => {
                self.members.push(p);
                self.publish_endpoints();
                self.healthy(c).await?;
                Ok(name)
            }
            Err(e) => {
                // Leave nothing half-done: the learner (if it was added) and its pod; the
                // name is free again once both are gone.
                let logs = pod_logs(c, &name);
                if self.forget(c, &name).await.is_ok() {
                    self.next -= 1;
                }
                Err(e.context(logs))
            }
        }
    }

    /// Waits for `name`'s pod IP, its learner entry and its catching up; promotes it.
    async fn join(&self, c: &RealCluster, name: &str, node: &str) -> anyhow::Result<Placed> {
        let deadline = Instant::now() + self.join_timeout;
        let ip = pod_ip(c, name, self.join_timeout)?;
        let peer = format!("http://{ip}:2380");
        let url = format!("http://{ip}:2379");
        let voters: Vec<String> = self.members.iter().map(Placed::client_url).collect();
        let id = self
            .ctl(c, move || -> anyhow::Result<u64> {
                let left = || deadline.saturating_duration_since(Instant::now());
                // 1. The learner is listed (the pod added itself) and runs.
                let id = retry(left(), || {
                    let m = any(&voters, |ep| gateway::member_list(ep, CALL))?;
                    let me = m
                        .iter()
                        .find(|m| m.peer_urls.contains(&peer))
                        .context("not added yet")?;
                    if me.name.is_empty() {
                        bail!("added, not started yet");
                    }
                    Ok(me.id)
                })
                .context("the new member never joined as a learner")?;
                // 2. It has applied what the leader had committed when we looked.
                let target = any(&voters, |ep| gateway::status(ep, CALL))?.raft_index;
                retry(left(), || {
                    let s = gateway::status(&url, CALL)?;
                    if s.raft_applied_index < target {
                        bail!("applied {} of {target}", s.raft_applied_index);
                    }
                    Ok(())
                })
                .context("the learner never caught up")?;
                // 3. Promoted; etcd refuses while it is not in sync with the leader.
                retry(left(), || {
                    any(&voters, |ep| gateway::member_promote(ep, id, CALL))
                })
                .context("the learner was never promoted")?;
                Ok(id)
            })
            .await?;
        Ok(Placed {
            name: name.to_string(),
            node: node.to_string(),
            ip,
            id,
        })
    }

    /// Removes member `name` (leadership moved away first) and deletes its pod.
    pub async fn remove(&mut self, c: &RealCluster, name: &str) -> anyhow::Result<()> {
        let i = self
            .members
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no member {name}"))?;
        let victim = self.members[i].clone();
        let rest: Vec<Placed> = self
            .members
            .iter()
            .filter(|m| m.name != name)
            .cloned()
            .collect();
        if rest.is_empty() {
            bail!("{name} is the last member");
        }
        // Successor: a member in another cloud than the leaving one, where quorum is going.
        let successor = rest
            .iter()
            .find(|m| m.cloud() != victim.cloud())
            .unwrap_or(&rest[0])
            .clone();
        let rest_urls: Vec<String> = rest.iter().map(Placed::client_url).collect();
        let v = victim.clone();
        let urls = rest_urls.clone();
        self.ctl(c, move || -> anyhow::Result<()> {
            let leader = retry(Duration::from_secs(20), || {
                let l = any(&urls, |ep| gateway::status(ep, CALL))?.leader;
                if l == 0 {
                    bail!("no leader");
                }
                Ok(l)
            })?;
            if leader == v.id {
                gateway::move_leader(&v.client_url(), successor.id, CALL).with_context(|| {
                    format!("moving leadership from {} to {}", v.name, successor.name)
                })?;
                retry(Duration::from_secs(20), || {
                    let l = any(&urls, |ep| gateway::status(ep, CALL))?.leader;
                    if l != successor.id {
                        bail!("leader is {l:x}, not {} yet", successor.name);
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })
        .await
        .with_context(|| format!("moving leadership off {name}"))?;
        // The writer stops asking it before it goes.
        self.members.remove(i);
        self.publish_endpoints();
        let id = victim.id;
        self.ctl(c, move || {
            retry(Duration::from_secs(20), || {
                any(&rest_urls, |ep| gateway::member_remove(ep, id, CALL))
            })
        })
        .await
        .with_context(|| format!("removing member {name}"))?;
        delete_pod(c, name)?;
        self.healthy(c).await
    }

    /// The writer's figures since the last call.
    pub fn take_figures(&mut self) -> WriteFigures {
        let members = self.members.iter().map(|m| m.name.clone()).collect();
        let mut s = self.lock();
        let mut lat = std::mem::take(&mut s.latencies);
        lat.sort();
        let pct = |p: usize| {
            lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        WriteFigures {
            writes: std::mem::take(&mut s.writes),
            failed: std::mem::take(&mut s.failed),
            lost: 0,
            p50: pct(50),
            p99: pct(99),
            leader_changes: std::mem::take(&mut s.leader_changes),
            members,
        }
    }

    /// Members by name, with their nodes: `(name, node)`.
    pub fn members(&self) -> Vec<(String, String)> {
        self.members
            .iter()
            .map(|m| (m.name.clone(), m.node.clone()))
            .collect()
    }

    /// The writer's last error (for a report that has failed writes).
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// Stops the writer, checks every acknowledged write is still there, deletes the pods.
    pub async fn finish(mut self, c: &RealCluster) -> anyhow::Result<WriteFigures> {
        self.stop_writer()?;
        let mut figures = self.take_figures();
        let acked = std::mem::take(&mut self.lock().acked);
        if !acked.is_empty() {
            let urls: Vec<String> = self.members.iter().map(Placed::client_url).collect();
            let present: HashSet<String> = self
                .ctl(c, move || {
                    retry(Duration::from_secs(20), || {
                        any(&urls, |ep| {
                            gateway::keys_b64(ep, PREFIX.as_bytes(), Duration::from_secs(10))
                        })
                    })
                })
                .await
                .context("reading back every acknowledged write")?
                .into_iter()
                .collect();
            figures.lost = acked.iter().filter(|k| !present.contains(*k)).count() as u64;
        }
        for m in std::mem::take(&mut self.members) {
            delete_pod(c, &m.name)?;
        }
        c.kubectl(&["delete", "namespace", NAMESPACE, "--wait=false"])?;
        Ok(figures)
    }

    fn next_name(&mut self) -> String {
        let n = format!("etcd-{}", self.next);
        self.next += 1;
        n
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_endpoints(&self) {
        self.lock().endpoints = self.members.iter().map(Placed::client_url).collect();
    }

    fn stop_writer(&mut self) -> anyhow::Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        w.stop.store(true, Ordering::Relaxed);
        for t in w.threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("a writer thread on {} panicked", w.node))?
                .with_context(|| format!("the writer on {}", w.node))?;
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the control node's network namespace (pod IPs are routed
    /// there) without blocking the async runtime.
    async fn ctl<T: Send + 'static>(
        &self,
        c: &RealCluster,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", c.node(&self.control_node)?.ns.name);
        tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || -> anyhow::Result<T> {
                let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: a valid namespace fd; setns only affects this (fresh) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a control thread panicked"))?
        })
        .await
        .context("joining a control thread")?
    }

    /// Checks quorum as the sandbox placed it: the membership is exactly the pods, all
    /// voting, and every member answers and names the same leader. Retried for a while
    /// (a member the kubelet restarts needs a moment).
    pub async fn healthy(&self, c: &RealCluster) -> anyhow::Result<()> {
        let placed: Vec<(String, u64)> = self
            .members
            .iter()
            .map(|m| (m.client_url(), m.id))
            .collect();
        self.ctl(c, move || {
            let urls: Vec<String> = placed.iter().map(|(u, _)| u.clone()).collect();
            retry(Duration::from_secs(60), || {
                let listed = any(&urls, |ep| gateway::member_list(ep, CALL))?;
                let mut ids: Vec<u64> = listed.iter().map(|m| m.id).collect();
                let mut want: Vec<u64> = placed.iter().map(|(_, id)| *id).collect();
                ids.sort_unstable();
                want.sort_unstable();
                if ids != want {
                    bail!("membership {ids:x?}, want {want:x?}");
                }
                if let Some(l) = listed.iter().find(|m| m.is_learner) {
                    bail!("{} is still a learner", l.name);
                }
                let mut leaders = HashSet::new();
                for u in &urls {
                    let s = gateway::status(u, CALL)?;
                    if s.leader == 0 {
                        bail!("{u} has no leader");
                    }
                    leaders.insert(s.leader);
                }
                if leaders.len() != 1 {
                    bail!("members disagree on the leader: {leaders:x?}");
                }
                Ok(())
            })
        })
        .await
        .context("the etcd cluster is not healthy")
    }

    /// Removes what [`Etcd::add`] left of `name`: its learner entry, if any, and its pod.
    async fn forget(&self, c: &RealCluster, name: &str) -> anyhow::Result<()> {
        if let Ok(ip) = pod_ip(c, name, Duration::ZERO) {
            let peer = format!("http://{ip}:2380");
            let urls: Vec<String> = self.members.iter().map(Placed::client_url).collect();
            let _ = self
                .ctl(c, move || {
                    let m = any(&urls, |ep| gateway::member_list(ep, CALL))?;
                    if let Some(me) = m.iter().find(|m| m.peer_urls.contains(&peer)) {
                        any(&urls, |ep| gateway::member_remove(ep, me.id, CALL))?;
                    }
                    Ok(())
                })
                .await;
        }
        delete_pod(c, name)
    }

    fn create_pod(
        &self,
        c: &RealCluster,
        name: &str,
        node: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--");
        all.extend_from_slice(ETCD_FLAGS);
        let args_json = serde_json::to_string(&all)?;
        let y = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n  \
             labels: {{app: etcd}}\nspec:\n  nodeName: {node}\n  restartPolicy: Always\n  \
             terminationGracePeriodSeconds: 2\n  containers:\n  - name: etcd\n    \
             image: {SANDBOX_IMAGE}\n    imagePullPolicy: Never\n    \
             command: [/usr/local/bin/isthmus-etcd-member]\n    args: {args_json}\n    env:\n    \
             - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}\n    \
             - {{name: NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}\n    \
             ports: [{{containerPort: 2379, name: client}}, {{containerPort: 2380, name: peer}}]\n    \
             readinessProbe: {{httpGet: {{path: /health, port: 2379}}, periodSeconds: 2, timeoutSeconds: 2}}\n    \
             volumeMounts: [{{name: data, mountPath: /var/lib/etcd}}]\n  \
             volumes: [{{name: data, emptyDir: {{medium: Memory}}}}]\n"
        );
        let path = self.manifests.join(format!("{name}.yaml"));
        std::fs::write(&path, y).with_context(|| format!("writing {}", path.display()))?;
        c.kubectl(&["apply", "-f", &path.display().to_string()])
            .with_context(|| format!("creating pod {name} on {node}"))?;
        Ok(())
    }
}

impl Drop for Etcd {
    /// The writer's threads never outlive the sandbox (the pods go with the cluster).
    fn drop(&mut self) {
        if let Err(e) = self.stop_writer() {
            eprintln!("etcd: {e:#}");
        }
    }
}

/// Calls `f` until it succeeds or `within` has passed (at least once); the last error.
fn retry<T>(within: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// `f` on each endpoint in turn until one answers.
fn any<T>(urls: &[String], mut f: impl FnMut(&str) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let mut errors = Vec::new();
    for u in urls {
        match f(u) {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    bail!("no member answered: {}", errors.join("; "))
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One key every [`WRITE_EVERY`]: put, then read back, on whichever member answers first
/// (the last one that did first); failed only if none did within [`WRITE_DEADLINE`].
fn write_loop(shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut preferred = 0usize;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + WRITE_EVERY;
        let key = format!("{PREFIX}{seq:010}");
        let value = format!("write {seq}");
        let t = Instant::now();
        let deadline = t + WRITE_DEADLINE;
        let mut last_error = None;
        let mut done = false;
        'write: while Instant::now() < deadline {
            let eps = lock(shared).endpoints.clone();
            if eps.is_empty() {
                last_error = Some("no endpoints".to_string());
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            for k in 0..eps.len() {
                let i = (preferred + k) % eps.len();
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break 'write;
                }
                let attempt = left.min(ATTEMPT);
                let r = gateway::put(&eps[i], key.as_bytes(), value.as_bytes(), attempt)
                    .and_then(|_| gateway::get_b64(&eps[i], key.as_bytes(), attempt));
                match r {
                    Ok(Some(v)) if v == gateway::b64(value.as_bytes()) => {
                        preferred = i;
                        done = true;
                        break 'write;
                    }
                    Ok(other) => last_error = Some(format!("{}: read back {other:?}", eps[i])),
                    Err(e) => last_error = Some(format!("{e:#}")),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = lock(shared);
        if done {
            s.writes += 1;
            s.latencies.push(t.elapsed());
            s.acked.push(gateway::b64(key.as_bytes()));
        } else {
            s.failed += 1;
            s.last_error = last_error;
        }
        drop(s);
        seq += 1;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// Polls the leader's ID every [`POLL_LEADER_EVERY`] and counts changes.
fn leader_loop(shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut last = 0u64;
    let mut preferred = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let eps = lock(shared).endpoints.clone();
        for k in 0..eps.len() {
            let i = (preferred + k) % eps.len();
            if let Ok(s) = gateway::status(&eps[i], Duration::from_secs(1)) {
                preferred = i;
                if s.leader != 0 {
                    if last != 0 && s.leader != last {
                        lock(shared).leader_changes += 1;
                    }
                    last = s.leader;
                }
                break;
            }
        }
        std::thread::sleep(POLL_LEADER_EVERY);
    }
}

/// The pod's IP once it has one.
fn pod_ip(c: &RealCluster, name: &str, within: Duration) -> anyhow::Result<String> {
    retry(within, || {
        let ip = c.kubectl(&[
            "get",
            "pod",
            "-n",
            NAMESPACE,
            name,
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        let ip = ip.trim();
        if ip.is_empty() {
            bail!("pod {name} has no IP yet");
        }
        Ok(ip.to_string())
    })
}

fn delete_pod(c: &RealCluster, name: &str) -> anyhow::Result<()> {
    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        NAMESPACE,
        name,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=60s",
    ])
    .with_context(|| format!("deleting pod {name}"))?;
    Ok(())
}

/// The tail of a member's log (this run's and, after a restart, the previous one's).
fn pod_logs(c: &RealCluster, name: &str) -> String {
    let mut out = format!("--- {name} ---\n");
    for prev in ["--previous=false", "--previous=true"] {
        if let Ok(l) = c.kubectl(&["logs", "-n", NAMESPACE, name, prev, "--tail=15"]) {
            out.push_str(&l);
        }
    }
    out
}
