//! The routing journal: every kernel entry the agent changes, with what was there before,
//! written durably *before* the change (temp file, fsync, rename, fsync of the directory),
//! with what the kernel held until the change is confirmed (so a failed write or a kill in
//! between still restores exactly).
//! Removal — graceful stop, `isthmus-agent cleanup` after a crash, the next start —
//! restores from it, so nothing isthmus wrote outlives it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::model::{EntryKey, Value};

/// File name under the agent's state directory.
pub const FILE: &str = "routing-journal.json";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: EntryKey,
    /// What the kernel had before we first changed it (`None`: nothing).
    pub prior: Option<Value>,
    /// What we set.
    pub applied: Value,
    /// Present from the moment `applied` is recorded until its kernel write is confirmed:
    /// a write that failed, or a process killed in between, leaves the kernel with this
    /// value instead, which is just as much isthmus's doing (or the prior) and is restored
    /// as if `applied` were there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// The kernel's value when an unconfirmed write was recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// `None`: there was no entry.
    pub was: Option<Value>,
}

impl Entry {
    /// Whether `current` is a value isthmus put there or knows of: the applied one, or the
    /// one an unconfirmed write was replacing. A rule cannot be replaced in place: the
    /// kernel write deletes the old one, then adds the new, so where one replaced another —
    /// ours over someone's, someone's back over ours on removal, or an unconfirmed write of
    /// ours — no rule at all is where a killed write stopped, and counts as ours.
    pub fn knows(&self, current: Option<&Value>) -> bool {
        let replaced_rule = matches!(self.key, EntryKey::Rule { .. })
            && (self.prior.is_some() || self.pending.as_ref().is_some_and(|p| p.was.is_some()));
        current == Some(&self.applied)
            || self
                .pending
                .as_ref()
                .is_some_and(|p| p.was.as_ref() == current)
            || (current.is_none() && replaced_rule)
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    entries: BTreeMap<EntryKey, Entry>,
}

impl Journal {
    /// Loads the journal under `state_dir` (empty when there is none). A journal that
    /// cannot be read is an error, never silently dropped: it is the only record of what
    /// to restore.
    pub fn open(state_dir: &Path) -> anyhow::Result<Journal> {
        match fs::read(state_dir.join(FILE)) {
            Ok(bytes) => Journal::from_bytes(state_dir, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal {
                path: state_dir.join(FILE),
                entries: BTreeMap::new(),
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", state_dir.join(FILE).display())),
        }
    }

    /// The loader behind [`Journal::open`], on bytes already read from the journal under
    /// `state_dir`: the one place a file from disk is trusted, so the fuzz target drives it.
    pub fn from_bytes(state_dir: &Path, bytes: &[u8]) -> anyhow::Result<Journal> {
        let path = state_dir.join(FILE);
        let disk: OnDisk = serde_json::from_slice(bytes).with_context(|| {
            format!(
                "{} is unreadable; fix or remove it by hand after checking the \
                 VXLAN FDB, neighbours, routes and rules it lists",
                path.display()
            )
        })?;
        if disk.version != VERSION {
            bail!(
                "{} has version {}, this agent reads {VERSION}",
                path.display(),
                disk.version
            );
        }
        let entries = disk.entries.into_iter().map(|e| (e.key, e)).collect();
        Ok(Journal { path, entries })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &EntryKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &EntryKey> {
        self.entries.keys()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies `puts` and `drops` and makes the result durable before returning. An empty
    /// journal is no file at all.
    pub fn commit(&mut self, puts: Vec<Entry>, drops: &[EntryKey]) -> anyhow::Result<()> {
        if puts.is_empty() && drops.is_empty() {
            return Ok(());
        }
        let mut next = self.entries.clone();
        for k in drops {
            next.remove(k);
        }
        for e in puts {
            next.insert(e.key, e);
        }
        if next.is_empty() {
            match fs::remove_file(&self.path) {
                Ok(()) => sync_dir(&self.path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", self.path.display()))
                }
            }
        } else {
            let disk = OnDisk {
                version: VERSION,
                entries: next.values().cloned().collect(),
            };
            let bytes = serde_json::to_vec_pretty(&disk).context("encoding the journal")?;
            write_durably(&self.path, &bytes)?;
        }
        self.entries = next;
        Ok(())
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    crate::fault::hit(crate::fault::Point::JournalTemp);
    fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    fn entry(n: u8) -> Entry {
        Entry {
            key: EntryKey::Fdb {
                ifindex: 5,
                mac: Mac([10, 88, 10, 244, n, 0]),
            },
            prior: Some(Value::Fdb {
                dst: "10.0.0.11".parse().unwrap(),
            }),
            applied: Value::Fdb {
                dst: format!("100.96.0.{n}").parse().unwrap(),
            },
            pending: None,
        }
    }

    #[test]
    fn survives_a_reopen_and_disappears_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.is_empty());
        j.commit(vec![entry(1), entry(2)], &[]).unwrap();
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.get(&entry(1).key), Some(&entry(1)));
        j.commit(vec![], &[entry(1).key, entry(2).key]).unwrap();
        assert!(!dir.path().join(FILE).exists());
        assert!(Journal::open(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_journal_is_an_error_and_stays_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{ half a journal").unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("unreadable"), "{err:#}");
        assert!(dir.path().join(FILE).exists());
    }
}
