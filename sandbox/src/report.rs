//! The report: per phase, the requests each client sent, how many failed and the longest
//! gap between two answered requests; the etcd writer's figures; the wall time. Splitting
//! the records by phase is a pure function of their timestamps (table-tested below).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::Record;
use crate::etcd::WriteFigures;

/// One client's traffic within one phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub failed: u64,
    /// The longest time between two answered requests that falls inside the phase (from
    /// its last answered request before, if any); zero when fewer than two were answered.
    pub longest_gap: Duration,
}

/// One line per step, as printed while the sandbox runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLine {
    pub elapsed: Duration,
    pub what: String,
    /// The etcd writer's figures during this step, once it runs.
    pub etcd: Option<WriteFigures>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    pub wall: Duration,
    /// The client pod in the new cloud, calling the Service's ClusterIP.
    pub in_cluster: Traffic,
    /// The client outside the cluster, calling a NodePort through the load balancer.
    pub outside: Traffic,
    /// The etcd writer, when it ran during the phase.
    pub etcd: Option<WriteFigures>,
    pub steps: Vec<StepLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub profile: String,
    pub wall: Duration,
    pub phases: Vec<PhaseReport>,
    /// Why the run stopped early, if it did (the phases so far are still reported).
    pub error: Option<String>,
}

impl Report {
    pub fn requests_sent(&self) -> u64 {
        self.phases
            .iter()
            .map(|p| p.in_cluster.sent + p.outside.sent)
            .sum()
    }

    pub fn requests_failed(&self) -> u64 {
        self.phases
            .iter()
            .map(|p| p.in_cluster.failed + p.outside.failed)
            .sum()
    }

    pub fn etcd_writes(&self) -> u64 {
        self.phases
            .iter()
            .filter_map(|p| p.etcd.as_ref())
            .map(|e| e.writes)
            .sum()
    }

    /// Failed plus lost etcd writes.
    pub fn etcd_failed(&self) -> u64 {
        self.phases
            .iter()
            .filter_map(|p| p.etcd.as_ref())
            .map(|e| e.failed + e.lost)
            .sum()
    }

    /// Whether the move lost nothing: the sandbox's exit status.
    pub fn clean(&self) -> bool {
        self.error.is_none() && self.requests_failed() == 0 && self.etcd_failed() == 0
    }

    /// The table printed at the end.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<28} {:>7}  {:>22}  {:>22}  {:>30}\n",
            "phase",
            "wall",
            "in-cluster sent/fail/gap",
            "outside sent/fail/gap",
            "etcd writes/fail/p99/leaders"
        );
        for p in &self.phases {
            let etcd = p.etcd.as_ref().map_or("-".to_string(), |e| {
                format!(
                    "{}/{}/{:.0?}/{}",
                    e.writes,
                    e.failed + e.lost,
                    e.p99,
                    e.leader_changes
                )
            });
            out.push_str(&format!(
                "{:<28} {:>6.1}s  {:>22}  {:>22}  {:>30}\n",
                p.name,
                p.wall.as_secs_f64(),
                traffic(&p.in_cluster),
                traffic(&p.outside),
                etcd
            ));
        }
        if let Some(e) = &self.error {
            out.push_str(&format!("stopped early: {e}\n"));
        }
        out.push_str(&format!(
            "requests: {} sent, {} failed; etcd writes: {} acknowledged, {} failed or lost; wall time {:.1}s\n",
            self.requests_sent(),
            self.requests_failed(),
            self.etcd_writes(),
            self.etcd_failed(),
            self.wall.as_secs_f64()
        ));
        out
    }
}

/// The etcd figures of a phase from its steps': counts add up, latencies take the worst
/// step's (a bound, not a recomputed percentile), members are the last step's.
pub fn merge_etcd(steps: &[WriteFigures]) -> Option<WriteFigures> {
    let last = steps.last()?;
    Some(WriteFigures {
        writes: steps.iter().map(|s| s.writes).sum(),
        failed: steps.iter().map(|s| s.failed).sum(),
        lost: steps.iter().map(|s| s.lost).sum(),
        p50: steps.iter().map(|s| s.p50).max().unwrap_or_default(),
        p99: steps.iter().map(|s| s.p99).max().unwrap_or_default(),
        leader_changes: steps.iter().map(|s| s.leader_changes).sum(),
        members: last.members.clone(),
    })
}

