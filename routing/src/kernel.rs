//! Reading and writing the owned entries through rtnetlink: the only side effects routing
//! has. Everything is one of [`EntryKey`]/[`Value`]; a kernel entry that is not in a shape
//! isthmus writes (a dynamic neighbour, a route with a metric, a rule with selectors) reads
//! as absent for that key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{anyhow, Context};
use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, IpVersion};

use crate::model::{EntryKey, Mac, Route, Value, TYPE_UNICAST};
use crate::plan::Vtep;
use crate::reconcile::Action;

#[derive(Clone)]
pub struct Kernel {
    handle: Handle,
}

impl Kernel {
    pub fn new(handle: Handle) -> Kernel {
        Kernel { handle }
    }

    /// Link `name`'s message, if it exists.
    async fn find_link(&self, name: &str) -> anyhow::Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// The index, MAC and MTU of link `name`, if it exists.
    pub async fn link(&self, name: &str) -> anyhow::Result<Option<(u32, Option<Mac>, u32)>> {
        Ok(self.find_link(name).await?.map(|l| {
            let mut mac = None;
            let mut mtu = 0;
            for a in &l.attributes {
                match a {
                    LinkAttribute::Address(b) => mac = Mac::try_from(b.as_slice()).ok(),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            (l.header.index, mac, mtu)
        }))
    }

    /// The UDP port VXLAN device `name` listens on (its `dstport`); `None` when there is
    /// no such link or it is not a VXLAN device.
    pub async fn vxlan_port(&self, name: &str) -> anyhow::Result<Option<u16>> {
        let link = self.find_link(name).await?;
        let port = link.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Vxlan(v)) => v.iter().find_map(|x| match x {
                        InfoVxlan::Port(p) => Some(*p),
                        _ => None,
                    }),
                    _ => None,
                }),
                _ => None,
            })
        });
        Ok(port)
    }

    /// This node's VTEP: the VXLAN device's MAC and its address of the family `v6` names
    /// (flannel puts the pod subnet's network address there; an IPv6 device's link-local
    /// address is not it).
    /// Returns the device's index too (0: no such device), so a caller needs no second
    /// lookup.
    pub async fn vtep(&self, device: &str, v6: bool) -> anyhow::Result<(u32, Option<Vtep>)> {
        let (index, mac) = match self.link(device).await? {
            Some((index, Some(mac), _)) => (index, mac),
            Some((index, None, _)) => return Ok((index, None)),
            None => return Ok((0, None)),
        };
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        // Read to the end: a dump left half-read makes the connection log every message
        // it could no longer deliver.
        let mut found = None;
        while let Some(msg) = addrs.try_next().await.context("listing addresses")? {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let wanted = match ip {
                Some(IpAddr::V4(_)) => !v6,
                Some(IpAddr::V6(a)) => v6 && !a.is_unicast_link_local(),
                None => false,
            };
            if wanted && found.is_none() {
                found = ip;
            }
        }
        Ok((index, found.map(|ip| Vtep { mac, ip })))
    }

    /// The underlay's MTU: the lowest MTU of the devices the IPv4 and IPv6 default routes
    /// leave through (see [`underlay_mtu_of`]).
    pub async fn underlay_mtu(&self) -> anyhow::Result<Option<u32>> {
        let mut defaults = Vec::new();
        for family in [IpVersion::V4, IpVersion::V6] {
            let request = match family {
                IpVersion::V4 => {
                    rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
                }
                IpVersion::V6 => {
                    rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
                }
            };
            let mut routes = self.handle.route().get(request).execute();
            while let Some(r) = routes.try_next().await.context("listing routes")? {
                let default = r.header.destination_prefix_length == 0
                    && r.header.table == 254
                    && r.header.kind == RouteType::Unicast;
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                if let (true, Some(oif)) = (default, oif) {
                    defaults.push(oif);
                }
            }
        }
        let mut mtus = BTreeMap::new();
        for oif in &defaults {
            let mut links = self.handle.link().get().match_index(*oif).execute();
            let link = links
                .try_next()
                .await
                .with_context(|| format!("reading the underlay link {oif}"))?;
            let mtu = link.and_then(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                })
            });
            if let Some(mtu) = mtu {
                mtus.insert(*oif, mtu);
            }
        }
        Ok(underlay_mtu_of(&defaults, &mtus))
    }

    /// The kernel's value for each of `keys` that exists in a shape we recognise.
    pub async fn read(
        &self,
        keys: &BTreeSet<EntryKey>,
    ) -> anyhow::Result<BTreeMap<EntryKey, Value>> {
        let mut out = BTreeMap::new();
        let any = |f: fn(&EntryKey) -> bool| keys.iter().any(f);
        if any(|k| matches!(k, EntryKey::Fdb { .. })) {
            self.read_neighbours(AddressFamily::Bridge, keys, &mut out)
                .await?;
        }
        if any(|k| {
            matches!(
                k,
                EntryKey::Neigh {
                    ip: IpAddr::V4(_),
                    ..
                }
            )
        }) {
            self.read_neighbours(AddressFamily::Inet, keys, &mut out)
                .await?;
        }
        if any(|k| {
            matches!(
                k,
                EntryKey::Neigh {
                    ip: IpAddr::V6(_),
                    ..
                }
            )
        }) {
            self.read_neighbours(AddressFamily::Inet6, keys, &mut out)
                .await?;
        }
        for v6 in [false, true] {
            if any(if v6 {
                |k: &EntryKey| {
                    matches!(
                        k,
                        EntryKey::Route {
                            dst: IpAddr::V6(_),
                            ..
                        }
                    )
                }
            } else {
                |k: &EntryKey| {
                    matches!(
                        k,
                        EntryKey::Route {
                            dst: IpAddr::V4(_),
                            ..
                        }
                    )
                }
            }) {
                self.read_routes(v6, keys, &mut out).await?;
            }
            if keys
                .iter()
                .any(|k| matches!(k, EntryKey::Rule { v6: r, .. } if *r == v6))
            {
                self.read_rules(v6, keys, &mut out).await?;
            }
        }
        Ok(out)
    }

    async fn read_neighbours(
        &self,
        family: AddressFamily,
        keys: &BTreeSet<EntryKey>,
        out: &mut BTreeMap<EntryKey, Value>,
    ) -> anyhow::Result<()> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(msg) = dump.try_next().await.context("listing neighbours")? {
            // VXLAN FDB entries read back as PERMANENT|NOARP.
            if u16::from(msg.header.state) & u16::from(NeighbourState::Permanent) == 0 {
                continue;
            }
            let ifindex = msg.header.ifindex;
            let mut lladdr = None;
            let mut dst = None;
            for a in &msg.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(b) => {
                        lladdr = Mac::try_from(b.as_slice()).ok()
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    // In AF_BRIDGE messages the parser cannot tell the address family.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = match b.len() {
                            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
            let (Some(mac), Some(ip)) = (lladdr, dst) else {
                continue;
            };
            let entry = if family == AddressFamily::Bridge {
                (EntryKey::Fdb { ifindex, mac }, Value::Fdb { dst: ip })
            } else {
                (EntryKey::Neigh { ifindex, ip }, Value::Neigh { mac })
            };
            // A MAC with several remotes lists them in order: the first is the one we use.
            if keys.contains(&entry.0) {
                out.entry(entry.0).or_insert(entry.1);
            }
        }
        Ok(())
    }

    async fn read_routes(
        &self,
        v6: bool,
        keys: &BTreeSet<EntryKey>,
        out: &mut BTreeMap<EntryKey, Value>,
    ) -> anyhow::Result<()> {
        let query = if v6 {
            rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .table_id(0)
                .build()
        } else {
            rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .table_id(0)
                .build()
        };
        let mut dump = self.handle.route().get(query).execute();
        while let Some(msg) = dump.try_next().await.context("listing routes")? {
            if let Some((key, value)) = parse_route(&msg) {
                if keys.contains(&key) {
                    out.insert(key, value);
                }
            }
        }
        Ok(())
    }

    async fn read_rules(
        &self,
        v6: bool,
        keys: &BTreeSet<EntryKey>,
        out: &mut BTreeMap<EntryKey, Value>,
    ) -> anyhow::Result<()> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let mut dump = self.handle.rule().get(version).execute();
        while let Some(msg) = dump.try_next().await.context("listing rules")? {
            let mut priority = 0;
            let mut table = u32::from(msg.header.table);
            let mut selectors = msg.header.src_len != 0 || msg.header.dst_len != 0;
            for a in &msg.attributes {
                match a {
                    RuleAttribute::Priority(p) => priority = *p,
                    RuleAttribute::Table(t) => table = *t,
                    // u32::MAX: "no suppression", what every plain rule reports.
                    RuleAttribute::Protocol(_) | RuleAttribute::SuppressPrefixLen(u32::MAX) => {}
                    _ => selectors = true,
                }
            }
            let key = EntryKey::Rule { v6, priority };
            if msg.header.action == RuleAction::ToTable && !selectors && keys.contains(&key) {
                out.insert(key, Value::Rule { table });
            }
        }
        Ok(())
    }

    /// Makes the kernel's entry for `key` match `action`; `current` is what it has now.
    pub async fn apply(
        &self,
        key: &EntryKey,
        action: &Action,
        current: Option<&Value>,
    ) -> anyhow::Result<()> {
        let result = match (key, action) {
            (EntryKey::Fdb { ifindex, mac }, Action::Set(Value::Fdb { dst })) => {
                let msg = neighbour(AddressFamily::Bridge, *ifindex, *mac, *dst);
                self.ack(
                    RouteNetlinkMessage::NewNeighbour(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .await
            }
            (EntryKey::Neigh { ifindex, ip }, Action::Set(Value::Neigh { mac })) => {
                let family = if ip.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let msg = neighbour(family, *ifindex, *mac, *ip);
                self.ack(
                    RouteNetlinkMessage::NewNeighbour(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .await
            }
            (EntryKey::Fdb { ifindex, mac }, Action::Delete) => match current {
                Some(Value::Fdb { dst }) => {
                    let msg = neighbour(AddressFamily::Bridge, *ifindex, *mac, *dst);
                    self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0).await
                }
                _ => Ok(()),
            },
            (EntryKey::Neigh { ifindex, ip }, Action::Delete) => match current {
                Some(Value::Neigh { mac }) => {
                    let family = if ip.is_ipv4() {
                        AddressFamily::Inet
                    } else {
                        AddressFamily::Inet6
                    };
                    let msg = neighbour(family, *ifindex, *mac, *ip);
                    self.ack(RouteNetlinkMessage::DelNeighbour(msg), 0).await
                }
                _ => Ok(()),
            },
            (EntryKey::Route { table, dst, prefix }, Action::Set(Value::Route(r))) => {
                let msg = route(*table, *dst, *prefix, Some(r));
                self.ack(
                    RouteNetlinkMessage::NewRoute(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .await
            }
            (EntryKey::Route { table, dst, prefix }, Action::Delete) => {
                let mut msg = route(*table, *dst, *prefix, None);
                // "Any scope", as `ip route del` asks; the default (universe) would miss
                // a link-scope route.
                msg.header.scope = RouteScope::NoWhere;
                self.ack(RouteNetlinkMessage::DelRoute(msg), 0).await
            }
            (EntryKey::Rule { v6, priority }, Action::Set(Value::Rule { table })) => {
                // Rules cannot be replaced: remove a different one at this priority first.
                if let Some(Value::Rule { table: old }) = current {
                    self.ack(RouteNetlinkMessage::DelRule(rule(*v6, *priority, *old)), 0)
                        .await?;
                    crate::fault::hit(crate::fault::Point::MidWrite);
                }
                self.ack(
                    RouteNetlinkMessage::NewRule(rule(*v6, *priority, *table)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
                .await
            }
            (EntryKey::Rule { v6, priority }, Action::Delete) => match current {
                Some(Value::Rule { table }) => {
                    self.ack(
                        RouteNetlinkMessage::DelRule(rule(*v6, *priority, *table)),
                        0,
                    )
                    .await
                }
                _ => Ok(()),
            },
            (key, Action::Set(value)) => Err(anyhow!("{value} is not a value for {key}")),
        };
        result.with_context(|| match action {
            Action::Set(v) => format!("setting {key} to {v}"),
            Action::Delete => format!("deleting {key}"),
        })
    }

    async fn ack(&self, message: RouteNetlinkMessage, flags: u16) -> anyhow::Result<()> {
        let mut req = NetlinkMessage::from(message);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut response = handle.request(req).context("sending a netlink request")?;
        while let Some(msg) = response.next().await {
            if let NetlinkPayload::Error(e) = msg.payload {
                // ENOENT on delete: already gone, which is what we wanted.
                if e.raw_code() == -libc::ENOENT || e.code.is_none() {
                    continue;
                }
                return Err(anyhow!("{e}"));
            }
        }
        Ok(())
    }
}

fn neighbour(family: AddressFamily, ifindex: u32, mac: Mac, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    if family == AddressFamily::Bridge {
        msg.header.flags = NeighbourFlags::Own;
    }
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    msg
}

fn route(table: u32, dst: IpAddr, prefix: u8, value: Option<&Route>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.destination_prefix_length = prefix;
    msg.header.table = u8::try_from(table).unwrap_or(252);
    msg.attributes.push(RouteAttribute::Table(table));
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(r) = value {
        msg.header.protocol = r.protocol.into();
        msg.header.scope = r.scope.into();
        msg.header.kind = TYPE_UNICAST.into();
        if r.onlink {
            msg.header.flags |= RouteFlags::Onlink;
        }
        msg.attributes.push(RouteAttribute::Oif(r.oif));
        if let Some(g) = r.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        if let Some(p) = r.prefsrc {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(p)));
        }
        if let Some(m) = r.mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(m)]));
        }
    }
    msg
}

