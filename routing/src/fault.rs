//! Fault injection for the crash-safety tests: `ISTHMUS_FAULT=<point>:<n>` makes the process
//! SIGKILL itself the `n`-th time (from 1) it reaches `point` in [`crate::Router`]'s pass, so
//! a test can stop a real process between any two steps of a change and check that
//! `isthmus-agent cleanup` still restores exactly. Unset (always, outside tests) it costs one
//! relaxed atomic load per step; it is read once, and a malformed value is ignored with a
//! warning rather than failing the agent.
//!
//! The points, in the order a pass reaches them: [`Point::BeforeJournal`] (nothing written
//! yet), [`Point::JournalTemp`] (inside any journal commit: the temporary file synced, not
//! yet renamed over the journal), [`Point::BeforeWrite`] (journal durable, the next kernel
//! write not made), [`Point::MidWrite`] (inside a kernel write made of two requests, between
//! them: a rule replaced), [`Point::AfterWrite`] (that write made, successful or not),
//! [`Point::AfterConfirm`] (the pass's last journal commit durable).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The variable the tests set.
pub const ENV: &str = "ISTHMUS_FAULT";

/// A place in a routing pass where a process can be killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    BeforeJournal,
    JournalTemp,
    BeforeWrite,
    MidWrite,
    AfterWrite,
    AfterConfirm,
}

impl Point {
    pub const ALL: [Point; 6] = [
        Point::BeforeJournal,
        Point::JournalTemp,
        Point::BeforeWrite,
        Point::MidWrite,
        Point::AfterWrite,
        Point::AfterConfirm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Point::BeforeJournal => "before-journal",
            Point::JournalTemp => "journal-temp",
            Point::BeforeWrite => "before-write",
            Point::MidWrite => "mid-write",
            Point::AfterWrite => "after-write",
            Point::AfterConfirm => "after-confirm",
        }
    }
}

/// `<point>:<n>` with `n` ≥ 1.
pub fn parse(spec: &str) -> Option<(Point, u32)> {
    let (name, n) = spec.split_once(':')?;
    let point = Point::ALL.into_iter().find(|p| p.name() == name)?;
    let n = n.parse().ok().filter(|n| *n >= 1)?;
    Some((point, n))
}

struct Armed {
    point: Point,
    n: u32,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let Some((point, n)) = parse(&spec) else {
                tracing::warn!(%spec, "{ENV} is not <point>:<n>; no fault injected");
                return None;
            };
            tracing::warn!(point = point.name(), n, "fault injection armed");
            Some(Armed {
                point,
                n,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Called at `point`: SIGKILLs the process when this is the armed occurrence.
pub fn hit(point: Point) {
    let Some(a) = armed() else { return };
    if a.point == point && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.n {
        // SAFETY: raise has no memory-safety preconditions; SIGKILL does not return.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        for p in Point::ALL {
            assert_eq!(parse(&format!("{}:3", p.name())), Some((p, 3)));
        }
        for bad in [
            "",
            "after-write",
            "after-write:0",
            "after-write:x",
            "nowhere:1",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
