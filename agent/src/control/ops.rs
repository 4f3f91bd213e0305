//! What the agent serves on `--metrics-addr` (see `isthmus_ops`): its readiness rule and its
//! metrics.
//!
//! The run loop reports milestones here ([`AgentOps::mesh_applied`], [`AgentOps::routing_pass`],
//! ...); per-peer values are read from the tunnel at scrape time, so a scrape always sees
//! the data plane's own counters and never a copy that lags behind. [`Readiness::check`] and
//! [`render`] are pure and unit-tested; [`AgentOps`] only gathers their inputs.
//!
//! `isthmus_peer_last_handshake_seconds` is a Unix timestamp (0: no handshake in the
//! current session), as the node exporter's WireGuard collector does, so
//! `time() - isthmus_peer_last_handshake_seconds > 180` finds stale peers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_ops::prometheus_client::metrics::counter::Counter;
use isthmus_ops::prometheus_client::metrics::family::Family;
use isthmus_ops::prometheus_client::metrics::gauge::Gauge;
use isthmus_ops::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use isthmus_ops::prometheus_client::registry::{Registry, Unit};
use isthmus_ops::Watchdog;
use parking_lot::Mutex;

use super::mesh::MeshPlan;
use isthmus_wg::drops::DropReason;
use isthmus_wg::key::Key;
use isthmus_wg::offload::gro::GroStats;
use isthmus_wg::tunnel::Tunnel;
use isthmus_wg::BatchStats;

/// A mesh or routing pass only touches the tunnel and netlink; one that runs this long is
/// wedged, and a restart (which restores routing from the journal) is the cure.
const PASS_LIMIT: Duration = Duration::from_secs(120);

/// The drop reasons that are failed inbound handshakes; `isthmus_handshake_failures_total`
/// is their sum by reason (the data plane does not count outbound handshake timeouts).
const HANDSHAKE_FAILURES: [DropReason; 2] =
    [DropReason::HandshakeRejected, DropReason::UnknownPeer];

/// The inputs of the readiness decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub dataplane_up: bool,
    pub peers_synced: bool,
    /// `None`: no mesh plan applied yet; `Some(admitted)` for the last one applied.
    pub admitted: Option<bool>,
    /// `None`: routing has not run yet; else whether its last pass succeeded.
    pub routing_ok: Option<bool>,
}

impl Readiness {
    /// Ready means this node carries mesh traffic: the tunnel is up, it runs a configuration
    /// the coordinator admitted, and the routes to it are in place.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.dataplane_up {
            return Err("data plane not up");
        }
        if !self.peers_synced {
            return Err("WireGuardPeer cache not synced");
        }
        match self.admitted {
            None => return Err("no mesh configuration applied yet"),
            Some(false) => return Err("not admitted by the coordinator yet"),
            Some(true) => {}
        }
        match self.routing_ok {
            None => Err("routing has not run yet"),
            Some(false) => Err("last routing pass failed"),
            Some(true) => Ok(()),
        }
    }
}

/// One configured peer as a scrape sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSample {
    /// Node name, or the public key (base64) when the name is unknown.
    pub peer: String,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The path MTU found by probing, if any.
    pub path_mtu: Option<u16>,
}

/// Everything a scrape reports besides the long-lived counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    pub peers: Vec<PeerSample>,
    /// Drops so far, by [`DropReason`].
    pub drops: Vec<(DropReason, u64)>,
    /// Decrypted packets coalesced into super-segments on the way to the TUN, so far.
    pub gro: GroStats,
    /// Data datagrams sent, and the system calls that sent them (GSO sends carry many).
    pub sent: BatchStats,
    /// Datagrams received, and the system calls that received them (GRO receives carry
    /// many).
    pub received: BatchStats,
    pub ready: bool,
}

