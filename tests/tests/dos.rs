//! Denial of service (issue 16): one source floods an isthmus host with handshake
//! initiations that carry a valid MAC1 for its key, and answers every cookie reply so its
//! MAC2 is valid too — the attacker the kernel's and wireguard-go's per-source rate limiter
//! exist for. Meanwhile a peer's TCP stream through the tunnel must keep at least 90 % of
//! its rate without the flood, and a new peer (wireguard-go) must complete its handshake.
//! Without the per-source limit the stream falls to a few per cent and the newcomer may
//! never get through.
//!
//! Four namespaces on one bridge (10.250.0.0/24): the victim (isthmus, .1), the peer with
//! the stream (isthmus, .2), the newcomer (wireguard-go, .3) and the attacker (.66). The
//! attacker computes MAC1, decrypts cookie replies and computes MAC2 itself, from the
//! whitepaper (§5.4.4, §5.4.7), so the test does not trust the code it tests.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use isthmus_tests::netns::{veth, Netns};
use isthmus_tests::pair::{Host, Impl, Underlay};
use isthmus_tests::traffic::{ping, udp_socket};
use tempfile::TempDir;

/// Initiations a second the attacker aims for: several times what the victim's packet
/// thread can answer with Diffie-Hellman work, so without a per-source limit the stream
/// collapses (measured: see the README's figures).
const FLOOD_RATE: u64 = 20_000;
/// The legitimate stream's pace: a TCP stream an application keeps at its own rate, well
/// below what the tunnel carries here (2–4 Gbit/s on this 2-core machine), so what it
/// measures is whether the victim still serves it, not how the attacker's own sending
/// competes for the same two cores (in a real attack the attacker is another machine).
const STREAM_RATE: u64 = 400_000_000 / 8;
/// The stream is measured in windows this long, the flood on in every other one: the
/// machine's other load (2 shared cores) drifts over seconds and so falls on both alike.
const WINDOW: Duration = Duration::from_secs(1);
const WINDOWS: usize = 8;
/// Before each window, after the flood was switched: the victim drains its socket, or
/// goes under load and hands out the first cookie.
const SETTLE: Duration = Duration::from_millis(250);
/// Under load the newcomer's first initiation gets a cookie reply; its retry 5 s later
/// (WireGuard's REKEY_TIMEOUT, plus jitter) carries MAC2. One lost retry more is allowed.
const NEWCOMER_BOUND: Duration = Duration::from_secs(12);
const ATTACKER_ADDR: &str = "10.250.0.66";

/// Everything the test created; dropped in order, also on panic: daemons first (each
/// host's own drop), then the namespaces, whose deletion takes the veth links along.
struct Mesh {
    victim: Host,
    legit: Host,
    newcomer: Host,
    attacker: Netns,
    _switch: Netns,
    _dir: TempDir,
}

