//! `isthmus-agent status`: this node's public key, mode, topology, mesh IP, journal state,
//! API connectivity and a peer summary, from what the agent left in its state directory and
//! its UAPI socket.

use serde::Serialize;

use super::peers::{PeerRow, State};
use super::table;
use crate::control::runtime::Runtime;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub public_key: Option<String>,
    /// Whether an agent holds the state directory right now.
    pub agent_running: bool,
    /// The agent's last report (`None`: it never ran here).
    pub runtime: Option<Runtime>,
    /// Entries the routing journal would restore.
    pub journal_entries: usize,
    pub peers: PeerCounts,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerCounts {
    pub up: usize,
    pub stale: usize,
    pub never: usize,
}

pub fn count(rows: &[PeerRow]) -> PeerCounts {
    let mut c = PeerCounts::default();
    for r in rows {
        match r.state {
            State::Up => c.up += 1,
            State::Stale => c.stale += 1,
            State::Never => c.never += 1,
        }
    }
    c
}

/// The human form: one `field: value` per line.
pub fn render(s: &Status) -> String {
    let r = s.runtime.clone().unwrap_or_default();
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let api = if !s.agent_running {
        "unknown (agent not running)".to_string()
    } else if r.api_reachable {
        "reachable".to_string()
    } else {
        format!("unreachable: {}", or_dash(r.api_error.clone()))
    };
    let rows = vec![
        (
            "node",
            if r.node.is_empty() {
                "-".into()
            } else {
                r.node.clone()
            },
        ),
        ("public key", or_dash(s.public_key.clone())),
        (
            "key rotation",
            match &r.rotating_to {
                Some(next) => format!("moving to {next} ({} done)", r.key_rotations),
                None => format!("idle ({} done)", r.key_rotations),
            },
        ),
        (
            "agent",
            if s.agent_running {
                "running"
            } else {
                "not running"
            }
            .into(),
        ),
        (
            "interface",
            format!("{} (port {}, mtu {})", r.iface, r.listen_port, r.mtu),
        ),
        ("mode", r.mode.clone()),
        ("topology", or_dash(r.topology.clone())),
        ("mesh IP", or_dash(r.mesh_ip.clone())),
        ("admitted", if r.admitted { "yes" } else { "no" }.into()),
        ("API", api),
        (
            "journal",
            match s.journal_entries {
                0 => "empty (nothing to restore)".to_string(),
                n => format!("{n} entries to restore on removal"),
            },
        ),
        (
            "routing",
            if r.routing_ok {
                "asserted"
            } else {
                "not yet asserted"
            }
            .into(),
        ),
        (
            "peers",
            format!(
                "{} up, {} stale, {} never",
                s.peers.up, s.peers.stale, s.peers.never
            ),
        ),
    ];
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, v)| vec![format!("{k}:"), v])
        .collect();
    // The table helper's header row is not wanted here: render and drop it.
    let out = table::render(&["", ""], &cells);
    out.lines().skip(1).map(|l| format!("{l}\n")).collect()
}