/// Metrics kept between scrapes (the rest is read fresh each time).
#[derive(Clone)]
pub struct Counters {
    pub reconcile: Histogram,
    pub reassertions: Counter,
    /// Node key rotations retired (see `control::rotate`).
    pub key_rotations: Counter,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            // 1 ms .. ~4 s: a pass is a few netlink calls, slower means trouble.
            reconcile: Histogram::new(exponential_buckets(0.001, 2.0, 13)),
            reassertions: Counter::default(),
            key_rotations: Counter::default(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn family<M: Default + Clone>() -> Family<Labels, M> {
    Family::default()
}

/// The OpenMetrics exposition for `sample` and `counters`.
pub fn render(sample: &Sample, counters: &Counters) -> String {
    let mut r = Registry::default();
    let handshake = family::<Gauge>();
    let (rx, tx) = (family::<Counter>(), family::<Counter>());
    let path_mtu = family::<Gauge>();
    for p in &sample.peers {
        let labels = vec![("peer", p.peer.clone())];
        let at = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        handshake.get_or_create(&labels).set(at);
        rx.get_or_create(&labels).inc_by(p.rx_bytes);
        tx.get_or_create(&labels).inc_by(p.tx_bytes);
        if let Some(m) = p.path_mtu {
            path_mtu.get_or_create(&labels).set(i64::from(m));
        }
    }
    let drops = family::<Counter>();
    let handshake_failures = family::<Counter>();
    for (reason, n) in &sample.drops {
        let labels = vec![("reason", reason.name().to_string())];
        drops.get_or_create(&labels).inc_by(*n);
        if HANDSHAKE_FAILURES.contains(reason) {
            handshake_failures.get_or_create(&labels).inc_by(*n);
        }
    }
    let (gro_merged, gro_writes) = (family::<Counter>(), family::<Counter>());
    for (proto, merged, writes) in [
        ("tcp", sample.gro.tcp_merged, sample.gro.tcp_writes),
        ("udp", sample.gro.udp_merged, sample.gro.udp_writes),
        ("vxlan", sample.gro.vxlan_merged, sample.gro.vxlan_writes),
    ] {
        let labels = vec![("proto", proto.to_string())];
        gro_merged.get_or_create(&labels).inc_by(merged);
        gro_writes.get_or_create(&labels).inc_by(writes);
    }
    let (sent_datagrams, send_calls) = (Counter::<u64>::default(), Counter::<u64>::default());
    sent_datagrams.inc_by(sample.sent.datagrams);
    send_calls.inc_by(sample.sent.calls);
    let (received_datagrams, receive_calls) =
        (Counter::<u64>::default(), Counter::<u64>::default());
    received_datagrams.inc_by(sample.received.datagrams);
    receive_calls.inc_by(sample.received.calls);
    let peers = Gauge::<i64>::default();
    peers.set(sample.peers.len() as i64);
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(sample.ready));

    r.register("isthmus_peers", "Peers configured on the tunnel", peers);
    r.register_with_unit(
        "isthmus_peer_last_handshake",
        "Unix time of the peer's latest completed handshake (0: none in this session)",
        Unit::Seconds,
        handshake,
    );
    r.register_with_unit(
        "isthmus_peer_rx",
        "Bytes received from the peer",
        Unit::Bytes,
        rx,
    );
    r.register_with_unit("isthmus_peer_tx", "Bytes sent to the peer", Unit::Bytes, tx);
    r.register_with_unit(
        "isthmus_peer_path_mtu",
        "Largest packet the path to the peer carries through the tunnel, as probing found it",
        Unit::Bytes,
        path_mtu,
    );
    r.register(
        "isthmus_handshake_failures",
        "Inbound handshakes refused (bad MAC or key, or an unknown peer)",
        handshake_failures,
    );
    r.register(
        "isthmus_dropped_packets",
        "Packets the data plane dropped, by reason",
        drops,
    );
    r.register(
        "isthmus_gro_merged_packets",
        "Decrypted packets written to the TUN inside coalesced super-segments, by protocol (vxlan: TCP inside VXLAN)",
        gro_merged,
    );
    r.register(
        "isthmus_gro_writes",
        "Coalesced super-segments written to the TUN, by protocol",
        gro_writes,
    );
    r.register(
        "isthmus_sent_datagrams",
        "Data messages sent to peers",
        sent_datagrams,
    );
    r.register(
        "isthmus_send_calls",
        "System calls that sent them (one UDP GSO send carries up to 64)",
        send_calls,
    );
    r.register(
        "isthmus_received_datagrams",
        "Datagrams received from peers (data, handshakes and cookies)",
        received_datagrams,
    );
    r.register(
        "isthmus_receive_calls",
        "System calls that received them (one UDP GRO receive carries up to 64)",
        receive_calls,
    );
    r.register(
        "isthmus_routing_reassertions",
        "Owned routing entries put back after someone else changed them",
        counters.reassertions.clone(),
    );
    r.register_with_unit(
        "isthmus_reconcile_duration",
        "Time of one mesh and routing pass",
        Unit::Seconds,
        counters.reconcile.clone(),
    );
    r.register(
        "isthmus_key_rotations",
        "Node key rotations completed (the old key retired) since the agent started",
        counters.key_rotations.clone(),
    );
    r.register("isthmus_ready", "1 while /readyz answers 200", ready);
    isthmus_ops::encode(&r)
}

#[derive(Default)]
struct State {
    tunnel: Option<Arc<Tunnel>>,
    readiness: Readiness,
    names: BTreeMap<Key, String>,
    path_mtus: Option<super::probe::PathMtus>,
}

/// The agent's side of the ops endpoint, shared between the run loop and the HTTP server.
#[derive(Default)]
pub struct AgentOps {
    watchdog: Watchdog,
    counters: Counters,
    state: Mutex<State>,
}

impl AgentOps {
    pub fn dataplane_up(&self, tunnel: Arc<Tunnel>) {
        let mut s = self.state.lock();
        s.tunnel = Some(tunnel);
        s.readiness.dataplane_up = true;
    }

