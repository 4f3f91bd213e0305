//! Routing against the real kernel, in a network namespace this test creates (needs root):
//! a flannel-style VXLAN device with flannel's entries for one remote node, and a real TUN
//! device. Asserts what an operator would see with `bridge fdb`, `ip neigh`, `ip route` and
//! `ip rule`, and that restoring leaves those dumps exactly as they were.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use isthmus_routing::address::Netlink;
use isthmus_routing::kernel::Kernel;
use isthmus_routing::model::{EntryKey, Value};
use isthmus_routing::netns::run_in;
use isthmus_routing::plan::{desired, Devices, Remote, Settings, Vtep};
use isthmus_routing::{Mode, Router};

const REMOTE_MAC: &str = "0a:58:0a:f4:15:00";

struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ist{:x}rk{}",
            std::process::id() & 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Ns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn ip(&self, args: &str) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend(args.split_whitespace());
        run("ip", &full)
    }

    fn bridge(&self, args: &str) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend(args.split_whitespace());
        run("bridge", &full)
    }

    /// What an operator compares: FDB, permanent neighbours, routes of all tables, rules.
    fn dump(&self) -> String {
        let neigh: Vec<String> = self
            .ip("neigh show nud permanent")
            .lines()
            .map(str::to_string)
            .collect();
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.bridge("fdb show dev flannel.1"),
            self.bridge("fdb show"),
            neigh.join("\n"),
            self.ip("route show table all"),
            self.ip("-6 route show table all"),
            self.ip("rule show") + &self.ip("-6 rule show"),
        )
    }

    fn fdb_dst(&self) -> String {
        self.fdb_dst_on("flannel.1", REMOTE_MAC)
    }

    fn fdb_dst_on(&self, dev: &str, mac: &str) -> String {
        let out = self.bridge(&format!("fdb show dev {dev}"));
        out.lines()
            .find(|l| l.starts_with(mac))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "dst").nth(1))
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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

/// A node as flannel leaves it: eth0 (a veth), flannel.1 and the entries for remote node
/// aws-1 (pod CIDR 10.244.21.0/24, VTEP 10.244.21.0, node IP 10.0.0.11), plus a TUN.
fn node() -> Ns {
    let ns = Ns::new();
    ns.ip("link set lo up");
    ns.ip("link add eth0 type veth peer name eth0p");
    ns.ip("link set eth0p up");
    ns.ip("addr add 10.0.0.11/24 dev eth0");
    ns.ip("link set eth0 up");
    ns.ip("link add flannel.1 type vxlan id 1 local 10.0.0.11 dev eth0 dstport 8472 nolearning");
    ns.ip("link set flannel.1 mtu 1450 address 0a:58:0a:f4:0b:00");
    ns.ip("addr add 10.244.11.0/32 dev flannel.1");
    ns.ip("link set flannel.1 up");
    ns.ip("route add 10.244.21.0/24 via 10.244.21.0 dev flannel.1 onlink");
    ns.ip(&format!(
        "neigh add 10.244.21.0 lladdr {REMOTE_MAC} dev flannel.1 nud permanent"
    ));
    ns.bridge(&format!(
        "fdb add {REMOTE_MAC} dev flannel.1 dst 10.0.0.11 self permanent"
    ));
    ns.ip("tuntap add dev isthtun mode tun");
    ns.ip("addr add 100.96.0.1/16 dev isthtun");
    ns.ip("link set isthtun up");
    ns
}

/// [`node`] on a dual-stack node: eth0's IPv6 underlay address, flannel's `flannel-v6.1`
/// (`local` that address, MTU 1430, address fd00:244:b::/128) with flannel's entries for
/// aws-1's IPv6 half (VTEP fd00:244:15::, FDB to its underlay 2001:db8::15), and an IPv6
/// mesh address on the TUN.
fn dual_node() -> Ns {
    let ns = node();
    ns.ip("addr add 2001:db8::11/64 dev eth0 nodad");
    ns.ip(
        "link add flannel-v6.1 type vxlan id 1 local 2001:db8::11 dev eth0 dstport 8472 nolearning",
    );
    ns.ip(&format!(
        "link set flannel-v6.1 mtu 1430 address {LOCAL_MAC6}"
    ));
    ns.ip("addr add fd00:244:b::/128 dev flannel-v6.1 nodad");
    ns.ip("link set flannel-v6.1 up");
    ns.ip(&format!(
        "neigh add fd00:244:15:: lladdr {REMOTE_MAC6} dev flannel-v6.1 nud permanent"
    ));
    ns.bridge(&format!(
        "fdb add {REMOTE_MAC6} dev flannel-v6.1 dst 2001:db8::15 self permanent"
    ));
    ns.ip("-6 route add fd00:244:15::/64 via fd00:244:15:: dev flannel-v6.1 onlink");
    ns.ip("addr add fd96::1/120 dev isthtun nodad");
    ns
}

