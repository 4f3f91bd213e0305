//! A flannel VXLAN overlay in the cluster's node namespaces, built the way flannel's `vxlan`
//! backend and the CNI `bridge` plugin build it, so the agent meets what it meets on a real
//! node:
//!
//! - `flannel.1`: VXLAN, VNI 1, UDP 8472, `nolearning`, `local <node IP>`, `dev eth0`, MTU
//!   underlay − 50, address = the pod subnet's network address /32;
//! - `cni0`: a bridge with the pod subnet's `.1`, one pod namespace behind it (`.2`), its
//!   port in hairpin mode (flannel's CNI `hairpinMode: true`);
//! - for every other node, in flannel's order: a permanent ARP entry for its VTEP address,
//!   an FDB entry sending its VTEP MAC to its node IP, and the onlink route to its pod CIDR;
//! - on the Node object, flannel's annotations (`backend-type: vxlan`, `backend-data` with
//!   the VTEP MAC, `public-ip`, `kube-subnet-manager`), which the coordinator checks a
//!   peer's VTEP against;
//! - on a dual-stack node (the cluster's `ipv6`), flannel's IPv6 half beside it, as its
//!   `vxlan` backend builds it with `EnableIPv6`: `flannel-v6.1` (`local` the node's IPv6
//!   underlay address, MTU underlay − 70, address the IPv6 pod subnet's network address
//!   /128), the same three entries per other node (the FDB entry to its `public-ipv6`), and
//!   `backend-v6-data` and `public-ipv6` on the Node.
//!
//! flannel only knows the node IPs of the Node objects (10.0.0.x), and those overlap across
//! the clouds: an FDB entry for a node in the other cloud points at a node of this cloud (or
//! at this node itself), so cross-location pod traffic is lost until the agent repoints the
//! entry at the mesh. That is the migration's problem, reproduced on purpose.
//!
//! MACs are derived from addresses (`0a:58` + IPv4, the CNI convention) so snapshots are
//! stable and a MAC in a log says which node it belongs to.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context};

use crate::cluster::{Cluster, NodeHandle};
use crate::netns::Netns;

/// flannel's VXLAN device name for VNI 1.
pub const VXLAN_DEV: &str = "flannel.1";
/// The CNI bridge flannel's CNI config names.
pub const BRIDGE: &str = "cni0";
/// flannel's default VNI.
pub const VNI: u32 = 1;
/// flannel's default VXLAN port (the Linux kernel's historical one, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// flannel's `encapOverhead`: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const ENCAP_OVERHEAD: u32 = 50;

/// One node's part of the overlay: what flannel publishes about it and its pod.
pub struct OverlayNode {
    /// Index of the node in [`Cluster::nodes`].
    pub node: usize,
    pub name: String,
    pub cloud: usize,
    /// The address flannel knows for the node (its Node's InternalIP), the FDB destination.
    pub node_ip: Ipv4Addr,
    /// Network address of the pod CIDR (a /24).
    pub pod_subnet: Ipv4Addr,
    /// The VTEP: `flannel.1`'s address (the pod subnet's network address) and MAC.
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    /// The one pod on this node.
    pub pod_ip: Ipv4Addr,
    /// The pod's IPv6 address on a dual-stack node (`::2` of the node's IPv6 pod CIDR,
    /// behind `cni0`'s `::1`), as the CNI bridge plugin gives it with a dual-stack IPAM.
    pub pod_ip6: Option<Ipv6Addr>,
    /// MTU of `flannel.1`, `cni0` and the pod's eth0: underlay − [`ENCAP_OVERHEAD`].
    pub mtu: u32,
    pub pod: Netns,
    /// On a dual-stack node: flannel's `flannel-v6.1`.
    pub vtep6: Option<Vtep6>,
}

/// flannel's IPv6 VTEP on a dual-stack node.
#[derive(Clone, Copy, Debug)]
pub struct Vtep6 {
    /// `flannel-v6.1`'s address: the network address of the node's IPv6 pod CIDR (a /64).
    pub ip: Ipv6Addr,
    pub mac: [u8; 6],
    /// The address flannel knows for the node (`public-ipv6`), the FDB destination: its
    /// IPv6 underlay address.
    pub public_ip: Ipv6Addr,
}

