//! The UAPI as `wg` and as a hostile client see it: the same configuration shows the same
//! way on isthmus and wireguard-go, and malformed requests change nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use isthmus_tests::pair::{Host, Impl, Pair, Underlay};
use isthmus_tests::wg::{genpsk, KeyPair};

/// `wg` output split into the interface block and sorted peer blocks: wireguard-go lists
/// peers in map order, so only the set of peers is comparable.
fn normalise(text: &str, iface: &str) -> (String, Vec<String>) {
    let text = text.replace(iface, "IFACE");
    if text.contains('\t') {
        // `dump`: one line per peer after the interface line.
        let mut lines = text.lines().map(str::to_string);
        let head = lines.next().unwrap_or_default();
        let mut peers: Vec<String> = lines.collect();
        peers.sort();
        return (head, peers);
    }
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        let starts_peer = line.starts_with("peer: ") || line == "[Peer]";
        if blocks.is_empty() || starts_peer {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line.trim_end());
            b.push('\n');
        }
    }
    let head = blocks.remove(0);
    let mut peers: Vec<String> = blocks.into_iter().map(|b| b.trim().to_string()).collect();
    peers.sort();
    (head.trim().to_string(), peers)
}

#[test]
fn wg_show_prints_the_same_for_isthmus_and_wireguard_go() {
    let pair = Pair::unconnected(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let conf_path = pair.dir.path().join("same.conf");
    let own = KeyPair::generate().unwrap();
    let peers = [
        KeyPair::generate().unwrap(),
        KeyPair::generate().unwrap(),
        KeyPair::generate().unwrap(),
    ];
    // Endpoints outside every route in these namespaces, so neither side sends anything.
    let conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 43210\nFwMark = 0x1234\n\n\
         [Peer]\nPublicKey = {}\nPresharedKey = {}\nAllowedIPs = 10.0.0.0/24, fd00:1::/64, 192.0.2.7/32\nEndpoint = 203.0.113.9:51820\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = 10.9.0.0/16\nEndpoint = [2001:db8::9]:4000\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n",
        own.private,
        peers[0].public,
        genpsk().unwrap(),
        peers[1].public,
        peers[2].public
    );
    std::fs::write(&conf_path, conf).unwrap();
    let conf_path = conf_path.display().to_string();
    let show = |h: &Host, args: &[&str]| {
        let mut full = args.to_vec();
        full.insert(1, &h.iface);
        h.wg(&full)
            .unwrap_or_else(|e| panic!("{:?}: {e:#}", h.kind))
    };
    for h in [&pair.a, &pair.b] {
        show(h, &["setconf", &conf_path]);
    }
    for cmd in [&["showconf"][..], &["show"][..], &["show", "dump"][..]] {
        let ours = normalise(&show(&pair.a, cmd), &pair.a.iface);
        let theirs = normalise(&show(&pair.b, cmd), &pair.b.iface);
        assert_eq!(
            ours, theirs,
            "wg {cmd:?} differs between isthmus and wireguard-go"
        );
    }
    let dump = pair.a.dump().unwrap();
    assert_eq!(dump.listen_port, "43210");
    assert_eq!(dump.fwmark, "0x1234");
    assert_eq!(dump.peers.len(), 3);

    // syncconf to a smaller config removes what is gone, on both.
    let smaller = pair.dir.path().join("smaller.conf");
    std::fs::write(
        &smaller,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 43210\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.9.0.0/16\n",
            own.private, peers[1].public
        ),
    )
    .unwrap();
    let smaller = smaller.display().to_string();
    for h in [&pair.a, &pair.b] {
        show(h, &["syncconf", &smaller]);
    }
    let ours = normalise(&show(&pair.a, &["showconf"]), &pair.a.iface);
    let theirs = normalise(&show(&pair.b, &["showconf"]), &pair.b.iface);
    assert_eq!(ours, theirs);
    assert_eq!(pair.a.dump().unwrap().peers.len(), 1);
}

