//! The agent's health report: per tunnel, the peer node, its latest handshake and rx/tx,
//! written into this node's own WireGuardPeer status every few seconds (its own field
//! manager; the admission policy keeps it off the coordinator's fields). The coordinator
//! turns the reports into `MeshConnected`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_api::{MeshHealth, PeerHealth, WireGuardPeer, AGENT_MANAGER};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::ResourceExt;

use isthmus_wg::tunnel::Tunnel;
use isthmus_wg::DeviceSnapshot;

use super::probe::PathMtus;

fn time(t: SystemTime) -> Option<Time> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Timestamp::from_second(i64::try_from(secs).ok()?)
        .ok()
        .map(Time)
}

/// The reading for `snapshot`, naming peers after their WireGuardPeers (a key no peer
/// publishes is left out: the coordinator could not place it anyway). Sorted by node.
pub fn reading(
    snapshot: &DeviceSnapshot,
    peers: &[Arc<WireGuardPeer>],
    path_mtus: &BTreeMap<String, u16>,
    now: SystemTime,
) -> Option<MeshHealth> {
    let mut out: Vec<PeerHealth> = snapshot
        .peers
        .iter()
        .filter_map(|p| {
            let key = p.public_key.to_base64();
            let node = peers.iter().find(|w| w.spec.public_key == key)?.name_any();
            Some(PeerHealth {
                path_mtu: path_mtus.get(&node).map(|m| i32::from(*m)),
                node,
                latest_handshake: p.last_handshake.and_then(time),
                rx_bytes: i64::try_from(p.rx_bytes).unwrap_or(i64::MAX),
                tx_bytes: i64::try_from(p.tx_bytes).unwrap_or(i64::MAX),
            })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Some(MeshHealth {
        observed_time: time(now)?,
        lowest_path_mtu: out.iter().filter_map(|p| p.path_mtu).min(),
        peers: out,
    })
}

/// Reports every `interval` until the task is dropped.
pub async fn report_loop(
    api: Api<WireGuardPeer>,
    node: String,
    tunnel: Arc<Tunnel>,
    store: Store<WireGuardPeer>,
    interval: Duration,
    path_mtus: PathMtus,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ssa = PatchParams::apply(AGENT_MANAGER).force();
    loop {
        tick.tick().await;
        if !store.state().iter().any(|p| p.name_any() == node) {
            continue;
        }
        let Some(health) = reading(
            &tunnel.engine().snapshot(),
            &store.state(),
            &path_mtus.lock().clone(),
            SystemTime::now(),
        ) else {
            continue;
        };
        let body = serde_json::json!({
            "apiVersion": "isthmus.dev/v1alpha1",
            "kind": "WireGuardPeer",
            "metadata": {"name": node},
            "status": {"health": health},
        });
        if let Err(e) = api.patch_status(&node, &ssa, &Patch::Apply(body)).await {
            tracing::warn!(error = %e, "health report not written; next try in {interval:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::WireGuardPeerSpec;
    use isthmus_wg::key::Key;
    use isthmus_wg::PeerSnapshot;

    fn h_spec(key: Key) -> WireGuardPeerSpec {
        WireGuardPeerSpec {
            public_key: key.to_base64(),
            endpoint: "203.0.113.2:51801".into(),
            location: "aws".into(),
            node_ip: "10.0.0.11".into(),
            pod_cidrs: vec![],
            vtep: None,
            persistent_keepalive: None,
            mtu: None,
        }
    }

    #[test]
    fn names_peers_and_times_handshakes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let known = Key([1; 32]);
        let peer = |key: Key, hs: Option<u64>| PeerSnapshot {
            public_key: key,
            preshared_key: None,
            endpoint: None,
            last_handshake: hs.map(|a| now - Duration::from_secs(a)),
            tx_bytes: 7,
            rx_bytes: 9,
            persistent_keepalive: 0,
            allowed_ips: vec![],
        };
        let snap = DeviceSnapshot {
            peers: vec![peer(known, Some(30)), peer(Key([2; 32]), None)],
            ..Default::default()
        };
        let wgp = Arc::new(WireGuardPeer::new("aws-1", h_spec(known)));
        let h = reading(&snap, &[wgp], &BTreeMap::new(), now).unwrap();
        assert_eq!(h.observed_time.0.as_second(), 1_800_000_000);
        assert_eq!(h.peers.len(), 1, "an unpublished key is left out");
        assert_eq!(h.peers[0].node, "aws-1");
        assert_eq!(
            h.peers[0]
                .latest_handshake
                .as_ref()
                .map(|t| t.0.as_second()),
            Some(1_800_000_000 - 30)
        );
        assert_eq!((h.peers[0].rx_bytes, h.peers[0].tx_bytes), (9, 7));
        assert_eq!((h.peers[0].path_mtu, h.lowest_path_mtu), (None, None));
        let measured = BTreeMap::from([("aws-1".to_string(), 1240u16)]);
        let wgp = Arc::new(WireGuardPeer::new("aws-1", h_spec(known)));
        let h = reading(&snap, &[wgp], &measured, now).unwrap();
        assert_eq!(
            (h.peers[0].path_mtu, h.lowest_path_mtu),
            (Some(1240), Some(1240))
        );
    }
}
