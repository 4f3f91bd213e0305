//! The decision for one owned entry, given what the plan wants, what the kernel has and
//! what the journal remembers. Pure, so every case of "assert, re-assert, restore, leave
//! alone" is a table row.

use crate::journal::{Entry, Pending};
use crate::model::{EntryKey, Mac, Value};

/// What to do to the kernel entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Set(Value),
    Delete,
}

/// What to do to the journal entry. A `Put` carries `pending` when an action follows; the
/// caller confirms it (records the entry again without) once the kernel write succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Keep,
    /// Written, durably, before the action runs.
    Put(Entry),
    /// Dropped once the action ran.
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub record: Record,
    pub action: Option<Action>,
    /// Somebody else changed an entry we had set: we are putting it back.
    pub reasserted: bool,
}

const NOTHING: Decision = Decision {
    record: Record::Keep,
    action: None,
    reasserted: false,
};

/// `desired`: the value the plan wants for `key` (`None`: the plan no longer wants it, or
/// isthmus is being removed). `current`: the kernel's. `journaled`: what we recorded when
/// we first changed it.
pub fn decide(
    key: EntryKey,
    desired: Option<&Value>,
    current: Option<&Value>,
    journaled: Option<&Entry>,
) -> Decision {
    // Recorded before the write, confirmed (pending cleared) after it succeeds.
    let pending = Some(Pending {
        was: current.cloned(),
    });
    match (desired, journaled) {
        (Some(want), journaled) if current == Some(want) => match journaled {
            // Already right; keep the record in step with the plan, confirmed.
            Some(e) if &e.applied != want || e.pending.is_some() => Decision {
                record: Record::Put(Entry {
                    applied: want.clone(),
                    pending: None,
                    ..e.clone()
                }),
                ..NOTHING
            },
            _ => NOTHING,
        },
        (Some(want), Some(e)) => {
            let ours = e.knows(current);
            Decision {
                record: Record::Put(Entry {
                    key,
                    // Someone rewrote our entry: what they wrote is what removal restores.
                    prior: if ours {
                        e.prior.clone()
                    } else {
                        current.cloned()
                    },
                    applied: want.clone(),
                    pending,
                }),
                action: Some(Action::Set(want.clone())),
                reasserted: !ours,
            }
        }
        (Some(want), None) => Decision {
            record: Record::Put(Entry {
                key,
                prior: current.cloned(),
                applied: want.clone(),
                pending,
            }),
            action: Some(Action::Set(want.clone())),
            reasserted: false,
        },
        // Ours (or a write of ours that never landed): back to the prior, unless already.
        (None, Some(e)) if e.knows(current) => Decision {
            record: Record::Drop,
            action: (current != e.prior.as_ref()).then(|| match &e.prior {
                Some(v) => Action::Set(v.clone()),
                None => Action::Delete,
            }),
            reasserted: false,
        },
        // Changed since we set it (flannel's wish now): leave it, forget it.
        (None, Some(_)) => Decision {
            record: Record::Drop,
            ..NOTHING
        },
        (None, None) => NOTHING,
    }
}

/// The VTEPs whose FDB entry must not be restored to its prior value, because flannel has
/// let go of the node behind it.
///
/// flannel removes a node by deleting its neighbour entry, FDB entry and route, but its FDB
/// delete names the node's underlay address as destination: while the entry points at the
/// mesh IP the delete misses and flannel gives up, and restoring the prior value afterwards
/// would bring back an entry to a node that no longer exists. flannel's neighbour entry for
/// the same VTEP tells: when it was absent the last time we wrote it (`prior: None`, as after
/// a re-assertion of a deleted entry) or is absent now, flannel does not want the node, and
/// the FDB entry is deleted instead of restored. VTEPs are told apart by device and MAC:
/// `flannel.1` and `flannel-v6.1` each have their own.
pub fn vteps_flannel_dropped<'a>(
    journal: impl IntoIterator<Item = &'a Entry>,
    current: impl Fn(&EntryKey) -> Option<&'a Value>,
) -> std::collections::BTreeSet<(u32, Mac)> {
    journal
        .into_iter()
        .filter_map(|e| match (&e.key, &e.applied) {
            (EntryKey::Neigh { ifindex, .. }, Value::Neigh { mac }) => {
                (e.prior.is_none() || current(&e.key).is_none()).then_some((*ifindex, *mac))
            }
            _ => None,
        })
        .collect()
}

