//! From the remote nodes to the kernel entries routing wants: a pure function, tested in a
//! table like Kilo's topology → routes.
//!
//! `vxlan` keeps flannel in charge of the overlay and only moves where its packets go: each
//! remote VTEP's FDB entry points at the node's mesh IP, so the encapsulated packets enter
//! the tunnel. flannel's neighbour entry and route for the node are asserted as flannel
//! writes them, the route with an MTU that fits through the tunnel. `routed` leaves
//! flannel's entries alone: a policy rule sends remote pod CIDRs to a table of our own whose
//! routes lead straight into the TUN.
//!
//! In both modes each remote node's mesh IP gets a host route into the TUN with the path's
//! MTU, so the node's own traffic to it (and, in `vxlan` mode, flannel's encapsulated
//! packets) fits the path, not just the device. The path's MTU is the smallest of this
//! tunnel's, the remote tunnel's and what probing measured ([`Remote::path_mtu`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ip_network::IpNetwork;

use crate::model::{
    EntryKey, Mac, Route, Value, MAIN_TABLE, PROTO_BOOT, PROTO_STATIC, SCOPE_LINK, SCOPE_UNIVERSE,
};
use crate::Mode;

/// What VXLAN adds around an inner Ethernet frame: outer IPv4 (20), UDP (8), VXLAN (8) and
/// the inner Ethernet header (14). flannel sizes `flannel.1` as underlay MTU − 50 likewise.
pub const VXLAN_OVERHEAD: u16 = 50;
/// The same over an IPv6 outer header (40): flannel sizes `flannel-v6.1` as underlay − 70.
pub const VXLAN_OVERHEAD6: u16 = 70;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// `routed`: the table our routes live in.
    pub table: u32,
    /// `routed`: the priority of the rule that looks that table up.
    pub rule_priority: u32,
}

/// The devices the entries hang off, by index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    /// flannel's VXLAN device (`flannel.1`, IPv4), when it exists.
    pub vxlan: Option<u32>,
    /// flannel's IPv6 VXLAN device (`flannel-v6.1`), when it exists (dual stack).
    pub vxlan6: Option<u32>,
    pub tun: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vtep {
    pub mac: Mac,
    pub ip: IpAddr,
}

/// A node in another location that this node has a tunnel to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub name: String,
    pub mesh_ip: IpAddr,
    /// Its IPv6 mesh IP in a dual-stack mesh: where its `flannel-v6.1` VTEP is reached.
    pub mesh_ip6: Option<IpAddr>,
    pub pod_cidrs: Vec<IpNetwork>,
    /// Its `flannel.1` VTEP.
    pub vtep: Option<Vtep>,
    /// Its `flannel-v6.1` VTEP.
    pub vtep6: Option<Vtep>,
    /// The remote tunnel's MTU, when it published one.
    pub mtu: Option<u16>,
    /// The largest packet the path to the remote carries through the tunnel, when measured
    /// (the agent's path MTU discovery).
    pub path_mtu: Option<u16>,
}

impl Remote {
    /// The MTU of the path through the tunnel: the smallest of this node's tunnel MTU, the
    /// remote's and the measured one.
    pub fn path_mtu(&self, tunnel_mtu: u16) -> u16 {
        [Some(tunnel_mtu), self.mtu, self.path_mtu]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(tunnel_mtu)
    }

    /// Its mesh IPs: the one every mesh has, then the IPv6 one of a dual-stack mesh.
    fn mesh_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.mesh_ip).chain(self.mesh_ip6)
    }
}

/// One family's VXLAN path to a remote: flannel's device here, the remote's VTEP on it and
/// the remote's mesh IP of the device's family (a VXLAN device sends over one family).
#[derive(Clone, Copy)]
struct VxlanPath {
    device: u32,
    vtep: Vtep,
    dst: IpAddr,
    v6: bool,
}

/// The VXLAN paths this node can repoint at `remote`'s mesh IPs, per family (IPv4 first).
fn vxlan_paths(devices: Devices, remote: &Remote) -> Vec<VxlanPath> {
    [
        (false, devices.vxlan, remote.vtep),
        (true, devices.vxlan6, remote.vtep6),
    ]
    .into_iter()
    .filter_map(|(v6, device, vtep)| {
        let vtep = vtep.filter(|v| v.ip.is_ipv6() == v6)?;
        let dst = remote.mesh_ips().find(|ip| ip.is_ipv6() == v6)?;
        Some(VxlanPath {
            device: device?,
            vtep,
            dst,
            v6,
        })
    })
    .collect()
}

