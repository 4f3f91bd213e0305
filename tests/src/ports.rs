//! Loopback ports for the daemons a test starts in the host's namespace (etcd, the API
//! server, `--metrics-addr`).
//!
//! A port from `bind(127.0.0.1:0)` is free only until something else takes it, and the
//! kernel hands the same range to every outgoing connection as its source port: CI lost a
//! run when kube-apiserver found its port taken between the test's pick and its own bind
//! ("bind: address already in use"). So ports come from a window below the ephemeral range,
//! which the kernel never gives out by itself, each checked free, and never the same one
//! twice in a process.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

/// The window ports come from: below Linux's default ephemeral range (32768–60999) and
/// Kubernetes' NodePort range (30000–32767), above the well-known ports a test might meet
/// (2379, 6443, 10250).
pub const WINDOW: std::ops::Range<u16> = 20000..30000;

/// A loopback port in [`WINDOW`] that is free now, that no outgoing connection will take
/// (unless the machine's ephemeral range was moved into the window, which this checks), and
/// that no earlier call in this process returned (until the window wraps).
pub fn loopback_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    if let Some((low, high)) = ephemeral_range() {
        if low < WINDOW.end && high >= WINDOW.start {
            bail!(
                "the ephemeral port range {low}-{high} overlaps the tests' window {WINDOW:?}: \
                 a daemon's port could be taken by an outgoing connection"
            );
        }
    }
    let size = u32::from(WINDOW.end - WINDOW.start);
    // Spread processes apart so that two runs at once rarely probe the same ports.
    let offset = std::process::id().wrapping_mul(2654435761) % size;
    for _ in 0..size {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = WINDOW.start + ((offset + n) % size) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {WINDOW:?}")
}

/// [`loopback_port`] as an address.
pub fn loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], loopback_port()?)))
}

/// `net.ipv4.ip_local_port_range`, if readable.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| loopback_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let (low, high) = ephemeral_range().unwrap();
        for p in ports {
            assert!(WINDOW.contains(&p), "{p} outside {WINDOW:?}");
            assert!(!(low..=high).contains(&p), "{p} inside the ephemeral range");
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "{p} taken");
        }
    }
}
