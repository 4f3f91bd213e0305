//! `isthmus-agent`: the per-node daemon and the operator's CLI.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use isthmus_agent::control::options::{RoutingOptions, RunOptions};
use isthmus_agent::control::publish::PublishOptions;
use isthmus_agent::control::run::{cleanup, run};
use isthmus_routing::Mode;
use isthmus_wg::offload::gro::MAX_VXLAN_PORTS;
use isthmus_wg::tunnel::{Tunnel, DEFAULT_MTU};
use isthmus_wg::uapi::server;

#[derive(Parser)]
#[command(name = "isthmus-agent", version, about = "isthmus node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a WireGuard tunnel in the foreground: creates the TUN device and serves the UAPI
    /// socket /var/run/wireguard/IFACE.sock, so `wg` configures and inspects it.
    Tunnel {
        /// Name of the TUN device to create.
        #[arg(long, default_value = "isthmus0")]
        iface: String,
        /// UDP port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
        /// MTU of the TUN device.
        #[arg(long, default_value_t = DEFAULT_MTU)]
        mtu: u16,
        /// UDP port of a local VXLAN device (its `dstport`; flannel's is 8472) whose
        /// traffic arrives through this tunnel: TCP inside it is written to the TUN as
        /// 64 KiB tunnel super-packets (kernel ≥ 6.17). Repeat for more (up to 4). Name only
        /// ports a VXLAN device listens on.
        #[arg(long = "vxlan-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
        vxlan_ports: Vec<u16>,
    },
    /// The node agent (DaemonSet): tunnel, publish this node's WireGuardPeer, follow the
    /// admitted peers, steer cross-location overlay traffic into the tunnel.
    Run(Box<RunArgs>),
    /// One row per peer: node, location, endpoint, mesh IP, latest handshake, rx/tx, state
    /// (up / stale / never).
    Peers {
        #[arg(long, default_value = "isthmus0")]
        iface: String,
        /// Stable JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Kubeconfig for node names and mesh IPs (default: in-cluster; without an API the
        /// rows show public keys).
        #[arg(long)]
        kubeconfig: Option<std::path::PathBuf>,
        /// The running agent's state directory, for the path MTUs it found.
        #[arg(long, default_value = "/var/lib/isthmus")]
        state_dir: std::path::PathBuf,
    },
    /// This node: public key, mode, topology, mesh IP, journal, API connectivity, peers.
    Status {
        #[arg(long, default_value = "/var/lib/isthmus")]
        state_dir: std::path::PathBuf,
        #[arg(long, default_value = "isthmus0")]
        iface: String,
        #[arg(long)]
        json: bool,
    },
    /// Rotate this node's WireGuard key without a lost packet: writes the new key where the
    /// running agent picks it up, which publishes it, lets the peers move over and then
    /// retires the old key. Waits for the retirement (at most --timeout-seconds).
    RotateKey {
        #[arg(long, default_value = "/var/lib/isthmus")]
        state_dir: std::path::PathBuf,
        /// How long to wait for the old key's retirement (0: don't wait; the agent
        /// finishes the rotation either way).
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
    /// Restore the routing a killed agent left behind, from the journal in the state
    /// directory. Safe to repeat: a second run does nothing.
    Cleanup {
        #[arg(long, default_value = "/var/lib/isthmus")]
        state_dir: std::path::PathBuf,
        /// The tunnel device, whose stale UAPI socket is removed.
        #[arg(long, default_value = "isthmus0")]
        iface: String,
        /// For sandboxes and tests: the node's network namespace (a path).
        #[arg(long)]
        netns: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (the WireGuardPeer is named after it).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where the node key lives (created once, mode 0600).
    #[arg(long, default_value = "/var/lib/isthmus")]
    state_dir: std::path::PathBuf,
    #[arg(long, default_value = "isthmus0")]
    iface: String,
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Tunnel MTU (default: the underlay's, from the default route's device, minus 80).
    #[arg(long)]
    mtu: Option<u16>,
    /// How cross-location pod traffic reaches the tunnel.
    #[arg(long, value_enum, default_value_t = Mode::Vxlan)]
    routing: Mode,
    /// flannel's VXLAN device (mode `vxlan`).
    #[arg(long, default_value = "flannel.1")]
    vxlan_device: String,
    /// flannel's IPv6 VXLAN device on dual-stack nodes (mode `vxlan`); in a dual-stack mesh
    /// (the coordinator's `--mesh-cidr-v6`) its FDB entries are pointed at the IPv6 mesh IPs.
    #[arg(long, default_value = "flannel-v6.1")]
    vxlan_device_v6: String,
    /// Routing table for remote pod CIDRs (mode `routed`).
    #[arg(long, default_value_t = 51820)]
    table: u32,
    /// Priority of the rule that looks the table up (mode `routed`).
    #[arg(long, default_value_t = 5210)]
    rule_priority: u32,
    /// host:port the other nodes dial (default: node IP and listen port); set it when the
    /// node is reached through NAT or a public address.
    #[arg(long)]
    endpoint: Option<String>,
    /// Location override (default: the Node's topology.kubernetes.io/region label).
    #[arg(long)]
    location: Option<String>,
    /// Node IP override (default: the Node's first InternalIP).
    #[arg(long)]
    node_ip: Option<String>,
    /// The heartbeat, in seconds: the agent renews its Lease `isthmus-agent-<node>` this
    /// often, so the coordinator knows it is alive, and writes the health report in its
    /// WireGuardPeer status only when the report changes (checked every 5 s). Where the
    /// Lease cannot be written (RBAC from before Leases) the report is rewritten this often
    /// instead. 0: neither.
    #[arg(long, default_value_t = 60)]
    health_interval: u64,
    /// The namespace of the heartbeat Lease: the one isthmus is installed in.
    #[arg(long, env = "POD_NAMESPACE", default_value = isthmus_api::heartbeat::DEFAULT_NAMESPACE)]
    heartbeat_namespace: String,
    /// A tunnel whose latest handshake is older than this many seconds is reported down
    /// (WireGuard rejects a session after 180 s; keep it above the 120 s rekey).
    #[arg(long, default_value_t = 180)]
    handshake_stale_seconds: u64,
    /// Keepalive the peers send to this node, in seconds (keeps NAT mappings open).
    #[arg(long, default_value_t = 25)]
    keepalive: u16,
    /// Kubeconfig (default: in-cluster).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// For sandboxes and tests: create the tunnel and netlink sockets in this network
    /// namespace (a path like /var/run/netns/NAME) while talking to the API from here.
    #[arg(long)]
    netns: Option<std::path::PathBuf>,
    /// Serve /metrics, /healthz and /readyz here ("" or "off": don't).
    #[arg(long, default_value = "0.0.0.0:9580")]
    metrics_addr: String,
    /// UDP port for path MTU probes between agents, on the mesh IP inside the tunnel (0:
    /// no probing; routes then keep the tunnels' MTU).
    #[arg(long, default_value_t = isthmus_agent::control::probe::DEFAULT_PORT)]
    pmtu_port: u16,
    /// Rotate the node key this often, without a lost packet: seconds or a number with a
    /// unit (90s, 30m, 12h, 7d); 0: only on `isthmus-agent rotate-key`.
    #[arg(long, value_parser = isthmus_agent::control::options::parse_duration)]
    key_rotation_interval: Option<std::time::Duration>,
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    check_iface(&args.iface)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let opts = RunOptions {
        node_name: args.node_name,
        state_dir: args.state_dir,
        iface: args.iface,
        mtu: args.mtu,
        publish: PublishOptions {
            endpoint: args.endpoint,
            location: args.location,
            node_ip: args.node_ip,
            listen_port: args.listen_port,
            keepalive: args.keepalive,
            vtep: None,
            vtep6: None,
            mtu: None,
        },
        routing: RoutingOptions {
            mode: args.routing,
            vxlan_device: args.vxlan_device,
            vxlan_device_v6: args.vxlan_device_v6,
            table: args.table,
            rule_priority: args.rule_priority,
        },
        kubeconfig: args.kubeconfig,
        netns: args.netns,
        health_interval: (args.health_interval > 0)
            .then(|| std::time::Duration::from_secs(args.health_interval)),
        heartbeat_namespace: args.heartbeat_namespace,
        handshake_stale: std::time::Duration::from_secs(args.handshake_stale_seconds),
        metrics_addr: isthmus_ops::parse_addr(&args.metrics_addr).map_err(anyhow::Error::msg)?,
        pmtu_port: (args.pmtu_port != 0).then_some(args.pmtu_port),
        key_rotation_interval: args.key_rotation_interval.filter(|d| !d.is_zero()),
    };
    runtime.block_on(async { run(opts, isthmus_ops::daemon::shutdown_signal()).await })
}

fn peer_rows(
    iface: &str,
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<Vec<isthmus_agent::cli::peers::PeerRow>> {
    let snapshot = isthmus_wg::uapi::client::get(iface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let peers = match runtime.block_on(isthmus_agent::cli::list_peers(kubeconfig)) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "no node names: the API is not reachable"
            );
            Vec::new()
        }
    };
    Ok(isthmus_agent::cli::peers::rows(
        &snapshot,
        &peers,
        std::time::SystemTime::now(),
    ))
}

