//! The agent's health report: a summary of its tunnels — how many are up of how many it
//! wants, the names of those that are down, the lowest path MTU and the paths below the
//! tunnel MTU — written into this node's own WireGuardPeer status (its own field manager;
//! the admission policy keeps it off the coordinator's fields). The coordinator turns the
//! reports into `MeshConnected`.
//!
//! Why a summary written on change: every agent watches every WireGuardPeer, so anything
//! rewritten there on a timer costs N² in watch traffic and agent memory. The summary does
//! not grow while the mesh is healthy, and the agent writes it only when it changes (checked
//! every few seconds, locally). That the agent is alive goes elsewhere: it renews its own
//! Lease every heartbeat (`--health-interval`, 60 s; [`isthmus_api::heartbeat`]), which only
//! the coordinator watches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use isthmus_api::{heartbeat, MeshHealth, PeerPathMtu, WireGuardPeer, AGENT_MANAGER};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::ResourceExt;

use isthmus_wg::key::Key;
use isthmus_wg::tunnel::Tunnel;
use isthmus_wg::DeviceSnapshot;

use super::mesh;
use super::probe::PathMtus;

/// How often the agent looks for a change (no API call unless something changed): a tunnel
/// going down reaches the API within this, not within a heartbeat.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

fn time(t: SystemTime) -> Option<Time> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Timestamp::from_second(i64::try_from(secs).ok()?)
        .ok()
        .map(Time)
}

/// What the summary is computed from, besides the device.
pub struct Want<'a> {
    /// The peers this node wants a tunnel with (the mesh plan's), by public key.
    pub peers: &'a BTreeMap<Key, String>,
    /// The path MTUs probing found, by node.
    pub path_mtus: &'a BTreeMap<String, u16>,
    pub tunnel_mtu: u16,
    /// A tunnel whose latest handshake is older than this is down (WireGuard rejects a
    /// session after 180 s; a keepalive-driven tunnel renews every 120 s).
    pub handshake_stale: Duration,
}

/// The summary for `snapshot`: a wanted peer is up when the device holds a handshake with it
/// younger than the threshold; every other wanted peer (never handshook, stale, or not on the
/// device yet) is down, by name.
pub fn summary(snapshot: &DeviceSnapshot, want: &Want, now: SystemTime) -> Option<MeshHealth> {
    let handshakes: std::collections::HashMap<&Key, Option<SystemTime>> = snapshot
        .peers
        .iter()
        .map(|p| (&p.public_key, p.last_handshake))
        .collect();
    let up = |key: &Key| {
        handshakes
            .get(key)
            .copied()
            .flatten()
            // A handshake dated ahead of the clock is a fresh one.
            .is_some_and(|h| now.duration_since(h).unwrap_or_default() <= want.handshake_stale)
    };
    let mut down_peers: Vec<String> = want
        .peers
        .iter()
        .filter(|(k, _)| !up(k))
        .map(|(_, n)| n.clone())
        .collect();
    down_peers.sort();
    let measured = want
        .peers
        .values()
        .filter_map(|n| Some((n, *want.path_mtus.get(n)?)));
    let mut path_mtus: Vec<PeerPathMtu> = measured
        .clone()
        .filter(|(_, m)| *m < want.tunnel_mtu)
        .map(|(n, m)| PeerPathMtu {
            node: n.clone(),
            path_mtu: i32::from(m),
        })
        .collect();
    path_mtus.sort_by(|a, b| a.node.cmp(&b.node));
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    Some(MeshHealth {
        observed_time: time(now)?,
        peers_up: count(want.peers.len() - down_peers.len()),
        peers_expected: count(want.peers.len()),
        down_peers,
        lowest_path_mtu: measured.map(|(_, m)| i32::from(m)).min(),
        path_mtus,
    })
}

/// Whether `current` is worth a write, given the last report written (`None`: none yet, or
/// lost): when its summary changed. While the heartbeat Lease cannot be renewed (a cluster
/// whose RBAC predates Leases), also when the last one is a heartbeat old: the report is
/// then the only sign of life the coordinator gets.
pub fn due(
    last: Option<&MeshHealth>,
    current: &MeshHealth,
    heartbeat: Duration,
    lease_renewed: bool,
) -> bool {
    let Some(last) = last else { return true };
    if !last.same_summary(current) {
        return true;
    }
    if lease_renewed {
        return false;
    }
    let age = current.observed_time.0.as_second() - last.observed_time.0.as_second();
    age >= i64::try_from(heartbeat.as_secs()).unwrap_or(i64::MAX)
}