const LOCAL_MAC6: &str = "0a:58:fd:00:00:0b";
const REMOTE_MAC6: &str = "0a:58:fd:00:00:15";

/// [`remote`] in a dual-stack mesh: its IPv6 pod CIDR, IPv6 mesh IP and `flannel-v6.1` VTEP.
fn dual_remote() -> Remote {
    let mut r = remote();
    r.pod_cidrs.push("fd00:244:15::/64".parse().unwrap());
    r.mesh_ip6 = Some("fd96::3".parse().unwrap());
    r.vtep6 = Some(Vtep {
        mac: REMOTE_MAC6.parse().unwrap(),
        ip: "fd00:244:15::".parse().unwrap(),
    });
    r
}

fn remote() -> Remote {
    Remote {
        name: "aws-1".into(),
        mesh_ip: "100.96.0.3".parse().unwrap(),
        mesh_ip6: None,
        pod_cidrs: vec!["10.244.21.0/24".parse().unwrap()],
        vtep: Some(Vtep {
            mac: REMOTE_MAC.parse().unwrap(),
            ip: "10.244.21.0".parse().unwrap(),
        }),
        vtep6: None,
        mtu: None,
        path_mtu: None,
    }
}

struct Rig {
    runtime: tokio::runtime::Runtime,
    kernel: Kernel,
    state: tempfile::TempDir,
}