/// The entries routing wants for `remotes`, given this node's tunnel MTU.
pub fn desired(
    settings: &Settings,
    devices: Devices,
    tunnel_mtu: u16,
    remotes: &[Remote],
) -> BTreeMap<EntryKey, Value> {
    let mut out = BTreeMap::new();
    for remote in remotes {
        let path_mtu = remote.path_mtu(tunnel_mtu);
        let table = match settings.mode {
            Mode::Vxlan => MAIN_TABLE,
            Mode::Routed => settings.table,
        };
        for mesh_ip in remote.mesh_ips() {
            out.insert(
                host_key(table, mesh_ip),
                into_tun(devices.tun, path_mtu, mesh_ip.is_ipv6()),
            );
            if settings.mode == Mode::Routed {
                out.insert(
                    EntryKey::Rule {
                        v6: mesh_ip.is_ipv6(),
                        priority: settings.rule_priority,
                    },
                    Value::Rule {
                        table: settings.table,
                    },
                );
            }
        }
        match settings.mode {
            Mode::Vxlan => {
                let paths = vxlan_paths(devices, remote);
                for path in &paths {
                    vxlan_entries(&mut out, path, path_mtu, remote);
                }
                // A family flannel's VXLAN cannot carry to this remote (no device or VTEP
                // of that family, or no mesh IP to point it at) is routed straight into the
                // tunnel, as in `routed`, so a dual-stack pod reaches the other cloud over
                // both; until some VTEP is known, pods wait for it in both families.
                if !paths.is_empty() {
                    let unserved = remote.pod_cidrs.iter().filter(|c| {
                        let v6 = c.network_address().is_ipv6();
                        !paths.iter().any(|p| p.v6 == v6)
                    });
                    routed_entries(&mut out, settings, devices, path_mtu, unserved);
                }
            }
            Mode::Routed => {
                routed_entries(&mut out, settings, devices, path_mtu, &remote.pod_cidrs)
            }
        }
    }
    out
}

/// flannel's entries for one family of `remote`, its FDB entry pointed at the mesh.
fn vxlan_entries(
    out: &mut BTreeMap<EntryKey, Value>,
    path: &VxlanPath,
    path_mtu: u16,
    remote: &Remote,
) {
    let VxlanPath {
        device,
        vtep,
        dst,
        v6,
    } = *path;
    out.insert(
        EntryKey::Fdb {
            ifindex: device,
            mac: vtep.mac,
        },
        Value::Fdb { dst },
    );
    out.insert(
        EntryKey::Neigh {
            ifindex: device,
            ip: vtep.ip,
        },
        Value::Neigh { mac: vtep.mac },
    );
    let overhead = if v6 { VXLAN_OVERHEAD6 } else { VXLAN_OVERHEAD };
    let inner_mtu = path_mtu.saturating_sub(overhead);
    for cidr in remote
        .pod_cidrs
        .iter()
        .filter(|c| c.network_address().is_ipv6() == v6)
    {
        out.insert(
            route_key(MAIN_TABLE, cidr),
            Value::Route(Route {
                oif: device,
                gateway: Some(vtep.ip),
                onlink: true,
                protocol: PROTO_BOOT,
                scope: SCOPE_UNIVERSE,
                prefsrc: None,
                mtu: Some(u32::from(inner_mtu)),
            }),
        );
    }
}

fn routed_entries<'a>(
    out: &mut BTreeMap<EntryKey, Value>,
    settings: &Settings,
    devices: Devices,
    path_mtu: u16,
    cidrs: impl IntoIterator<Item = &'a IpNetwork>,
) {
    for cidr in cidrs {
        let v6 = !cidr.network_address().is_ipv4();
        out.insert(
            EntryKey::Rule {
                v6,
                priority: settings.rule_priority,
            },
            Value::Rule {
                table: settings.table,
            },
        );
        out.insert(
            route_key(settings.table, cidr),
            into_tun(devices.tun, path_mtu, v6),
        );
    }
}

