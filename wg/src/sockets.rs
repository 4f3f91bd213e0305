//! The UDP sockets WireGuard listens on: one IPv4 and one IPv6 (v6-only) on the same port,
//! as wireguard-go binds them.
//!
//! Each socket sends with UDP GSO (one `sendmsg` with `UDP_SEGMENT` carries up to 64
//! datagrams of one size to one destination) and receives with UDP GRO (one `recvmsg`
//! returns up to 64 coalesced datagrams and their size), through `quinn-udp`, which probes
//! what the kernel supports and stops segmenting if a device refuses it.
//!
//! The sockets are non-blocking. A receive takes what is queued, up to [`RECV_BATCH`] GRO
//! batches in one `recvmmsg`, and says when the queue ran dry, so the reader writes what it
//! coalesced exactly then, and waits in `poll` only after that. A send that finds the send
//! buffer full waits in `poll` for room (up to [`SEND_WAIT`]), so a full buffer pushes back
//! on the TUN reader instead of dropping.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

/// How long a reader waits for datagrams before it looks whether its sockets were replaced.
pub const RECV_POLL: Duration = Duration::from_millis(250);

/// How long a send waits for room in a full send buffer before it gives up on the datagrams
/// (the buffer drains at the device's pace; a second means something is wedged).
pub const SEND_WAIT: Duration = Duration::from_secs(1);

/// Bytes one GRO batch can hold: up to 64 datagrams (the kernel's UDP_GRO_CNT_MAX) of
/// at most a 1500-byte underlay's UDP payload, rounded up.
pub const RECV_BUF: usize = 64 * 2048;

/// GRO batches one receive call may return (each a peer's GSO send, or one datagram).
pub const RECV_BATCH: usize = 4;

/// The most UDP payload one GSO send may carry (an IPv4 packet's 65,535 bytes less the IP
/// and UDP headers).
pub const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

/// The most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// One bound UDP socket and what quinn-udp learnt about it.
pub struct Udp {
    pub sock: UdpSocket,
    state: UdpSocketState,
    /// Datagrams of this size or larger go one per send: the kernel refused to segment
    /// them (EMSGSIZE: bigger than the path MTU, so each must be fragmented on its own).
    gso_refused_from: AtomicUsize,
}

/// One receive: `len` bytes from `from`, datagrams of `stride` bytes (the last may be
/// shorter).
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub from: SocketAddr,
    pub len: usize,
    pub stride: usize,
}

impl Udp {
    fn open(domain: Domain, addr: SocketAddr, fwmark: u32) -> io::Result<Udp> {
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
        let sock: UdpSocket = sock.into();
        // quinn-udp enables GRO and packet info and makes the socket non-blocking (see
        // the module comment).
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        sock.set_nonblocking(true)?;
        allow_fragments(&sock, domain)?;
        Ok(Udp {
            sock,
            state,
            gso_refused_from: AtomicUsize::new(usize::MAX),
        })
    }

