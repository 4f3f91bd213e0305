//! One real Kubernetes node: a network namespace on its cloud's LAN, a mount namespace of its
//! own, cgroups of its own, and in them the real containerd (with runc), kubelet and
//! kube-proxy.
//!
//! What the shared notes found on these machines, applied here:
//! - daemons start with `nsenter --net --mount`, never `ip netns exec` (which remounts /sys
//!   and hides the cgroups from the kubelet);
//! - the kubelet and containerd share the node's mount namespace, a persistent one held by a
//!   bind mount of its `/proc/PID/ns/mnt`, in which tmpfs hides every path that is written
//!   whatever the flags say (`/run`, `/var/lib`, `/var/log`, `/etc/cni`): nothing collides
//!   between nodes or leaks onto the host, and unmounting the namespace drops every pod mount;
//! - `protectKernelDefaults: true`, with the three sysctls it checks bind-mounted inside the
//!   namespace, so the host keeps its own values;
//! - a cgroup root per node in every v1 hierarchy;
//! - teardown: SIGKILL kubelet and kube-proxy, SIGKILL whatever runs in the node's cgroups,
//!   SIGTERM containerd, SIGKILL what is left in the node's namespaces (shims), remove the
//!   cgroups deepest first, unmount the namespace, delete the netns.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::daemon::{wait_until, Daemon};
use crate::netns::Netns;

/// The cgroup v1 hierarchies a node gets its own root in (and `unified`, cleaned only).
const CGROUP_HIERARCHIES: &[&str] = &[
    "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids", "systemd",
];

/// Paths hidden by a tmpfs in each node's mount namespace.
pub const NODE_TMPFS: &[&str] = &["/run", "/var/lib", "/var/log", "/etc/cni"];

/// Where a node's daemons find their binaries.
#[derive(Clone, Debug)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
}

/// What a node is told about its cluster.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub location: String,
    pub node_ip: Ipv4Addr,
    pub kubelet_port: u16,
    /// `https://<public address>:<port>` of the API server as nodes reach it.
    pub server: String,
    pub ca: PathBuf,
    pub cluster_cidr: String,
    pub pause_image: String,
    pub binaries: NodeBinaries,
}

pub struct RealNode {
    pub config: NodeConfig,
    pub ns: Netns,
    /// The file holding the node's mount namespace.
    pub mnt: PathBuf,
    pub dir: PathBuf,
    /// The node's cgroup root, e.g. `/isthmus-ist1a2b3-vsphere-1`.
    pub cgroup: String,
    kubelet: Option<Daemon>,
    kube_proxy: Option<Daemon>,
    containerd: Option<Daemon>,
}

impl RealNode {
    /// Sets up namespaces, cgroups and configuration, and starts containerd. `dir` holds the
    /// node's configuration, credentials and logs; `kubelet_kubeconfig` and
    /// `proxy_kubeconfig` are already written there.
    pub fn create(config: NodeConfig, ns: Netns, dir: PathBuf, tag: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mnt = dir.join("mnt-ns");
        std::fs::write(&mnt, "")?;
        let cgroup = format!("/isthmus-{tag}-{}", config.name);
        let mut node = RealNode {
            config,
            ns,
            mnt,
            dir,
            cgroup,
            kubelet: None,
            kube_proxy: None,
            containerd: None,
        };
        node.make_mount_namespace()?;
        node.make_cgroups()?;
        node.write_configs()?;
        node.start_containerd()?;
        Ok(node)
    }

