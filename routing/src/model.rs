//! The kernel entries routing owns, as plain values: what a plan wants, what the kernel
//! has, and what the journal remembers are all written in these terms, so the decisions
//! between them are pure and comparable.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;
/// `proto boot`: what `ip route add` and flannel (through vishvananda/netlink) write.
pub const PROTO_BOOT: u8 = 3;
/// `proto static`: what isthmus writes for its own routes.
pub const PROTO_STATIC: u8 = 4;
pub const SCOPE_UNIVERSE: u8 = 0;
pub const SCOPE_LINK: u8 = 253;
pub const TYPE_UNICAST: u8 = 1;

/// An Ethernet address, written `0a:58:0a:f4:01:00`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(parts) {
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(out))
    }
}

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Mac, String> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = ();
    fn try_from(b: &[u8]) -> Result<Mac, ()> {
        <[u8; 6]>::try_from(b).map(Mac).map_err(|_| ())
    }
}

/// Which entry: the part of it the kernel uses to tell entries apart. `EntryKey`, not `Key`:
/// the agent that uses this crate also handles WireGuard keys (`isthmus_wg::Key`).
/// Serialised by its variant tags, so the journal's format does not depend on the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EntryKey {
    /// A VXLAN device's forwarding entry for a remote VTEP (`bridge fdb … self`).
    Fdb { ifindex: u32, mac: Mac },
    /// A neighbour (ARP/ND) entry: the remote VTEP's address on the VXLAN device.
    Neigh { ifindex: u32, ip: IpAddr },
    /// A route (metric 0, TOS 0) in a table.
    Route { table: u32, dst: IpAddr, prefix: u8 },
    /// A policy rule, by family and priority.
    Rule { v6: bool, priority: u32 },
}

/// What an entry holds. Absent entries are `None` wherever a value is optional.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Value {
    /// Permanent, with this (first) remote destination.
    Fdb {
        dst: IpAddr,
    },
    /// Permanent, with this link-layer address.
    Neigh {
        mac: Mac,
    },
    Route(Route),
    /// `from all lookup <table>`.
    Rule {
        table: u32,
    },
}

/// A unicast route, with the fields flannel's and isthmus's routes use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
    pub onlink: bool,
    pub protocol: u8,
    pub scope: u8,
    pub prefsrc: Option<IpAddr>,
    /// The route's MTU metric (`mtu N`), the clamp for paths through the tunnel.
    pub mtu: Option<u32>,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Fdb { ifindex, mac } => write!(f, "fdb {mac} dev #{ifindex}"),
            EntryKey::Neigh { ifindex, ip } => write!(f, "neigh {ip} dev #{ifindex}"),
            EntryKey::Route { table, dst, prefix } => {
                write!(f, "route {dst}/{prefix} table {table}")
            }
            EntryKey::Rule { v6, priority } => {
                write!(f, "rule {} pref {priority}", if *v6 { "-6" } else { "-4" })
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Fdb { dst } => write!(f, "dst {dst}"),
            Value::Neigh { mac } => write!(f, "lladdr {mac}"),
            Value::Rule { table } => write!(f, "lookup {table}"),
            Value::Route(r) => {
                if let Some(g) = r.gateway {
                    write!(f, "via {g} ")?;
                }
                write!(f, "dev #{} proto {}", r.oif, r.protocol)?;
                if r.onlink {
                    write!(f, " onlink")?;
                }
                if let Some(m) = r.mtu {
                    write!(f, " mtu {m}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_junk() {
        let m: Mac = "0a:58:0A:f4:01:00".parse().unwrap();
        assert_eq!(m.to_string(), "0a:58:0a:f4:01:00");
        for bad in ["", "0a:58", "0a:58:0a:f4:01:zz", "0a:58:0a:f4:01:00:00"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_and_values_survive_json() {
        let k = EntryKey::Fdb {
            ifindex: 7,
            mac: Mac([10, 88, 10, 244, 1, 0]),
        };
        let v = Value::Route(Route {
            oif: 7,
            gateway: Some("10.244.1.0".parse().unwrap()),
            onlink: true,
            protocol: PROTO_BOOT,
            scope: SCOPE_UNIVERSE,
            prefsrc: None,
            mtu: Some(1370),
        });
        let k2: EntryKey = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
        let v2: Value = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!((k, v), (k2, v2));
    }
}
