//! The inbound datagram path: `Engine::open` on node B, whose session with node A is
//! established once (in memory, keys fixed) and kept alive for the whole run.
//!
//! The first input byte picks how the rest reaches B, so the fuzzer gets past the
//! receiver-index lookup and the AEAD rather than stopping at the first check:
//! 0: a raw datagram; 1: a raw datagram carrying B's receiver index for A;
//! 2: a packet A seals (its destination set to B's address) — B must open it to the same
//! bytes or drop it; 3: a valid datagram from A with bytes flipped at (position, mask)
//! pairs — B must never accept it. In mode 2 a TCP SYN arrives with its MSS clamped to the
//! tunnel's MTU, as the engine does to every SYN it carries.
#![no_main]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_wg::capture::{Capture, Output};
use isthmus_wg::config::{DeviceConfig, PeerConfig, SetEffects};
use isthmus_wg::engine::{Engine, MAX_PACKET};
use isthmus_wg::key::Key;
use isthmus_wg::mss;
use isthmus_wg::packet::udp4;
use libfuzzer_sys::fuzz_target;

const ADDR_A: &str = "192.0.2.1:51820";
const ADDR_B: &str = "192.0.2.2:51820";
/// Both tunnels' MTU; with no path MTU measured, the MSS clamp follows it.
const MTU: u16 = 1420;

struct Node {
    engine: Engine,
    out: Capture,
    addr: SocketAddr,
}

struct Mesh {
    a: Node,
    b: Node,
    /// B's receiver index for A, as A's data messages carry it.
    index: [u8; 4],
    last_tick: Instant,
    buf: Vec<u8>,
    dst: Vec<u8>,
}

fn node(seed: u8, addr: &str, peer: u8, peer_addr: &str, allowed: &[&str]) -> Node {
    let mut pc = PeerConfig::new(Key([peer; 32]).public_from_private());
    pc.endpoint = Some(peer_addr.parse().unwrap());
    pc.allowed_ips = allowed.iter().map(|n| n.parse().unwrap()).collect();
    let out = Capture::default();
    let engine = Engine::new();
    engine.set_mtu(MTU);
    let cfg = DeviceConfig {
        private_key: Some(Key([seed; 32])),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![pc],
    };
    engine.reconfigure(cfg, &SetEffects::default(), &out);
    Node {
        engine,
        out,
        addr: addr.parse().unwrap(),
    }
}

impl Mesh {
    fn new() -> Mesh {
        let a = node(1, ADDR_A, 2, ADDR_B, &["10.0.0.2/32", "fd00::2/128"]);
        let b = node(2, ADDR_B, 1, ADDR_A, &["10.0.0.1/32", "fd00::1/128"]);
        let mut mesh = Mesh {
            a,
            b,
            index: [0; 4],
            last_tick: Instant::now(),
            buf: vec![0u8; MAX_PACKET],
            dst: vec![0u8; MAX_PACKET],
        };
        let sealed = mesh.seal_valid().expect("handshake completes in memory");
        mesh.index.copy_from_slice(&sealed[4..8]);
        mesh
    }

    /// Hands every queued datagram across (handshakes, keepalives, released packets).
    fn pump(&mut self) {
        for _ in 0..16 {
            let mut moved = false;
            for (from, to) in [(&self.a, &self.b), (&self.b, &self.a)] {
                for o in from.out.take() {
                    if let Output::Datagram(_, d) = o {
                        moved = true;
                        to.engine
                            .handle_inbound(from.addr, &d, &mut self.buf, &to.out);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Drives timers now and then so rekeys happen and the session outlives a long run.
    fn keep_alive(&mut self) {
        if self.last_tick.elapsed() > Duration::from_millis(100) {
            self.last_tick = Instant::now();
            self.a.engine.tick(&mut self.buf, &self.a.out);
            self.b.engine.tick(&mut self.buf, &self.b.out);
            self.pump();
        }
    }

    /// A seals `packet` for B; handshakes run first when needed.
    fn seal(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        for _ in 0..3 {
            let burst = self.a.engine.burst();
            if let Some(s) = self
                .a
                .engine
                .seal(&burst, packet, &mut self.buf, &self.a.out)
            {
                return Some(self.buf[..s.len].to_vec());
            }
            // No session: the initiation is queued; run the handshake and try again.
            self.pump();
        }
        None
    }

    fn seal_valid(&mut self) -> Option<Vec<u8>> {
        let packet = udp4([10, 0, 0, 1], [10, 0, 0, 2], 64);
        let sealed = self.seal(&packet);
        // Whatever the handshake left for B's TUN is not this input's.
        self.b.out.take();
        sealed
    }

    fn open(&mut self, datagram: &[u8]) -> Option<usize> {
        let burst = self.b.engine.burst();
        let got = self
            .b
            .engine
            .open(&burst, self.a.addr, datagram, &mut self.dst, &self.b.out);
        self.b.out.take();
        got
    }
}

thread_local! {
    static MESH: RefCell<Option<Mesh>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    MESH.with(|m| {
        let mut m = m.borrow_mut();
        let mesh = m.get_or_insert_with(Mesh::new);
        mesh.keep_alive();
        match mode % 4 {
            0 => {
                mesh.open(rest);
            }
            1 => {
                let mut d = rest.to_vec();
                if d.len() >= 8 {
                    d[4..8].copy_from_slice(&mesh.index);
                }
                mesh.open(&d);
            }
            2 => {
                let mut packet = rest.to_vec();
                match packet.first().map(|b| b >> 4) {
                    Some(4) if packet.len() >= 20 => packet[16..20].copy_from_slice(&[10, 0, 0, 2]),
                    Some(6) if packet.len() >= 40 => {
                        let dst: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
                        packet[24..40].copy_from_slice(&dst.octets());
                    }
                    _ => {}
                }
                let Some(sealed) = mesh.seal(&packet) else {
                    return;
                };
                if let Some(len) = mesh.open(&sealed) {
                    // Padding is zeros; what B writes to its TUN is A's packet, no more —
                    // except that a TCP SYN's MSS is clamped to what the tunnel carries. A
                    // packet whose header claims some of the padding is whole only at B.
                    let mut want = packet.clone();
                    want.resize(want.len().max(len), 0);
                    mss::clamp(&mut want[..len], MTU);
                    assert_eq!(&mesh.dst[..len], &want[..len], "opened packet differs");
                }
            }
            _ => {
                let Some(mut sealed) = mesh.seal_valid() else {
                    return;
                };
                let original = sealed.clone();
                for pair in rest.chunks_exact(3) {
                    let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % sealed.len();
                    sealed[at] ^= pair[2];
                }
                if sealed != original {
                    assert!(
                        mesh.open(&sealed).is_none(),
                        "a tampered datagram was accepted"
                    );
                } else {
                    assert!(mesh.open(&sealed).is_some(), "a valid datagram was refused");
                }
            }
        }
    });
});