/// A route straight into the TUN. Link scope for IPv4; IPv6 has no route scopes and the
/// kernel reports every IPv6 route as universe, so that is what we want there (asking for
/// link would read back as someone else's route, and be re-asserted forever).
fn into_tun(tun: u32, path_mtu: u16, v6: bool) -> Value {
    Value::Route(Route {
        oif: tun,
        gateway: None,
        onlink: false,
        protocol: PROTO_STATIC,
        scope: if v6 { SCOPE_UNIVERSE } else { SCOPE_LINK },
        prefsrc: None,
        mtu: Some(u32::from(path_mtu)),
    })
}

/// The host route's key for `ip`.
fn host_key(table: u32, ip: IpAddr) -> EntryKey {
    EntryKey::Route {
        table,
        dst: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    }
}

fn route_key(table: u32, cidr: &IpNetwork) -> EntryKey {
    EntryKey::Route {
        table,
        dst: cidr.network_address(),
        prefix: cidr.netmask(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VXLAN: u32 = 5;
    const VXLAN6: u32 = 6;
    const TUN: u32 = 9;

    fn settings(mode: Mode) -> Settings {
        Settings {
            mode,
            table: 51820,
            rule_priority: 5210,
        }
    }

    fn devices() -> Devices {
        Devices {
            vxlan: Some(VXLAN),
            vxlan6: None,
            tun: TUN,
        }
    }

    fn remote(n: u8, mtu: Option<u16>) -> Remote {
        Remote {
            name: format!("aws-{n}"),
            mesh_ip: format!("100.96.0.{n}").parse().unwrap(),
            mesh_ip6: None,
            pod_cidrs: vec![format!("10.244.2{n}.0/24").parse().unwrap()],
            vtep: Some(Vtep {
                mac: Mac([0x0a, 0x58, 10, 244, 20 + n, 0]),
                ip: format!("10.244.2{n}.0").parse().unwrap(),
            }),
            vtep6: None,
            mtu,
            path_mtu: None,
        }
    }

    /// [`remote`] on a dual-stack node: an IPv6 pod CIDR beside the IPv4 one.
    fn dual(n: u8) -> Remote {
        let mut r = remote(n, None);
        r.pod_cidrs
            .push(format!("fd00:244:2{n}::/64").parse().unwrap());
        r
    }

    /// [`dual`] in a dual-stack mesh: an IPv6 mesh IP and flannel's `flannel-v6.1` VTEP.
    fn dual_mesh(n: u8) -> Remote {
        Remote {
            mesh_ip6: Some(format!("fd96::{n}").parse().unwrap()),
            vtep6: Some(Vtep {
                mac: Mac([0x8e, 0, 0, 0, n, 6]),
                ip: format!("fd00:244:2{n}::").parse().unwrap(),
            }),
            ..dual(n)
        }
    }

    fn both_vxlan() -> Devices {
        Devices {
            vxlan6: Some(VXLAN6),
            ..devices()
        }
    }

    fn render(map: &BTreeMap<EntryKey, Value>) -> Vec<String> {
        map.iter().map(|(k, v)| format!("{k}: {v}")).collect()
    }

    /// Name, settings, devices, remotes, the entries wanted.
    type Case = (
        &'static str,
        Settings,
        Devices,
        Vec<Remote>,
        Vec<&'static str>,
    );

    #[test]
    fn table() {
        let cases: Vec<Case> = vec![
            (
                "vxlan: fdb to the mesh IP, flannel's neigh, route clamped to the tunnel",
                settings(Mode::Vxlan),
                devices(),
                vec![remote(1, None)],
                vec![
                    "fdb 0a:58:0a:f4:15:00 dev #5: dst 100.96.0.1",
                    "neigh 10.244.21.0 dev #5: lladdr 0a:58:0a:f4:15:00",
                    "route 10.244.21.0/24 table 254: via 10.244.21.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                ],
            ),
            (
                "vxlan: a remote with a smaller tunnel clamps the path",
                settings(Mode::Vxlan),
                devices(),
                vec![remote(2, Some(1320))],
                vec![
                    "fdb 0a:58:0a:f4:16:00 dev #5: dst 100.96.0.2",
                    "neigh 10.244.22.0 dev #5: lladdr 0a:58:0a:f4:16:00",
                    "route 10.244.22.0/24 table 254: via 10.244.22.0 dev #5 proto 3 onlink mtu 1270",
                    "route 100.96.0.2/32 table 254: dev #9 proto 4 mtu 1320",
                ],
            ),
            (
                "vxlan: a measured path smaller than both tunnels clamps pods and the host",
                settings(Mode::Vxlan),
                devices(),
                vec![Remote { path_mtu: Some(1240), ..remote(2, Some(1420)) }],
                vec![
                    "fdb 0a:58:0a:f4:16:00 dev #5: dst 100.96.0.2",
                    "neigh 10.244.22.0 dev #5: lladdr 0a:58:0a:f4:16:00",
                    "route 10.244.22.0/24 table 254: via 10.244.22.0 dev #5 proto 3 onlink mtu 1190",
                    "route 100.96.0.2/32 table 254: dev #9 proto 4 mtu 1240",
                ],
            ),
            (
                "vxlan: a measured path never raises the tunnels' bound",
                settings(Mode::Vxlan),
                devices(),
                vec![Remote { path_mtu: Some(1420), ..remote(2, Some(1320)) }],
                vec![
                    "fdb 0a:58:0a:f4:16:00 dev #5: dst 100.96.0.2",
                    "neigh 10.244.22.0 dev #5: lladdr 0a:58:0a:f4:16:00",
                    "route 10.244.22.0/24 table 254: via 10.244.22.0 dev #5 proto 3 onlink mtu 1270",
                    "route 100.96.0.2/32 table 254: dev #9 proto 4 mtu 1320",
                ],
            ),
            (
                "vxlan: no VXLAN device yet, nothing to repoint; the host's route to the mesh IP",
                settings(Mode::Vxlan),
                Devices { vxlan: None, vxlan6: None, tun: TUN },
                vec![remote(1, None)],
                vec!["route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420"],
            ),
            (
                "vxlan: a remote that published no VTEP is skipped",
                settings(Mode::Vxlan),
                devices(),
                vec![Remote { vtep: None, ..remote(1, None) }, remote(3, None)],
                vec![
                    "fdb 0a:58:0a:f4:17:00 dev #5: dst 100.96.0.3",
                    "neigh 10.244.23.0 dev #5: lladdr 0a:58:0a:f4:17:00",
                    "route 10.244.23.0/24 table 254: via 10.244.23.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                    "route 100.96.0.3/32 table 254: dev #9 proto 4 mtu 1420",
                ],
            ),
            (
                "routed: one rule, one route per remote pod CIDR into the TUN",
                settings(Mode::Routed),
                devices(),
                vec![
                    remote(1, None),
                    remote(2, Some(1320)),
                    Remote { path_mtu: Some(1240), ..remote(3, None) },
                ],
                vec![
                    "route 10.244.21.0/24 table 51820: dev #9 proto 4 mtu 1420",
                    "route 10.244.22.0/24 table 51820: dev #9 proto 4 mtu 1320",
                    "route 10.244.23.0/24 table 51820: dev #9 proto 4 mtu 1240",
                    "route 100.96.0.1/32 table 51820: dev #9 proto 4 mtu 1420",
                    "route 100.96.0.2/32 table 51820: dev #9 proto 4 mtu 1320",
                    "route 100.96.0.3/32 table 51820: dev #9 proto 4 mtu 1240",
                    "rule -4 pref 5210: lookup 51820",
                ],
            ),
            (
                "vxlan, dual stack: IPv4 through flannel's VTEP, IPv6 routed into the TUN",
                settings(Mode::Vxlan),
                devices(),
                vec![dual(1)],
                vec![
                    "fdb 0a:58:0a:f4:15:00 dev #5: dst 100.96.0.1",
                    "neigh 10.244.21.0 dev #5: lladdr 0a:58:0a:f4:15:00",
                    "route 10.244.21.0/24 table 254: via 10.244.21.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 51820: dev #9 proto 4 mtu 1420",
                    "rule -6 pref 5210: lookup 51820",
                ],
            ),
            (
                "vxlan, dual stack, no VXLAN device yet: nothing for pods in either family",
                settings(Mode::Vxlan),
                Devices { vxlan: None, vxlan6: None, tun: TUN },
                vec![dual(1)],
                vec!["route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420"],
            ),
            (
                "routed, dual stack: both families into the TUN, a rule for each",
                settings(Mode::Routed),
                devices(),
                vec![dual(1)],
                vec![
                    "route 10.244.21.0/24 table 51820: dev #9 proto 4 mtu 1420",
                    "route 100.96.0.1/32 table 51820: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 51820: dev #9 proto 4 mtu 1420",
                    "rule -4 pref 5210: lookup 51820",
                    "rule -6 pref 5210: lookup 51820",
                ],
            ),
            (
                "vxlan, dual-stack mesh: each family through its flannel device to the mesh IP of that family",
                settings(Mode::Vxlan),
                both_vxlan(),
                vec![dual_mesh(1)],
                vec![
                    "fdb 0a:58:0a:f4:15:00 dev #5: dst 100.96.0.1",
                    "fdb 8e:00:00:00:01:06 dev #6: dst fd96::1",
                    "neigh 10.244.21.0 dev #5: lladdr 0a:58:0a:f4:15:00",
                    "neigh fd00:244:21:: dev #6: lladdr 8e:00:00:00:01:06",
                    "route 10.244.21.0/24 table 254: via 10.244.21.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 254: via fd00:244:21:: dev #6 proto 3 onlink mtu 1350",
                    "route fd96::1/128 table 254: dev #9 proto 4 mtu 1420",
                ],
            ),
            (
                "vxlan, dual-stack mesh, no flannel-v6.1 here: IPv6 pods routed into the TUN",
                settings(Mode::Vxlan),
                devices(),
                vec![dual_mesh(1)],
                vec![
                    "fdb 0a:58:0a:f4:15:00 dev #5: dst 100.96.0.1",
                    "neigh 10.244.21.0 dev #5: lladdr 0a:58:0a:f4:15:00",
                    "route 10.244.21.0/24 table 254: via 10.244.21.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                    "route fd96::1/128 table 254: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 51820: dev #9 proto 4 mtu 1420",
                    "rule -6 pref 5210: lookup 51820",
                ],
            ),
            (
                "vxlan, flannel-v6.1 but no IPv6 mesh IP to point it at: IPv6 pods routed into the TUN",
                settings(Mode::Vxlan),
                both_vxlan(),
                vec![Remote { mesh_ip6: None, ..dual_mesh(1) }],
                vec![
                    "fdb 0a:58:0a:f4:15:00 dev #5: dst 100.96.0.1",
                    "neigh 10.244.21.0 dev #5: lladdr 0a:58:0a:f4:15:00",
                    "route 10.244.21.0/24 table 254: via 10.244.21.0 dev #5 proto 3 onlink mtu 1370",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 51820: dev #9 proto 4 mtu 1420",
                    "rule -6 pref 5210: lookup 51820",
                ],
            ),
            (
                "vxlan, dual-stack mesh, only flannel-v6.1 known: IPv4 pods routed into the TUN",
                settings(Mode::Vxlan),
                Devices { vxlan: None, ..both_vxlan() },
                vec![Remote { path_mtu: Some(1300), ..dual_mesh(1) }],
                vec![
                    "fdb 8e:00:00:00:01:06 dev #6: dst fd96::1",
                    "neigh fd00:244:21:: dev #6: lladdr 8e:00:00:00:01:06",
                    "route 100.96.0.1/32 table 254: dev #9 proto 4 mtu 1300",
                    "route fd00:244:21::/64 table 254: via fd00:244:21:: dev #6 proto 3 onlink mtu 1230",
                    "route fd96::1/128 table 254: dev #9 proto 4 mtu 1300",
                    "route 10.244.21.0/24 table 51820: dev #9 proto 4 mtu 1300",
                    "rule -4 pref 5210: lookup 51820",
                ],
            ),
            (
                "routed, dual-stack mesh: flannel left alone, both mesh IPs into the TUN",
                settings(Mode::Routed),
                both_vxlan(),
                vec![dual_mesh(1)],
                vec![
                    "route 10.244.21.0/24 table 51820: dev #9 proto 4 mtu 1420",
                    "route 100.96.0.1/32 table 51820: dev #9 proto 4 mtu 1420",
                    "route fd00:244:21::/64 table 51820: dev #9 proto 4 mtu 1420",
                    "route fd96::1/128 table 51820: dev #9 proto 4 mtu 1420",
                    "rule -4 pref 5210: lookup 51820",
                    "rule -6 pref 5210: lookup 51820",
                ],
            ),
            (
                "routed: no remotes, no rule",
                settings(Mode::Routed),
                devices(),
                vec![],
                vec![],
            ),
        ];
        for (name, s, d, remotes, want) in cases {
            assert_eq!(render(&desired(&s, d, 1420, &remotes)), want, "{name}");
        }
    }
}
