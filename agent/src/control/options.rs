//! What the operator asked for (`isthmus-agent run`'s flags), kept apart from what the agent
//! discovers while it runs (the tunnel MTU, device indexes, flannel's VTEP), which `run`
//! holds as its own state.

use std::path::PathBuf;
use std::time::Duration;

use isthmus_routing::Mode;
use isthmus_wg::tunnel::DEFAULT_MTU;

use super::publish::PublishOptions;

/// What WireGuard adds to an inner packet on an IPv6 underlay (IPv6 40, UDP 8, data
/// header and tag 32); subtracting it from the underlay MTU gives a tunnel MTU that fits
/// either family, as wireguard-go's 1420 does for 1500.
pub const TUNNEL_OVERHEAD: u16 = 80;

pub struct RunOptions {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub iface: String,
    /// Tunnel MTU; `None`: the underlay's MTU minus [`TUNNEL_OVERHEAD`].
    pub mtu: Option<u16>,
    pub publish: PublishOptions,
    pub routing: RoutingOptions,
    pub kubeconfig: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    /// The heartbeat: the agent renews its Lease ([`isthmus_api::heartbeat`]) this often
    /// and writes the health report when it changes (`None`: neither).
    pub health_interval: Option<Duration>,
    /// The namespace of the heartbeat Lease (where isthmus is installed).
    pub heartbeat_namespace: String,
    /// A tunnel whose latest handshake is older than this is reported down.
    pub handshake_stale: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: nowhere), in the
    /// agent's own network namespace.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The UDP port path MTU probes go to and come from, on the mesh IP (`None`: no
    /// probing; routes keep the tunnels' MTU).
    pub pmtu_port: Option<u16>,
    /// Rotate the node key this often (`None`: only on `isthmus-agent rotate-key` or when
    /// the key file is lost).
    pub key_rotation_interval: Option<Duration>,
}

#[derive(Clone, Debug)]
pub struct RoutingOptions {
    pub mode: Mode,
    /// flannel's VXLAN device.
    pub vxlan_device: String,
    /// flannel's IPv6 VXLAN device on dual-stack nodes.
    pub vxlan_device_v6: String,
    pub table: u32,
    pub rule_priority: u32,
}

/// A duration as the flags take it: plain seconds (`3600`) or a number with a unit
/// (`90s`, `30m`, `12h`, `7d`). Zero means off (`None`).
pub fn parse_interval(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 3600, 90s, 30m, 12h or 7d"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok((n > 0).then(|| Duration::from_secs(n.saturating_mul(unit_secs))))
}

/// [`parse_interval`] for a flag: zero stays zero (the caller reads it as off).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_interval(text).map(Option::unwrap_or_default)
}

/// The tunnel MTU for an underlay MTU (none known: the 1500-byte default).
pub fn tunnel_mtu(underlay: Option<u32>) -> u16 {
    match underlay {
        Some(m) => u16::try_from(m)
            .unwrap_or(u16::MAX)
            .saturating_sub(TUNNEL_OVERHEAD)
            .max(1280),
        None => DEFAULT_MTU,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_in_seconds_or_with_a_unit() {
        let s = Duration::from_secs;
        let cases = [
            ("3600", Ok(Some(s(3600)))),
            ("90s", Ok(Some(s(90)))),
            ("30m", Ok(Some(s(1800)))),
            ("12h", Ok(Some(s(43_200)))),
            ("7d", Ok(Some(s(604_800)))),
            ("0", Ok(None)),
            ("0h", Ok(None)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_interval(text), want, "{text}");
        }
        for bad in ["", "h", "1w", "-5", "1.5h", "10 m"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tunnel_mtu_follows_the_underlay() {
        assert_eq!(tunnel_mtu(Some(1500)), 1420);
        assert_eq!(tunnel_mtu(Some(1400)), 1320);
        assert_eq!(tunnel_mtu(Some(9001)), 8921);
        assert_eq!(tunnel_mtu(Some(1300)), 1280, "never below IPv6's minimum");
        assert_eq!(tunnel_mtu(None), 1420);
    }
}
