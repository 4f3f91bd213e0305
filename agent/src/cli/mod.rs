//! The operator's commands inside the agent pod: `peers` and `status`. Each gathers what the
//! running agent exposes (its UAPI socket, its runtime file, its journal) plus the
//! WireGuardPeers from the API, builds rows with a pure function, and prints them for a
//! person (aligned columns, like `wg show` and `kubectl get`) or as stable JSON.

pub mod peers;
pub mod rotate;
pub mod status;
pub mod table;

use std::time::Duration;

use anyhow::Context;
use isthmus_api::WireGuardPeer;
use kube::api::Api;

/// Every WireGuardPeer, for the CLI's node names and mesh IPs.
pub async fn list_peers(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<Vec<WireGuardPeer>> {
    let api: Api<WireGuardPeer> = Api::all(isthmus_ops::daemon::kube_client(kubeconfig).await?);
    Ok(api
        .list(&Default::default())
        .await
        .context("listing WireGuardPeers")?
        .items)
}

/// Human-readable durations as kubectl prints ages: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Bytes as `wg show` prints transfer: `0 B`, `1.50 KiB`, `12.03 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_like_kubectl_and_wg() {
        assert_eq!(human_age(Duration::from_secs(5)), "5s");
        assert_eq!(human_age(Duration::from_secs(192)), "3m12s");
        assert_eq!(human_age(Duration::from_secs(7500)), "2h5m");
        assert_eq!(
            human_age(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d4h"
        );
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(12 * 1024 * 1024 + 31_457), "12.03 MiB");
    }
}
