//! The story's effects: each [`Step`] done on the real cluster with the tools a platform
//! team uses (`kubectl` for everything a user would type), one line per step.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_tests::daemon::wait_until;
use isthmus_tests::kube::workspace_root;
use isthmus_tests::rig::RealCluster;

use crate::client::{now_ms, Record};
use crate::etcd::{Etcd, WriteFigures};
use crate::profile::Profile;
use crate::report::{merge_etcd, split, PhaseReport, Report, StepLine, Traffic};
use crate::story::{story, Cloud, Step};
use crate::workload::{
    client_manifest, client_pod_records, echo_manifest, OutsideClient, NAMESPACE,
};

/// Runs the whole move and reports it; a step that fails ends the run with the phases so
/// far in the report (and everything removed, as on success). Only a cluster that cannot
/// start at all is an `Err`.
pub async fn run(profile: Profile) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let mut c = RealCluster::start().await?;
    c.add_image(sandbox_image()?)?;
    let mut s = Sandbox {
        c,
        profile: profile.clone(),
        t0,
        old: Vec::new(),
        new: Vec::new(),
        flannel: false,
        outside: None,
        etcd: None,
        writing: false,
        lines: Vec::new(),
    };
    let mut phases = Vec::new();
    let mut bounds = Vec::new();
    let mut error = None;
    'story: for phase in story(&profile) {
        let (start_ms, t) = (now_ms(), Instant::now());
        for step in &phase.steps {
            if let Err(e) = s.step(step).await {
                error = Some(format!("{}: {step:?}: {e:#}", phase.name));
                s.say(&format!("FAILED: {step:?}"));
                eprintln!("{e:#}\n{}", s.c.diagnostics());
                phases.push(s.phase_report(phase.name, t.elapsed()));
                bounds.push((start_ms, now_ms()));
                break 'story;
            }
        }
        phases.push(s.phase_report(phase.name, t.elapsed()));
        bounds.push((start_ms, now_ms()));
    }
    // The client pod's log survives the move (it runs in the new cloud); read it even
    // after a failure, so the report shows what the clients saw.
    let inside: Vec<Record> = client_pod_records(&s.c).unwrap_or_default();
    let outside = s.outside.as_ref().map(|o| o.records()).unwrap_or_default();
    fill(&mut phases, &split(&inside, &bounds), |p| &mut p.in_cluster);
    fill(&mut phases, &split(&outside, &bounds), |p| &mut p.outside);
    drop(s);
    Ok(Report {
        profile: profile.name,
        wall: t0.elapsed(),
        phases,
        error,
    })
}

fn fill(
    phases: &mut [PhaseReport],
    traffic: &[Traffic],
    field: fn(&mut PhaseReport) -> &mut Traffic,
) {
    for (p, t) in phases.iter_mut().zip(traffic) {
        *field(p) = t.clone();
    }
}

fn sandbox_image() -> anyhow::Result<std::path::PathBuf> {
    let p = workspace_root().join(".cache/test-images/sandbox.oci.tar");
    if !p.exists() {
        bail!(
            "{} is missing: `make sandbox` builds it (scripts/build-sandbox-image.sh)",
            p.display()
        );
    }
    Ok(p)
}

struct Sandbox {
    c: RealCluster,
    profile: Profile,
    t0: Instant,
    old: Vec<String>,
    new: Vec<String>,
    flannel: bool,
    outside: Option<OutsideClient>,
    etcd: Option<Etcd>,
    /// Whether the etcd writer runs (each line then carries its figures).
    writing: bool,
    /// This phase's lines so far.
    lines: Vec<StepLine>,
}