    fn make_mount_namespace(&self) -> anyhow::Result<()> {
        let d = &self.dir;
        for (file, value) in [
            ("overcommit_memory", "1"),
            ("panic", "10"),
            ("panic_on_oops", "1"),
        ] {
            std::fs::write(d.join(format!("sysctl-{file}")), format!("{value}\n"))?;
        }
        let mut script = String::from("set -e\n");
        for p in NODE_TMPFS {
            script.push_str(&format!("mount -t tmpfs -o mode=755 tmpfs {p}\n"));
        }
        script.push_str("mkdir -p /run/netns /etc/cni/net.d /var/lib/isthmus /run/wireguard\n");
        for (file, target) in [
            ("overcommit_memory", "/proc/sys/vm/overcommit_memory"),
            ("panic", "/proc/sys/kernel/panic"),
            ("panic_on_oops", "/proc/sys/kernel/panic_on_oops"),
        ] {
            script.push_str(&format!(
                "mount --bind {} {target}\n",
                d.join(format!("sysctl-{file}")).display()
            ));
        }
        // A mount namespace whose propagation is private: nothing mounted in it reaches the
        // host, and its file keeps it alive after this shell exits.
        let out = Command::new("unshare")
            .arg(format!("--mount={}", self.mnt.display()))
            .args(["--propagation", "private", "sh", "-c", &script])
            .output()
            .context("unshare")?;
        if !out.status.success() {
            bail!(
                "mount namespace for {}: {}",
                self.config.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn make_cgroups(&self) -> anyhow::Result<()> {
        for h in CGROUP_HIERARCHIES {
            let root = Path::new("/sys/fs/cgroup").join(h);
            if !root.exists() {
                continue;
            }
            let dir = root.join(self.cgroup.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            if *h == "cpuset" {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(root.join(f))?;
                    std::fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("writing {f} of {}", dir.display()))?;
                }
            }
        }
        Ok(())
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let c = &self.config;
        let d = &self.dir;
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# /opt/containerd would be created on the host.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The CRI asks for oom_score_adj -998, which needs CAP_SYS_RESOURCE (not here).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"#,
                pause = c.pause_image
            ),
        )?;
        std::fs::write(
            d.join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup}
protectKernelDefaults: true
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
port: {port}
readOnlyPort: 0
address: {ip}
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
clusterDomain: cluster.local
resolvConf: {resolv}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
"#,
                cgroup = self.cgroup,
                port = c.kubelet_port,
                ip = c.node_ip,
                ca = c.ca.display(),
                resolv = d.join("resolv.conf").display(),
            ),
        )?;
        // Pods get no DNS server (the rig runs no CoreDNS); an empty file keeps the host's.
        std::fs::write(d.join("resolv.conf"), "")?;
        std::fs::write(
            d.join("kube-proxy.yaml"),
            format!(
                r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kc}
hostnameOverride: {name}
mode: iptables
clusterCIDR: {cidr}
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Zeros: leave the host-wide conntrack limits and timeouts alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#,
                kc = d.join("kube-proxy.kubeconfig").display(),
                name = c.name,
                cidr = c.cluster_cidr,
            ),
        )?;
        Ok(())
    }

    /// Starts `program` in the node's network and mount namespaces.
    fn spawn(&self, role: &str, program: &Path, args: &[&str]) -> anyhow::Result<Daemon> {
        let net = format!("--net=/var/run/netns/{}", self.ns.name);
        let mnt = format!("--mount={}", self.mnt.display());
        let mut full: Vec<&str> = vec![&net, &mnt, "--"];
        let prog = program.display().to_string();
        full.push(&prog);
        full.extend_from_slice(args);
        Daemon::spawn_host(
            Path::new("nsenter"),
            &full,
            &[],
            self.dir.join(format!("{role}.log")),
        )
    }

    /// Runs a command in the node's namespaces and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns.name))
            .arg(format!("--mount={}", self.mnt.display()))
            .arg("--")
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} on {}", self.config.name))?;
        if !out.status.success() {
            bail!(
                "{program} {} on {}: {}",
                args.join(" "),
                self.config.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let cfg = self.dir.join("containerd.toml").display().to_string();
        self.containerd = Some(self.spawn(
            "containerd",
            Path::new("/usr/bin/containerd"),
            &["--config", &cfg, "--log-level", "warn"],
        )?);
        let up = wait_until(Duration::from_secs(30), || {
            self.exec(
                "ctr",
                &["--address", "/run/containerd/containerd.sock", "version"],
            )
            .is_ok()
        });
        if !up {
            bail!(
                "containerd on {} never answered:\n{}",
                self.config.name,
                self.log("containerd")
            );
        }
        Ok(())
    }

    /// Imports an OCI archive into the node's containerd, where the CRI finds it (unpacked
    /// for the overlayfs snapshotter, so a pod starts without a pull).
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let path = archive.display().to_string();
        self.exec(
            "ctr",
            &[
                "--address",
                "/run/containerd/containerd.sock",
                "-n",
                "k8s.io",
                "images",
                "import",
                &path,
            ],
        )
        .with_context(|| format!("importing {} on {}", archive.display(), self.config.name))?;
        Ok(())
    }

    /// Starts the kubelet and kube-proxy: the node registers itself.
    pub fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let c = self.config.clone();
        let d = self.dir.display().to_string();
        let node_ip = c.node_ip.to_string();
        let labels = format!("topology.kubernetes.io/region={}", c.location);
        self.kubelet = Some(self.spawn(
            "kubelet",
            &c.binaries.kubelet,
            &[
                &format!("--config={d}/kubelet.yaml"),
                &format!("--kubeconfig={d}/kubelet.kubeconfig"),
                &format!("--hostname-override={}", c.name),
                &format!("--node-ip={node_ip}"),
                &format!("--node-labels={labels}"),
                "--v=1",
            ],
        )?);
        self.kube_proxy = Some(self.spawn(
            "kube-proxy",
            &c.binaries.kube_proxy,
            &[&format!("--config={d}/kube-proxy.yaml"), "--v=1"],
        )?);
        Ok(())
    }

    /// Stops the kubelet and kube-proxy as a machine that is switched off would (SIGKILL);
    /// pods keep running until [`RealNode`] is dropped.
    pub fn stop_kubelet(&mut self) {
        for d in [self.kubelet.take(), self.kube_proxy.take()]
            .into_iter()
            .flatten()
        {
            let mut d = d;
            d.stop_with(libc::SIGKILL, Duration::from_secs(5));
        }
    }

    /// The kubelet's PID, to freeze it (SIGSTOP) while a test arranges what it will find.
    pub fn kubelet_pid(&self) -> Option<u32> {
        self.kubelet.as_ref().map(Daemon::pid)
    }

    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{role}.log"))).unwrap_or_default()
    }

    /// Whether `daemon` (kubelet, kube-proxy, containerd) still runs.
    pub fn running(&mut self, daemon: &str) -> bool {
        let d = match daemon {
            "kubelet" => self.kubelet.as_mut(),
            "kube-proxy" => self.kube_proxy.as_mut(),
            _ => self.containerd.as_mut(),
        };
        d.is_some_and(|d| d.is_running())
    }

    /// PIDs whose network or mount namespace is this node's (containers, shims, daemons).
    pub fn pids_inside(&self) -> Vec<i32> {
        let want_mnt = std::fs::metadata(&self.mnt).map(|m| m.ino()).ok();
        let want_net = std::fs::metadata(format!("/var/run/netns/{}", self.ns.name))
            .map(|m| m.ino())
            .ok();
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let ino = |kind: &str| {
                std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
                    .map(|m| m.ino())
                    .ok()
            };
            let mnt = ino("mnt");
            let net = ino("net");
            if (mnt.is_some() && mnt == want_mnt) || (net.is_some() && net == want_net) {
                pids.push(pid);
            }
        }
        pids
    }

    /// PIDs in the node's cgroups (its pods' containers), any hierarchy.
    fn pids_in_cgroups(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let root = Path::new("/sys/fs/cgroup/pids").join(self.cgroup.trim_start_matches('/'));
        collect_pids(&root, &mut pids);
        pids
    }

    fn remove_cgroups(&self) {
        for h in CGROUP_HIERARCHIES.iter().chain(["unified"].iter()) {
            let dir = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(self.cgroup.trim_start_matches('/'));
            remove_cgroup_tree(&dir);
        }
    }
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

