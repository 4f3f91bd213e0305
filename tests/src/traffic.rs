//! Traffic a user would check: ping, a TCP byte stream whose every byte is verified, a
//! paced UDP stream whose every datagram is counted, and a device's packet counters.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::Netns;

/// `ping -c count` from `ns`; true when every reply came back.
pub fn ping(ns: &Netns, dst: IpAddr, count: u32) -> bool {
    ping_from(ns, dst, count, None)
}

/// Pings once at a time until a reply comes or `timeout` passes: for paths that need a
/// handshake retry (WireGuard retries every 5 s) before they work.
pub fn ping_within(ns: &Netns, dst: IpAddr, timeout: std::time::Duration) -> bool {
    crate::daemon::wait_until(timeout, || ping(ns, dst, 1))
}

/// `count` pings `interval` seconds apart from namespace `ns` (by name, so it can run on
/// another thread); returns (sent, received).
pub fn ping_stats(ns: &str, dst: IpAddr, count: u32, interval: &str) -> (u32, u32) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            &dst.to_string(),
        ])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "N packets transmitted, M received, ..."
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    )
}

pub fn ping_from(ns: &Netns, dst: IpAddr, count: u32, src: Option<IpAddr>) -> bool {
    let count = count.to_string();
    let dst = dst.to_string();
    let mut args = vec!["-n", "-q", "-c", &count, "-i", "0.2", "-W", "1"];
    let src_s = src.map(|s| s.to_string());
    if let Some(s) = &src_s {
        args.extend(["-I", s.as_str()]);
    }
    args.push(&dst);
    ns.exec("ping", &args).is_ok()
}

/// One ping of `payload` ICMP bytes with fragmentation forbidden (`-M do`): true when the
/// reply came. A packet of `payload + 28` bytes must fit every link's MTU on the path (and
/// the sender's route MTU) to get through.
pub fn ping_df(ns: &Netns, dst: IpAddr, payload: u32) -> bool {
    let size = payload.to_string();
    let dst = dst.to_string();
    ns.exec(
        "ping",
        &[
            "-n", "-q", "-c", "1", "-W", "1", "-M", "do", "-s", &size, &dst,
        ],
    )
    .is_ok()
}

/// The byte at `offset` of the checked stream: cheap, position-dependent, not periodic at
/// any TCP segment size.
fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (offset as u8)
}

/// Sends `bytes` of a known pattern over TCP from `from` to `to_addr` (an address in `to`)
/// and checks that exactly those bytes arrived, in order.
///
/// The timeouts bound each connect (10 s), read and write (15 s), not the whole transfer, so
/// any size works at any speed as long as the stream keeps moving: 100 MB through a tunnel
/// at ~1 Gbit/s takes about a second, and even at 10 Mbit/s nothing times out.
pub fn tcp_transfer(from: &Netns, to: &Netns, to_addr: IpAddr, bytes: u64) -> anyhow::Result<()> {
    tcp_transfer_across(from, to, to_addr, bytes, || ())
}

/// [`tcp_transfer`], returning how long it took from connecting to the last byte checked
/// (bytes / elapsed is the goodput).
pub fn tcp_transfer_timed(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    tcp_transfer(from, to, to_addr, bytes)?;
    Ok(start.elapsed())
}

