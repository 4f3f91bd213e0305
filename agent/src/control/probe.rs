//! Path MTU discovery's effects: the probe socket, the acknowledgements, the clock. The
//! decisions are [`super::pmtu`]'s; why probes travel as UDP inside the tunnel is written
//! there.
//!
//! One UDP socket per agent, bound to this node's mesh IP on the probe port (`--pmtu-port`,
//! 51821 by default), in the node's network namespace. It sends this node's probes to every
//! remote node's mesh IP on the same port and answers the probes it receives — only from
//! mesh IPs of configured remote nodes — with a small acknowledgement. Wire format, all
//! integers big-endian: `isthPMTU` (8 bytes), kind (1: probe, 2: acknowledgement), probe id
//! (u32), the probe's size (u16), then zero padding up to the size under test.
//!
//! Every second the tunnel's per-peer counters are read: traffic to a peer with nothing at
//! all back from it in that second is a suspicion ([`Prober::suspect`]) that large packets
//! are going unanswered, and the value in effect is confirmed at once rather than at the
//! next period.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::pmtu::{Prober, Timing};
use isthmus_routing::netns;
use isthmus_wg::key::Key;
use isthmus_wg::tunnel::Tunnel;

const MAGIC: &[u8; 8] = b"isthPMTU";
const PROBE: u8 = 1;
const ACK: u8 = 2;
const HEADER: usize = 8 + 1 + 4 + 2;
/// IPv4 and UDP headers around the probe's payload.
const V4_OVERHEAD: u16 = 28;
/// IPv6 and UDP headers.
const V6_OVERHEAD: u16 = 48;

/// The probe port's default.
pub const DEFAULT_PORT: u16 = 51821;

/// A remote node to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub public_key: Key,
    pub mesh_ip: IpAddr,
    /// The smaller of the two tunnels' MTUs.
    pub ceiling: u16,
}

/// What to probe: this node's mesh IP (none: nothing yet) and the remote nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub own: Option<IpAddr>,
    pub remotes: Vec<Target>,
}

/// The path MTU found per remote node, by name; only nodes with a value are listed.
pub type PathMtus = Arc<Mutex<BTreeMap<String, u16>>>;

/// A message on the probe port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Probe { id: u32, size: u16 },
    Ack { id: u32, size: u16 },
}

/// Encodes `m` padded to `len` bytes of UDP payload (at least the header).
pub fn encode(m: Message, len: usize) -> Vec<u8> {
    let (kind, id, size) = match m {
        Message::Probe { id, size } => (PROBE, id, size),
        Message::Ack { id, size } => (ACK, id, size),
    };
    let mut out = Vec::with_capacity(len.max(HEADER));
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.resize(len.max(HEADER), 0);
    out
}

pub fn decode(b: &[u8]) -> Option<Message> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return None;
    }
    let id = u32::from_be_bytes(b[9..13].try_into().ok()?);
    let size = u16::from_be_bytes(b[13..15].try_into().ok()?);
    match b[8] {
        PROBE => Some(Message::Probe { id, size }),
        ACK => Some(Message::Ack { id, size }),
        _ => None,
    }
}

/// UDP payload length that makes an IP packet of `size` bytes.
fn payload_len(size: u16, v4: bool) -> usize {
    usize::from(size.saturating_sub(if v4 { V4_OVERHEAD } else { V6_OVERHEAD }))
}

/// Whether the tunnel's counters for a peer, read a second apart, suggest large packets
/// going unanswered: bytes went to it and none at all came back.
pub fn stalled(before: (u64, u64), now: (u64, u64)) -> bool {
    let (tx0, rx0) = before;
    let (tx1, rx1) = now;
    tx1 > tx0 && rx1 == rx0
}