/// Writes `health` into `node`'s WireGuardPeer status with the agent's field manager: the
/// report's one wire format, also used by the scale test's emulated agents.
pub async fn write(
    api: &Api<WireGuardPeer>,
    node: &str,
    health: &MeshHealth,
) -> kube::Result<WireGuardPeer> {
    let body = serde_json::json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": node},
        "status": {"health": health},
    });
    api.patch_status(
        node,
        &PatchParams::apply(AGENT_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
}

/// Renews `node`'s heartbeat Lease in `leases`' namespace (creating it if need be), owned
/// by its WireGuardPeer `owner` when known.
pub async fn renew(
    leases: &Api<Lease>,
    namespace: &str,
    node: &str,
    heartbeat: Duration,
    owner: Option<&str>,
) -> anyhow::Result<()> {
    let body = heartbeat::renewal(
        node,
        namespace,
        heartbeat.as_secs(),
        owner,
        Timestamp::now(),
    )
    .map_err(anyhow::Error::msg)?;
    let name = heartbeat::lease_name(node).map_err(anyhow::Error::msg)?;
    leases
        .patch(
            &name,
            &PatchParams::apply(AGENT_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .with_context(|| format!("renewing Lease {namespace}/{name}"))?;
    Ok(())
}

/// The report loop's settings.
pub struct Settings {
    pub heartbeat: Duration,
    /// Where the heartbeat Lease lives.
    pub namespace: String,
    pub handshake_stale: Duration,
    pub tunnel_mtu: u16,
}

/// Checks every [`CHECK_EVERY`] (or every heartbeat, if shorter) and writes when [`due`],
/// until the task is dropped.
pub async fn report_loop(
    api: Api<WireGuardPeer>,
    node: String,
    tunnel: Arc<Tunnel>,
    store: Store<WireGuardPeer>,
    settings: Settings,
    path_mtus: PathMtus,
) {
    let mut tick = tokio::time::interval(CHECK_EVERY.min(settings.heartbeat));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<MeshHealth> = None;
    let leases: Api<Lease> = Api::namespaced(api.clone().into_client(), &settings.namespace);
    // When the Lease was last renewed or tried, and whether that worked.
    let mut lease_tried: Option<tokio::time::Instant> = None;
    let mut lease_renewed = false;
    loop {
        // The tick's own deadline, not the time it ran: a renewal then falls every
        // heartbeat, not a check period late whenever the last one ran a little after its
        // tick.
        let now = tick.tick().await;
        let state = store.state();
        let me = state.iter().find(|p| p.name_any() == node);
        if lease_tried.is_none_or(|t| now.duration_since(t) >= settings.heartbeat) {
            lease_tried = Some(now);
            let owner = me.and_then(|p| p.metadata.uid.as_deref());
            match renew(
                &leases,
                &settings.namespace,
                &node,
                settings.heartbeat,
                owner,
            )
            .await
            {
                Ok(()) if !lease_renewed => {
                    tracing::info!(namespace = %settings.namespace, "heartbeat Lease renewed");
                    lease_renewed = true;
                }
                Ok(()) => {}
                Err(e) => {
                    // Said once, not every heartbeat: the report carries the heartbeat then.
                    if lease_renewed || written.is_none() {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "heartbeat Lease not renewed; the health report carries the heartbeat"
                        );
                    }
                    lease_renewed = false;
                }
            }
        }
        let Some(me) = me else {
            continue;
        };
        // The object was recreated, or its report removed by hand: what was written is gone.
        // (Allow the watch a few seconds to deliver a write of ours.)
        let stored = me.status.as_ref().and_then(|s| s.health.as_ref());
        if stored.is_none()
            && written
                .as_ref()
                .and_then(|w| u64::try_from(w.observed_time.0.as_second()).ok())
                .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
                .is_some_and(|at| at.elapsed().unwrap_or_default() > CHECK_EVERY * 2)
        {
            written = None;
        }
        let peers: Vec<WireGuardPeer> = state.iter().map(|p| (**p).clone()).collect();
        let plan = mesh::plan(&node, &peers);
        if !plan.admitted {
            continue;
        }
        let Some(health) = summary(
            &tunnel.engine().snapshot(),
            &Want {
                peers: &plan.names,
                path_mtus: &path_mtus.lock().clone(),
                tunnel_mtu: settings.tunnel_mtu,
                handshake_stale: settings.handshake_stale,
            },
            SystemTime::now(),
        ) else {
            continue;
        };
        if !due(written.as_ref(), &health, settings.heartbeat, lease_renewed) {
            continue;
        }
        match write(&api, &node, &health).await {
            Ok(_) => {
                if written.as_ref().is_none_or(|w| !w.same_summary(&health)) {
                    tracing::info!(
                        up = health.peers_up,
                        expected = health.peers_expected,
                        down = ?health.down_peers,
                        "health report changed"
                    );
                }
                written = Some(health);
            }
            Err(e) => {
                tracing::warn!(error = %e, "health report not written; next try in {CHECK_EVERY:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_wg::PeerSnapshot;

    const NOW: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn key(i: usize) -> Key {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        Key(k)
    }

    /// A device with peer `i` handshaken `age` seconds ago (`None`: never).
    fn device(ages: &[Option<u64>]) -> DeviceSnapshot {
        DeviceSnapshot {
            peers: ages
                .iter()
                .enumerate()
                .map(|(i, a)| PeerSnapshot {
                    public_key: key(i),
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: a.map(|a| at(NOW - a)),
                    tx_bytes: 7,
                    rx_bytes: 9,
                    persistent_keepalive: 0,
                    allowed_ips: vec![],
                })
                .collect(),
            ..Default::default()
        }
    }

    fn names(n: usize) -> BTreeMap<Key, String> {
        (0..n).map(|i| (key(i), format!("node-{i:04}"))).collect()
    }

    fn want<'a>(peers: &'a BTreeMap<Key, String>, mtus: &'a BTreeMap<String, u16>) -> Want<'a> {
        Want {
            peers,
            path_mtus: mtus,
            tunnel_mtu: 1420,
            handshake_stale: Duration::from_secs(180),
        }
    }

    #[test]
    fn summary_table() {
        // (name, handshake ages on the device, wanted peers, path MTUs) →
        // (up, expected, down, lowest, below-tunnel-MTU entries)
        type Row<'a> = (
            &'a str,
            Vec<Option<u64>>,
            usize,
            Vec<(&'a str, u16)>,
            (i32, i32, Vec<&'a str>, Option<i32>, Vec<(&'a str, i32)>),
        );
        let rows: Vec<Row> = vec![
            (
                "all up at full size: nothing per peer",
                vec![Some(30), Some(179)],
                2,
                vec![("node-0000", 1420), ("node-0001", 1420)],
                (2, 2, vec![], Some(1420), vec![]),
            ),
            (
                "stale and never are down, by name",
                vec![Some(181), None, Some(10)],
                3,
                vec![],
                (1, 3, vec!["node-0000", "node-0001"], None, vec![]),
            ),
            (
                "a wanted peer not on the device yet is down",
                vec![Some(10)],
                2,
                vec![],
                (1, 2, vec!["node-0001"], None, vec![]),
            ),
            (
                "a device peer nobody wants is not counted",
                vec![Some(10), Some(10)],
                1,
                vec![],
                (1, 1, vec![], None, vec![]),
            ),
            (
                "only paths below the tunnel MTU are listed",
                vec![Some(10), Some(10)],
                2,
                vec![("node-0000", 1420), ("node-0001", 1280), ("gone", 1200)],
                (2, 2, vec![], Some(1280), vec![("node-0001", 1280)]),
            ),
        ];
        for (name, ages, wanted, mtus, (up, expected, down, lowest, listed)) in rows {
            let peers = names(wanted);
            let mtus: BTreeMap<String, u16> =
                mtus.into_iter().map(|(n, m)| (n.to_string(), m)).collect();
            let h = summary(&device(&ages), &want(&peers, &mtus), at(NOW)).unwrap();
            assert_eq!(h.observed_time.0.as_second(), NOW as i64, "{name}");
            assert_eq!(
                (h.peers_up, h.peers_expected, h.down_peers.clone()),
                (up, expected, down.iter().map(|s| s.to_string()).collect()),
                "{name}"
            );
            assert_eq!(h.lowest_path_mtu, lowest, "{name}");
            let got: Vec<(&str, i32)> = h
                .path_mtus
                .iter()
                .map(|p| (p.node.as_str(), p.path_mtu))
                .collect();
            assert_eq!(got, listed, "{name}");
        }
        // Ahead of the clock: up.
        let peers = names(1);
        let mut ahead = device(&[None]);
        ahead.peers[0].last_handshake = Some(at(NOW + 20));
        let h = summary(&ahead, &want(&peers, &BTreeMap::new()), at(NOW)).unwrap();
        assert_eq!((h.peers_up, h.down_peers.len()), (1, 0));
    }

    #[test]
    fn due_on_change_or_heartbeat_only() {
        let peers = names(3);
        let mtus = BTreeMap::new();
        let w = want(&peers, &mtus);
        let healthy = device(&[Some(10), Some(10), Some(10)]);
        let last = summary(&healthy, &w, at(NOW)).unwrap();
        let beat = Duration::from_secs(60);
        let later = |s: u64, d: &DeviceSnapshot| summary(d, &w, at(NOW + s)).unwrap();
        // (name, last written, current, due)
        // (case, last written, current) → due (Lease renewed, Lease failing)
        type Row<'a> = (&'a str, Option<&'a MeshHealth>, MeshHealth, (bool, bool));
        let rows: Vec<Row> = vec![
            (
                "nothing written yet",
                None,
                later(1, &healthy),
                (true, true),
            ),
            (
                "same summary, 5 s later",
                Some(&last),
                later(5, &healthy),
                (false, false),
            ),
            (
                "same summary, 59 s later",
                Some(&last),
                later(59, &healthy),
                (false, false),
            ),
            // The Lease carries the heartbeat; without it, the report does.
            (
                "same summary, a heartbeat later",
                Some(&last),
                later(60, &healthy),
                (false, true),
            ),
            // Handshakes renewing and counters moving change nothing written.
            (
                "handshakes renewed",
                Some(&last),
                later(30, &device(&[Some(1), Some(2), Some(3)])),
                (false, false),
            ),
            (
                "a tunnel went down",
                Some(&last),
                later(5, &device(&[Some(10), Some(400), Some(10)])),
                (true, true),
            ),
        ];
        for (name, last, current, (with_lease, without)) in rows {
            assert_eq!(
                due(last, &current, beat, true),
                with_lease,
                "{name}, Lease renewed"
            );
            assert_eq!(
                due(last, &current, beat, false),
                without,
                "{name}, no Lease"
            );
        }
        let mut smaller = later(5, &healthy);
        smaller.lowest_path_mtu = Some(1300);
        assert!(due(Some(&last), &smaller, beat, true), "a path MTU changed");
    }

    /// The report's size in bytes (the body the agent applies) for a healthy node with N
    /// peers, and the worst case of all of them down. `--nocapture` prints them.
    #[test]
    fn report_size_does_not_grow_with_a_healthy_mesh() {
        let body = |h: &MeshHealth| {
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "isthmus.dev/v1alpha1",
                "kind": "WireGuardPeer",
                "metadata": {"name": "node-9999"},
                "status": {"health": h},
            }))
            .unwrap()
            .len()
        };
        let mut healthy_sizes = vec![];
        for n in [100, 500, 1000] {
            let peers = names(n);
            let mtus: BTreeMap<String, u16> = peers.values().map(|p| (p.clone(), 1420)).collect();
            let healthy = summary(&device(&vec![Some(30); n]), &want(&peers, &mtus), at(NOW));
            let all_down = summary(&device(&vec![None; n]), &want(&peers, &mtus), at(NOW));
            let (healthy, all_down) = (body(&healthy.unwrap()), body(&all_down.unwrap()));
            println!("N={n}: healthy report {healthy} bytes, all {n} down {all_down} bytes");
            healthy_sizes.push(healthy);
        }
        assert!(healthy_sizes.iter().all(|s| *s < 256), "{healthy_sizes:?}");
        assert_eq!(
            healthy_sizes[0] + 2,
            healthy_sizes[2],
            "only the digits of the counts grow"
        );
    }
}
