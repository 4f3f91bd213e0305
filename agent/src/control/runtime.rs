//! What the running agent tells the operator CLI about itself, in `STATE_DIR/runtime.json`:
//! written (atomically) whenever it changes, read by `isthmus-agent status`.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "runtime.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runtime {
    pub node: String,
    pub iface: String,
    pub listen_port: u16,
    pub mtu: u16,
    pub mode: String,
    pub topology: Option<String>,
    #[serde(rename = "meshIP")]
    pub mesh_ip: Option<String>,
    pub admitted: bool,
    /// Whether the WireGuardPeer watch is healthy; the last error when it is not.
    pub api_reachable: bool,
    pub api_error: Option<String>,
    /// Whether routing's last pass wrote everything it wanted.
    pub routing_ok: bool,
    /// The path MTU found per remote node (by name), for `isthmus-agent peers`.
    #[serde(default, rename = "pathMTUs")]
    pub path_mtus: std::collections::BTreeMap<String, u16>,
    /// Node key rotations retired since the agent started.
    #[serde(default)]
    pub key_rotations: u64,
    /// During a rotation: the new public key (base64) being moved to.
    #[serde(default)]
    pub rotating_to: Option<String>,
}

pub fn write(state_dir: &Path, runtime: &Runtime) -> anyhow::Result<()> {
    let path = state_dir.join(FILE);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(runtime).context("encoding runtime state")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming onto {}", path.display()))
}

pub fn read(state_dir: &Path) -> anyhow::Result<Option<Runtime>> {
    let path = state_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
