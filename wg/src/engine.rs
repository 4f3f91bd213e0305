//! The packet engine, free of I/O: packets and datagrams come in through method calls,
//! whatever must go out leaves through a [`Transmit`] sink. The threads and sockets that
//! feed it live in `tunnel`; tests and benchmarks can drive it directly.
//!
//! Outbound packets find their peer by longest-prefix match over allowed IPs; inbound
//! datagrams by receiver index (or, for a handshake initiation, by the static key inside it).
//! Decrypted packets are checked against the sender's allowed IPs (cryptokey routing).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{HandshakeInit, Packet, Tunn, TunnResult};
use ip_network_table::IpNetworkTable;
use parking_lot::{Mutex, RwLock};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::batch::OutBatch;
use crate::clock::{Clock, IndexSource, OsIndices, SystemClock};
use crate::config::{DeviceConfig, SetEffects};
use crate::cookie::{CookieChecker, Mac2, COOKIE_REPLY_LEN};
use crate::drops::{DropCounters, DropReason};
use crate::key::Key;
use crate::loopguard;
use crate::mss;
use crate::peer::Peer;
use crate::ratelimit::HandshakeLimiter;
use crate::session_index::IndexPermutation;
use crate::snapshot::{DeviceSnapshot, PeerSnapshot};
use crate::workers::{OpenJobs, Opened, SealJobs};

/// A buffer this large holds any datagram or packet the engine produces.
pub const MAX_PACKET: usize = 65_535 + 32;

const INITIATION_TYPE: u8 = 1;
const COOKIE_REPLY_TYPE: u8 = 3;

/// Where the engine's output goes.
pub trait Transmit {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()>;
    fn write_tun(&self, packet: &[u8]) -> io::Result<()>;
}

/// WireGuard data-message overhead: 16-byte header (type, receiver index, counter) and
/// 16-byte authentication tag. A sealed datagram is this much longer than its packet.
pub const DATA_OVERHEAD: usize = 32;

/// Where a data message's plaintext starts: after its type, receiver index and counter.
pub const DATA_PLAINTEXT_AT: usize = DATA_OVERHEAD / 2;

const DATA_TYPE: u8 = 4;

/// WireGuard pads every data message's plaintext to a multiple of this (whitepaper §5.4.6)
/// so datagram lengths say less about the packets inside; boringtun 0.7 does not.
pub const PADDING_MULTIPLE: usize = 16;

thread_local! {
    /// Where a packet is copied to be padded, once per packet thread: boringtun seals
    /// exactly the bytes it is given, and the packet's own buffer is not ours to grow.
    static PADDED: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_PACKET].into_boxed_slice());
    /// Where a plaintext built in the send batch is copied when it cannot be sealed there
    /// (no session yet: `encapsulate` queues it and writes a handshake in its place).
    static PLACED: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_PACKET].into_boxed_slice());
}

/// The plaintext of a deferred seal: apart from the batch, or already in it.
#[derive(Clone, Copy)]
enum Plain<'p> {
    Apart(&'p [u8]),
    /// This many bytes at [`DATA_PLAINTEXT_AT`] past the batch's offset.
    Placed(usize),
}

/// The plaintext length a packet of `len` bytes is sealed at: rounded up to
/// [`PADDING_MULTIPLE`] but never past `mtu` (0: unknown, no cap) — wireguard-go's and the
/// kernel's rule, so a full-size packet still fits the underlay.
pub fn padded_len(len: usize, mtu: usize) -> usize {
    let round = |n: usize| n.div_ceil(PADDING_MULTIPLE) * PADDING_MULTIPLE;
    if mtu == 0 {
        return round(len);
    }
    let last_unit = if len > mtu { len % mtu } else { len };
    len - last_unit + round(last_unit).min(mtu)
}

/// The configuration as one run of packets sees it: taken with [`Engine::burst`] and kept
/// by a packet thread, which calls [`Engine::refresh`] before each batch — one atomic load
/// when nothing changed, instead of a lock and two reference-count updates per packet.
/// Holding it across a reconfiguration is harmless: the batch finishes on the view it
/// started with, and removed peers are let go at the next refresh.
pub struct Burst {
    state: Arc<State>,
    generation: u64,
    /// The last longest-prefix match each way, (address, index into `state.peers`): a bulk
    /// flow asks the same question for every packet, and the tree walk costs as much as a
    /// tenth of the packet's encryption. Valid for `state`, so it goes with it.
    out_route: Cell<Option<(IpAddr, u32)>>,
    in_route: Cell<Option<(IpAddr, u32)>>,
}

impl Burst {
    fn new(state: Arc<State>, generation: u64) -> Burst {
        Burst {
            state,
            generation,
            out_route: Cell::new(None),
            in_route: Cell::new(None),
        }
    }

    /// The peer whose allowed IPs hold `addr` (longest prefix), through `cache`.
    fn route(&self, cache: &Cell<Option<(IpAddr, u32)>>, addr: IpAddr) -> Option<&Arc<Peer>> {
        let index = match cache.get() {
            Some((cached, index)) if cached == addr => index,
            _ => {
                let (_, &index) = self.state.routes.longest_match(addr)?;
                cache.set(Some((addr, index)));
                index
            }
        };
        self.state.peers.get(index as usize)
    }
}

/// Where an encrypted datagram goes: `len` bytes at the start of the buffer given to
/// [`Engine::seal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub to: SocketAddr,
    pub len: usize,
}

/// How [`Engine::seal_plan`] says a packet is sealed.
struct Plan<'b> {
    peer: &'b Arc<Peer>,
    /// The previous session, when it is the one that sends (a rotation).
    via: Option<Arc<Peer>>,
    padded: usize,
    clamp: Option<u16>,
}

/// What [`Engine::open_queue`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A data message, queued for the workers.
    Queued,
    /// Refused before decryption (unknown index, replay); counted.
    Refused,
    /// Not a data message: for [`Engine::open`].
    NotData,
}

