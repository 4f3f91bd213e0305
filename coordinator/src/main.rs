//! `isthmus-coordinator`: runs in the seed cluster (a Deployment with two replicas).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ip_network::IpNetwork;
use isthmus_api::Topology;
use isthmus_coordinator::controller::{self, ClusterSettings, LeaseSettings, Settings};
use isthmus_coordinator::decide::Pool;
use isthmus_coordinator::identity;
use isthmus_coordinator::multi::{self, MultiSettings};
use isthmus_coordinator::ops::CoordinatorOps;

#[derive(Parser)]
#[command(name = "isthmus-coordinator", version, about = "isthmus coordinator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only obscure clap's derive"
)]
enum Command {
    /// Watch WireGuardPeers and Nodes and admit, allocate, collect (one replica acts).
    Run {
        /// Serve every user cluster a MeshCluster in the seed declares (the cluster the
        /// kubeconfig names, where the Lease also is). --mesh-cidr and --topology are then
        /// the defaults for MeshClusters that name none.
        #[arg(long)]
        multi_cluster: bool,
        /// Multi-cluster mode: seconds a connect or a request to a user cluster may take.
        #[arg(long, default_value_t = 5)]
        cluster_timeout_seconds: u64,
        /// Pool the mesh IPs come from.
        #[arg(long, default_value = "100.96.0.0/16")]
        mesh_cidr: String,
        /// A dual-stack mesh: an IPv6 pool every admitted node also gets a mesh IP from
        /// (status.meshIPv6), for flannel's IPv6 VXLAN (`flannel-v6.1`) to cross the mesh.
        /// --mesh-cidr must then be IPv4. With --multi-cluster: the default of the clusters
        /// whose MeshCluster has an IPv4 pool and no `meshCIDRv6`.
        #[arg(long)]
        mesh_cidr_v6: Option<String>,
        /// Which pairs of nodes tunnel: cross-location or full.
        #[arg(long, default_value = "cross-location")]
        topology: Topology,
        /// Namespace of the leader-election Lease.
        #[arg(long, default_value = "isthmus-system")]
        lease_namespace: String,
        #[arg(long, default_value = "isthmus-coordinator")]
        lease_name: String,
        /// Namespace of the agents' heartbeat Leases in every cluster served (where the
        /// agents run; `isthmus-agent run --heartbeat-namespace`).
        #[arg(long, default_value = isthmus_api::heartbeat::DEFAULT_NAMESPACE)]
        heartbeat_namespace: String,
        /// This replica's name in the Lease (default: $POD_NAME, else host name and PID).
        #[arg(long)]
        identity: Option<String>,
        /// Seconds a leader's lease lasts without renewal.
        #[arg(long, default_value_t = 10)]
        lease_seconds: u64,
        /// Kubeconfig to use (default: in-cluster, then ~/.kube/config).
        #[arg(long)]
        kubeconfig: Option<std::path::PathBuf>,
        /// Moved to the agent (`isthmus-agent run --handshake-stale-seconds`), which now
        /// decides which of its tunnels are up; accepted and ignored here.
        #[arg(long, hide = true)]
        handshake_stale_seconds: Option<i64>,
        /// A node whose agent has not reported for this long is not connected. Agents
        /// write on change and at least every `--health-interval` (60 s): keep this a few
        /// heartbeats above it.
        #[arg(long, default_value_t = 180)]
        report_stale_seconds: i64,
        /// Secret (in --lease-namespace, beside the Lease) holding the coordinator's key,
        /// which agents prove theirs against; created on first start.
        #[arg(long, default_value = "isthmus-coordinator-key")]
        key_secret: String,
        /// Seconds a peer admitted before keeps its admission while its agent has not yet
        /// answered the key challenge (an upgrade from agents without key proofs).
        #[arg(long, default_value_t = 600)]
        key_proof_grace_seconds: u64,
        /// Serve /metrics, /healthz and /readyz here ("" or "off": don't).
        #[arg(long, default_value = "0.0.0.0:9581")]
        metrics_addr: String,
    },
    /// Print the WireGuardPeer CRD.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    isthmus_ops::daemon::init_tracing();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", isthmus_api::crd_yaml()?);
            Ok(())
        }
        Command::Run {
            multi_cluster,
            cluster_timeout_seconds,
            mesh_cidr,
            mesh_cidr_v6,
            topology,
            lease_namespace,
            heartbeat_namespace,
            lease_name,
            identity,
            lease_seconds,
            kubeconfig,
            handshake_stale_seconds,
            report_stale_seconds,
            key_secret,
            key_proof_grace_seconds,
            metrics_addr,
        } => {
            // First: a SIGTERM while starting up is then handled, not fatal.
            let shutdown = isthmus_ops::daemon::shutdown_signal();
            tokio::pin!(shutdown);
            if handshake_stale_seconds.is_some() {
                tracing::warn!(
                    "--handshake-stale-seconds is ignored: the agents decide which tunnels are up \
                     (isthmus-agent run --handshake-stale-seconds)"
                );
            }
            let metrics_addr =
                isthmus_ops::parse_addr(&metrics_addr).map_err(anyhow::Error::msg)?;
            let cidr = mesh_cidr
                .parse()
                .map_err(|e| anyhow::anyhow!("--mesh-cidr {mesh_cidr:?}: {e:?}"))?;
            let pool = mesh_pool(cidr, mesh_cidr_v6.as_deref())?;
            let identity = identity
                .or_else(|| std::env::var("POD_NAME").ok())
                .unwrap_or_else(|| {
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    format!("{}-{}", host.trim(), std::process::id())
                });
            let ops = Arc::new(CoordinatorOps::default());
            if let Some(addr) = metrics_addr {
                isthmus_ops::serve(addr, ops.clone())
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?;
            }
            let client = isthmus_ops::daemon::kube_client(kubeconfig.as_deref()).await?;
            // The API server may be down at start: wait for it as the watches would.
            let key = loop {
                let load = identity::load_or_create(client.clone(), &lease_namespace, &key_secret);
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    loaded = load => match loaded {
                        Ok(key) => break key,
                        Err(e) => tracing::warn!(error = format!("{e:#}"), "loading the coordinator key; retrying"),
                    },
                }
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            };
            let cluster = ClusterSettings {
                key,
                key_proof_grace: Duration::from_secs(key_proof_grace_seconds),
                heartbeat_namespace,
                pool,
                topology,
                // Often enough that a silent agent turns MeshConnected false on time.
                resync: Duration::from_secs(
                    u64::try_from(report_stale_seconds / 3)
                        .unwrap_or(1)
                        .clamp(1, 30),
                ),
                health: isthmus_coordinator::health::Thresholds {
                    report: report_stale_seconds,
                    ..Default::default()
                },
            };
            let lease = LeaseSettings {
                namespace: lease_namespace,
                name: lease_name,
                identity,
                duration: Duration::from_secs(lease_seconds.max(2)),
            };
            if multi_cluster {
                let settings = MultiSettings {
                    defaults: cluster,
                    lease,
                    cluster_timeout: Duration::from_secs(cluster_timeout_seconds.max(1)),
                    resync: Duration::from_secs(5),
                };
                multi::run(client, settings, ops, shutdown).await
            } else {
                controller::run(client, Settings { cluster, lease }, ops, shutdown).await
            }
        }
    }
}

