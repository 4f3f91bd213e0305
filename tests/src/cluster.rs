//! Two clouds, a real API server, a coordinator and one agent per node: the migration's
//! starting point. Both clouds use the same node subnet (10.0.0.0/24, node IPs overlap);
//! each reaches the other only through its gateway namespace, which NATs the nodes' WireGuard
//! port to a public address (static SNAT/DNAT per node, 203.0.113.0/24, which exists only
//! inside these namespaces).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use isthmus_api::WireGuardPeer;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use crate::daemon::{eventually, wait_until, Daemon};
use crate::kube::KubeRig;
use crate::netns::{veth, Netns};
use crate::wg::{dump, Dump};

pub struct Cloud {
    pub location: &'static str,
    /// 1 or 2: the public address is 203.0.113.<n>.
    pub n: u8,
    pub gateway: Netns,
}

pub struct NodeHandle {
    // Dropped first: the agent stops before its namespace goes.
    pub agent: Option<Daemon>,
    pub ns: Netns,
    pub name: String,
    pub iface: String,
    pub cloud: usize,
    /// Host part in the cloud's subnet and NAT port offset.
    pub slot: u8,
    /// Underlay address on eth0 (10.0.0.(10+slot)): the same in both clouds for a slot.
    pub node_ip: Ipv4Addr,
    /// Network address of the node's /24 pod CIDR (the Node's `spec.podCIDRs[0]`).
    pub pod_subnet: Ipv4Addr,
    /// With [`ClusterOptions::ipv6`]: the node's IPv6 underlay address (its Node's only
    /// InternalIP), and the network address of its IPv6 pod CIDR, a /64
    /// (`spec.podCIDRs[1]`).
    pub ipv6: Option<(Ipv6Addr, Ipv6Addr)>,
    /// This node's public WireGuard endpoint (its gateway's NAT), what `--endpoint` gets.
    pub endpoint: String,
    pub kubeconfig: PathBuf,
    pub state_dir: PathBuf,
}

impl NodeHandle {
    pub fn dump(&self) -> anyhow::Result<Dump> {
        dump(&self.ns, &self.iface)
    }

    /// The row for `peer` (a node name) in `isthmus-agent peers --json` on this node, as an
    /// operator reads it (`latestHandshake`, `pathMTU`, …); `None` if absent or unreadable.
    pub fn agent_peer_row(&self, peer: &str) -> Option<serde_json::Value> {
        let out = crate::netns::run(
            &crate::agent_binary().display().to_string(),
            &[
                "peers",
                "--iface",
                &self.iface,
                "--kubeconfig",
                &self.kubeconfig.display().to_string(),
                "--state-dir",
                &self.state_dir.display().to_string(),
                "--json",
            ],
        )
        .ok()?;
        let doc: serde_json::Value = serde_json::from_str(&out).ok()?;
        doc["peers"]
            .as_array()?
            .iter()
            .find(|p| p["node"] == peer)
            .cloned()
    }

    /// The pod CIDR as written in the Node object, e.g. `10.244.11.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("{}/24", self.pod_subnet)
    }
}

/// How the clouds' networks are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterOptions {
    /// MTU of every underlay link: the gateways' public veth, each cloud's `lan` bridge and
    /// both ends of every node's eth0 veth. Clouds differ here in practice (1500 on most,
    /// 1400 or less behind some VPNs and overlays), and the overlay MTU derives from it.
    pub underlay_mtu: u32,
    /// Dual-stack nodes on an IPv6 underlay: each cloud's LAN also has a routed IPv6 prefix
    /// (2001:db8:<n>::/64, the clouds' gateways route them to each other), a node's Node
    /// lists only its IPv6 address as InternalIP, its pod CIDRs are an IPv4 /24 and an IPv6
    /// /64 (fd00:244:<n*10+slot>::/64), and its agent gets no `--endpoint`, so it
    /// advertises `[InternalIP]:51820`. There is no IPv4 NAT between the clouds: they
    /// reach each other only over IPv6.
    pub ipv6: bool,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            underlay_mtu: 1500,
            ipv6: false,
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<NodeHandle>,
    pub coordinators: Vec<Daemon>,
    pub clouds: Vec<Cloud>,
    pub rig: KubeRig,
    pub tag: String,
    pub options: ClusterOptions,
    coordinator_kubeconfig: PathBuf,
}