impl Mesh {
    fn new() -> anyhow::Result<Mesh> {
        isthmus_tests::require_root();
        let dir = tempfile::Builder::new().prefix("isthmus-dos").tempdir()?;
        let name = isthmus_tests::unique_name();
        let switch = Netns::new(&format!("{name}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let attacker = Netns::new(&format!("{name}-x"))?;
        let start = |kind, n| Host::start(kind, n, &name, dir.path());
        let mut victim = start(Impl::Isthmus, 1).context("victim")?;
        let mut legit = start(Impl::Isthmus, 2).context("legit peer")?;
        let mut newcomer = start(Impl::WireguardGo, 3).context("newcomer")?;
        for host in [&mut victim, &mut legit, &mut newcomer] {
            let addr = format!("{}/24", host.underlay(Underlay::V4));
            host.underlay_if = plug(&switch, &host.ns, &format!("{name}v{}", host.n), &addr)?;
            host.address()?;
        }
        plug(
            &switch,
            &attacker,
            &format!("{name}vx"),
            &format!("{ATTACKER_ADDR}/24"),
        )?;
        Ok(Mesh {
            victim,
            legit,
            newcomer,
            attacker,
            _switch: switch,
            _dir: dir,
        })
    }

    fn logs(&self) -> String {
        format!(
            "--- victim ---\n{}\n--- legit ---\n{}\n--- newcomer ---\n{}",
            self.victim.daemon.log(),
            self.legit.daemon.log(),
            self.newcomer.daemon.log()
        )
    }
}

/// A veth from `ns` to the bridge in `switch`, `addr` on the namespace's end.
fn plug(switch: &Netns, ns: &Netns, link: &str, addr: &str) -> anyhow::Result<String> {
    let (end, switch_end) = veth(ns, switch, link)?;
    switch.ip(&["link", "set", &switch_end, "master", "br0"])?;
    ns.ip(&["addr", "add", addr, "dev", &end])?;
    Ok(end)
}

/// Makes `other` a peer of `host`: its tunnel address, its underlay endpoint.
fn add_peer(host: &Host, other: &Host) -> anyhow::Result<()> {
    host.wg(&[
        "set",
        &host.iface,
        "peer",
        &other.keys.public,
        "allowed-ips",
        &format!("{}/32", other.inner_v4()),
        "endpoint",
        &other.endpoint(Underlay::V4),
    ])?;
    Ok(())
}

// --- The attacker's WireGuard arithmetic (whitepaper §5.4.4, §5.4.7) ---

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, data): keyed BLAKE2s with a 16-byte output.
fn mac(key: &[u8], data: &[u8]) -> anyhow::Result<[u8; 16]> {
    let mut m = <Blake2sMac<U16> as Mac>::new_from_slice(key)
        .map_err(|e| anyhow::anyhow!("BLAKE2s key: {e}"))?;
    Mac::update(&mut m, data);
    Ok(m.finalize().into_bytes().into())
}

/// A handshake initiation (148 bytes) whose MAC1 is valid for `responder`; the rest is
/// noise, which costs the responder a Diffie-Hellman before it can tell.
fn initiation(responder: &[u8; 32], sender: u32) -> anyhow::Result<[u8; 148]> {
    let mut msg = [0u8; 148];
    msg[0] = 1;
    msg[4..8].copy_from_slice(&sender.to_le_bytes());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut msg[8..116] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mac1 = mac(&hash(&[b"mac1----", responder]), &msg[..116])?;
    msg[116..132].copy_from_slice(&mac1);
    Ok(msg)
}

/// The cookie inside a cookie reply (64 bytes) to an initiation whose MAC1 was `mac1`.
fn open_cookie(responder: &[u8; 32], mac1: &[u8], reply: &[u8]) -> anyhow::Result<[u8; 16]> {
    if reply.len() != 64 || reply[0] != 3 {
        bail!(
            "not a cookie reply ({} bytes, type {:?})",
            reply.len(),
            reply.first()
        );
    }
    let key = hash(&[b"cookie--", responder]);
    let cipher = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&key.into());
    let payload = Payload {
        msg: &reply[32..64],
        aad: mac1,
    };
    let cookie = cipher
        .decrypt(XNonce::from_slice(&reply[8..32]), payload)
        .map_err(|_| anyhow::anyhow!("cookie reply does not decrypt"))?;
    cookie
        .try_into()
        .map_err(|_| anyhow::anyhow!("cookie is not 16 bytes"))
}

#[derive(Debug, Default)]
struct FloodStats {
    sent: u64,
    /// Sends the kernel refused (a full socket buffer).
    refused: u64,
    cookies: u64,
    /// Seconds the flood was switched on.
    secs: f64,
}

/// The attacker: while `active`, `rate` initiations a second from one address, the same
/// message each time with MAC2 recomputed from every cookie reply; until `stop`.
struct Flood {
    active: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<FloodStats>>>,
}

