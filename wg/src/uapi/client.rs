//! The client side of the UAPI, for the operator CLI: `get=1` over the device's socket,
//! parsed back into a [`DeviceSnapshot`] (the inverse of `format_get`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use super::protocol::parse_allowed_ip;
use super::server::socket_path;
use crate::key::Key;
use crate::snapshot::{DeviceSnapshot, PeerSnapshot};

/// Asks the daemon serving `iface` for its state.
pub fn get(iface: &str) -> anyhow::Result<DeviceSnapshot> {
    let path = socket_path(iface);
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("connecting to {} (is the agent running?)", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"get=1\n\n").context("sending get=1")?;
    let mut text = String::new();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading the reply")? == 0 || line == "\n" {
            break;
        }
        text.push_str(&line);
    }
    parse_get(&text)
}

/// Parses the body of a `get=1` reply.
pub fn parse_get(text: &str) -> anyhow::Result<DeviceSnapshot> {
    let mut snap = DeviceSnapshot::default();
    let mut handshake_secs = 0u64;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("malformed line {line:?}"))?;
        if key == "public_key" {
            finish_handshake(&mut snap, handshake_secs, 0);
            handshake_secs = 0;
            snap.peers.push(PeerSnapshot {
                public_key: Key::from_hex(value).context("public_key")?,
                preshared_key: None,
                endpoint: None,
                last_handshake: None,
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: Vec::new(),
            });
            continue;
        }
        let peer = snap.peers.last_mut();
        match (key, peer) {
            ("errno", _) if value != "0" => bail!("the daemon answered errno={value}"),
            ("errno", _) | ("protocol_version", _) => {}
            // Never read the private key into the CLI's memory.
            ("private_key", None) => {}
            ("listen_port", None) => snap.listen_port = value.parse()?,
            ("fwmark", None) => snap.fwmark = value.parse()?,
            ("preshared_key", Some(_)) => {}
            ("endpoint", Some(p)) => p.endpoint = Some(value.parse::<SocketAddr>()?),
            ("last_handshake_time_sec", Some(_)) => handshake_secs = value.parse()?,
            ("last_handshake_time_nsec", Some(_)) => {
                let nsec: u32 = value.parse()?;
                finish_handshake(&mut snap, handshake_secs, nsec);
                handshake_secs = 0;
            }
            ("tx_bytes", Some(p)) => p.tx_bytes = value.parse()?,
            ("rx_bytes", Some(p)) => p.rx_bytes = value.parse()?,
            ("persistent_keepalive_interval", Some(p)) => p.persistent_keepalive = value.parse()?,
            ("allowed_ip", Some(p)) => p
                .allowed_ips
                .push(parse_allowed_ip(value).map_err(|e| anyhow::anyhow!("{e}"))?),
            (other, _) => bail!("unexpected key {other:?}"),
        }
    }
    finish_handshake(&mut snap, handshake_secs, 0);
    Ok(snap)
}

/// Sets the last peer's handshake time from the seconds seen so far (0: never).
fn finish_handshake(snap: &mut DeviceSnapshot, secs: u64, nsec: u32) {
    if let Some(p) = snap.peers.last_mut() {
        if secs != 0 && p.last_handshake.is_none() {
            p.last_handshake = Some(UNIX_EPOCH + Duration::new(secs, nsec));
        }
    }
}

/// How long ago `t` was (zero if in the future).
pub fn age(t: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::protocol::format_get;

    #[test]
    fn parses_what_the_server_formats() {
        let snap = DeviceSnapshot {
            private_key: Some(Key([7; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                PeerSnapshot {
                    public_key: Key([1; 32]),
                    preshared_key: None,
                    endpoint: Some("203.0.113.2:51801".parse().unwrap()),
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                    tx_bytes: 10,
                    rx_bytes: 20,
                    persistent_keepalive: 25,
                    allowed_ips: vec!["100.96.0.3/32".parse().unwrap()],
                },
                PeerSnapshot {
                    public_key: Key([2; 32]),
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    persistent_keepalive: 0,
                    allowed_ips: vec![],
                },
            ],
        };
        let parsed = parse_get(&format_get(&snap)).unwrap();
        assert_eq!(
            parsed.private_key, None,
            "the CLI never keeps the private key"
        );
        assert_eq!(parsed.listen_port, 51820);
        assert_eq!(parsed.peers, snap.peers);
    }

    #[test]
    fn an_error_reply_is_an_error() {
        assert!(parse_get("errno=-22\n").is_err());
        assert!(parse_get("no equals sign\n").is_err());
    }
}
