//! VXLAN FDB entries over netlink, the way flannel writes them and the way the kernel
//! announces them:
//!
//! - [`fdb_set`] is flannel's `AddFDB` byte for byte (`NUD_PERMANENT` alone, unlike
//!   `bridge fdb replace … permanent`, which also sets `NUD_NOARP`: the kernel stores the
//!   state as given, and a write that differs only in it is a change it announces);
//! - [`fdb_entries`] lists the configured entries with their raw state and flags, which
//!   `bridge fdb show` folds into one word;
//! - [`measure_fdb_reassert`] times how fast an entry someone else rewrote is put back, from
//!   the kernel's own notifications rather than by polling. A netlink socket inside the node
//!   namespace joins `RTNLGRP_NEIGH` (VXLAN FDB entries are announced there as `AF_BRIDGE`
//!   neighbour messages), then sends the rewrite on the same socket with an ACK requested.
//!   The clock starts when the ACK is read and stops when a notification shows the entry's
//!   destination back at the expected address: no polling interval, so the resolution is
//!   that of reading a socket (microseconds).

use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::netns::Netns;

/// The rtnetlink multicast group of neighbour (and FDB) changes.
const RTNLGRP_NEIGH: u32 = 3;
/// Sequence number of our one request per socket, to recognise its answer.
const SEQ: u32 = 1;
/// `NUD_PERMANENT | NUD_NOARP`: an entry someone configured; learned ones have neither.
const CONFIGURED: u16 = 0x80 | 0x40;

/// One FDB entry, on one device, as a notification reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FdbEvent {
    /// Added or changed, now pointing at this destination (`None`: no `dst`).
    Set(Option<Ipv4Addr>),
    Deleted,
}

/// In namespace `ns`, points the FDB entry for `mac` on `dev` (a VXLAN device) at
/// `rewrite_to`, as flannel's `NeighSet` would, and returns how long it took until the
/// kernel announced the entry pointing at `expect` again (someone else restored it).
///
/// The clock starts when the kernel acknowledges the rewrite. A restore announced before
/// that acknowledgement was read counts as zero. Fails when `timeout` passes first, or when
/// the rewrite changed nothing (the entry already pointed at `rewrite_to` with flannel's
/// state and flags: the kernel then announces nothing, and a restore could not be told
/// apart). Only the destination is compared, so a restore with another state counts.
pub fn measure_fdb_reassert(
    ns: &Netns,
    dev: &str,
    mac: [u8; 6],
    rewrite_to: Ipv4Addr,
    expect: Ipv4Addr,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let dev = dev.to_string();
    let name = ns.name.clone();
    ns.enter(move || measure_here(&dev, mac, rewrite_to, expect, timeout))?
        .with_context(|| format!("FDB re-assertion in {name}"))
}

/// [`measure_fdb_reassert`] on the calling thread, in its namespace.
fn measure_here(
    dev: &str,
    mac: [u8; 6],
    rewrite_to: Ipv4Addr,
    expect: Ipv4Addr,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let ifindex = ifindex(dev)?;
    let socket = route_socket(true)?;
    send_fdb_set(&socket, ifindex, mac, rewrite_to.into())?;

    let mut acked: Option<Instant> = None;
    let mut rewritten = false;
    let mut restored: Option<Instant> = None;
    let mut last = None;
    let mut buf = vec![0u8; 64 * 1024];
    // The same bound for the ACK (which takes microseconds), then again from the ACK on.
    let mut deadline = Instant::now() + timeout;
    loop {
        if let (Some(t0), Some(t1)) = (acked, restored) {
            return Ok(t1.saturating_duration_since(t0));
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "no restore to {expect} within {timeout:?} (acked: {}, saw the rewrite: \
                 {rewritten}, last event for the entry: {last:?})",
                acked.is_some()
            );
        }
        let Some(n) = recv_within(&socket, &mut buf, deadline - now)? else {
            continue;
        };
        for msg in parse_all(&buf[..n])? {
            let (n, deleted) = match msg {
                Message::Ack => {
                    let t = Instant::now();
                    acked = Some(t);
                    deadline = t + timeout;
                    if !rewritten {
                        bail!("rewriting to {rewrite_to} changed nothing (already there?)");
                    }
                    continue;
                }
                Message::New(n) => (n, false),
                Message::Deleted(n) => (n, true),
                _ => continue,
            };
            let Some((i, m, dst)) = fdb_fields(&n) else {
                continue;
            };
            if i != ifindex || m != mac {
                continue;
            }
            let event = if deleted {
                FdbEvent::Deleted
            } else {
                FdbEvent::Set(dst)
            };
            match event {
                FdbEvent::Set(Some(dst)) if dst == rewrite_to => rewritten = true,
                FdbEvent::Set(Some(dst)) if dst == expect && rewritten => {
                    // Read before the ACK: the ACK's later time makes it zero.
                    restored = Some(Instant::now());
                }
                _ => {}
            }
            last = Some(event);
        }
    }
}

