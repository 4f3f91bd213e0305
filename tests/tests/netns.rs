//! More of the kernel's netns selftest (tools/testing/selftests/wireguard/netns.sh), ported
//! to isthmus in namespaces; `selftest.rs` has the first scenarios.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_tests::daemon::Daemon;
use isthmus_tests::netns::{veth, Netns};
use isthmus_tests::pair::{Host, Impl, Pair, Underlay};
use isthmus_tests::traffic::{link_counters, ping, ping_within, tcp_transfer};
use isthmus_tests::wg::KeyPair;

/// netns.sh: "Test that route loops are handled". a's peer endpoint is set to an address a's
/// own tunnel carries (b's tunnel address, port 7) and b no longer answers: every datagram a
/// sends re-enters its TUN and would be sealed again, each time bigger. After a flood of 10
/// pings, a's transmitted bytes grow by less than 70,000 within the next second (the
/// selftest's bound), and the device still answers.
#[test]
fn a_routing_loop_through_the_tunnel_stays_bounded() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    b.wg(&["set", &b.iface, "peer", &a.keys.public, "remove"])
        .unwrap();
    let inside = format!("{}:7", b.inner_v4());
    a.wg(&["set", &a.iface, "peer", &b.keys.public, "endpoint", &inside])
        .unwrap();
    let tx = || a.dump().expect("wg show").peers[0].tx_bytes;
    let before = tx();
    let dst = b.inner_v4().to_string();
    // No reply can come; the ping's exit status is not the point.
    let _ = a.ns.exec("ping", &["-W", "1", "-c", "10", "-f", &dst]);
    std::thread::sleep(Duration::from_secs(1));
    let after = tx();
    eprintln!("loop: {} bytes transmitted after the flood", after - before);
    assert!(
        after - before < 70_000,
        "the loop ran on: {} bytes in a second\n{}",
        after - before,
        pair.logs()
    );
    assert!(a.dump().is_ok(), "the device stopped answering");
}

