//! The UDP sockets WireGuard listens on: one IPv4 and one IPv6 (v6-only) on the same port,
//! as wireguard-go binds them.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// How long a blocked receive waits before it looks whether its sockets were replaced.
pub const RECV_POLL: Duration = Duration::from_millis(250);

pub struct Sockets {
    pub v4: UdpSocket,
    /// `None` where the host has no IPv6.
    pub v6: Option<UdpSocket>,
    pub port: u16,
    retired: AtomicBool,
}

fn open(domain: Domain, addr: SocketAddr, fwmark: u32) -> io::Result<UdpSocket> {
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        sock.set_only_v6(true)?;
    }
    if fwmark != 0 {
        sock.set_mark(fwmark)?;
    }
    // Room for bursts: the defaults drop packets at a few hundred Mbit/s.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    sock.set_read_timeout(Some(RECV_POLL))?;
    Ok(sock.into())
}

impl Sockets {
    /// Binds both families on `port` (0: a free port, the same for both).
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Sockets> {
        // With port 0 the v4 socket picks; the v6 one may find that port taken, so retry.
        for _ in 0..16 {
            let v4 = open(
                Domain::IPV4,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into(),
                fwmark,
            )?;
            let chosen = v4.local_addr()?.port();
            let v6addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, chosen, 0, 0).into();
            let v6 = match open(Domain::IPV6, v6addr, fwmark) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && port == 0 => continue,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "no IPv6 UDP socket; IPv6 endpoints unreachable");
                    None
                }
            };
            return Ok(Sockets {
                v4,
                v6,
                port: chosen,
                retired: AtomicBool::new(false),
            });
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no port free in both IPv4 and IPv6",
        ))
    }

    pub fn set_mark(&self, fwmark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.v4).set_mark(fwmark)?;
        if let Some(v6) = &self.v6 {
            socket2::SockRef::from(v6).set_mark(fwmark)?;
        }
        Ok(())
    }

    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = match to {
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), a.port()),
                None => to,
            },
            v4 => v4,
        };
        let sock = match to {
            SocketAddr::V4(_) => &self.v4,
            SocketAddr::V6(_) => self
                .v6
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "no IPv6 socket"))?,
        };
        sock.send_to(data, to).map(|_| ())
    }

    /// Tells the reader threads of these sockets to stop (after a rebind).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}