/// `journaled` as [`decide`] should see it when the plan lets go of `key`: for the FDB entry
/// of a VTEP flannel dropped ([`vteps_flannel_dropped`]) the prior is gone too.
pub fn without_stale_prior(
    key: &EntryKey,
    journaled: Option<&Entry>,
    dropped: &std::collections::BTreeSet<(u32, Mac)>,
) -> Option<Entry> {
    let e = journaled?;
    match key {
        EntryKey::Fdb { ifindex, mac } if dropped.contains(&(*ifindex, *mac)) => Some(Entry {
            prior: None,
            ..e.clone()
        }),
        _ => Some(e.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;

    fn key() -> EntryKey {
        EntryKey::Fdb {
            ifindex: 5,
            mac: Mac([10, 88, 10, 244, 21, 0]),
        }
    }

    fn dst(ip: &str) -> Value {
        Value::Fdb {
            dst: ip.parse().unwrap(),
        }
    }

    fn entry(prior: Option<&str>, applied: &str) -> Entry {
        Entry {
            key: key(),
            prior: prior.map(dst),
            applied: dst(applied),
            pending: None,
        }
    }

    /// `entry` recorded before a write that replaces `was` and is not yet confirmed.
    fn unconfirmed(prior: Option<&str>, applied: &str, was: Option<&str>) -> Entry {
        Entry {
            pending: Some(Pending { was: was.map(dst) }),
            ..entry(prior, applied)
        }
    }

    /// Name, desired, current, journaled, the decision.
    type Row<'a> = (
        &'a str,
        Option<&'a Value>,
        Option<&'a Value>,
        Option<&'a Entry>,
        Decision,
    );

    #[test]
    fn table() {
        let mesh = dst("100.96.0.3");
        let underlay = dst("10.0.0.11");
        let other = dst("10.0.0.99");
        let moved = dst("100.96.0.4");
        let e = entry(Some("10.0.0.11"), "100.96.0.3");
        let created = entry(None, "100.96.0.3");
        let first_unconfirmed = unconfirmed(Some("10.0.0.11"), "100.96.0.3", Some("10.0.0.11"));
        let move_unconfirmed = unconfirmed(Some("10.0.0.11"), "100.96.0.4", Some("100.96.0.3"));
        let create_unconfirmed = unconfirmed(None, "100.96.0.3", None);
        let rows: Vec<Row> = vec![
            (
                "first change: record flannel's value, then set ours",
                Some(&mesh),
                Some(&underlay),
                None,
                Decision {
                    record: Record::Put(unconfirmed(
                        Some("10.0.0.11"),
                        "100.96.0.3",
                        Some("10.0.0.11"),
                    )),
                    action: Some(Action::Set(mesh.clone())),
                    reasserted: false,
                },
            ),
            (
                "entry missing: record its absence, then create",
                Some(&mesh),
                None,
                None,
                Decision {
                    record: Record::Put(unconfirmed(None, "100.96.0.3", None)),
                    action: Some(Action::Set(mesh.clone())),
                    reasserted: false,
                },
            ),
            (
                "already as wanted",
                Some(&mesh),
                Some(&mesh),
                Some(&e),
                NOTHING,
            ),
            (
                "already as wanted, never touched",
                Some(&mesh),
                Some(&mesh),
                None,
                NOTHING,
            ),
            (
                "flannel rewrote it: put it back, remember flannel's latest wish",
                Some(&mesh),
                Some(&other),
                Some(&e),
                Decision {
                    record: Record::Put(unconfirmed(
                        Some("10.0.0.99"),
                        "100.96.0.3",
                        Some("10.0.0.99"),
                    )),
                    action: Some(Action::Set(mesh.clone())),
                    reasserted: true,
                },
            ),
            (
                "deleted behind our back: recreate; removal will delete it again",
                Some(&mesh),
                None,
                Some(&e),
                Decision {
                    record: Record::Put(unconfirmed(None, "100.96.0.3", None)),
                    action: Some(Action::Set(mesh.clone())),
                    reasserted: true,
                },
            ),
            (
                "the plan moved (new mesh IP): set it, the prior stays flannel's",
                Some(&moved),
                Some(&mesh),
                Some(&e),
                Decision {
                    record: Record::Put(unconfirmed(
                        Some("10.0.0.11"),
                        "100.96.0.4",
                        Some("100.96.0.3"),
                    )),
                    action: Some(Action::Set(dst("100.96.0.4"))),
                    reasserted: false,
                },
            ),
            (
                "removal: ours is still there, restore flannel's",
                None,
                Some(&mesh),
                Some(&e),
                Decision {
                    record: Record::Drop,
                    action: Some(Action::Set(underlay.clone())),
                    reasserted: false,
                },
            ),
            (
                "removal of an entry we created: delete it",
                None,
                Some(&mesh),
                Some(&created),
                Decision {
                    record: Record::Drop,
                    action: Some(Action::Delete),
                    reasserted: false,
                },
            ),
            (
                "removal after flannel changed it: leave flannel's, forget ours",
                None,
                Some(&other),
                Some(&e),
                Decision {
                    record: Record::Drop,
                    ..NOTHING
                },
            ),
            (
                "removal after it was deleted: nothing to restore",
                None,
                None,
                Some(&e),
                Decision {
                    record: Record::Drop,
                    ..NOTHING
                },
            ),
            ("not ours, not wanted", None, Some(&underlay), None, NOTHING),
            // A write recorded but not confirmed: it failed, or the agent was killed
            // between journal and kernel. The kernel still holds what it replaced.
            (
                "the write landed: the next pass confirms it",
                Some(&mesh),
                Some(&mesh),
                Some(&first_unconfirmed),
                Decision {
                    record: Record::Put(e.clone()),
                    ..NOTHING
                },
            ),
            (
                "a move that never landed: retried, not a re-assertion, prior kept",
                Some(&moved),
                Some(&mesh),
                Some(&move_unconfirmed),
                Decision {
                    record: Record::Put(unconfirmed(
                        Some("10.0.0.11"),
                        "100.96.0.4",
                        Some("100.96.0.3"),
                    )),
                    action: Some(Action::Set(moved.clone())),
                    reasserted: false,
                },
            ),
            (
                "removal after a move that never landed: our old value goes, flannel's back",
                None,
                Some(&mesh),
                Some(&move_unconfirmed),
                Decision {
                    record: Record::Drop,
                    action: Some(Action::Set(underlay.clone())),
                    reasserted: false,
                },
            ),
            (
                "removal after a first write that never landed: flannel's is there already",
                None,
                Some(&underlay),
                Some(&first_unconfirmed),
                Decision {
                    record: Record::Drop,
                    ..NOTHING
                },
            ),
            (
                "removal after a creation that never landed: nothing to delete",
                None,
                None,
                Some(&create_unconfirmed),
                Decision {
                    record: Record::Drop,
                    ..NOTHING
                },
            ),
            (
                "removal after a landed move someone then rewrote: theirs stays",
                None,
                Some(&other),
                Some(&move_unconfirmed),
                Decision {
                    record: Record::Drop,
                    ..NOTHING
                },
            ),
        ];
        for (name, desired, current, journaled, want) in rows {
            assert_eq!(decide(key(), desired, current, journaled), want, "{name}");
        }
    }

    /// Where a pass stops, as `Router::reconcile` runs it: record, write, confirm.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Stop {
        Complete,
        KilledBeforeWrite,
        WriteFails,
        KilledBeforeConfirm,
    }

    /// One pass of `Router::reconcile` for one entry against a kernel held in a variable
    /// and the real journal on disk.
    fn pass(
        journal: &mut Journal,
        kernel: &mut Option<Value>,
        desired: Option<&Value>,
        stop: Stop,
    ) {
        let d = decide(key(), desired, kernel.as_ref(), journal.get(&key()));
        if let Record::Put(e) = &d.record {
            journal.commit(vec![e.clone()], &[]).unwrap();
        }
        if stop == Stop::KilledBeforeWrite {
            return;
        }
        let ok = match (&d.action, stop) {
            (Some(_), Stop::WriteFails) => false,
            (Some(Action::Set(v)), _) => {
                *kernel = Some(v.clone());
                true
            }
            (Some(Action::Delete), _) => {
                *kernel = None;
                true
            }
            (None, _) => true,
        };
        if stop == Stop::KilledBeforeConfirm {
            return;
        }
        let mut confirmed = Vec::new();
        let mut drops = Vec::new();
        match &d.record {
            Record::Put(e) if ok && d.action.is_some() => confirmed.push(Entry {
                pending: None,
                ..e.clone()
            }),
            Record::Drop if ok => drops.push(key()),
            _ => {}
        }
        journal.commit(confirmed, &drops).unwrap();
    }

    #[test]
    fn restore_is_exact_wherever_a_pass_stops() {
        let underlay = dst("10.0.0.11");
        for stop in [
            Stop::Complete,
            Stop::KilledBeforeWrite,
            Stop::WriteFails,
            Stop::KilledBeforeConfirm,
        ] {
            // (what: first write of an existing entry, of a missing one, a move).
            for (what, before, first, second) in [
                (
                    "first write",
                    Some(underlay.clone()),
                    None,
                    dst("100.96.0.3"),
                ),
                ("creation", None, None, dst("100.96.0.3")),
                (
                    "move",
                    Some(underlay.clone()),
                    Some(dst("100.96.0.3")),
                    dst("100.96.0.4"),
                ),
            ] {
                let dir = tempfile::tempdir().unwrap();
                let mut kernel = before.clone();
                let mut journal = Journal::open(dir.path()).unwrap();
                if let Some(v) = &first {
                    pass(&mut journal, &mut kernel, Some(v), Stop::Complete);
                }
                pass(&mut journal, &mut kernel, Some(&second), stop);
                // The process dies (or stops); cleanup reads the journal from disk.
                let mut journal = Journal::open(dir.path()).unwrap();
                pass(&mut journal, &mut kernel, None, Stop::Complete);
                assert_eq!(kernel, before, "{what}, {stop:?}: not restored");
                assert!(journal.is_empty(), "{what}, {stop:?}: journal left");
            }
        }
    }

    #[test]
    fn a_rule_replacement_stopped_between_delete_and_add_is_ours() {
        let key = EntryKey::Rule {
            v6: false,
            priority: 5210,
        };
        let theirs = Value::Rule { table: 100 };
        let ours = Value::Rule { table: 51820 };
        let replaced = Entry {
            key,
            prior: Some(theirs.clone()),
            applied: ours.clone(),
            pending: None,
        };
        let unconfirmed = Entry {
            pending: Some(Pending {
                was: Some(theirs.clone()),
            }),
            ..replaced.clone()
        };
        let created = Entry {
            prior: None,
            ..replaced.clone()
        };
        // (name, journaled, the action removal takes with no rule at the priority)
        let rows = [
            (
                "killed replacing theirs with ours",
                &unconfirmed,
                Some(Action::Set(theirs.clone())),
            ),
            (
                "killed putting theirs back over ours",
                &replaced,
                Some(Action::Set(theirs.clone())),
            ),
            ("ours deleted, there was none before", &created, None),
        ];
        for (name, journaled, action) in rows {
            let d = decide(key, None, None, Some(journaled));
            assert_eq!((d.record, d.action), (Record::Drop, action), "{name}");
        }
        let again = decide(key, Some(&ours), None, Some(&unconfirmed));
        assert_eq!(
            (again.action, again.reasserted),
            (Some(Action::Set(ours.clone())), false),
            "retried, not a re-assertion"
        );
        match again.record {
            Record::Put(e) => assert_eq!(e.prior, Some(theirs), "their rule stays the prior"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn restore_then_restore_again_is_a_no_op() {
        let e = entry(Some("10.0.0.11"), "100.96.0.3");
        let first = decide(key(), None, Some(&dst("100.96.0.3")), Some(&e));
        assert_eq!(first.action, Some(Action::Set(dst("10.0.0.11"))));
        // The journal entry is gone after the first cleanup.
        assert_eq!(decide(key(), None, Some(&dst("10.0.0.11")), None), NOTHING);
    }

    #[test]
    fn an_fdb_entry_whose_node_flannel_dropped_is_deleted_not_restored() {
        let mac = Mac([10, 88, 10, 244, 21, 0]);
        let other = Mac([10, 88, 10, 244, 22, 0]);
        let neigh_on = |ifindex: u32, ip: &str| EntryKey::Neigh {
            ifindex,
            ip: ip.parse().unwrap(),
        };
        let neigh = |ip: &str| neigh_on(5, ip);
        let neigh_entry_on = |ifindex: u32, ip: &str, prior: bool, m: Mac| Entry {
            key: neigh_on(ifindex, ip),
            prior: prior.then_some(Value::Neigh { mac: m }),
            applied: Value::Neigh { mac: m },
            pending: None,
        };
        let neigh_entry = |ip: &str, prior: bool, m: Mac| neigh_entry_on(5, ip, prior, m);
        let there = Value::Neigh { mac };
        let there_other = Value::Neigh { mac: other };
        // (name, journal, neighbours in the kernel now, dropped VTEPs)
        type Row<'a> = (
            &'a str,
            Vec<Entry>,
            Vec<(EntryKey, &'a Value)>,
            Vec<(u32, Mac)>,
        );
        let rows: Vec<Row> = vec![
            (
                "flannel's neighbour there before and now: restore the FDB prior",
                vec![neigh_entry("10.244.21.0", true, mac)],
                vec![(neigh("10.244.21.0"), &there)],
                vec![],
            ),
            (
                "flannel deleted the neighbour, we re-asserted it (prior none)",
                vec![neigh_entry("10.244.21.0", false, mac)],
                vec![(neigh("10.244.21.0"), &there)],
                vec![(5, mac)],
            ),
            (
                "flannel deleted the neighbour while no agent watched",
                vec![neigh_entry("10.244.21.0", true, mac)],
                vec![],
                vec![(5, mac)],
            ),
            (
                "only the node whose neighbour went",
                vec![
                    neigh_entry("10.244.21.0", true, mac),
                    neigh_entry("10.244.22.0", true, other),
                ],
                vec![(neigh("10.244.22.0"), &there_other)],
                vec![(5, mac)],
            ),
            (
                "the same MAC on flannel-v6.1: only the device whose neighbour went",
                vec![
                    neigh_entry("10.244.21.0", true, mac),
                    neigh_entry_on(6, "fd00:244:21::", true, mac),
                ],
                vec![(neigh("10.244.21.0"), &there)],
                vec![(6, mac)],
            ),
            ("nothing journaled", vec![], vec![], vec![]),
        ];
        for (name, journal, kernel, want) in rows {
            let got = vteps_flannel_dropped(&journal, |k| {
                kernel.iter().find(|(kk, _)| kk == k).map(|(_, v)| *v)
            });
            assert_eq!(got, want.into_iter().collect(), "{name}");
        }
        let fdb = EntryKey::Fdb { ifindex: 5, mac };
        let e = Entry {
            key: fdb,
            prior: Some(Value::Fdb {
                dst: "10.0.0.12".parse().unwrap(),
            }),
            applied: Value::Fdb {
                dst: "100.96.0.4".parse().unwrap(),
            },
            pending: None,
        };
        let dropped = [(5, mac)].into_iter().collect();
        let seen = without_stale_prior(&fdb, Some(&e), &dropped).unwrap();
        assert_eq!(seen.prior, None);
        assert_eq!(
            decide(fdb, None, Some(&e.applied), Some(&seen)).action,
            Some(Action::Delete),
            "deleted, not restored to the gone node's underlay address"
        );
        let kept = without_stale_prior(&fdb, Some(&e), &Default::default()).unwrap();
        assert_eq!(kept, e);
        let other_device = [(6, mac)].into_iter().collect();
        let kept = without_stale_prior(&fdb, Some(&e), &other_device).unwrap();
        assert_eq!(
            kept, e,
            "the VTEP dropped on flannel-v6.1 is not flannel.1's"
        );
    }
}
