//! The workload that must not notice the move: an echo Deployment behind a Service (with a
//! NodePort and a PodDisruptionBudget), a client Deployment in the new cloud calling the
//! Service's ClusterIP, and a client outside the cluster calling the NodePort through a
//! "load balancer" (the clouds' gateways), switched from an old node to a new one.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use isthmus_tests::cluster::Cloud;
use isthmus_tests::netns::{veth, Netns};
use isthmus_tests::rig::{RealCluster, AGNHOST_IMAGE};

use crate::client::{every, request, Record};
use crate::etcd::SANDBOX_IMAGE;

pub const NAMESPACE: &str = "sandbox";
/// The echo Service's NodePort, and the port the load balancer listens on.
pub const NODE_PORT: u16 = 30080;
/// How often each client calls, and how long one call may take before it counts as failed.
pub const INTERVAL: Duration = Duration::from_millis(50);
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The echo Deployment (agnhost netexec), its Service (ClusterIP port 80 and NodePort
/// [`NODE_PORT`]) and PodDisruptionBudget. A pod leaves the Service's endpoints before it
/// stops (preStop sleep), so a rollout or a drain fails no request.
pub fn echo_manifest(replicas: u8) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: {NAMESPACE}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: echo}}
  strategy:
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata:
      labels: {{app: echo}}
    spec:
      terminationGracePeriodSeconds: 15
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: ScheduleAnyway
        labelSelector:
          matchLabels: {{app: echo}}
      containers:
      - name: netexec
        image: {AGNHOST_IMAGE}
        imagePullPolicy: Never
        args: [netexec, --http-port=8080]
        readinessProbe:
          httpGet: {{path: /healthz, port: 8080}}
          periodSeconds: 1
        lifecycle:
          preStop:
            sleep: {{seconds: 5}}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: {NAMESPACE}
spec:
  type: NodePort
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}, protocol: TCP}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: echo
  namespace: {NAMESPACE}
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {{app: echo}}
"#
    )
}

/// The client Deployment, pinned to `region`, calling `target` (the Service's ClusterIP
/// and port) every [`INTERVAL`].
pub fn client_manifest(region: &str, target: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: {NAMESPACE}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: client}}
  template:
    metadata:
      labels: {{app: client}}
    spec:
      terminationGracePeriodSeconds: 1
      nodeSelector: {{topology.kubernetes.io/region: {region}}}
      containers:
      - name: client
        image: {SANDBOX_IMAGE}
        imagePullPolicy: Never
        command: [/usr/local/bin/isthmus-sandbox-client]
        args: [--target, "{target}", --interval-ms, "{interval}", --timeout-ms, "{timeout}"]
"#,
        interval = INTERVAL.as_millis(),
        timeout = TIMEOUT.as_millis(),
    )
}

/// Every record the client pod printed so far (`kubectl logs`).
pub fn client_pod_records(c: &RealCluster) -> anyhow::Result<Vec<Record>> {
    let logs = c
        .kubectl(&["logs", "-n", NAMESPACE, "deploy/client", "--tail=-1"])
        .context("reading the client pod's log")?;
    Ok(logs.lines().filter_map(Record::from_line).collect())
}

/// The client outside the cluster: a namespace of its own ("the internet", 192.0.2.2)
/// behind the old cloud's gateway, calling `<gateway public address>:NODE_PORT`, which each
/// gateway forwards (DNAT) to the NodePort of one node: the load balancer.
pub struct OutsideClient {
    target: Arc<Mutex<String>>,
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    // Last: the thread lives in it.
    ns: Netns,
}

/// `cloud`'s load balancer: its gateway forwards the public [`NODE_PORT`] to `backend`'s.
fn balance(cloud: &Cloud, backend: Ipv4Addr) -> anyhow::Result<()> {
    cloud.gateway.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-d",
            &format!("203.0.113.{}", cloud.n),
            "--dport",
            &NODE_PORT.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{backend}:{NODE_PORT}"),
        ],
    )?;
    Ok(())
}

/// Whether a call from `ns` to `target` answers, retried for at most 60 s: the health check
/// before measuring starts and before a load balancer switch.
fn answers(ns: &Netns, target: &str) -> anyhow::Result<bool> {
    let target = target.to_string();
    ns.enter(move || {
        isthmus_tests::daemon::wait_until(Duration::from_secs(60), || {
            request(&target, 0, TIMEOUT).ok()
        })
    })
}

/// The load balancer's public address in `cloud`.
pub fn lb_address(cloud: &Cloud) -> String {
    format!("203.0.113.{}:{NODE_PORT}", cloud.n)
}

impl OutsideClient {
    /// Wires "the internet" to the old cloud's gateway, points the old cloud's load
    /// balancer at `backend` (a node IP there) and starts calling it.
    pub fn start(c: &RealCluster, backend: Ipv4Addr) -> anyhow::Result<OutsideClient> {
        let ns = Netns::new(&format!("{}-w", c.tag))?;
        let old = &c.clouds[0].gateway;
        let (inet, gw) = veth(&ns, old, &format!("{}w", c.tag))?;
        ns.ip(&["addr", "add", "192.0.2.2/24", "dev", &inet])?;
        ns.ip(&["link", "set", &inet, "up"])?;
        ns.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        old.ip(&["addr", "add", "192.0.2.1/24", "dev", &gw])?;
        old.ip(&["link", "set", &gw, "up"])?;
        c.clouds[1]
            .gateway
            .ip(&["route", "add", "192.0.2.0/24", "via", "203.0.113.1"])?;
        balance(&c.clouds[0], backend)?;
        let first = lb_address(&c.clouds[0]);
        // Measuring starts once the path answers, as a user's monitoring would.
        if !answers(&ns, &first)? {
            anyhow::bail!("the NodePort never answered through {first}");
        }
        let target = Arc::new(Mutex::new(first));
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (target, records, stop) = (target.clone(), records.clone(), stop.clone());
            ns.spawn_in(move || {
                every(INTERVAL, |seq| {
                    let t = target
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let r = request(&t, seq, TIMEOUT);
                    records
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(r);
                    !stop.load(Ordering::Relaxed)
                })
            })
        };
        Ok(OutsideClient {
            target,
            records,
            stop,
            thread: Some(thread),
            ns,
        })
    }

    /// The load-balancer switch, as a cloud's load balancer makes it: `cloud`'s load
    /// balancer is pointed at `backend` (a node IP there), and calls go to it once its
    /// health check passes (a request through it answers; for at most 60 s). Returns how
    /// long that took. A new node's kube-proxy may still be writing its NodePort rules
    /// when the node turns Ready: a CI run once saw the first two calls through a new
    /// node time out.
    pub fn switch_to(&self, cloud: &Cloud, backend: Ipv4Addr) -> anyhow::Result<Duration> {
        balance(cloud, backend)?;
        let next = lb_address(cloud);
        let since = std::time::Instant::now();
        if !answers(&self.ns, &next)? {
            anyhow::bail!("the NodePort never answered through {next}: not switching to it");
        }
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(since.elapsed())
    }

    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for OutsideClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
