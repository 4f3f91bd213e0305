//! A running tunnel: the TUN device, the sockets, the engine, and the threads between them.
//! Every configuration change, from `wg set` or the control plane, goes through
//! [`Tunnel::set`], which binds new sockets before it commits the configuration so a change
//! that fails changes nothing.
//!
//! The hot path crosses the kernel once per batch, not once per packet. Outbound, the TUN
//! (with virtio-net offloads) hands over TCP super-segments of up to 64 KiB, and VXLAN ones
//! where the kernel offloads UDP tunnels; they are split ([`gso::split_into`]) straight
//! into an [`OutBatch`], each segment built where its data message goes and sealed there,
//! and leave in UDP GSO sends of up to 64 datagrams. Inbound, one receive returns up to
//! [`RECV_BATCH`] GRO batches of up to 64 datagrams each; they are opened where they
//! arrived and coalesced ([`Coalescer`]) into super-segments written to the TUN in one go.
//! Between the TUN and the socket userspace copies each byte at most once (the split or the
//! coalescer). Both readers keep reading while packets are queued and finish their batch
//! when the queue is empty: the TUN reader sends (or after [`TUN_READS_PER_BATCH`] reads),
//! so datagrams the TUN hands over one by one (VXLAN, UDP) leave in GSO sends too; the
//! socket readers write what they coalesced, so a run split over two of a peer's GSO sends
//! is written once. One thread per direction (TUN reader; one UDP reader per family), so
//! the two directions run on two cores; within a direction, per-peer order is kept.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::batch::OutBatch;
use crate::config::{Change, DeviceConfig, PeerConfig};
use crate::drops::DropReason;
use crate::engine::{
    Burst, Engine, Queued, Transmit, DATA_OVERHEAD, DATA_PLAINTEXT_AT, MAX_PACKET,
};
use crate::key::Key;
use crate::offload::gro::{Coalescer, GroStats, MAX_VXLAN_PORTS};
use crate::offload::gso::{self, Segments as _};
use crate::offload::{Encap, VirtioHdr, VIRTIO_HDR_LEN, VIRTIO_TUNNEL_HDR_LEN};
use crate::snat::SourceRewrite;
use crate::sockets::{Inbox, Sockets, Udp, RECV_BATCH, RECV_POLL};
use crate::workers::{OpenJobs, SealJobs, Workers};

/// How often session timers run; boringtun rounds its timers to this order anyway.
const TICK: Duration = Duration::from_millis(100);

/// Default inner MTU: 1500 underlay minus the IPv6+UDP+WireGuard overhead (80 bytes).
pub const DEFAULT_MTU: u16 = 1420;

/// Outbound staging: room for two 64 KiB super-segments' worth of datagrams.
const OUT_BATCH_BYTES: usize = 2 * (MAX_PACKET + 64 * DATA_OVERHEAD);
const OUT_BATCH_RUNS: usize = 256;

/// TUN reads sealed into one batch before it is sent even though more are queued: bounds
/// the delay a queued packet sees to one batch's sealing, while a run of datagrams read one
/// by one (VXLAN, UDP) still leaves in a few GSO sends instead of one send each.
const TUN_READS_PER_BATCH: usize = 64;

/// The least room a seal needs: a data message, or the 148-byte handshake initiation sent
/// instead while there is no session.
const MIN_SEAL_ROOM: usize = 256;

/// Set to `0` to open the TUN without offloads (one packet per read and write), e.g. to
/// measure what they bring or to work around a kernel that mishandles them.
pub const OFFLOAD_ENV: &str = "ISTHMUS_TUN_OFFLOAD";

/// Set to `0` to keep encapsulated super-packets off the TUN (`TUN_F_UDP_TUNNEL_GSO`): a
/// VXLAN device routed into the tunnel then hands over one datagram per read, as before
/// kernel 6.17. To measure what they bring, or to work around a kernel that mishandles them.
pub const TUNNEL_GSO_ENV: &str = "ISTHMUS_TUN_TUNNEL_GSO";

/// `TUN_F_UDP_TUNNEL_GSO` and `TUN_F_UDP_TUNNEL_GSO_CSUM` (linux/if_tun.h, kernel ≥ 6.17;
/// not in libc yet).
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x080;
const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

/// Set to `0` to write TCP inside VXLAN into the TUN datagram by datagram (each split
/// again by the kernel before the VXLAN socket) rather than as tunnel super-packets, even
/// when VXLAN ports are set ([`Tunnel::set_vxlan_ports`]) and the TUN accepted tunnel
/// offload. To measure what they bring, or to work around a kernel that mishandles them.
pub const VXLAN_GRO_ENV: &str = "ISTHMUS_TUN_VXLAN_GRO";

/// Set to `0` to keep UDP datagrams out of GRO (one TUN write each) even when the TUN
/// accepted UDP segmentation offload, e.g. to measure what coalescing them brings.
pub const UDP_GRO_ENV: &str = "ISTHMUS_TUN_UDP_GRO";

/// How many threads seal and open data messages (0 or unset: `workers::default_size`, one
/// per core beyond two cores; 1: each packet thread does its own crypto, no pool).
pub const WORKERS_ENV: &str = "ISTHMUS_CRYPTO_WORKERS";

/// Messages one batch hands to the workers; a batch with more seals the rest itself.
const SEAL_JOBS: usize = 256;
/// A GRO receive holds at most 64 datagrams.
const OPEN_JOBS: usize = 64;