impl Cluster {
    /// The API server and the two clouds' networks (MTU 1500); no nodes or coordinator yet.
    pub async fn new() -> anyhow::Result<Cluster> {
        Cluster::with_options(ClusterOptions::default()).await
    }

    /// [`Cluster::new`] with the underlay built as `options` say.
    pub async fn with_options(options: ClusterOptions) -> anyhow::Result<Cluster> {
        crate::require_root();
        let rig = KubeRig::start().await?;
        let tag = crate::unique_name();
        let clouds = make_clouds(&tag, options.underlay_mtu)?;
        if options.ipv6 {
            route_ipv6_between(&tag, &clouds)?;
        }
        let coordinator_kubeconfig =
            rig.kubeconfig("coordinator", &rig.coordinator_token().await?)?;
        Ok(Cluster {
            nodes: Vec::new(),
            coordinators: Vec::new(),
            clouds,
            rig,
            tag,
            options,
            coordinator_kubeconfig,
        })
    }

    /// The node named `name` (`vsphere-1`, `aws-2`: its location and slot, as its Node and
    /// its WireGuardPeer are named). Tests say which node they mean by name: an index
    /// depends on the order nodes were added in, which differs from test to test.
    pub fn node(&self, name: &str) -> &NodeHandle {
        &self.nodes[self.index_of(name)]
    }

    /// [`Cluster::node`], to change it (stop its agent, say).
    pub fn node_mut(&mut self, name: &str) -> &mut NodeHandle {
        let i = self.index_of(name);
        &mut self.nodes[i]
    }