/// [`tcp_transfer`] with `halfway` run in the middle of the stream: the receiver stops
/// reading once half the bytes are in, `halfway` runs, then reading resumes. Whatever
/// `halfway` changes (an address, a configuration) happens while the stream is in flight,
/// however fast the tunnel is.
pub fn tcp_transfer_across(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    bytes: u64,
    halfway: impl FnOnce(),
) -> anyhow::Result<()> {
    let listener = to.enter(move || TcpListener::bind(SocketAddr::new(to_addr, 0)))??;
    let addr = listener.local_addr()?;
    let (half_tx, half_rx) = mpsc::channel::<()>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let server = thread::spawn(move || -> anyhow::Result<u64> {
        listener.set_nonblocking(false)?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        let mut paused = false;
        loop {
            let n = conn.read(&mut buf).context("reading the stream")?;
            if n == 0 {
                return Ok(offset);
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern(offset + i as u64) {
                    bail!("byte {} corrupted", offset + i as u64);
                }
            }
            offset += n as u64;
            if !paused && offset >= bytes / 2 {
                paused = true;
                // Err only when the caller is gone; either way, read on.
                let _ = half_tx.send(());
                let _ = resume_rx.recv();
            }
        }
    });
    let client = from.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))?;
    let writer = thread::spawn(move || -> anyhow::Result<()> {
        let mut conn = client.context("connecting through the tunnel")?;
        conn.set_write_timeout(Some(Duration::from_secs(15)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        while offset < bytes {
            let n = (bytes - offset).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(offset + i as u64);
            }
            conn.write_all(&buf[..n]).context("writing the stream")?;
            offset += n as u64;
        }
        conn.shutdown(Shutdown::Write)?;
        Ok(())
    });
    // Wait for the receiver to reach half way, unless the stream failed before that.
    let join_writer = |w: thread::JoinHandle<anyhow::Result<()>>| {
        w.join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
    };
    let mut writer = Some(writer);
    let mut sent = None;
    loop {
        match half_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => {
                halfway();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(w) = writer.take_if(|w| w.is_finished()) {
                    let result = join_writer(w);
                    let failed = result.is_err();
                    sent = Some(result);
                    if failed {
                        // The receiver will never get half way.
                        break;
                    }
                }
            }
        }
    }
    drop(resume_tx);
    let sent = match (sent, writer) {
        (Some(result), _) => result,
        (None, Some(w)) => join_writer(w),
        (None, None) => Err(anyhow::anyhow!("writer lost")),
    };
    if sent.is_err() && !server.is_finished() {
        // Unblock a server still waiting to accept so its thread ends.
        let _ = from.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
    }
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    let received = match (sent, received) {
        (Ok(()), Ok(n)) => n,
        (Err(e), Ok(_)) => return Err(e),
        (Ok(()), Err(e)) => return Err(e.context("receiver")),
        (Err(e), Err(r)) => return Err(e.context(format!("receiver: {r:#}"))),
    };
    if received != bytes {
        bail!("sent {bytes} bytes, {received} arrived");
    }
    Ok(())
}

/// The segment size each end of a fresh TCP connection from `from` to `to_addr` (in `to`)
/// will send, as `getsockopt(TCP_MAXSEG)` reports it after the handshake: the smaller of
/// what the other end advertised in its SYN (or SYN-ACK) and its own route's MTU, minus
/// options. (client, server).
pub fn tcp_mss(from: &Netns, to: &Netns, to_addr: IpAddr) -> anyhow::Result<(u32, u32)> {
    let listener = to.enter(move || TcpListener::bind(SocketAddr::new(to_addr, 0)))??;
    let addr = listener.local_addr()?;
    let client = from.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))?;
    let client = client.context("connecting through the tunnel")?;
    let (server, _) = listener.accept().context("accepting")?;
    Ok((maxseg(&client)?, maxseg(&server)?))
}

fn maxseg(s: &TcpStream) -> anyhow::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and `v`/`len` describe a c_int the kernel writes into.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("TCP_MAXSEG: {}", std::io::Error::last_os_error());
    }
    u32::try_from(v).context("negative TCP_MAXSEG")
}

/// A UDP socket inside `ns`, for sending arbitrary datagrams at a daemon.
pub fn udp_socket(ns: &Netns, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    Ok(ns.enter(move || UdpSocket::bind(bind))??)
}

/// The shape of a [`Stream`].
#[derive(Debug, Clone, Copy)]
pub struct StreamConfig {
    /// Datagrams per second. 500/s resolves an outage to 2 ms without loading anything.
    pub rate: u32,
    /// UDP payload bytes (at least 16: magic and sequence number).
    pub payload: usize,
    /// How long `stop` waits for datagrams still in flight before counting.
    pub drain: Duration,
}

impl Default for StreamConfig {
    fn default() -> StreamConfig {
        StreamConfig {
            rate: 500,
            payload: 64,
            drain: Duration::from_millis(300),
        }
    }
}

/// What a [`Stream`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    /// Datagrams handed to the kernel (a send that failed counts as sent, and lost).
    pub sent: u64,
    /// Distinct sequence numbers that arrived.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// The longest time without an arrival, from the first send to the last send
    /// (so an outage at the very start or end counts too). At 500/s about 2 ms when
    /// nothing is lost.
    pub longest_gap: Duration,
    /// The longest run of consecutive sequence numbers that never arrived.
    pub longest_loss_run: u64,
    /// Datagrams that arrived more than once, or after a later one.
    pub duplicates: u64,
    pub reordered: u64,
    /// Sends the kernel refused (unreachable, no buffer).
    pub send_errors: u64,
}

/// A paced UDP stream of numbered datagrams from one namespace to another, running on two
/// background threads until [`Stream::stop`]: it shows exactly how many packets a change
/// (an FDB rewrite, an agent restart) cost and how long the outage was. Dropping it without
/// `stop` ends both threads too.
pub struct Stream {
    stop_sender: Arc<AtomicBool>,
    stop_receiver: Arc<AtomicBool>,
    sender: Option<thread::JoinHandle<SenderReport>>,
    receiver: Option<thread::JoinHandle<ReceiverReport>>,
    drain: Duration,
}

