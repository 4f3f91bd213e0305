//! isthmus node agent: a userspace WireGuard data plane (`dataplane`) that `wg` configures
//! through the standard UAPI (`uapi`), and the control plane (`control`) that configures it
//! from the WireGuardPeers in the API.

pub mod cli;
pub mod control;
pub mod dataplane;
pub mod key;
pub mod netns;
pub mod routing;
pub mod uapi;