/// The probe socket: bound to `own:port` (even before the address is up), never fragments,
/// ignores the route MTU (which probing itself lowers).
fn bind(netns: Option<PathBuf>, own: IpAddr, port: u16) -> anyhow::Result<std::net::UdpSocket> {
    netns::run_in(netns.as_deref(), move || {
        let domain = if own.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .context("probe socket")?;
        if own.is_ipv4() {
            s.set_freebind(true).context("IP_FREEBIND")?;
        } else {
            s.set_freebind_ipv6(true).context("IPV6_FREEBIND")?;
        }
        let (level, name, value) = if own.is_ipv4() {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            )
        } else {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            )
        };
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("IP_MTU_DISCOVER=PROBE");
        }
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(own, port).into())
            .with_context(|| format!("binding the probe socket to {own}:{port}"))?;
        Ok(s.into())
    })
}

struct Peer {
    target: Target,
    prober: Prober,
    counters: Option<(u64, u64)>,
}

/// Probes until the task is dropped: follows `targets`, writes the values into `found` and
/// wakes `changed` when one changes (routing follows).
pub async fn run(
    netns: Option<PathBuf>,
    port: u16,
    timing: Timing,
    mut targets: watch::Receiver<Targets>,
    tunnel: Arc<Tunnel>,
    found: PathMtus,
    changed: Arc<Notify>,
) {
    let mut socket: Option<(IpAddr, UdpSocket)> = None;
    // After a failed bind (the port taken, the address not yet up): the address, the
    // failures so far and when to try again. The 1 s counters tick brings the loop round.
    let mut bind_retry: Option<(IpAddr, u32, Instant)> = None;
    let mut peers: BTreeMap<IpAddr, Peer> = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let mut counters_tick = tokio::time::interval(Duration::from_secs(1));
    counters_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Follow the targets.
        let want = targets.borrow_and_update().clone();
        if socket.as_ref().map(|(ip, _)| *ip) != want.own {
            socket = None;
            let due =
                bind_retry.is_none_or(|(ip, _, at)| Some(ip) != want.own || Instant::now() >= at);
            if let (Some(own), true) = (want.own, due) {
                match bind(netns.clone(), own, port)
                    .and_then(|s| UdpSocket::from_std(s).context("registering the probe socket"))
                {
                    Ok(s) => {
                        tracing::info!(address = %own, port, "probing path MTUs");
                        socket = Some((own, s));
                        bind_retry = None;
                    }
                    Err(e) => {
                        let failures = match bind_retry {
                            Some((ip, n, _)) if ip == own => n + 1,
                            _ => 1,
                        };
                        let wait = bind_backoff(failures);
                        if failures == 1 {
                            tracing::warn!(error = format!("{e:#}"), retry_in = ?wait, "no path MTU probing yet; retrying with backoff");
                        } else {
                            tracing::debug!(error = format!("{e:#}"), failures, retry_in = ?wait, "probe socket still not bound");
                        }
                        bind_retry = Some((own, failures, Instant::now() + wait));
                    }
                }
            }
        }
        peers.retain(|ip, _| want.remotes.iter().any(|t| t.mesh_ip == *ip));
        for t in &want.remotes {
            let p = peers.entry(t.mesh_ip).or_insert_with(|| Peer {
                target: t.clone(),
                prober: Prober::new(t.ceiling, timing),
                counters: None,
            });
            p.prober.set_ceiling(t.ceiling);
            p.target = t.clone();
        }
        publish(&peers, &found, &changed);

        // Send what is due.
        let now = Instant::now();
        if let Some((own, s)) = &socket {
            for p in peers.values_mut() {
                let before = p.prober.value();
                // At most one per peer per round: the next is due after its timeout.
                if let Some(probe) = p.prober.poll(now.into_std()) {
                    let len = payload_len(probe.size, own.is_ipv4());
                    let msg = encode(
                        Message::Probe {
                            id: probe.id,
                            size: probe.size,
                        },
                        len,
                    );
                    let to = SocketAddr::new(p.target.mesh_ip, port);
                    if let Err(e) = s.try_send_to(&msg, to) {
                        // Unanswered, as a lost probe would be: the decisions treat it so.
                        tracing::debug!(error = %e, peer = %p.target.name, size = probe.size, "probe not sent");
                    }
                }
                log_change(&p.target.name, before, p.prober.value());
            }
        }
        publish(&peers, &found, &changed);
        let wake = peers
            .values()
            .map(|p| p.prober.next_wake().map_or(now, Instant::from_std))
            .min()
            .unwrap_or(now + Duration::from_secs(3600));

        tokio::select! {
            r = targets.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(wake.max(now + Duration::from_millis(1))), if socket.is_some() => {}
            _ = counters_tick.tick() => {
                let snap = tunnel.engine().snapshot();
                let now = Instant::now().into_std();
                for p in peers.values_mut() {
                    let Some(c) = snap.peers.iter().find(|s| s.public_key == p.target.public_key) else {
                        continue;
                    };
                    let c = (c.tx_bytes, c.rx_bytes);
                    if p.counters.is_some_and(|before| stalled(before, c)) {
                        p.prober.suspect(now);
                    }
                    p.counters = Some(c);
                }
            }
            r = recv(&socket, &mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Some(peer) = peers.get_mut(&from.ip()) else { continue };
                match decode(&buf[..n]) {
                    Some(Message::Probe { id, size }) => {
                        if let Some((_, s)) = &socket {
                            let ack = encode(Message::Ack { id, size }, HEADER);
                            if let Err(e) = s.try_send_to(&ack, from) {
                                tracing::debug!(error = %e, peer = %peer.target.name, "acknowledgement not sent");
                            }
                        }
                    }
                    Some(Message::Ack { id, .. }) => {
                        let before = peer.prober.value();
                        peer.prober.on_ack(id, Instant::now().into_std());
                        log_change(&peer.target.name, before, peer.prober.value());
                    }
                    None => {}
                }
            }
        }
    }
}