/// `wg`'s base64 key in the UAPI's hex form.
fn hex_key(b64: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 key");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends raw bytes to the UAPI socket and returns whatever comes back before it closes.
fn raw(host: &Host, request: &[u8]) -> String {
    let mut s = UnixStream::connect(host.socket_path()).expect("connect UAPI");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_uapi_requests_change_nothing() {
    let mut pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    let a = &pair.a;
    let mode = std::fs::metadata(a.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "UAPI socket mode");

    let before = a.wg(&["showconf", &a.iface]).unwrap();
    let stranger = KeyPair::generate().unwrap();
    let stranger_hex = hex_key(&stranger.public);
    assert_eq!(stranger_hex.len(), 64);

    // A valid peer addition followed by a bad key: the addition must not happen.
    let r = raw(
        a,
        format!("set=1\npublic_key={stranger_hex}\nallowed_ip=10.77.0.0/16\nbogus=1\n\n")
            .as_bytes(),
    );
    assert_eq!(r, format!("errno=-{}\n\n", libc::EINVAL));
    // A line without '=' is a protocol error.
    let r = raw(
        a,
        format!("set=1\npublic_key={stranger_hex}\nnonsense\n\n").as_bytes(),
    );
    assert_eq!(r, format!("errno=-{}\n\n", libc::EPROTO));
    // An oversized line.
    let mut big = b"set=1\nlisten_port=".to_vec();
    big.extend(std::iter::repeat_n(b'9', 1 << 20));
    big.extend(b"\n\n");
    let r = raw(a, &big);
    assert_eq!(r, format!("errno=-{}\n\n", libc::EPROTO));
    // Binary garbage and an unknown operation: the connection is closed, nothing answered.
    let garbage: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(raw(a, &garbage), "");
    assert_eq!(raw(a, b"delete=1\n\n"), "");
    // `get` with trailing junk.
    assert_eq!(
        raw(a, b"get=1\nx\n"),
        format!("errno=-{}\n\n", libc::EINVAL)
    );

    // A port that is taken: the whole request fails with EADDRINUSE, the peer in it is not
    // added and the port stays.
    let taken =
        a.ns.enter(|| UdpSocket::bind("0.0.0.0:0".parse::<SocketAddr>().unwrap()))
            .unwrap()
            .unwrap();
    let port = taken.local_addr().unwrap().port();
    let r = raw(
        a,
        format!("set=1\nlisten_port={port}\npublic_key={stranger_hex}\n\n").as_bytes(),
    );
    assert_eq!(r, format!("errno=-{}\n\n", libc::EADDRINUSE));

    assert_eq!(
        a.wg(&["showconf", &a.iface]).unwrap(),
        before,
        "configuration changed"
    );
    assert!(pair.a.daemon.is_running(), "daemon died:\n{}", pair.logs());
    let a = &pair.a;
    assert!(
        isthmus_tests::traffic::ping(&a.ns, pair.b.inner_v4(), 2),
        "tunnel broken:\n{}",
        pair.logs()
    );
    assert!(
        a.daemon.log().contains("nothing changed"),
        "no log line about the rejected request"
    );
}

#[test]
fn listen_port_change_keeps_the_tunnel_working() {
    let pair = Pair::new(Impl::Isthmus, Impl::WireguardGo, Underlay::V4).expect("pair");
    assert!(
        isthmus_tests::traffic::ping(&pair.a.ns, pair.b.inner_v4(), 2),
        "{}",
        pair.logs()
    );
    pair.a
        .wg(&["set", &pair.a.iface, "listen-port", "40001"])
        .unwrap();
    assert_eq!(pair.a.dump().unwrap().listen_port, "40001");
    // Our next packet comes from the new port; wireguard-go roams to it and replies there.
    assert!(
        isthmus_tests::traffic::ping(&pair.a.ns, pair.b.inner_v4(), 3),
        "{}",
        pair.logs()
    );
    let seen = pair.b.dump().unwrap();
    assert_eq!(
        seen.peer(&pair.a.keys.public).unwrap().endpoint,
        "10.250.0.1:40001"
    );
}
