//! What a user checks by hand on a cluster: an HTTP request and a UDP datagram from a node
//! (its network namespace), and upstream's way of asking a pod to dial another
//! (`agnhost netexec`'s `/dial`, as the Kubernetes network e2e tests do).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::Netns;

/// `GET path` to `addr` from inside `ns`; the response body, if the status is 200.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let path = path.to_string();
    ns.enter(move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading from {addr}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP response from {addr}: {text:?}"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("{addr}{path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_string())
    })?
}

/// Sends `echo <msg>` to agnhost's UDP server at `addr` from inside `ns` and returns the
/// answer (agnhost answers `<msg>`).
pub fn udp_echo(ns: &Netns, addr: SocketAddr, msg: &str) -> anyhow::Result<String> {
    let request = format!("echo {msg}");
    ns.enter(move || -> anyhow::Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send_to(request.as_bytes(), addr)?;
        let mut buf = vec![0u8; 65536];
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("no UDP answer from {addr}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

/// Asks the agnhost pod at `client` (reached from `ns`, its node) to send `request` to
/// `target` over `protocol` (`http` or `udp`), as upstream's network tests do; returns the
/// answers it got.
pub fn pod_dial(
    ns: &Netns,
    client: SocketAddr,
    protocol: &str,
    target: SocketAddr,
    request: &str,
) -> anyhow::Result<Vec<String>> {
    let path = format!(
        "/dial?request={}&protocol={protocol}&host={}&port={}&tries=1",
        percent_encode(request),
        target.ip(),
        target.port()
    );
    let body = http_get(ns, client, &path)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("dial answer {body:?}"))?;
    let errors = v.get("errors").and_then(|e| e.as_array());
    if let Some(e) = errors.filter(|e| !e.is_empty()) {
        bail!("{protocol} dial to {target} failed: {e:?}");
    }
    Ok(v.get("responses")
        .and_then(|r| r.as_array())
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_unreserved_characters_only() {
        assert_eq!(super::percent_encode("echo a/b?"), "echo%20a%2Fb%3F");
    }
}