/// netns.sh: a peer with the device's own public key is silently ignored, and setting a
/// private key whose public key is a configured peer's removes that peer (the kernel's
/// `wg_peer_create` / `set_device` rule: a device never has itself as a peer).
#[test]
fn a_peer_with_our_own_public_key_is_ignored() {
    let pair = Pair::unconnected(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let host = &pair.a;
    let peers = || -> Vec<String> {
        let dump = host.dump().expect("wg show");
        dump.peers.into_iter().map(|p| p.public_key).collect()
    };
    let other = KeyPair::generate().unwrap();
    host.wg(&["set", &host.iface, "peer", &host.keys.public])
        .expect("setting our own key is not an error");
    host.wg(&["set", &host.iface, "peer", &other.public])
        .unwrap();
    assert_eq!(
        peers(),
        vec![other.public.clone()],
        "our own key became a peer"
    );

    let key_file = pair.dir.path().join("other.key");
    std::fs::write(&key_file, &other.private).unwrap();
    host.wg(&[
        "set",
        &host.iface,
        "private-key",
        &key_file.display().to_string(),
    ])
    .unwrap();
    assert_eq!(host.dump().unwrap().public_key, other.public);
    assert!(peers().is_empty(), "the peer with the new own key stayed");
}

/// netns.sh: "make sure that the stats counters are working": after a handshake and ten
/// pings from b to a, the counters are exact. On each TUN (`ip -s link`): 10 × 84 bytes of
/// ICMP each way. In `wg show transfer`, which counts the datagrams' bytes: b sent the
/// initiation (148) and ten 84-byte pings padded to 96 and sealed (+32: 128 each); a sent
/// the response (92) and ten replies: 1,372 and 1,428 (+32 with a keepalive), the
/// selftest's own figures.
#[test]
fn counters_are_exact_after_ten_pings() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    let links = || {
        (
            link_counters(&a.ns, &a.iface).unwrap(),
            link_counters(&b.ns, &b.iface).unwrap(),
        )
    };
    let (a0, b0) = links();
    let out =
        b.ns.exec(
            "ping",
            &[
                "-c",
                "10",
                "-i",
                "0.05",
                "-W",
                "1",
                &a.inner_v4().to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.logs()));
    assert!(out.contains(" 0% packet loss"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let (a1, b1) = links();
    let (da, db) = (a1.since(&a0), b1.since(&b0));
    eprintln!("links: a {da:?}\nb {db:?}");
    let (wa, wb) = (
        a.dump().unwrap().peers[0].clone(),
        b.dump().unwrap().peers[0].clone(),
    );
    eprintln!(
        "transfer: a rx {} tx {}, b rx {} tx {}",
        wa.rx_bytes, wa.tx_bytes, wb.rx_bytes, wb.tx_bytes
    );
    let icmp = 10 * 84;
    assert_eq!(
        (da.rx_bytes, da.tx_bytes, db.rx_bytes, db.tx_bytes),
        (icmp, icmp, icmp, icmp)
    );
    // netns.sh's own figures: 1,372 one way, 1,428 or 1,460 the other (the initiator may
    // send one keepalive, 32 bytes, right after the handshake).
    let data = 10 * (96 + 32);
    let (sent, answered) = (148 + data, 92 + data);
    assert_eq!((sent, answered), (1428, 1372));
    assert!(
        wb.tx_bytes == sent || wb.tx_bytes == sent + 32,
        "b sent {}",
        wb.tx_bytes
    );
    assert_eq!(wa.rx_bytes, wb.tx_bytes, "a received what b sent");
    assert_eq!((wb.rx_bytes, wa.tx_bytes), (answered, answered));
}

/// The daemon's resident memory in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Applies `config` with `wg setconf`; returns how long it took.
fn setconf(pair: &Pair, config: &str) -> Duration {
    let host = &pair.a;
    let path = pair.dir.path().join("big.conf");
    std::fs::write(&path, config).unwrap();
    let start = Instant::now();
    host.wg(&["setconf", &host.iface, &path.display().to_string()])
        .unwrap_or_else(|e| panic!("setconf: {e:#}\n{}", pair.logs()));
    start.elapsed()
}

/// netns.sh: 130,560 allowed IPs on one peer (255 × 256 IPv4 /16s and as many IPv6 /128s)
/// are all taken and all listed; then 40 peers with 52 prefixes each; then 30 peers, the
/// last with two prefixes, and `wg showconf` answers. Time and memory are printed.
#[test]
fn many_allowed_ips_and_many_peers_are_all_taken() {
    let pair = Pair::unconnected(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let host = &pair.a;
    let private = |config: &mut String| {
        let _ = writeln!(config, "[Interface]\nPrivateKey = {}", host.keys.private);
    };
    let rss_before = rss_kib(host.daemon.pid());

    let mut config = String::new();
    private(&mut config);
    let _ = writeln!(
        config,
        "[Peer]\nPublicKey = {}",
        KeyPair::generate().unwrap().public
    );
    for a in 1..=255 {
        for b in 0..=255 {
            let _ = writeln!(config, "AllowedIPs = {a}.{b}.0.0/16,{a:x}::{b:x}/128");
        }
    }
    let took = setconf(&pair, &config);
    let listed = host.wg(&["show", &host.iface, "allowed-ips"]).unwrap();
    let tokens = listed.split_whitespace().count();
    let rss_after = rss_kib(host.daemon.pid());
    eprintln!(
        "130,560 allowed IPs on one peer: setconf {:.2} s, RSS {} -> {} KiB (+{} KiB)",
        took.as_secs_f64(),
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before)
    );
    assert_eq!(tokens, 255 * 256 * 2 + 1, "the key and every prefix listed");

    let mut config = String::new();
    private(&mut config);
    for a in 1..=40 {
        let _ = writeln!(
            config,
            "[Peer]\nPublicKey = {}",
            KeyPair::generate().unwrap().public
        );
        for b in 1..=52 {
            let _ = writeln!(config, "AllowedIPs = {a}.{b}.0.0/16");
        }
    }
    let took = setconf(&pair, &config);
    let listed = host.wg(&["show", &host.iface, "allowed-ips"]).unwrap();
    let lines: Vec<usize> = listed
        .lines()
        .map(|l| l.split_whitespace().count())
        .collect();
    eprintln!(
        "40 peers x 52 prefixes: setconf {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(lines, vec![53; 40], "every peer with its 52 prefixes");

    let mut config = String::new();
    private(&mut config);
    for _ in 0..29 {
        let _ = writeln!(
            config,
            "[Peer]\nPublicKey = {}",
            KeyPair::generate().unwrap().public
        );
    }
    let last = KeyPair::generate().unwrap().public;
    let _ = writeln!(
        config,
        "[Peer]\nPublicKey = {last}\nAllowedIPs = 255.2.3.4/32,abcd::255/128"
    );
    setconf(&pair, &config);
    let shown = host.wg(&["showconf", &host.iface]).unwrap();
    assert_eq!(shown.matches("[Peer]").count(), 30);
    let dump = host.dump().unwrap();
    let allowed = &dump.peer(&last).expect("the last peer").allowed_ips;
    assert!(
        allowed.contains("255.2.3.4/32") && allowed.contains("abcd::255/128"),
        "{allowed}"
    );
}

/// netns.sh: "Test using IPv4 that roaming works" and the same over IPv6. The roamer moves
/// to a new port (and then to the IPv6 underlay and another port); the other side learns the
/// new address and port from the roamer's next authenticated packet and answers there, with
/// no configuration of its own. Both ways: isthmus roaming to wireguard-go, and isthmus
/// following wireguard-go.
#[test]
fn roaming_over_ipv4_and_ipv6_follows_address_and_port() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
    // The port each host listens on now (a, b).
    let mut ports = [pair.a.port.to_string(), pair.b.port.to_string()];
    let moves = [
        (0, "9999", Underlay::V4),
        (0, "9998", Underlay::V6),
        (1, "9997", Underlay::V4),
        (1, "9996", Underlay::V6),
    ];
    for (who, port, family) in moves {
        let (roamer, other) = if who == 0 {
            (&pair.a, &pair.b)
        } else {
            (&pair.b, &pair.a)
        };
        roamer
            .wg(&["set", &roamer.iface, "listen-port", port])
            .unwrap();
        // The old port is let go (isthmus's readers notice within 250 ms).
        let old = format!("sport = :{}", ports[who]);
        let released = (0..20).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            roamer
                .ns
                .exec("ss", &["-Hlun", &old])
                .is_ok_and(|s| s.trim().is_empty())
        });
        assert!(
            released,
            "{:?} still listens on {}",
            roamer.kind, ports[who]
        );
        ports[who] = port.to_string();
        let to_other = match other.underlay(family) {
            std::net::IpAddr::V4(ip) => format!("{ip}:{}", ports[1 - who]),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", ports[1 - who]),
        };
        roamer
            .wg(&[
                "set",
                &roamer.iface,
                "peer",
                &other.keys.public,
                "endpoint",
                &to_other,
            ])
            .unwrap();
        // Over the other inner family each time, as netns.sh does.
        let dst = match family {
            Underlay::V4 => other.inner_v6(),
            Underlay::V6 => other.inner_v4(),
        };
        let what = format!("{:?} moved to {port} over {family:?}", roamer.kind);
        // A ping may be lost while a side rebinds; what is asserted is where the answer goes.
        let within = Duration::from_secs(5);
        assert!(
            ping_within(&roamer.ns, dst, within),
            "{what}\n{}",
            pair.logs()
        );
        let want = match roamer.underlay(family) {
            std::net::IpAddr::V4(ip) => format!("{ip}:{port}"),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        };
        let dump = other.dump().unwrap();
        let seen = &dump.peer(&roamer.keys.public).unwrap().endpoint;
        assert_eq!(seen, &want, "{what}: the other side's endpoint");
        assert!(
            ping_within(&other.ns, roamer.inner_v4(), within),
            "{what}: answered at {want}\n{}",
            pair.logs()
        );
    }
}

