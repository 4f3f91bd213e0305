//! Traffic a user would check: ping, and a TCP byte stream whose every byte is verified.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

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

/// The byte at `offset` of the checked stream: cheap, position-dependent, not periodic at
/// any TCP segment size.
fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (offset as u8)
}

/// Sends `bytes` of a known pattern over TCP from `from` to `to_addr` (an address in `to`)
/// and checks that exactly those bytes arrived, in order.
pub fn tcp_transfer(from: &Netns, to: &Netns, to_addr: IpAddr, bytes: u64) -> anyhow::Result<()> {
    tcp_transfer_across(from, to, to_addr, bytes, || ())
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

/// A UDP socket inside `ns`, for sending arbitrary datagrams at a daemon.
pub fn udp_socket(ns: &Netns, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    Ok(ns.enter(move || UdpSocket::bind(bind))??)
}