impl Rig {
    fn new(ns: &Ns) -> Rig {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let netlink = run_in(Some(&ns.path()), move || {
            let _entered = handle.enter();
            Netlink::connect()
        })
        .unwrap();
        Rig {
            kernel: Kernel::new(netlink.handle()),
            runtime,
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn router(&self) -> Router {
        Router::open(self.kernel.clone(), self.state.path()).unwrap()
    }

    fn devices(&self) -> Devices {
        self.runtime.block_on(async {
            Devices {
                vxlan: self.kernel.link("flannel.1").await.unwrap().map(|l| l.0),
                vxlan6: self.kernel.link("flannel-v6.1").await.unwrap().map(|l| l.0),
                tun: self.kernel.link("isthtun").await.unwrap().unwrap().0,
            }
        })
    }

    fn plan(&self, mode: Mode) -> BTreeMap<EntryKey, Value> {
        self.plan_for(mode, remote())
    }

    fn plan_for(&self, mode: Mode, remote: Remote) -> BTreeMap<EntryKey, Value> {
        let settings = Settings {
            mode,
            table: 51820,
            rule_priority: 5210,
        };
        desired(&settings, self.devices(), 1420, &[remote])
    }
}

#[test]
fn vxlan_mode_repoints_reasserts_and_restores_exactly() {
    let ns = node();
    let rig = Rig::new(&ns);
    let before = ns.dump();
    let mut router = rig.router();
    router.set_desired(rig.plan(Mode::Vxlan));
    let o = rig.runtime.block_on(router.reconcile()).unwrap();
    assert_eq!(
        (o.changed, o.failed),
        (3, 0),
        "FDB and route changed, neigh already right, a host route to the mesh IP added"
    );
    assert_eq!(ns.fdb_dst(), "100.96.0.3");
    let route = ns.ip("route show 10.244.21.0/24");
    assert!(route.contains("mtu 1370"), "{route}");
    assert!(route.contains("via 10.244.21.0 dev flannel.1"), "{route}");
    let host = ns.ip("route show 100.96.0.3/32");
    assert!(
        host.contains("dev isthtun proto static scope link") && host.contains("mtu 1420"),
        "{host}"
    );
    assert!(rig.state.path().join("routing-journal.json").exists());

    // flannel (or anyone) puts the underlay address back: the next pass re-asserts.
    ns.bridge(&format!(
        "fdb replace {REMOTE_MAC} dev flannel.1 dst 10.0.0.11 self permanent"
    ));
    let o = rig.runtime.block_on(router.reconcile()).unwrap();
    assert_eq!(o.reasserted.len(), 1);
    assert_eq!(ns.fdb_dst(), "100.96.0.3");

    let o = rig.runtime.block_on(router.restore()).unwrap();
    assert_eq!(o.changed, 3);
    assert_eq!(
        ns.dump(),
        before,
        "restore leaves the node exactly as before"
    );
    assert!(!rig.state.path().join("routing-journal.json").exists());
    let again = rig.runtime.block_on(router.restore()).unwrap();
    assert_eq!(again.changed, 0, "a second restore is a no-op");
}

#[test]
fn cleanup_after_a_crash_leaves_what_flannel_changed_meanwhile() {
    let ns = node();
    let rig = Rig::new(&ns);
    let before = ns.dump();
    {
        let mut router = rig.router();
        router.set_desired(rig.plan(Mode::Vxlan));
        rig.runtime.block_on(router.reconcile()).unwrap();
        // Dropped without restoring: what a SIGKILL leaves.
    }
    // Meanwhile flannel rewrites the route as it wants it (a different MTU-less route).
    ns.ip("route replace 10.244.21.0/24 via 10.244.21.0 dev flannel.1 onlink proto boot");
    let mut fresh = rig.router();
    assert_eq!(fresh.journal().len(), 3);
    let o = rig.runtime.block_on(fresh.restore()).unwrap();
    assert_eq!(
        o.changed, 2,
        "only the FDB entry and the host route were still ours"
    );
    assert_eq!(ns.fdb_dst(), "10.0.0.11");
    assert_eq!(ns.dump(), before);
    assert_eq!(rig.runtime.block_on(fresh.restore()).unwrap().changed, 0);
}

#[test]
fn routed_mode_adds_a_rule_and_table_and_removes_them() {
    let ns = node();
    let rig = Rig::new(&ns);
    let before = ns.dump();
    let mut router = rig.router();
    router.set_desired(rig.plan(Mode::Routed));
    let o = rig.runtime.block_on(router.reconcile()).unwrap();
    assert_eq!((o.changed, o.failed), (3, 0));
    let rules = ns.ip("rule show");
    assert!(rules.contains("5210:\tfrom all lookup 51820"), "{rules}");
    let table = ns.ip("route show table 51820");
    // "linkdown": nothing reads this TUN, so it has no carrier.
    assert!(
        table.contains("10.244.21.0/24 dev isthtun proto static scope link")
            && table.contains("mtu 1420"),
        "{table}"
    );
    assert_eq!(ns.fdb_dst(), "10.0.0.11", "flannel's entries are untouched");
    let got = ns.ip("route get 10.244.21.5");
    assert!(got.contains("dev isthtun"), "{got}");

    // Someone deletes the rule: it comes back.
    ns.ip("rule del pref 5210");
    let o = rig.runtime.block_on(router.reconcile()).unwrap();
    assert_eq!(o.reasserted.len(), 1);

    let o = rig.runtime.block_on(router.restore()).unwrap();
    assert_eq!(o.changed, 3, "rule and routes removed: {o:?}");
    assert_eq!(ns.dump(), before);
}

/// Dual stack in both modes against the real kernel: what was written reads back as
/// written (a second pass changes nothing: IPv6 routes carry the kernel's metric 1024 and
/// universe scope, and a plan that did not expect them re-asserted them forever), and
/// restoring leaves the node exactly as before.
#[test]
fn dual_stack_entries_read_back_as_written_and_restore_exactly() {
    for mode in [Mode::Vxlan, Mode::Routed] {
        let ns = dual_node();
        let rig = Rig::new(&ns);
        let before = ns.dump();
        let mut router = rig.router();
        router.set_desired(rig.plan_for(mode, dual_remote()));
        let o = rig.runtime.block_on(router.reconcile()).unwrap();
        assert_eq!(o.failed, 0, "{mode:?}: {o:?}");
        assert!(o.changed > 0, "{mode:?}: {o:?}");
        let again = rig.runtime.block_on(router.reconcile()).unwrap();
        assert_eq!(
            (again.changed, again.reasserted.len()),
            (0, 0),
            "{mode:?}: the second pass found its own entries changed: {again:?}"
        );
        let host6 = ns.ip("-6 route show table all fd96::3/128");
        assert!(
            host6.contains("dev isthtun") && host6.contains("mtu 1420"),
            "{mode:?}: {host6}"
        );
        match mode {
            Mode::Vxlan => {
                assert_eq!(ns.fdb_dst_on("flannel-v6.1", REMOTE_MAC6), "fd96::3");
                assert_eq!(ns.fdb_dst(), "100.96.0.3");
                let route = ns.ip("-6 route show fd00:244:15::/64");
                assert!(
                    route.contains("via fd00:244:15:: dev flannel-v6.1")
                        && route.contains("mtu 1350"),
                    "{route}"
                );
            }
            Mode::Routed => {
                assert_eq!(ns.fdb_dst_on("flannel-v6.1", REMOTE_MAC6), "2001:db8::15");
                let got = ns.ip("-6 route get fd00:244:15::5");
                assert!(got.contains("dev isthtun"), "{got}");
            }
        }
        let o = rig.runtime.block_on(router.restore()).unwrap();
        assert_eq!(o.failed, 0, "{mode:?}: {o:?}");
        assert_eq!(
            ns.dump(),
            before,
            "{mode:?}: restore leaves the node as before"
        );
    }
}