impl Sandbox {
    fn say(&mut self, what: &str) {
        let elapsed = self.t0.elapsed();
        eprintln!("[{:>6.1}s] {what}", elapsed.as_secs_f64());
        let etcd = match (&mut self.etcd, self.writing) {
            (Some(e), true) => Some(e.take_figures()),
            _ => None,
        };
        if let Some(e) = &etcd {
            eprintln!(
                "          etcd: {} writes, {} failed, p50 {:.1?}, p99 {:.1?}, {} leader changes; members {}",
                e.writes,
                e.failed,
                e.p50,
                e.p99,
                e.leader_changes,
                e.members.join(" ")
            );
        }
        self.lines.push(StepLine {
            elapsed,
            what: what.to_string(),
            etcd,
        });
    }

    fn phase_report(&mut self, name: &str, wall: Duration) -> PhaseReport {
        let steps = std::mem::take(&mut self.lines);
        let etcd: Vec<WriteFigures> = steps.iter().filter_map(|l| l.etcd.clone()).collect();
        PhaseReport {
            name: name.to_string(),
            wall,
            in_cluster: Traffic::default(),
            outside: Traffic::default(),
            etcd: merge_etcd(&etcd),
            steps,
        }
    }

    fn nodes(&self, cloud: Cloud) -> &[String] {
        match cloud {
            Cloud::Old => &self.old,
            Cloud::New => &self.new,
        }
    }

    fn node_ip(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        Ok(self.c.node(name)?.config.node_ip)
    }