/// The device's key and what guards handshakes addressed to it.
///
/// [`HandshakeLimiter`] decides when the device is under load; `cookies` checks MAC1 always
/// and, under load, MAC2 against a cookie bound to the source's address and port (our own,
/// see [`crate::cookie`]: boringtun's binds it to the address only).
#[derive(Clone)]
struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    cookies: Arc<CookieChecker>,
    limiter: Arc<Mutex<HandshakeLimiter>>,
}

impl Identity {
    fn new(private: Key, now: Instant) -> Identity {
        let secret = StaticSecret::from(private.0);
        let public = PublicKey::from(&secret);
        Identity {
            secret,
            public,
            cookies: Arc::new(CookieChecker::new(public.as_bytes(), now)),
            limiter: Arc::new(Mutex::new(HandshakeLimiter::new())),
        }
    }
}

/// An immutable view of the configured device; replaced whole on every reconfiguration so
/// the packet path never sees half a change.
struct State {
    config: DeviceConfig,
    identity: Option<Identity>,
    by_key: HashMap<Key, Arc<Peer>>,
    by_index: IndexMap,
    /// Every peer, in configuration order; `routes` points into it.
    peers: Vec<Arc<Peer>>,
    routes: IpNetworkTable<u32>,
    /// Peers whose previous session is under another public key (the peer rotated its
    /// key), by that old key: its handshake initiations still find the previous session.
    retiring: HashMap<Key, Arc<Peer>>,
}

/// Peers by receiver index, hashed with one multiplication: the indices are random, so a
/// DoS-resistant hash buys nothing, and SipHash costs more than the rest of the lookup.
type IndexMap = HashMap<u32, Arc<Peer>, BuildHasherDefault<IndexHasher>>;

#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u32(u32::from(*b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Fibonacci hashing: spreads the value over the high bits hashbrown uses as tags.
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            config: DeviceConfig::default(),
            identity: None,
            by_key: HashMap::new(),
            by_index: IndexMap::default(),
            peers: Vec::new(),
            routes: IpNetworkTable::new(),
            retiring: HashMap::new(),
        }
    }
}

/// The WireGuard engine of one interface: every peer's boringtun [`Tunn`] (noise session),
/// the allowed-IP table, the receiver-index table and the device-wide handshake limiter,
/// behind methods that take packets and datagrams and hand output to a [`Transmit`].
///
/// What boringtun's `device::Device` and wireguard-go's `Device` do *minus* the I/O: no TUN,
/// no socket, no thread. [`crate::Tunnel`] adds those. Named `Engine`, not `Device`, so a
/// reader who knows those two does not expect a TUN behind it.
///
/// Time and randomness come in through a [`Clock`] and an [`IndexSource`]
/// ([`Engine::with_sources`]; [`Engine::new`] takes the system's), so tests can drive every
/// timer and reproduce every receiver index (see [`crate::clock`]).
pub struct Engine {
    state: RwLock<Arc<State>>,
    /// Bumped on every reconfiguration, after the new state is in place.
    generation: AtomicU64,
    /// Serialises reconfigurations (readers never take it).
    reconfigure_lock: Mutex<()>,
    drops: DropCounters,
    /// The TUN's MTU, the cap on padding; 0 until [`Engine::set_mtu`].
    mtu: AtomicUsize,
    clock: Arc<dyn Clock>,
    indices: Arc<dyn IndexSource>,
    /// The key that hides boringtun's session counter in the wire index.
    session_indices: Arc<IndexPermutation>,
    /// Our key before a rotation ([`Engine::rotate_private_key`]), still answered while
    /// peers learn the new one; `None` once retired. Read only for initiations whose MAC1
    /// does not match the current key.
    previous_identity: RwLock<Option<Identity>>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::with_sources(Arc::new(SystemClock), Arc::new(OsIndices))
    }
}

impl Engine {
    /// An engine on the host's clock and the OS random number generator.
    pub fn new() -> Engine {
        Engine::default()
    }

    /// An engine that reads the time from `clock` and draws receiver indices from
    /// `indices`: a test's virtual clock and [`crate::clock::SeededIndices`] make a run
    /// reproducible.
    pub fn with_sources(clock: Arc<dyn Clock>, indices: Arc<dyn IndexSource>) -> Engine {
        Engine {
            state: RwLock::default(),
            generation: AtomicU64::default(),
            reconfigure_lock: Mutex::default(),
            drops: DropCounters::default(),
            mtu: AtomicUsize::default(),
            session_indices: Arc::new(IndexPermutation::new(&*indices)),
            clock,
            indices,
            previous_identity: RwLock::default(),
        }
    }

    fn state(&self) -> Arc<State> {
        self.state.read().clone()
    }

    /// The current configuration, for a run of [`Engine::seal`] or [`Engine::open`] calls.
    pub fn burst(&self) -> Burst {
        // Generation first: a reconfiguration racing with this makes the next refresh reload.
        let generation = self.generation.load(Ordering::Acquire);
        Burst::new(self.state(), generation)
    }

    /// Brings `burst` up to date with the latest reconfiguration, if there was one.
    pub fn refresh(&self, burst: &mut Burst) {
        if burst.generation != self.generation.load(Ordering::Acquire) {
            *burst = self.burst();
        }
    }

    pub fn config(&self) -> DeviceConfig {
        self.state().config.clone()
    }

    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// The peer's boringtun session, for tests that reach past the engine's API (message
    /// counters near their limits).
    #[cfg(test)]
    pub(crate) fn with_tunn<R>(
        &self,
        peer: &Key,
        f: impl FnOnce(&mut boringtun::noise::Tunn) -> R,
    ) -> Option<R> {
        let state = self.state();
        let peer = state.by_key.get(peer)?;
        let mut guard = peer.tunn.lock();
        guard.as_mut().map(f)
    }

    /// The inner MTU, which caps the padding of data messages.
    pub fn set_mtu(&self, mtu: u16) {
        self.mtu.store(usize::from(mtu), Ordering::Relaxed);
    }

