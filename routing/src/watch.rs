//! Wakes the router when the kernel's neighbour, route, rule or link tables change, so an
//! entry someone rewrites is put back within a netlink round trip, not a resync period.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;

/// Subscribes in the current thread's network namespace (call inside a tokio runtime
/// context). Neighbour events count only for `vxlan_index` (0: none yet), so pod traffic's
/// ARP churn elsewhere does not wake the router.
pub fn subscribe(vxlan_index: Arc<AtomicU32>, changed: Arc<Notify>) -> anyhow::Result<()> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
    ])
    .context("subscribing to netlink events")?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let relevant = match &msg.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n),
                ) => n.header.ifindex == vxlan_index.load(Ordering::Relaxed),
                NetlinkPayload::InnerMessage(_) => true,
                _ => false,
            };
            if relevant {
                changed.notify_one();
            }
        }
        tracing::warn!("netlink event stream ended; re-assertion falls back to periodic checks");
    });
    Ok(())
}
