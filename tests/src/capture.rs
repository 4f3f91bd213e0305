//! What crosses the underlay, seen from inside a namespace without tcpdump: a raw IPv4
//! socket for UDP gets a copy of every UDP datagram the namespace receives, whole (after
//! reassembly), with its IP header.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{bail, Context};

use crate::netns::Netns;

/// One UDP datagram received in the namespace.
#[derive(Debug, Clone)]
pub struct Captured {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// A capture running on its own thread until [`UdpCapture::stop`].
pub struct UdpCapture {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<anyhow::Result<Vec<Captured>>>>,
}

impl UdpCapture {
    /// Starts capturing the IPv4 UDP datagrams `ns` receives from or to `port`; returns
    /// once the socket is open, so nothing sent afterwards is missed.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<UdpCapture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, opened) = mpsc::channel();
        let flag = stop.clone();
        let handle = ns.spawn_in(move || {
            let fd = match raw_udp_socket() {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready.send(false);
                    return Err(e);
                }
            };
            let _ = ready.send(true);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `buf` is valid for its length; the fd is open.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    continue; // the receive timeout: look at the flag again
                }
                if let Some(c) = parse(&buf[..n as usize]) {
                    if c.from.port() == port || c.to.port() == port {
                        got.push(c);
                    }
                }
            }
            Ok(got)
        });
        if !opened.recv().unwrap_or(false) {
            return match handle.join() {
                Ok(Ok(Err(e))) | Ok(Err(e)) => Err(e),
                _ => bail!("capture thread failed"),
            };
        }
        Ok(UdpCapture { stop, handle })
    }

    /// Stops the capture and returns what it saw, in arrival order.
    pub fn stop(self) -> anyhow::Result<Vec<Captured>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))??
    }
}

fn raw_udp_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("raw UDP socket");
    }
    // SAFETY: `fd` was just returned by socket() and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid fd and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(fd)
}

/// An IPv4 packet carrying UDP, as the raw socket hands it over.
fn parse(packet: &[u8]) -> Option<Captured> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let udp = packet.get(ihl..)?;
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    if packet.len() < 20 || udp.len() < 8 {
        return None;
    }
    let port = |at: usize| u16::from_be_bytes([udp[at], udp[at + 1]]);
    let udp_len = usize::from(port(4));
    Some(Captured {
        from: SocketAddrV4::new(addr(12), port(0)),
        to: SocketAddrV4::new(addr(16), port(2)),
        payload: udp.get(8..udp_len)?.to_vec(),
    })
}