    /// Sets what the path to the peer with `key` carries through the tunnel (`None`: the
    /// device's MTU), which TCP SYNs to and from that peer are clamped to; says whether the
    /// peer is configured. Kept across reconfigurations that keep the peer.
    pub fn set_path_mtu(&self, key: &Key, mtu: Option<u16>) -> bool {
        let state = self.state();
        let Some(peer) = state.by_key.get(key) else {
            return false;
        };
        peer.set_path_mtu(mtu);
        true
    }

    /// The MSS limit for TCP to and from `peer`: its path MTU, else the device's MTU (0:
    /// neither known, no clamping).
    fn clamp_mtu(&self, peer: &Peer) -> u16 {
        peer.path_mtu()
            .unwrap_or_else(|| u16::try_from(self.mtu.load(Ordering::Relaxed)).unwrap_or(u16::MAX))
    }

    /// The longest datagram sealing a `len`-byte packet can be: padding to the device's MTU
    /// plus [`DATA_OVERHEAD`] (toward a peer with a lower path MTU it is shorter).
    pub fn sealed_len(&self, len: usize) -> usize {
        padded_len(len, self.mtu.load(Ordering::Relaxed)) + DATA_OVERHEAD
    }

    /// Moves the device to `next`. Peers whose key, preshared key and keepalive are unchanged
    /// keep their sessions; removed peers are forgotten at once.
    ///
    /// A new private key cuts every session at once (what `wg set private-key` does); see
    /// [`Engine::rotate_private_key`] for the change that loses nothing. A peer named in
    /// `effects.successors` as the new key of a removed peer starts with the removed one's
    /// session as its previous (see [`crate::peer::Previous`]) and initiates at once.
    pub fn reconfigure(&self, next: DeviceConfig, effects: &SetEffects, out: &dyn Transmit) {
        self.reconfigure_with(next, effects, out, false);
    }

    /// Moves the device to the private key `next`, keeping the old one answering beside
    /// it: every peer gets a fresh session (fresh receiver index) under the new key and
    /// keeps its current one as the previous, which goes on sending and receiving until
    /// the new one carries traffic. Nothing initiates under the new key here — the peers
    /// do once they learn it — so no handshake is wasted on a peer that does not know it
    /// yet. [`Engine::retire_previous_key`] ends the overlap.
    pub fn rotate_private_key(&self, next: Key, out: &dyn Transmit) {
        let mut config = self.config();
        if config.private_key == Some(next) {
            return;
        }
        config.private_key = Some(next);
        self.reconfigure_with(config, &SetEffects::default(), out, true);
    }

    /// Ends a rotation: the previous key and the sessions under it are forgotten. Previous
    /// sessions of peers that rotated their own key stay to their own end.
    pub fn retire_previous_key(&self) {
        let _serial = self.reconfigure_lock.lock();
        *self.previous_identity.write() = None;
        for peer in &self.state().peers {
            if peer
                .previous()
                .is_some_and(|p| p.peer.public_key == peer.public_key)
            {
                peer.clear_previous();
            }
        }
    }

    /// Whether a previous key is still answered ([`Engine::rotate_private_key`]).
    pub fn has_previous_key(&self) -> bool {
        self.previous_identity.read().is_some()
    }

    /// How many peers still hold a previous session (theirs or ours rotated): zero once
    /// every peer's new session has carried traffic long enough (see `drop_previous`).
    pub fn retiring_peers(&self) -> usize {
        self.state()
            .peers
            .iter()
            .filter(|p| p.is_retiring())
            .count()
    }

    fn reconfigure_with(
        &self,
        next: DeviceConfig,
        effects: &SetEffects,
        out: &dyn Transmit,
        rotate: bool,
    ) {
        let _serial = self.reconfigure_lock.lock();
        let old = self.state();
        let now = self.clock.now();
        let identity_changed = old.config.private_key != next.private_key;
        let identity = if identity_changed {
            next.private_key.map(|k| Identity::new(k, now))
        } else {
            old.identity.clone()
        };
        if identity_changed {
            *self.previous_identity.write() = if rotate { old.identity.clone() } else { None };
        }
        let rotate = rotate && identity_changed && identity.is_some();
        let secret = identity.as_ref().map(|i| &i.secret);
        let mut initiate = Vec::new();

        let mut by_key = HashMap::with_capacity(next.peers.len());
        let mut by_index = IndexMap::with_capacity_and_hasher(next.peers.len(), Default::default());
        let mut routes = IpNetworkTable::new();
        let mut peers = Vec::with_capacity(next.peers.len());
        let mut retiring = HashMap::new();
        for pc in &next.peers {
            let peer = match (
                old.by_key.get(&pc.public_key),
                old.config.peer(&pc.public_key),
            ) {
                (Some(peer), Some(_)) if rotate => {
                    let index = fresh_index(&*self.indices, &old.by_index, &by_index);
                    Arc::new(Peer::successor(
                        pc,
                        index,
                        &self.session_indices,
                        secret,
                        peer,
                        now,
                    ))
                }
                (Some(peer), Some(before)) => {
                    if identity_changed || before.session_params_differ(pc) {
                        peer.clear_previous();
                        peer.rebuild_session(pc, secret);
                    }
                    if before.endpoint != pc.endpoint {
                        if let Some(ep) = pc.endpoint {
                            peer.set_endpoint(ep);
                        }
                    }
                    peer.clone()
                }
                _ => {
                    let index = fresh_index(&*self.indices, &old.by_index, &by_index);
                    let predecessor = effects
                        .successors
                        .iter()
                        .filter(|(_, new)| *new == pc.public_key)
                        .filter(|(gone, _)| next.peer(gone).is_none())
                        .find_map(|(gone, _)| old.by_key.get(gone));
                    match predecessor {
                        Some(old_peer) if !identity_changed => {
                            initiate.push(pc.public_key);
                            Arc::new(Peer::successor(
                                pc,
                                index,
                                &self.session_indices,
                                secret,
                                old_peer,
                                now,
                            ))
                        }
                        _ => Arc::new(Peer::new(pc, index, &self.session_indices, secret)),
                    }
                }
            };
            let position = peers.len() as u32;
            for net in &pc.allowed_ips {
                routes.insert(*net, position);
            }
            peers.push(peer.clone());
            by_index.insert(peer.index, peer.clone());
            if let Some(previous) = peer.previous() {
                by_index.insert(previous.peer.index, peer.clone());
                if previous.peer.public_key != pc.public_key {
                    retiring.insert(previous.peer.public_key, peer.clone());
                }
            }
            by_key.insert(pc.public_key, peer);
        }
        for (key, ep) in &effects.endpoints {
            if let Some(peer) = by_key.get(key) {
                peer.set_endpoint(*ep);
            }
        }
        let state = Arc::new(State {
            config: next,
            identity,
            by_key,
            by_index,
            peers,
            routes,
            retiring,
        });
        *self.state.write() = state.clone();
        self.generation.fetch_add(1, Ordering::Release);

        let mut buf = vec![0u8; 256];
        for key in &effects.keepalive_started {
            if let Some(peer) = state.by_key.get(key) {
                self.send_keepalive(peer, &mut buf, out);
            }
        }
        // A peer's new key: shake hands under it now, while the previous session still
        // carries the traffic, so the switch happens before anything waits for it.
        for key in &initiate {
            if let Some(peer) = state.by_key.get(key) {
                let mut guard = peer.tunn.lock();
                if let Some(tunn) = guard.as_mut() {
                    if let TunnResult::WriteToNetwork(init) =
                        tunn.format_handshake_initiation(&mut buf, false)
                    {
                        self.send_to_peer(peer, init, out);
                    }
                }
            }
        }
    }