impl Vtep6 {
    /// The IPv6 pod CIDR, e.g. `fd00:244:11::/64`.
    pub fn pod_cidr(&self) -> String {
        format!("{}/64", self.ip)
    }
}

impl OverlayNode {
    /// The pod CIDR, e.g. `10.244.11.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("{}/24", self.pod_subnet)
    }

    /// The VTEP MAC as `ip`/`bridge` print it.
    pub fn vtep_mac_str(&self) -> String {
        mac_str(&self.vtep_mac)
    }
}

/// The overlay over some or all of a cluster's nodes. Pod namespaces are removed on drop;
/// everything else lives in the node namespaces and goes with them.
pub struct Overlay {
    tag: String,
    pub nodes: Vec<OverlayNode>,
}

impl Default for Overlay {
    fn default() -> Overlay {
        Overlay::new()
    }
}

impl Overlay {
    /// An overlay over no node yet.
    pub fn new() -> Overlay {
        Overlay {
            tag: crate::unique_name(),
            nodes: Vec::new(),
        }
    }

    /// The overlay over every node the cluster has now.
    pub fn build(cluster: &Cluster) -> anyhow::Result<Overlay> {
        let mut overlay = Overlay::new();
        for i in 0..cluster.nodes.len() {
            overlay.add_node(cluster, i)?;
        }
        Ok(overlay)
    }

    /// Brings node `i` of `cluster` into the overlay as flannel does when a node joins: its
    /// own VTEP, bridge and pod, then entries for every node already in the overlay on the
    /// new node, and for the new node on every one of them.
    pub fn add_node(&mut self, cluster: &Cluster, i: usize) -> anyhow::Result<&OverlayNode> {
        if self.get(i).is_some() {
            bail!("node {i} is in the overlay already");
        }
        let node = cluster
            .nodes
            .get(i)
            .with_context(|| format!("no node {i} in the cluster"))?;
        let mtu = cluster
            .options
            .underlay_mtu
            .checked_sub(ENCAP_OVERHEAD)
            .context("underlay MTU below the VXLAN overhead")?;
        let new = self
            .build_node(node, i, mtu)
            .with_context(|| format!("overlay on {}", node.name))?;
        annotate(cluster, &new)
            .with_context(|| format!("flannel's annotations on {}", node.name))?;
        for other in &self.nodes {
            let other_ns = &cluster.nodes[other.node].ns;
            flannel_add(&node.ns, other)
                .with_context(|| format!("{}: entries for {}", node.name, other.name))?;
            flannel_add(other_ns, &new)
                .with_context(|| format!("{}: entries for {}", other.name, node.name))?;
        }
        self.nodes.push(new);
        let last = self.nodes.len() - 1;
        Ok(&self.nodes[last])
    }

    /// Takes node `i` out as flannel does when a Node's lease goes: every other node deletes
    /// its ARP entry, FDB entry and route; the pod namespace is removed.
    pub fn remove_node(&mut self, cluster: &Cluster, i: usize) -> anyhow::Result<()> {
        let at = self
            .nodes
            .iter()
            .position(|n| n.node == i)
            .with_context(|| format!("node {i} is not in the overlay"))?;
        let gone = self.nodes.remove(at);
        for other in &self.nodes {
            flannel_del(&cluster.nodes[other.node].ns, &gone)
                .with_context(|| format!("{}: removing {}", other.name, gone.name))?;
        }
        Ok(())
    }

    /// Replays, on node `i`, flannel's entries for every other node (what flannel does at
    /// start-up, e.g. after its pod restarts): each FDB entry goes back to the node IP.
    pub fn flannel_resync(&self, cluster: &Cluster, i: usize) -> anyhow::Result<()> {
        let ns = &cluster
            .nodes
            .get(i)
            .with_context(|| format!("no node {i} in the cluster"))?
            .ns;
        for other in self.nodes.iter().filter(|n| n.node != i) {
            flannel_add(ns, other).with_context(|| format!("resync of {}", other.name))?;
        }
        Ok(())
    }

    /// The overlay part of cluster node `i`, if it is in the overlay.
    pub fn get(&self, i: usize) -> Option<&OverlayNode> {
        self.nodes.iter().find(|n| n.node == i)
    }

    /// [`Overlay::get`], as an error when the node is not in the overlay.
    pub fn node(&self, i: usize) -> anyhow::Result<&OverlayNode> {
        self.get(i)
            .with_context(|| format!("node {i} is not in the overlay"))
    }

