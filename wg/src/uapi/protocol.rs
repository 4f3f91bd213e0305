//! UAPI request parsing and response formatting, free of I/O: text to the engine's
//! [`Change`] and from its [`DeviceSnapshot`].
//!
//! A `set` request is parsed whole into a [`Change`] before anything is applied, so a
//! malformed line anywhere rejects the request and changes nothing. Error codes follow
//! wireguard-go: the response carries `errno=<negative errno>`, which `wg` turns back into
//! the matching message.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use ip_network::IpNetwork;

use crate::config::{AllowedIpChange, Change, PeerChange};
use crate::key::Key;
use crate::snapshot::DeviceSnapshot;

/// The errno values the protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Io = libc::EIO as isize,
    Protocol = libc::EPROTO as isize,
    Invalid = libc::EINVAL as isize,
    PortInUse = libc::EADDRINUSE as isize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("UAPI error {errno:?}: {message}")]
pub struct UapiError {
    pub errno: Errno,
    pub message: String,
}

impl UapiError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        UapiError {
            errno,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(Errno::Invalid, message)
    }

    /// The value written after `errno=`: negative, as wireguard-go writes it.
    pub fn wire_code(&self) -> i64 {
        -(self.errno as i64)
    }
}

fn parse_key(name: &str, value: &str) -> Result<Key, UapiError> {
    Key::from_hex(value).map_err(|e| UapiError::invalid(format!("{name}: {e}")))
}

fn parse_true(name: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(UapiError::invalid(format!(
            "{name} takes only \"true\", got {value:?}"
        )))
    }
}

fn parse_number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, UapiError> {
    // `str::parse` accepts a leading '+', the protocol does not.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UapiError::invalid(format!(
            "{name}: not a number: {value:?}"
        )));
    }
    value
        .parse()
        .map_err(|_| UapiError::invalid(format!("{name}: out of range: {value:?}")))
}

/// Parses `addr/len`; host bits are masked off, as every WireGuard implementation stores them.
pub fn parse_allowed_ip(value: &str) -> Result<IpNetwork, UapiError> {
    let bad = || UapiError::invalid(format!("allowed_ip: not a CIDR prefix: {value:?}"));
    let (addr, len) = value.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = parse_number("allowed_ip", len).map_err(|_| bad())?;
    IpNetwork::new_truncate(addr, len).map_err(|_| bad())
}

/// Parses the lines of a `set=1` body (without the terminating blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<Change, UapiError> {
    let mut req = Change::default();
    for line in lines {
        let Some((key, value)) = line.split_once('=') else {
            return Err(UapiError::new(
                Errno::Protocol,
                format!("line is not key=value: {line:?}"),
            ));
        };
        if key == "public_key" {
            req.peers.push(PeerChange::new(parse_key(key, value)?));
            continue;
        }
        match req.peers.last_mut() {
            None => parse_device_line(&mut req, key, value)?,
            Some(peer) => parse_peer_line(peer, key, value)?,
        }
    }
    Ok(req)
}

fn parse_device_line(req: &mut Change, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => req.private_key = Some(parse_key(key, value)?),
        "listen_port" => req.listen_port = Some(parse_number(key, value)?),
        "fwmark" => req.fwmark = Some(parse_number(key, value)?),
        "replace_peers" => {
            parse_true(key, value)?;
            req.replace_peers = true;
        }
        _ => return Err(UapiError::invalid(format!("unknown device key {key:?}"))),
    }
    Ok(())
}

fn parse_peer_line(peer: &mut PeerChange, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "remove" => {
            parse_true(key, value)?;
            peer.remove = true;
        }
        "update_only" => {
            parse_true(key, value)?;
            peer.update_only = true;
        }
        "preshared_key" => peer.preshared_key = Some(parse_key(key, value)?),
        "endpoint" => {
            let addr: SocketAddr = value
                .parse()
                .map_err(|_| UapiError::invalid(format!("endpoint: not ip:port: {value:?}")))?;
            peer.endpoint = Some(addr);
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(parse_number(key, value)?);
        }
        "replace_allowed_ips" => {
            parse_true(key, value)?;
            peer.allowed_ips.push(AllowedIpChange::ReplaceAll);
        }
        "allowed_ip" => peer
            .allowed_ips
            .push(AllowedIpChange::Add(parse_allowed_ip(value)?)),
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::invalid(format!(
                    "unsupported protocol_version {value:?}"
                )));
            }
        }
        _ => return Err(UapiError::invalid(format!("unknown peer key {key:?}"))),
    }
    Ok(())
}

