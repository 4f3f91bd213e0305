//! The networking state of a namespace as text, to show that something left it untouched
//! (a node in the same location, the whole node after the agent is removed).
//!
//! A snapshot holds links, addresses, routes of every table, permanent neighbours,
//! configured FDB entries (from netlink, with their raw state and flags: see
//! [`crate::fdb::fdb_entries`]) and rules, IPv4 and IPv6, one object per line,
//! `section| ` first, sorted.
//! What changes merely because time passed or traffic flowed is left out or blanked:
//! learned neighbours and FDB entries, bridge timers, dynamic address lifetimes. Counters
//! are never asked for (no `-s`). And a snapshot first waits for IPv6 duplicate address
//! detection to finish: until it does, a fresh link-local address is `tentative` and has no
//! `local` route, both of which change a second or two later by themselves. So two
//! snapshots of a node nobody configured in between are identical, however much traffic
//! crossed it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use crate::daemon::wait_until;
use crate::netns::{run, Netns};

/// Longest wait for DAD; the kernel's default takes one probe of one second (plus a random
/// delay of up to a second) per address.
const DAD_WAIT: Duration = Duration::from_secs(5);

/// One part of a snapshot: a command run in the namespace and which of its lines count.
struct Section {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    keep: fn(&str) -> bool,
}

const fn section(
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    keep: fn(&str) -> bool,
) -> Section {
    Section {
        name,
        program,
        args,
        keep,
    }
}

/// `ip route show table all` without `-4` prints IPv6 routes as well, hence the explicit
/// families. Neighbours: only what someone configured; learned ones come and go.
const SECTIONS: &[Section] = &[
    section("link", "ip", &["-o", "-d", "link", "show"], all),
    section("addr", "ip", &["-o", "addr", "show"], all),
    section(
        "route4",
        "ip",
        &["-4", "route", "show", "table", "all"],
        all,
    ),
    section(
        "route6",
        "ip",
        &["-6", "route", "show", "table", "all"],
        all,
    ),
    section(
        "neigh4",
        "ip",
        &["-4", "neigh", "show", "nud", "permanent"],
        all,
    ),
    section(
        "neigh6",
        "ip",
        &["-6", "neigh", "show", "nud", "permanent"],
        all,
    ),
    section("rule4", "ip", &["-4", "rule", "show"], all),
    section("rule6", "ip", &["-6", "rule", "show"], all),
];

fn all(_: &str) -> bool {
    true
}

/// The normalized state of `ns` (see the module documentation).
pub fn snapshot(ns: &Netns) -> anyhow::Result<String> {
    wait_dad(ns)?;
    let mut lines = Vec::new();
    for section in SECTIONS {
        let mut full = vec!["-n", ns.name.as_str()];
        full.extend_from_slice(section.args);
        let out = run(section.program, &full)
            .with_context(|| format!("snapshot of {}: {}", ns.name, section.name))?;
        lines.extend(
            out.lines()
                .filter(|l| !l.trim().is_empty() && (section.keep)(l))
                .map(|l| format!("{}| {}", section.name, normalize(l))),
        );
    }
    lines.extend(
        crate::fdb::fdb_entries(ns)?
            .into_iter()
            .map(|l| format!("fdb| {l}")),
    );
    lines.sort();
    let mut text = lines.join("\n");
    text.push('\n');
    Ok(text)
}

/// Waits until no IPv6 address in `ns` is still in DAD (one that failed DAD stays
/// `tentative` for good and is left as it is). Gives up quietly after [`DAD_WAIT`]: the
/// snapshot then shows the `tentative` address, which is the truth.
fn wait_dad(ns: &Netns) -> anyhow::Result<()> {
    let mut error = None;
    wait_until(DAD_WAIT, || {
        match ns.ip(&["-6", "-o", "addr", "show", "tentative", "-dadfailed"]) {
            Ok(out) => out.trim().is_empty(),
            Err(e) => {
                error = Some(e);
                true
            }
        }
    });
    match error {
        Some(e) => Err(e.context("waiting for IPv6 DAD")),
        None => Ok(()),
    }
}

/// One line with what time and traffic change taken out: `*_timer <seconds>` pairs
/// (bridge and bridge port timers) and lifetimes that are not `forever`; runs of spaces
/// and `ip -o`'s `\` continuation marks become one space.
fn normalize(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().filter(|w| *w != "\\").collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let w = w.strip_suffix('\\').unwrap_or(w);
        if w.ends_with("_timer") && i + 1 < words.len() {
            i += 2;
            continue;
        }
        if (w == "valid_lft" || w == "preferred_lft") && i + 1 < words.len() {
            out.push(w);
            let value = words[i + 1].trim_end_matches('\\');
            out.push(if value == "forever" {
                "forever"
            } else {
                "<dynamic>"
            });
            i += 2;
            continue;
        }
        if !w.is_empty() {
            out.push(w);
        }
        i += 1;
    }
    out.join(" ")
}

/// The lines that differ between two snapshots: `-line` only in `before`, `+line` only in
/// `after`, in snapshot order (each line counted, so a duplicate that appears shows too).
/// Empty when they are the same.
pub fn diff(before: &str, after: &str) -> Vec<String> {
    let mut count: BTreeMap<&str, i64> = BTreeMap::new();
    for l in before.lines() {
        *count.entry(l).or_default() -= 1;
    }
    for l in after.lines() {
        *count.entry(l).or_default() += 1;
    }
    let mut out = Vec::new();
    for (line, n) in count {
        let sign = if n < 0 { '-' } else { '+' };
        for _ in 0..n.unsigned_abs() {
            out.push(format!("{sign}{line}"));
        }
    }
    out
}

/// [`diff`] as one string for an assertion message.
pub fn diff_text(before: &str, after: &str) -> String {
    diff(before, after).join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_and_lifetimes_are_blanked() {
        let line = "4: cni0: <UP> mtu 1350 \\    bridge hello_timer    0.00 gc_timer   12.34 \
                    group_fwd_mask 0";
        assert_eq!(
            normalize(line),
            "4: cni0: <UP> mtu 1350 bridge group_fwd_mask 0"
        );
        let addr = "2: eth0    inet6 fe80::1/64 scope link \\       valid_lft 86399sec \
                    preferred_lft forever";
        assert_eq!(
            normalize(addr),
            "2: eth0 inet6 fe80::1/64 scope link valid_lft <dynamic> preferred_lft forever"
        );
    }

    #[test]
    fn diff_shows_both_sides() {
        let a = "x| 1\nx| 2\n";
        let b = "x| 2\nx| 3\n";
        assert_eq!(diff(a, b), vec!["-x| 1", "+x| 3"]);
        assert!(diff(a, a).is_empty());
    }
}