    /// The overlay part of the node named `name`, as an error when it is not in the overlay.
    pub fn named(&self, name: &str) -> anyhow::Result<&OverlayNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("{name} is not in the overlay"))
    }

    /// VTEP, bridge and pod on one node; no entries for other nodes yet.
    fn build_node(&self, node: &NodeHandle, i: usize, mtu: u32) -> anyhow::Result<OverlayNode> {
        let vtep_ip = node.pod_subnet;
        let vtep_mac = mac_for(vtep_ip);
        let [a, b, c, _] = node.pod_subnet.octets();
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let pod_ip = Ipv4Addr::new(a, b, c, 2);
        let ns = &node.ns;
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        create_vtep(ns, node.node_ip, vtep_ip, &vtep_mac, mtu)?;
        create_bridge(ns, gateway, mtu)?;
        let pod = Netns::new(&format!("{}-pod{i}", self.tag))?;
        attach_pod(ns, &pod, &format!("{}v{i}", self.tag), pod_ip, gateway, mtu)?;
        let pod_ip6 = match node.ipv6 {
            Some((_, subnet)) => Some(add_pod_ipv6(ns, &pod, subnet)?),
            None => None,
        };
        let vtep6 = match node.ipv6 {
            Some((public_ip, subnet)) => {
                let vtep = Vtep6 {
                    ip: subnet,
                    mac: mac6_for(subnet),
                    public_ip,
                };
                let mtu6 = mtu + ENCAP_OVERHEAD - ENCAP_OVERHEAD6;
                create_vtep6(ns, public_ip, vtep.ip, &vtep.mac, mtu6)?;
                Some(vtep)
            }
            None => None,
        };
        Ok(OverlayNode {
            node: i,
            name: node.name.clone(),
            cloud: node.cloud,
            node_ip: node.node_ip,
            pod_subnet: node.pod_subnet,
            vtep_ip,
            vtep_mac,
            pod_ip,
            pod_ip6,
            mtu,
            pod,
            vtep6,
        })
    }
}

