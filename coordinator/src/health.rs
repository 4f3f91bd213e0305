//! `MeshConnected`: whether every tunnel the topology wants for a node is up, from the
//! health summaries the agents write into their own WireGuardPeers. Pure, so every case —
//! all up, a pair down, a silent agent, nothing wanted — is a table row.
//!
//! Each agent decides for itself which of its tunnels are up (a handshake younger than its
//! `--handshake-stale-seconds`) and names the ones that are down. A pair is down when either
//! end's fresh report names the other: a handshake is mutual, so the two ends agree but for
//! the seconds between their checks, and an end that does not yet know the other (a join its
//! watch has not delivered) does not vouch for the pair while the other end calls it down.
//! A stale report names nothing. A node whose own agent has stopped reporting is not
//! connected, whatever its peers say: nobody could tell if its routing still stands.

use std::collections::{BTreeMap, BTreeSet};

use isthmus_api::Topology;

/// One agent's summary: when it was taken (Unix seconds) and the peers it reports down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub observed: i64,
    pub down: BTreeSet<String>,
}

/// An admitted peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub location: String,
    pub report: Option<Report>,
    /// Since when it is admitted (Unix seconds; `None`: admitted in this very pass).
    pub admitted: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// A report older than this means the agent stopped reporting. Agents write on change
    /// and otherwise once a heartbeat (60 s by default): three heartbeats, so one lost or
    /// slow write does not flip the condition.
    pub report: i64,
    /// How far ahead of the coordinator's clock a report may be dated and still count: more
    /// is a wrong (or lying) clock, and a report dated in the future would otherwise stay
    /// "fresh" long after its agent stopped.
    pub skew: i64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            report: 180,
            skew: 30,
        }
    }
}

/// Down pairs named in a message; the rest are counted, so a message stays short (and a
/// status small) however many pairs are down.
const NAMED_DOWN: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub connected: bool,
    pub reason: &'static str,
    pub message: String,
}

fn fresh<'r>(report: Option<&'r Report>, now: i64, t: &Thresholds) -> Option<&'r Report> {
    report.filter(|r| (-t.skew..=t.report).contains(&(now - r.observed)))
}

/// Whether `from`'s fresh report names `to` as down.
fn reports_down(from: &Member, to: &str, now: i64, t: &Thresholds) -> bool {
    fresh(from.report.as_ref(), now, t).is_some_and(|r| r.down.contains(to))
}