/// The index of `dev` in the calling thread's namespace.
fn ifindex(dev: &str) -> anyhow::Result<u32> {
    let c = CString::new(dev).context("device name")?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no device {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

/// A route netlink socket in the calling thread's namespace, receiving neighbour
/// notifications if `subscribe`. Its receive buffer is large so a burst of events (an agent
/// re-asserting many entries) or a long dump cannot overflow it.
fn route_socket(subscribe: bool) -> anyhow::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    if subscribe {
        socket
            .add_membership(RTNLGRP_NEIGH)
            .context("joining RTNLGRP_NEIGH")?;
    }
    socket
        .set_rx_buf_sz(4 << 20)
        .context("netlink receive buffer")?;
    Ok(socket)
}

/// Sends one request numbered [`SEQ`].
fn send_request(socket: &Socket, body: RouteNetlinkMessage, flags: u16) -> anyhow::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = SEQ;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(body));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    let kernel = SocketAddr::new(0, 0);
    socket
        .send_to(&buf, &kernel, 0)
        .context("sending a netlink request")?;
    Ok(())
}

/// `RTM_NEWNEIGH` for the bridge family with `NLM_F_CREATE | NLM_F_REPLACE`, `NTF_SELF`,
/// `NUD_PERMANENT`: what flannel's `AddFDB` (vishvananda/netlink `NeighSet`) sends.
fn send_fdb_set(socket: &Socket, ifindex: u32, mac: [u8; 6], dst: IpAddr) -> anyhow::Result<()> {
    let mut neigh = NeighbourMessage::default();
    neigh.header.family = AddressFamily::Bridge;
    neigh.header.ifindex = ifindex;
    neigh.header.state = NeighbourState::Permanent;
    neigh.header.flags = NeighbourFlags::Own;
    neigh.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        NeighbourAttribute::Destination(match dst {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }),
    ];
    send_request(
        socket,
        RouteNetlinkMessage::NewNeighbour(neigh),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
    )
    .context("FDB write")
}

/// Waits up to `wait` for a datagram; `None` when none came.
fn recv_within(socket: &Socket, buf: &mut [u8], wait: Duration) -> anyhow::Result<Option<usize>> {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so a sub-millisecond remainder still waits instead of spinning.
    let ms = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e).context("polling the netlink socket");
    }
    if rc == 0 {
        return Ok(None);
    }
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        // ENOBUFS: notifications were dropped; the next one still tells the current state.
        if e.raw_os_error() == Some(libc::ENOBUFS) {
            return Ok(None);
        }
        return Err(e).context("reading the netlink socket");
    }
    Ok(Some(n as usize))
}

/// What matters in one netlink message here.
#[derive(Debug)]
enum Message {
    /// The kernel accepted our request.
    Ack,
    /// The end of our dump.
    Done,
    /// A neighbour (or FDB entry) added or changed: a dump entry or a notification.
    New(NeighbourMessage),
    Deleted(NeighbourMessage),
    Other,
}