impl Flood {
    fn start(ns: &Netns, responder: [u8; 32], to: SocketAddr, rate: u64) -> anyhow::Result<Flood> {
        let sock = udp_socket(ns, SocketAddr::new(ATTACKER_ADDR.parse()?, 0))?;
        sock.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicBool::new(false));
        let (stopped, on) = (stop.clone(), active.clone());
        let thread = thread::spawn(move || -> anyhow::Result<FloodStats> {
            let sender = 0x00c0_ffee;
            let mut msg = initiation(&responder, sender)?;
            let mut stats = FloodStats::default();
            let mut reply = [0u8; 256];
            // Initiations owed: earned at `rate` while on, capped so a late wake-up does
            // not turn into a burst.
            let mut credit = 0.0f64;
            let mut last = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                if on.load(Ordering::Relaxed) {
                    let dt = now.duration_since(last).as_secs_f64();
                    stats.secs += dt;
                    credit = (credit + dt * rate as f64).min(rate as f64 / 100.0);
                } else {
                    credit = 0.0;
                }
                last = now;
                while credit >= 1.0 {
                    credit -= 1.0;
                    match sock.send_to(&msg, to) {
                        Ok(_) => stats.sent += 1,
                        Err(_) => stats.refused += 1,
                    }
                }
                loop {
                    match sock.recv_from(&mut reply) {
                        Ok((n, _)) if n == 64 && reply[4..8] == sender.to_le_bytes() => {
                            let cookie = open_cookie(&responder, &msg[116..132], &reply[..n])?;
                            let mac2 = mac(&cookie, &msg[..132])?;
                            msg[132..148].copy_from_slice(&mac2);
                            stats.cookies += 1;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).context("receiving cookie replies"),
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            Ok(stats)
        });
        Ok(Flood {
            active,
            stop,
            thread: Some(thread),
        })
    }

    fn switch(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed);
    }

