//! The workload's client: one HTTP GET every interval, each answered or failed within a
//! timeout, each recorded with its wall-clock time so the report can split them by phase.
//! The same loop runs in the client pod (`isthmus-sandbox-client`, one line per request on
//! stdout) and in the sandbox itself for the client outside the cluster.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch when the request was sent.
    pub at_ms: u64,
    pub seq: u64,
    /// The answering pod's name, or `None` when the request failed.
    pub answer: Option<String>,
    /// Round-trip time in microseconds, or why it failed.
    pub latency_us: u64,
    pub error: Option<String>,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.answer.is_some()
    }

    /// The line the client pod prints: `<at_ms> <seq> ok <latency_us> <pod>` or
    /// `<at_ms> <seq> fail <latency_us> <reason>`.
    pub fn to_line(&self) -> String {
        match (&self.answer, &self.error) {
            (Some(a), _) => format!("{} {} ok {} {a}", self.at_ms, self.seq, self.latency_us),
            (None, e) => format!(
                "{} {} fail {} {}",
                self.at_ms,
                self.seq,
                self.latency_us,
                e.as_deref().unwrap_or("unknown").replace('\n', " ")
            ),
        }
    }

    /// Parses [`Record::to_line`]'s output; `None` for any other line (the client's own
    /// start-up message, a kubelet log prefix that is not ours).
    pub fn from_line(line: &str) -> Option<Record> {
        let mut f = line.splitn(5, ' ');
        let at_ms = f.next()?.parse().ok()?;
        let seq = f.next()?.parse().ok()?;
        let kind = f.next()?;
        let latency_us = f.next()?.parse().ok()?;
        let rest = f.next().unwrap_or_default().to_string();
        match kind {
            "ok" => Some(Record {
                at_ms,
                seq,
                answer: Some(rest),
                latency_us,
                error: None,
            }),
            "fail" => Some(Record {
                at_ms,
                seq,
                answer: None,
                latency_us,
                error: Some(rest),
            }),
            _ => None,
        }
    }
}

/// Calls `call(seq)` every `interval` (on a fixed schedule, not `interval` after each call
/// returns, so a slow answer does not thin out the requests) until it returns false.
pub fn every(interval: Duration, mut call: impl FnMut(u64) -> bool) {
    let mut next = Instant::now();
    for seq in 0.. {
        if !call(seq) {
            return;
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// `GET /hostname` from agnhost netexec at `target` (host:port or a DNS name), with one
/// `timeout` for connect, write and read.
pub fn request(target: &str, seq: u64, timeout: Duration) -> Record {
    let at_ms = now_ms();
    let t = Instant::now();
    let result = get_hostname(target, timeout);
    let latency_us = t.elapsed().as_micros() as u64;
    match result {
        Ok(answer) => Record {
            at_ms,
            seq,
            answer: Some(answer),
            latency_us,
            error: None,
        },
        Err(e) => Record {
            at_ms,
            seq,
            answer: None,
            latency_us,
            error: Some(e),
        },
    }
}

fn get_hostname(target: &str, timeout: Duration) -> Result<String, String> {
    let addr: SocketAddr = target
        .to_socket_addrs()
        .map_err(|e| format!("resolving {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(
        format!("GET /hostname HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("read: {e}"))?;
    let (head, payload) = body
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {} bytes", body.len()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "status {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    let name = payload.trim();
    if name.is_empty() {
        return Err("empty answer".into());
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for r in [
            Record {
                at_ms: 1,
                seq: 2,
                answer: Some("echo-abc".into()),
                latency_us: 900,
                error: None,
            },
            Record {
                at_ms: 3,
                seq: 4,
                answer: None,
                latency_us: 2_000_000,
                error: Some("connect: timed out".into()),
            },
        ] {
            assert_eq!(Record::from_line(&r.to_line()), Some(r));
        }
        assert_eq!(Record::from_line("client: starting"), None);
    }
}