/// What flannel's kube subnet manager writes on its Node once its backend is up: the
/// coordinator admits a peer's VTEP only when it matches these.
fn annotate(cluster: &Cluster, node: &OverlayNode) -> anyhow::Result<()> {
    let data = format!(
        "flannel.alpha.coreos.com/backend-data={{\"VNI\":{VNI},\"VtepMAC\":\"{}\"}}",
        node.vtep_mac_str()
    );
    let public_ip = format!("flannel.alpha.coreos.com/public-ip={}", node.node_ip);
    let mut args = vec![
        "annotate".to_string(),
        "--overwrite".into(),
        "node".into(),
        node.name.clone(),
        data,
        "flannel.alpha.coreos.com/backend-type=vxlan".into(),
        "flannel.alpha.coreos.com/kube-subnet-manager=true".into(),
        public_ip,
    ];
    if let Some(v) = &node.vtep6 {
        args.push(format!(
            "flannel.alpha.coreos.com/backend-v6-data={{\"VNI\":{VNI},\"VtepMAC\":\"{}\"}}",
            mac_str(&v.mac)
        ));
        args.push(format!(
            "flannel.alpha.coreos.com/public-ipv6={}",
            v.public_ip
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cluster.rig.kubectl(&args)?;
    Ok(())
}

/// A VXLAN device as flannel's `newVXLANDevice` makes one: VNI 1, UDP 8472, learning off,
/// sending from `local` over eth0, IPv6 router advertisements off.
fn add_vxlan(ns: &Netns, dev: &str, local: &str, mac: &[u8; 6], mtu: u32) -> anyhow::Result<()> {
    ns.ip(&[
        "link",
        "add",
        dev,
        "address",
        &mac_str(mac),
        "mtu",
        &mtu.to_string(),
        "type",
        "vxlan",
        "id",
        &VNI.to_string(),
        "local",
        local,
        "dev",
        "eth0",
        "dstport",
        &VXLAN_PORT.to_string(),
        "nolearning",
    ])?;
    ns.exec(
        "sysctl",
        &["-qw", &format!("net/ipv6/conf/{dev}/accept_ra=0")],
    )?;
    Ok(())
}

/// `flannel.1` as flannel's `newVXLANDevice` + `Configure` make it (learning off, address
/// /32, up). flannel also turns off IPv6 router advertisements on it.
fn create_vtep(
    ns: &Netns,
    local: Ipv4Addr,
    vtep_ip: Ipv4Addr,
    mac: &[u8; 6],
    mtu: u32,
) -> anyhow::Result<()> {
    add_vxlan(ns, VXLAN_DEV, &local.to_string(), mac, mtu)?;
    ns.ip(&["addr", "add", &format!("{vtep_ip}/32"), "dev", VXLAN_DEV])?;
    ns.ip(&["link", "set", VXLAN_DEV, "up"])?;
    Ok(())
}

/// `cni0` as the CNI bridge plugin makes it, with a fixed MAC: a bridge without one takes
/// its lowest port's, which would change as pods come and go.
fn create_bridge(ns: &Netns, gateway: Ipv4Addr, mtu: u32) -> anyhow::Result<()> {
    ns.ip(&[
        "link",
        "add",
        BRIDGE,
        "address",
        &mac_str(&mac_for(gateway)),
        "mtu",
        &mtu.to_string(),
        "type",
        "bridge",
    ])?;
    ns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", BRIDGE])?;
    ns.ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// A pod: its eth0 is a veth whose node end (`host_end`) is a port of `cni0`.
fn attach_pod(
    node: &Netns,
    pod: &Netns,
    host_end: &str,
    pod_ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: u32,
) -> anyhow::Result<()> {
    let mtu = mtu.to_string();
    crate::netns::ip(&[
        "link",
        "add",
        host_end,
        "mtu",
        &mtu,
        "netns",
        &node.name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        &mac_str(&mac_for(pod_ip)),
        "mtu",
        &mtu,
        "netns",
        &pod.name,
    ])?;
    node.ip(&["link", "set", host_end, "master", BRIDGE, "up"])?;
    // flannel's CNI config delegates with `hairpinMode: true`: a pod may reach itself
    // through a service address (DNAT back to its own IP). With br_netfilter loaded the
    // DNAT happens on the bridge, which then sends the frame back out the port it came in.
    crate::netns::run(
        "bridge",
        &[
            "-n", &node.name, "link", "set", "dev", host_end, "hairpin", "on",
        ],
    )?;
    pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    Ok(())
}

/// The IPv6 half of a dual-stack pod: `cni0` gets `<subnet>::1/64`, the pod
/// `<subnet>::2/64` and its default route via it; the node forwards IPv6. Returns the
/// pod's address.
fn add_pod_ipv6(node: &Netns, pod: &Netns, subnet: Ipv6Addr) -> anyhow::Result<Ipv6Addr> {
    let mut gateway = subnet.segments();
    gateway[7] = 1;
    let gateway = Ipv6Addr::from(gateway);
    let mut pod_ip = subnet.segments();
    pod_ip[7] = 2;
    let pod_ip = Ipv6Addr::from(pod_ip);
    node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{gateway}/64"),
        "dev",
        BRIDGE,
        "nodad",
    ])?;
    pod.ip(&[
        "addr",
        "add",
        &format!("{pod_ip}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    pod.ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])?;
    Ok(pod_ip)
}

/// What flannel's `handleSubnetEvents` does on `ns` for a remote lease, in its order (ARP,
/// FDB, then the route, so the kernel never has to resolve the gateway), all as replace:
/// flannel uses `NeighSet` and `RouteReplace`, so this also overwrites whatever is there.
/// The FDB entry is written over netlink with flannel's exact state (`NUD_PERMANENT`);
/// `bridge fdb replace … permanent` would add `NUD_NOARP`, a different entry to the kernel.
pub fn flannel_add(ns: &Netns, remote: &OverlayNode) -> anyhow::Result<()> {
    let mac = remote.vtep_mac_str();
    let vtep = remote.vtep_ip.to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &vtep,
        "lladdr",
        &mac,
        "dev",
        VXLAN_DEV,
        "nud",
        "permanent",
    ])?;
    crate::fdb::fdb_set(ns, VXLAN_DEV, remote.vtep_mac, remote.node_ip)?;
    ns.ip(&[
        "route",
        "replace",
        &remote.pod_cidr(),
        "via",
        &vtep,
        "dev",
        VXLAN_DEV,
        "onlink",
    ])?;
    if let Some(v) = &remote.vtep6 {
        flannel_add6(ns, v.ip, &v.mac, v.public_ip, &v.pod_cidr())?;
    }
    Ok(())
}

/// What flannel does on `ns` when a remote lease is removed.
fn flannel_del(ns: &Netns, remote: &OverlayNode) -> anyhow::Result<()> {
    let mac = remote.vtep_mac_str();
    ns.ip(&[
        "neigh",
        "del",
        &remote.vtep_ip.to_string(),
        "dev",
        VXLAN_DEV,
    ])?;
    crate::netns::run(
        "bridge",
        &["-n", &ns.name, "fdb", "del", &mac, "dev", VXLAN_DEV, "self"],
    )?;
    ns.ip(&["route", "del", &remote.pod_cidr(), "dev", VXLAN_DEV])?;
    if let Some(v) = &remote.vtep6 {
        let ip = v.ip.to_string();
        ns.ip(&["-6", "neigh", "del", &ip, "dev", VXLAN6_DEV])?;
        crate::netns::run(
            "bridge",
            &[
                "-n",
                &ns.name,
                "fdb",
                "del",
                &mac_str(&v.mac),
                "dev",
                VXLAN6_DEV,
                "self",
            ],
        )?;
        ns.ip(&["-6", "route", "del", &v.pod_cidr(), "dev", VXLAN6_DEV])?;
    }
    Ok(())
}

/// The MAC for an address: `0a:58` (locally administered, unicast) + the IPv4 octets, as
/// the CNI plugins derive pod MACs.
pub fn mac_for(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// The MAC of a node's `flannel-v6.1`, from its IPv6 pod subnet (`fd00:244:<s>::` →
/// `0a:58:fd:00:<s>`): stable, and apart from every [`mac_for`] of a 10.x address.
pub fn mac6_for(subnet: Ipv6Addr) -> [u8; 6] {
    let [hi, lo] = subnet.segments()[2].to_be_bytes();
    [0x0a, 0x58, 0xfd, 0x00, hi, lo]
}

/// `aa:bb:cc:dd:ee:ff`, lower case, as `ip` and `bridge` print MACs.
pub fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// flannel's IPv6 VXLAN device for VNI 1, beside `flannel.1` in dual stack.
pub const VXLAN6_DEV: &str = "flannel-v6.1";
/// flannel's IPv6 `encapOverhead`: outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet
/// (14).
pub const ENCAP_OVERHEAD6: u32 = 70;

/// `flannel-v6.1` as flannel's `vxlan` backend makes it in dual stack (`newVXLANDevice`
/// with the IPv6 lease): VNI 1, UDP 8472, `nolearning`, `local` the node's IPv6 underlay
/// address, `dev eth0`, MTU underlay − [`ENCAP_OVERHEAD6`], address `vtep6`/128, up.
pub fn create_vtep6(
    ns: &Netns,
    local: Ipv6Addr,
    vtep6: Ipv6Addr,
    mac: &[u8; 6],
    mtu: u32,
) -> anyhow::Result<()> {
    add_vxlan(ns, VXLAN6_DEV, &local.to_string(), mac, mtu)?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{vtep6}/128"),
        "dev",
        VXLAN6_DEV,
        "nodad",
    ])?;
    ns.ip(&["link", "set", VXLAN6_DEV, "up"])?;
    Ok(())
}

/// flannel's entries on `ns` for a remote IPv6 lease, in its order: the neighbour entry for
/// the remote VTEP, the FDB entry sending its MAC to `dst` (flannel: the remote's
/// `public-ip-v6`; repointed: its IPv6 mesh IP), the onlink route to `cidr6`.
pub fn flannel_add6(
    ns: &Netns,
    vtep6: Ipv6Addr,
    mac: &[u8; 6],
    dst: Ipv6Addr,
    cidr6: &str,
) -> anyhow::Result<()> {
    let lladdr = mac_str(mac);
    let vtep6 = vtep6.to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &vtep6,
        "lladdr",
        &lladdr,
        "dev",
        VXLAN6_DEV,
        "nud",
        "permanent",
    ])?;
    crate::fdb::fdb_set(ns, VXLAN6_DEV, *mac, dst)?;
    ns.ip(&[
        "-6", "route", "replace", cidr6, "via", &vtep6, "dev", VXLAN6_DEV, "onlink",
    ])?;
    Ok(())
}
