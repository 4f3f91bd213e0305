//! `isthmus-agent peers`: one row per configured peer — node, location, endpoint, mesh IP,
//! latest handshake age, rx/tx, the path MTU probing found and a state an operator can act
//! on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_api::WireGuardPeer;
use kube::ResourceExt;
use serde::Serialize;

use super::{human_age, human_bytes, table};
use isthmus_wg::uapi::client::age;
use isthmus_wg::DeviceSnapshot;

/// A session older than this cannot carry data any more (WireGuard's Reject-After-Time):
/// with keepalives on, a healthy peer re-handshakes every two minutes, well inside it.
pub const STALE_AFTER: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A handshake within [`STALE_AFTER`].
    Up,
    /// Handshook once, not recently: the peer is gone or unreachable.
    Stale,
    /// Never handshook.
    Never,
}

/// One peer, as printed. JSON field names are part of the CLI's stable interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    /// The node, from its WireGuardPeer (absent when the API is unreachable or the key is
    /// not published there).
    pub node: Option<String>,
    pub location: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    #[serde(rename = "meshIP")]
    pub mesh_ip: Option<String>,
    /// Unix seconds of the latest handshake.
    pub latest_handshake: Option<u64>,
    pub handshake_age_seconds: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The largest packet the path to the peer carries through the tunnel, as the running
    /// agent's probing found it (absent: not measured, or no agent running).
    #[serde(rename = "pathMTU")]
    pub path_mtu: Option<u16>,
    pub state: State,
}

/// Fills in the path MTUs the agent found (by node name).
pub fn with_path_mtus(rows: &mut [PeerRow], path_mtus: &std::collections::BTreeMap<String, u16>) {
    for r in rows {
        r.path_mtu = r.node.as_ref().and_then(|n| path_mtus.get(n)).copied();
    }
}

/// Joins the tunnel's view (`snapshot`) with the API's (`peers`), sorted by node then key.
pub fn rows(snapshot: &DeviceSnapshot, peers: &[WireGuardPeer], now: SystemTime) -> Vec<PeerRow> {
    let mut out: Vec<PeerRow> = snapshot
        .peers
        .iter()
        .map(|p| {
            let key = p.public_key.to_base64();
            let wgp = peers.iter().find(|w| w.spec.public_key == key);
            let handshake_age = p.last_handshake.map(|t| age(t, now));
            let state = match handshake_age {
                None => State::Never,
                Some(a) if a <= STALE_AFTER => State::Up,
                Some(_) => State::Stale,
            };
            PeerRow {
                node: wgp.map(|w| w.name_any()),
                location: wgp.map(|w| w.spec.location.clone()),
                public_key: key,
                endpoint: p.endpoint.map(|e| e.to_string()),
                mesh_ip: wgp
                    .and_then(|w| w.status.as_ref())
                    .and_then(|s| s.mesh_ip.clone()),
                latest_handshake: p
                    .last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                handshake_age_seconds: handshake_age.map(|a| a.as_secs()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                path_mtu: None,
                state,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.node, &a.public_key).cmp(&(&b.node, &b.public_key)));
    out
}

/// The human table.
pub fn render(rows: &[PeerRow]) -> String {
    let dash = || "-".to_string();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.node.clone().unwrap_or_else(|| {
                    format!("({}…)", r.public_key.chars().take(8).collect::<String>())
                }),
                r.location.clone().unwrap_or_else(dash),
                r.endpoint.clone().unwrap_or_else(|| "(none)".into()),
                r.mesh_ip.clone().unwrap_or_else(dash),
                r.handshake_age_seconds
                    .map(|s| format!("{} ago", human_age(Duration::from_secs(s))))
                    .unwrap_or_else(|| "never".into()),
                human_bytes(r.rx_bytes),
                human_bytes(r.tx_bytes),
                r.path_mtu.map_or_else(dash, |m| m.to_string()),
                serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table::render(
        &[
            "NODE",
            "LOCATION",
            "ENDPOINT",
            "MESH-IP",
            "HANDSHAKE",
            "RX",
            "TX",
            "PATH-MTU",
            "STATE",
        ],
        &cells,
    )
}

/// The JSON document: `{"peers": [...]}`.
pub fn json(rows: &[PeerRow]) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(
        &serde_json::json!({ "peers": rows }),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_api::{WireGuardPeerSpec, WireGuardPeerStatus};
    use isthmus_wg::key::Key;
    use isthmus_wg::PeerSnapshot;

    fn wgp(name: &str, key: &Key, location: &str, mesh: &str) -> WireGuardPeer {
        let mut p = WireGuardPeer::new(
            name,
            WireGuardPeerSpec {
                public_key: key.to_base64(),
                endpoint: "203.0.113.2:51801".into(),
                location: location.into(),
                node_ip: "10.0.0.11".into(),
                pod_cidrs: vec![],
                vtep: None,
                vtep6: None,
                persistent_keepalive: None,
                mtu: None,
                key_proof: None,
            },
        );
        p.status = Some(WireGuardPeerStatus {
            mesh_ip: Some(mesh.into()),
            ..Default::default()
        });
        p
    }

    fn peer(key: Key, handshake_ago: Option<u64>, now: SystemTime) -> PeerSnapshot {
        PeerSnapshot {
            public_key: key,
            preshared_key: None,
            endpoint: Some("203.0.113.2:51801".parse().unwrap()),
            last_handshake: handshake_ago.map(|s| now - Duration::from_secs(s)),
            tx_bytes: 2048,
            rx_bytes: 1024 * 1024,
            persistent_keepalive: 5,
            allowed_ips: vec![],
        }
    }

    #[test]
    fn states_names_and_both_outputs() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (k1, k2, k3) = (Key([1; 32]), Key([2; 32]), Key([3; 32]));
        let snap = DeviceSnapshot {
            peers: vec![
                peer(k1, Some(12), now),
                peer(k2, Some(600), now),
                peer(k3, None, now),
            ],
            ..Default::default()
        };
        let api = vec![
            wgp("aws-1", &k1, "aws", "100.96.0.3"),
            wgp("aws-2", &k2, "aws", "100.96.0.4"),
        ];
        let mut rows = rows(&snap, &api, now);
        with_path_mtus(
            &mut rows,
            &std::collections::BTreeMap::from([("aws-1".to_string(), 1240)]),
        );
        let states: Vec<(Option<&str>, State)> =
            rows.iter().map(|r| (r.node.as_deref(), r.state)).collect();
        assert_eq!(
            states,
            vec![
                (None, State::Never),
                (Some("aws-1"), State::Up),
                (Some("aws-2"), State::Stale)
            ]
        );
        let table = render(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NODE "), "{table}");
        assert!(
            lines[2].contains("aws-1")
                && lines[2].contains("12s ago")
                && lines[2].contains("1.00 MiB")
                && lines[2].contains(" 1240 ")
                && lines[2].ends_with("up"),
            "{table}"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&rows).unwrap()).unwrap();
        let first = &doc["peers"][1];
        assert_eq!(first["node"], "aws-1");
        assert_eq!(first["meshIP"], "100.96.0.3");
        assert_eq!(first["handshakeAgeSeconds"], 12);
        assert_eq!(first["rxBytes"], 1024 * 1024);
        assert_eq!(first["state"], "up");
        assert_eq!(first["pathMTU"], 1240);
        assert_eq!(doc["peers"][2]["pathMTU"], serde_json::Value::Null);
        assert_eq!(doc["peers"][0]["latestHandshake"], serde_json::Value::Null);
    }
}