/// An iperf3 server for one test, ended (by its PID) when dropped, also on failure.
struct IperfServer(Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one iperf3 run carried: bytes the receiver got (in one second), and for UDP the
/// share lost.
#[derive(Debug)]
struct Carried {
    bytes: u64,
    lost_percent: f64,
}

/// One iperf3 run from `from` to `dst` (an address of `to`): TCP with `streams` parallel
/// streams, or UDP as fast as it goes (`-b 0`), for one second — netns.sh's `tests()` with
/// `-t 1`.
fn iperf(from: &Host, to: &Host, dst: IpAddr, udp: bool, streams: u32) -> anyhow::Result<Carried> {
    let dst = dst.to_string();
    let server = IperfServer(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &to.ns.name,
                "iperf3",
                "-s",
                "-1",
                "-B",
                &dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?,
    );
    let listening = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        to.ns
            .exec("ss", &["-Htln", "sport = :5201"])
            .is_ok_and(|s| !s.trim().is_empty())
    });
    if !listening {
        bail!("iperf3 server did not listen");
    }
    let streams = streams.to_string();
    let mut args = vec!["-c", &dst, "-t", "1", "-J", "-Z", "-P", &streams];
    if udp {
        args.extend(["-u", "-b", "0"]);
    }
    let out = from.ns.exec("iperf3", &args)?;
    drop(server);
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let end = &v["end"];
    // TCP: what the receiver counted. UDP: iperf3 sums what was sent and the share the
    // receiver reported lost.
    let sum = if udp {
        &end["sum"]
    } else {
        &end["sum_received"]
    };
    let bytes = sum["bytes"]
        .as_u64()
        .context("no bytes in iperf3's summary")?;
    let lost_percent = sum["lost_percent"].as_f64().unwrap_or(0.0);
    Ok(Carried {
        bytes: (bytes as f64 * (100.0 - lost_percent) / 100.0) as u64,
        lost_percent,
    })
}

