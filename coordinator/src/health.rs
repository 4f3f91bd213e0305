//! `MeshConnected`: whether every tunnel the topology wants for a node is up, from the
//! health readings the agents write into their own WireGuardPeers. Pure, so every case —
//! all up, a stale handshake, a silent agent, nothing wanted — is a table row.
//!
//! A pair is up when either end reported, recently, a handshake that is itself recent: a
//! handshake is mutual, so one fresh witness is enough. A node whose own agent has stopped
//! reporting is not connected, whatever its peers say: nobody could tell if its routing
//! still stands.

use std::collections::BTreeMap;

use isthmus_api::Topology;

/// One agent's reading: when it was taken, and per peer node the latest handshake
/// (`None`: never), all in Unix seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub observed: i64,
    pub handshakes: BTreeMap<String, Option<i64>>,
}

/// An admitted peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub location: String,
    pub report: Option<Report>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// A handshake older than this no longer counts (WireGuard rejects a session after
    /// 180 s; a healthy keepalive-driven tunnel renews every 120 s).
    pub handshake: i64,
    /// A reading older than this means the agent stopped reporting.
    pub report: i64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            handshake: 180,
            report: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub connected: bool,
    pub reason: &'static str,
    /// Starts with `up/wanted pairs up`, then names what is down.
    pub message: String,
}

fn fresh<'r>(report: Option<&'r Report>, now: i64, t: &Thresholds) -> Option<&'r Report> {
    report.filter(|r| now - r.observed <= t.report)
}

/// Whether `from`'s fresh report shows a recent handshake with `to`.
fn witnessed(from: &Member, to: &str, now: i64, t: &Thresholds) -> bool {
    fresh(from.report.as_ref(), now, t)
        .and_then(|r| r.handshakes.get(to).copied().flatten())
        .is_some_and(|h| now - h <= t.handshake)
}

/// How a down pair looks from `from`'s side, for the message. No ages in it: the message
/// stays the same while the state does, so the status is not rewritten every pass.
fn describe(from: &Member, to: &str, t: &Thresholds) -> String {
    match from
        .report
        .as_ref()
        .and_then(|r| r.handshakes.get(to).copied())
    {
        Some(Some(_)) => format!("{to} (no handshake for over {}s)", t.handshake),
        Some(None) => format!("{to} (never handshook)"),
        None => format!("{to} (not configured yet)"),
    }
}

