//! isthmus on a real Kubernetes cluster: real kube-apiserver, controller-manager,
//! scheduler; four nodes in two clouds with overlapping node IPs, each with the real
//! containerd, kubelet and kube-proxy; the real flannel (VXLAN) as a DaemonSet; isthmus
//! installed from its image with `kubectl apply --server-side -k deploy/overlays/local`.
//!
//! One cluster for the whole file (it costs about a gigabyte and half a minute), so the
//! scenarios run in order inside one test, each announced on stderr:
//!
//! 1. before the mesh: cross-cloud pod traffic fails (flannel alone cannot cross);
//! 2. install: every agent Ready, two coordinators with one lease, `isthmus-agent peers`
//!    through `kubectl exec`, `wg show` on a node;
//! 3. cross-cloud pod→pod, pod→Service (ClusterIP through kube-proxy) and node→pod, over
//!    HTTP and with a 2000-byte UDP datagram;
//! 4. `kubectl rollout restart ds/isthmus-agent`: the mesh comes back;
//! 5. flannel's pod restarted: flannel rewrites its entries, the agent re-asserts;
//! 6. the agent SIGKILLed: restarted by the kubelet, and a replaced pod's init container
//!    restores; the mesh comes back;
//! 7. uninstall: every node's routing is what it was before the install, line for line, and
//!    a same-location stream that ran through install, roll and removal lost nothing;
//! 8. reinstall, then a Node deleted: its peer is collected, and no node keeps a route, FDB
//!    entry or WireGuard peer for it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use isthmus_tests::daemon::wait_until;
use isthmus_tests::rig::probe::{http_get, pod_dial, udp_echo};
use isthmus_tests::rig::{RealCluster, AGNHOST_IMAGE};
use isthmus_tests::snapshot::snapshot;
use isthmus_tests::traffic::{start_stream, StreamConfig};

const NS: &str = "isthmus-system";
/// A 2000-byte UDP datagram, as upstream's "should be able to handle large requests" tests
/// send: larger than any path MTU here, so it crosses as IP fragments.
const LARGE: usize = 2000 - "echo ".len();

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

/// The echo pods: one per node, pinned, `agnhost netexec` with HTTP 8080 and UDP 8081.
fn echo_pods(nodes: &[&str]) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: e2e\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: echo-old\n  namespace: e2e\nspec:\n\
         \x20 selector: {cloud: vsphere}\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n\
         \x20 - {name: udp, port: 81, targetPort: 8081, protocol: UDP}\n",
    );
    for n in nodes {
        let cloud = n.split('-').next().unwrap_or_default();
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-{n}\n  namespace: e2e\n  labels: {{cloud: {cloud}}}\n\
             spec:\n  nodeName: {n}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: netexec\n    image: {AGNHOST_IMAGE}\n\
             \x20   imagePullPolicy: Never\n    args: [netexec, --http-port=8080, --udp-port=8081]\n\
             \x20   readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n"
        ));
    }
    y
}

/// A named probe that succeeds or says why not.
type Check<'a> = (&'a str, Box<dyn Fn() -> anyhow::Result<()> + 'a>);

struct Pods {
    /// (name, IP) of every echo pod.
    ips: Vec<(String, IpAddr)>,
    service: IpAddr,
}

impl Pods {
    fn ip(&self, node: &str) -> anyhow::Result<IpAddr> {
        let name = format!("echo-{node}");
        self.ips
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, ip)| *ip)
            .with_context(|| format!("no pod {name}"))
    }
}