/// netns.sh's `tests()`, over `underlay`: TCP with 1, 4 and 50 streams and UDP, both ways,
/// inside IPv4 and IPv6, at the tunnel's MTU and again at netns.sh's big MTU (34,816 minus
/// 1,500 plus the tunnel's; the datagrams are then fragmented on the 1,500-byte underlay).
/// Every run carries data; UDP at full speed may lose some, never all.
fn traffic_both_ways_at_both_mtus(underlay: Underlay) {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, underlay).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    let mtu = a.ns.link_mtu(&a.iface).unwrap();
    let big = 34_816 - 1_500 + mtu;
    let mut report = Vec::new();
    for tunnel_mtu in [mtu, big] {
        for host in [a, b] {
            host.ns
                .ip(&[
                    "link",
                    "set",
                    "dev",
                    &host.iface,
                    "mtu",
                    &tunnel_mtu.to_string(),
                ])
                .unwrap();
        }
        for (from, to) in [(a, b), (b, a)] {
            for inner_v6 in [false, true] {
                let dst = if inner_v6 {
                    to.inner_v6()
                } else {
                    to.inner_v4()
                };
                let mut runs = vec![(false, 1), (true, 1)];
                if tunnel_mtu == mtu && !inner_v6 {
                    runs.extend([(false, 4), (false, 50)]);
                }
                for (udp, streams) in runs {
                    let what = format!(
                        "{underlay:?} underlay, MTU {tunnel_mtu}, host {} -> {}, {} {}, {streams} stream(s)",
                        from.n,
                        to.n,
                        if inner_v6 { "IPv6" } else { "IPv4" },
                        if udp { "UDP" } else { "TCP" },
                    );
                    let carried = iperf(from, to, dst, udp, streams)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}\n{}", pair.logs()));
                    assert!(carried.bytes > 0, "{what}: nothing carried");
                    assert!(carried.lost_percent < 100.0, "{what}: all lost");
                    report.push(format!(
                        "{what}: {:.0} Mbit/s received, {:.1} % lost",
                        carried.bytes as f64 * 8.0 / 1e6,
                        carried.lost_percent
                    ));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn tcp_and_udp_both_ways_over_an_ipv4_underlay() {
    traffic_both_ways_at_both_mtus(Underlay::V4);
}

#[test]
fn tcp_and_udp_both_ways_over_an_ipv6_underlay() {
    traffic_both_ways_at_both_mtus(Underlay::V6);
}

/// Datagrams per UDP GSO send in [`udp_bursts_arrive_coalesced_intact_and_in_order`], and
/// their size: one send is one burst of equal datagrams through the tunnel, as a VXLAN or
/// QUIC sender's bulk looks.
const BURST: usize = 32;
const DATAGRAM: usize = 1200;

/// Sends `bursts` bursts of [`BURST`] datagrams from `from` to `to` (port 9000 on `dst`),
/// each datagram its sequence number then bytes derived from it, with UDP_SEGMENT (one
/// send per burst), waiting for each burst to arrive before the next so no socket buffer
/// overflows. Returns the sequence numbers in the order they arrived; panics on a datagram
/// whose bytes are not what was sent.
fn udp_bursts(from: &Host, to: &Host, dst: IpAddr, bursts: u32) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let rx = isthmus_tests::traffic::udp_socket(&to.ns, (dst, 9000).into()).expect("receiver");
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let src = if dst.is_ipv6() {
        from.inner_v6()
    } else {
        from.inner_v4()
    };
    let tx = isthmus_tests::traffic::udp_socket(&from.ns, (src, 0).into()).expect("sender");
    let seg = DATAGRAM as libc::c_int;
    // SAFETY: setsockopt on a socket we own, with a c_int value and its size.
    let rc = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&seg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    let mut got = Vec::new();
    for b in 0..bursts {
        let first = b * BURST as u32;
        let send: Vec<u8> = (first..first + BURST as u32).flat_map(datagram).collect();
        tx.send_to(&send, (dst, 9000)).expect("UDP GSO send");
        receive(&rx, BURST, &mut got);
    }
    got
}

/// Datagram `seq` of a test's stream: its sequence number, then bytes derived from it.
fn datagram(seq: u32) -> Vec<u8> {
    let mut d = seq.to_be_bytes().to_vec();
    d.extend((4..DATAGRAM).map(|i| (seq as usize * 7 + i) as u8));
    d
}

/// Receives up to `count` [`datagram`]s on `rx` (fewer if it stays quiet for its read
/// timeout), checks each one's bytes, and appends their sequence numbers to `got`.
fn receive(rx: &std::net::UdpSocket, count: usize, got: &mut Vec<u32>) {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..count {
        let Ok(n) = rx.recv(&mut buf) else { break };
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert!(
            buf[..n] == datagram(seq)[..],
            "datagram {seq}: bytes differ"
        );
        got.push(seq);
    }
}

/// Asserts that `got` is `0..want` in order; `context` says where, `logs` what the daemons
/// said.
fn assert_all_in_order(got: &[u32], want: u32, context: &str, logs: impl FnOnce() -> String) {
    let want: Vec<u32> = (0..want).collect();
    assert!(
        got == want,
        "{context}{} of {} datagrams, first out of place at {:?}\n{}",
        got.len(),
        want.len(),
        got.iter().zip(&want).position(|(g, w)| g != w),
        logs()
    );
}

/// A stopped isthmus daemon's "shutting down" log line, which carries its data-path counts.
fn shutdown_line(host: &mut Host) -> String {
    host.daemon.stop();
    let log = host.daemon.log();
    log.lines()
        .rev()
        .find(|l| l.contains("shutting down"))
        .unwrap_or_else(|| panic!("no shutdown line in\n{log}"))
        .to_string()
}

/// The `key=N` count in a [`shutdown_line`].
fn count_in(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// UDP inside the tunnel is coalesced (issue 18): bursts of equal datagrams, sent with UDP
/// GSO from `sender` to an isthmus receiver, over IPv4 and IPv6 inside, all arrive, intact
/// and in order, and the receiver's shutdown log counts datagrams it wrote to its TUN as
/// `GSO_UDP_L4` super-packets (its TUN accepted USO: kernel ≥ 6.2).
fn udp_bursts_arrive_coalesced_intact_and_in_order(sender: Impl) {
    let mut pair = Pair::new(sender, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    let bursts = 50;
    for dst in [b.inner_v4(), b.inner_v6()] {
        let got = udp_bursts(a, b, dst, bursts);
        assert_all_in_order(&got, bursts * BURST as u32, &format!("to {dst}: "), || {
            pair.logs()
        });
    }
    let merged = count_in(&shutdown_line(&mut pair.b), "gro_udp_merged");
    eprintln!(
        "{sender:?} -> isthmus: {} datagrams inside IPv4 and as many inside IPv6, {merged} \
         of them written inside GSO_UDP_L4 super-packets",
        bursts * BURST as u32
    );
    // Every burst is one GRO receive on b; even with some split across receives, at least
    // half of the 3,200 datagrams must have gone out coalesced.
    assert!(
        merged >= u64::from(bursts) * BURST as u64,
        "only {merged} UDP datagrams coalesced\n{}",
        pair.b.daemon.log()
    );
}

#[test]
fn udp_bursts_between_isthmus_hosts_arrive_coalesced_intact_and_in_order() {
    udp_bursts_arrive_coalesced_intact_and_in_order(Impl::Isthmus);
}

/// The same from wireguard-go, whose TUN reads the sender's UDP GSO sends whole too and
/// sends each as one UDP GSO batch.
#[test]
fn udp_bursts_from_wireguard_go_arrive_coalesced_intact_and_in_order() {
    udp_bursts_arrive_coalesced_intact_and_in_order(Impl::WireguardGo);
}

/// Datagrams the TUN hands over one read each (flannel's VXLAN, plain UDP: no GSO from the
/// application) leave the sender in GSO sends, not one send each (issue 18): while the
/// sending daemon is paused, a burst of separate datagrams queues in its TUN; once it
/// resumes, it reads the whole queue before it sends. All arrive, intact and in order, and
/// its shutdown log counts far fewer send calls than datagrams.
#[test]
fn datagrams_queued_in_the_tun_leave_in_few_sends_intact_and_in_order() {
    let mut pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
    let dst = pair.b.inner_v4();
    let rx = isthmus_tests::traffic::udp_socket(&pair.b.ns, (dst, 9001).into()).expect("rx");
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx =
        isthmus_tests::traffic::udp_socket(&pair.a.ns, (pair.a.inner_v4(), 0).into()).expect("tx");
    let (bursts, per_burst) = (20u32, 32u32);
    let mut got = Vec::new();
    for b in 0..bursts {
        pair.a.daemon.signal(libc::SIGSTOP);
        for seq in b * per_burst..(b + 1) * per_burst {
            tx.send_to(&datagram(seq), (dst, 9001)).expect("send");
        }
        pair.a.daemon.signal(libc::SIGCONT);
        receive(&rx, per_burst as usize, &mut got);
    }
    assert_all_in_order(&got, bursts * per_burst, "", || pair.logs());
    let line = shutdown_line(&mut pair.a);
    let (datagrams, calls) = (
        count_in(&line, "sent_datagrams"),
        count_in(&line, "send_calls"),
    );
    eprintln!("{datagrams} data datagrams left a in {calls} send calls");
    // The pings' few datagrams went out one per call; each burst should be one or two calls.
    assert!(
        datagrams >= u64::from(bursts * per_burst),
        "only {datagrams} counted as sent"
    );
    assert!(
        calls * 4 <= datagrams,
        "{calls} send calls for {datagrams} datagrams: the queued datagrams were sent one by one"
    );
}

/// A VXLAN device over the tunnel, as flannel lays `flannel.1` over the mesh (VNI 1, port
/// 8472, UDP checksums, MTU 1370), on both hosts, between the tunnel's IPv4 addresses or,
/// with `outer_v6`, its IPv6 ones (MTU 1350, as `flannel-v6.1`); each side's device at
/// 10.201.0.n/24 and fd00:201::n/64.
fn vxlan_over_tunnel(pair: &Pair, outer_v6: bool) {
    for (me, other) in [(&pair.a, &pair.b), (&pair.b, &pair.a)] {
        let (local, remote) = if outer_v6 {
            (me.inner_v6().to_string(), other.inner_v6().to_string())
        } else {
            (me.inner_v4().to_string(), other.inner_v4().to_string())
        };
        let addr = format!("10.201.0.{}/24", me.n);
        let addr6 = format!("fd00:201::{}/64", me.n);
        let mtu = if outer_v6 { "1350" } else { "1370" };
        for args in [
            &[
                "link",
                "add",
                "istvx",
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "8472",
                "local",
                &local,
                "remote",
                &remote,
                "udpcsum",
                "udp6zerocsumtx",
                "udp6zerocsumrx",
            ][..],
            &["link", "set", "istvx", "mtu", mtu, "up"],
            &["addr", "add", &addr, "dev", "istvx"],
            &["addr", "add", &addr6, "dev", "istvx", "nodad"],
        ] {
            me.ns.ip(args).expect("VXLAN device");
        }
    }
}

/// The packets the kernel handed a host's TUN device (`tx_packets`: one per super-packet).
fn tun_packets(host: &Host) -> u64 {
    link_counters(&host.ns, &host.iface)
        .expect("TUN counters")
        .tx_packets
}

/// What one [`tcp_inside_vxlan`] transfer took.
#[derive(Debug)]
struct VxlanTransfer {
    /// Data datagrams the sender sent.
    datagrams: u64,
    /// Packets the sender's TUN handed it (the kernel's `tx_packets`).
    read: u64,
    /// Packets the receiver's VXLAN device took in (the kernel's `rx_packets`: one per
    /// datagram, or one per tunnel super-packet it decapsulated whole).
    decapsulated: u64,
    /// Datagrams the receiver wrote inside tunnel super-packets, and those writes.
    vxlan_merged: u64,
    vxlan_writes: u64,
}

/// flannel's pod traffic across the mesh: TCP over IPv4 (or, with `inner_v6`, IPv6) inside
/// VXLAN (over the tunnel's IPv4 or, with `outer_v6`, IPv6 addresses) inside the tunnel,
/// between two daemons of `kind`. A checked 40 MiB transfer between the VXLAN devices
/// arrives intact.
fn tcp_inside_vxlan(kind: Impl, outer_v6: bool, inner_v6: bool) -> VxlanTransfer {
    let mut pair = Pair::new(kind, kind, Underlay::V4).expect("pair");
    assert!(ping(&pair.a.ns, pair.b.inner_v4(), 1), "{}", pair.logs());
    vxlan_over_tunnel(&pair, outer_v6);
    let to: IpAddr = if inner_v6 {
        "fd00:201::2"
    } else {
        "10.201.0.2"
    }
    .parse()
    .unwrap();
    assert!(
        ping(&pair.a.ns, to, 2),
        "no ping inside VXLAN\n{}",
        pair.logs()
    );
    let vxlan_rx = |host: &Host| {
        link_counters(&host.ns, "istvx")
            .expect("VXLAN counters")
            .rx_packets
    };
    let (read_before, rx_before) = (tun_packets(&pair.a), vxlan_rx(&pair.b));
    tcp_transfer(&pair.a.ns, &pair.b.ns, to, 40 << 20)
        .unwrap_or_else(|e| panic!("TCP inside VXLAN: {e:#}\n{}", pair.logs()));
    let read = tun_packets(&pair.a) - read_before;
    let decapsulated = vxlan_rx(&pair.b) - rx_before;
    let datagrams = count_in(&shutdown_line(&mut pair.a), "sent_datagrams");
    let receiver = shutdown_line(&mut pair.b);
    let t = VxlanTransfer {
        datagrams,
        read,
        decapsulated,
        vxlan_merged: count_in(&receiver, "gro_vxlan_merged"),
        vxlan_writes: count_in(&receiver, "gro_vxlan_writes"),
    };
    eprintln!("{kind:?}, outer IPv6 {outer_v6}, inner IPv6 {inner_v6}: {t:?}");
    t
}

/// With the TUN's UDP tunnel offload (kernel ≥ 6.17) the VXLAN device hands the sender
/// 64 KiB super-packets, which it splits into VXLAN datagrams whose outer and inner
/// headers and checksums the receiving kernel takes (the transfer checks every byte): far
/// fewer packets off the TUN than datagrams sent. The receiver merges the datagrams back
/// into tunnel super-packets that its VXLAN device decapsulates whole: far fewer packets
/// into that device than datagrams. So for TCP over IPv4 and IPv6 inside IPv4 VXLAN, and
/// over IPv4 inside IPv6 VXLAN (whose outer header the receiver writes with a destination
/// options header the kernel skips). Where the receiver's kernel would drop that header
/// (unknown options refused), IPv6 VXLAN stays UDP runs and still arrives. Switched off,
/// one packet per datagram on both sides.
#[test]
fn tcp_inside_vxlan_crosses_both_tuns_in_super_packets_and_arrives_intact() {
    for (outer_v6, inner_v6) in [(false, false), (false, true), (true, false)] {
        let on = tcp_inside_vxlan(Impl::Isthmus, outer_v6, inner_v6);
        assert!(
            on.read * 8 <= on.datagrams,
            "{on:?}: VXLAN was not handed over in super-packets"
        );
        assert!(
            on.decapsulated * 8 <= on.datagrams && on.vxlan_writes * 8 <= on.vxlan_merged,
            "{on:?}: VXLAN was not written to the receiving TUN in super-packets"
        );
        assert!(
            on.vxlan_merged * 10 >= on.datagrams * 9,
            "{on:?}: most datagrams went in one by one"
        );
        // A run that goes on in the next queued GRO batch (the peer's next GSO send) joins
        // the same write: ~43 datagrams per write; ~20 when each receive ends a write.
        assert!(
            on.vxlan_writes * 32 <= on.vxlan_merged,
            "{on:?}: writes end with each receive"
        );
    }
    let strict = tcp_inside_vxlan(Impl::IsthmusNoUnknownIpv6Options, true, false);
    assert_eq!(
        (strict.vxlan_merged, strict.vxlan_writes),
        (0, 0),
        "{strict:?}: IPv6 VXLAN merged where the kernel drops the options header"
    );
    let off = tcp_inside_vxlan(Impl::IsthmusNoTunnelGso, false, false);
    assert!(
        off.read * 10 >= off.datagrams * 9 && off.decapsulated * 10 >= off.datagrams * 9,
        "with ISTHMUS_TUN_TUNNEL_GSO=0, {off:?}"
    );
    assert_eq!(off.vxlan_writes, 0, "{off:?}");
}

/// netns.sh: "Test using NAT". a sits behind a router that source-NATs it and forgets a UDP
/// mapping after 2 s of silence; b is on the far side and has no endpoint for a. a's first
/// packet teaches b the NAT's address and port; a's persistent keepalive (1 s) keeps the
/// mapping, so b still reaches a after 3 s of no traffic. Without the keepalive (the
/// control), the mapping lapses and b's packets die at the router.
#[test]
fn nat_with_persistent_keepalive_keeps_the_return_path() {
    isthmus_tests::require_root();
    let dir = tempfile::Builder::new()
        .prefix("isthmus-nat")
        .tempdir()
        .unwrap();
    let name = isthmus_tests::unique_name();
    let a = Host::start(Impl::Isthmus, 1, &name, dir.path()).expect("host a");
    let b = Host::start(Impl::WireguardGo, 2, &name, dir.path()).expect("host b");
    let router = Netns::new(&format!("{name}-r")).expect("router");
    let (ea, ra) = veth(&a.ns, &router, &format!("{name}x")).unwrap();
    let (rb, eb) = veth(&router, &b.ns, &format!("{name}y")).unwrap();
    a.ns.ip(&["addr", "add", "192.168.1.2/24", "dev", &ea])
        .unwrap();
    a.ns.ip(&["route", "add", "default", "via", "192.168.1.1"])
        .unwrap();
    router
        .ip(&["addr", "add", "192.168.1.1/24", "dev", &ra])
        .unwrap();
    router
        .ip(&["addr", "add", "10.0.0.1/24", "dev", &rb])
        .unwrap();
    b.ns.ip(&["addr", "add", "10.0.0.100/24", "dev", &eb])
        .unwrap();
    router
        .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    router
        .exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "192.168.1.0/24",
                "-d",
                "10.0.0.0/24",
                "-j",
                "SNAT",
                "--to",
                "10.0.0.1",
            ],
        )
        .unwrap();
    for timeout in [
        "nf_conntrack_udp_timeout",
        "nf_conntrack_udp_timeout_stream",
    ] {
        router
            .exec("sysctl", &["-qw", &format!("net.netfilter.{timeout}=2")])
            .unwrap();
    }
    a.address().unwrap();
    b.address().unwrap();
    let logs = || format!("{}\n{}", a.daemon.log(), b.daemon.log());
    // b first: a's keepalive starts a handshake the moment it is configured.
    let a_allowed = format!("{}/32", a.inner_v4());
    b.wg(&[
        "set",
        &b.iface,
        "peer",
        &a.keys.public,
        "allowed-ips",
        &a_allowed,
    ])
    .unwrap();
    let b_endpoint = format!("10.0.0.100:{}", b.port);
    let b_allowed = format!("{}/32", b.inner_v4());
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        &b.keys.public,
        "allowed-ips",
        &b_allowed,
        "endpoint",
        &b_endpoint,
        "persistent-keepalive",
        "1",
    ])
    .unwrap();

    assert!(ping(&a.ns, b.inner_v4(), 1), "a to b\n{}", logs());
    assert!(ping(&b.ns, a.inner_v4(), 1), "b to a\n{}", logs());
    let seen = b
        .dump()
        .unwrap()
        .peer(&a.keys.public)
        .unwrap()
        .endpoint
        .clone();
    assert_eq!(
        seen,
        format!("10.0.0.1:{}", a.port),
        "b learnt the NAT's side"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ping(&b.ns, a.inner_v4(), 1),
        "the keepalive did not hold the mapping\n{}",
        logs()
    );

    // The control: with the keepalive off, 3 s of silence and the mapping is gone.
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        &b.keys.public,
        "persistent-keepalive",
        "0",
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !ping(&b.ns, a.inner_v4(), 1),
        "b reached a with no keepalive: the NAT in this test does not expire mappings"
    );
}