fn traffic(t: &Traffic) -> String {
    if t.sent == 0 {
        return "-".into();
    }
    format!("{}/{}/{}ms", t.sent, t.failed, t.longest_gap.as_millis())
}

/// Splits `records` (any order) into the phases `[start, end)` (milliseconds since the
/// epoch, in order, not overlapping): requests sent, failed and the longest gap between
/// answered requests, where a gap that spans a phase boundary counts in the phase it ends in.
pub fn split(records: &[Record], phases: &[(u64, u64)]) -> Vec<Traffic> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.at_ms, r.seq));
    let mut out = vec![Traffic::default(); phases.len()];
    let mut last_ok: Option<u64> = None;
    for r in sorted {
        let Some(i) = phases
            .iter()
            .position(|(start, end)| (*start..*end).contains(&r.at_ms))
        else {
            if r.ok() {
                last_ok = Some(r.at_ms);
            }
            continue;
        };
        let t = &mut out[i];
        t.sent += 1;
        if !r.ok() {
            t.failed += 1;
            continue;
        }
        if let Some(prev) = last_ok {
            let gap = Duration::from_millis(r.at_ms.saturating_sub(prev));
            t.longest_gap = t.longest_gap.max(gap);
        }
        last_ok = Some(r.at_ms);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: u64, ok: bool) -> Record {
        Record {
            at_ms,
            seq: at_ms,
            answer: ok.then(|| "echo".to_string()),
            latency_us: 1,
            error: (!ok).then(|| "refused".to_string()),
        }
    }

    #[test]
    fn split_table() {
        let ms = Duration::from_millis;
        struct Case {
            what: &'static str,
            records: Vec<Record>,
            phases: Vec<(u64, u64)>,
            want: Vec<(u64, u64, Duration)>,
        }
        let cases = [
            Case {
                what: "no records",
                records: vec![],
                phases: vec![(0, 100)],
                want: vec![(0, 0, ms(0))],
            },
            Case {
                what: "steady 50 ms",
                records: (0..4).map(|i| rec(i * 50, true)).collect(),
                phases: vec![(0, 1000)],
                want: vec![(4, 0, ms(50))],
            },
            Case {
                what: "a failure widens the gap and counts",
                records: vec![rec(0, true), rec(50, false), rec(100, true)],
                phases: vec![(0, 1000)],
                want: vec![(3, 1, ms(100))],
            },
            Case {
                what: "a gap across a boundary counts where it ends",
                records: vec![rec(90, true), rec(300, true), rec(350, true)],
                phases: vec![(0, 100), (100, 1000)],
                want: vec![(1, 0, ms(0)), (2, 0, ms(210))],
            },
            Case {
                what: "records outside every phase count nowhere but anchor gaps",
                records: vec![rec(5, true), rec(20, true), rec(40, false)],
                phases: vec![(10, 30)],
                want: vec![(1, 0, ms(15))],
            },
            Case {
                what: "unsorted input",
                records: vec![rec(100, true), rec(0, true), rec(50, true)],
                phases: vec![(0, 1000)],
                want: vec![(3, 0, ms(50))],
            },
        ];
        for c in cases {
            let got: Vec<_> = split(&c.records, &c.phases)
                .into_iter()
                .map(|t| (t.sent, t.failed, t.longest_gap))
                .collect();
            assert_eq!(got, c.want, "{}", c.what);
        }
    }

    #[test]
    fn clean_means_nothing_failed_or_lost() {
        let phase = |failed, lost| PhaseReport {
            name: "p".into(),
            wall: Duration::ZERO,
            in_cluster: Traffic {
                sent: 10,
                failed,
                longest_gap: Duration::ZERO,
            },
            outside: Traffic::default(),
            etcd: Some(WriteFigures {
                writes: 5,
                lost,
                ..WriteFigures::default()
            }),
            steps: vec![],
        };
        let report = |phases| Report {
            profile: "short".into(),
            wall: Duration::ZERO,
            phases,
            error: None,
        };
        assert!(report(vec![phase(0, 0)]).clean());
        assert!(!report(vec![phase(1, 0)]).clean());
        assert!(!report(vec![phase(0, 0), phase(0, 1)]).clean());
    }
}
