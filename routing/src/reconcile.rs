//! The decision for one owned entry, given what the plan wants, what the kernel has and
//! what the journal remembers. Pure, so every case of "assert, re-assert, restore, leave
//! alone" is a table row.

use crate::journal::Entry;
use crate::model::{Key, Value};

/// What to do to the kernel entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Set(Value),
    Delete,
}

/// What to do to the journal entry.
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
    key: Key,
    desired: Option<&Value>,
    current: Option<&Value>,
    journaled: Option<&Entry>,
) -> Decision {
    match (desired, journaled) {
        (Some(want), journaled) if current == Some(want) => match journaled {
            // Already right; keep the record in step with the plan.
            Some(e) if &e.applied != want => Decision {
                record: Record::Put(Entry {
                    applied: want.clone(),
                    ..e.clone()
                }),
                ..NOTHING
            },
            _ => NOTHING,
        },
        (Some(want), Some(e)) => {
            let ours = current == Some(&e.applied);
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
            }),
            action: Some(Action::Set(want.clone())),
            reasserted: false,
        },
        (None, Some(e)) if current == Some(&e.applied) => Decision {
            record: Record::Drop,
            action: Some(match &e.prior {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    fn key() -> Key {
        Key::Fdb {
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
        let rows: Vec<Row> = vec![
            (
                "first change: record flannel's value, then set ours",
                Some(&mesh),
                Some(&underlay),
                None,
                Decision {
                    record: Record::Put(e.clone()),
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
                    record: Record::Put(entry(None, "100.96.0.3")),
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
                    record: Record::Put(entry(Some("10.0.0.99"), "100.96.0.3")),
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
                    record: Record::Put(entry(None, "100.96.0.3")),
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
                    record: Record::Put(entry(Some("10.0.0.11"), "100.96.0.4")),
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
        ];
        for (name, desired, current, journaled, want) in rows {
            assert_eq!(decide(key(), desired, current, journaled), want, "{name}");
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
}