    /// A keepalive now (or a handshake initiation when there is no session yet).
    fn send_keepalive(&self, peer: &Peer, buf: &mut [u8], out: &dyn Transmit) {
        let mut guard = peer.tunn.lock();
        if let Some(tunn) = guard.as_mut() {
            if let TunnResult::WriteToNetwork(data) = tunn.encapsulate(&[], buf) {
                self.send_to_peer(peer, data, out);
            }
        }
    }

    /// What `wg show` reports: the configuration plus each peer's live endpoint and counters.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let state = self.state();
        let peers = state
            .config
            .peers
            .iter()
            .filter_map(|pc| {
                let live = state.by_key.get(&pc.public_key)?;
                Some(PeerSnapshot {
                    public_key: pc.public_key,
                    preshared_key: pc.preshared_key,
                    endpoint: live.endpoint(),
                    last_handshake: live.last_handshake(),
                    tx_bytes: live.tx_bytes(),
                    rx_bytes: live.rx_bytes(),
                    persistent_keepalive: pc.persistent_keepalive,
                    allowed_ips: pc.allowed_ips.clone(),
                })
            })
            .collect();
        DeviceSnapshot {
            private_key: state.config.private_key,
            listen_port: state.config.listen_port,
            fwmark: state.config.fwmark,
            peers,
        }
    }

    /// A packet read from the TUN device: encrypt it for the peer that owns its destination
    /// and send it.
    pub fn handle_outbound(&self, packet: &[u8], buf: &mut [u8], out: &dyn Transmit) {
        let burst = self.burst();
        if let Some(sealed) = self.seal(&burst, packet, buf, out) {
            if let Err(e) = out.send(sealed.to, &buf[..sealed.len]) {
                tracing::debug!(endpoint = %sealed.to, error = %e, "send failed");
                self.drops.record(DropReason::IoError);
            }
        }
    }

    /// Encrypts `packet`, padded, for the peer that owns its destination into the start of
    /// `dst` (at least [`Engine::sealed_len`] bytes) and says where that datagram goes;
    /// sending it is the caller's, so a batch can leave in one system call. Its bytes count
    /// as sent here. With no session yet the packet is queued and the handshake initiation
    /// leaves through `out` at once (`None`).
    pub fn seal(
        &self,
        burst: &Burst,
        packet: &[u8],
        dst: &mut [u8],
        out: &dyn Transmit,
    ) -> Option<Sealed> {
        let plan = self.seal_plan(burst, packet, dst.len())?;
        let session: &Peer = plan.via.as_deref().unwrap_or(plan.peer);
        let mut guard = session.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            self.drops.record(DropReason::NoRoute);
            return None;
        };
        let result = encapsulate_padded(tunn, packet, plan.padded, plan.clamp, dst);
        self.sealed(plan.peer, session, result, guard, out)
    }

    /// Which peer and session seal `packet`, padded to what and clamped to what, into a
    /// destination of `room` bytes: the in-order part of sealing both paths share.
    fn seal_plan<'b>(&self, burst: &'b Burst, packet: &[u8], room: usize) -> Option<Plan<'b>> {
        let Some(dst_addr) = Tunn::dst_address(packet) else {
            self.drops.record(DropReason::Malformed);
            return None;
        };
        let Some(peer) = burst.route(&burst.out_route, dst_addr) else {
            self.drops.record(DropReason::NoRoute);
            return None;
        };
        let state = &burst.state;
        let endpoints = || state.peers.iter().filter_map(|p| p.endpoint());
        if loopguard::is_own_datagram(packet, state.config.listen_port, endpoints()) {
            self.drops.record(DropReason::RoutingLoop);
            return None;
        }
        // During a rotation the packet leaves on whichever session is up, newest first.
        let via = if peer.is_retiring() {
            peer.previous()
                .filter(|p| sender(peer.has_session(), p.peer.has_session()) == Slot::Previous)
                .map(|p| p.peer)
        } else {
            None
        };
        // boringtun panics on a destination too short for the sealed packet.
        if packet.len() + DATA_OVERHEAD > room {
            self.drops.record(DropReason::TooBig);
            return None;
        }
        // Padding stops at the MTU toward this peer: its path MTU when one is known (the
        // agent lowers the route to it to that), else the device's. Padding to the device's
        // MTU would push a packet that fits the lower route past what the path carries.
        let padded = padded_len(packet.len(), usize::from(self.clamp_mtu(peer)));
        // Never past `dst`: unpadded is still valid.
        let padded = padded
            .min(room.saturating_sub(DATA_OVERHEAD))
            .max(packet.len());
        let clamp = Some(self.clamp_mtu(peer)).filter(|m| *m != 0 && mss::needs_clamp(packet, *m));
        Some(Plan {
            peer,
            via,
            padded,
            clamp,
        })
    }

    /// What `encapsulate` gave, for `peer` through `session` (whose lock `guard` is).
    fn sealed(
        &self,
        peer: &Peer,
        session: &Peer,
        result: TunnResult<'_>,
        guard: parking_lot::MutexGuard<'_, Option<Tunn>>,
        out: &dyn Transmit,
    ) -> Option<Sealed> {
        match result {
            TunnResult::WriteToNetwork(data) if data.first() == Some(&DATA_TYPE) => {
                let len = data.len();
                drop(guard);
                let Some(to) = peer.endpoint() else {
                    self.drops.record(DropReason::NoEndpoint);
                    return None;
                };
                peer.add_tx(len);
                Some(Sealed { to, len })
            }
            TunnResult::WriteToNetwork(handshake) => {
                self.send_via(peer, session, handshake, out);
                None
            }
            TunnResult::Err(e) => {
                tracing::debug!(error = ?e, "encapsulate failed");
                None
            }
            _ => None,
        }
    }

    /// [`Engine::seal`] into `batch` with the encryption left to the workers: the counter
    /// is reserved and the padded (and clamped) plaintext placed in the batch now, in
    /// order; `jobs` seals it in place before the batch is flushed (run it first). With no
    /// session, or one at its message limit, the packet goes through [`Engine::seal`]'s
    /// path (queued behind a handshake, or sealed here). The caller has made room for
    /// [`Engine::sealed_len`] bytes in `batch`. True when a datagram joined the batch.
    pub fn seal_deferred(
        &self,
        burst: &Burst,
        packet: &[u8],
        batch: &mut OutBatch,
        jobs: &mut SealJobs,
        out: &dyn Transmit,
    ) -> bool {
        self.seal_deferred_from(burst, Plain::Apart(packet), batch, jobs, out)
    }

    /// [`Engine::seal_deferred`] for a packet already in `batch`: `len` bytes at
    /// [`DATA_PLAINTEXT_AT`] past [`OutBatch::offset`], where the GSO split built it
    /// ([`crate::offload::gso::Segments`]), so it is sealed where it lies, never copied.
    pub fn seal_placed(
        &self,
        burst: &Burst,
        len: usize,
        batch: &mut OutBatch,
        jobs: &mut SealJobs,
        out: &dyn Transmit,
    ) -> bool {
        self.seal_deferred_from(burst, Plain::Placed(len), batch, jobs, out)
    }

    fn seal_deferred_from(
        &self,
        burst: &Burst,
        plain: Plain<'_>,
        batch: &mut OutBatch,
        jobs: &mut SealJobs,
        out: &dyn Transmit,
    ) -> bool {
        let start = batch.offset();
        let Some(free) = batch.space(0) else {
            return false;
        };
        let room = free.len();
        let packet = match plain {
            Plain::Apart(p) => Some(p),
            Plain::Placed(len) => free.get(DATA_PLAINTEXT_AT..DATA_PLAINTEXT_AT + len),
        };
        let Some(plan) = packet.and_then(|p| self.seal_plan(burst, p, room)) else {
            if packet.is_none() {
                self.drops.record(DropReason::Malformed);
            }
            return false;
        };
        let session: &Peer = plan.via.as_deref().unwrap_or(plan.peer);
        let mut guard = session.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            self.drops.record(DropReason::NoRoute);
            return false;
        };
        let Some(space) = batch.space(plan.padded + DATA_OVERHEAD) else {
            return false;
        };
        let reserved = match (plan.peer.endpoint(), jobs.has_room()) {
            (Some(to), true) => tunn
                .reserve_seal(1, plan.padded)
                .map(|(index, counter)| (to, index, counter)),
            _ => None,
        };
        let Some((to, receiver_index, counter)) = reserved else {
            let result = match plain {
                Plain::Apart(packet) => {
                    encapsulate_padded(tunn, packet, plan.padded, plan.clamp, space)
                }
                // `encapsulate` writes where the packet lies: seal (or queue) a copy.
                Plain::Placed(len) => PLACED.with(|copy| {
                    let mut copy = copy.borrow_mut();
                    let at = DATA_PLAINTEXT_AT;
                    copy[..len].copy_from_slice(&space[at..at + len]);
                    encapsulate_padded(tunn, &copy[..len], plan.padded, plan.clamp, space)
                }),
            };
            return match self.sealed(plan.peer, session, result, guard, out) {
                Some(sealed) => {
                    batch.commit(sealed.to, sealed.len);
                    true
                }
                None => false,
            };
        };
        let padded = &mut space[DATA_PLAINTEXT_AT..DATA_PLAINTEXT_AT + plan.padded];
        let len = match plain {
            Plain::Apart(packet) => {
                padded[..packet.len()].copy_from_slice(packet);
                packet.len()
            }
            Plain::Placed(len) => len,
        };
        padded[len..].fill(0);
        if let Some(path_mtu) = plan.clamp {
            mss::clamp(&mut padded[..len], path_mtu);
        }
        let id = session as *const Peer as usize;
        let tunn = &*tunn;
        if !jobs.push(start, plan.padded, (id, receiver_index, counter), || {
            tunn.seal_key()
        }) {
            // The counter is spent unused: a gap the receiver's window accepts.
            self.drops.record(DropReason::NoRoute);
            return false;
        }
        drop(guard);
        let len = plan.padded + DATA_OVERHEAD;
        batch.commit(to, len);
        plan.peer.add_tx(len);
        true
    }

    /// The in-order first step of opening a batch with the workers: a data message at
    /// `span` of the receive buffer `buf` passes the replay check of its session and joins
    /// `jobs`. Anything else (handshakes, cookies, malformed: [`Queued::NotData`]) goes
    /// through [`Engine::open`] — after the jobs queued so far are opened and committed,
    /// since a handshake can replace the sessions they are for.
    pub fn open_queue(
        &self,
        burst: &Burst,
        buf: &[u8],
        span: Range<usize>,
        jobs: &mut OpenJobs,
    ) -> Queued {
        let Some(datagram) = buf.get(span.clone()) else {
            return Queued::NotData;
        };
        if datagram.first() != Some(&DATA_TYPE) || !jobs.has_room() {
            return Queued::NotData;
        }
        let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(datagram) else {
            return Queued::NotData;
        };
        let Some((peer, via)) = self.by_index(&burst.state, p.receiver_idx) else {
            return Queued::Refused;
        };
        let session: &Peer = via.as_deref().unwrap_or(peer);
        let guard = session.tunn.lock();
        let Some(tunn) = guard.as_ref() else {
            self.drops.record(DropReason::UnknownPeer);
            return Queued::Refused;
        };
        if let Err(e) = tunn.open_check(&p) {
            self.drops.record(reason_for(&e));
            return Queued::Refused;
        }
        let (index, counter) = (p.receiver_idx, p.counter());
        if jobs.push(span, index, counter, || tunn.open_key(index)) {
            Queued::Queued
        } else {
            self.drops.record(DropReason::UnknownIndex);
            Queued::Refused
        }
    }

    /// The in-order last step for a message [`OpenJobs`] opened in `buf`, received from
    /// `from`: its counter marked, timers run, then what [`Engine::open`] checks after
    /// decryption (cryptokey routing, MSS clamping). The packet to write to the TUN, as a
    /// range of `buf` (after its 16 bytes of header room), when it passes.
    pub fn open_commit(
        &self,
        burst: &Burst,
        from: SocketAddr,
        opened: Opened,
        buf: &mut [u8],
    ) -> Option<Range<usize>> {
        let n = match opened.result {
            Ok(n) => n,
            Err(e) => {
                self.drops.record(reason_for(&e));
                return None;
            }
        };
        let (peer, via) = self.by_index(&burst.state, opened.receiver_idx)?;
        let session: &Peer = via.as_deref().unwrap_or(peer);
        let at = opened.start + DATA_PLAINTEXT_AT;
        let plain = buf.get_mut(at..at + n)?;
        let mut guard = session.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            self.drops.record(DropReason::UnknownPeer);
            return None;
        };
        let wire_len = n + DATA_OVERHEAD;
        let (len, src) = match tunn.open_commit(opened.receiver_idx, opened.counter, plain) {
            TunnResult::WriteToTunnelV4(p, src) => (p.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(p, src) => (p.len(), IpAddr::V6(src)),
            TunnResult::Done => {
                // A keepalive: it authenticated, so it counts and the peer may have roamed.
                peer.add_rx(wire_len);
                peer.set_endpoint(from);
                return None;
            }
            TunnResult::Err(e) => {
                self.drops.record(reason_for(&e));
                return None;
            }
            TunnResult::WriteToNetwork(_) => return None,
        };
        drop(guard);
        if !self.admit(burst, peer, src, from, wire_len) {
            return None;
        }
        let path_mtu = self.clamp_mtu(peer);
        if path_mtu != 0 {
            mss::clamp(&mut buf[at..at + len], path_mtu);
        }
        Some(at..at + len)
    }

    /// A datagram received on the UDP socket from `from`: decrypt it and write the packet
    /// to the TUN.
    pub fn handle_inbound(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        out: &dyn Transmit,
    ) {
        let burst = self.burst();
        if let Some(len) = self.open(&burst, from, datagram, buf, out) {
            if out.write_tun(&buf[..len]).is_err() {
                self.drops.record(DropReason::IoError);
            }
        }
    }

    /// Decrypts `datagram` from `from` into `dst` and returns the length of the packet now
    /// at the start of `dst`, for the caller to write to the TUN (alone or coalesced) —
    /// only when it authenticated and its source is inside the sender's allowed IPs.
    /// Handshake replies and the packets a completed handshake releases leave through `out`.
    pub fn open(
        &self,
        burst: &Burst,
        from: SocketAddr,
        datagram: &[u8],
        dst: &mut [u8],
        out: &dyn Transmit,
    ) -> Option<usize> {
        let state = &burst.state;
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => {
                self.drops.record(DropReason::Malformed);
                return None;
            }
        };
        let found = match &packet {
            Packet::HandshakeInit(init) => self.initiator(state, from, datagram, init, dst, out),
            Packet::HandshakeResponse(p) => self.by_index(state, p.receiver_idx),
            Packet::PacketCookieReply(p) => self.by_index(state, p.receiver_idx),
            Packet::PacketData(p) => self.by_index(state, p.receiver_idx),
        };
        let (peer, via) = found?;
        let session: &Peer = via.as_deref().unwrap_or(peer);
        let is_cookie = matches!(packet, Packet::PacketCookieReply(_));

        let mut guard = session.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            self.drops.record(DropReason::UnknownPeer);
            return None;
        };
        let base = dst.as_ptr() as usize;
        let (inner, src) = match tunn.decapsulate(Some(from.ip()), datagram, dst) {
            TunnResult::Done => {
                if !is_cookie {
                    peer.add_rx(datagram.len());
                    peer.set_endpoint(from);
                }
                return None;
            }
            TunnResult::Err(e) => {
                self.drops.record(reason_for(&e));
                return None;
            }
            TunnResult::WriteToNetwork(reply) => {
                if reply.first() == Some(&COOKIE_REPLY_TYPE) {
                    // The peer's own limiter is shedding load: it answered with a cookie.
                    let _ = out.send(from, reply);
                    self.drops.record(DropReason::UnderLoad);
                    return None;
                }
                peer.add_rx(datagram.len());
                peer.set_endpoint(from);
                self.send_via(peer, session, reply, out);
                // A completed handshake releases the packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], dst) {
                    self.send_via(peer, session, queued, out);
                }
                return None;
            }
            TunnResult::WriteToTunnelV4(inner, src) => (inner, IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(inner, src) => (inner, IpAddr::V6(src)),
        };
        let (offset, len) = (inner.as_ptr() as usize - base, inner.len());
        drop(guard);
        if offset != 0 {
            // boringtun decrypts to the start of the buffer; keep the promise if it ever moves.
            dst.copy_within(offset..offset + len, 0);
        }
        if !self.admit(burst, peer, src, from, datagram.len()) {
            return None;
        }
        let path_mtu = self.clamp_mtu(peer);
        if path_mtu != 0 {
            mss::clamp(&mut dst[..len], path_mtu);
        }
        Some(len)
    }

    /// The peer a handshake initiation comes from, after the MAC checks and load shedding,
    /// and before any Diffie-Hellman work beyond identifying the sender. Under load (more
    /// than 100 initiations a second device-wide) an initiation needs a valid cookie, else
    /// it gets a cookie reply, and then must fit its source address's token bucket — the
    /// kernel's and wireguard-go's order, so a source answering cookies cannot take every
    /// handshake (and the packet thread's time) for itself.
    fn initiator<'s>(
        &self,
        state: &'s State,
        from: SocketAddr,
        datagram: &[u8],
        init: &HandshakeInit,
        buf: &mut [u8],
        out: &dyn Transmit,
    ) -> Option<(&'s Arc<Peer>, Option<Arc<Peer>>)> {
        let Some(current) = &state.identity else {
            self.drops.record(DropReason::UnknownPeer);
            return None;
        };
        // MAC1 first: garbage neither costs a lock nor counts towards the load. MAC1 is
        // keyed by the responder's public key, so it also says which of our keys (current
        // or, during a rotation, previous) the initiator addressed.
        let previous_id;
        let (id, ours_previous) = if current.cookies.check_mac1(datagram) {
            (current, false)
        } else {
            previous_id = self.previous_identity.read().clone();
            match &previous_id {
                Some(p) if p.cookies.check_mac1(datagram) => (p, true),
                _ => {
                    self.drops.record(DropReason::HandshakeRejected);
                    return None;
                }
            }
        };
        let now = self.clock.now();
        // One device, one load: the current key's limiter counts every initiation.
        if current.limiter.lock().arrive(now) {
            match id.cookies.check_mac2(datagram, from, now, buf) {
                Mac2::Valid => {}
                Mac2::Reply => {
                    let _ = out.send(from, &buf[..COOKIE_REPLY_LEN]);
                    self.drops.record(DropReason::UnderLoad);
                    return None;
                }
                Mac2::Invalid => {
                    self.drops.record(DropReason::HandshakeRejected);
                    return None;
                }
            }
            if !current.limiter.lock().allow(from.ip(), now) {
                self.drops.record(DropReason::RateLimited);
                return None;
            }
        }
        let Ok(half) = parse_handshake_anon(&id.secret, &id.public, init) else {
            self.drops.record(DropReason::HandshakeRejected);
            return None;
        };
        let initiator = Key(half.peer_static_public);
        // Which session answers: ours previous key → the peer's previous session; a peer's
        // old key (it rotated, we know the new one) → its previous session; else current.
        let found = match (ours_previous, state.by_key.get(&initiator)) {
            (false, Some(peer)) => Some((peer, None)),
            (true, Some(peer)) => peer.previous().map(|p| (peer, Some(p.peer))),
            (false, None) => state.retiring.get(&initiator).and_then(|peer| {
                let previous = peer.previous().filter(|p| p.peer.public_key == initiator)?;
                Some((peer, Some(previous.peer)))
            }),
            (true, None) => None,
        };
        if found.is_none() {
            self.drops.record(DropReason::UnknownPeer);
        }
        found
    }

    /// The peer a datagram's receiver index names, and its previous session when the index
    /// is that session's.
    fn by_index<'s>(
        &self,
        state: &'s State,
        receiver_idx: u32,
    ) -> Option<(&'s Arc<Peer>, Option<Arc<Peer>>)> {
        let index = self.session_indices.open(receiver_idx) >> 8;
        let found = state.by_index.get(&index).and_then(|peer| {
            if peer.index == index {
                return Some((peer, None));
            }
            let previous = peer.previous().filter(|p| p.peer.index == index)?;
            Some((peer, Some(previous.peer)))
        });
        if found.is_none() {
            self.drops.record(DropReason::UnknownIndex);
        }
        found
    }

    /// Cryptokey routing on receive: only sources inside the sender's allowed IPs pass.
    fn admit(
        &self,
        burst: &Burst,
        peer: &Arc<Peer>,
        src: IpAddr,
        from: SocketAddr,
        wire_len: usize,
    ) -> bool {
        // The datagram authenticated, so it counts and the peer may have roamed.
        peer.add_rx(wire_len);
        peer.set_endpoint(from);
        match burst.route(&burst.in_route, src) {
            Some(owner) if Arc::ptr_eq(owner, peer) => true,
            _ => {
                self.drops.record(DropReason::SourceNotAllowed);
                false
            }
        }
    }

    fn send_to_peer(&self, peer: &Peer, data: &[u8], out: &dyn Transmit) {
        self.send_via(peer, peer, data, out);
    }

    /// Sends what `session` (the peer's current session or its previous) produced to
    /// `peer`'s endpoint; the retry jitter is the session's, the counters the peer's.
    fn send_via(&self, peer: &Peer, session: &Peer, data: &[u8], out: &dyn Transmit) {
        if data.first() == Some(&INITIATION_TYPE) {
            let jitter = u64::from(self.indices.next_u32()) % (RETRY_JITTER_MAX_MS + 1);
            *session.last_initiation.lock() =
                Some((self.clock.now(), Duration::from_millis(jitter)));
        }
        let Some(endpoint) = peer.endpoint() else {
            self.drops.record(DropReason::NoEndpoint);
            return;
        };
        match out.send(endpoint, data) {
            Ok(()) => peer.add_tx(data.len()),
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "send failed");
                self.drops.record(DropReason::IoError);
            }
        }
    }

    /// Drives handshake retries, rekeys, keepalives and session expiry; call every ~100 ms.
    pub fn tick(&self, buf: &mut [u8], out: &dyn Transmit) {
        let state = self.state();
        if let Some(id) = &state.identity {
            id.limiter.lock().collect(self.clock.now());
        }
        let now = self.clock.now();
        for peer in state.by_key.values() {
            let current_age = self.tick_session(peer, peer, now, buf, out);
            let Some(previous) = peer.previous() else {
                continue;
            };
            let held = now.saturating_duration_since(previous.since);
            if drop_previous(held, previous.peer.has_session(), current_age) {
                tracing::debug!(peer = %peer.public_key.to_base64(), held_ms = held.as_millis() as u64, "previous session retired");
                peer.clear_previous();
                continue;
            }
            self.tick_session(peer, &previous.peer, now, buf, out);
        }
    }

    /// One session's timers; returns the age of its current session, if it has one.
    fn tick_session(
        &self,
        peer: &Peer,
        session: &Peer,
        now: Instant,
        buf: &mut [u8],
        out: &dyn Transmit,
    ) -> Option<Duration> {
        let mut guard = session.tunn.lock();
        let tunn = guard.as_mut()?;
        let age = tunn.time_since_last_handshake();
        let last_initiation = *session.last_initiation.lock();
        if hold_retry(now, last_initiation, age) {
            return age;
        }
        match tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(data) => self.send_via(peer, session, data, out),
            TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
            TunnResult::Err(e) => tracing::debug!(error = ?e, "timer update failed"),
            _ => {}
        }
        age
    }
}

