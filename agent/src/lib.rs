//! isthmus node agent: a userspace WireGuard data plane (`dataplane`) that `wg` configures
//! through the standard UAPI (`uapi`). Routing and control arrive with later issues.

pub mod dataplane;
pub mod key;
pub mod uapi;
