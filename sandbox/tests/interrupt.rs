//! Ctrl-C in the middle of the move: the sandbox stops at once, exits 130, and leaves no
//! namespace, mount, cgroup or process of its cluster behind. The signal goes to the whole
//! process group, as a terminal sends it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

#[test]
fn ctrl_c_mid_move_removes_everything() {
    isthmus_tests::require_root();
    let bin = isthmus_tests::workspace_bin("isthmus-sandbox");
    let mut child = Command::new(&bin)
        .args(["--profile", "short", "--workers-only"])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the sandbox");
    let pid = child.id() as i32;
    let stderr = child.stderr.take().expect("stderr");
    // Read stderr to the end on a thread of its own: a closed pipe would fail the sandbox's
    // own output.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut tag = None;
    let mut seen = Vec::new();
    // Interrupt once the mesh is installed: the cluster, its nodes, pods and agents exist.
    for line in rx.iter() {
        if let Some(t) = line.split("names prefixed ").nth(1) {
            tag = Some(t.trim_end_matches(')').to_string());
        }
        let installed = line.contains("isthmus installed");
        seen.push(line);
        if installed {
            break;
        }
    }
    let tag = tag.unwrap_or_else(|| panic!("no rig tag in the output:\n{}", seen.join("\n")));
    assert!(
        seen.iter().any(|l| l.contains("isthmus installed")),
        "the sandbox never got to the install:\n{}",
        seen.join("\n")
    );
    let t = Instant::now();
    // SAFETY: signalling the process group we created.
    unsafe { libc::kill(-pid, libc::SIGINT) };
    let status = child.wait().expect("waiting for the sandbox");
    let stopped = t.elapsed();
    println!("interrupted: exit {status:?} after {stopped:.1?}");
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");

    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    let netns = String::from_utf8_lossy(&netns.stdout);
    let left: Vec<&str> = netns.lines().filter(|l| l.starts_with(&tag)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&tag)).collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    let mut cgroups = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .expect("/sys/fs/cgroup")
        .flatten()
    {
        for entry in std::fs::read_dir(controller.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().contains(&tag) {
                cgroups.push(entry.path());
            }
        }
    }
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    // No process of the cluster: none has the rig's tag in its command line or namespace.
    let mut procs = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&tag) {
            procs.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    assert!(procs.is_empty(), "processes left: {procs:?}");
}
