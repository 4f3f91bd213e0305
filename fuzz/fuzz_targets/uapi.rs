//! The UAPI request parser: any byte stream as one client connection (`get=1`, `set=1`,
//! framing, line limits) through `uapi::server::serve_io`, against a handler that applies
//! each `set` to a configuration with `DeviceConfig::apply` and answers `get` from it.
//!
//! After the stream: the configuration never lists a key twice or itself as a peer, and
//! what `get` prints of it, read back as a `set` (minus the read-only keys), rebuilds it.
#![no_main]

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::Mutex;

use isthmus_wg::config::{Change, DeviceConfig};
use isthmus_wg::snapshot::{DeviceSnapshot, PeerSnapshot};
use isthmus_wg::uapi::server::{serve_io, UapiHandler};
use isthmus_wg::uapi::{format_get, parse_set, UapiError};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Recorder(Mutex<DeviceConfig>);

fn snapshot(cfg: &DeviceConfig) -> DeviceSnapshot {
    DeviceSnapshot {
        private_key: cfg.private_key,
        listen_port: cfg.listen_port,
        fwmark: cfg.fwmark,
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerSnapshot {
                public_key: p.public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                last_handshake: None,
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: p.persistent_keepalive,
                allowed_ips: p.allowed_ips.clone(),
            })
            .collect(),
    }
}

impl UapiHandler for Recorder {
    fn get(&self) -> DeviceSnapshot {
        snapshot(&self.0.lock().unwrap())
    }

    fn set(&self, change: &Change) -> Result<(), UapiError> {
        let mut cfg = self.0.lock().unwrap();
        let (next, _effects) = cfg.apply(change);
        *cfg = next;
        Ok(())
    }
}

/// Keys a `get` prints that a `set` does not take.
const READ_ONLY: [&str; 5] = [
    "last_handshake_time_sec",
    "last_handshake_time_nsec",
    "tx_bytes",
    "rx_bytes",
    "errno",
];

fuzz_target!(|data: &[u8]| {
    let handler = Recorder::default();
    let mut response = Vec::new();
    serve_io(Cursor::new(data), &mut response, &handler).expect("in-memory I/O cannot fail");
    let text = String::from_utf8(response).expect("responses are text");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "unterminated response"
    );

    let cfg = handler.0.into_inner().unwrap();
    let own = cfg.public_key();
    let mut keys = HashSet::new();
    for p in &cfg.peers {
        assert!(keys.insert(p.public_key), "peer listed twice");
        assert_ne!(Some(p.public_key), own, "the device is its own peer");
    }

    let printed = format_get(&snapshot(&cfg));
    let lines = printed.lines().filter(|l| {
        !l.is_empty()
            && !READ_ONLY
                .iter()
                .any(|k| l.split_once('=').map(|(key, _)| key) == Some(k))
    });
    let change = parse_set(lines).expect("what get prints parses as a set");
    let (rebuilt, _) = DeviceConfig::default().apply(&change);
    assert_eq!(
        rebuilt, cfg,
        "get output does not rebuild the configuration"
    );
});