    /// Where the node named `name` is in [`Cluster::nodes`], for the helpers that take an
    /// index. Panics, listing the nodes there are, when there is none by that name.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                panic!("no node {name} in the cluster; there are {names:?}")
            })
    }

    /// Public endpoint of a node: its gateway's address, port 51800 + slot.
    pub fn endpoint(&self, cloud: usize, slot: u8) -> String {
        format!(
            "203.0.113.{}:{}",
            self.clouds[cloud].n,
            51800 + u16::from(slot)
        )
    }

    /// Adds a node to `cloud` (a namespace on the cloud's LAN, NATed; a Node object) and
    /// starts its agent.
    pub async fn add_node(&mut self, cloud: usize, slot: u8) -> anyhow::Result<usize> {
        let i = self.add_node_idle(cloud, slot).await?;
        self.start_node_agent(i, &[])?;
        Ok(i)
    }

    /// Adds a node as [`Cluster::add_node`] does but leaves its agent stopped, so a test can
    /// build what the agent will find (an overlay, say) before it starts. Returns its index.
    pub async fn add_node_idle(&mut self, cloud: usize, slot: u8) -> anyhow::Result<usize> {
        let c = &self.clouds[cloud];
        let name = format!("{}-{slot}", c.location);
        let ns = Netns::new(&format!("{}-{}{slot}", self.tag, c.n))?;
        let lan_end = format!("{}l{}{slot}", self.tag, c.n);
        let (node_ip, ipv6) = if self.options.ipv6 {
            let node_ip = wire_lan(c, &ns, &lan_end, slot, self.options.underlay_mtu)?;
            (node_ip, Some(wire_ipv6(c, &ns, slot)?))
        } else {
            let node_ip = wire_node(c, &ns, &lan_end, slot, self.options.underlay_mtu)?;
            (node_ip, None)
        };

        let admin = self.rig.admin().await?;
        let nodes: Api<Node> = Api::all(admin);
        let pod_subnet = pod_subnet(c.n, slot)?;
        let mut pod_cidrs = vec![format!("{pod_subnet}/24")];
        let mut internal_ip = node_ip.to_string();
        if let Some((ip6, pod6)) = ipv6 {
            pod_cidrs.push(format!("{pod6}/64"));
            internal_ip = ip6.to_string();
        }
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": c.location}},
            "spec": {"podCIDRs": pod_cidrs},
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .context("creating Node")?;
        nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "status": {"addresses": [{"type": "InternalIP", "address": internal_ip}]}
                })),
            )
            .await
            .context("Node status")?;
        let token = self.rig.agent_token(&name).await?;
        let kubeconfig = self.rig.kubeconfig(&format!("agent-{name}"), &token)?;
        let state_dir = self.rig.dir.path().join(format!("state-{name}"));
        let handle = NodeHandle {
            agent: None,
            ns,
            iface: format!("{}m{}{slot}", self.tag, c.n),
            name,
            cloud,
            slot,
            node_ip,
            pod_subnet,
            endpoint: match ipv6 {
                Some((ip6, _)) => format!("[{ip6}]:51820"),
                None => self.endpoint(cloud, slot),
            },
            ipv6,
            kubeconfig,
            state_dir,
        };
        self.nodes.push(handle);
        Ok(self.nodes.len() - 1)
    }

    /// Starts (or restarts) node `i`'s agent with the usual arguments plus `extra_args`
    /// appended (e.g. `["--mode", "routed"]`), and waits for its UAPI socket.
    pub fn start_node_agent(&mut self, i: usize, extra_args: &[&str]) -> anyhow::Result<()> {
        let logs = self.rig.dir.path().to_path_buf();
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no node {i}"))?;
        // On the IPv6 underlay the agent finds its endpoint itself, from the Node.
        let endpoint = match node.ipv6 {
            Some(_) => String::new(),
            None => node.endpoint.clone(),
        };
        start_agent_with(node, &endpoint, &logs, extra_args)
    }

    pub fn start_coordinator(&mut self, identity: &str) -> anyhow::Result<()> {
        self.start_coordinator_with(identity, &[])
    }

    /// [`Cluster::start_coordinator`] with more arguments. Without `--metrics-addr` among
    /// them the metrics endpoint is off (replicas in one namespace would fight for 9581).
    pub fn start_coordinator_with(
        &mut self,
        identity: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<()> {
        self.start_coordinator_logging(identity, extra_args, "info")
    }

    /// [`Cluster::start_coordinator_with`] logging as `rust_log` says (`RUST_LOG`), e.g.
    /// `info,isthmus_coordinator=debug` to see writes refused with a conflict.
    pub fn start_coordinator_logging(
        &mut self,
        identity: &str,
        extra_args: &[&str],
        rust_log: &str,
    ) -> anyhow::Result<()> {
        let kubeconfig = self.coordinator_kubeconfig.display().to_string();
        let mut args = vec![
            "run",
            "--kubeconfig",
            &kubeconfig,
            "--mesh-cidr",
            "100.96.0.0/24",
            "--identity",
            identity,
            "--lease-seconds",
            "4",
        ];
        args.extend_from_slice(extra_args);
        if !extra_args.contains(&"--metrics-addr") {
            args.extend_from_slice(&["--metrics-addr", "off"]);
        }
        let d = Daemon::spawn_host(
            &crate::workspace_bin("isthmus-coordinator"),
            &args,
            &[("RUST_LOG", rust_log)],
            self.rig
                .dir
                .path()
                .join(format!("coordinator-{identity}.log")),
        )?;
        self.coordinators.push(d);
        Ok(())
    }

    pub async fn peers(&self) -> anyhow::Result<Vec<WireGuardPeer>> {
        let api: Api<WireGuardPeer> = Api::all(self.rig.admin().await?);
        Ok(api.list(&Default::default()).await?.items)
    }

    /// Mesh IP of every admitted peer, by name.
    pub async fn mesh_ips(&self) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(self
            .peers()
            .await?
            .iter()
            .filter(|p| p.is_admitted())
            .filter_map(|p| Some((p.name_any(), p.status.as_ref()?.mesh_ip.clone()?)))
            .collect())
    }

    /// The public keys node `i` should have as peers: admitted nodes in the other cloud.
    pub async fn expected_peers(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let me = &self.nodes[i];
        let mut keys: Vec<String> = self
            .peers()
            .await?
            .iter()
            .filter(|p| p.is_admitted() && p.name_any() != me.name)
            .filter(|p| p.spec.location != self.clouds[me.cloud].location)
            .map(|p| p.spec.public_key.clone())
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Whether every node has exactly its expected peers, each with a completed handshake.
    pub async fn converged(&self) -> bool {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.agent.is_none() {
                continue;
            }
            let (Ok(want), Ok(have)) = (self.expected_peers(i).await, node.dump()) else {
                return false;
            };
            let mut keys: Vec<String> = have.peers.iter().map(|p| p.public_key.clone()).collect();
            keys.sort();
            if want.is_empty() || keys != want || have.peers.iter().any(|p| p.latest_handshake == 0)
            {
                return false;
            }
        }
        true
    }

    pub async fn wait_converged(&self, timeout: Duration) -> bool {
        eventually(timeout, || self.converged()).await
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.coordinators.iter().enumerate() {
            out.push_str(&format!("--- coordinator {i} ---\n{}\n", c.log()));
        }
        for n in &self.nodes {
            if let Some(a) = &n.agent {
                out.push_str(&format!("--- agent {} ---\n{}\n", n.name, a.log()));
            }
        }
        out
    }

    /// Every node's [`snapshot`](crate::snapshot::snapshot), in node order: what
    /// [`Cluster::assert_restored`] compares against.
    pub fn snapshots(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| crate::snapshot::snapshot(&n.ns).expect("snapshot"))
            .collect()
    }

    /// Asserts every node is as `before` ([`Cluster::snapshots`]) says, naming `when` and
    /// showing the differences and `logs` when one is not.
    pub fn assert_restored(&self, before: &[String], when: &str, logs: &str) {
        for (n, before) in self.nodes.iter().zip(before) {
            let after = crate::snapshot::snapshot(&n.ns).expect("snapshot");
            assert!(
                &after == before,
                "{when}: {} is not as it was before the agent:\n{}\n{logs}",
                n.name,
                crate::snapshot::diff_text(before, &after)
            );
        }
    }
}

