//! The UAPI socket: `/var/run/wireguard/<iface>.sock`, mode 0600, one thread per client.
//!
//! Requests are bounded (line length and line count) and read whole before they are
//! applied; a client that sends garbage gets an errno (or, for an unknown operation, a
//! closed connection, as wireguard-go does) and the device stays as it was.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};

use super::protocol::{format_get, parse_set, Errno, UapiError};
use crate::config::Change;
use crate::snapshot::DeviceSnapshot;
use crate::tunnel::{SetError, Tunnel};

/// Where `wg` looks for userspace implementations.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest line we accept; real lines are under 100 bytes.
const MAX_LINE: usize = 4096;
/// Most lines in one `set`: room for tens of thousands of peers and allowed IPs.
const MAX_LINES: usize = 1 << 20;
/// A client that stalls mid-request is dropped after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the socket serves: the tunnel, or a recorder in tests.
pub trait UapiHandler: Send + Sync + 'static {
    fn get(&self) -> DeviceSnapshot;
    fn set(&self, change: &Change) -> Result<(), UapiError>;
}

impl UapiHandler for Arc<Tunnel> {
    fn get(&self) -> DeviceSnapshot {
        self.engine().snapshot()
    }

    fn set(&self, change: &Change) -> Result<(), UapiError> {
        Tunnel::set(self, change).map_err(UapiError::from)
    }
}

/// The errno `wg` shows for each way a change can fail, as wireguard-go answers.
impl From<SetError> for UapiError {
    fn from(e: SetError) -> UapiError {
        let errno = match e {
            SetError::Bind { .. } | SetError::Fwmark { .. } => Errno::PortInUse,
            SetError::Spawn(_) => Errno::Io,
        };
        UapiError::new(errno, e.to_string())
    }
}

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// The listening socket; its file is removed when this is dropped.
pub struct UapiServer {
    path: PathBuf,
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove UAPI socket");
        }
    }
}

/// Removes the socket file a killed daemon left for `iface`; a socket somebody still
/// serves is left alone.
pub fn remove_stale_socket(iface: &str) -> anyhow::Result<()> {
    let path = socket_path(iface);
    if !path.exists() || UnixStream::connect(&path).is_ok() {
        return Ok(());
    }
    std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
    tracing::info!(path = %path.display(), "removed a stale UAPI socket");
    Ok(())
}

/// Binds the socket for `iface` and serves it on a background thread.
pub fn serve<H: UapiHandler>(iface: &str, handler: Arc<H>) -> anyhow::Result<UapiServer> {
    let path = socket_path(iface);
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
    if UnixStream::connect(&path).is_ok() {
        bail!("{} is in use by another running daemon", path.display());
    }
    // Bind under a temporary name, restrict it, then move it into place: the socket is
    // never reachable with looser permissions.
    let tmp = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("moving socket to {}", path.display()))?;

    thread::Builder::new()
        .name("uapi".into())
        .spawn(move || accept_loop(listener, handler))
        .context("spawning UAPI thread")?;
    tracing::info!(path = %path.display(), "UAPI listening");
    Ok(UapiServer { path })
}

fn accept_loop<H: UapiHandler>(listener: UnixListener, handler: Arc<H>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let handler = handler.clone();
                let spawned = thread::Builder::new()
                    .name("uapi-client".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(stream, handler.as_ref()) {
                            tracing::debug!(error = %e, "UAPI client ended");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot serve UAPI client");
                }
            }
            Err(e) => tracing::warn!(error = %e, "UAPI accept failed"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    Eof,
}

/// Reads one `\n`-terminated line of at most `MAX_LINE` bytes.
fn read_line(reader: &mut impl BufRead) -> Result<Line, UapiError> {
    let mut buf = Vec::new();
    let n = io::Read::take(&mut *reader, MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| UapiError::new(Errno::Io, e.to_string()))?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') {
        return Err(UapiError::new(
            Errno::Protocol,
            format!("line longer than {MAX_LINE} bytes or unterminated"),
        ));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Line::Text)
        .map_err(|_| UapiError::new(Errno::Protocol, "line is not UTF-8"))
}

/// Reads a `set` body up to its blank line.
fn read_set_body(reader: &mut impl BufRead) -> Result<Vec<String>, UapiError> {
    let mut lines = Vec::new();
    loop {
        match read_line(reader)? {
            Line::Text(l) if l.is_empty() => return Ok(lines),
            Line::Text(l) => {
                if lines.len() == MAX_LINES {
                    return Err(UapiError::new(
                        Errno::Protocol,
                        "request has too many lines",
                    ));
                }
                lines.push(l);
            }
            Line::Eof => return Err(UapiError::new(Errno::Protocol, "request ended early")),
        }
    }
}

