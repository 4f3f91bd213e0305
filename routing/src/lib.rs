//! isthmus-routing: the node's kernel networking as isthmus changes it — steering
//! cross-location overlay traffic into the tunnel, and restoring exactly what was there when
//! isthmus goes.
//!
//! [`plan`] turns the remote nodes into the kernel entries wanted (pure); [`reconcile`]
//! decides per entry what to do given the kernel's value and the [`journal`] (pure);
//! [`kernel`] reads and writes the entries over rtnetlink; [`Router`] runs the three in
//! order — journal first, durably, then the kernel, then the journal again to confirm — and [`watch`] wakes it when anyone
//! rewrites an entry, so it can put ours back. [`address`] sets the tunnel device's mesh IP;
//! [`netns`] runs setup inside another network namespace; [`fault`] lets the crash-safety
//! tests kill a real process between any two of those steps.
//!
//! This crate must never import Kubernetes (`kube`, `k8s-openapi`, `isthmus-api`) nor the
//! WireGuard engine (`isthmus-wg`): it is told what to route as plain values, so its plans
//! are table-tested and its kernel code tested in a namespace without either. Its
//! `Cargo.toml` holds no such dependency, and `tests/layering.rs` fails if one arrives.

pub mod address;
pub mod fault;
pub mod journal;
pub mod kernel;
pub mod model;
pub mod netns;
pub mod plan;
pub mod reconcile;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use journal::Journal;
use kernel::Kernel;
use model::{EntryKey, Value};
use reconcile::{decide, vteps_flannel_dropped, without_stale_prior, Record};

/// How cross-location pod traffic reaches the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Repoint flannel's VXLAN forwarding entries for remote-location nodes at their mesh
    /// IPs: the overlay stays flannel's, its packets ride the tunnel.
    Vxlan,
    /// Route remote-location pod CIDRs straight into the tunnel (own table and rule).
    Routed,
}

/// What one pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Entries set, restored or deleted.
    pub changed: usize,
    /// Entries somebody else had rewritten and we put back.
    pub reasserted: Vec<EntryKey>,
    /// Entries that could not be written (the pass goes on; the next one retries).
    pub failed: usize,
}

pub struct Router {
    kernel: Kernel,
    journal: Journal,
    desired: BTreeMap<EntryKey, Value>,
}

impl Router {
    /// Opens the journal under `state_dir`; nothing is touched yet.
    pub fn open(kernel: Kernel, state_dir: &Path) -> anyhow::Result<Router> {
        Ok(Router {
            kernel,
            journal: Journal::open(state_dir)?,
            desired: BTreeMap::new(),
        })
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Replaces what routing wants; [`Router::reconcile`] makes it so.
    pub fn set_desired(&mut self, desired: BTreeMap<EntryKey, Value>) {
        self.desired = desired;
    }

    /// One pass: read the owned entries, record every change durably, then apply them.
    pub async fn reconcile(&mut self) -> anyhow::Result<Outcome> {
        let keys: BTreeSet<EntryKey> = self
            .desired
            .keys()
            .chain(self.journal.keys())
            .copied()
            .collect();
        let current = self.kernel.read(&keys).await?;
        let dropped = vteps_flannel_dropped(
            self.journal.keys().filter_map(|k| self.journal.get(k)),
            |k| current.get(k),
        );
        let decisions: Vec<_> = keys
            .iter()
            .map(|k| {
                let desired = self.desired.get(k);
                let journaled = match desired {
                    None => without_stale_prior(k, self.journal.get(k), &dropped),
                    Some(_) => self.journal.get(k).cloned(),
                };
                let d = decide(*k, desired, current.get(k), journaled.as_ref());
                (*k, d)
            })
            .collect();
        let puts = decisions
            .iter()
            .filter_map(|(_, d)| match &d.record {
                Record::Put(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        fault::hit(fault::Point::BeforeJournal);
        // Written down before anything is applied.
        self.journal.commit(puts, &[])?;
        let mut outcome = Outcome::default();
        let mut drops = Vec::new();
        let mut confirmed = Vec::new();
        for (key, d) in &decisions {
            let mut ok = true;
            if let Some(action) = &d.action {
                fault::hit(fault::Point::BeforeWrite);
                let written = self.kernel.apply(key, action, current.get(key)).await;
                fault::hit(fault::Point::AfterWrite);
                match written {
                    Ok(()) => {
                        outcome.changed += 1;
                        if let Record::Put(e) = &d.record {
                            confirmed.push(journal::Entry {
                                pending: None,
                                ..e.clone()
                            });
                        }
                    }
                    Err(e) => {
                        ok = false;
                        outcome.failed += 1;
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "routing entry not written; will retry"
                        );
                    }
                }
            }
            if d.reasserted {
                tracing::info!(entry = %key, was = ?current.get(key).map(ToString::to_string), "re-asserted an entry someone rewrote");
                outcome.reasserted.push(*key);
            }
            if ok && d.record == Record::Drop {
                drops.push(*key);
            }
        }
        // Until this lands a failed write or a kill leaves `pending`, which restore reads.
        self.journal.commit(confirmed, &drops)?;
        fault::hit(fault::Point::AfterConfirm);
        Ok(outcome)
    }

    /// Restores everything in the journal (what removal does) and empties it. Entries that
    /// changed since we wrote them are left as they are now; an entry still holding the
    /// value an unconfirmed write of ours was replacing counts as unchanged.
    pub async fn restore(&mut self) -> anyhow::Result<Outcome> {
        self.desired.clear();
        self.reconcile().await
    }
}