/// Which of a rotating peer's two sessions seals a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Current,
    Previous,
}

/// The newest session that is up sends; with neither up, the current one (it queues the
/// packet and initiates). So the switch to a new key happens exactly when its session is
/// established, never before: a packet is never queued behind a handshake the other side
/// cannot answer yet.
pub(crate) fn sender(current_up: bool, previous_up: bool) -> Slot {
    if !current_up && previous_up {
        Slot::Previous
    } else {
        Slot::Current
    }
}

/// How long a previous session stays after the new one is up, for datagrams sealed on it
/// just before the switch that arrive after (reordering, queues on the path).
pub(crate) const PREVIOUS_LINGER: Duration = Duration::from_secs(5);

/// Whether the timer drops a peer's previous session, `held` after it became previous:
/// once the new session has been up for [`PREVIOUS_LINGER`]; at once when the previous has
/// no session to offer (after the same linger, for a handshake in flight); and at the
/// latest after REJECT_AFTER_TIME, when its keys would be refused anyway.
pub(crate) fn drop_previous(
    held: Duration,
    previous_up: bool,
    current_age: Option<Duration>,
) -> bool {
    held >= REJECT_AFTER_TIME
        || (!previous_up && held >= PREVIOUS_LINGER)
        || current_age.is_some_and(|age| age >= PREVIOUS_LINGER)
}