    fn stop(mut self) -> anyhow::Result<FloodStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("flood already stopped")?
            .join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP stream from one namespace to an address in another at `rate` bytes a second (as
/// fast as it can when the path is slower), for as long as it runs; the receiver counts
/// the bytes so the test can read the rate over any window.
struct Stream {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Stream {
    fn start(from: &Netns, to: &Netns, to_addr: IpAddr, rate: u64) -> anyhow::Result<Stream> {
        let listener = to.enter(move || TcpListener::bind(SocketAddr::new(to_addr, 0)))??;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (received.clone(), stop.clone());
        let receiver = thread::spawn(move || -> anyhow::Result<()> {
            let (mut conn, _) = listener.accept().context("accepting the stream")?;
            conn.set_read_timeout(Some(Duration::from_secs(15)))?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = conn.read(&mut buf).context("reading the stream")?;
                if n == 0 {
                    return Ok(());
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let conn =
            from.enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))?;
        let sender = thread::spawn(move || -> anyhow::Result<()> {
            let mut conn = conn.context("connecting through the tunnel")?;
            conn.set_write_timeout(Some(Duration::from_secs(15)))?;
            let buf = vec![0x5au8; 64 * 1024];
            let (start, mut sent) = (Instant::now(), 0u64);
            while !stopped.load(Ordering::Relaxed) {
                if sent as f64 > start.elapsed().as_secs_f64() * rate as f64 {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                conn.write_all(&buf).context("writing the stream")?;
                sent += buf.len() as u64;
            }
            conn.shutdown(Shutdown::Write)?;
            Ok(())
        });
        Ok(Stream {
            received,
            stop,
            threads: vec![sender, receiver],
        })
    }

    /// Bytes received over the next `window`, and the seconds it really lasted.
    fn measure(&self, window: Duration) -> (u64, f64) {
        let (start, before) = (Instant::now(), self.received.load(Ordering::Relaxed));
        thread::sleep(window);
        let bytes = self.received.load(Ordering::Relaxed) - before;
        (bytes, start.elapsed().as_secs_f64())
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        }
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn mbit(bytes_per_sec: f64) -> f64 {
    bytes_per_sec * 8.0 / 1e6
}

#[test]
fn a_cookie_answering_flood_from_one_source_starves_no_one() {
    let mesh = Mesh::new().expect("mesh");
    let (victim, legit, newcomer) = (&mesh.victim, &mesh.legit, &mesh.newcomer);
    add_peer(victim, legit).expect("victim -> legit");
    add_peer(legit, victim).expect("legit -> victim");
    assert!(ping(&legit.ns, victim.inner_v4(), 2), "{}", mesh.logs());

    let responder: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(&victim.keys.public)
        .expect("base64 key")
        .try_into()
        .expect("32-byte key");
    let target: SocketAddr = victim.endpoint(Underlay::V4).parse().expect("endpoint");
    let flood = Flood::start(&mesh.attacker, responder, target, FLOOD_RATE).expect("flood");
    let stream =
        Stream::start(&legit.ns, &victim.ns, victim.inner_v4(), STREAM_RATE).expect("stream");
    thread::sleep(Duration::from_secs(1));

    // The stream, flood off and on in turn.
    let (mut unloaded, mut loaded) = ((0u64, 0f64), (0u64, 0f64));
    let mut windows = Vec::new();
    for i in 0..WINDOWS {
        let on = i % 2 == 1;
        flood.switch(on);
        thread::sleep(SETTLE);
        let (bytes, secs) = stream.measure(WINDOW);
        let sum = if on { &mut loaded } else { &mut unloaded };
        sum.0 += bytes;
        sum.1 += secs;
        windows.push(format!(
            "{}{:.0}",
            if on { "+" } else { "-" },
            mbit(bytes as f64 / secs)
        ));
    }
    let unloaded = unloaded.0 as f64 / unloaded.1;
    let loaded = loaded.0 as f64 / loaded.1;

    // A new peer arrives in the middle of the flood.
    flood.switch(true);
    thread::sleep(SETTLE);
    let (joined, before) = (Instant::now(), stream.received.load(Ordering::Relaxed));
    add_peer(victim, newcomer).expect("victim -> newcomer");
    add_peer(newcomer, victim).expect("newcomer -> victim");
    let handshake = thread::scope(|s| {
        let pinger = s.spawn(|| ping(&newcomer.ns, victim.inner_v4(), 1));
        let mut done = None;
        while joined.elapsed() < NEWCOMER_BOUND + Duration::from_secs(1) {
            let dump = newcomer.dump().expect("newcomer's wg show");
            if dump
                .peer(&victim.keys.public)
                .is_some_and(|p| p.latest_handshake > 0)
            {
                done = Some(joined.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let _ = pinger.join();
        done
    });
    let joining =
        (stream.received.load(Ordering::Relaxed) - before) as f64 / joined.elapsed().as_secs_f64();
    let flooded = flood.stop().expect("flood");
    stream.stop().expect("stream");

    println!(
        "flood: {} initiations in {:.1} s = {:.0}/s ({} refused by the attacker's kernel), \
         {} cookie replies followed",
        flooded.sent,
        flooded.secs,
        flooded.sent as f64 / flooded.secs,
        flooded.refused,
        flooded.cookies
    );
    println!(
        "stream: unloaded {:.0} Mbit/s, loaded {:.0} Mbit/s = {:.1} % (windows, Mbit/s, \
         + flooded: {}); while the newcomer joined {:.0} Mbit/s",
        mbit(unloaded),
        mbit(loaded),
        100.0 * loaded / unloaded,
        windows.join(" "),
        mbit(joining)
    );
    println!(
        "newcomer's handshake under the flood: {}",
        handshake.map_or("none".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    );

    assert!(
        flooded.sent as f64 / flooded.secs > FLOOD_RATE as f64 / 4.0,
        "the attacker managed only {:.0}/s",
        flooded.sent as f64 / flooded.secs
    );
    assert!(flooded.cookies > 0, "no cookie reply\n{}", mesh.logs());
    assert!(
        loaded >= 0.9 * unloaded,
        "stream under the flood {:.0} Mbit/s, below 90 % of {:.0} Mbit/s\n{}",
        mbit(loaded),
        mbit(unloaded),
        mesh.logs()
    );
    let took = handshake
        .unwrap_or_else(|| panic!("the newcomer never completed a handshake\n{}", mesh.logs()));
    assert!(took <= NEWCOMER_BOUND, "newcomer's handshake took {took:?}");
    assert!(
        ping(&newcomer.ns, victim.inner_v4(), 1),
        "newcomer's tunnel\n{}",
        mesh.logs()
    );
    let victim_log = victim.daemon.log();
    assert!(
        victim_log.contains("reason=\"rate_limited\""),
        "the attacker's MAC2 never checked out (no rate_limited drop)\n{victim_log}"
    );
}