/// Serves requests on one connection until the client closes it or misbehaves.
pub fn serve_client(stream: UnixStream, handler: &dyn UapiHandler) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let writer = stream.try_clone()?;
    serve_requests(BufReader::new(stream), writer, handler)
}

/// [`serve_client`] on any reader and writer, so the fuzz target can drive the request
/// parser (framing, `get`, `set`) without a socket.
#[cfg(feature = "testing")]
pub fn serve_io(
    reader: impl BufRead,
    writer: impl Write,
    handler: &dyn UapiHandler,
) -> io::Result<()> {
    serve_requests(reader, writer, handler)
}

fn serve_requests(
    mut reader: impl BufRead,
    mut writer: impl Write,
    handler: &dyn UapiHandler,
) -> io::Result<()> {
    loop {
        let op = match read_line(&mut reader) {
            Ok(Line::Text(op)) => op,
            Ok(Line::Eof) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "UAPI: bad request line; closing");
                return Ok(());
            }
        };
        let (response, keep_going) = match op.as_str() {
            "get=1" => match read_line(&mut reader) {
                Ok(Line::Text(l)) if l.is_empty() => (format_get(&handler.get()), true),
                _ => (
                    error_response(&UapiError::new(Errno::Invalid, "get=1 takes no arguments")),
                    false,
                ),
            },
            "set=1" => {
                let result = read_set_body(&mut reader).and_then(|lines| {
                    let req = parse_set(lines.iter().map(String::as_str))?;
                    handler.set(&req)
                });
                match result {
                    Ok(()) => ("errno=0\n\n".to_string(), true),
                    // A framing error leaves the stream position unknown: answer and close.
                    Err(e) => {
                        let framing = e.errno == Errno::Protocol || e.errno == Errno::Io;
                        (error_response(&e), !framing)
                    }
                }
            }
            other => {
                tracing::warn!(op = %truncate(other, 64), "UAPI: unknown operation; closing");
                return Ok(());
            }
        };
        writer.write_all(response.as_bytes())?;
        if !keep_going {
            return Ok(());
        }
    }
}

fn error_response(e: &UapiError) -> String {
    tracing::warn!(error = %e, "UAPI request rejected; nothing changed");
    format!("errno={}\n\n", e.wire_code())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::io::Read;

    #[derive(Default)]
    struct Recorder {
        sets: Mutex<Vec<Change>>,
    }

    impl UapiHandler for Recorder {
        fn get(&self) -> DeviceSnapshot {
            DeviceSnapshot {
                listen_port: 7,
                ..Default::default()
            }
        }
        fn set(&self, req: &Change) -> Result<(), UapiError> {
            self.sets.lock().push(req.clone());
            Ok(())
        }
    }

    fn exchange(input: &[u8]) -> (String, usize) {
        let rec = Recorder::default();
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(input).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        serve_client(server, &rec).unwrap();
        // A server that closes with input unread makes the kernel report a reset after the
        // buffered response; the response is what matters here.
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out);
        let n = rec.sets.lock().len();
        (String::from_utf8(out).unwrap(), n)
    }

    #[test]
    fn get_and_set_on_one_connection() {
        let (out, sets) = exchange(b"get=1\n\nset=1\nlisten_port=9\n\n");
        assert_eq!(out, "listen_port=7\nerrno=0\n\nerrno=0\n\n");
        assert_eq!(sets, 1);
    }

    #[test]
    fn malformed_set_changes_nothing_and_reports_errno() {
        let (out, sets) = exchange(b"set=1\nlisten_port=9\nnonsense\n\n");
        assert_eq!(out, format!("errno=-{}\n\n", libc::EPROTO));
        assert_eq!(sets, 0);
        let (out, sets) = exchange(b"set=1\nlisten_port=9\nbogus_key=1\n\n");
        assert_eq!(out, format!("errno=-{}\n\n", libc::EINVAL));
        assert_eq!(sets, 0);
    }

    #[test]
    fn oversized_and_unterminated_requests_are_refused() {
        let mut big = b"set=1\nlisten_port=".to_vec();
        big.extend(std::iter::repeat_n(b'1', MAX_LINE * 2));
        big.extend(b"\n\n");
        let (out, sets) = exchange(&big);
        assert_eq!(out, format!("errno=-{}\n\n", libc::EPROTO));
        assert_eq!(sets, 0);

        let (out, sets) = exchange(b"set=1\nlisten_port=9\n");
        assert_eq!(out, format!("errno=-{}\n\n", libc::EPROTO));
        assert_eq!(sets, 0);

        let (out, sets) = exchange(b"\xff\xfe garbage\n");
        assert_eq!(out, "");
        assert_eq!(sets, 0);
    }
}