    /// Datagrams one [`Udp::send`] may carry (1 where the kernel has no UDP GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().min(MAX_GSO_SEGMENTS)
    }

    /// Sends `contents` to `to`: one datagram, or with `segment` shorter than it, datagrams
    /// of `segment` bytes (the last may be shorter) in one GSO send. Where the kernel
    /// refuses to segment (a device without checksum offload: EIO; a segment above the path
    /// MTU: EMSGSIZE or EINVAL), the datagrams go one by one, and so do later ones that
    /// would meet the same refusal.
    pub fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        let gso = segment < contents.len();
        if gso && segment >= self.gso_refused_from.load(Ordering::Relaxed) {
            return self.send_one_by_one(to, contents, segment);
        }
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: gso.then_some(segment),
            src_ip: None,
        };
        let sent =
            self.waiting_for_room(|| self.state.try_send(UdpSockRef::from(&self.sock), &transmit));
        match sent {
            Err(e) if gso && refused_gso(&e) => {
                if e.raw_os_error() == Some(libc::EMSGSIZE) {
                    self.gso_refused_from.fetch_min(segment, Ordering::Relaxed);
                }
                tracing::info!(error = %e, segment, "UDP GSO refused; sending datagrams one by one");
                self.send_one_by_one(to, contents, segment)
            }
            other => other,
        }
    }

    fn send_one_by_one(&self, to: SocketAddr, contents: &[u8], segment: usize) -> io::Result<()> {
        for one in contents.chunks(segment) {
            self.waiting_for_room(|| self.sock.send_to(one, to))?;
        }
        Ok(())
    }

    /// Runs `send` until it does not find the send buffer full, waiting for room in
    /// between; after [`SEND_WAIT`] without room, the `WouldBlock` error.
    fn waiting_for_room<T>(&self, mut send: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut deadline = None;
        loop {
            match send() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let until = *deadline.get_or_insert_with(|| Instant::now() + SEND_WAIT);
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || !wait_for(&self.sock, libc::POLLOUT, left)? {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Takes the GRO batches queued on the socket into `inbox`, without waiting: how many
    /// (`WouldBlock` when none is). Fewer than [`RECV_BATCH`]: the queue ran dry.
    pub fn recv(&self, inbox: &mut Inbox) -> io::Result<usize> {
        let mut meta = [RecvMeta::default(); RECV_BATCH];
        let mut chunks = inbox.buf.chunks_mut(RECV_BUF);
        let mut bufs: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
        let n = self
            .state
            .recv(UdpSockRef::from(&self.sock), &mut bufs, &mut meta)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        for (got, m) in inbox.got.iter_mut().zip(&meta[..n]) {
            *got = Received {
                from: m.addr,
                len: m.len.min(RECV_BUF),
                stride: if m.stride == 0 { m.len } else { m.stride },
            };
        }
        Ok(n)
    }

    /// Waits up to `timeout` for datagrams to receive; whether any are queued.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        wait_for(&self.sock, libc::POLLIN, timeout)
    }
}

/// Room for [`RECV_BATCH`] GRO batches and what [`Udp::recv`] learnt about each.
pub struct Inbox {
    buf: Vec<u8>,
    got: [Received; RECV_BATCH],
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            buf: vec![0u8; RECV_BATCH * RECV_BUF],
            got: [Received {
                from: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                len: 0,
                stride: 0,
            }; RECV_BATCH],
        }
    }
}

impl Inbox {
    /// The `i`-th batch of the last receive: who sent it, and its buffer (of which the
    /// first `len` bytes are datagrams of `stride` bytes).
    pub fn batch(&mut self, i: usize) -> (Received, &mut [u8]) {
        let got = self.got[i];
        (got, &mut self.buf[i * RECV_BUF..(i + 1) * RECV_BUF])
    }
}

/// Waits up to `timeout` for `events` on `sock`; whether they came (a socket error counts:
/// the next call reports it).
fn wait_for(sock: &UdpSocket, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd, its count; the fd outlives the call.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Undoes quinn-udp's "never fragment" (QUIC probes its own path MTU; WireGuard does
/// not): with the kernel's default path-MTU handling, a datagram too big for the path is
/// fragmented, as kernel WireGuard and wireguard-go have it, instead of failing with
/// EMSGSIZE — which would black-hole full-size packets on an underlay whose MTU is smaller
/// than the tunnel's MTU plus 80 bytes (1460-byte cloud networks, for one).
fn allow_fragments(sock: &UdpSocket, domain: Domain) -> io::Result<()> {
    set_int_option(
        sock,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    )?;
    if domain == Domain::IPV6 {
        set_int_option(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        )?;
        set_int_option(sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)?;
    }
    Ok(())
}

fn set_int_option(
    sock: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `sock` is an open socket for the whole call, and the option value is a c_int
    // whose address and size are passed together.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn refused_gso(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE)
    )
}

pub struct Sockets {
    pub v4: Udp,
    /// `None` where the host has no IPv6.
    pub v6: Option<Udp>,
    pub port: u16,
    retired: AtomicBool,
}