fn rule(v6: bool, priority: u32, table: u32) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.action = RuleAction::ToTable;
    msg.header.table = u8::try_from(table).unwrap_or(252);
    msg.attributes.push(RuleAttribute::Priority(priority));
    msg.attributes.push(RuleAttribute::Table(table));
    msg
}

fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A dumped route as one of ours, when it is a plain unicast route with metric 0.
/// The kernel's metric for an IPv6 route added without one.
const IP6_RT_PRIO_USER: u32 = 1024;

fn parse_route(msg: &RouteMessage) -> Option<(EntryKey, Value)> {
    if msg.header.kind != RouteType::Unicast || msg.header.tos != 0 {
        return None;
    }
    let v6 = msg.header.address_family == AddressFamily::Inet6;
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut value = Route {
        oif: 0,
        gateway: None,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        protocol: msg.header.protocol.into(),
        scope: msg.header.scope.into(),
        prefsrc: None,
        mtu: None,
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = route_address(d),
            RouteAttribute::Gateway(g) => value.gateway = route_address(g),
            RouteAttribute::PrefSource(p) => value.prefsrc = route_address(p),
            RouteAttribute::Oif(o) => value.oif = *o,
            // A metric of our own choosing is none, the kernel's default: 0 for IPv4, 1024
            // (`IP6_RT_PRIO_USER`) for IPv6, where every route has one.
            RouteAttribute::Priority(p) if *p != 0 && !(v6 && *p == IP6_RT_PRIO_USER) => {
                return None
            }
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Mtu(v) = m {
                        value.mtu = Some(*v);
                    }
                }
            }
            _ => {}
        }
    }
    let dst = dst?;
    Some((
        EntryKey::Route {
            table,
            dst,
            prefix: msg.header.destination_prefix_length,
        },
        Value::Route(value),
    ))
}