/// The worker count [`WORKERS_ENV`] asks for: `None` when it is not a number.
pub fn workers_wanted(value: Option<&str>) -> Option<usize> {
    match value.map(str::trim) {
        None | Some("") => Some(0),
        Some(v) => v.parse().ok(),
    }
}

/// Whether decrypted UDP datagrams are coalesced into `GSO_UDP_L4` TUN writes: only on a
/// TUN with virtio-net headers (`vnet`) that also accepted `TUN_F_USO4|TUN_F_USO6`
/// (`uso`, kernel ≥ 6.2; an older kernel rejects such a write, which would drop the whole
/// run), and unless [`UDP_GRO_ENV`] is `0`.
pub fn udp_gro_wanted(vnet: bool, uso: bool, setting: Option<&str>) -> bool {
    vnet && uso && setting.map(str::trim) != Some("0")
}

/// Whether TCP inside VXLAN is coalesced into tunnel super-packets: only on a TUN whose
/// header is the long one (it accepted `TUN_F_UDP_TUNNEL_GSO`, kernel ≥ 6.17), and unless
/// [`VXLAN_GRO_ENV`] is `0`.
pub fn vxlan_gro_wanted(vnet_len: usize, setting: Option<&str>) -> bool {
    vnet_len == VIRTIO_TUNNEL_HDR_LEN && setting.map(str::trim) != Some("0")
}

/// Whether the kernel delivers a tunnel write whose outer IPv6 header carries the
/// coalescer's destination options header (one unknown option, 16 bytes; see
/// `offload::gro`), from the namespace's `net.ipv6.max_dst_opts_number` and
/// `max_dst_opts_length`: a negative number refuses unknown options, a smaller count or
/// length drops the header. It would be dropped silently, not refused, so IPv6 VXLAN is
/// merged only where the limits let it through (the defaults do: 8 and unlimited); an
/// unreadable setting (no IPv6) counts as no.
pub fn vxlan_over_ipv6_delivered(max_number: Option<&str>, max_length: Option<&str>) -> bool {
    let read = |v: Option<&str>| v.and_then(|v| v.trim().parse::<i64>().ok());
    matches!((read(max_number), read(max_length)), (Some(n), Some(l)) if n >= 1 && l >= 16)
}

/// Up to [`MAX_VXLAN_PORTS`] ports packed into one word (0: none), so each receive batch
/// reads the current set without a lock.
fn pack_ports(ports: &[u16]) -> u64 {
    ports
        .iter()
        .filter(|&&p| p != 0)
        .take(MAX_VXLAN_PORTS)
        .enumerate()
        .fold(0, |w, (i, &p)| w | u64::from(p) << (16 * i))
}

fn unpack_ports(w: u64) -> [u16; MAX_VXLAN_PORTS] {
    std::array::from_fn(|i| (w >> (16 * i)) as u16)
}

/// Why a [`Change`] could not be applied; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("listen_port {port}: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("fwmark {mark}: {source}")]
    Fwmark { mark: u32, source: io::Error },
    #[error("{0:#}")]
    Spawn(anyhow::Error),
}

/// The I/O side the engine transmits through.
pub struct Net {
    tun: SyncDevice,
    /// The length of the virtio-net header on every read and write (offloads on):
    /// [`VIRTIO_HDR_LEN`], or [`VIRTIO_TUNNEL_HDR_LEN`] once the TUN also hands over
    /// encapsulated super-packets ([`enable_tunnel_gso`]); 0 without headers.
    vnet_len: usize,
    /// UDP datagrams are coalesced too ([`udp_gro_wanted`]).
    udp_gro: bool,
    /// TCP inside VXLAN may be coalesced into tunnel super-packets ([`vxlan_gro_wanted`]);
    /// cleared for good if the kernel refuses one ([`Net::tunnel_write_refused`]).
    vxlan_gro: AtomicBool,
    /// VXLAN over IPv6 is coalesced too ([`vxlan_over_ipv6_delivered`]).
    vxlan_v6: bool,
    /// The local VXLAN ports whose TCP is coalesced, packed ([`pack_ports`]).
    vxlan_ports: AtomicU64,
    /// What the coalescers wrote, summed over the UDP readers.
    gro: GroCounters,
    /// What the send batches cost: datagrams, and the system calls that sent them.
    sent: BatchCounters,
    /// The same for receiving, summed over the UDP readers.
    received: BatchCounters,
    sockets: RwLock<Arc<Sockets>>,
}

impl Transmit for Net {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.sockets.read().send_to(datagram, to)
    }

    fn write_tun(&self, packet: &[u8]) -> io::Result<()> {
        if self.vnet() {
            let mut hdr = [0u8; VIRTIO_HDR_LEN];
            VirtioHdr::NONE.encode(&mut hdr);
            self.write_vnet(&hdr, packet)
        } else {
            self.tun.send(packet).map(|_| ())
        }
    }
}

