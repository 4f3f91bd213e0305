//! The `WireGuardPeer` custom resource shared by agent and coordinator (see DESIGN.md).
//! The types land with the control-plane issue; the data plane does not depend on them.