/// The verdict for every member.
pub fn mesh_connected(
    members: &[Member],
    topology: Topology,
    now: i64,
    t: &Thresholds,
) -> BTreeMap<String, Verdict> {
    let mut out = BTreeMap::new();
    for me in members {
        let wanted: Vec<&Member> = members
            .iter()
            .filter(|o| o.name != me.name && topology.wants_tunnel(&me.location, &o.location))
            .collect();
        let down: Vec<String> = wanted
            .iter()
            .filter(|o| !witnessed(me, &o.name, now, t) && !witnessed(o, &me.name, now, t))
            .map(|o| describe(me, &o.name, t))
            .collect();
        let up = wanted.len() - down.len();
        let pairs = format!("{up}/{} pairs up", wanted.len());
        let verdict = match (&me.report, fresh(me.report.as_ref(), now, t)) {
            (None, _) => Verdict {
                connected: false,
                reason: "NoReport",
                message: format!("{pairs}; the agent has not reported yet"),
            },
            (Some(_), None) => Verdict {
                connected: false,
                reason: "ReportStale",
                message: format!("{pairs}; the agent has not reported for over {}s", t.report),
            },
            _ if !down.is_empty() => Verdict {
                connected: false,
                reason: "PairsDown",
                message: format!("{pairs}; down: {}", down.join(", ")),
            },
            _ if wanted.is_empty() => Verdict {
                connected: true,
                reason: "NoPairsWanted",
                message: format!("{pairs}: the topology wants no tunnel for this node yet"),
            },
            _ => Verdict {
                connected: true,
                reason: "AllPairsUp",
                message: pairs,
            },
        };
        out.insert(me.name.clone(), verdict);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    /// Report age and, per peer, the handshake's age (`None`: never).
    type Reading<'a> = (i64, &'a [(&'a str, Option<i64>)]);
    /// Name, members, then per member: name, connected, reason, message.
    type Row<'a> = (&'a str, Vec<Member>, Vec<(&'a str, bool, &'a str, &'a str)>);

    fn member(name: &str, location: &str, report: Option<Reading>) -> Member {
        Member {
            name: name.into(),
            location: location.into(),
            report: report.map(|(age, hs)| Report {
                observed: NOW - age,
                handshakes: hs
                    .iter()
                    .map(|(n, h)| (n.to_string(), h.map(|a| NOW - a)))
                    .collect(),
            }),
        }
    }

    fn verdicts(members: &[Member]) -> Vec<(String, bool, &'static str, String)> {
        mesh_connected(
            members,
            Topology::CrossLocation,
            NOW,
            &Thresholds::default(),
        )
        .into_iter()
        .map(|(n, v)| (n, v.connected, v.reason, v.message))
        .collect()
    }

    #[test]
    fn table() {
        // a1, a2 in "old"; b1 in "new". Ages in seconds.
        let rows: Vec<Row> = vec![
            (
                "all up, each side witnessing",
                vec![
                    member("a1", "old", Some((5, &[("b1", Some(30))]))),
                    member("a2", "old", Some((5, &[("b1", Some(100))]))),
                    member(
                        "b1",
                        "new",
                        Some((5, &[("a1", Some(30)), ("a2", Some(100))])),
                    ),
                ],
                vec![
                    ("a1", true, "AllPairsUp", "1/1 pairs up"),
                    ("a2", true, "AllPairsUp", "1/1 pairs up"),
                    ("b1", true, "AllPairsUp", "2/2 pairs up"),
                ],
            ),
            (
                "a stale handshake turns both ends false, with the pair named",
                vec![
                    member("a1", "old", Some((5, &[("b1", Some(30))]))),
                    member("a2", "old", Some((5, &[("b1", Some(400))]))),
                    member(
                        "b1",
                        "new",
                        Some((5, &[("a1", Some(30)), ("a2", Some(400))])),
                    ),
                ],
                vec![
                    ("a1", true, "AllPairsUp", "1/1 pairs up"),
                    (
                        "a2",
                        false,
                        "PairsDown",
                        "0/1 pairs up; down: b1 (no handshake for over 180s)",
                    ),
                    (
                        "b1",
                        false,
                        "PairsDown",
                        "1/2 pairs up; down: a2 (no handshake for over 180s)",
                    ),
                ],
            ),
            (
                "one fresh witness is enough; a silent agent is not connected itself",
                vec![
                    member("a1", "old", Some((5, &[("b1", Some(30))]))),
                    member("b1", "new", Some((300, &[("a1", Some(330))]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", "1/1 pairs up"),
                    (
                        "b1",
                        false,
                        "ReportStale",
                        "1/1 pairs up; the agent has not reported for over 60s",
                    ),
                ],
            ),
            (
                "never handshook, and an agent that never reported",
                vec![
                    member("a1", "old", Some((5, &[("b1", None)]))),
                    member("b1", "new", None),
                ],
                vec![
                    (
                        "a1",
                        false,
                        "PairsDown",
                        "0/1 pairs up; down: b1 (never handshook)",
                    ),
                    (
                        "b1",
                        false,
                        "NoReport",
                        "0/1 pairs up; the agent has not reported yet",
                    ),
                ],
            ),
            (
                "alone in its location: nothing wanted yet",
                vec![member("a1", "old", Some((5, &[])))],
                vec![(
                    "a1",
                    true,
                    "NoPairsWanted",
                    "0/0 pairs up: the topology wants no tunnel for this node yet",
                )],
            ),
        ];
        for (name, members, want) in rows {
            let want: Vec<(String, bool, &str, String)> = want
                .into_iter()
                .map(|(n, c, r, m)| (n.to_string(), c, r, m.to_string()))
                .collect();
            assert_eq!(verdicts(&members), want, "{name}");
        }
    }
}