fn run_peers(
    iface: &str,
    json: bool,
    kubeconfig: Option<&std::path::Path>,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    check_iface(iface)?;
    let mut rows = peer_rows(iface, kubeconfig)?;
    match isthmus_agent::control::runtime::read(state_dir) {
        Ok(Some(r)) => isthmus_agent::cli::peers::with_path_mtus(&mut rows, &r.path_mtus),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = format!("{e:#}"), "no path MTUs"),
    }
    let out = if json {
        isthmus_agent::cli::peers::json(&rows)? + "\n"
    } else {
        isthmus_agent::cli::peers::render(&rows)
    };
    print!("{out}");
    Ok(())
}

fn run_status(state_dir: &std::path::Path, iface: &str, json: bool) -> anyhow::Result<()> {
    use isthmus_agent::cli::status::{count, render, Status};
    use isthmus_agent::control::{keys, lock::StateLock, runtime};
    check_iface(iface)?;
    let agent_running = StateLock::try_acquire(state_dir)?.is_none();
    let rows = if agent_running {
        // Names come from the agent's own view; the API is not asked here.
        isthmus_wg::uapi::client::get(iface)
            .map(|snap| isthmus_agent::cli::peers::rows(&snap, &[], std::time::SystemTime::now()))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let status = Status {
        public_key: keys::public_key(state_dir)?.map(|k| k.to_base64()),
        agent_running,
        runtime: runtime::read(state_dir)?,
        journal_entries: isthmus_routing::journal::Journal::open(state_dir)?.len(),
        peers: count(&rows),
    };
    let out = if json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        render(&status)
    };
    print!("{out}");
    Ok(())
}