/// A second isthmus device in `host`'s namespace, `<iface>i` on `port`, keyed, addressed
/// 10.249.0.<n>/24 at `mtu`, up; its daemon and keys.
fn inner_device(pair: &Pair, host: &Host, port: u16, mtu: u32) -> (Daemon, KeyPair, String) {
    let iface = format!("{}i", host.iface);
    let log = pair.dir.path().join(format!("inner-{}.log", host.n));
    let daemon = Daemon::spawn(
        &host.ns.name,
        &isthmus_tests::agent_binary(),
        &[
            "tunnel",
            "--iface",
            &iface,
            "--listen-port",
            &port.to_string(),
        ],
        &[("RUST_LOG", "info")],
        log,
    )
    .unwrap();
    let sock = format!("/var/run/wireguard/{iface}.sock");
    let up = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::path::Path::new(&sock).exists()
    });
    assert!(up, "inner device never opened {sock}: {}", daemon.log());
    let keys = KeyPair::generate().unwrap();
    let key_file = pair.dir.path().join(format!("inner-{}.key", host.n));
    std::fs::write(&key_file, &keys.private).unwrap();
    isthmus_tests::wg::wg(
        &host.ns,
        &[
            "set",
            &iface,
            "private-key",
            &key_file.display().to_string(),
        ],
    )
    .unwrap();
    let addr = format!("10.249.0.{}/24", host.n);
    host.ns.ip(&["addr", "add", &addr, "dev", &iface]).unwrap();
    host.ns
        .ip(&["link", "set", &iface, "mtu", &mtu.to_string(), "up"])
        .unwrap();
    (daemon, keys, iface)
}

