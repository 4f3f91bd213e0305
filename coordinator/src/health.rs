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
    /// Since when it is admitted (Unix seconds; `None`: admitted in this very pass).
    pub admitted: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// A handshake older than this no longer counts (WireGuard rejects a session after
    /// 180 s; a healthy keepalive-driven tunnel renews every 120 s).
    pub handshake: i64,
    /// A reading older than this means the agent stopped reporting.
    pub report: i64,
    /// How far ahead of the coordinator's clock a reading or handshake may be dated and
    /// still count: more is a wrong (or lying) clock, and a reading dated in the future
    /// would otherwise stay "fresh" long after its agent stopped.
    pub skew: i64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            handshake: 180,
            report: 60,
            skew: 30,
        }
    }
}

/// Down pairs named in a message; the rest are counted, so a message stays short (and a
/// status small) however many pairs are down.
const NAMED_DOWN: usize = 5;

/// Whether `at` is at most `max` seconds old and no more than the skew allowance ahead.
fn recent(at: i64, now: i64, max: i64, t: &Thresholds) -> bool {
    (-t.skew..=max).contains(&(now - at))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub connected: bool,
    pub reason: &'static str,
    /// Starts with `up/wanted pairs up`, then names what is down.
    pub message: String,
}

fn fresh<'r>(report: Option<&'r Report>, now: i64, t: &Thresholds) -> Option<&'r Report> {
    report.filter(|r| recent(r.observed, now, t.report, t))
}

/// Whether `from`'s fresh report shows a recent handshake with `to`.
fn witnessed(from: &Member, to: &str, now: i64, t: &Thresholds) -> bool {
    fresh(from.report.as_ref(), now, t)
        .and_then(|r| r.handshakes.get(to).copied().flatten())
        .is_some_and(|h| recent(h, now, t.handshake, t))
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

/// `down: a (…), b (…)`, naming at most [`NAMED_DOWN`] pairs and counting the rest.
fn down_message(down: &[String]) -> String {
    let named = down[..down.len().min(NAMED_DOWN)].join(", ");
    match down.len().saturating_sub(NAMED_DOWN) {
        0 => format!("down: {named}"),
        more => format!("down: {named} and {more} more"),
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
        let down: Vec<String> = wanted
            .iter()
            .filter(|o| o.report.is_some())
            .filter(|o| !(joined(o) > joined(me) && now - joined(o) < t.report))
            .filter(|o| !witnessed(me, &o.name, now, t) && !witnessed(o, &me.name, now, t))
            .map(|o| describe(me, &o.name, t))
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

    /// Report age and, per peer, the handshake's age (`None`: never).
    type Reading<'a> = (i64, &'a [(&'a str, Option<i64>)]);
    /// Name, members, then per member: name, connected, reason, message.
    type Row<'a> = (&'a str, Vec<Member>, Vec<(&'a str, bool, &'a str, &'a str)>);

    fn member(name: &str, location: &str, report: Option<Reading>) -> Member {
        Member {
            admitted: None,
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
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("a2", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
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
                    ("a1", true, "AllPairsUp", ALL_UP),
                    (
                        "a2",
                        false,
                        "PairsDown",
                        "down: b1 (no handshake for over 180s)",
                    ),
                    (
                        "b1",
                        false,
                        "PairsDown",
                        "down: a2 (no handshake for over 180s)",
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
                    ("a1", true, "AllPairsUp", ALL_UP),
                    (
                        "b1",
                        false,
                        "ReportStale",
                        "the agent has not reported for over 60s",
                    ),
                ],
            ),
            (
                "never handshook, seen from both ends",
                vec![
                    member("a1", "old", Some((5, &[("b1", None)]))),
                    member("b1", "new", Some((5, &[("a1", None)]))),
                ],
                vec![
                    ("a1", false, "PairsDown", "down: b1 (never handshook)"),
                    ("b1", false, "PairsDown", "down: a1 (never handshook)"),
                ],
            ),
            (
                "a joining node that has not reported yet flips nobody else",
                vec![
                    member("a1", "old", Some((5, &[("b1", Some(30)), ("b2", None)]))),
                    member("b1", "new", Some((5, &[("a1", Some(30))]))),
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
                    admitted(member("a1", "old", Some((5, &[("b1", Some(30))]))), 1000),
                    admitted(member("b1", "new", Some((5, &[("a1", Some(30))]))), 1000),
                    admitted(member("b2", "new", Some((5, &[]))), 10),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (not configured yet)"),
                ],
            ),
            (
                "a node admitted in this pass flips nobody else either",
                vec![
                    admitted(member("a1", "old", Some((5, &[("b1", Some(30))]))), 1000),
                    admitted(member("b1", "new", Some((5, &[("a1", Some(30))]))), 1000),
                    member("b2", "new", Some((5, &[]))),
                ],
                vec![
                    ("a1", true, "AllPairsUp", ALL_UP),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (not configured yet)"),
                ],
            ),
            (
                "a report period after its admission, a pair still down counts for both",
                vec![
                    admitted(member("a1", "old", Some((5, &[("b1", Some(30))]))), 1000),
                    admitted(member("b1", "new", Some((5, &[("a1", Some(30))]))), 1000),
                    admitted(member("b2", "new", Some((5, &[]))), 61),
                ],
                vec![
                    ("a1", false, "PairsDown", "down: b2 (not configured yet)"),
                    ("b1", true, "AllPairsUp", ALL_UP),
                    ("b2", false, "PairsDown", "down: a1 (not configured yet)"),
                ],
            ),
            (
                "a report dated in the future is not fresh, nor are its handshakes",
                vec![
                    member("a1", "old", Some((-3600, &[("b1", Some(-3600))]))),
                    member("b1", "new", Some((5, &[("a1", None)]))),
                ],
                vec![
                    (
                        "a1",
                        false,
                        "ReportFromTheFuture",
                        "the agent's report is dated more than 30s ahead of the coordinator's \
                         clock; check the node's clock",
                    ),
                    ("b1", false, "PairsDown", "down: a1 (never handshook)"),
                ],
            ),
            (
                "a little skew is tolerated",
                vec![
                    member("a1", "old", Some((-20, &[("b1", Some(-20))]))),
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
                    member("a1", "old", Some((5, &[]))),
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
                    "down: b1 (not configured yet), b2 (not configured yet), b3 (not configured \
                     yet), b4 (not configured yet), b5 (not configured yet) and 2 more",
                ))
                .chain(
                    ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]
                        .map(|b| (b, false, "PairsDown", "down: a1 (not configured yet)")),
                )
                .collect(),
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