/// The two clouds' gateways, vsphere (1) and aws (2): each with a `lan` bridge
/// (10.0.0.1/24) for its nodes, forwarding on, and a public link between them
/// (203.0.113.1 and .2), all with MTU `mtu`.
pub fn make_clouds(tag: &str, mtu: u32) -> anyhow::Result<Vec<Cloud>> {
    let mtu = mtu.to_string();
    let mut clouds = Vec::new();
    for (n, location) in [(1u8, "vsphere"), (2u8, "aws")] {
        let gateway = Netns::new(&format!("{tag}-g{n}"))?;
        let g = |args: &[&str]| gateway.ip(args);
        // Set explicitly: a bridge otherwise follows its ports' MTU, and has none yet.
        g(&["link", "add", "lan", "mtu", &mtu, "type", "bridge"])?;
        g(&["addr", "add", "10.0.0.1/24", "dev", "lan"])?;
        g(&["link", "set", "lan", "up"])?;
        gateway.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        clouds.push(Cloud {
            location,
            n,
            gateway,
        });
    }
    let (pa, pb) = veth(&clouds[0].gateway, &clouds[1].gateway, &format!("{tag}p"))?;
    clouds[0].gateway.ip(&["link", "set", &pa, "mtu", &mtu])?;
    clouds[1].gateway.ip(&["link", "set", &pb, "mtu", &mtu])?;
    clouds[0]
        .gateway
        .ip(&["addr", "add", "203.0.113.1/24", "dev", &pa])?;
    clouds[1]
        .gateway
        .ip(&["addr", "add", "203.0.113.2/24", "dev", &pb])?;
    Ok(clouds)
}