/// netns.sh: "Test that we can route wg through wg". Each host runs a second device whose
/// peer's endpoint is the other host's address on the first device: the inner device's
/// datagrams travel inside the outer tunnel (and are not mistaken for the outer device's
/// own, §8), pings and a TCP transfer cross, and both devices count the traffic.
#[test]
fn wg_inside_wg_carries_traffic() {
    let pair = Pair::new(Impl::Isthmus, Impl::Isthmus, Underlay::V4).expect("pair");
    let (a, b) = (&pair.a, &pair.b);
    assert!(ping(&a.ns, b.inner_v4(), 1), "{}", pair.logs());
    // Inner MTU: the outer's 1,420 less the inner's own 60 bytes of IPv4, UDP and WireGuard.
    let (da, ka, ia) = inner_device(&pair, a, 41001, 1360);
    let (db, kb, ib) = inner_device(&pair, b, 41002, 1360);
    let connect = |host: &Host, iface: &str, other: &Host, other_keys: &KeyPair, port: u16| {
        let allowed = format!("10.249.0.{}/32", other.n);
        let endpoint = format!("{}:{port}", other.inner_v4());
        isthmus_tests::wg::wg(
            &host.ns,
            &[
                "set",
                iface,
                "peer",
                &other_keys.public,
                "allowed-ips",
                &allowed,
                "endpoint",
                &endpoint,
            ],
        )
        .unwrap();
    };
    connect(a, &ia, b, &kb, 41002);
    connect(b, &ib, a, &ka, 41001);
    let logs = || format!("{}\n{}\n{}", pair.logs(), da.log(), db.log());
    let inner_b: IpAddr = "10.249.0.2".parse().unwrap();
    let outer_before = a.dump().unwrap().peers[0].tx_bytes;
    assert!(ping(&a.ns, inner_b, 3), "inner ping\n{}", logs());
    tcp_transfer(&a.ns, &b.ns, inner_b, 4 << 20).unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    let inner_tx = isthmus_tests::wg::wg(&a.ns, &["show", &ia, "transfer"]).unwrap();
    let outer_tx = a.dump().unwrap().peers[0].tx_bytes - outer_before;
    let inner_tx: u64 = inner_tx
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("wg inside wg: inner device sent {inner_tx} bytes, outer {outer_tx}");
    assert!(inner_tx > 4 << 20, "the inner device carried the transfer");
    assert!(
        outer_tx > inner_tx,
        "the outer device carried the inner one's datagrams"
    );
}

