//! A small client for etcd's v3 JSON gateway (grpc-gateway: `POST /v3/...` with a JSON
//! body), over a plain `TcpStream`. The member entrypoint and the sandbox both use it; a
//! gRPC client would pull tonic and a second runtime into an image that has no shell and
//! should stay small.
//!
//! The gateway speaks protobuf's JSON mapping: 64-bit integers (member IDs, revisions) are
//! strings, bytes (keys, values) are base64.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// One member as `member/list` and `member/add` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Empty until the member has started and published its name.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// What `maintenance/status` says about the member that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub member_id: u64,
    /// 0 while there is no leader.
    pub leader: u64,
    pub raft_index: u64,
    pub raft_applied_index: u64,
    pub is_learner: bool,
}

/// `endpoint` is `host:port` or `http://host:port`.
fn addr(endpoint: &str) -> anyhow::Result<SocketAddr> {
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolves to nothing"))
}

/// `POST <path>` with a JSON body to `endpoint`, one connection per call (HTTP/1.0, so the
/// answer is never chunked and ends with the connection); `timeout` bounds connect, write
/// and each read. A non-200 answer is an error carrying the gateway's message.
pub fn post(endpoint: &str, path: &str, body: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let a = addr(endpoint)?;
    let timeout = timeout.max(Duration::from_millis(1));
    let mut s = TcpStream::connect_timeout(&a, timeout).with_context(|| format!("connect {a}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.to_string();
    s.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: {a}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .with_context(|| format!("write {a}{path}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("read {a}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{a}{path}: no HTTP header in {} bytes", raw.len()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("{a}{path}: bad status line"))?;
    let v: Value = serde_json::from_str(payload)
        .with_context(|| format!("{a}{path}: status {status}, not JSON: {payload:.200}"))?;
    if status != 200 {
        bail!(
            "{a}{path}: status {status}: {}",
            v["message"].as_str().unwrap_or(payload)
        );
    }
    Ok(v)
}

/// A protobuf-JSON uint64/int64 (a string, or a number from other encoders); absent is 0.
pub fn num(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or_default(),
        Value::Number(n) => n.as_u64().unwrap_or_default(),
        _ => 0,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn member(v: &Value) -> Member {
    Member {
        id: num(&v["ID"]),
        name: v["name"].as_str().unwrap_or_default().to_string(),
        peer_urls: strings(&v["peerURLs"]),
        client_urls: strings(&v["clientURLs"]),
        is_learner: v["isLearner"].as_bool().unwrap_or(false),
    }
}

fn members(v: &Value) -> Vec<Member> {
    v["members"]
        .as_array()
        .map(|a| a.iter().map(member).collect())
        .unwrap_or_default()
}

pub fn member_list(endpoint: &str, timeout: Duration) -> anyhow::Result<Vec<Member>> {
    Ok(members(&post(
        endpoint,
        "/v3/cluster/member/list",
        &json!({}),
        timeout,
    )?))
}

/// Adds a member (`learner`: non-voting until promoted); returns it and the new membership.
pub fn member_add(
    endpoint: &str,
    peer_url: &str,
    learner: bool,
    timeout: Duration,
) -> anyhow::Result<(Member, Vec<Member>)> {
    let v = post(
        endpoint,
        "/v3/cluster/member/add",
        &json!({"peerURLs": [peer_url], "isLearner": learner}),
        timeout,
    )?;
    Ok((member(&v["member"]), members(&v)))
}

pub fn member_promote(endpoint: &str, id: u64, timeout: Duration) -> anyhow::Result<()> {
    post(
        endpoint,
        "/v3/cluster/member/promote",
        &json!({"ID": id.to_string()}),
        timeout,
    )?;
    Ok(())
}

pub fn member_remove(endpoint: &str, id: u64, timeout: Duration) -> anyhow::Result<()> {
    post(
        endpoint,
        "/v3/cluster/member/remove",
        &json!({"ID": id.to_string()}),
        timeout,
    )?;
    Ok(())
}

/// Hands leadership to `target`; only the current leader accepts it.
pub fn move_leader(leader_endpoint: &str, target: u64, timeout: Duration) -> anyhow::Result<()> {
    post(
        leader_endpoint,
        "/v3/maintenance/transfer-leadership",
        &json!({"targetID": target.to_string()}),
        timeout,
    )?;
    Ok(())
}

pub fn status(endpoint: &str, timeout: Duration) -> anyhow::Result<Status> {
    let v = post(endpoint, "/v3/maintenance/status", &json!({}), timeout)?;
    Ok(Status {
        member_id: num(&v["header"]["member_id"]),
        leader: num(&v["leader"]),
        raft_index: num(&v["raftIndex"]),
        raft_applied_index: num(&v["raftAppliedIndex"]),
        is_learner: v["isLearner"].as_bool().unwrap_or(false),
    })
}

/// `put key value`; returns the revision it created.
pub fn put(endpoint: &str, key: &[u8], value: &[u8], timeout: Duration) -> anyhow::Result<u64> {
    let v = post(
        endpoint,
        "/v3/kv/put",
        &json!({"key": b64(key), "value": b64(value)}),
        timeout,
    )?;
    Ok(num(&v["header"]["revision"]))
}

/// The value of `key` (base64, as the gateway returns it), linearizable; `None` if absent.
pub fn get_b64(endpoint: &str, key: &[u8], timeout: Duration) -> anyhow::Result<Option<String>> {
    let v = post(endpoint, "/v3/kv/range", &json!({"key": b64(key)}), timeout)?;
    Ok(v["kvs"]
        .get(0)
        .map(|kv| kv["value"].as_str().unwrap_or_default().to_string()))
}

/// Every key under `prefix`, base64-encoded, linearizable.
pub fn keys_b64(endpoint: &str, prefix: &[u8], timeout: Duration) -> anyhow::Result<Vec<String>> {
    let v = post(
        endpoint,
        "/v3/kv/range",
        &json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix)), "keys_only": true}),
        timeout,
    )?;
    Ok(v["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|kv| kv["key"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The end of the range holding every key that starts with `prefix` (as etcdctl's
/// `--prefix`: the last byte that can be incremented, incremented).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Standard base64 with padding (what protobuf's JSON mapping uses for bytes).
pub fn b64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_gateway() {
        // As etcd's gateway answered for "foo" / "bar" / "fo".
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"bar"), "YmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b""), "");
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"fo"), b"fp");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn parses_a_member_list_answer() {
        let v: Value = serde_json::from_str(
            r#"{"members":[{"ID":"13668033151171901709","name":"a","peerURLs":["http://127.0.0.1:23801"],
            "clientURLs":["http://127.0.0.1:23791"]},{"ID":"17629709859090268463",
            "peerURLs":["http://127.0.0.1:23802"],"isLearner":true}]}"#,
        )
        .unwrap();
        let m = members(&v);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, 13668033151171901709);
        assert!(!m[0].is_learner);
        assert_eq!(m[1].name, "");
        assert!(m[1].is_learner);
    }
}
