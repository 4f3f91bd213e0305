//! A real Kubernetes cluster on one machine, for the tests and the sandbox: the control
//! plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) on the host's
//! loopback, as a seed hosts a user cluster's control plane, and nodes in two clouds
//! (vsphere, aws) whose node IPs overlap and which reach each other only through their
//! gateways' public addresses ([`crate::cluster::make_clouds`]). Each node runs the real
//! containerd, kubelet and kube-proxy ([`node::RealNode`]); the overlay is the real flannel,
//! deployed as a DaemonSet from `tests/manifests/flannel.yaml`; pods run images built on this
//! machine and imported into every node's containerd (no registry).
//!
//! Nodes reach the API server at [`APISERVER_PUBLIC`] through their gateway and the API
//! server reaches kubelets through an egress proxy ([`relay`]). Everything is removed when
//! the [`RealCluster`] drops, also when a test fails: nodes first (pods, daemons, cgroups,
//! mounts, namespaces), then the control plane, then the clouds.

pub mod node;
pub mod probe;
pub mod relay;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::{make_clouds, wire_node, Cloud};
use crate::daemon::{wait_until, Daemon};
use crate::kube::{client_cert, kube_bin, workspace_root, KubeRig, RigOptions};
use crate::netns::Netns;
use node::{NodeBinaries, NodeConfig, RealNode};
use relay::Relay;

/// The API server's address as nodes see it: a local address of every gateway (TEST-NET-2,
/// which exists only inside the rig's namespaces).
pub const APISERVER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The kustomize overlay that installs isthmus from the image built here.
pub const ISTHMUS_OVERLAY: &str = "deploy/overlays/local";
pub const ISTHMUS_NAMESPACE: &str = "isthmus-system";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The sandbox image every pod starts with (built from Kubernetes' own pause.c).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// Upstream's e2e test image (`agnhost netexec`: HTTP on 8080, UDP echo on 8081).
pub const AGNHOST_IMAGE: &str = "localhost/agnhost:v1.37.2";

/// The image archives every node imports, as `make test` builds them.
pub fn image_archives() -> anyhow::Result<Vec<PathBuf>> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let archives = [
        root.join(".cache/test-images/pause.oci.tar"),
        root.join(".cache/test-images/agnhost.oci.tar"),
        root.join(".cache/flannel/flannel-v0.28.10.oci.tar"),
        root.join(format!(".cache/image/isthmus-{version}.oci.tar")),
    ];
    for a in &archives {
        if !a.exists() {
            bail!(
                "{} is missing: build the images first (`bash scripts/build-test-images.sh`, \
                 `make image`; `make test` does both)",
                a.display()
            );
        }
    }
    Ok(archives.to_vec())
}

pub struct RealCluster {
    // Dropped in declaration order: nodes, then the control plane, then the clouds.
    pub nodes: Vec<RealNode>,
    scheduler: Daemon,
    controller_manager: Daemon,
    relay: Relay,
    pub rig: KubeRig,
    pub clouds: Vec<Cloud>,
    pub tag: String,
    images: Vec<PathBuf>,
    /// Keeps `/etc/cni` (the nodes' mount point) for as long as this rig lives.
    etc_cni: EtcCni,
    // Last: holds the egress socket.
    _sockets: tempfile::TempDir,
}