impl Net {
    /// A tunnel super-packet write failed with `EINVAL`: a kernel whose checks differ from
    /// the ones the coalescer works around. Stops merging VXLAN for the life of the process
    /// (datagrams go in one by one or as UDP runs again; TCP resends what was lost), once,
    /// with a warning.
    fn tunnel_write_refused(&self, e: &io::Error) {
        if self.vxlan_gro.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "the TUN refused a VXLAN super-packet; VXLAN is written datagram by datagram from now on"
            );
        }
    }

    /// The TUN speaks virtio-net headers (offloads on): every read and write has one.
    fn vnet(&self) -> bool {
        self.vnet_len > 0
    }

    /// Writes `packet` to a TUN with headers, behind `hdr`: the short header, zero-padded
    /// to the long one when the TUN has it (the receive hash and tunnel offsets stay zero),
    /// or a whole long header (a tunnel super-packet from the coalescer).
    fn write_vnet(&self, hdr: &[u8], packet: &[u8]) -> io::Result<()> {
        const PAD: [u8; VIRTIO_TUNNEL_HDR_LEN - VIRTIO_HDR_LEN] =
            [0; VIRTIO_TUNNEL_HDR_LEN - VIRTIO_HDR_LEN];
        let Some(pad) = self
            .vnet_len
            .checked_sub(hdr.len())
            .and_then(|n| PAD.get(..n))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte virtio-net header for a TUN that takes {}",
                    hdr.len(),
                    self.vnet_len
                ),
            ));
        };
        self.tun
            .send_vectored(&[IoSlice::new(hdr), IoSlice::new(pad), IoSlice::new(packet)])
            .map(|_| ())
    }
}

/// [`GroStats`] summed over the threads that write to the TUN.
#[derive(Default)]
struct GroCounters {
    tcp_merged: AtomicU64,
    tcp_writes: AtomicU64,
    udp_merged: AtomicU64,
    udp_writes: AtomicU64,
    vxlan_merged: AtomicU64,
    vxlan_writes: AtomicU64,
}

impl GroCounters {
    fn add(&self, s: GroStats) {
        for (c, n) in [
            (&self.tcp_merged, s.tcp_merged),
            (&self.tcp_writes, s.tcp_writes),
            (&self.udp_merged, s.udp_merged),
            (&self.udp_writes, s.udp_writes),
            (&self.vxlan_merged, s.vxlan_merged),
            (&self.vxlan_writes, s.vxlan_writes),
        ] {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn get(&self) -> GroStats {
        GroStats {
            tcp_merged: self.tcp_merged.load(Ordering::Relaxed),
            tcp_writes: self.tcp_writes.load(Ordering::Relaxed),
            udp_merged: self.udp_merged.load(Ordering::Relaxed),
            udp_writes: self.udp_writes.load(Ordering::Relaxed),
            vxlan_merged: self.vxlan_merged.load(Ordering::Relaxed),
            vxlan_writes: self.vxlan_writes.load(Ordering::Relaxed),
        }
    }
}

/// Datagrams moved through the UDP sockets, and the system calls that moved them: their
/// ratio is what batching saves (1.0: one call per datagram). Sent: the TUN reader's data
/// messages; received: everything the socket readers took in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub datagrams: u64,
    pub calls: u64,
}

#[derive(Default)]
struct BatchCounters {
    datagrams: AtomicU64,
    calls: AtomicU64,
}

impl BatchCounters {
    fn add(&self, datagrams: usize, calls: usize) {
        self.datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        self.calls.fetch_add(calls as u64, Ordering::Relaxed);
    }

    /// Takes back datagrams counted before a send that failed.
    fn retract(&self, datagrams: usize) {
        self.datagrams
            .fetch_sub(datagrams as u64, Ordering::Relaxed);
    }

    fn get(&self) -> BatchStats {
        BatchStats {
            datagrams: self.datagrams.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
        }
    }
}

/// Opens the TUN device, with offloads unless they are switched off or refused. Returns
/// the device, the length of its virtio-net headers (0: none), and whether it also
/// accepted UDP segmentation offload (tun-rs asks for `TUN_F_USO4|TUN_F_USO6` and falls
/// back to TCP offloads alone when the kernel refuses them).
fn open_tun(iface: &str, mtu: u16) -> anyhow::Result<(SyncDevice, usize, bool)> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(iface)
            .mtu(mtu)
            .offload(offload)
            .build_sync()
    };
    let want = std::env::var(OFFLOAD_ENV).map_or(true, |v| v != "0");
    if want {
        match build(true) {
            Ok(tun) => {
                let vnet = tun.tcp_gso();
                let uso = vnet && tun.udp_gso();
                if vnet && !uso {
                    tracing::warn!(
                        iface,
                        "TUN refused UDP segmentation offload (TUN_F_USO4/6, kernel < 6.2?); \
                         UDP datagrams are written one by one"
                    );
                }
                if !vnet {
                    return Ok((tun, 0, false));
                }
                let tunnels = std::env::var(TUNNEL_GSO_ENV).map_or(true, |v| v.trim() != "0");
                if !tunnels {
                    return Ok((tun, VIRTIO_HDR_LEN, uso));
                }
                return match enable_tunnel_gso(&tun, uso) {
                    Ok(()) => Ok((tun, VIRTIO_TUNNEL_HDR_LEN, uso)),
                    Err((e, hdr_len)) => {
                        tracing::info!(
                            iface,
                            error = %e,
                            "TUN refused UDP tunnel segmentation offload (kernel < 6.17?); \
                             VXLAN packets are read one by one"
                        );
                        Ok((tun, hdr_len, uso))
                    }
                };
            }
            Err(e) => {
                tracing::warn!(iface, error = %e, "TUN offloads refused; one packet per read")
            }
        }
    }
    let tun = build(false).with_context(|| {
        format!("creating TUN device {iface} (needs CAP_NET_ADMIN and /dev/net/tun)")
    })?;
    Ok((tun, 0, false))
}