/// `down: a, b (no recent handshake)`, naming at most [`NAMED_DOWN`] pairs and counting the
/// rest. No ages in it: the message stays the same while the state does, so the status is
/// not rewritten every pass.
fn down_message(down: &[&str]) -> String {
    let named = down[..down.len().min(NAMED_DOWN)].join(", ");
    match down.len().saturating_sub(NAMED_DOWN) {
        0 => format!("down: {named} (no recent handshake)"),
        more => format!("down: {named} and {more} more (no recent handshake)"),
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
        // A pair with a node whose agent never reported is that node's `NoReport`, not a
        // fault of everyone it should reach: a join does not flip the whole other location.
        // Nor does a node admitted after `me` less than a report period ago: it is still
        // configuring its tunnels, handshaking and reporting, and its own verdict says so.
        let joined = |m: &Member| m.admitted.unwrap_or(now);
        let down: Vec<&str> = wanted
            .iter()
            .filter(|o| o.report.is_some())
            .filter(|o| !(joined(o) > joined(me) && now - joined(o) < t.report))
            .filter(|o| reports_down(me, &o.name, now, t) || reports_down(o, &me.name, now, t))
            .map(|o| o.name.as_str())
            .collect();
        // No counts of wanted pairs in any message: they change on every join and would
        // rewrite every peer's status for nothing.
        let verdict = match (&me.report, fresh(me.report.as_ref(), now, t)) {
            (None, _) => Verdict {
                connected: false,
                reason: "NoReport",
                message: "the agent has not reported yet".into(),
            },
            (Some(r), None) if r.observed > now => Verdict {
                connected: false,
                reason: "ReportFromTheFuture",
                message: format!(
                    "the agent's report is dated more than {}s ahead of the coordinator's clock; \
                     check the node's clock",
                    t.skew
                ),
            },
            (Some(_), None) => Verdict {
                connected: false,
                reason: "ReportStale",
                message: format!("the agent has not reported for over {}s", t.report),
            },
            _ if !down.is_empty() => Verdict {
                connected: false,
                reason: "PairsDown",
                message: down_message(&down),
            },
            _ if wanted.is_empty() => Verdict {
                connected: true,
                reason: "NoPairsWanted",
                message: "the topology wants no tunnel for this node yet".into(),
            },
            _ => Verdict {
                connected: true,
                reason: "AllPairsUp",
                message: "every tunnel the topology wants is up".into(),
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
    const ALL_UP: &str = "every tunnel the topology wants is up";

    /// Report age and the peers it names down.
    type Reading<'a> = (i64, &'a [&'a str]);
    /// Name, members, then per member: name, connected, reason, message.
    type Row<'a> = (&'a str, Vec<Member>, Vec<(&'a str, bool, &'a str, &'a str)>);

    fn member(name: &str, location: &str, report: Option<Reading>) -> Member {
        Member {
            admitted: None,
            name: name.into(),
            location: location.into(),
            report: report.map(|(age, down)| Report {
                observed: NOW - age,
                down: down.iter().map(|n| n.to_string()).collect(),
            }),
        }
    }

    /// `m`, admitted `ago` seconds before now.
    fn admitted(m: Member, ago: i64) -> Member {
        Member {
            admitted: Some(NOW - ago),
            ..m
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
        // a1, a2 in "old"; b1 in "new". Ages in seconds (the report threshold is 180 s).
        let rows: Vec<Row> = vec![
            (
                "all up: nobody names anybody down",
                vec![
                    member("a1", "old", Some((5, &[]))),
                    member("a2", "old", Some((170, &[]))),
                    member("b1", "new", Some((5, &[]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("a2", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                ],
            ),
            (
                "a pair down turns both ends false, with the other end named",
                vec![
                    member("a1", "old", Some((5, &[]))),
                    member("a2", "old", Some((5, &["b1"]))),
                    member("b1", "new", Some((5, &["a2"]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("a2", false, "PairsDown", "down: b1 (no recent handshake)"),
                    ("b1", false, "PairsDown", "down: a2 (no recent handshake)"),
                ],
            ),
            (
                "one end naming the pair is enough (the other has not seen the joiner yet)",
                vec![
                    member("a1", "old", Some((5, &[]))),
                    member("b1", "new", Some((5, &["a1"]))),
                ],
                vec![
                    ("a1", false, "PairsDown", "down: b1 (no recent handshake)"),
                    ("b1", false, "PairsDown", "down: a1 (no recent handshake)"),
                ],
            ),
            (
                "a silent agent is not connected itself, and its stale report names nothing",
                vec![
                    member("a1", "old", Some((5, &[]))),
                    member("b1", "new", Some((300, &["a1"]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    (
                        "b1",
                        false,
                        "ReportStale",
                        "the agent has not reported for over 180s",
                    ),
                ],
            ),
            (
                "a joining node that has not reported yet flips nobody else",
                vec![
                    member("a1", "old", Some((5, &["b2"]))),
                    member("b1", "new", Some((5, &[]))),
                    member("b2", "new", None),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "NoReport", "the agent has not reported yet"),
                ],
            ),
            (
                "a node admitted 10 s ago, reporting, no handshake yet: only it is down",
                vec![
                    admitted(member("a1", "old", Some((5, &["b2"]))), 1000),
                    admitted(member("b1", "new", Some((5, &[]))), 1000),
                    admitted(member("b2", "new", Some((5, &["a1"]))), 10),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (no recent handshake)"),
                ],
            ),
            (
                "a node admitted in this pass flips nobody else either",
                vec![
                    admitted(member("a1", "old", Some((5, &["b2"]))), 1000),
                    admitted(member("b1", "new", Some((5, &[]))), 1000),
                    member("b2", "new", Some((5, &["a1"]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (no recent handshake)"),
                ],
            ),
            (
                "a report period after its admission, a pair still down counts for both",
                vec![
                    admitted(member("a1", "old", Some((5, &["b2"]))), 1000),
                    admitted(member("b1", "new", Some((5, &[]))), 1000),
                    admitted(member("b2", "new", Some((5, &["a1"]))), 181),
                ],
                vec![
                    ("a1", false, "PairsDown", "down: b2 (no recent handshake)"),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (no recent handshake)"),
                ],
            ),
            (
                "a report dated in the future is not fresh",
                vec![
                    member("a1", "old", Some((-3600, &[]))),
                    member("b1", "new", Some((5, &["a1"]))),
                ],
                vec![
                    (
                        "a1",
                        false,
                        "ReportFromTheFuture",
                        "the agent's report is dated more than 30s ahead of the coordinator's \
                         clock; check the node's clock",
                    ),
                    ("b1", false, "PairsDown", "down: a1 (no recent handshake)"),
                ],
            ),
            (
                "a little skew is tolerated",
                vec![
                    member("a1", "old", Some((-20, &[]))),
                    member("b1", "new", Some((5, &[]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                ],
            ),
            (
                "many pairs down: five named, the rest counted",
                vec![
                    member(
                        "a1",
                        "old",
                        Some((5, &["b1", "b2", "b3", "b4", "b5", "b6", "b7"])),
                    ),
                    member("b1", "new", Some((5, &[]))),
                    member("b2", "new", Some((5, &[]))),
                    member("b3", "new", Some((5, &[]))),
                    member("b4", "new", Some((5, &[]))),
                    member("b5", "new", Some((5, &[]))),
                    member("b6", "new", Some((5, &[]))),
                    member("b7", "new", Some((5, &[]))),
                ],
                std::iter::once((
                    "a1",
                    false,
                    "PairsDown",
                    "down: b1, b2, b3, b4, b5 and 2 more (no recent handshake)",
                ))
                .chain(
                    ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]
                        .map(|b| (b, false, "PairsDown", "down: a1 (no recent handshake)")),
                )
                .collect(),
            ),
            (
                "a name the topology does not pair is ignored",
                vec![
                    member("a1", "old", Some((5, &["a2"]))),
                    member("a2", "old", Some((5, &[]))),
                ],
                vec![
                    (
                        "a1",
                        true,
                        "NoPairsWanted",
                        "the topology wants no tunnel for this node yet",
                    ),
                    (
                        "a2",
                        true,
                        "NoPairsWanted",
                        "the topology wants no tunnel for this node yet",
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
                    "the topology wants no tunnel for this node yet",
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