/// A handshake initiation is retried REKEY_TIMEOUT after the previous one.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// The retry jitter's upper bound: "some random value between 0 and 333 ms" (whitepaper
/// §6.1; the kernel's `REKEY_TIMEOUT_JITTER_MAX_JIFFIES` is HZ / 3).
const RETRY_JITTER_MAX_MS: u64 = 333;

/// Sessions are not used past this age (whitepaper §6.2).
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

/// Whether the timer tick leaves a peer alone this time, to jitter its handshake retry.
///
/// boringtun retries an unanswered initiation exactly REKEY_TIMEOUT after it
/// (`timers.rs:228`; its comment promises a jitter it never adds), so two peers that
/// initiate at once stay in lockstep. It offers no way to delay the retry alone, so the
/// engine skips the peer's `update_timers` from REKEY_TIMEOUT after the last initiation
/// until the jitter drawn for it has passed: the retry leaves 5 s + jitter after the
/// previous one (quantised to the 100 ms tick). The peer's other timers wait at most
/// 333 ms once per retry — except session expiry: when the newest session is within a
/// second of REJECT_AFTER_TIME the tick is never skipped (the current session is at least
/// that old), so no data outlives its session.
pub(crate) fn hold_retry(
    now: Instant,
    last_initiation: Option<(Instant, Duration)>,
    since_handshake: Option<Duration>,
) -> bool {
    let Some((sent, jitter)) = last_initiation else {
        return false;
    };
    let due = sent + REKEY_TIMEOUT;
    let in_window = now >= due && now < due + jitter;
    let near_expiry =
        since_handshake.is_some_and(|age| age + Duration::from_secs(1) >= REJECT_AFTER_TIME);
    in_window && !near_expiry
}

