//! The control-plane move on the real cluster: an etcd cluster of pods in the old cloud
//! (vsphere) moves to the new one (aws) over the mesh, 3 → 5 → 3, one member at a time,
//! while a writer in an aws node's host network writes and reads back every 20 ms.
//!
//! Before the mesh is installed a new-cloud member must fail to join (the test can fail);
//! after it, every step must end with zero failed writes, and at the end no acknowledged
//! write may be missing and the three members left must all run in the new cloud.
//!
//! Needs root, `make test`'s images and `bash scripts/build-sandbox-image.sh`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_sandbox::etcd::{Etcd, WriteFigures};
use isthmus_tests::daemon::wait_until;
use isthmus_tests::kube::workspace_root;
use isthmus_tests::rig::RealCluster;

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

fn report(t0: Instant, what: &str, f: &WriteFigures, e: &Etcd) {
    step(
        t0,
        &format!(
            "{what:<28} writes {:>5}  failed {}  p50 {:>6.1?}  p99 {:>6.1?}  leader changes {}  members {}",
            f.writes,
            f.failed,
            f.p50,
            f.p99,
            f.leader_changes,
            e.members()
                .iter()
                .map(|(m, n)| format!("{m}@{n}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
}

/// Lets the writer run for `d` (so every step has writes of its own).
async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_moves_from_the_old_cloud_to_the_new_over_the_mesh() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let image = workspace_root().join(".cache/test-images/sandbox.oci.tar");
    if !image.exists() {
        bail!(
            "{} is missing: cargo build --release --workspace --bins && bash scripts/build-sandbox-image.sh",
            image.display()
        );
    }
    let mut c = RealCluster::start().await?;
    c.add_image(image)?;
    for (cloud, slot) in [(0, 1), (0, 2), (1, 1), (1, 2)] {
        c.add_node(cloud, slot).await?;
    }
    c.install_flannel()?;
    c.wait_ready(Duration::from_secs(120))?;
    step(
        t0,
        "cluster up: vsphere-1, vsphere-2 (old), aws-1, aws-2 (new), flannel",
    );

    let mut etcd = Etcd::bootstrap(&c, &["vsphere-1", "vsphere-2", "vsphere-1"])
        .await
        .with_context(|| c.diagnostics())?;
    step(t0, "etcd: 3 members in the old cloud");

    // Without the mesh a new-cloud member cannot reach the cluster: its join must fail.
    etcd.join_timeout = Duration::from_secs(25);
    let before = etcd.add(&c, "aws-1").await;
    assert!(
        before.is_err(),
        "a new-cloud member joined before the mesh existed"
    );
    step(
        t0,
        "before the mesh: a new-cloud member cannot join, as it must",
    );
    etcd.join_timeout = Duration::from_secs(120);

    c.install_isthmus()?;
    let connected = wait_until(Duration::from_secs(240), || {
        c.kubectl(&[
            "wait",
            "--for=condition=MeshConnected",
            "wireguardpeers",
            "--all",
            "--timeout=5s",
        ])
        .is_ok_and(|o| o.lines().count() == 4)
    });
    if !connected {
        bail!("the mesh never connected:\n{}", c.diagnostics());
    }
    step(t0, "isthmus installed, every WireGuardPeer MeshConnected");

    let t_move = Instant::now();
    etcd.start_writer(&c, "aws-2")?;
    settle(Duration::from_secs(3)).await;
    let mut all = Vec::new();
    let f = etcd.take_figures();
    report(t0, "writer on aws-2 (3 old)", &f, &etcd);
    all.push(("writer started", f));

    let story: [(&str, &str); 7] = [
        ("add", "aws-1"),
        ("add", "aws-2"),
        ("kill", "aws-1"),
        ("remove", "etcd-1"),
        ("add", "aws-1"),
        ("remove", "etcd-2"),
        ("remove", "etcd-3"),
    ];
    for (op, arg) in story {
        let what = match op {
            "add" => {
                let name = etcd.add(&c, arg).await?;
                format!("add {name} on {arg}")
            }
            "kill" => {
                let name = restart_member(&c, &etcd, arg).await?;
                format!("{name} killed, restarted")
            }
            _ => {
                etcd.remove(&c, arg).await?;
                format!("remove {arg}")
            }
        };
        settle(Duration::from_secs(2)).await;
        let f = etcd.take_figures();
        report(t0, &what, &f, &etcd);
        if f.failed > 0 {
            eprintln!("last write error: {:?}", etcd.last_error());
        }
        all.push(("step", f));
    }
    let members = etcd.members();
    let last = etcd.finish(&c).await?;
    report_last(t0, &last);
    step(t0, &format!("the move took {:.1?}", t_move.elapsed()));

    let failed: u64 = all.iter().map(|(_, f)| f.failed).sum::<u64>() + last.failed;
    let writes: u64 = all.iter().map(|(_, f)| f.writes).sum::<u64>() + last.writes;
    assert!(writes > 0, "the writer wrote nothing");
    assert_eq!(failed, 0, "failed writes");
    assert_eq!(last.lost, 0, "acknowledged writes lost");
    assert_eq!(members.len(), 3, "members at the end: {members:?}");
    assert!(
        members.iter().all(|(_, node)| node.starts_with("aws-")),
        "members outside the new cloud: {members:?}"
    );
    step(t0, &format!("{writes} writes, none failed, none lost"));
    Ok(())
}

/// SIGKILLs the etcd of the (only) member on `node`: the kubelet restarts the container,
/// whose entrypoint finds its data dir and runs etcd again as the same member.
async fn restart_member(c: &RealCluster, etcd: &Etcd, node: &str) -> anyhow::Result<String> {
    let name = etcd
        .members()
        .into_iter()
        .find(|(_, n)| n == node)
        .map(|(m, _)| m)
        .with_context(|| format!("no member on {node}"))?;
    // Containers have namespaces of their own: find etcd by the node's cgroup root (unique
    // to this rig and node), under which the kubelet puts every container.
    let root = format!("{}/", c.node(node)?.cgroup);
    let pid = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|s| s.trim() == "etcd")
                && std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                    .is_ok_and(|s| s.contains(&root))
        })
        .with_context(|| format!("no etcd process on {node}"))?;
    // SAFETY: a plain kill(2) of a process of the test's own cluster.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        bail!("kill {pid}: {}", std::io::Error::last_os_error());
    }
    let restarted = wait_until(Duration::from_secs(60), || {
        c.kubectl(&[
            "get",
            "pod",
            "-n",
            isthmus_sandbox::etcd::NAMESPACE,
            &name,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ])
        .is_ok_and(|n| n.trim().parse::<u32>().is_ok_and(|n| n >= 1))
    });
    if !restarted {
        bail!("{name} was not restarted");
    }
    etcd.healthy(c).await?;
    Ok(name)
}

fn report_last(t0: Instant, f: &WriteFigures) {
    step(
        t0,
        &format!(
            "finish: writes {} failed {} lost {} p50 {:.1?} p99 {:.1?} leader changes {}",
            f.writes, f.failed, f.lost, f.p50, f.p99, f.leader_changes
        ),
    );
}