/// Marks the stream's datagrams, so a stray one is never counted.
const STREAM_MAGIC: u64 = 0x6973_7468_6d75_7321;

struct SenderReport {
    sent: u64,
    errors: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct ReceiverReport {
    /// (sequence number, arrival), in arrival order.
    arrivals: Vec<(u64, Instant)>,
}

/// Starts a [`Stream`] from `from` to `to_addr` (an address inside `to`), port chosen by the
/// kernel.
pub fn start_stream(
    from: &Netns,
    to: &Netns,
    to_addr: IpAddr,
    config: StreamConfig,
) -> anyhow::Result<Stream> {
    if config.payload < 16 || config.rate == 0 {
        bail!("a stream needs a payload of at least 16 bytes and a rate above 0");
    }
    // Sockets keep the namespace they were created in; the threads using them need not.
    let rx = to.enter(move || UdpSocket::bind(SocketAddr::new(to_addr, 0)))??;
    let dst = rx.local_addr()?;
    let unspecified: IpAddr = match to_addr {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let tx = from.enter(move || UdpSocket::bind(SocketAddr::new(unspecified, 0)))??;
    rx.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop_sender = Arc::new(AtomicBool::new(false));
    let stop_receiver = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop_receiver.clone();
        thread::spawn(move || receive_stream(rx, &stop))
    };
    let sender = {
        let stop = stop_sender.clone();
        thread::spawn(move || send_stream(tx, dst, config, &stop))
    };
    Ok(Stream {
        stop_sender,
        stop_receiver,
        sender: Some(sender),
        receiver: Some(receiver),
        drain: config.drain,
    })
}

/// Sends on a fixed schedule (datagram `i` at `start + i / rate`): after a stall of the
/// sender itself the missed datagrams go out at once, so the count per second holds and
/// a gap seen at the receiver is the network's.
fn send_stream(
    tx: UdpSocket,
    dst: SocketAddr,
    config: StreamConfig,
    stop: &AtomicBool,
) -> SenderReport {
    let mut report = SenderReport {
        sent: 0,
        errors: 0,
        first: None,
        last: None,
    };
    let interval = Duration::from_secs(1) / config.rate;
    let mut buf = vec![0u8; config.payload];
    buf[..8].copy_from_slice(&STREAM_MAGIC.to_be_bytes());
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let due = start + interval * u32::try_from(report.sent).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        buf[8..16].copy_from_slice(&report.sent.to_be_bytes());
        if tx.send_to(&buf, dst).is_err() {
            report.errors += 1;
        }
        let t = Instant::now();
        report.first.get_or_insert(t);
        report.last = Some(t);
        report.sent += 1;
    }
    report
}

fn receive_stream(rx: UdpSocket, stop: &AtomicBool) -> ReceiverReport {
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // Timeouts (WouldBlock/TimedOut) only let the loop look at `stop`.
        let Ok(n) = rx.recv(&mut buf) else {
            continue;
        };
        if n < 16 || buf[..8] != STREAM_MAGIC.to_be_bytes() {
            continue;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&buf[8..16]);
        arrivals.push((u64::from_be_bytes(seq), Instant::now()));
    }
    ReceiverReport { arrivals }
}

impl Stream {
    /// Stops sending, waits the drain time for datagrams in flight, stops receiving, and
    /// counts.
    pub fn stop(mut self) -> anyhow::Result<StreamStats> {
        let sender = self.sender.take().context("stream already stopped")?;
        let receiver = self.receiver.take().context("stream already stopped")?;
        // The sender stops first; the receiver reads on while the last datagrams land.
        self.stop_sender.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("stream sender panicked"))?;
        thread::sleep(self.drain);
        self.stop_receiver.store(true, Ordering::Relaxed);
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("stream receiver panicked"))?;
        Ok(stream_stats(&sent, &received))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop_sender.store(true, Ordering::Relaxed);
        self.stop_receiver.store(true, Ordering::Relaxed);
    }
}