    /// Where path MTU discovery writes what it finds.
    pub fn path_mtus(&self, found: super::probe::PathMtus) {
        self.state.lock().path_mtus = Some(found);
    }

    pub fn peers_synced(&self) {
        self.state.lock().readiness.peers_synced = true;
    }

    pub fn mesh_applied(&self, plan: &MeshPlan) {
        let mut s = self.state.lock();
        s.readiness.admitted = Some(plan.admitted);
        s.names = plan.names.clone();
    }

    pub fn routing_pass(&self, ok: bool, reasserted: usize) {
        self.state.lock().readiness.routing_ok = Some(ok);
        self.counters.reassertions.inc_by(reasserted as u64);
    }

    /// Marks the start of a mesh and routing pass (for `/healthz`).
    pub fn pass_started(&self) {
        self.watchdog.enter();
    }

    /// A key rotation retired its old key.
    pub fn key_rotated(&self) {
        self.counters.key_rotations.inc();
    }

    pub fn pass_finished(&self, took: Duration) {
        self.watchdog.exit();
        self.counters.reconcile.observe(took.as_secs_f64());
    }

    fn readiness(&self) -> Readiness {
        self.state.lock().readiness
    }

    fn sample(&self) -> Sample {
        let (tunnel, names, readiness, path_mtus) = {
            let s = self.state.lock();
            let path_mtus = s
                .path_mtus
                .as_ref()
                .map(|m| m.lock().clone())
                .unwrap_or_default();
            (s.tunnel.clone(), s.names.clone(), s.readiness, path_mtus)
        };
        let Some(tunnel) = tunnel else {
            return Sample::default();
        };
        let engine = tunnel.engine();
        let peers = engine
            .snapshot()
            .peers
            .into_iter()
            .map(|p| PeerSample {
                path_mtu: names
                    .get(&p.public_key)
                    .and_then(|n| path_mtus.get(n))
                    .copied(),
                peer: names
                    .get(&p.public_key)
                    .cloned()
                    .unwrap_or_else(|| p.public_key.to_base64()),
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect();
        Sample {
            peers,
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, engine.drops().get(*r)))
                .collect(),
            gro: tunnel.gro_stats(),
            sent: tunnel.send_stats(),
            received: tunnel.recv_stats(),
            ready: readiness.check().is_ok(),
        }
    }
}

impl isthmus_ops::Probes for AgentOps {
    fn metrics(&self) -> String {
        render(&self.sample(), &self.counters)
    }