    async fn step(&mut self, step: &Step) -> anyhow::Result<()> {
        match step {
            Step::AddNodes(cloud) => {
                let (index, count) = match cloud {
                    Cloud::Old => (0, self.profile.old_nodes),
                    Cloud::New => (1, self.profile.new_nodes),
                };
                let t = Instant::now();
                let mut names = Vec::new();
                for slot in 1..=count {
                    names.push(self.c.add_node(index, slot).await?);
                }
                if !self.flannel {
                    self.c.install_flannel()?;
                    self.flannel = true;
                }
                self.c.wait_ready(Duration::from_secs(240))?;
                let mut what = format!(
                    "{} nodes Ready ({}) in {:.1?}",
                    names.len(),
                    names.join(", "),
                    t.elapsed()
                );
                if *cloud == Cloud::New && !self.old.is_empty() {
                    self.c.wait_agents_ready("240s")?;
                    self.kubectl_wait("condition=Admitted", "wireguardpeers", "120s")?;
                    what.push_str(&format!(
                        "; agents Ready and peers admitted after {:.1?}",
                        t.elapsed()
                    ));
                }
                match cloud {
                    Cloud::Old => self.old = names,
                    Cloud::New => self.new = names,
                }
                self.say(&what);
            }
            Step::DeployEcho => {
                let replicas = self.profile.old_nodes;
                self.apply("echo.yaml", &echo_manifest(replicas))?;
                self.rollout_status("deploy/echo")?;
                self.say(&format!(
                    "echo Deployment ({replicas} replicas), Service (ClusterIP, NodePort) and PDB ready"
                ));
            }
            Step::StartOutsideClient => {
                let backend = self.node_ip(&self.old[0])?;
                self.outside = Some(OutsideClient::start(&self.c, backend)?);
                self.say(&format!(
                    "outside client calling the NodePort through the old cloud's load balancer ({})",
                    self.old[0]
                ));
            }
            Step::EtcdBootstrap => {
                let n = self.old.len();
                let on: Vec<&str> = (0..3).map(|i| self.old[i % n].as_str()).collect();
                self.etcd = Some(Etcd::bootstrap(&self.c, &on).await?);
                self.say(&format!("etcd: 3 members on {}", on.join(", ")));
            }
            Step::InstallIsthmus => {
                let t = Instant::now();
                self.c.install_isthmus()?;
                self.c.wait_agents_ready("240s")?;
                self.kubectl_wait("condition=Admitted", "wireguardpeers", "120s")?;
                self.say(&format!(
                    "isthmus installed (kubectl apply --server-side -k): agents Ready, peers admitted in {:.1?}",
                    t.elapsed()
                ));
            }
            Step::GateMeshConnected => {
                let t = Instant::now();
                self.kubectl_wait("condition=MeshConnected", "wireguardpeers", "240s")?;
                let peers = self
                    .c
                    .kubectl(&["get", "wireguardpeers", "-o", "name"])?
                    .lines()
                    .count();
                self.say(&format!(
                    "kubectl wait --for=condition=MeshConnected: {peers} peers connected after {:.1?}",
                    t.elapsed()
                ));
            }
            Step::StartClusterClient => {
                let ip = self.c.kubectl(&[
                    "get",
                    "svc",
                    "-n",
                    NAMESPACE,
                    "echo",
                    "-o",
                    "jsonpath={.spec.clusterIP}",
                ])?;
                let target = format!("{}:80", ip.trim());
                self.apply("client.yaml", &client_manifest("aws", &target))?;
                self.rollout_status("deploy/client")?;
                self.say(&format!(
                    "client Deployment in the new cloud calling the Service at {target}"
                ));
            }
            Step::SwitchLoadBalancer => {
                let backend = self.node_ip(&self.new[0])?;
                let outside = self.outside.as_ref().context("no outside client")?;
                let checked = outside.switch_to(&self.c.clouds[1], backend)?;
                self.say(&format!(
                    "load balancer switched: the outside client now calls {}'s NodePort \
                     (health check passed after {checked:.1?})",
                    self.new[0]
                ));
            }
            Step::Cordon(cloud) => {
                let nodes = self.nodes(*cloud).to_vec();
                for n in &nodes {
                    self.c.kubectl(&["cordon", n])?;
                }
                self.say(&format!("cordoned {}", nodes.join(", ")));
            }
            Step::RolloutRestartEcho => {
                let t = Instant::now();
                self.c
                    .kubectl(&["rollout", "restart", "-n", NAMESPACE, "deploy/echo"])?;
                self.rollout_status("deploy/echo")?;
                // The old pods leave after their preStop pause; wait until they are gone.
                let where_echo = || {
                    self.c.kubectl(&[
                        "get",
                        "pods",
                        "-n",
                        NAMESPACE,
                        "-l",
                        "app=echo",
                        "-o",
                        "jsonpath={range .items[*]}{.spec.nodeName} {end}",
                    ])
                };
                let moved = wait_until(Duration::from_secs(120), || {
                    where_echo().is_ok_and(|on| {
                        !on.split_whitespace()
                            .any(|n| self.old.iter().any(|o| o == n))
                    })
                });
                let on = where_echo()?;
                if !moved {
                    bail!("echo pods still on old nodes after the rollout: {on}");
                }
                self.say(&format!(
                    "kubectl rollout restart deploy/echo: pods on {} after {:.1?}",
                    on.trim(),
                    t.elapsed()
                ));
            }
            Step::EtcdStartWriter => {
                let node = self.new[0].clone();
                let c = &self.c;
                self.etcd
                    .as_mut()
                    .context("etcd is not running")?
                    .start_writer(c, &node)?;
                self.writing = true;
                self.say(&format!("etcd writer started on {node}"));
            }
            Step::EtcdAdd(i) => {
                let node = self.new[i % self.new.len()].clone();
                let t = Instant::now();
                let c = &self.c;
                let name = self
                    .etcd
                    .as_mut()
                    .context("etcd is not running")?
                    .add(c, &node)
                    .await?;
                self.say(&format!(
                    "etcd: {name} joined on {node} (learner, caught up, promoted) in {:.1?}",
                    t.elapsed()
                ));
            }
            Step::EtcdRemove(n) => {
                let name = format!("etcd-{n}");
                let t = Instant::now();
                let c = &self.c;
                self.etcd
                    .as_mut()
                    .context("etcd is not running")?
                    .remove(c, &name)
                    .await?;
                self.say(&format!("etcd: {name} left in {:.1?}", t.elapsed()));
            }
            Step::EtcdFinish => {
                let etcd = self.etcd.take().context("etcd is not running")?;
                self.writing = false;
                let f = etcd.finish(&self.c).await?;
                self.say(&format!(
                    "etcd writer stopped: every acknowledged write read back ({} lost); members {}",
                    f.lost,
                    f.members.join(" ")
                ));
                if let Some(last) = self.lines.last_mut() {
                    last.etcd = Some(f);
                }
            }
            Step::Drain(cloud) => {
                let nodes = self.nodes(*cloud).to_vec();
                let t = Instant::now();
                for n in &nodes {
                    self.c.kubectl(&[
                        "drain",
                        n,
                        "--ignore-daemonsets",
                        "--delete-emptydir-data",
                        "--timeout=240s",
                    ])?;
                }
                self.say(&format!(
                    "drained {} in {:.1?}",
                    nodes.join(", "),
                    t.elapsed()
                ));
            }
            Step::RemoveNodes(cloud) => {
                let nodes = self.nodes(*cloud).to_vec();
                let t = Instant::now();
                for n in &nodes {
                    // The machine first: a running kubelet would register its Node again.
                    self.c.remove_node(n)?;
                    self.c.kubectl(&["delete", "node", n])?;
                }
                let collected = wait_until(Duration::from_secs(180), || {
                    self.c
                        .kubectl(&["get", "wireguardpeers", "-o", "name"])
                        .is_ok_and(|out| {
                            !out.lines()
                                .any(|l| nodes.iter().any(|n| l.ends_with(&format!("/{n}"))))
                        })
                });
                if !collected {
                    bail!("the coordinator did not collect the peers of {nodes:?}");
                }
                let peers_collected = t.elapsed();
                // Their DaemonSet pods go with the pod garbage collector (after its 40 s
                // quarantine), as in any cluster; wait, so the next phase starts clean.
                let pods_gone = wait_until(Duration::from_secs(180), || {
                    self.c
                        .kubectl(&[
                            "get",
                            "pods",
                            "-A",
                            "-o",
                            "jsonpath={range .items[*]}{.spec.nodeName} {end}",
                        ])
                        .is_ok_and(|on| {
                            !on.split_whitespace().any(|n| nodes.iter().any(|d| d == n))
                        })
                });
                if !pods_gone {
                    bail!("pods of the deleted nodes {nodes:?} were never collected");
                }
                self.say(&format!(
                    "machines and Nodes {} deleted; their peers collected after {peers_collected:.1?}, their pods after {:.1?}",
                    nodes.join(", "),
                    t.elapsed()
                ));
                match cloud {
                    Cloud::Old => self.old.clear(),
                    Cloud::New => self.new.clear(),
                }
            }
            Step::UninstallIsthmus => {
                let t = Instant::now();
                self.c.uninstall_isthmus()?;
                self.say(&format!(
                    "isthmus removed (kubectl delete -k): every node back on plain eth0 after {:.1?}",
                    t.elapsed()
                ));
            }
            Step::Hold => {
                tokio::time::sleep(self.profile.hold).await;
                let hold = self.profile.hold;
                self.say(&format!("held {hold:?}"));
            }
        }
        Ok(())
    }

    fn apply(&self, file: &str, manifest: &str) -> anyhow::Result<()> {
        let path = self.c.rig.dir.path().join(file);
        std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
        self.c
            .kubectl(&["apply", "--server-side", "-f", &path.display().to_string()])?;
        Ok(())
    }

    fn rollout_status(&self, what: &str) -> anyhow::Result<()> {
        self.c
            .kubectl(&["rollout", "status", "-n", NAMESPACE, what, "--timeout=300s"])
            .with_context(|| format!("{what} did not roll out"))?;
        Ok(())
    }

    fn kubectl_wait(&self, condition: &str, what: &str, timeout: &str) -> anyhow::Result<()> {
        self.c
            .kubectl(&[
                "wait",
                &format!("--for={condition}"),
                what,
                "--all",
                &format!("--timeout={timeout}"),
            ])
            .with_context(|| {
                format!(
                    "{what} not {condition}:\n{}",
                    self.c
                        .kubectl(&["get", what, "-o", "wide"])
                        .unwrap_or_default()
                )
            })?;
        Ok(())
    }
}
