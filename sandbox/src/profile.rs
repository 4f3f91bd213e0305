//! How big and how long a run is: `default` for a person watching, `short` for CI.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    /// Nodes in the old cloud (vsphere) and in the new one (aws).
    pub old_nodes: u8,
    pub new_nodes: u8,
    /// How long traffic flows undisturbed at the end of each phase, so a failure that
    /// follows a step late (a cache expiring, a handshake timing out) still shows.
    pub hold: Duration,
    /// Whether the control-plane phase runs.
    pub etcd: bool,
}

impl Profile {
    pub fn by_name(name: &str) -> Option<Profile> {
        match name {
            "default" => Some(Profile {
                name: name.into(),
                old_nodes: 3,
                new_nodes: 3,
                hold: Duration::from_secs(15),
                etcd: true,
            }),
            "short" => Some(Profile {
                name: name.into(),
                old_nodes: 2,
                new_nodes: 2,
                hold: Duration::from_secs(4),
                etcd: true,
            }),
            _ => None,
        }
    }
}
