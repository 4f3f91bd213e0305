//! Why packets were dropped, counted per reason, with a log line at most once a second per
//! reason so a flood of bad input cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Outbound packet whose destination no peer's allowed IPs cover.
    NoRoute,
    /// Outbound packet for a peer with no known endpoint.
    NoEndpoint,
    /// Datagram that is not a WireGuard message (wrong type or length).
    Malformed,
    /// Handshake whose MAC or static key does not check out (wrong key, forged, garbage).
    HandshakeRejected,
    /// Handshake from a key that is not one of our peers.
    UnknownPeer,
    /// Message addressed to a receiver index we never handed out.
    UnknownIndex,
    /// Transport data that failed authentication or replay checks.
    DecryptFailed,
    /// Decrypted packet whose inner source is outside the sender's allowed IPs.
    SourceNotAllowed,
    /// Handshake refused because we are under load (a cookie reply was sent instead).
    UnderLoad,
    /// Handshake with a valid cookie, under load, from a source address over its own
    /// budget (20 a second, bursts of 5; see `ratelimit`).
    RateLimited,
    /// Sending on the UDP socket or writing to the TUN failed.
    IoError,
    /// Outbound packet longer than one data message can carry (65,535 bytes sealed): only
    /// a TUN with an MTU above what an IP packet can be hands one over.
    TooBig,
    /// One of the device's own datagrams came back through its TUN: a peer's endpoint lies
    /// inside what the tunnel carries (see `loopguard`).
    RoutingLoop,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::Malformed,
        DropReason::HandshakeRejected,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::DecryptFailed,
        DropReason::SourceNotAllowed,
        DropReason::UnderLoad,
        DropReason::RateLimited,
        DropReason::IoError,
        DropReason::TooBig,
        DropReason::RoutingLoop,
    ];

    /// Stable snake_case name, used in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::Malformed => "malformed",
            DropReason::HandshakeRejected => "handshake_rejected",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::UnderLoad => "under_load",
            DropReason::RateLimited => "rate_limited",
            DropReason::IoError => "io_error",
            DropReason::TooBig => "too_big",
            DropReason::RoutingLoop => "routing_loop",
        }
    }
}

#[derive(Default)]
pub struct DropCounters {
    counts: [AtomicU64; DropReason::ALL.len()],
    last_logged_sec: [AtomicU64; DropReason::ALL.len()],
}

impl DropCounters {
    pub fn record(&self, reason: DropReason) {
        let i = reason as usize;
        let total = self.counts[i].fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_logged_sec[i].load(Ordering::Relaxed);
        if now > last
            && self.last_logged_sec[i]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(reason = reason.name(), total, "dropped packet");
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_reason_separately() {
        let c = DropCounters::default();
        c.record(DropReason::Malformed);
        c.record(DropReason::Malformed);
        c.record(DropReason::NoRoute);
        assert_eq!(c.get(DropReason::Malformed), 2);
        assert_eq!(c.get(DropReason::NoRoute), 1);
        assert_eq!(c.get(DropReason::UnknownPeer), 0);
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
