//! Key rotation, the decision: when to start using a new key, and when the old one may go.
//!
//! The node key moves K1 → K2 in three steps, none of which loses a packet:
//!
//! 1. K2 is written to `private.key.next` (durably) — by `isthmus-agent rotate-key`, by the
//!    schedule (`--key-rotation-interval`), or because `private.key` vanished.
//! 2. **Begin**: the tunnel answers both keys (every peer keeps its K1 session, which goes on
//!    carrying traffic) and K2 is published. Each peer, seeing the key change, keeps its
//!    old session too and initiates under K2 at once; both sides move their traffic to
//!    the new session the moment it is up.
//! 3. **Retire**: once no peer still holds a previous session (the engine drops each one a
//!    few seconds after the new one is up), or after [`GRACE`] at the latest, K2 becomes
//!    `private.key` and K1 is forgotten.
//!
//! Pure: the files, the engine's count and the clock come in; [`Step`] goes out.

use std::time::{Duration, Instant};

use isthmus_wg::key::Key;

use super::keys::KeyFiles;

/// The longest the old key is answered: WireGuard's REJECT_AFTER_TIME (180 s, after which
/// a session under it would be refused anyway) plus a margin. A peer that has not moved by
/// then (its agent down, the API unreachable) handshakes under the new key when it does.
pub const GRACE: Duration = Duration::from_secs(190);

/// The node key as the running agent uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The key in use: the tunnel's, and the one published.
    pub key: Key,
    /// When `key` came into use (agent start or the last retirement): the schedule's clock.
    pub since: Instant,
    /// During a rotation: the key being retired and when the rotation began.
    pub retiring: Option<(Key, Instant)>,
}

/// Why a new key is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// `--key-rotation-interval` passed since the key came into use.
    Scheduled,
    /// `private.key` is gone (or holds another key) while the agent runs on its key.
    KeyFileLost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// Make a key and write it to the next file; the next step begins with it.
    Generate(Why),
    /// Answer both keys and publish this one.
    Begin(Key),
    /// Make the key in use the node key and forget the old one.
    Retire,
}

/// The next step, given the key in use, what the state directory holds, how many peers
/// still hold a previous session, and the schedule.
pub fn decide(
    rotation: &Rotation,
    files: &KeyFiles,
    retiring_peers: usize,
    now: Instant,
    interval: Option<Duration>,
) -> Step {
    if let Some((_, began)) = rotation.retiring {
        let waited = now.saturating_duration_since(began);
        return if retiring_peers == 0 || waited >= GRACE {
            Step::Retire
        } else {
            Step::Wait
        };
    }
    match files.next {
        Some(next) if next != rotation.key => return Step::Begin(next),
        // Retired before a crash between writing the node key and removing the next file.
        Some(_) => return Step::Retire,
        None => {}
    }
    if files.current != Some(rotation.key) {
        return Step::Generate(Why::KeyFileLost);
    }
    if interval.is_some_and(|every| now.saturating_duration_since(rotation.since) >= every) {
        return Step::Generate(Why::Scheduled);
    }
    Step::Wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_steps() {
        let (k1, k2, k3) = (Key([1; 32]), Key([2; 32]), Key([3; 32]));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let idle = Rotation {
            key: k1,
            since: t0,
            retiring: None,
        };
        let rotating = Rotation {
            key: k2,
            since: t0,
            retiring: Some((k1, t0)),
        };
        let files = |current, next| KeyFiles { current, next };
        let hour = Some(s(3600));
        let cases = [
            // (rotation, files, retiring peers, now, interval, step)
            (&idle, files(Some(k1), None), 0, s(10), hour, Step::Wait),
            (&idle, files(Some(k1), None), 0, s(10), None, Step::Wait),
            (
                &idle,
                files(Some(k1), None),
                0,
                s(3600),
                hour,
                Step::Generate(Why::Scheduled),
            ),
            (
                &idle,
                files(Some(k1), None),
                0,
                s(1 << 30),
                None,
                Step::Wait,
            ),
            (
                &idle,
                files(Some(k1), Some(k2)),
                0,
                s(1),
                hour,
                Step::Begin(k2),
            ),
            (
                &idle,
                files(None, None),
                0,
                s(1),
                None,
                Step::Generate(Why::KeyFileLost),
            ),
            (
                &idle,
                files(Some(k3), None),
                0,
                s(1),
                None,
                Step::Generate(Why::KeyFileLost),
            ),
            // A lost key file with a request already written: the request is the recovery.
            (&idle, files(None, Some(k2)), 0, s(1), None, Step::Begin(k2)),
            (
                &idle,
                files(Some(k1), Some(k1)),
                0,
                s(1),
                None,
                Step::Retire,
            ),
            (
                &rotating,
                files(Some(k1), Some(k2)),
                2,
                s(5),
                hour,
                Step::Wait,
            ),
            (
                &rotating,
                files(Some(k1), Some(k2)),
                0,
                s(5),
                hour,
                Step::Retire,
            ),
            (
                &rotating,
                files(Some(k1), Some(k2)),
                1,
                GRACE,
                hour,
                Step::Retire,
            ),
            // Files vanishing mid-rotation change nothing: retirement writes both.
            (&rotating, files(None, None), 1, s(5), hour, Step::Wait),
        ];
        for (i, (rotation, files, peers, at, interval, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                decide(rotation, &files, peers, t0 + at, interval),
                want,
                "case {i}"
            );
        }
    }
}
