//! Crash safety proven by fault injection (needs root). A real process makes the routing
//! changes the agent makes — flannel's VXLAN FDB entry repointed, flannel's route clamped,
//! host routes into the TUN, a policy rule and table — in a network namespace this test
//! creates, and is SIGKILLed (`ISTHMUS_FAULT`, see `isthmus_routing::fault`) at every point
//! between the steps of every change: before the journal, inside a journal write, after the
//! journal before the kernel write, inside a two-request kernel write, after it, after the
//! confirmation. Then the real `isthmus-agent cleanup` runs on the same state directory and
//! `bridge fdb`, `ip neigh`, `ip route show table all` and `ip rule` must be exactly what
//! they were: zero lines of difference, printed when not. Also failed kernel writes (a route
//! to a device that vanished) and a full disk (the journal cannot be written: the change
//! must not touch the kernel).
//!
//! The process killed is this test binary run again with `ISTHMUS_CRASH_CHILD` set, running
//! only [`crash_child`]; it drives `isthmus_routing::Router` exactly as the agent's passes do.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use isthmus_routing::address::Netlink;
use isthmus_routing::fault::{Point, ENV as FAULT_ENV};
use isthmus_routing::journal::FILE as JOURNAL;
use isthmus_routing::kernel::Kernel;
use isthmus_routing::model::{EntryKey, Value};
use isthmus_routing::netns::run_in;
use isthmus_routing::plan::{desired, Devices, Remote, Settings, Vtep};
use isthmus_routing::{Mode, Router};

const CHILD_ENV: &str = "ISTHMUS_CRASH_CHILD";
const AGENT: &str = env!("CARGO_BIN_EXE_isthmus-agent");
const REMOTE_MAC: &str = "0a:58:0a:f4:15:00";
const REMOTE2_MAC: &str = "0a:58:0a:f4:16:00";
/// A device index no namespace this test makes reaches: the TUN as it is after it vanished
/// between the plan and the write.
const VANISHED: u32 = 9999;

/// What the killed process changes, pass after pass, as the agent would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// vxlan mode: the first plan (FDB to the mesh IP, flannel's route clamped, a host
    /// route), the remote's mesh IP and MTU move, then graceful removal.
    Vxlan,
    /// routed mode over a rule someone else had at our priority (replaced: delete, then
    /// add), a second remote, then graceful removal.
    Routed,
    /// vxlan mode whose TUN vanished before the first pass (its host route fails), a pass
    /// after it is back, then graceful removal.
    FailedWrite,
    /// [`Scenario::Vxlan`]'s first two plans with the state directory on a full disk.
    FullDisk,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Vxlan => "vxlan",
            Scenario::Routed => "routed",
            Scenario::FailedWrite => "failed-write",
            Scenario::FullDisk => "full-disk",
        }
    }

    fn parse(s: &str) -> Scenario {
        [
            Scenario::Vxlan,
            Scenario::Routed,
            Scenario::FailedWrite,
            Scenario::FullDisk,
        ]
        .into_iter()
        .find(|c| c.name() == s)
        .unwrap_or_else(|| panic!("unknown scenario {s}"))
    }
}

struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ist{:x}cs{}",
            std::process::id() & 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        // No IPv6 link-local addresses: their duplicate address detection would change
        // the routes a second later, by itself, and nothing here is IPv6.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        Ns { name }
    }

    fn ip(&self, args: &str) -> String {
        in_ns(&self.name, "ip", args)
    }

    fn bridge(&self, args: &str) -> String {
        in_ns(&self.name, "bridge", args)
    }

    fn dump(&self) -> String {
        dump(&self.name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/netns/{name}"))
}

fn in_ns(ns: &str, program: &str, args: &str) -> String {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    run(program, &full)
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What an operator compares: the FDB, permanent neighbours, routes of every table and the
/// rules, both families.
fn dump(ns: &str) -> String {
    [
        ("fdb", "bridge", "fdb show"),
        ("neigh4", "ip", "-4 neigh show nud permanent"),
        ("neigh6", "ip", "-6 neigh show nud permanent"),
        ("route4", "ip", "-4 route show table all"),
        ("route6", "ip", "-6 route show table all"),
        ("rule4", "ip", "-4 rule show"),
        ("rule6", "ip", "-6 rule show"),
    ]
    .into_iter()
    .flat_map(|(section, program, args)| {
        in_ns(ns, program, args)
            .lines()
            .map(|l| format!("{section}| {l}"))
            .collect::<Vec<_>>()
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// The lines only in `before` (`-`) and only in `after` (`+`); empty when they match.
fn diff(before: &str, after: &str) -> String {
    let mut count: BTreeMap<&str, i32> = BTreeMap::new();
    for l in before.lines() {
        *count.entry(l).or_default() -= 1;
    }
    for l in after.lines() {
        *count.entry(l).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(l, n)| format!("{}{l}", if n < 0 { "-" } else { "+" }))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A node as flannel leaves it: eth0, flannel.1 with the entries for remote aws-1 (pod CIDR
/// 10.244.21.0/24, VTEP 10.244.21.0, node IP 10.0.0.11) and aws-2, and a TUN. `routed`:
/// someone's rule at the priority isthmus uses.
fn node(scenario: Scenario) -> Ns {
    let ns = Ns::new();
    ns.ip("link set lo up");
    ns.ip("link add eth0 type veth peer name eth0p");
    ns.ip("link set eth0p up");
    ns.ip("addr add 10.0.0.10/24 dev eth0");
    ns.ip("link set eth0 up");
    ns.ip("link add flannel.1 type vxlan id 1 local 10.0.0.10 dev eth0 dstport 8472 nolearning");
    ns.ip("link set flannel.1 mtu 1450 address 0a:58:0a:f4:0a:00");
    ns.ip("addr add 10.244.10.0/32 dev flannel.1");
    ns.ip("link set flannel.1 up");
    for (n, mac) in [(1, REMOTE_MAC), (2, REMOTE2_MAC)] {
        ns.ip(&format!(
            "route add 10.244.2{n}.0/24 via 10.244.2{n}.0 dev flannel.1 onlink"
        ));
        ns.ip(&format!(
            "neigh add 10.244.2{n}.0 lladdr {mac} dev flannel.1 nud permanent"
        ));
        ns.bridge(&format!(
            "fdb add {mac} dev flannel.1 dst 10.0.0.1{n} self permanent"
        ));
    }
    ns.ip("tuntap add dev isthtun mode tun");
    ns.ip("addr add 100.96.0.1/16 dev isthtun");
    ns.ip("link set isthtun up");
    if scenario == Scenario::Routed {
        ns.ip("rule add pref 5210 lookup 100");
    }
    ns
}

fn remote(n: u8, mesh: u8, mtu: Option<u16>) -> Remote {
    Remote {
        name: format!("aws-{n}"),
        mesh_ip: format!("100.96.0.{mesh}").parse().unwrap(),
        mesh_ip6: None,
        pod_cidrs: vec![format!("10.244.2{n}.0/24").parse().unwrap()],
        vtep: Some(Vtep {
            mac: [REMOTE_MAC, REMOTE2_MAC][usize::from(n - 1)]
                .parse()
                .unwrap(),
            ip: format!("10.244.2{n}.0").parse().unwrap(),
        }),
        vtep6: None,
        mtu,
        path_mtu: None,
    }
}

/// The plans the scenario's passes apply, in order; an empty plan is removal.
fn plans(scenario: Scenario, devices: Devices) -> Vec<BTreeMap<EntryKey, Value>> {
    let settings = |mode| Settings {
        mode,
        table: 51820,
        rule_priority: 5210,
    };
    let vxlan = settings(Mode::Vxlan);
    let routed = settings(Mode::Routed);
    let first = [remote(1, 3, None)];
    let moved = [remote(1, 4, Some(1320))];
    match scenario {
        Scenario::Vxlan => vec![
            desired(&vxlan, devices, 1420, &first),
            desired(&vxlan, devices, 1420, &moved),
            BTreeMap::new(),
        ],
        Scenario::Routed => vec![
            desired(&routed, devices, 1420, &first),
            desired(
                &routed,
                devices,
                1420,
                &[remote(1, 3, Some(1320)), remote(2, 5, None)],
            ),
            BTreeMap::new(),
        ],
        Scenario::FailedWrite => {
            let gone = Devices {
                tun: VANISHED,
                ..devices
            };
            vec![
                desired(&vxlan, gone, 1420, &first),
                desired(&vxlan, devices, 1420, &moved),
                BTreeMap::new(),
            ]
        }
        Scenario::FullDisk => vec![
            desired(&vxlan, devices, 1420, &first),
            desired(&vxlan, devices, 1420, &moved),
        ],
    }
}

/// One kernel connection in the namespace, and the router over `state`.
struct Driver {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

impl Driver {
    fn new(ns: &str, state: &Path) -> Driver {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let netlink = run_in(Some(&netns_path(ns)), move || {
            let _entered = handle.enter();
            Netlink::connect()
        })
        .unwrap();
        let router = Router::open(Kernel::new(netlink.handle()), state).unwrap();
        Driver { runtime, router }
    }

    fn devices(&self) -> Devices {
        let kernel = self.router.kernel();
        self.runtime.block_on(async {
            Devices {
                vxlan: kernel.link("flannel.1").await.unwrap().map(|l| l.0),
                vxlan6: None,
                tun: kernel.link("isthtun").await.unwrap().unwrap().0,
            }
        })
    }

    /// One pass, as the agent's: the outcome or the error, as text.
    fn pass(&mut self, plan: BTreeMap<EntryKey, Value>) -> anyhow::Result<String> {
        let restore = plan.is_empty();
        self.router.set_desired(plan);
        let outcome = if restore {
            self.runtime.block_on(self.router.restore())
        } else {
            self.runtime.block_on(self.router.reconcile())
        }?;
        Ok(format!(
            "changed={} failed={} reasserted={}",
            outcome.changed,
            outcome.failed,
            outcome.reasserted.len()
        ))
    }
}

/// The killed process: runs the scenario's passes (under `ISTHMUS_FAULT`, which kills it
/// somewhere among them). Passes when not started as a child.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ',');
    let (scenario, ns, state) = (
        Scenario::parse(parts.next().unwrap()),
        parts.next().unwrap().to_string(),
        PathBuf::from(parts.next().unwrap()),
    );
    if scenario == Scenario::FullDisk {
        return full_disk_child(&ns, &state);
    }
    let mut driver = Driver::new(&ns, &state);
    let devices = driver.devices();
    for (i, plan) in plans(scenario, devices).into_iter().enumerate() {
        let outcome = driver.pass(plan).unwrap();
        println!("pass {}: {outcome}", i + 1);
    }
}

/// Runs the child for `scenario` with `fault` armed; the output, and whether it was killed.
fn child(scenario: Scenario, ns: &str, state: &Path, fault: Option<String>) -> (Output, bool) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("{},{ns},{}", scenario.name(), state.display()),
        )
        .env_remove(FAULT_ENV);
    if let Some(f) = fault {
        cmd.env(FAULT_ENV, f);
    }
    let out = cmd.output().unwrap();
    let killed = out.status.signal() == Some(libc::SIGKILL);
    assert!(
        killed || out.status.success(),
        "{} child neither finished nor was killed: {}\n{}{}",
        scenario.name(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, killed)
}

/// `isthmus-agent cleanup` on `state` in `ns`, as after a crash.
fn cleanup(ns: &str, state: &Path) -> Output {
    let out = Command::new(AGENT)
        .args([
            "cleanup",
            "--state-dir",
            &state.display().to_string(),
            "--iface",
            // No UAPI socket of this name exists: cleanup removes only a stale one.
            &format!("{ns}x"),
            "--netns",
            &netns_path(ns).display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// For every fault point and every occurrence of it in `scenario`: kill the child there,
/// clean up, and require the dumps to be exactly as before. Returns the kills per point.
fn kill_everywhere(scenario: Scenario) -> BTreeMap<&'static str, u32> {
    let started = Instant::now();
    let ns = node(scenario);
    let before = ns.dump();
    let mut kills = BTreeMap::new();
    for point in Point::ALL {
        let mut n = 1;
        loop {
            let state = tempfile::tempdir().unwrap();
            let fault = format!("{}:{n}", point.name());
            let (out, killed) = child(scenario, &ns.name, state.path(), Some(fault.clone()));
            let cleaned = cleanup(&ns.name, state.path());
            let after = ns.dump();
            assert!(
                after == before,
                "{} killed at {fault}: cleanup left the node different (- before, + after):\n{}\n\
                 child: {}\ncleanup: {}",
                scenario.name(),
                diff(&before, &after),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&cleaned.stderr),
            );
            assert!(
                !state.path().join(JOURNAL).exists(),
                "{} killed at {fault}: the journal outlived cleanup",
                scenario.name()
            );
            if !killed {
                break;
            }
            *kills.entry(point.name()).or_insert(0) += 1;
            n += 1;
        }
    }
    println!(
        "{}: {} kills, each cleaned up exactly, in {:.1}s: {kills:?}",
        scenario.name(),
        kills.values().sum::<u32>(),
        started.elapsed().as_secs_f64()
    );
    kills
}

#[test]
fn sigkill_at_every_step_of_vxlan_changes_then_cleanup_restores_exactly() {
    let kills = kill_everywhere(Scenario::Vxlan);
    for point in [
        "before-journal",
        "journal-temp",
        "before-write",
        "after-write",
        "after-confirm",
    ] {
        assert!(
            kills.get(point).is_some_and(|n| *n >= 3),
            "{point}: {kills:?}"
        );
    }
}

#[test]
fn sigkill_at_every_step_of_routed_changes_then_cleanup_restores_exactly() {
    let kills = kill_everywhere(Scenario::Routed);
    assert!(
        kills.contains_key("mid-write"),
        "the rule replacement was never interrupted: {kills:?}"
    );
}

#[test]
fn failed_kernel_writes_then_sigkill_then_cleanup_restores_exactly() {
    // Without a fault: the first pass fails the host route and says so.
    let ns = node(Scenario::FailedWrite);
    let before = ns.dump();
    let state = tempfile::tempdir().unwrap();
    let (out, _) = child(Scenario::FailedWrite, &ns.name, state.path(), None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pass 1: changed=2 failed=1"), "{stdout}");
    assert!(
        stdout.contains("pass 2: changed=") && stdout.contains("failed=0"),
        "{stdout}"
    );
    assert_eq!(diff(&before, &ns.dump()), "");
    drop(ns);
    kill_everywhere(Scenario::FailedWrite);
}

/// The full-disk child, in a mount namespace of its own (so the tmpfs goes with it): the
/// state directory is a 16 KiB tmpfs that gets filled.
fn full_disk_child(ns: &str, state: &Path) {
    let filler = state.join("filler");
    let fill = || {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
        let _ = f.sync_all();
    };
    let mut driver = Driver::new(ns, state);
    let plans = plans(Scenario::FullDisk, driver.devices());
    let before = dump(ns);

    fill();
    let err = driver.pass(plans[0].clone()).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("routing-journal.json") && err.contains("No space left on device"),
        "{err}"
    );
    assert_eq!(
        diff(&before, &dump(ns)),
        "",
        "the first change touched the kernel without a journal"
    );
    assert!(!state.join(JOURNAL).exists());

    std::fs::remove_file(&filler).unwrap();
    println!("pass 1: {}", driver.pass(plans[0].clone()).unwrap());
    let applied = dump(ns);
    assert_ne!(applied, before);
    let journal = std::fs::read(state.join(JOURNAL)).unwrap();

    fill();
    let err = format!("{:#}", driver.pass(plans[1].clone()).unwrap_err());
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        diff(&applied, &dump(ns)),
        "",
        "the second change touched the kernel without a journal"
    );
    assert_eq!(std::fs::read(state.join(JOURNAL)).unwrap(), journal);
    drop(driver);

    // Cleanup on the disk that is still full.
    let out = cleanup(ns, state);
    println!("cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!state.join(JOURNAL).exists());
}

#[test]
fn a_full_disk_fails_the_change_before_the_kernel_and_cleanup_still_restores() {
    let ns = node(Scenario::FullDisk);
    let before = ns.dump();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().display().to_string();
    let exe = std::env::current_exe().unwrap().display().to_string();
    // A private mount namespace: the tmpfs exists only for the child and vanishes with it.
    let script = format!(
        "mount -t tmpfs -o size=16k isthmus-crash-test {dir} && exec {exe} --exact crash_child \
         --nocapture --test-threads=1"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env(
            CHILD_ENV,
            format!("{},{},{dir}", Scenario::FullDisk.name(), ns.name),
        )
        .env_remove(FAULT_ENV)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ns.dump();
    assert!(
        after == before,
        "after a full disk and cleanup (- before, + after):\n{}",
        diff(&before, &after)
    );
    // The tmpfs was the child's alone: here the directory is as the test made it.
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
}
