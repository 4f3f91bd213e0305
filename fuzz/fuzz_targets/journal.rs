//! The routing journal's loader (`Journal::from_bytes`, behind `Journal::open`) on any
//! bytes: a journal on disk is whatever a crash, a full disk or a hand edit left, and it
//! must load or be refused, never panic. What loads must be consistent: one entry per key.
#![no_main]

use std::path::Path;

use isthmus_routing::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(journal) = Journal::from_bytes(Path::new("/nonexistent"), data) else {
        return;
    };
    let mut n = 0;
    for key in journal.keys() {
        let entry = journal.get(key).expect("every listed key has an entry");
        assert_eq!(&entry.key, key);
        let _ = entry.knows(Some(&entry.applied));
        let _ = key.to_string();
        n += 1;
    }
    assert_eq!(n, journal.len());
});