/// rmdir deepest first; a cgroup whose processes are gone may take a moment to be removable.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let removed = wait_until(Duration::from_secs(5), || {
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    });
    if !removed {
        eprintln!("cleanup: could not remove cgroup {}", dir.display());
    }
}

fn kill_all(pids: &[i32], signal: i32) {
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions; these PIDs are the node's own
        // processes (started by this rig, directly or through containerd).
        unsafe { libc::kill(*pid, signal) };
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop_kubelet();
        // Pods, then containerd, then whatever is still in the node's namespaces (shims).
        for _ in 0..3 {
            let pids = self.pids_in_cgroups();
            if pids.is_empty() {
                break;
            }
            kill_all(&pids, libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(mut c) = self.containerd.take() {
            c.stop_with(libc::SIGTERM, Duration::from_secs(10));
        }
        let me = std::process::id() as i32;
        wait_until(Duration::from_secs(10), || {
            let pids: Vec<i32> = self
                .pids_inside()
                .into_iter()
                .filter(|p| *p != me)
                .collect();
            kill_all(&pids, libc::SIGKILL);
            pids.is_empty()
        });
        self.remove_cgroups();
        let out = Command::new("umount").arg(&self.mnt).output();
        if !out.is_ok_and(|o| o.status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
        // The netns is removed when `self.ns` drops, after this.
    }
}
