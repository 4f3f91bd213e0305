//! One agent per state directory: a running agent holds an exclusive `flock` on
//! `agent.lock` until it exits (the kernel drops it even on SIGKILL). A second agent
//! refuses to start, and `cleanup` knows to leave a live agent's routing alone — the agent
//! restores it itself on SIGTERM.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::Context;

const LOCK_FILE: &str = "agent.lock";

/// Held for as long as this value lives.
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock, or `None` when a live process holds it.
    pub fn try_acquire(state_dir: &Path) -> anyhow::Result<Option<StateLock>> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(StateLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        Err(err).with_context(|| format!("locking {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::try_acquire(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(StateLock::try_acquire(dir.path()).unwrap().is_none());
        drop(first);
        assert!(StateLock::try_acquire(dir.path()).unwrap().is_some());
    }
}
