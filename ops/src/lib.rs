//! The operations endpoint the agent and the coordinator both serve on `--metrics-addr`:
//! `GET /metrics` (OpenMetrics text, which Prometheus scrapes natively), `GET /healthz`
//! (liveness) and `GET /readyz` (readiness). It lives in the binaries themselves rather than
//! in a sidecar so that what the probes report is the process's own state, not a guess from
//! outside.
//!
//! Each binary decides what "live" and "ready" mean and what to export by implementing
//! [`Probes`]; [`respond`] maps a request to a response without I/O (unit-tested), and
//! [`serve`] is the thin hyper loop around it.
//!
//! It knows nothing of what it reports: it must never import another isthmus crate; the
//! binaries plug their state in through [`Probes`].

pub mod daemon;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// What Prometheus expects for the OpenMetrics text `prometheus-client` writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// What a binary reports. The probe methods return a short plain-text reason on failure,
/// which becomes the 503's body (and is what `kubectl describe pod` shows).
pub trait Probes: Send + Sync + 'static {
    /// The full exposition, rendered at scrape time.
    fn metrics(&self) -> String;
    fn live(&self) -> Result<(), String>;
    fn ready(&self) -> Result<(), String>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn plain(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: PLAIN,
            body: body.into(),
        }
    }

    fn probe(result: Result<(), String>) -> Response {
        match result {
            Ok(()) => Response::plain(200, "ok\n"),
            Err(reason) => Response::plain(503, format!("{reason}\n")),
        }
    }
}

/// The response to `method path` (a query string is ignored). Pure, so routing is tested
/// without sockets.
pub fn respond(method: &str, path: &str, probes: &dyn Probes) -> Response {
    let path = path.split('?').next().unwrap_or_default();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::plain(404, "not found; try /metrics, /healthz or /readyz\n");
    }
    if method != "GET" {
        return Response::plain(405, "only GET\n");
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: OPENMETRICS,
            body: probes.metrics(),
        },
        "/healthz" => Response::probe(probes.live()),
        _ => Response::probe(probes.ready()),
    }
}

/// `--metrics-addr`: `""` or `off` turns the endpoint off.
pub fn parse_addr(value: &str) -> Result<Option<SocketAddr>, String> {
    match value.trim() {
        "" | "off" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|e| format!("--metrics-addr {v:?}: {e} (want host:port, or off)")),
    }
}

/// Binds `addr` at once (so a taken port fails the start loudly) and serves [`respond`] on
/// the current tokio runtime until the process exits. Returns the bound address (useful
/// with port 0).
pub async fn serve(addr: SocketAddr, probes: Arc<dyn Probes>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = respond(req.method().as_str(), req.uri().path(), probes.as_ref());
                    let response = hyper::Response::builder()
                        .status(r.status)
                        .header(hyper::header::CONTENT_TYPE, r.content_type)
                        .body(Full::new(Bytes::from(r.body)));
                    async move { Ok::<_, Infallible>(response.expect("static headers")) }
                });
                // A slow or silent client must not hold a task forever.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

/// The OpenMetrics text of `registry`, `# EOF` included.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a metric's own encoder failing would be a bug in it.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// Liveness for a loop that must not wedge: the loop marks each pass with [`Watchdog::enter`]
/// and [`Watchdog::exit`], and the process counts as dead only when one pass has been running
/// longer than the limit. Time spent waiting between passes (for events, for an unreachable
/// API server) is not counted: restarting would not cure it, and a restart costs the node
/// its routing for a moment.
#[derive(Default)]
pub struct Watchdog {
    busy_since: parking_lot::Mutex<Option<Instant>>,
}

impl Watchdog {
    pub fn enter(&self) {
        *self.busy_since.lock() = Some(Instant::now());
    }

    pub fn exit(&self) {
        *self.busy_since.lock() = None;
    }

    /// `Err` when the current pass started more than `limit` before `now`.
    pub fn check_at(&self, now: Instant, limit: Duration) -> Result<(), String> {
        match *self.busy_since.lock() {
            Some(since) if now.saturating_duration_since(since) > limit => Err(format!(
                "reconcile pass stuck for {}s",
                now.saturating_duration_since(since).as_secs()
            )),
            _ => Ok(()),
        }
    }

    pub fn check(&self, limit: Duration) -> Result<(), String> {
        self.check_at(Instant::now(), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        ready: Result<(), String>,
    }

    impl Probes for Fixed {
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
        fn live(&self) -> Result<(), String> {
            Ok(())
        }
        fn ready(&self) -> Result<(), String> {
            self.ready.clone()
        }
    }

    #[test]
    fn routes_paths_and_reports_reasons() {
        let not_ready = Fixed {
            ready: Err("no mesh configuration yet".into()),
        };
        let r = respond("GET", "/readyz", &not_ready);
        assert_eq!(
            (r.status, r.body.as_str()),
            (503, "no mesh configuration yet\n")
        );
        assert_eq!(respond("GET", "/healthz?verbose", &not_ready).status, 200);
        let m = respond("GET", "/metrics", &not_ready);
        assert_eq!((m.status, m.content_type), (200, OPENMETRICS));
        assert_eq!(respond("GET", "/", &not_ready).status, 404);
        assert_eq!(respond("POST", "/readyz", &not_ready).status, 405);
        let ready = Fixed { ready: Ok(()) };
        assert_eq!(respond("GET", "/readyz", &ready).status, 200);
    }

    #[test]
    fn off_disables_the_endpoint() {
        assert_eq!(parse_addr("off"), Ok(None));
        assert_eq!(parse_addr(""), Ok(None));
        assert_eq!(
            parse_addr("0.0.0.0:9580"),
            Ok(Some("0.0.0.0:9580".parse().unwrap()))
        );
        assert!(parse_addr("9580").is_err());
    }

    #[test]
    fn watchdog_counts_only_a_running_pass() {
        let w = Watchdog::default();
        let later = Instant::now() + Duration::from_secs(600);
        assert!(w.check_at(later, Duration::from_secs(60)).is_ok(), "idle");
        w.enter();
        assert!(w.check(Duration::from_secs(60)).is_ok(), "just started");
        assert!(w.check_at(later, Duration::from_secs(60)).is_err(), "stuck");
        w.exit();
        assert!(w.check_at(later, Duration::from_secs(60)).is_ok());
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let probes = Arc::new(Fixed { ready: Ok(()) });
        let addr = serve("127.0.0.1:0".parse().unwrap(), probes).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("ok\n"), "{out}");
    }
}
