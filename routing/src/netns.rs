//! Running setup code inside another network namespace.
//!
//! The agent normally runs in the node's namespace (hostNetwork). The sandbox and the tests
//! start it with `--netns`: sockets and devices made through [`run_in`] (TUN, UDP, netlink)
//! live in the node's namespace, while the Kubernetes client keeps the agent's own, where the
//! API server is reachable. A socket stays in the namespace it was created in.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Runs `f` on a thread that entered `netns` (or right here when `None`).
pub fn run_in<T: Send + 'static>(
    netns: Option<&Path>,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let Some(path) = netns.map(PathBuf::from) else {
        return f();
    };
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "entering {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace setup thread panicked"))?
}
