// isthmus patch 10: data messages sealed and opened in steps, so the AEAD can run on other
// threads while what must happen in order (counter reservation, replay marking, timers)
// happens under the caller's lock on the `Tunn`. `encapsulate` and `decapsulate` are
// unchanged; these are their data-message paths cut in three.
//
// Sealing: `Tunn::reserve_seal` (+ `Tunn::seal_key` once per session and batch; in order,
// `&mut Tunn`) -> `SealKey::seal_in_place` (any thread). Opening: `Tunn::open_check` (+
// `Tunn::open_key`; in order, `&Tunn`) -> `OpenKey::open_in_place` (any thread) ->
// `Tunn::open_commit` (in arrival order, `&mut Tunn`).

use super::errors::WireGuardError;
use super::session::REJECT_AFTER_MESSAGES;
use super::timers::TimerName;
use super::{PacketData, Tunn, TunnResult, DATA, N_SESSIONS};
use ring::aead::{Aad, LessSafeKey, Nonce};

/// Type, receiver index and counter before the ciphertext.
const HEADER: usize = 16;
const TAG: usize = 16;


fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// One session's sending key and the peer's index, for counters reserved with
/// [`Tunn::reserve_seal`]. Sealing twice under one counter breaks the cipher: use each
/// reserved counter once.
#[derive(Clone)]
pub struct SealKey {
    key: LessSafeKey,
    receiver_index: u32,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "SealKey(->{})", self.receiver_index)
    }
}

impl SealKey {
    /// The peer's receiver index this key's messages carry (one per session).
    pub fn receiver_index(&self) -> u32 {
        self.receiver_index
    }

    /// Seals the `len` plaintext bytes at `buf[16..16 + len]` in place as the data message
    /// with `counter`: writes the header before them and the tag after; returns the
    /// message's length, `len + 32`. `None` if `buf` is shorter than that.
    pub fn seal_in_place(&self, counter: u64, buf: &mut [u8], len: usize) -> Option<usize> {
        let total = HEADER + len + TAG;
        let buf = buf.get_mut(..total)?;
        buf[..4].copy_from_slice(&DATA.to_le_bytes());
        buf[4..8].copy_from_slice(&self.receiver_index.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
        let (data, tag_room) = buf[HEADER..].split_at_mut(len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), data)
            .ok()?;
        tag_room.copy_from_slice(tag.as_ref());
        Some(total)
    }
}

/// One session's receiving key, for data messages that passed [`Tunn::open_check`].
#[derive(Clone)]
pub struct OpenKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for OpenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("OpenKey")
    }
}

impl OpenKey {
    /// Decrypts the data message `datagram` (header included) in place: the plaintext
    /// lands at `datagram[16..16 + n]`; returns `n`. Marks nothing: the message counts as
    /// received only through [`Tunn::open_commit`].
    pub fn open_in_place(&self, datagram: &mut [u8]) -> Result<usize, WireGuardError> {
        if datagram.len() < HEADER + TAG {
            return Err(WireGuardError::InvalidPacket);
        }
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&datagram[8..16]);
        let counter = u64::from_le_bytes(counter);
        self.key
            .open_in_place(nonce(counter), Aad::empty(), &mut datagram[HEADER..])
            .map(|plain| plain.len())
            .map_err(|_| WireGuardError::InvalidAeadTag)
    }
}

impl Tunn {
    /// What [`Tunn::encapsulate`] does for `n` data packets of `bytes` bytes in all, short of
    /// encrypting them: reserves `n` consecutive counters on the current session and runs
    /// the send timers; returns the peer's receiver index the messages carry (it names the
    /// session: [`Tunn::seal_key`] gives its key) and the first counter. `None` with no
    /// usable session: then `encapsulate` queues the packet and initiates, as before.
    pub fn reserve_seal(&mut self, n: u64, bytes: usize) -> Option<(u32, u64)> {
        let session = self.sessions[self.current % N_SESSIONS].as_ref()?;
        // isthmus patch 5 on this path: no message at or past the reject limit, and a batch
        // that would cross it reserves nothing (under `&mut self`, nothing else reserves).
        if session.sending_counter().checked_add(n)? > REJECT_AFTER_MESSAGES {
            return None;
        }
        let (first, receiver_index) = session.reserve_sending(n);
        self.timer_tick(TimerName::TimeLastPacketSent);
        if bytes > 0 {
            self.timer_tick(TimerName::TimeLastDataPacketSent);
        }
        self.tx_bytes += bytes;
        Some((receiver_index, first))
    }

    /// The current session's sending key, for the counters [`Tunn::reserve_seal`] gave
    /// (call it under the same lock). A copy of the key: callers keep one per session and
    /// batch, not one per packet.
    pub fn seal_key(&self) -> Option<SealKey> {
        let session = self.sessions[self.current % N_SESSIONS].as_ref()?;
        Some(SealKey {
            key: session.sending_key(),
            receiver_index: session.sending_index(),
        })
    }

    /// The first step of opening the data message `p`: the replay check of its counter on
    /// the session its receiver index names, before any decryption (as in
    /// [`Tunn::decapsulate`]).
    pub fn open_check(&self, p: &PacketData) -> Result<(), WireGuardError> {
        let session = self.sessions[p.receiver_idx as usize % N_SESSIONS]
            .as_ref()
            .ok_or(WireGuardError::NoCurrentSession)?;
        if session.receiving_index != p.receiver_idx {
            return Err(WireGuardError::WrongIndex);
        }
        session.receiving_check(p.counter)
    }

    /// The receiving key of the session with our index `receiver_idx`, for messages that
    /// passed [`Tunn::open_check`]. A copy: callers keep one per session and batch.
    pub fn open_key(&self, receiver_idx: u32) -> Option<OpenKey> {
        let session = self.sessions[receiver_idx as usize % N_SESSIONS].as_ref()?;
        (session.receiving_index == receiver_idx).then(|| OpenKey {
            key: session.receiving_key(),
        })
    }

    /// The last step, in arrival order, for a message that decrypted to `plaintext` with
    /// the key [`Tunn::open_key`] gave for `receiver_idx`: marks `counter` received
    /// (refusing a duplicate that raced through the first step), moves to that session
    /// and runs the receive timers, then checks the packet as [`Tunn::decapsulate`] does:
    /// `WriteToTunnelV4`/`V6` with the packet trimmed to its IP length, `Done` for a
    /// keepalive. A session replaced between the steps refuses (`WrongIndex`).
    pub fn open_commit<'a>(
        &mut self,
        receiver_idx: u32,
        counter: u64,
        plaintext: &'a mut [u8],
    ) -> TunnResult<'a> {
        let r_idx = receiver_idx as usize;
        let Some(session) = self.sessions[r_idx % N_SESSIONS].as_ref() else {
            return TunnResult::Err(WireGuardError::NoCurrentSession);
        };
        if session.receiving_index != receiver_idx {
            return TunnResult::Err(WireGuardError::WrongIndex);
        }
        if let Err(e) = session.receiving_mark(counter) {
            return TunnResult::Err(e);
        }
        self.set_current_session(r_idx);
        self.timer_tick(TimerName::TimeLastPacketReceived);
        self.validate_decapsulated_packet(plaintext)
    }
}

impl PacketData<'_> {
    /// The message's counter (its nonce).
    pub fn counter(&self) -> u64 {
        self.counter
    }
}