/// Asks the TUN to hand over encapsulated super-packets too: a VXLAN device routed into
/// the tunnel (flannel's) then gives one read per 64 KiB instead of one per datagram. That
/// takes the long virtio-net header on every read and write, set first; on a refusal the
/// header goes back to the short one and the offloads stay as tun-rs set them. A refusal
/// says which header length is in effect, so reads and writes keep the device's framing
/// even if the header could not be set back.
fn enable_tunnel_gso(tun: &SyncDevice, uso: bool) -> Result<(), (io::Error, usize)> {
    use std::os::fd::AsRawFd;
    let fd = tun.as_raw_fd();
    let set_len = |len: usize| {
        let len = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, valid for the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    let mut flags = libc::TUN_F_CSUM
        | libc::TUN_F_TSO4
        | libc::TUN_F_TSO6
        | TUN_F_UDP_TUNNEL_GSO
        | TUN_F_UDP_TUNNEL_GSO_CSUM;
    if uso {
        flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    set_len(VIRTIO_TUNNEL_HDR_LEN).map_err(|e| (e, VIRTIO_HDR_LEN))?;
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        let refused = io::Error::last_os_error();
        return Err(match set_len(VIRTIO_HDR_LEN) {
            Ok(()) => (refused, VIRTIO_HDR_LEN),
            Err(_) => (refused, VIRTIO_TUNNEL_HDR_LEN),
        });
    }
    Ok(())
}

/// One running WireGuard interface: the TUN device, the UDP sockets, the [`Engine`] and the
/// threads between them — what boringtun's `device::Device` and wireguard-go's `Device` are.
/// Not a boringtun `Tunn` (one peer's noise session), of which the engine holds one per peer.
pub struct Tunnel {
    pub iface: String,
    engine: Arc<Engine>,
    net: Arc<Net>,
    /// The crypto workers every packet thread shares ([`crate::workers`]).
    workers: Workers,
    set_lock: Mutex<()>,
    /// VXLAN source rewrite (routing mode `vxlan`); read once per TUN read.
    source_rewrite: RwLock<Option<SourceRewrite>>,
    /// Why the tunnel stopped carrying packets (the TUN could not be read), and whom to tell:
    /// the owner restores what it changed and exits, instead of the process vanishing here.
    failure: Mutex<Failure>,
}

#[derive(Default)]
struct Failure {
    reason: Option<String>,
    notify: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Tunnel {
    /// Creates the TUN device `iface` and binds the UDP sockets; starts the packet threads.
    pub fn start(iface: &str, listen_port: u16, mtu: u16) -> anyhow::Result<Arc<Tunnel>> {
        let setting = std::env::var(WORKERS_ENV).ok();
        let wanted = workers_wanted(setting.as_deref())
            .with_context(|| format!("{WORKERS_ENV}={setting:?}: not a worker count"))?;
        let workers = Workers::new(wanted)?;
        let (tun, vnet_len, uso) = open_tun(iface, mtu)?;
        let vnet = vnet_len > 0;
        let udp_gro = udp_gro_wanted(vnet, uso, std::env::var(UDP_GRO_ENV).ok().as_deref());
        let vxlan_gro = vxlan_gro_wanted(vnet_len, std::env::var(VXLAN_GRO_ENV).ok().as_deref());
        let sysctl =
            |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv6/{name}")).ok();
        let vxlan_v6 = vxlan_over_ipv6_delivered(
            sysctl("max_dst_opts_number").as_deref(),
            sysctl("max_dst_opts_length").as_deref(),
        );
        let sockets = Arc::new(
            Sockets::bind(listen_port, 0)
                .with_context(|| format!("binding UDP port {listen_port}"))?,
        );
        let engine = Arc::new(Engine::new());
        engine.set_mtu(mtu);
        let mut config = engine.config();
        config.listen_port = sockets.port;
        let net = Arc::new(Net {
            tun,
            vnet_len,
            udp_gro,
            vxlan_gro: AtomicBool::new(vxlan_gro),
            vxlan_v6,
            vxlan_ports: AtomicU64::new(0),
            gro: GroCounters::default(),
            sent: BatchCounters::default(),
            received: BatchCounters::default(),
            sockets: RwLock::new(sockets.clone()),
        });
        engine.reconfigure(config, &Default::default(), net.as_ref());

        let tunnel = Arc::new(Tunnel {
            iface: iface.to_string(),
            engine,
            net,
            workers,
            set_lock: Mutex::new(()),
            source_rewrite: RwLock::new(None),
            failure: Mutex::new(Failure::default()),
        });
        tunnel.spawn_socket_readers(&sockets)?;
        tunnel.spawn("tun-reader", Tunnel::tun_loop)?;
        tunnel.spawn("timers", Tunnel::timer_loop)?;
        tracing::info!(
            iface,
            port = sockets.port,
            mtu,
            tun_offload = vnet,
            tun_tunnel_gso = vnet_len == VIRTIO_TUNNEL_HDR_LEN,
            udp_gro,
            vxlan_gro,
            vxlan_gro_ipv6 = vxlan_gro && vxlan_v6,
            crypto_workers = tunnel.workers.size(),
            udp_gso_segments = sockets.v4.max_segments(),
            "tunnel up"
        );
        Ok(tunnel)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What GRO wrote to the TUN so far: packets merged into super-segments, and those
    /// writes, for TCP and UDP.
    pub fn gro_stats(&self) -> GroStats {
        self.net.gro.get()
    }

    /// The data datagrams sent so far, and the system calls that sent them.
    pub fn send_stats(&self) -> BatchStats {
        self.net.sent.get()
    }

    /// The datagrams received so far, and the system calls that received them.
    pub fn recv_stats(&self) -> BatchStats {
        self.net.received.get()
    }

    /// Applies `change` (a parsed `wg set`, or what [`Tunnel::sync`] makes) through the one
    /// pure step, [`DeviceConfig::apply`]: sockets are rebound first, and only then is the
    /// new configuration swapped in.
    pub fn set(self: &Arc<Self>, change: &Change) -> Result<(), SetError> {
        let _serial = self.set_lock.lock();
        let current = self.engine.config();
        self.commit(&current, change)
    }

    /// The control plane's step: run exactly `peers` under `private_key`, keeping the listen
    /// port and fwmark ([`Change::sync`]). Unchanged peers keep their sessions and roamed
    /// endpoints; peers that are new (or newly keep alive) handshake at once instead of at
    /// the first packet.
    pub fn sync(self: &Arc<Self>, private_key: Key, peers: &[PeerConfig]) -> Result<(), SetError> {
        self.sync_with(private_key, peers, &[])
    }

    /// [`Tunnel::sync`], where each `(old, new)` of `successors` says the peer now known by
    /// `new` is the one that had `old` (it rotated its key): its old session keeps carrying
    /// traffic until the new one is up, so the peer's rotation loses nothing.
    pub fn sync_with(
        self: &Arc<Self>,
        private_key: Key,
        peers: &[PeerConfig],
        successors: &[(Key, Key)],
    ) -> Result<(), SetError> {
        let _serial = self.set_lock.lock();
        let current = self.engine.config();
        let change = Change::sync(&current, private_key, peers);
        self.commit_with(&current, &change, successors)
    }

    /// Moves to a new private key without cutting a session: see
    /// [`Engine::rotate_private_key`].
    pub fn rotate_key(&self, private_key: Key) {
        let _serial = self.set_lock.lock();
        self.engine
            .rotate_private_key(private_key, self.net.as_ref());
    }

    /// Applies `req` to `current`; the caller holds `set_lock`.
    fn commit(self: &Arc<Self>, current: &DeviceConfig, req: &Change) -> Result<(), SetError> {
        self.commit_with(current, req, &[])
    }

    fn commit_with(
        self: &Arc<Self>,
        current: &DeviceConfig,
        req: &Change,
        successors: &[(Key, Key)],
    ) -> Result<(), SetError> {
        let (mut next, mut effects) = current.apply(req);
        effects.successors = successors.to_vec();

        // Everything that can fail happens before the new configuration is committed.
        let mut rebound = None;
        if req.listen_port.is_some() && next.listen_port != current.listen_port {
            let sockets =
                Sockets::bind(next.listen_port, next.fwmark).map_err(|source| SetError::Bind {
                    port: next.listen_port,
                    source,
                })?;
            next.listen_port = sockets.port;
            rebound = Some(Arc::new(sockets));
        } else {
            next.listen_port = current.listen_port;
            if next.fwmark != current.fwmark {
                let sockets = self.net.sockets.read().clone();
                sockets.set_mark(next.fwmark).map_err(|source| {
                    // Put the old mark back so a failure leaves nothing half-applied.
                    let _ = sockets.set_mark(current.fwmark);
                    SetError::Fwmark {
                        mark: next.fwmark,
                        source,
                    }
                })?;
            }
        }

        if let Some(sockets) = rebound {
            let old = std::mem::replace(&mut *self.net.sockets.write(), sockets.clone());
            old.retire();
            self.spawn_socket_readers(&sockets)
                .map_err(SetError::Spawn)?;
            tracing::info!(port = sockets.port, "listening on new port");
        }
        self.engine.reconfigure(next, &effects, self.net.as_ref());
        Ok(())
    }

    /// Coalesces TCP inside VXLAN datagrams to these local ports (a VXLAN device's
    /// `dstport`, flannel's 8472) into tunnel super-packets from now on; an empty set
    /// stops it. Only ports a VXLAN device listens on: the kernel hands such a write whole
    /// to whatever socket has the port. Up to [`MAX_VXLAN_PORTS`]; inert (datagrams are
    /// written one by one or as UDP runs) unless the TUN accepted tunnel offload.
    pub fn set_vxlan_ports(&self, ports: &[u16]) {
        let packed = pack_ports(ports);
        if self.net.vxlan_ports.swap(packed, Ordering::Relaxed) != packed {
            tracing::info!(
                ports = ?ports,
                coalesced = self.net.vxlan_gro.load(Ordering::Relaxed),
                "VXLAN ports set"
            );
        }
    }

    /// Rewrites the source of UDP to mesh IPs to this node's mesh IP from now on (`None`:
    /// stop). See [`SourceRewrite`].
    pub fn set_source_rewrite(&self, rewrite: Option<SourceRewrite>) {
        *self.source_rewrite.write() = rewrite;
    }

    /// Calls `notify` once the tunnel has stopped carrying packets (at once if it already
    /// has); [`Tunnel::failure`] says why. One callback: a later call replaces it.
    pub fn on_failure(&self, notify: impl Fn() + Send + Sync + 'static) {
        let mut f = self.failure.lock();
        if f.reason.is_some() {
            notify();
        }
        f.notify = Some(Box::new(notify));
    }

    /// Why the tunnel stopped, once it has: the TUN device could not be read (deleted, say).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().reason.clone()
    }

    fn fail(&self, reason: String) {
        tracing::error!(iface = %self.iface, %reason, "the tunnel stopped");
        let mut f = self.failure.lock();
        f.reason = Some(reason);
        if let Some(notify) = &f.notify {
            notify();
        }
    }

    /// The TUN device's MTU as configured.
    pub fn mtu(&self) -> u16 {
        self.net.tun.mtu().unwrap_or(DEFAULT_MTU)
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
        for v6 in [false, true] {
            if v6 && sockets.v6.is_none() {
                continue;
            }
            let (me, set) = (self.clone(), sockets.clone());
            thread::Builder::new()
                .name(format!("udp-reader-{}", u8::from(v6)))
                .spawn(move || {
                    let udp = if v6 { set.v6.as_ref() } else { Some(&set.v4) };
                    if let Some(udp) = udp {
                        me.socket_loop(&set, udp);
                    }
                })
                .context("spawning UDP reader")?;
        }
        Ok(())
    }

    /// Inbound: GRO receives, open each datagram, coalesce, write to the TUN. What was
    /// coalesced is written when the socket's queue runs dry, so a run that goes on in the
    /// next GRO batch (the rest of a peer's burst, already queued) joins the same write;
    /// nothing waits for datagrams that have not arrived.
    fn socket_loop(&self, set: &Sockets, udp: &Udp) {
        let mut inbox = Inbox::default();
        // Decrypted packets land after room for the virtio-net header.
        let mut slot = vec![0u8; VIRTIO_HDR_LEN + MAX_PACKET];
        let mut gro = Coalescer::with_udp(self.net.udp_gro);
        gro.set_vxlan_over_ipv6(self.net.vxlan_v6);
        let net = self.net.as_ref();
        let drops = self.engine.drops();
        // A header (empty when the TUN has none) and a packet.
        let mut emit = |hdr: &[u8], packet: &[u8]| {
            let written = if net.vnet() {
                net.write_vnet(hdr, packet)
            } else {
                net.tun.send(packet).map(|_| ())
            };
            if let Err(e) = written {
                if hdr.len() == VIRTIO_TUNNEL_HDR_LEN && e.raw_os_error() == Some(libc::EINVAL) {
                    net.tunnel_write_refused(&e);
                }
                drops.record(DropReason::IoError);
            }
        };
        let mut burst = self.engine.burst();
        let mut jobs = OpenJobs::with_capacity(OPEN_JOBS);
        // A packet with its headroom: into the coalescer, or straight to the TUN.
        let deliver = |slot: &mut [u8], gro: &mut Coalescer, emit: &mut dyn FnMut(&[u8], &[u8])| {
            if net.vnet() {
                gro.push(slot, &mut |h, p| emit(h, p));
            } else {
                emit(&[], &slot[VIRTIO_HDR_LEN..]);
            }
        };
        // The queue ran dry: wait for datagrams before the next receive.
        let mut idle = false;
        while !set.is_retired() {
            if std::mem::take(&mut idle) {
                if let Err(e) = udp.wait_readable(RECV_POLL) {
                    tracing::warn!(error = %e, "waiting for UDP datagrams failed");
                    thread::sleep(RECV_POLL);
                }
            }
            let batches = match udp.recv(&mut inbox) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        // ICMP errors surface here as ECONNREFUSED and the like; keep serving.
                        tracing::debug!(error = %e, "UDP receive error");
                    }
                    continue;
                }
            };
            if batches > 0 {
                // Counted before anything of them reaches the TUN (see `Tunnel::flush`).
                let datagrams = (0..batches)
                    .map(|i| {
                        let (got, rx) = inbox.batch(i);
                        got.len.min(rx.len()).div_ceil(got.stride.max(1))
                    })
                    .sum();
                net.received.add(datagrams, 1);
                self.engine.refresh(&mut burst);
                let ports = if net.vxlan_gro.load(Ordering::Relaxed) {
                    net.vxlan_ports.load(Ordering::Relaxed)
                } else {
                    0
                };
                gro.set_vxlan_ports(unpack_ports(ports));
                for i in 0..batches {
                    let (got, rx) = inbox.batch(i);
                    let len = got.len.min(rx.len());
                    let stride = got.stride.max(1);
                    for start in (0..len).step_by(stride) {
                        let span = start..(start + stride).min(len);
                        // Data messages are opened where they arrived, on the workers (this
                        // thread alone with one worker): no copy before the coalescer's.
                        match self.engine.open_queue(&burst, rx, span.clone(), &mut jobs) {
                            Queued::Queued | Queued::Refused => continue,
                            // A handshake may replace the sessions of what is queued: those
                            // first.
                            Queued::NotData => {
                                self.open_queued(&burst, got.from, rx, &mut jobs, &mut |p| {
                                    deliver(p, &mut gro, &mut emit)
                                })
                            }
                        }
                        let datagram = &rx[span];
                        let opened = self.engine.open(
                            &burst,
                            got.from,
                            datagram,
                            &mut slot[VIRTIO_HDR_LEN..],
                            net,
                        );
                        let Some(n) = opened else { continue };
                        deliver(&mut slot[..VIRTIO_HDR_LEN + n], &mut gro, &mut emit);
                    }
                    self.open_queued(&burst, got.from, rx, &mut jobs, &mut |p| {
                        deliver(p, &mut gro, &mut emit)
                    });
                }
            }
            if batches < RECV_BATCH {
                idle = true;
                gro.flush(&mut emit);
                net.gro.add(gro.take_stats());
            }
        }
    }

    /// Opens what `jobs` holds on the workers, and hands each packet that passes to
    /// `deliver` in arrival order, with its [`VIRTIO_HDR_LEN`] bytes of headroom.
    fn open_queued(
        &self,
        burst: &Burst,
        from: SocketAddr,
        rx: &mut [u8],
        jobs: &mut OpenJobs,
        deliver: &mut dyn FnMut(&mut [u8]),
    ) {
        if jobs.is_empty() {
            return;
        }
        let opened = jobs.run(&self.workers, rx, |buf, o| {
            if let Some(r) = self.engine.open_commit(burst, from, o, buf) {
                deliver(&mut buf[r.start - VIRTIO_HDR_LEN..r.end]);
            }
        });
        if let Err(e) = opened {
            tracing::warn!(error = %e, "receive batch not opened");
            self.engine.drops().record(DropReason::Malformed);
        }
    }

    /// Outbound: read (super-)packets from the TUN, split, seal into a batch, GSO-send.
    /// The device is non-blocking: reads go on while packets are queued, the batch is sent
    /// when the queue runs dry (or after [`TUN_READS_PER_BATCH`] reads), and only then does
    /// the thread wait in `poll`.
    fn tun_loop(&self) {
        // The flag is the file's, so the other threads' TUN writes carry it too; they never
        // waited anyway: a TUN file's send buffer is INT_MAX (`tun_chr_open`).
        if let Err(e) = self.net.tun.set_nonblocking(true) {
            return self.fail(format!("making the TUN device non-blocking failed: {e}"));
        }
        let hdr_len = self.net.vnet_len;
        let mut rx = vec![0u8; hdr_len + MAX_PACKET];
        let mut batch = OutBatch::new(OUT_BATCH_BYTES, OUT_BATCH_RUNS);
        let mut jobs = SealJobs::with_capacity(SEAL_JOBS);
        let mut burst = self.engine.burst();
        let mut reads = 0;
        loop {
            let n = match self.net.tun.recv(&mut rx) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing more queued: send what was sealed, then wait for the next.
                    self.flush(&mut batch, &mut jobs);
                    reads = 0;
                    if let Err(e) = wait_readable(&self.net.tun) {
                        return self.fail(format!("waiting for the TUN device failed: {e}"));
                    }
                    continue;
                }
                Err(e) => {
                    // Not an exit here: the owner has routing to restore first.
                    return self.fail(format!("reading the TUN device failed: {e}"));
                }
            };
            self.engine.refresh(&mut burst);
            let mut sink = SealSink {
                tunnel: self,
                batch: &mut batch,
                jobs: &mut jobs,
                burst: &burst,
                rewrite: *self.source_rewrite.read(),
            };
            if self.net.vnet() {
                let split = VirtioHdr::decode(&rx[..n])
                    .filter(|_| n >= hdr_len)
                    .ok_or(gso::SplitError::Truncated)
                    .and_then(|hdr| {
                        let encap = (hdr_len == VIRTIO_TUNNEL_HDR_LEN)
                            .then(|| Encap::decode(&rx[..n]))
                            .flatten();
                        gso::split_into(hdr, encap, &mut rx[hdr_len..n], &mut sink)
                    });
                if let Err(e) = split {
                    tracing::debug!(error = %e, "unusable packet from the TUN");
                    self.engine.drops().record(DropReason::Malformed);
                }
            } else {
                sink.whole(&mut rx[..n]);
            }
            reads += 1;
            if reads >= TUN_READS_PER_BATCH {
                self.flush(&mut batch, &mut jobs);
                reads = 0;
            }
        }
    }

    /// Room in `batch` for sealing a packet of `len` bytes, the batch sent first if it has
    /// too little left. `None` (counted) only for a packet larger than an empty batch,
    /// which the TUN never hands over.
    fn room_for<'b>(
        &self,
        batch: &'b mut OutBatch,
        jobs: &mut SealJobs,
        len: usize,
    ) -> Option<&'b mut [u8]> {
        let need = self.engine.sealed_len(len).max(MIN_SEAL_ROOM);
        if batch.space(need).is_none() {
            self.flush(batch, jobs);
        }
        let space = batch.space(need);
        if space.is_none() {
            self.engine.drops().record(DropReason::Malformed);
        }
        space
    }

    /// Seals what waits for the workers (on this thread alone with one worker), then sends
    /// the batch, run by run, in order.
    fn flush(&self, batch: &mut OutBatch, jobs: &mut SealJobs) {
        if !jobs.is_empty() {
            match jobs.run(&self.workers, batch.filled_mut()) {
                Ok(0) => {}
                Ok(failed) => {
                    // Zeroed by the job, never sent as plaintext; dropped at the receiver.
                    tracing::warn!(failed, "data messages not sealed");
                    self.engine.drops().record(DropReason::Malformed);
                }
                Err(e) => {
                    // Nothing was sealed: nothing of this batch may leave.
                    tracing::warn!(error = %e, "send batch not sealed");
                    self.engine.drops().record(DropReason::Malformed);
                    batch.clear();
                    return;
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        let sockets = self.net.sockets.read().clone();
        batch.flush(|to, datagrams, segment| {
            // Counted before they can arrive anywhere, so a count read once the peer has
            // them (a test, a shutdown line) includes them; taken back if the send fails.
            let count = datagrams.len().div_ceil(segment.max(1));
            self.net.sent.add(count, 0);
            match sockets.send_segments(datagrams, segment, to) {
                Ok(calls) => self.net.sent.add(0, calls),
                Err(e) => {
                    self.net.sent.retract(count);
                    tracing::debug!(endpoint = %to, error = %e, "send failed");
                    self.engine.drops().record(DropReason::IoError);
                }
            }
        });
    }

    fn timer_loop(&self) {
        let mut scratch = vec![0u8; MAX_PACKET];
        loop {
            thread::sleep(TICK);
            // `ip link set mtu` may change it at any time; padding must follow, or a
            // lowered MTU would be padded past (wireguard-go follows it by netlink events).
            if let Ok(mtu) = self.net.tun.mtu() {
                self.engine.set_mtu(mtu);
            }
            self.engine.tick(&mut scratch, self.net.as_ref());
        }
    }
}

/// Blocks until `tun` has a packet to read (or an error to report, which the next read
/// returns: a deleted device wakes the poll with `POLLERR`).
fn wait_readable(tun: &SyncDevice) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, its count, no timeout; the fd outlives the call.
        let rc = unsafe { libc::poll(&mut fd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The TUN reader's [`gso::Segments`]: each segment is built in the send batch at the
/// place its data message's plaintext goes and sealed there ([`Engine::seal_placed`]); a
/// packet that needed no split is copied in ([`Engine::seal_deferred`]). Sealing itself
/// waits for the batch's flush, on the workers.
struct SealSink<'a> {
    tunnel: &'a Tunnel,
    batch: &'a mut OutBatch,
    jobs: &'a mut SealJobs,
    burst: &'a Burst,
    rewrite: Option<SourceRewrite>,
}

impl gso::Segments for SealSink<'_> {
    fn room(&mut self, len: usize) -> Option<&mut [u8]> {
        let space = self.tunnel.room_for(self.batch, self.jobs, len)?;
        space.get_mut(DATA_PLAINTEXT_AT..DATA_PLAINTEXT_AT + len)
    }

    fn built(&mut self, len: usize) {
        let at = DATA_PLAINTEXT_AT;
        if let (Some(r), Some(space)) = (&self.rewrite, self.batch.space(at + len)) {
            r.apply(&mut space[at..at + len]);
        }
        let (tunnel, net) = (self.tunnel, self.tunnel.net.as_ref());
        tunnel
            .engine
            .seal_placed(self.burst, len, self.batch, self.jobs, net);
    }

    fn whole(&mut self, packet: &mut [u8]) {
        if let Some(r) = &self.rewrite {
            r.apply(packet);
        }
        if self
            .tunnel
            .room_for(self.batch, self.jobs, packet.len())
            .is_some()
        {
            let net = self.tunnel.net.as_ref();
            self.tunnel
                .engine
                .seal_deferred(self.burst, packet, self.batch, self.jobs, net);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_is_coalesced_only_on_a_tun_that_took_uso() {
        // (virtio-net headers, USO accepted, ISTHMUS_TUN_UDP_GRO, coalesce UDP)
        let cases = [
            (true, true, None, true),
            (true, true, Some("1"), true),
            (true, true, Some(""), true),
            (true, true, Some("0"), false),
            (true, true, Some(" 0 "), false),
            (true, false, None, false),
            (true, false, Some("1"), false),
            (false, true, None, false),
            (false, false, Some("1"), false),
        ];
        for (vnet, uso, setting, want) in cases {
            assert_eq!(
                udp_gro_wanted(vnet, uso, setting),
                want,
                "vnet={vnet} uso={uso} {setting:?}"
            );
        }
    }

    #[test]
    fn vxlan_is_coalesced_only_on_a_tun_with_the_long_header() {
        // (virtio-net header length, ISTHMUS_TUN_VXLAN_GRO, coalesce VXLAN)
        let cases = [
            (VIRTIO_TUNNEL_HDR_LEN, None, true),
            (VIRTIO_TUNNEL_HDR_LEN, Some("1"), true),
            (VIRTIO_TUNNEL_HDR_LEN, Some("0"), false),
            (VIRTIO_TUNNEL_HDR_LEN, Some(" 0"), false),
            (VIRTIO_HDR_LEN, None, false),
            (0, Some("1"), false),
        ];
        for (len, setting, want) in cases {
            assert_eq!(vxlan_gro_wanted(len, setting), want, "{len} {setting:?}");
        }
    }

    #[test]
    fn ipv6_vxlan_is_merged_only_where_the_kernel_lets_the_options_header_through() {
        let cases = [
            (Some("8\n"), Some("2147483647\n"), true, "the defaults"),
            (Some("1"), Some("16"), true, "just enough"),
            (Some("0"), Some("2147483647"), false, "no options allowed"),
            (
                Some("-8"),
                Some("2147483647"),
                false,
                "unknown options refused",
            ),
            (Some("8"), Some("15"), false, "header too long"),
            (None, Some("2147483647"), false, "no IPv6"),
            (Some("many"), Some("16"), false, "unreadable"),
        ];
        for (number, length, want, why) in cases {
            assert_eq!(vxlan_over_ipv6_delivered(number, length), want, "{why}");
        }
    }

    #[test]
    fn vxlan_ports_pack_into_one_word_without_zeros_and_at_most_four() {
        // (ports given, ports the coalescer gets)
        let cases: [(&[u16], [u16; MAX_VXLAN_PORTS]); 5] = [
            (&[], [0; 4]),
            (&[8472], [8472, 0, 0, 0]),
            (&[0, 4789, 0, 8472], [4789, 8472, 0, 0]),
            (&[1, 2, 3, 4, 5], [1, 2, 3, 4]),
            (&[65535, 65535], [65535, 65535, 0, 0]),
        ];
        for (given, want) in cases {
            assert_eq!(unpack_ports(pack_ports(given)), want, "{given:?}");
        }
    }

    #[test]
    fn the_worker_setting_is_a_count_or_the_default() {
        let cases: [(Option<&str>, Option<usize>); 7] = [
            (None, Some(0)),
            (Some(""), Some(0)),
            (Some("0"), Some(0)),
            (Some("1"), Some(1)),
            (Some(" 8 "), Some(8)),
            (Some("all"), None),
            (Some("-1"), None),
        ];
        for (value, want) in cases {
            assert_eq!(workers_wanted(value), want, "{value:?}");
        }
    }
}