impl RealCluster {
    /// The control plane and the two clouds' networks; no nodes yet.
    pub async fn start() -> anyhow::Result<RealCluster> {
        crate::require_root();
        let t0 = Instant::now();
        let images = image_archives()?;
        let tag = crate::unique_name();
        let sockets = tempfile::Builder::new().prefix("isthmus-rig").tempdir()?;
        let egress = sockets.path().join("egress.sock");
        let relay = Relay::start(&egress)?;
        std::fs::write(
            sockets.path().join("egress.yaml"),
            format!(
                "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\n\
                 egressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n\
                 \x20   transport:\n      uds:\n        udsName: {}\n",
                egress.display()
            ),
        )?;
        let public = APISERVER_PUBLIC.to_string();
        let rig = KubeRig::start_with(RigOptions {
            extra_sans: vec![
                format!("IP:{public}"),
                "IP:10.96.0.1".into(),
                "DNS:kubernetes".into(),
                "DNS:kubernetes.default".into(),
                "DNS:kubernetes.default.svc".into(),
                "DNS:kubernetes.default.svc.cluster.local".into(),
            ],
            apiserver_args: vec![
                format!("--advertise-address={public}"),
                "--endpoint-reconciler-type=lease".into(),
                "--allow-privileged=true".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!(
                    "--egress-selector-config-file={}",
                    sockets.path().join("egress.yaml").display()
                ),
                "--kubelet-client-certificate={dir}/apiserver-kubelet.crt".into(),
                "--kubelet-client-key={dir}/apiserver-kubelet.key".into(),
            ],
            client_certs: vec![(
                "apiserver-kubelet".into(),
                "/O=system:masters/CN=kube-apiserver-kubelet-client".into(),
            )],
            install_isthmus: false,
            etcd_servers: None,
        })
        .await?;
        let d = rig.dir.path().to_path_buf();
        let clouds = make_clouds(&tag, 1500)?;
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, rig.port));
        for c in &clouds {
            c.gateway
                .ip(&["addr", "add", &format!("{public}/32"), "dev", "lo"])?;
            relay.forward_from(
                &c.gateway,
                SocketAddr::from((APISERVER_PUBLIC, rig.port)),
                upstream,
            )?;
        }

        let admin_kc = rig.kubeconfig("admin", &rig.admin_token.clone())?;
        let kc = admin_kc.display().to_string();
        let ca = d.join("ca.crt").display().to_string();
        let sa_key = d.join("sa.key").display().to_string();
        let controller_manager = Daemon::spawn_host(
            &kube_bin("kube-controller-manager", "KUBE_CONTROLLER_MANAGER_BIN"),
            &[
                &format!("--kubeconfig={kc}"),
                &format!("--authentication-kubeconfig={kc}"),
                &format!("--authorization-kubeconfig={kc}"),
                "--secure-port=0",
                "--leader-elect=false",
                &format!("--root-ca-file={ca}"),
                &format!("--service-account-private-key-file={sa_key}"),
                "--use-service-account-credentials=true",
                "--allocate-node-cidrs=true",
                &format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--node-cidr-mask-size=24",
                &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--node-monitor-grace-period=20s",
            ],
            &[],
            d.join("kube-controller-manager.log"),
        )?;
        let scheduler = Daemon::spawn_host(
            &kube_bin("kube-scheduler", "KUBE_SCHEDULER_BIN"),
            &[
                &format!("--kubeconfig={kc}"),
                &format!("--authentication-kubeconfig={kc}"),
                &format!("--authorization-kubeconfig={kc}"),
                "--secure-port=0",
                "--leader-elect=false",
            ],
            &[],
            d.join("kube-scheduler.log"),
        )?;
        let etc_cni = EtcCni::hold()?;
        eprintln!(
            "rig: control plane up in {:.1?} (names prefixed {tag})",
            t0.elapsed()
        );
        Ok(RealCluster {
            nodes: Vec::new(),
            scheduler,
            controller_manager,
            relay,
            rig,
            clouds,
            tag,
            images,
            etc_cni,
            _sockets: sockets,
        })
    }

    /// Adds an image archive every node added from now on imports (the sandbox's workload).
    pub fn add_image(&mut self, archive: PathBuf) -> anyhow::Result<()> {
        if !archive.exists() {
            bail!("{} is missing", archive.display());
        }
        self.images.push(archive);
        Ok(())
    }

    /// Adds node `<location>-<slot>` to `cloud` (0 vsphere, 1 aws): its namespaces, daemons
    /// and images; the kubelet registers the Node. Returns once the Node object exists (Ready
    /// comes with flannel's CNI configuration: [`RealCluster::wait_ready`]).
    pub async fn add_node(&mut self, cloud: usize, slot: u8) -> anyhow::Result<String> {
        let c = self.clouds.get(cloud).context("no such cloud")?;
        let name = format!("{}-{slot}", c.location);
        let ns = Netns::new(&format!("{}-{}{slot}", self.tag, c.n))?;
        let node_ip = wire_node(c, &ns, &format!("{}l{}{slot}", self.tag, c.n), slot, 1500)?;
        let kubelet_port = 11000 + u16::from(c.n) * 100 + u16::from(slot);
        let endpoint = format!("203.0.113.{}:{}", c.n, 51800 + u16::from(slot));
        let location = c.location.to_string();
        let d = self.rig.dir.path().join(format!("node-{name}"));
        std::fs::create_dir_all(&d)?;
        let rig_dir = self.rig.dir.path().to_path_buf();
        let server = format!("https://{APISERVER_PUBLIC}:{}", self.rig.port);
        let ca = rig_dir.join("ca.crt");
        for (file, subject) in [
            ("kubelet", format!("/O=system:nodes/CN=system:node:{name}")),
            ("kube-proxy", "/CN=system:kube-proxy".to_string()),
        ] {
            client_cert(&rig_dir, &format!("{name}-{file}"), &subject)?;
            cert_kubeconfig(
                &d.join(format!("{file}.kubeconfig")),
                &server,
                &ca,
                &rig_dir.join(format!("{name}-{file}.crt")),
                &rig_dir.join(format!("{name}-{file}.key")),
            )?;
        }
        let config = NodeConfig {
            name: name.clone(),
            location,
            node_ip,
            kubelet_port,
            server,
            ca,
            cluster_cidr: CLUSTER_CIDR.into(),
            pause_image: PAUSE_IMAGE.into(),
            binaries: NodeBinaries {
                kubelet: kube_bin("kubelet", "KUBELET_BIN"),
                kube_proxy: kube_bin("kube-proxy", "KUBE_PROXY_BIN"),
            },
        };
        let ns_name = ns.name.clone();
        let mut node = RealNode::create(config, ns, d, &self.tag)?;
        for image in &self.images {
            node.import_image(image)?;
        }
        self.relay.add_kubelet(kubelet_port, &ns_name);
        node.start_kubelet()?;
        self.nodes.push(node);
        let nodes: Api<Node> = Api::all(self.rig.admin().await?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while nodes.get_opt(&name).await?.is_none() {
            if Instant::now() > deadline {
                bail!(
                    "node {name} never registered; kubelet log:\n{}",
                    tail(&self.node(&name)?.log("kubelet"), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // What a cloud's provisioning would say about the node's public WireGuard endpoint
        // (its gateway's NAT); the agent reads it.
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"isthmus.dev/endpoint": endpoint}}
                })),
            )
            .await
            .context("annotating the Node")?;
        Ok(name)
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&RealNode> {
        self.nodes
            .iter()
            .find(|n| n.config.name == name)
            .with_context(|| format!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut RealNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.config.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Removes a node as a cloud deleting its VM would: kubelet and everything on it gone,
    /// namespaces deleted. The Node object stays (deleting it is the caller's step).
    pub fn remove_node(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.config.name == name)
            .with_context(|| format!("no node {name}"))?;
        let node = self.nodes.remove(i);
        self.relay.remove_kubelet(node.config.kubelet_port);
        drop(node);
        Ok(())
    }

    /// Applies flannel's DaemonSet (`tests/manifests/flannel.yaml`).
    pub fn install_flannel(&self) -> anyhow::Result<()> {
        let path = workspace_root().join("tests/manifests/flannel.yaml");
        self.kubectl(&["apply", "--server-side", "-f", &path.display().to_string()])?;
        Ok(())
    }

    /// Installs isthmus from its image the way a user does:
    /// `kubectl apply --server-side -k deploy/overlays/local`.
    pub fn install_isthmus(&self) -> anyhow::Result<()> {
        let overlay = workspace_root().join(ISTHMUS_OVERLAY);
        self.kubectl(&[
            "apply",
            "--server-side",
            "-k",
            &overlay.display().to_string(),
        ])?;
        Ok(())
    }

    /// Waits until the agent DaemonSet has a Ready pod on every node.
    pub fn wait_agents_ready(&self, timeout: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "rollout",
            "status",
            "-n",
            ISTHMUS_NAMESPACE,
            "ds/isthmus-agent",
            &format!("--timeout={timeout}"),
        ])
        .with_context(|| self.diagnostics())?;
        Ok(())
    }

    /// `kubectl delete -k deploy/overlays/local`, and waits until no isthmus pod is left.
    pub fn uninstall_isthmus(&self) -> anyhow::Result<()> {
        let overlay = workspace_root().join(ISTHMUS_OVERLAY);
        self.kubectl(&[
            "delete",
            "-k",
            &overlay.display().to_string(),
            "--wait=true",
            "--timeout=120s",
        ])?;
        let gone = wait_until(Duration::from_secs(120), || {
            self.kubectl(&["get", "pods", "-n", ISTHMUS_NAMESPACE, "-o", "name"])
                .is_ok_and(|o| o.trim().is_empty())
        });
        if !gone {
            bail!("isthmus pods still there:\n{}", self.diagnostics());
        }
        Ok(())
    }

    /// Waits until every node is Ready (its CNI configuration written by flannel).
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let ok = wait_until(timeout, || {
            self.kubectl(&[
                "wait",
                "--for=condition=Ready",
                "nodes",
                "--all",
                "--timeout=2s",
            ])
            .is_ok()
        });
        if !ok {
            bail!(
                "nodes not Ready after {timeout:?}:\n{}\n{}",
                self.kubectl(&["get", "nodes", "-o", "wide"])
                    .unwrap_or_default(),
                self.kubectl(&["get", "pods", "-A", "-o", "wide"])
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `kubectl` as cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.rig.kubectl(args)
    }

    /// What went on, for a failing test: nodes, pods, and the tail of every daemon's log.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        ] {
            out.push_str(&self.kubectl(args).unwrap_or_else(|e| format!("{e:#}\n")));
        }
        for n in &self.nodes {
            for role in ["kubelet", "containerd", "kube-proxy"] {
                out.push_str(&format!(
                    "--- {} {role} ---\n{}\n",
                    n.config.name,
                    tail(&n.log(role), 25)
                ));
            }
        }
        let d = self.rig.dir.path();
        for f in ["kube-controller-manager.log", "kube-scheduler.log"] {
            let text = std::fs::read_to_string(d.join(f)).unwrap_or_default();
            out.push_str(&format!("--- {f} ---\n{}\n", tail(&text, 25)));
        }
        out
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        // Nodes first, each fully (their Drop), while the control plane still runs.
        while let Some(n) = self.nodes.pop() {
            drop(n);
        }
        self.scheduler.stop();
        self.controller_manager.stop();
        self.etc_cni.release();
    }
}