/// `tunn.encapsulate` of `packet` followed by zeros up to `padded` bytes; the receiver
/// trims them by the IP header's length (boringtun's `validate_decapsulated_packet` does).
/// With `clamp`, the copy's TCP MSS is lowered to that path MTU first (the packet itself
/// is not ours to change).
fn encapsulate_padded<'a>(
    tunn: &mut Tunn,
    packet: &[u8],
    padded: usize,
    clamp: Option<u16>,
    dst: &'a mut [u8],
) -> TunnResult<'a> {
    if padded <= packet.len() && clamp.is_none() {
        return tunn.encapsulate(packet, dst);
    }
    PADDED.with(move |scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch[..packet.len()].copy_from_slice(packet);
        scratch[packet.len()..padded].fill(0);
        if let Some(path_mtu) = clamp {
            mss::clamp(&mut scratch[..packet.len()], path_mtu);
        }
        tunn.encapsulate(&scratch[..padded.max(packet.len())], dst)
    })
}

fn reason_for(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::InvalidMac
        | WireGuardError::WrongKey
        | WireGuardError::WrongIndex
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::UnexpectedPacket => DropReason::HandshakeRejected,
        WireGuardError::IncorrectPacketLength
        | WireGuardError::InvalidPacket
        | WireGuardError::WrongPacketType => DropReason::Malformed,
        _ => DropReason::DecryptFailed,
    }
}

/// A random 24-bit receiver index not used by the old or the new peer set, so a datagram
/// for a removed peer can never reach its successor.
fn fresh_index(indices: &dyn IndexSource, old: &IndexMap, new: &IndexMap) -> u32 {
    loop {
        let index = indices.next_u32() & 0x00ff_ffff;
        if !old.contains_key(&index) && !new.contains_key(&index) {
            return index;
        }
    }
}
