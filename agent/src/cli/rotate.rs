//! `isthmus-agent rotate-key`: asks the running agent for a key rotation by writing the next
//! key into its state directory (the same file a rotation resumes from after a crash, see
//! `control::keys`), then waits until the agent has retired the old key.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_wg::key::Key;

use crate::control::keys::{self, NEXT_FILE};

/// Requests the rotation and, unless `timeout` is zero, waits for its end.
pub fn rotate_key(state_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    let files = keys::read_files(state_dir)?;
    let old = files.current.with_context(|| {
        format!(
            "no node key in {}: is this the agent's state directory?",
            state_dir.display()
        )
    })?;
    let next = Key::generate_private();
    if !keys::request_rotation(state_dir, &next)? {
        bail!(
            "a rotation is already under way ({} exists); it ends when the old key is retired",
            state_dir.join(NEXT_FILE).display()
        );
    }
    let (old, new) = (
        old.public_from_private().to_base64(),
        next.public_from_private().to_base64(),
    );
    println!("rotating {old} -> {new}");
    if timeout.is_zero() {
        return Ok(());
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        let files = keys::read_files(state_dir)?;
        if files.current == Some(next) && files.next.is_none() {
            println!(
                "done: {new} in use, {old} retired after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the old key is not retired after {timeout:?}; the agent finishes the rotation when it runs")
}
