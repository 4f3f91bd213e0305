//! The tunnel device's own address (the node's mesh IP), set through netlink. The device is
//! ours alone, so its address list is simply replaced.

use std::net::IpAddr;

use anyhow::{bail, Context};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkUnspec};

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection in the current thread's network namespace; must be called
    /// inside a tokio runtime context (the connection task is spawned on it).
    pub fn connect() -> anyhow::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The connection's handle, for the other netlink users in the same namespace.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    async fn index(&self, iface: &str) -> anyhow::Result<u32> {
        let link = self
            .handle
            .link()
            .get()
            .match_name(iface.to_string())
            .execute()
            .try_next()
            .await
            .with_context(|| format!("looking up {iface}"))?;
        match link {
            Some(l) => Ok(l.header.index),
            None => bail!("no link named {iface}"),
        }
    }

    /// Makes `addresses` the device's only addresses (none: no address; a dual-stack mesh
    /// has one per family) and brings it up.
    pub async fn set_address(&self, iface: &str, addresses: &[(IpAddr, u8)]) -> anyhow::Result<()> {
        let index = self.index(iface).await?;
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut present = vec![false; addresses.len()];
        while let Some(msg) = existing.try_next().await.context("listing addresses")? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let keep = addresses
                .iter()
                .position(|&(ip, len)| addr == Some(ip) && msg.header.prefix_len == len);
            // IPv6 link-local addresses come with the device; leave them.
            let link_local =
                matches!(addr, Some(IpAddr::V6(a)) if a.segments()[0] & 0xffc0 == 0xfe80);
            if let Some(i) = keep {
                present[i] = true;
            } else if !link_local {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .context("removing a stale address")?;
            }
        }
        for (&(ip, len), _) in addresses.iter().zip(&present).filter(|(_, p)| !**p) {
            self.handle
                .address()
                .add(index, ip, len)
                .execute()
                .await
                .with_context(|| format!("adding {ip}/{len} to {iface}"))?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing {iface} up"))?;
        Ok(())
    }
}