/// Puts node namespace `ns` on `cloud`'s LAN as host `slot`: `eth0` with 10.0.0.(10+slot)
/// (the same address in both clouds), a default route via the gateway, and the gateway's
/// static NAT of the node's WireGuard port 51820 to its public endpoint
/// (203.0.113.<n>:51800+slot). Returns the node IP.
pub fn wire_node(
    cloud: &Cloud,
    ns: &Netns,
    lan_end: &str,
    slot: u8,
    mtu: u32,
) -> anyhow::Result<Ipv4Addr> {
    let node_ip = wire_lan(cloud, ns, lan_end, slot, mtu)?;
    let c = cloud;
    let public = format!("203.0.113.{}", c.n);
    let port = (51800 + u16::from(slot)).to_string();
    c.gateway.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "-d",
            &public,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{node_ip}:51820"),
        ],
    )?;
    c.gateway.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-p",
            "udp",
            "-s",
            &node_ip.to_string(),
            "--sport",
            "51820",
            "-j",
            "SNAT",
            "--to-source",
            &format!("{public}:{port}"),
        ],
    )?;
    Ok(node_ip)
}

/// [`wire_node`] without the NAT: the node on its cloud's LAN with its IPv4 address and
/// default route, reachable from its own cloud only.
pub fn wire_lan(
    cloud: &Cloud,
    ns: &Netns,
    lan_end: &str,
    slot: u8,
    mtu: u32,
) -> anyhow::Result<Ipv4Addr> {
    let c = cloud;
    let mtu = mtu.to_string();
    let node_end = "eth0";
    crate::netns::ip(&[
        "link",
        "add",
        lan_end,
        "mtu",
        &mtu,
        "netns",
        &c.gateway.name,
        "type",
        "veth",
        "peer",
        "name",
        node_end,
        "mtu",
        &mtu,
        "netns",
        &ns.name,
    ])?;
    c.gateway
        .ip(&["link", "set", lan_end, "master", "lan", "up"])?;
    let host = slot
        .checked_add(10)
        .filter(|h| *h < 255)
        .with_context(|| format!("slot {slot} has no address in 10.0.0.0/24"))?;
    let node_ip = Ipv4Addr::new(10, 0, 0, host);
    ns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
    Ok(node_ip)
}

/// The clouds' IPv6: each gateway's `lan` gets 2001:db8:<n>::1/64, the public link
/// 2001:db8:ff::<n>/64, and a route to the other cloud's prefix over it. Routed, no NAT:
/// every node address is unique and reachable from the other cloud. Each gateway's
/// firewall drops VXLAN (UDP 8472) between the clouds, as a cloud's security group passes
/// the tunnel's port and not the overlay's: flannel's IPv6 VXLAN, pointed at the other
/// cloud's node addresses, does not cross by itself.
fn route_ipv6_between(tag: &str, clouds: &[Cloud]) -> anyhow::Result<()> {
    for c in clouds {
        let g = &c.gateway;
        g.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        g.exec(
            "ip6tables",
            &[
                "-w", "-A", "FORWARD", "-p", "udp", "--dport", "8472", "-j", "DROP",
            ],
        )?;
        g.ip(&[
            "addr",
            "add",
            &format!("2001:db8:{}::1/64", c.n),
            "dev",
            "lan",
            "nodad",
        ])?;
        // The public link's ends, as make_clouds named them.
        let dev = format!("{tag}p{}", if c.n == 1 { "a" } else { "b" });
        g.ip(&[
            "addr",
            "add",
            &format!("2001:db8:ff::{}/64", c.n),
            "dev",
            &dev,
            "nodad",
        ])?;
        for other in clouds.iter().filter(|o| o.n != c.n) {
            g.ip(&[
                "-6",
                "route",
                "add",
                &format!("2001:db8:{}::/64", other.n),
                "via",
                &format!("2001:db8:ff::{}", other.n),
            ])?;
        }
    }
    Ok(())
}

