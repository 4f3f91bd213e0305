//! Fixtures for the end-to-end tests: network namespaces and links the test creates (and
//! always removes), daemons it starts (and always stops, by PID), `wg`, and traffic.
//!
//! Every name carries the prefix `ist` plus this process's id and a counter, so parallel
//! tests and parallel runs never collide. Traffic only goes to addresses inside these
//! namespaces.
//!
//! It drives the binaries from outside, as an operator would: it must never import
//! `isthmus-wg`, `isthmus-routing` or the agent, only the API types (`isthmus-api`). One
//! exception: the scale test's emulated agents (`scale`) publish, report and answer the
//! key challenge with the agent's own functions, so they speak to the API exactly as an
//! agent does.

pub mod capture;
pub mod cluster;
pub mod daemon;
pub mod fdb;
pub mod kube;
pub mod netns;
pub mod overlay;
pub mod pair;
pub mod ports;
pub mod publisher;
pub mod rig;
pub mod scale;
pub mod scrape;
pub mod seed;
pub mod snapshot;
pub mod traffic;
pub mod wg;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A short name no other test or run uses: `ist` + pid + counter (hex), at most 10 chars,
/// leaving room for a role suffix within the 15-character interface limit.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("ist{:x}{:x}", std::process::id() & 0xffff, n & 0xff)
}

/// The `isthmus-agent` binary of this build (`make test` builds it before the tests run).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ISTHMUS_AGENT") {
        return PathBuf::from(p);
    }
    workspace_bin("isthmus-agent")
}

/// A binary of this workspace's build: next to the running executable (a binary such as
/// `isthmus-sandbox` in target/<profile>/) or in its parent directory (a test executable in
/// target/<profile>/deps/).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|bin| bin.exists());
    bin.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build it first (`cargo build --release --workspace \
             --bins`, as `make test` and `make sandbox` do)",
            exe.display()
        )
    })
}

/// The independent WireGuard implementation to interoperate with: `$ISTHMUS_WIREGUARD_GO`
/// (`make test` points it at the current wireguard-go it builds), else the one on PATH.
pub fn wireguard_go_binary() -> PathBuf {
    std::env::var_os("ISTHMUS_WIREGUARD_GO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("wireguard-go"))
}

/// Debian's wireguard-go (a 2022 build), what many hosts still run.
pub const DEBIAN_WIREGUARD_GO: &str = "/usr/bin/wireguard-go";

/// The end-to-end tests need root for namespaces and TUN; say so plainly instead of failing
/// somewhere deep inside `ip`.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests need root (network namespaces, TUN)"
    );
}
