//! The links between the control plane (on the host's loopback, as a seed hosts a user
//! cluster's control plane) and the nodes (in their clouds' namespaces):
//!
//! - **nodes → API server**: in each cloud's gateway namespace the API server's public
//!   address ([`super::APISERVER_PUBLIC`]) is a local address whose listener forwards each
//!   connection to the API server on the host's loopback: the cloud's route to the seed.
//! - **API server → kubelets** (`kubectl logs/exec`): the API server's egress selector sends
//!   every connection to the cluster through an HTTP CONNECT proxy on a unix socket, as it
//!   does with konnectivity in real seeds. Node IPs overlap across clouds, so the proxy picks
//!   the node by the kubelet's port, which is unique per node, and dials from inside that
//!   node's network namespace.
//!
//! Everything runs on a runtime of its own, so a test that blocks its own thread never
//! stalls the cluster's traffic. Dropping the [`Relay`] closes every listener.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::runtime::Runtime;

use crate::netns::Netns;

/// Which network namespace serves which kubelet port.
type KubeletPorts = Arc<Mutex<HashMap<u16, String>>>;

pub struct Relay {
    runtime: Option<Runtime>,
    kubelets: KubeletPorts,
    pub egress_socket: PathBuf,
}

impl Relay {
    /// Starts the egress proxy on `egress_socket`; gateways are added with
    /// [`Relay::forward_from`].
    pub fn start(egress_socket: &Path) -> anyhow::Result<Relay> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rig-relay")
            .enable_all()
            .build()
            .context("relay runtime")?;
        let kubelets: KubeletPorts = Arc::default();
        let listener = {
            let _guard = runtime.enter();
            UnixListener::bind(egress_socket)
                .with_context(|| format!("binding {}", egress_socket.display()))?
        };
        let ports = kubelets.clone();
        runtime.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let ports = ports.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connect(conn, ports).await {
                        eprintln!("rig egress: {e:#}");
                    }
                });
            }
        });
        Ok(Relay {
            runtime: Some(runtime),
            kubelets,
            egress_socket: egress_socket.to_path_buf(),
        })
    }

    /// Makes the API server reachable from `gateway`'s clouds at `public` (an address the
    /// caller already assigned in `gateway`): connections go to `upstream` on the host.
    pub fn forward_from(
        &self,
        gateway: &Netns,
        public: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<()> {
        let std_listener = gateway.enter(move || std::net::TcpListener::bind(public))??;
        std_listener.set_nonblocking(true)?;
        let runtime = self.runtime.as_ref().context("relay stopped")?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        runtime.spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = up.set_nodelay(true);
                        let _ = conn.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                });
            }
        });
        Ok(())
    }

    /// Routes the API server's connections to kubelet `port` into namespace `netns`.
    pub fn add_kubelet(&self, port: u16, netns: &str) {
        if let Ok(mut m) = self.kubelets.lock() {
            m.insert(port, netns.to_string());
        }
    }

    pub fn remove_kubelet(&self, port: u16) {
        if let Ok(mut m) = self.kubelets.lock() {
            m.remove(&port);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Not `shutdown_timeout`: the cluster may be dropped inside an async test.
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.egress_socket);
    }
}

/// One HTTP CONNECT request from the API server's egress selector.
async fn serve_connect(mut conn: UnixStream, ports: KubeletPorts) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || conn.read(&mut byte).await? == 0 {
            bail!("no complete CONNECT request");
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let target = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("not a CONNECT request: {text:?}"))?
        .to_string();
    let addr: SocketAddr = target
        .parse()
        .with_context(|| format!("CONNECT target {target}"))?;
    let netns = ports.lock().ok().and_then(|m| m.get(&addr.port()).cloned());
    let Some(netns) = netns else {
        conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await?;
        bail!("no node serves kubelet port {}", addr.port());
    };
    let upstream = tokio::task::spawn_blocking(move || connect_in(&netns, addr)).await??;
    upstream.set_nonblocking(true)?;
    let mut upstream = TcpStream::from_std(upstream)?;
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
    Ok(())
}

/// A TCP connection made from inside network namespace `netns` (a thread of its own enters
/// it; the socket stays there).
fn connect_in(netns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<std::net::TcpStream> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: a valid namespace fd; setns only affects this thread, which ends here.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr} in {netns}"))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
    })
}