/// The pool from `--mesh-cidr` and `--mesh-cidr-v6` (the first IPv4, the second IPv6: one
/// address of each family per node). In multi-cluster mode it is the default of the
/// clusters whose MeshCluster names no pool of its own.
fn mesh_pool(cidr: IpNetwork, v6: Option<&str>) -> anyhow::Result<Pool> {
    let v6 = v6
        .map(|v6| {
            v6.parse::<IpNetwork>()
                .map_err(|e| anyhow::anyhow!("--mesh-cidr-v6 {v6:?}: {e:?}"))
        })
        .transpose()?;
    Pool::dual_stack(cidr, v6).map_err(|e| anyhow::anyhow!("--mesh-cidr-v6 with --mesh-cidr: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_pool_is_ipv6_beside_an_ipv4_one() {
        let v4: IpNetwork = "100.96.0.0/16".parse().unwrap();
        let v6: IpNetwork = "fd96::/64".parse().unwrap();
        assert_eq!(mesh_pool(v4, None).unwrap().v6, None);
        assert_eq!(mesh_pool(v4, Some("fd96::/64")).unwrap().v6, Some(v6));
        for (cidr, second) in [(v4, "100.97.0.0/16"), (v6, "fd97::/64"), (v4, "not a cidr")] {
            assert!(mesh_pool(cidr, Some(second)).is_err(), "{cidr} {second}");
        }
    }
}
