//! Two hosts joined by one underlay link, each running a WireGuard implementation that the
//! real `wg` configures as the other's peer.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use crate::daemon::{wait_until, Daemon};
use crate::netns::{veth, Netns};
use crate::wg::{self, Dump, KeyPair};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Isthmus,
    /// isthmus with `ISTHMUS_TUN_OFFLOAD=0`: one packet per TUN read and write, no GSO
    /// split or GRO coalescing (the fallback for kernels that refuse offloads).
    IsthmusNoOffload,
    /// isthmus with `ISTHMUS_CRYPTO_WORKERS=3`: sealing and opening on the worker pool
    /// (the calling thread and two pool threads), which the default leaves off on two cores.
    IsthmusWorkers,
    /// isthmus with `ISTHMUS_TUN_TUNNEL_GSO=0`: a VXLAN device routed into its TUN hands
    /// over one datagram per read (as before kernel 6.17), not 64 KiB super-packets.
    IsthmusNoTunnelGso,
    /// isthmus in a namespace whose kernel drops IPv6 packets with unknown destination
    /// options (`net.ipv6.max_dst_opts_number = -8`): where the receiver's tunnel writes
    /// of IPv6 VXLAN would vanish, so it must not make them.
    IsthmusNoUnknownIpv6Options,
    /// The current wireguard-go (see `wireguard_go_binary`).
    WireguardGo,
    /// Debian's packaged wireguard-go.
    WireguardGoDebian,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underlay {
    V4,
    V6,
}

/// Host `n` (1 or 2) has underlay 10.250.0.n / fd00:250::n and tunnel addresses
/// 10.251.0.n / fd00:251::n. Each pair lives in its own namespaces, so pairs never clash.
pub struct Host {
    // Declared first so it is dropped first: the daemon stops before its namespace goes.
    pub daemon: Daemon,
    pub ns: Netns,
    pub kind: Impl,
    pub n: u8,
    pub iface: String,
    pub underlay_if: String,
    pub keys: KeyPair,
    pub port: u16,
    pub key_file: String,
}

impl Host {
    pub fn inner_v4(&self) -> IpAddr {
        format!("10.251.0.{}", self.n)
            .parse()
            .expect("literal address")
    }

    pub fn inner_v6(&self) -> IpAddr {
        format!("fd00:251::{}", self.n)
            .parse()
            .expect("literal address")
    }

    pub fn underlay(&self, family: Underlay) -> IpAddr {
        match family {
            Underlay::V4 => format!("10.250.0.{}", self.n),
            Underlay::V6 => format!("fd00:250::{}", self.n),
        }
        .parse()
        .expect("literal address")
    }

    pub fn endpoint(&self, family: Underlay) -> String {
        match self.underlay(family) {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        }
    }

    pub fn wg(&self, args: &[&str]) -> anyhow::Result<String> {
        wg::wg(&self.ns, args)
    }

    pub fn dump(&self) -> anyhow::Result<Dump> {
        wg::dump(&self.ns, &self.iface)
    }

    pub fn socket_path(&self) -> String {
        format!("/var/run/wireguard/{}.sock", self.iface)
    }