/// `/etc/cni` must exist on the host as the mount point of each node's own `/etc/cni` (a
/// tmpfs); nothing is written to it. A rig that finds it missing creates it and leaves a
/// marker; the last rig alive removes it again. Rigs hold a shared lock on a file in /run
/// while they live, so one rig's teardown never removes the directory under another's nodes
/// (removing a mount point detaches the mounts on it in every namespace).
struct EtcCni {
    lock: Option<std::fs::File>,
}

const ETC_CNI: &str = "/etc/cni";
const ETC_CNI_LOCK: &str = "/run/isthmus-rig-etc-cni.lock";
const ETC_CNI_MARKER: &str = "/run/isthmus-rig-created-etc-cni";

impl EtcCni {
    fn hold() -> anyhow::Result<EtcCni> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(ETC_CNI_LOCK)
            .with_context(|| format!("opening {ETC_CNI_LOCK}"))?;
        flock(&lock, libc::LOCK_SH)?;
        if !Path::new(ETC_CNI).exists() {
            std::fs::write(ETC_CNI_MARKER, b"").context("marking /etc/cni as the rig's")?;
            std::fs::create_dir(ETC_CNI).context("creating /etc/cni")?;
        }
        Ok(EtcCni { lock: Some(lock) })
    }

    fn release(&mut self) {
        let Some(lock) = self.lock.take() else { return };
        // The last rig holding the lock gets it exclusively; any other keeps it shared.
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() && Path::new(ETC_CNI_MARKER).exists()
        {
            let _ = std::fs::remove_dir(ETC_CNI);
            let _ = std::fs::remove_file(ETC_CNI_MARKER);
        }
    }
}

fn flock(f: &std::fs::File, op: i32) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open file descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        bail!("flock {ETC_CNI_LOCK}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn cert_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    crt: &Path,
    key: &Path,
) -> anyhow::Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: rig\n  cluster:\n    server: {server}\n    \
             certificate-authority: {}\nusers:\n- name: me\n  user:\n    client-certificate: {}\n    \
             client-key: {}\ncontexts:\n- name: me\n  context:\n    cluster: rig\n    user: me\n\
             current-context: me\n",
            ca.display(),
            crt.display(),
            key.display()
        ),
    )?;
    Ok(())
}