/// The data plane's UDP sockets are non-blocking; a send that finds the send buffer full
/// waits for room, as a blocking send did, so a link slower than the sender holds the
/// sender back instead of losing datagrams. Here a 200 Mbit/s link (a token bucket that
/// queues, never drops) and a sender offering 24 MB in GSO sends at once: more than the send
/// buffer holds. Every send succeeds and every datagram arrives.
#[test]
fn a_full_send_buffer_holds_the_sender_back_instead_of_losing_datagrams() {
    use isthmus_wg::sockets::Sockets;
    use std::net::{SocketAddr, UdpSocket};
    isthmus_tests::require_root();
    const SIZE: usize = 1200;
    const PER_SEND: usize = 50;
    const SENDS: usize = 400;
    let name = isthmus_tests::unique_name();
    let a = Netns::new(&format!("{name}-s")).expect("sender namespace");
    let b = Netns::new(&format!("{name}-r")).expect("receiver namespace");
    let (ea, eb) = veth(&a, &b, &format!("{name}q")).unwrap();
    a.ip(&["addr", "add", "198.18.9.1/30", "dev", &ea]).unwrap();
    b.ip(&["addr", "add", "198.18.9.2/30", "dev", &eb]).unwrap();
    a.exec(
        "tc",
        &[
            "qdisc", "add", "dev", &ea, "root", "tbf", "rate", "200mbit", "burst", "64kb", "limit",
            "256mb",
        ],
    )
    .unwrap();
    let to: SocketAddr = "198.18.9.2:51820".parse().unwrap();
    let receiver = b.spawn_in(move || -> anyhow::Result<usize> {
        let sock = UdpSocket::bind(to)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = vec![0u8; 2048];
        let mut got = 0;
        // Until the link has been quiet for 2 s.
        while let Ok(n) = sock.recv(&mut buf) {
            anyhow::ensure!(n == SIZE, "a {n}-byte datagram");
            got += 1;
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(200));
    let sent = a
        .enter(move || -> anyhow::Result<(usize, Duration)> {
            let sockets = Sockets::bind(0, 0)?;
            let data = vec![7u8; SIZE * PER_SEND];
            let started = Instant::now();
            for i in 0..SENDS {
                sockets
                    .send_segments(&data, SIZE, to)
                    .with_context(|| format!("send {i} of {SENDS}"))?;
            }
            Ok((SENDS * PER_SEND, started.elapsed()))
        })
        .unwrap();
    let (sent, took) = sent.unwrap_or_else(|e| panic!("{e:#}"));
    let got = receiver
        .join()
        .expect("receiver thread")
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("receiver: {e:#}"));
    eprintln!("{sent} datagrams sent in {took:?}, {got} received");
    assert_eq!(got, sent, "datagrams lost at a full send buffer");
    // The sends outran the link: they waited (24 MB at 200 Mbit/s is ~1 s).
    assert!(
        took >= Duration::from_millis(300),
        "the sender never waited: {took:?}"
    );
}
