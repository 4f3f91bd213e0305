//! A running tunnel: the TUN device, the sockets, the engine, and the threads between them.
//! It also answers the UAPI, binding new sockets before it commits a configuration so a
//! request that fails changes nothing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use tun_rs::{DeviceBuilder, SyncDevice};

use super::config::{DeviceConfig, PeerConfig, SetEffects};
use super::device::{Device, Transmit, MAX_PACKET};
use super::sockets::Sockets;
use crate::key::Key;
use crate::uapi::server::UapiHandler;
use crate::uapi::{DeviceSnapshot, Errno, SetRequest, UapiError};

/// How often session timers run; boringtun rounds its timers to this order anyway.
const TICK: Duration = Duration::from_millis(100);

/// Default inner MTU: 1500 underlay minus the IPv6+UDP+WireGuard overhead (80 bytes).
pub const DEFAULT_MTU: u16 = 1420;

/// The I/O side the engine transmits through.
pub struct Net {
    tun: SyncDevice,
    sockets: RwLock<Arc<Sockets>>,
}

impl Transmit for Net {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.sockets.read().send_to(datagram, to)
    }

    fn write_tun(&self, packet: &[u8]) -> io::Result<()> {
        self.tun.send(packet).map(|_| ())
    }
}

pub struct Tunnel {
    pub iface: String,
    device: Arc<Device>,
    net: Arc<Net>,
    set_lock: Mutex<()>,
}

impl Tunnel {
    /// Creates the TUN device `iface` and binds the UDP sockets; starts the packet threads.
    pub fn start(iface: &str, listen_port: u16, mtu: u16) -> anyhow::Result<Arc<Tunnel>> {
        let tun = DeviceBuilder::new()
            .name(iface)
            .mtu(mtu)
            .build_sync()
            .with_context(|| {
                format!("creating TUN device {iface} (needs CAP_NET_ADMIN and /dev/net/tun)")
            })?;
        let sockets = Arc::new(
            Sockets::bind(listen_port, 0)
                .with_context(|| format!("binding UDP port {listen_port}"))?,
        );
        let device = Arc::new(Device::new());
        let mut config = device.config();
        config.listen_port = sockets.port;
        let net = Arc::new(Net {
            tun,
            sockets: RwLock::new(sockets.clone()),
        });
        device.reconfigure(config, &Default::default(), net.as_ref());

        let tunnel = Arc::new(Tunnel {
            iface: iface.to_string(),
            device,
            net,
            set_lock: Mutex::new(()),
        });
        tunnel.spawn_socket_readers(&sockets)?;
        tunnel.spawn("tun-reader", Tunnel::tun_loop)?;
        tunnel.spawn("timers", Tunnel::timer_loop)?;
        tracing::info!(iface, port = sockets.port, mtu, "tunnel up");
        Ok(tunnel)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The control plane's step: our key and the mesh's peers, keeping the listen port and
    /// fwmark. Unchanged peers keep their sessions; peers that are new (or newly keep
    /// alive) handshake at once instead of at the first packet.
    pub fn apply_mesh(&self, private_key: Key, peers: Vec<PeerConfig>) {
        let _serial = self.set_lock.lock();
        let current = self.device.config();
        let keepalive_started = peers
            .iter()
            .filter(|p| p.persistent_keepalive > 0)
            .filter(|p| {
                current
                    .peer(&p.public_key)
                    .is_none_or(|c| c.persistent_keepalive == 0)
            })
            .map(|p| p.public_key)
            .collect();
        let next = DeviceConfig {
            private_key: Some(private_key),
            peers,
            ..current
        };
        let effects = SetEffects {
            endpoints: Vec::new(),
            keepalive_started,
        };
        self.device.reconfigure(next, &effects, self.net.as_ref());
    }

    fn spawn(self: &Arc<Self>, name: &str, body: fn(&Tunnel)) -> anyhow::Result<()> {
        let me = self.clone();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(&me))
            .with_context(|| format!("spawning thread {name}"))?;
        Ok(())
    }

    fn spawn_socket_readers(self: &Arc<Self>, sockets: &Arc<Sockets>) -> anyhow::Result<()> {
        let families = [Some(&sockets.v4), sockets.v6.as_ref()];
        for (n, sock) in families.into_iter().enumerate() {
            let Some(sock) = sock else { continue };
            let sock = sock.try_clone().context("cloning UDP socket")?;
            let (me, set) = (self.clone(), sockets.clone());
            thread::Builder::new()
                .name(format!("udp-reader-{n}"))
                .spawn(move || me.socket_loop(&set, &sock))
                .context("spawning UDP reader")?;
        }
        Ok(())
    }

    fn socket_loop(&self, set: &Sockets, sock: &std::net::UdpSocket) {
        let mut rx = vec![0u8; MAX_PACKET];
        let mut scratch = vec![0u8; MAX_PACKET];
        while !set.is_retired() {
            match sock.recv_from(&mut rx) {
                Ok((n, from)) => {
                    self.device
                        .handle_inbound(from, &rx[..n], &mut scratch, self.net.as_ref())
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors surface here as ECONNREFUSED and the like; keep serving.
                    tracing::debug!(error = %e, "UDP receive error");
                }
            }
        }
    }

    fn tun_loop(&self) {
        let mut rx = vec![0u8; MAX_PACKET];
        let mut scratch = vec![0u8; MAX_PACKET];
        loop {
            match self.net.tun.recv(&mut rx) {
                Ok(n) => self
                    .device
                    .handle_outbound(&rx[..n], &mut scratch, self.net.as_ref()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, iface = %self.iface, "TUN read failed; stopping");
                    std::process::exit(1);
                }
            }
        }
    }

    fn timer_loop(&self) {
        let mut scratch = vec![0u8; MAX_PACKET];
        loop {
            thread::sleep(TICK);
            self.device.tick(&mut scratch, self.net.as_ref());
        }
    }
}

impl UapiHandler for Arc<Tunnel> {
    fn get(&self) -> DeviceSnapshot {
        self.device.snapshot()
    }

    fn set(&self, req: &SetRequest) -> Result<(), UapiError> {
        let _serial = self.set_lock.lock();
        let current = self.device.config();
        let (mut next, effects) = current.apply(req);

        // Everything that can fail happens before the new configuration is committed.
        let mut rebound = None;
        if req.listen_port.is_some() && next.listen_port != current.listen_port {
            let sockets = Sockets::bind(next.listen_port, next.fwmark).map_err(|e| {
                UapiError::new(
                    Errno::PortInUse,
                    format!("listen_port {}: {e}", next.listen_port),
                )
            })?;
            next.listen_port = sockets.port;
            rebound = Some(Arc::new(sockets));
        } else {
            next.listen_port = current.listen_port;
            if next.fwmark != current.fwmark {
                let sockets = self.net.sockets.read().clone();
                sockets.set_mark(next.fwmark).map_err(|e| {
                    // Put the old mark back so a failure leaves nothing half-applied.
                    let _ = sockets.set_mark(current.fwmark);
                    UapiError::new(Errno::PortInUse, format!("fwmark {}: {e}", next.fwmark))
                })?;
            }
        }

        if let Some(sockets) = rebound {
            let old = std::mem::replace(&mut *self.net.sockets.write(), sockets.clone());
            old.retire();
            self.spawn_socket_readers(&sockets)
                .map_err(|e| UapiError::new(Errno::Io, e.to_string()))?;
            tracing::info!(port = sockets.port, "listening on new port");
        }
        self.device.reconfigure(next, &effects, self.net.as_ref());
        Ok(())
    }
}