fn run_cleanup(
    state_dir: &std::path::Path,
    iface: &str,
    netns: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    check_iface(iface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(cleanup(state_dir, netns))?;
    server::remove_stale_socket(iface)?;
    Ok(())
}

fn check_iface(iface: &str) -> anyhow::Result<()> {
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
        anyhow::bail!("interface name {iface:?} must be 1 to 15 characters, no '/' or spaces");
    }
    Ok(())
}

fn run_tunnel(iface: &str, listen_port: u16, mtu: u16, vxlan_ports: &[u16]) -> anyhow::Result<()> {
    check_iface(iface)?;
    if vxlan_ports.len() > MAX_VXLAN_PORTS {
        anyhow::bail!(
            "--vxlan-port: at most {MAX_VXLAN_PORTS}, got {}",
            vxlan_ports.len()
        );
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let tunnel = Tunnel::start(iface, listen_port, mtu)?;
    tunnel.set_vxlan_ports(vxlan_ports);
    let signals_handle = signals.handle();
    // A tunnel that stopped ends the wait as a signal would, so the socket goes too.
    tunnel.on_failure(move || signals_handle.close());
    let uapi = server::serve(iface, Arc::new(tunnel.clone()))?;
    if let Some(sig) = signals.forever().next() {
        let gro = tunnel.gro_stats();
        let sent = tunnel.send_stats();
        let received = tunnel.recv_stats();
        tracing::info!(
            signal = sig,
            sent_datagrams = sent.datagrams,
            send_calls = sent.calls,
            received_datagrams = received.datagrams,
            receive_calls = received.calls,
            gro_tcp_merged = gro.tcp_merged,
            gro_tcp_writes = gro.tcp_writes,
            gro_udp_merged = gro.udp_merged,
            gro_udp_writes = gro.udp_writes,
            gro_vxlan_merged = gro.vxlan_merged,
            gro_vxlan_writes = gro.vxlan_writes,
            "shutting down"
        );
    }
    // Removing the socket file is the only cleanup that outlives us: the kernel deletes the
    // TUN device and closes the sockets when the process exits.
    drop(uapi);
    match tunnel.failure() {
        Some(why) => anyhow::bail!("{iface}: {why}"),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    isthmus_ops::daemon::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tunnel {
            iface,
            listen_port,
            mtu,
            vxlan_ports,
        } => run_tunnel(&iface, listen_port, mtu, &vxlan_ports),
        Command::Run(args) => run_agent(*args),
        Command::Peers {
            iface,
            json,
            kubeconfig,
            state_dir,
        } => run_peers(&iface, json, kubeconfig.as_deref(), &state_dir),
        Command::Status {
            state_dir,
            iface,
            json,
        } => run_status(&state_dir, &iface, json),
        Command::Cleanup {
            state_dir,
            iface,
            netns,
        } => run_cleanup(&state_dir, &iface, netns.as_deref()),
        Command::RotateKey {
            state_dir,
            timeout_seconds,
        } => isthmus_agent::cli::rotate::rotate_key(
            &state_dir,
            std::time::Duration::from_secs(timeout_seconds),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed_and_takes_a_rotation_interval() {
        Cli::command().debug_assert();
        let parse = |extra: &[&str]| {
            let mut args = vec!["isthmus-agent", "run", "--node-name", "n1"];
            args.extend_from_slice(extra);
            match Cli::try_parse_from(args).map(|c| c.command) {
                Ok(Command::Run(a)) => a.key_rotation_interval,
                _ => panic!("{extra:?} did not parse"),
            }
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(
            parse(&["--key-rotation-interval", "12h"]),
            Some(std::time::Duration::from_secs(43_200))
        );
        assert_eq!(
            parse(&["--key-rotation-interval", "0"]),
            Some(std::time::Duration::ZERO)
        );
    }
}