/// How long to wait before binding the probe socket again after `failures` failed binds:
/// doubling from 1 s, at most 30 s, so a port held by something else is retried for ever
/// without a log line a second.
fn bind_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

async fn recv(
    socket: &Option<(IpAddr, UdpSocket)>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some((_, s)) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn log_change(peer: &str, before: Option<u16>, now: Option<u16>) {
    if before != now {
        if let Some(v) = now {
            tracing::info!(peer, path_mtu = v, was = ?before, "path MTU changed");
        }
    }
}

/// Writes the values into `found`; wakes `changed` if any differs.
fn publish(peers: &BTreeMap<IpAddr, Peer>, found: &PathMtus, changed: &Notify) {
    let now: BTreeMap<String, u16> = peers
        .values()
        .filter_map(|p| Some((p.target.name.clone(), p.prober.value()?)))
        .collect();
    let mut f = found.lock();
    if *f != now {
        *f = now;
        changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_bind_is_retried_with_doubling_backoff_up_to_30s() {
        let secs: Vec<u64> = [1, 2, 3, 4, 5, 6, 7, 100]
            .into_iter()
            .map(|n| bind_backoff(n).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn messages_round_trip_and_junk_is_ignored() {
        let p = Message::Probe { id: 7, size: 1420 };
        let b = encode(p, payload_len(1420, true));
        assert_eq!(b.len(), 1392);
        assert_eq!(decode(&b), Some(p));
        let a = Message::Ack { id: 7, size: 1420 };
        assert_eq!(encode(a, HEADER).len(), 15);
        assert_eq!(decode(&encode(a, 0)), Some(a));
        assert_eq!(decode(b"isthPMTU"), None);
        assert_eq!(decode(&[0u8; 64]), None);
        let mut bad = encode(a, HEADER);
        bad[8] = 9;
        assert_eq!(decode(&bad), None);
        assert_eq!(payload_len(1280, false), 1232);
    }

    #[test]
    fn traffic_out_with_nothing_back_is_a_stall() {
        // (tx, rx) a second apart.
        let cases = [
            ((100, 50), (100, 50), false, "idle"),
            ((100, 50), (9000, 50), true, "out, nothing back"),
            ((100, 50), (9000, 60), false, "out and back"),
            ((100, 50), (100, 60), false, "only in"),
        ];
        for (before, now, want, name) in cases {
            assert_eq!(stalled(before, now), want, "{name}");
        }
    }
}