/// A node's IPv6 on its cloud's LAN: 2001:db8:<n>::<10+slot>/64 on eth0 and the default
/// route via the gateway. Returns it with the network address of the node's IPv6 pod CIDR.
fn wire_ipv6(cloud: &Cloud, ns: &Netns, slot: u8) -> anyhow::Result<(Ipv6Addr, Ipv6Addr)> {
    let n = u16::from(cloud.n);
    let host = u16::from(slot) + 10;
    let ip = Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, host);
    ns.ip(&["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"])?;
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("2001:db8:{n}::1"),
    ])?;
    let pod = Ipv6Addr::new(0xfd00, 0x244, n * 10 + u16::from(slot), 0, 0, 0, 0, 0);
    Ok((ip, pod))
}

/// Network address of the pod CIDR of node `slot` in cloud `n`: 10.244.(n*10+slot).0, so
/// pod CIDRs are unique across clouds although node IPs are not.
fn pod_subnet(n: u8, slot: u8) -> anyhow::Result<Ipv4Addr> {
    let third = u8::try_from(u16::from(n) * 10 + u16::from(slot))
        .with_context(|| format!("slot {slot} of cloud {n} has no /24 in 10.244.0.0/16"))?;
    Ok(Ipv4Addr::new(10, 244, third, 0))
}

/// Starts (or restarts) a node's agent.
pub fn start_agent(
    node: &mut NodeHandle,
    endpoint: &str,
    logs: &std::path::Path,
) -> anyhow::Result<()> {
    start_agent_with(node, endpoint, logs, &[])
}

/// [`start_agent`] with `extra_args` appended to the agent's command line.
pub fn start_agent_with(
    node: &mut NodeHandle,
    endpoint: &str,
    logs: &std::path::Path,
    extra_args: &[&str],
) -> anyhow::Result<()> {
    // Stop a running agent first (by its PID, on drop) so the new one can take the socket.
    node.agent = None;
    let netns = format!("/var/run/netns/{}", node.ns.name);
    let state_dir = node.state_dir.display().to_string();
    let kubeconfig = node.kubeconfig.display().to_string();
    let mut args = vec![
        "run",
        "--node-name",
        &node.name,
        "--state-dir",
        &state_dir,
        "--iface",
        &node.iface,
        "--keepalive",
        "5",
        "--kubeconfig",
        &kubeconfig,
        "--netns",
        &netns,
    ];
    if !endpoint.is_empty() {
        args.extend_from_slice(&["--endpoint", endpoint]);
    }
    args.extend_from_slice(extra_args);
    // Agents share the host namespace here: each test that wants metrics picks a port.
    if !extra_args.contains(&"--metrics-addr") {
        args.extend_from_slice(&["--metrics-addr", "off"]);
    }
    let agent = Daemon::spawn_host(
        &crate::agent_binary(),
        &args,
        &[("RUST_LOG", "info")],
        logs.join(format!("agent-{}.log", node.name)),
    )?;
    node.agent = Some(agent);
    let sock = format!("/var/run/wireguard/{}.sock", node.iface);
    if !wait_until(Duration::from_secs(10), || {
        std::path::Path::new(&sock).exists()
    }) {
        anyhow::bail!(
            "agent {} never opened {sock}:\n{}",
            node.name,
            node.agent.as_ref().map(Daemon::log).unwrap_or_default()
        );
    }
    Ok(())
}
