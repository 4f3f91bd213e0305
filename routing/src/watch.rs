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

/// flannel's VXLAN devices' indexes (0: not there yet), shared between the agent, which
/// looks them up, and the watch, which counts neighbour events on them only.
#[derive(Debug, Default)]
pub struct VxlanIndexes {
    v4: AtomicU32,
    v6: AtomicU32,
}

impl VxlanIndexes {
    /// Records the index of the IPv4 (`flannel.1`) or IPv6 (`flannel-v6.1`) device.
    pub fn set(&self, v6: bool, index: u32) {
        let slot = if v6 { &self.v6 } else { &self.v4 };
        slot.store(index, Ordering::Relaxed);
    }

    /// The IPv4 and the IPv6 device's index, each if it is there.
    pub fn get(&self) -> (Option<u32>, Option<u32>) {
        let load = |a: &AtomicU32| Some(a.load(Ordering::Relaxed)).filter(|i| *i != 0);
        (load(&self.v4), load(&self.v6))
    }

    fn contains(&self, ifindex: u32) -> bool {
        ifindex != 0
            && (ifindex == self.v4.load(Ordering::Relaxed)
                || ifindex == self.v6.load(Ordering::Relaxed))
    }
}

/// Subscribes in the current thread's network namespace (call inside a tokio runtime
/// context). Neighbour events count only for flannel's VXLAN devices, so pod traffic's
/// ARP churn elsewhere does not wake the router.
pub fn subscribe(vxlan: Arc<VxlanIndexes>, changed: Arc<Notify>) -> anyhow::Result<()> {
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
                ) => vxlan.contains(n.header.ifindex),
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