/// Formats the body of a `get=1` response, in the order and form wireguard-go uses, ending
/// with `errno=0` and the blank line.
pub fn format_get(snap: &DeviceSnapshot) -> String {
    let mut out = String::with_capacity(256 + snap.peers.len() * 320);
    // `write!` into a String cannot fail.
    if let Some(k) = &snap.private_key {
        let _ = writeln!(out, "private_key={}", k.to_hex());
    }
    if snap.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", snap.listen_port);
    }
    if snap.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", snap.fwmark);
    }
    for p in &snap.peers {
        let _ = writeln!(out, "public_key={}", p.public_key.to_hex());
        let psk = p.preshared_key.unwrap_or(Key::ZERO);
        let _ = writeln!(out, "preshared_key={}", psk.to_hex());
        out.push_str("protocol_version=1\n");
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let since_epoch = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for net in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::PeerSnapshot;

    fn hex(b: u8) -> String {
        Key([b; 32]).to_hex()
    }

    #[test]
    fn parses_a_full_request_in_order() {
        let text = format!(
            "private_key={}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
             public_key={}\npreshared_key={}\nendpoint=[fd00::1]:4000\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.7/24\nallowed_ip=fd00::/64\nprotocol_version=1\n\
             public_key={}\nremove=true\npublic_key={}\nupdate_only=true\nendpoint=1.2.3.4:5",
            hex(1),
            hex(2),
            hex(3),
            hex(4),
            hex(5)
        );
        let req = parse_set(text.lines()).expect("valid request");
        assert_eq!(req.private_key, Some(Key([1; 32])));
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(7));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 3);
        let p = &req.peers[0];
        assert_eq!(p.public_key, Key([2; 32]));
        assert_eq!(p.preshared_key, Some(Key([3; 32])));
        assert_eq!(p.endpoint, Some("[fd00::1]:4000".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(
            p.allowed_ips,
            vec![
                AllowedIpChange::ReplaceAll,
                AllowedIpChange::Add("10.0.0.0/24".parse().unwrap()),
                AllowedIpChange::Add("fd00::/64".parse().unwrap()),
            ]
        );
        assert!(req.peers[1].remove);
        assert!(req.peers[2].update_only);
    }

    #[test]
    fn rejects_malformed_lines_with_the_protocol_errno() {
        let cases: &[(&str, Errno)] = &[
            ("garbage", Errno::Protocol),
            ("listen_port=65536", Errno::Invalid),
            ("listen_port=+1", Errno::Invalid),
            ("fwmark=-1", Errno::Invalid),
            ("private_key=abcd", Errno::Invalid),
            ("replace_peers=false", Errno::Invalid),
            ("bogus=1", Errno::Invalid),
            // Device keys are not allowed once a peer section has begun.
            (
                "public_key=0101010101010101010101010101010101010101010101010101010101010101\nlisten_port=1",
                Errno::Invalid,
            ),
            (
                "public_key=0101010101010101010101010101010101010101010101010101010101010101\nallowed_ip=10.0.0.1",
                Errno::Invalid,
            ),
            (
                "public_key=0101010101010101010101010101010101010101010101010101010101010101\nendpoint=host:1",
                Errno::Invalid,
            ),
            (
                "public_key=0101010101010101010101010101010101010101010101010101010101010101\nprotocol_version=2",
                Errno::Invalid,
            ),
        ];
        for (text, errno) in cases {
            let err = parse_set(text.lines()).expect_err(text);
            assert_eq!(err.errno, *errno, "{text}");
            assert!(err.wire_code() < 0);
        }
    }

    #[test]
    fn allowed_ips_are_masked_like_the_kernel_does() {
        assert_eq!(
            parse_allowed_ip("10.1.2.3/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            parse_allowed_ip("fd00:1:2::5/48").unwrap().to_string(),
            "fd00:1:2::/48"
        );
        assert!(parse_allowed_ip("10.0.0.0/33").is_err());
        assert!(parse_allowed_ip("10.0.0.0").is_err());
    }

    #[test]
    fn get_output_matches_wireguard_go_layout() {
        let snap = DeviceSnapshot {
            private_key: Some(Key([1; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerSnapshot {
                public_key: Key([2; 32]),
                preshared_key: None,
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1700000000, 5)),
                tx_bytes: 10,
                rx_bytes: 20,
                persistent_keepalive: 25,
                allowed_ips: vec!["10.0.0.0/24".parse().unwrap()],
            }],
        };
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             protocol_version=1\nendpoint=192.0.2.1:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/24\nerrno=0\n\n",
            hex(1),
            hex(2),
            hex(0)
        );
        assert_eq!(format_get(&snap), expected);
    }
}
