//! Which pairs of nodes tunnel. One pure rule, used by the coordinator to count the pairs it
//! expects and by every agent to pick its peers, so the two can never disagree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Topology {
    /// Only nodes in different locations tunnel; traffic inside a location stays on eth0,
    /// untouched, so adding or removing the mesh never disturbs it.
    #[default]
    #[serde(rename = "cross-location")]
    CrossLocation,
    /// Every pair tunnels.
    #[serde(rename = "full")]
    Full,
}

impl Topology {
    /// Whether two nodes at these locations tunnel to each other.
    pub fn wants_tunnel(self, a_location: &str, b_location: &str) -> bool {
        match self {
            Topology::Full => true,
            Topology::CrossLocation => a_location != b_location,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Topology::CrossLocation => "cross-location",
            Topology::Full => "full",
        }
    }
}

impl std::str::FromStr for Topology {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cross-location" => Ok(Topology::CrossLocation),
            "full" => Ok(Topology::Full),
            other => Err(format!(
                "unknown topology {other:?} (cross-location or full)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_by_topology() {
        let cases = [
            (Topology::CrossLocation, "aws", "vsphere", true),
            (Topology::CrossLocation, "aws", "aws", false),
            (Topology::Full, "aws", "aws", true),
            (Topology::Full, "aws", "gcp", true),
        ];
        for (t, a, b, want) in cases {
            assert_eq!(t.wants_tunnel(a, b), want, "{t:?} {a} {b}");
            assert_eq!(t.wants_tunnel(b, a), want, "symmetric");
        }
    }

    #[test]
    fn parses_its_own_names() {
        for t in [Topology::CrossLocation, Topology::Full] {
            assert_eq!(t.as_str().parse::<Topology>(), Ok(t));
        }
        assert!("mesh".parse::<Topology>().is_err());
    }
}