/// Counts a stream from both ends' records.
fn stream_stats(sent: &SenderReport, received: &ReceiverReport) -> StreamStats {
    let mut seen = vec![false; usize::try_from(sent.sent).unwrap_or(usize::MAX)];
    let (mut distinct, mut duplicates, mut reordered) = (0u64, 0u64, 0u64);
    let mut highest: Option<u64> = None;
    for &(seq, _) in &received.arrivals {
        let Some(slot) = usize::try_from(seq).ok().and_then(|i| seen.get_mut(i)) else {
            continue;
        };
        if *slot {
            duplicates += 1;
            continue;
        }
        *slot = true;
        distinct += 1;
        if highest.is_some_and(|h| seq < h) {
            reordered += 1;
        }
        highest = highest.max(Some(seq));
    }
    let mut longest_loss_run = 0u64;
    let mut run = 0u64;
    for arrived in &seen {
        run = if *arrived { 0 } else { run + 1 };
        longest_loss_run = longest_loss_run.max(run);
    }
    StreamStats {
        sent: sent.sent,
        received: distinct,
        lost: sent.sent - distinct,
        longest_gap: longest_gap(sent, received),
        longest_loss_run,
        duplicates,
        reordered,
        send_errors: sent.errors,
    }
}

/// The longest stretch without an arrival between the first and the last send.
fn longest_gap(sent: &SenderReport, received: &ReceiverReport) -> Duration {
    let (Some(first), Some(last)) = (sent.first, sent.last) else {
        return Duration::ZERO;
    };
    let mut times: Vec<Instant> = received.arrivals.iter().map(|&(_, t)| t).collect();
    times.sort();
    let mut previous = first;
    let mut longest = Duration::ZERO;
    for t in times.into_iter().chain(std::iter::once(last)) {
        if t > previous {
            longest = longest.max(t - previous);
            previous = t;
        }
    }
    longest
}

/// Packet and byte counters of a device, as the kernel keeps them (`ip -s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

impl LinkCounters {
    /// What grew from `earlier` to `self` (counters only grow while the device exists).
    pub fn since(&self, earlier: &LinkCounters) -> LinkCounters {
        LinkCounters {
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_errors: self.rx_errors.saturating_sub(earlier.rx_errors),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_errors: self.tx_errors.saturating_sub(earlier.tx_errors),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }
}

/// The counters of device `dev` in `ns` (the agent's TUN: did the traffic go through the
/// mesh?), from `ip -s -j link show`.
pub fn link_counters(ns: &Netns, dev: &str) -> anyhow::Result<LinkCounters> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    parse_link_counters(&out).with_context(|| format!("counters of {dev} in {}", ns.name))
}

fn parse_link_counters(json: &str) -> anyhow::Result<LinkCounters> {
    let v: serde_json::Value = serde_json::from_str(json).context("ip -j output")?;
    let stats = v
        .get(0)
        .and_then(|l| l.get("stats64"))
        .context("no stats64 in ip -j output")?;
    let get = |dir: &str, key: &str| -> anyhow::Result<u64> {
        stats
            .get(dir)
            .and_then(|d| d.get(key))
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no {dir}.{key}"))
    };
    Ok(LinkCounters {
        rx_packets: get("rx", "packets")?,
        rx_bytes: get("rx", "bytes")?,
        rx_errors: get("rx", "errors")?,
        rx_dropped: get("rx", "dropped")?,
        tx_packets: get("tx", "packets")?,
        tx_bytes: get("tx", "bytes")?,
        tx_errors: get("tx", "errors")?,
        tx_dropped: get("tx", "dropped")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn stream_counts_losses_gaps_and_duplicates() {
        let t0 = Instant::now();
        let sent = SenderReport {
            sent: 6,
            errors: 0,
            first: Some(t0),
            last: Some(at(t0, 10)),
        };
        // 0, 1 arrive; 2, 3 lost; 5 before 4; 5 twice.
        let received = ReceiverReport {
            arrivals: vec![
                (0, at(t0, 0)),
                (1, at(t0, 2)),
                (5, at(t0, 9)),
                (4, at(t0, 9)),
                (5, at(t0, 9)),
            ],
        };
        let s = stream_stats(&sent, &received);
        assert_eq!((s.sent, s.received, s.lost), (6, 4, 2));
        assert_eq!(s.longest_loss_run, 2);
        assert_eq!((s.duplicates, s.reordered), (1, 1));
        assert_eq!(s.longest_gap, Duration::from_millis(7));
    }

    #[test]
    fn counters_parse_from_ip_json() {
        let json = r#"[{"ifname":"x","stats64":{"rx":{"bytes":10,"packets":1,"errors":0,
            "dropped":2,"over_errors":0,"multicast":0},"tx":{"bytes":20,"packets":3,
            "errors":0,"dropped":0,"carrier_errors":0,"collisions":0}}}]"#;
        let c = parse_link_counters(json).unwrap();
        assert_eq!((c.rx_packets, c.rx_bytes, c.rx_dropped), (1, 10, 2));
        assert_eq!((c.tx_packets, c.tx_bytes), (3, 20));
    }
}