    fn live(&self) -> Result<(), String> {
        self.watchdog.check(PASS_LIMIT)
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness().check().map_err(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_an_admitted_plan_and_routing_in_place() {
        let ready = Readiness {
            dataplane_up: true,
            peers_synced: true,
            admitted: Some(true),
            routing_ok: Some(true),
        };
        assert_eq!(ready.check(), Ok(()));
        let cases = [
            (Readiness::default(), "data plane not up"),
            (
                Readiness {
                    peers_synced: false,
                    ..ready
                },
                "WireGuardPeer cache not synced",
            ),
            (
                Readiness {
                    admitted: None,
                    routing_ok: None,
                    ..ready
                },
                "no mesh configuration applied yet",
            ),
            (
                Readiness {
                    admitted: Some(false),
                    ..ready
                },
                "not admitted by the coordinator yet",
            ),
            (
                Readiness {
                    routing_ok: Some(false),
                    ..ready
                },
                "last routing pass failed",
            ),
        ];
        for (r, reason) in cases {
            assert_eq!(r.check(), Err(reason), "{r:?}");
        }
    }

    #[test]
    fn renders_prometheus_names() {
        let counters = Counters::default();
        counters.reassertions.inc_by(3);
        counters.key_rotations.inc();
        counters.reconcile.observe(0.002);
        let sample = Sample {
            peers: vec![PeerSample {
                peer: "aws-1".into(),
                last_handshake: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
                rx_bytes: 10,
                tx_bytes: 20,
                path_mtu: Some(1240),
            }],
            drops: DropReason::ALL.iter().map(|r| (*r, 1)).collect(),
            gro: GroStats {
                tcp_merged: 44,
                tcp_writes: 1,
                udp_merged: 130,
                udp_writes: 3,
                vxlan_merged: 90,
                vxlan_writes: 2,
            },
            sent: BatchStats {
                datagrams: 640,
                calls: 21,
            },
            received: BatchStats {
                datagrams: 512,
                calls: 9,
            },
            ready: true,
        };
        let text = render(&sample, &counters);
        for line in [
            "isthmus_peers 1",
            "isthmus_peer_last_handshake_seconds{peer=\"aws-1\"} 1700000000",
            "isthmus_peer_rx_bytes_total{peer=\"aws-1\"} 10",
            "isthmus_peer_tx_bytes_total{peer=\"aws-1\"} 20",
            "isthmus_peer_path_mtu_bytes{peer=\"aws-1\"} 1240",
            "isthmus_dropped_packets_total{reason=\"no_route\"} 1",
            "isthmus_dropped_packets_total{reason=\"io_error\"} 1",
            "isthmus_handshake_failures_total{reason=\"handshake_rejected\"} 1",
            "isthmus_routing_reassertions_total 3",
            "isthmus_gro_merged_packets_total{proto=\"tcp\"} 44",
            "isthmus_gro_merged_packets_total{proto=\"udp\"} 130",
            "isthmus_gro_writes_total{proto=\"udp\"} 3",
            "isthmus_gro_merged_packets_total{proto=\"vxlan\"} 90",
            "isthmus_gro_writes_total{proto=\"vxlan\"} 2",
            "isthmus_sent_datagrams_total 640",
            "isthmus_send_calls_total 21",
            "isthmus_received_datagrams_total 512",
            "isthmus_receive_calls_total 9",
            "isthmus_reconcile_duration_seconds_count 1",
            "isthmus_ready 1",
            "isthmus_key_rotations_total 1",
            "# TYPE isthmus_peer_rx_bytes counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("handshake_failures_total{reason=\"no_route\"}"),
            "{text}"
        );
    }
}