impl Sockets {
    /// Binds both families on `port` (0: a free port, the same for both).
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Sockets> {
        // With port 0 the v4 socket picks; the v6 one may find that port taken, so retry.
        for _ in 0..16 {
            let v4 = Udp::open(
                Domain::IPV4,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into(),
                fwmark,
            )?;
            let chosen = v4.sock.local_addr()?.port();
            let v6addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, chosen, 0, 0).into();
            let v6 = match Udp::open(Domain::IPV6, v6addr, fwmark) {
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
        socket2::SockRef::from(&self.v4.sock).set_mark(fwmark)?;
        if let Some(v6) = &self.v6 {
            socket2::SockRef::from(&v6.sock).set_mark(fwmark)?;
        }
        Ok(())
    }

    /// The socket for `to`, and `to` as that socket wants it (an IPv4-mapped IPv6 address
    /// goes out on the IPv4 socket).
    fn for_dest(&self, to: SocketAddr) -> io::Result<(&Udp, SocketAddr)> {
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
        Ok((sock, to))
    }

    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let (sock, to) = self.for_dest(to)?;
        sock.send(to, data, data.len())
    }

    /// Sends `data`, datagrams of `segment` bytes back to back (the last may be shorter),
    /// to `to` in as few system calls as the kernel allows. Returns how many it made.
    pub fn send_segments(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<usize> {
        let (sock, to) = self.for_dest(to)?;
        let per_send = sock
            .max_segments()
            .max(1)
            .min(MAX_GSO_BYTES / segment.max(1))
            .max(1);
        let mut sends = 0;
        for run in data.chunks(per_send * segment) {
            sock.send(to, run, segment)?;
            sends += 1;
        }
        Ok(sends)
    }

    /// Tells the reader threads of these sockets to stop (after a rebind).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Sends `runs` GSO sends of `per_run` datagrams, each run's datagrams one size apart
    /// from the last run's, so none coalesce with another.
    fn send_runs(from: &Sockets, to: u16, runs: usize, per_run: usize) {
        for r in 0..runs {
            let size = 200 + r;
            let data = vec![u8::try_from(r).unwrap_or(0); size * per_run];
            from.send_segments(&data, size, loopback(to)).unwrap();
        }
    }

    #[test]
    fn one_receive_takes_every_queued_batch_up_to_the_limit_and_says_when_it_ran_dry() {
        let rx = Sockets::bind(0, 0).unwrap();
        let tx = Sockets::bind(0, 0).unwrap();
        let mut inbox = Inbox::default();
        let empty = rx.v4.recv(&mut inbox).unwrap_err();
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock, "{empty}");
        assert!(!rx.v4.wait_readable(Duration::from_millis(20)).unwrap());

        send_runs(&tx, rx.port, RECV_BATCH + 1, 3);
        assert!(rx.v4.wait_readable(Duration::from_secs(2)).unwrap());
        let mut seen = Vec::new();
        let mut calls = Vec::new();
        while seen.len() < RECV_BATCH + 1 {
            let n = rx.v4.recv(&mut inbox).unwrap();
            calls.push(n);
            for i in 0..n {
                let (got, buf) = inbox.batch(i);
                assert_eq!(got.from.port(), tx.port);
                seen.push((got.len, got.stride, buf[0]));
            }
        }
        // Loopback keeps a GSO send whole for a GRO socket: one batch per send.
        let want: Vec<_> = (0..RECV_BATCH + 1)
            .map(|r| (3 * (200 + r), 200 + r, u8::try_from(r).unwrap()))
            .collect();
        assert_eq!(seen, want);
        assert_eq!(calls, [RECV_BATCH, 1], "a full receive, then the rest");
        let dry = rx.v4.recv(&mut inbox).unwrap_err();
        assert_eq!(dry.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_send_that_finds_no_room_retries_and_gives_up_after_the_wait() {
        let s = Sockets::bind(0, 0).unwrap();
        let mut refusals = 3;
        let sent = s.v4.waiting_for_room(|| {
            if refusals == 0 {
                return Ok(7);
            }
            refusals -= 1;
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        });
        assert_eq!(sent.unwrap(), 7, "sent once there was room");
        let other = s
            .v4
            .waiting_for_room(|| Err::<(), _>(io::Error::from(io::ErrorKind::PermissionDenied)));
        assert_eq!(other.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        // A socket that keeps refusing (here: the closure) is given up on after SEND_WAIT.
        let started = Instant::now();
        let never =
            s.v4.waiting_for_room(|| Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock)));
        assert_eq!(never.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= SEND_WAIT);
    }
}
