//! The control-plane phase: the user cluster's etcd as pods, moved from one cloud to the
//! other over the mesh while a writer writes and reads back continuously.
//!
//! (Being written: see the interface below; `make sandbox` does not run it yet.)

use std::time::Duration;

use anyhow::bail;
use isthmus_tests::rig::RealCluster;
use serde::{Deserialize, Serialize};

/// The etcd image (etcd, `isthmus-etcd-member`, `isthmus-sandbox-client`), built by
/// `scripts/build-sandbox-image.sh`.
pub const SANDBOX_IMAGE: &str = "localhost/isthmus-sandbox:0.1.0";

/// What the writer saw during one step (since the last [`Etcd::take_figures`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriteFigures {
    /// Writes acknowledged and read back.
    pub writes: u64,
    /// Writes that were not acknowledged within the writer's deadline.
    pub failed: u64,
    /// Acknowledged writes that a later read did not return.
    pub lost: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub leader_changes: u32,
    /// Members after the step, by name.
    pub members: Vec<String>,
}

/// A running etcd cluster of pods and its writer.
pub struct Etcd {
    _private: (),
}

impl Etcd {
    /// Starts one member pod per entry of `nodes` (pinned there), named `etcd-1`, `etcd-2`, …,
    /// as a new cluster; returns once it is healthy.
    pub async fn bootstrap(_c: &RealCluster, _nodes: &[&str]) -> anyhow::Result<Etcd> {
        bail!("the etcd phase is not written yet")
    }

    /// Starts the writer in `node`'s host network namespace.
    pub fn start_writer(&mut self, _c: &RealCluster, _node: &str) -> anyhow::Result<()> {
        bail!("the etcd phase is not written yet")
    }

    /// Adds a member on `node` (as a learner, promoted once caught up); returns its name.
    pub async fn add(&mut self, _c: &RealCluster, _node: &str) -> anyhow::Result<String> {
        bail!("the etcd phase is not written yet")
    }

    /// Removes member `name` (leadership moved away first) and deletes its pod.
    pub async fn remove(&mut self, _c: &RealCluster, _name: &str) -> anyhow::Result<()> {
        bail!("the etcd phase is not written yet")
    }

    /// The writer's figures since the last call.
    pub fn take_figures(&mut self) -> WriteFigures {
        WriteFigures::default()
    }

    /// Stops the writer, checks every acknowledged write is still there, deletes the pods.
    pub async fn finish(self, _c: &RealCluster) -> anyhow::Result<WriteFigures> {
        bail!("the etcd phase is not written yet")
    }
}