/// Every message in one datagram; an error for our request's NACK.
fn parse_all(mut buf: &[u8]) -> anyhow::Result<Vec<Message>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf)
            .context("parsing a netlink message")?;
        let len = (msg.header.length as usize).next_multiple_of(4);
        if len == 0 {
            break;
        }
        out.push(classify(msg)?);
        buf = buf.get(len..).unwrap_or_default();
    }
    Ok(out)
}

fn classify(msg: NetlinkMessage<RouteNetlinkMessage>) -> anyhow::Result<Message> {
    let seq = msg.header.sequence_number;
    Ok(match msg.payload {
        NetlinkPayload::Error(e) if seq == SEQ => match e.code {
            None => Message::Ack,
            Some(code) => bail!(
                "the kernel refused the request: {}",
                std::io::Error::from_raw_os_error(-code.get())
            ),
        },
        NetlinkPayload::Done(_) if seq == SEQ => Message::Done,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => Message::New(n),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => Message::Deleted(n),
        _ => Message::Other,
    })
}

/// The device, MAC and destination of an `AF_BRIDGE` neighbour message (an FDB entry).
fn fdb_fields(n: &NeighbourMessage) -> Option<(u32, [u8; 6], Option<Ipv4Addr>)> {
    if n.header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut dst = None;
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => mac = <[u8; 6]>::try_from(&a[..]).ok(),
            NeighbourAttribute::Destination(d) => {
                dst = match ip_of(d) {
                    Some(IpAddr::V4(a)) => Some(a),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    Some((n.header.ifindex, mac?, dst))
}

/// A bridge-family `NDA_DST` is parsed as raw bytes (the family says nothing about it).
fn ip_of(d: &NeighbourAddress) -> Option<IpAddr> {
    match d {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        // In AF_BRIDGE messages the parser cannot tell the address family.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// Points the FDB entry for `mac` on `dev` (in `ns`) at `dst`, exactly as flannel's
/// `AddFDB` (or `AddV6FDB`) does, and returns once the kernel acknowledged it.
pub fn fdb_set(ns: &Netns, dev: &str, mac: [u8; 6], dst: impl Into<IpAddr>) -> anyhow::Result<()> {
    let dst = dst.into();
    let dev = dev.to_string();
    let name = ns.name.clone();
    ns.enter(move || -> anyhow::Result<()> {
        let socket = route_socket(false)?;
        send_fdb_set(&socket, ifindex(&dev)?, mac, dst)?;
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(wait) = deadline.checked_duration_since(Instant::now()) {
            let Some(n) = recv_within(&socket, &mut buf, wait)? else {
                continue;
            };
            if parse_all(&buf[..n])?
                .iter()
                .any(|m| matches!(m, Message::Ack))
            {
                return Ok(());
            }
        }
        bail!("no answer from the kernel")
    })?
    .with_context(|| format!("FDB entry {} -> {dst} in {name}", mac_text(&mac)))
}

/// Every configured (`permanent` or `static`) FDB entry of every device in `ns`, one line
/// each: MAC, device, destination and the other attributes `bridge fdb show` prints, then
/// the raw state and flags as names (`state permanent|noarp`). Learned entries are left
/// out, and so are the cache timers.
pub fn fdb_entries(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let name = ns.name.clone();
    ns.enter(dump_fdb)?
        .with_context(|| format!("FDB of {name}"))
}

fn dump_fdb() -> anyhow::Result<Vec<String>> {
    let socket = route_socket(false)?;
    let mut neigh = NeighbourMessage::default();
    neigh.header.family = AddressFamily::Bridge;
    send_request(
        &socket,
        RouteNetlinkMessage::GetNeighbour(neigh),
        NLM_F_DUMP,
    )?;
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let wait = deadline
            .checked_duration_since(Instant::now())
            .context("the dump did not end")?;
        let Some(n) = recv_within(&socket, &mut buf, wait)? else {
            continue;
        };
        for msg in parse_all(&buf[..n])? {
            match msg {
                Message::Done => return Ok(lines),
                Message::New(n) if n.header.family == AddressFamily::Bridge => {
                    let state = u16::from(n.header.state);
                    if state & CONFIGURED != 0 {
                        lines.push(fdb_line(&n));
                    }
                }
                _ => {}
            }
        }
    }
}

/// One FDB entry as text, in `bridge fdb show`'s order of things.
fn fdb_line(n: &NeighbourMessage) -> String {
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::LinkLayerAddress(a) => out.push(mac_text(a)),
            NeighbourAttribute::Destination(d) => match ip_of(d) {
                Some(ip) => rest.push(format!("dst {ip}")),
                None => rest.push(format!("dst {d:?}")),
            },
            NeighbourAttribute::Vlan(v) => rest.push(format!("vlan {v}")),
            NeighbourAttribute::Port(p) => rest.push(format!("port {p}")),
            NeighbourAttribute::Vni(v) => rest.push(format!("vni {v}")),
            NeighbourAttribute::SourceVni(v) => rest.push(format!("src_vni {v}")),
            NeighbourAttribute::IfIndex(i) => rest.push(format!("via {}", ifname(*i))),
            NeighbourAttribute::Controller(i) => rest.push(format!("master {}", ifname(*i))),
            NeighbourAttribute::LinkNetNsId(i) => rest.push(format!("link-netnsid {i}")),
            NeighbourAttribute::ExtFlags(f) => rest.push(format!("ext_flags {:#x}", f.bits())),
            // Cache timers change with traffic; probes count with time.
            NeighbourAttribute::CacheInfo(_) | NeighbourAttribute::Probes(_) => {}
            other => rest.push(format!("{other:?}")),
        }
    }
    out.push(format!("dev {}", ifname(n.header.ifindex)));
    out.extend(rest);
    out.push(format!(
        "state {}",
        bit_names(u16::from(n.header.state).into(), STATE_BITS)
    ));
    out.push(format!(
        "flags {}",
        bit_names(n.header.flags.bits().into(), FLAG_BITS)
    ));
    out.join(" ")
}

const STATE_BITS: &[(u32, &str)] = &[
    (0x01, "incomplete"),
    (0x02, "reachable"),
    (0x04, "stale"),
    (0x08, "delay"),
    (0x10, "probe"),
    (0x20, "failed"),
    (0x40, "noarp"),
    (0x80, "permanent"),
];

const FLAG_BITS: &[(u32, &str)] = &[
    (0x01, "use"),
    (0x02, "self"),
    (0x04, "master"),
    (0x08, "proxy"),
    (0x10, "extern_learn"),
    (0x20, "offloaded"),
    (0x40, "sticky"),
    (0x80, "router"),
];

/// `a|b` for the bits of `value` that have names, plus any others in hex; `none` for 0.
fn bit_names(value: u32, names: &[(u32, &str)]) -> String {
    let mut out: Vec<String> = names
        .iter()
        .filter(|(bit, _)| value & bit != 0)
        .map(|(_, name)| name.to_string())
        .collect();
    let known: u32 = names.iter().map(|(bit, _)| bit).sum();
    if value & !known != 0 {
        out.push(format!("{:#x}", value & !known));
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join("|")
    }
}

/// The name of interface `index` in the calling thread's namespace (`if<index>` if gone).
fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_flags_read_as_names() {
        assert_eq!(bit_names(0xc0, STATE_BITS), "noarp|permanent");
        assert_eq!(bit_names(0x80, STATE_BITS), "permanent");
        assert_eq!(bit_names(0, FLAG_BITS), "none");
        assert_eq!(bit_names(0x102, FLAG_BITS), "self|0x100");
    }
}