/// The underlay MTU from the devices the default routes of both families leave through
/// (`defaults`, by interface index) and the devices' MTUs: the lowest. A node does not know
/// which family its peers' endpoints will use (dual-stack clusters publish both), so the
/// tunnel must fit the narrower path; where both families share a device, as they usually
/// do, this is that device's MTU. `None` when no default route names a device we know.
pub fn underlay_mtu_of(defaults: &[u32], mtus: &BTreeMap<u32, u32>) -> Option<u32> {
    defaults
        .iter()
        .filter_map(|oif| mtus.get(oif))
        .copied()
        .min()
}

#[cfg(test)]
mod underlay_tests {
    use super::*;

    #[test]
    fn the_lowest_mtu_of_the_default_routes_of_either_family() {
        let mtus = BTreeMap::from([(2, 1500), (3, 9000), (4, 1420)]);
        let table: [(&[u32], Option<u32>); 7] = [
            (&[], None),
            (&[2], Some(1500)),    // IPv4 only
            (&[4], Some(1420)),    // IPv6 only
            (&[2, 2], Some(1500)), // both families, one device
            (&[3, 4], Some(1420)), // IPv6 through a narrower device
            (&[4, 3], Some(1420)), // IPv4 through the narrower one
            (&[9, 3], Some(9000)), // a device that vanished is ignored
        ];
        for (defaults, want) in table {
            assert_eq!(underlay_mtu_of(defaults, &mtus), want, "{defaults:?}");
        }
    }
}