fn read_pods(c: &RealCluster) -> anyhow::Result<Pods> {
    let out = c.kubectl(&["get", "pods", "-n", "e2e", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut ips = Vec::new();
    for p in v["items"].as_array().context("pod list")? {
        let name = p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ip: IpAddr = p["status"]["podIP"]
            .as_str()
            .with_context(|| format!("{name} has no IP"))?
            .parse()?;
        ips.push((name, ip));
    }
    let service: IpAddr = c
        .kubectl(&[
            "get",
            "svc",
            "-n",
            "e2e",
            "echo-old",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?
        .trim()
        .parse()?;
    Ok(Pods { ips, service })
}

/// Every kind of cross-cloud traffic the issue names, from the aws side to the vsphere side
/// (and the way back for node→pod), each retried for up to `within`.
fn cross_cloud(c: &RealCluster, pods: &Pods, within: Duration) -> anyhow::Result<()> {
    let big = "x".repeat(LARGE);
    let client = SocketAddr::new(pods.ip("aws-1")?, 8080);
    let aws1 = &c.node("aws-1")?.ns;
    let vs2 = &c.node("vsphere-2")?.ns;
    let v1_pod = pods.ip("vsphere-1")?;
    let a2_pod = pods.ip("aws-2")?;
    let checks: Vec<Check> = vec![
        (
            "pod→pod http",
            Box::new(|| {
                let r = pod_dial(
                    aws1,
                    client,
                    "http",
                    SocketAddr::new(v1_pod, 8080),
                    "hostname",
                )?;
                (r == ["echo-vsphere-1"])
                    .then_some(())
                    .context(format!("{r:?}"))
            }),
        ),
        (
            "pod→pod udp 2000 B",
            Box::new(|| {
                let r = pod_dial(
                    aws1,
                    client,
                    "udp",
                    SocketAddr::new(v1_pod, 8081),
                    &format!("echo {big}"),
                )?;
                (r.len() == 1 && r[0] == big)
                    .then_some(())
                    .context(format!("{} answers", r.len()))
            }),
        ),
        (
            "pod→service http",
            Box::new(|| {
                let r = pod_dial(
                    aws1,
                    client,
                    "http",
                    SocketAddr::new(pods.service, 80),
                    "hostname",
                )?;
                (r.len() == 1 && r[0].starts_with("echo-vsphere-"))
                    .then_some(())
                    .context(format!("{r:?}"))
            }),
        ),
        (
            "pod→service udp 2000 B",
            Box::new(|| {
                let r = pod_dial(
                    aws1,
                    client,
                    "udp",
                    SocketAddr::new(pods.service, 81),
                    &format!("echo {big}"),
                )?;
                (r.len() == 1 && r[0] == big)
                    .then_some(())
                    .context(format!("{} answers", r.len()))
            }),
        ),
        (
            "node→pod http",
            Box::new(|| {
                let body = http_get(aws1, SocketAddr::new(v1_pod, 8080), "/hostname")?;
                (body == "echo-vsphere-1").then_some(()).context(body)
            }),
        ),
        (
            "node→pod udp 2000 B (vsphere-2 → aws-2)",
            Box::new(|| {
                let r = udp_echo(vs2, SocketAddr::new(a2_pod, 8081), &big)?;
                (r == big)
                    .then_some(())
                    .context(format!("{} bytes back", r.len()))
            }),
        ),
    ];
    for (what, check) in checks {
        let mut last = None;
        let ok = wait_until(within, || match check() {
            Ok(()) => true,
            Err(e) => {
                last = Some(e);
                false
            }
        });
        if !ok {
            bail!(
                "{what}: {:#}",
                last.unwrap_or_else(|| anyhow!("no attempt"))
            );
        }
    }
    Ok(())
}

/// The agent pod on `node`.
fn agent_pod(c: &RealCluster, node: &str) -> anyhow::Result<String> {
    let out = c.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=isthmus-agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("no agent pod on {node}"))
}

/// The PID of the process named `comm` among the node's processes.
fn pid_of(c: &RealCluster, node: &str, comm: &str) -> anyhow::Result<i32> {
    let n = c.node(node)?;
    n.pids_inside()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|s| s.trim() == comm)
        })
        .with_context(|| format!("no {comm} on {node}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isthmus_on_a_real_cluster() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut c = RealCluster::start().await?;
    step(t0, "control plane up");
    let names = ["vsphere-1", "vsphere-2", "aws-1", "aws-2"];
    for (cloud, slot) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
        c.add_node(cloud, slot).await?;
    }
    step(t0, "four nodes registered");
    c.install_flannel()?;
    c.wait_ready(Duration::from_secs(120))?;
    step(t0, "every node Ready (flannel wrote the CNI configuration)");

    let manifest = c.rig.dir.path().join("echo.yaml");
    std::fs::write(&manifest, echo_pods(&names))?;
    c.kubectl(&["apply", "-f", &manifest.display().to_string()])?;
    c.kubectl(&[
        "wait",
        "-n",
        "e2e",
        "--for=condition=Ready",
        "pods",
        "--all",
        "--timeout=120s",
    ])
    .with_context(|| c.diagnostics())?;
    let pods = read_pods(&c)?;
    step(t0, "echo pods Ready on every node");

    // 1. Without the mesh, flannel's VXLAN cannot cross: the node IPs overlap and the clouds
    // see each other only through their gateways.
    let res = cross_cloud(&c, &pods, Duration::from_secs(2));
    assert!(
        res.is_err(),
        "cross-cloud traffic worked before isthmus was installed"
    );
    step(t0, "before the mesh: cross-cloud traffic fails, as it must");

    let before: Vec<_> = names
        .iter()
        .map(|n| snapshot(&c.node(n)?.ns))
        .collect::<anyhow::Result<_>>()?;
    // A same-location overlay stream (vsphere-1 → vsphere-2's cni0 through flannel.1) for
    // the whole install, roll and removal.
    let vs2_gw: IpAddr = {
        let out = c
            .node("vsphere-2")?
            .ns
            .ip(&["-4", "-o", "addr", "show", "dev", "cni0"])?;
        let cidr = out.split_whitespace().nth(3).context("cni0 address")?;
        cidr.split('/').next().context("cni0 address")?.parse()?
    };
    let stream = start_stream(
        &c.node("vsphere-1")?.ns,
        &c.node("vsphere-2")?.ns,
        vs2_gw,
        StreamConfig::default(),
    )?;

    // 2. Install from the image.
    let t_apply = Instant::now();
    c.install_isthmus()?;
    c.wait_agents_ready("180s")?;
    let apply_to_ready = t_apply.elapsed();
    step(
        t0,
        &format!("isthmus installed: every agent Ready {apply_to_ready:.1?} after kubectl apply"),
    );
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        NS,
        "deploy/isthmus-coordinator",
        "--timeout=120s",
    ])
    .with_context(|| c.diagnostics())?;
    let holder = c.kubectl(&[
        "get",
        "lease",
        "-n",
        NS,
        "isthmus-coordinator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert!(
        holder.starts_with("isthmus-coordinator-"),
        "lease holder {holder:?}"
    );
    cross_cloud(&c, &pods, Duration::from_secs(60)).with_context(|| c.diagnostics())?;
    step(
        t0,
        "cross-cloud pod→pod, pod→service, node→pod: HTTP and 2000-byte UDP",
    );

    let pod = agent_pod(&c, "aws-1")?;
    let peers = c.kubectl(&[
        "exec",
        "-n",
        NS,
        &pod,
        "-c",
        "agent",
        "--",
        "isthmus-agent",
        "peers",
    ])?;
    for remote in ["vsphere-1", "vsphere-2"] {
        assert!(
            peers
                .lines()
                .any(|l| l.starts_with(remote) && l.contains(" up")),
            "peers:\n{peers}"
        );
    }
    assert!(
        !peers.contains("aws-2"),
        "same-location peer listed:\n{peers}"
    );
    // As an operator types it: whichever agent kubectl picks lists its two cross-cloud
    // peers, both up, and `wg show` in the agent's image reads the same socket.
    let any = c.kubectl(&[
        "exec",
        "-n",
        NS,
        "ds/isthmus-agent",
        "-c",
        "agent",
        "--",
        "isthmus-agent",
        "peers",
    ])?;
    let up = any
        .lines()
        .filter(|l| l.trim_end().ends_with(" up"))
        .count();
    assert_eq!(
        up, 2,
        "kubectl exec ds/isthmus-agent -- isthmus-agent peers:\n{any}"
    );
    let wg_in_pod = c.kubectl(&[
        "exec",
        "-n",
        NS,
        "ds/isthmus-agent",
        "-c",
        "agent",
        "--",
        "wg",
        "show",
    ])?;
    assert_eq!(
        wg_in_pod.matches("peer: ").count(),
        2,
        "wg show in the agent pod:\n{wg_in_pod}"
    );
    let wg = c.node("vsphere-1")?.exec("wg", &["show", "isthmus0"])?;
    assert_eq!(
        wg.matches("peer: ").count(),
        2,
        "wg show on vsphere-1:\n{wg}"
    );
    assert!(
        wg.contains("latest handshake"),
        "wg show on vsphere-1:\n{wg}"
    );
    step(
        t0,
        "kubectl exec … isthmus-agent peers, and wg show on a node",
    );

    // 4. Roll the DaemonSet.
    c.kubectl(&["rollout", "restart", "-n", NS, "ds/isthmus-agent"])?;
    c.wait_agents_ready("240s")?;
    cross_cloud(&c, &pods, Duration::from_secs(30))?;
    step(
        t0,
        "rollout restart: every agent replaced, the mesh is back",
    );

    // 5. flannel's pod on aws-1 restarted: flanneld rewrites its FDB entries at start; the
    // agent puts them back. A 500/s cross-cloud stream node→node-overlay measures the gap.
    let a1 = c.node("aws-1")?;
    let flannel_pod = c.kubectl(&[
        "get",
        "pods",
        "-n",
        "kube-flannel",
        "--field-selector",
        "spec.nodeName=aws-1",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let v1_gw: IpAddr = {
        let out = c
            .node("vsphere-1")?
            .ns
            .ip(&["-4", "-o", "addr", "show", "dev", "cni0"])?;
        out.split_whitespace()
            .nth(3)
            .and_then(|s| s.split('/').next())
            .context("cni0")?
            .parse()?
    };
    let cross = start_stream(
        &a1.ns,
        &c.node("vsphere-1")?.ns,
        v1_gw,
        StreamConfig::default(),
    )?;
    let t_del = Instant::now();
    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        "kube-flannel",
        flannel_pod.trim(),
        "--wait=true",
    ])?;
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        "kube-flannel",
        "ds/kube-flannel-ds",
        "--timeout=60s",
    ])?;
    std::thread::sleep(Duration::from_secs(2));
    let flannel_back = t_del.elapsed();
    let s = cross.stop()?;
    let agent_log = c.kubectl(&["logs", "-n", NS, &agent_pod(&c, "aws-1")?, "-c", "agent"])?;
    step(
        t0,
        &format!(
            "flannel restarted on aws-1 ({flannel_back:.1?} until its pod was back): cross-cloud stream \
             sent {}, lost {}, longest gap {:?}; agent re-asserted: {}",
            s.sent,
            s.lost,
            s.longest_gap,
            agent_log.contains("re-asserted")
        ),
    );
    assert!(
        s.longest_gap < Duration::from_secs(1),
        "cross-cloud outage {:?} after flannel's restart",
        s.longest_gap
    );
    cross_cloud(&c, &pods, Duration::from_secs(10))?;

    // 6. SIGKILL the agent: no chance to restore. The kubelet restarts the container, whose
    // start restores and re-asserts; then the pod is replaced and the new pod's init
    // container finds the state the killed agent left.
    let pid = pid_of(&c, "aws-1", "isthmus-agent")?;
    // SAFETY: kill on a PID this test's cluster started (the agent container on aws-1).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let restarted = wait_until(Duration::from_secs(60), || {
        c.kubectl(&[
            "get",
            "pod",
            "-n",
            NS,
            &pod_name_or_empty(&c, "aws-1"),
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ])
        .is_ok_and(|o| o.trim().parse::<u32>().unwrap_or(0) >= 1)
    });
    assert!(
        restarted,
        "the killed agent was not restarted:\n{}",
        c.diagnostics()
    );
    cross_cloud(&c, &pods, Duration::from_secs(60))?;
    step(
        t0,
        "agent SIGKILLed on aws-1: restarted by the kubelet, mesh back",
    );
    // Now a kill the kubelet cannot answer with a restart in place: the kubelet is frozen,
    // the agent killed, its pod force-deleted (no preStop), the kubelet thawed. Only the
    // replacement pod's init container can restore what the killed agent left.
    let old = agent_pod(&c, "aws-1")?;
    let pid = pid_of(&c, "aws-1", "isthmus-agent")?;
    let kubelet = c
        .node("aws-1")?
        .kubelet_pid()
        .context("aws-1 has no kubelet")? as i32;
    // SAFETY: signals to processes this test's cluster started (kubelet and agent of aws-1).
    unsafe {
        libc::kill(kubelet, libc::SIGSTOP);
        libc::kill(pid, libc::SIGKILL);
    }
    let forced = c.kubectl(&[
        "delete",
        "pod",
        "-n",
        NS,
        &old,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    // SAFETY: as above.
    unsafe { libc::kill(kubelet, libc::SIGCONT) };
    forced?;
    let replaced = wait_until(Duration::from_secs(90), || {
        agent_pod(&c, "aws-1").is_ok_and(|p| p != old)
    });
    assert!(
        replaced,
        "no replacement agent pod on aws-1:\n{}",
        c.diagnostics()
    );
    c.wait_agents_ready("120s")?;
    let new = agent_pod(&c, "aws-1")?;
    let init_log = c.kubectl(&["logs", "-n", NS, &new, "-c", "cleanup"])?;
    let restored = init_log
        .split("restored=")
        .nth(1)
        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        restored.is_some_and(|n| n > 0),
        "the replacement pod's init container restored nothing:\n{init_log}"
    );
    cross_cloud(&c, &pods, Duration::from_secs(60))?;
    step(
        t0,
        &format!(
            "killed agent's pod replaced: its init container restored {} entries, mesh back",
            restored.unwrap_or(0)
        ),
    );

    // 7. Remove the mesh: every node exactly as before.
    c.uninstall_isthmus()?;
    for (n, want) in names.iter().zip(&before) {
        let have = snapshot(&c.node(n)?.ns)?;
        assert_eq!(
            &have, want,
            "{n}'s routing after uninstall differs from before install"
        );
    }
    let s = stream.stop()?;
    step(t0, &format!("uninstalled: routing identical on all four nodes; same-location stream sent {}, lost {}, longest gap {:?}", s.sent, s.lost, s.longest_gap));
    assert_eq!(s.lost, 0, "the same-location stream lost datagrams: {s:?}");
    assert!(
        cross_cloud(&c, &pods, Duration::from_secs(1)).is_err(),
        "cross-cloud traffic without the mesh"
    );

    // 8. Reinstall; then a node goes away for good.
    c.install_isthmus()?;
    c.wait_agents_ready("180s")?;
    cross_cloud(&c, &pods, Duration::from_secs(60))?;
    let aws2_vtep = c
        .node("aws-2")?
        .ns
        .ip(&["-o", "link", "show", "flannel.1"])?;
    let aws2_mac = aws2_vtep
        .split("link/ether ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("VTEP MAC")?
        .to_string();
    let aws2_cidr = c.kubectl(&["get", "node", "aws-2", "-o", "jsonpath={.spec.podCIDR}"])?;
    let aws2_key = c.kubectl(&["get", "wgp", "aws-2", "-o", "jsonpath={.spec.publicKey}"])?;
    c.remove_node("aws-2")?;
    c.kubectl(&["delete", "node", "aws-2"])?;
    let t_gone = Instant::now();
    let collected = wait_until(Duration::from_secs(60), || {
        c.kubectl(&["get", "wgp", "aws-2"]).is_err()
    });
    assert!(
        collected,
        "the deleted node's WireGuardPeer was not collected"
    );
    let cidr_net = aws2_cidr
        .trim()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let leftovers = || -> Vec<String> {
        let mut found = Vec::new();
        for n in ["vsphere-1", "vsphere-2", "aws-1"] {
            let Ok(node) = c.node(n) else { continue };
            let fdb = node
                .ns
                .exec("bridge", &["fdb", "show", "dev", "flannel.1"])
                .unwrap_or_default();
            let routes = node
                .ns
                .ip(&["route", "show", "table", "all"])
                .unwrap_or_default();
            let wg = node
                .exec("wg", &["show", "isthmus0", "peers"])
                .unwrap_or_default();
            let cidr = format!("{cidr_net}/");
            found.extend(
                fdb.lines()
                    .filter(|l| l.contains(&aws2_mac))
                    .map(|l| format!("{n} fdb: {l}")),
            );
            found.extend(
                routes
                    .lines()
                    .filter(|l| l.contains(&cidr))
                    .map(|l| format!("{n} route: {l}")),
            );
            found.extend(
                wg.lines()
                    .filter(|l| l.contains(aws2_key.trim()))
                    .map(|l| format!("{n} wg peer: {l}")),
            );
        }
        found
    };
    let first = leftovers();
    let mut seen = std::collections::BTreeMap::new();
    let clean = wait_until(Duration::from_secs(120), || {
        let now = leftovers();
        for l in &now {
            seen.entry(l.clone()).or_insert(t_gone.elapsed());
        }
        now.is_empty()
    });
    assert!(
        clean,
        "nodes still route to the deleted aws-2: {:#?}\nseen: {seen:#?}",
        leftovers()
    );
    step(
        t0,
        &format!(
            "{:.1?} after the Node's deletion nothing is left; right after it: {first:?}; seen on the way: {seen:?}",
            t_gone.elapsed()
        ),
    );
    step(
        t0,
        "aws-2 deleted: its peer collected, no route, FDB entry or WireGuard peer left",
    );

    // Teardown leaves nothing: no namespace, cgroup, mount or process of the cluster.
    let tag = c.tag.clone();
    let rig_dir = c.rig.dir.path().to_path_buf();
    drop(c);
    let netns = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&tag))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")?
        .flatten()
        .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains(&format!("/isthmus-{tag}-")))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&rig_dir.display().to_string()) || l.contains(&tag))
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:#?}");
    assert!(!rig_dir.exists(), "{} left", rig_dir.display());
    let daemons: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|cmd| cmd.contains(&rig_dir.display().to_string()))
        .collect();
    assert!(daemons.is_empty(), "processes left: {daemons:?}");
    step(
        t0,
        "torn down: no namespace, cgroup, mount, directory or process left",
    );
    Ok(())
}

fn pod_name_or_empty(c: &RealCluster, node: &str) -> String {
    agent_pod(c, node).unwrap_or_default()
}