    /// Host `n` of implementation `kind` in a new namespace `<name>-<n>`, keyed and
    /// listening, with no underlay link yet (a [`Pair`] adds one; a test with more hosts
    /// wires its own).
    pub fn start(kind: Impl, n: u8, name: &str, dir: &Path) -> anyhow::Result<Host> {
        let ns = Netns::new(&format!("{name}-{n}"))?;
        if kind == Impl::IsthmusNoUnknownIpv6Options {
            ns.exec("sysctl", &["-qw", "net.ipv6.max_dst_opts_number=-8"])?;
        }
        let iface = format!("{name}w{n}");
        let log = dir.join(format!("daemon-{n}.log"));
        let port = 51819 + u16::from(n);
        let daemon = match kind {
            Impl::Isthmus
            | Impl::IsthmusNoOffload
            | Impl::IsthmusWorkers
            | Impl::IsthmusNoTunnelGso
            | Impl::IsthmusNoUnknownIpv6Options => Daemon::spawn(
                &ns.name,
                &crate::agent_binary(),
                &[
                    "tunnel",
                    "--iface",
                    &iface,
                    "--listen-port",
                    &port.to_string(),
                    // The port of the VXLAN devices tests lay over the tunnel (flannel's).
                    "--vxlan-port",
                    "8472",
                ],
                &[
                    ("RUST_LOG", "info"),
                    (
                        "ISTHMUS_TUN_OFFLOAD",
                        if kind == Impl::IsthmusNoOffload {
                            "0"
                        } else {
                            "1"
                        },
                    ),
                    (
                        "ISTHMUS_TUN_TUNNEL_GSO",
                        if kind == Impl::IsthmusNoTunnelGso {
                            "0"
                        } else {
                            "1"
                        },
                    ),
                    (
                        "ISTHMUS_CRYPTO_WORKERS",
                        if kind == Impl::IsthmusWorkers {
                            "3"
                        } else {
                            "0"
                        },
                    ),
                ],
                log,
            )?,
            Impl::WireguardGo | Impl::WireguardGoDebian => Daemon::spawn(
                &ns.name,
                &if kind == Impl::WireguardGo {
                    crate::wireguard_go_binary()
                } else {
                    crate::DEBIAN_WIREGUARD_GO.into()
                },
                &["-f", &iface],
                &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "verbose")],
                log,
            )?,
        };
        let keys = KeyPair::generate()?;
        let key_file = dir.join(format!("host{n}.key"));
        std::fs::write(&key_file, &keys.private)?;
        let host = Host {
            daemon,
            ns,
            kind,
            n,
            iface,
            underlay_if: String::new(),
            keys,
            port,
            key_file: key_file.display().to_string(),
        };
        let sock = host.socket_path();
        if !wait_until(Duration::from_secs(5), || Path::new(&sock).exists()) {
            bail!("{kind:?} never opened {sock}; log:\n{}", host.daemon.log());
        }
        host.wg(&[
            "set",
            &host.iface,
            "listen-port",
            &port.to_string(),
            "private-key",
            &host.key_file,
        ])?;
        Ok(host)
    }

    /// Tunnel addresses on the interface, and the interface up.
    pub fn address(&self) -> anyhow::Result<()> {
        let v4 = format!("{}/24", self.inner_v4());
        let v6 = format!("{}/64", self.inner_v6());
        self.ns.ip(&["addr", "add", &v4, "dev", &self.iface])?;
        self.ns
            .ip(&["addr", "add", &v6, "dev", &self.iface, "nodad"])?;
        self.ns.ip(&["link", "set", &self.iface, "up"])?;
        Ok(())
    }
}

pub struct Pair {
    pub a: Host,
    pub b: Host,
    pub underlay: Underlay,
    pub dir: TempDir,
}

impl Pair {
    /// Both hosts running, addressed and keyed, but not yet each other's peers.
    pub fn unconnected(a: Impl, b: Impl, underlay: Underlay) -> anyhow::Result<Pair> {
        crate::require_root();
        let dir = tempfile::Builder::new().prefix("isthmus-e2e").tempdir()?;
        let name = crate::unique_name();
        let mut ha = Host::start(a, 1, &name, dir.path()).context("host 1")?;
        let mut hb = Host::start(b, 2, &name, dir.path()).context("host 2")?;
        let (ea, eb) = veth(&ha.ns, &hb.ns, &format!("{name}v"))?;
        for (h, dev) in [(&mut ha, ea), (&mut hb, eb)] {
            let v4 = format!("{}/24", h.underlay(Underlay::V4));
            let v6 = format!("{}/64", h.underlay(Underlay::V6));
            h.ns.ip(&["addr", "add", &v4, "dev", &dev])?;
            h.ns.ip(&["addr", "add", &v6, "dev", &dev, "nodad"])?;
            h.underlay_if = dev;
            h.address()?;
        }
        Ok(Pair {
            a: ha,
            b: hb,
            underlay,
            dir,
        })
    }

    /// Both hosts running and configured as each other's peer with endpoints on `underlay`.
    pub fn new(a: Impl, b: Impl, underlay: Underlay) -> anyhow::Result<Pair> {
        let pair = Pair::unconnected(a, b, underlay)?;
        pair.add_peer(&pair.a, &pair.b, &[])?;
        pair.add_peer(&pair.b, &pair.a, &[])?;
        Ok(pair)
    }

    /// Makes `other` a peer of `host` (its tunnel addresses as allowed IPs, its underlay
    /// endpoint), with `extra` arguments appended to the peer section.
    pub fn add_peer(&self, host: &Host, other: &Host, extra: &[&str]) -> anyhow::Result<()> {
        let allowed = format!("{}/32,{}/128", other.inner_v4(), other.inner_v6());
        let endpoint = other.endpoint(self.underlay);
        let mut args = vec![
            "set",
            host.iface.as_str(),
            "peer",
            other.keys.public.as_str(),
            "allowed-ips",
            &allowed,
            "endpoint",
            &endpoint,
        ];
        args.extend_from_slice(extra);
        host.wg(&args)?;
        Ok(())
    }

    pub fn logs(&self) -> String {
        format!(
            "--- host 1 ({:?}) ---\n{}\n--- host 2 ({:?}) ---\n{}",
            self.a.kind,
            self.a.daemon.log(),
            self.b.kind,
            self.b.daemon.log()
        )
    }
}
