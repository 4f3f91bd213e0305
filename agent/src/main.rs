//! `isthmus-agent`: the per-node daemon and the operator's CLI.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use isthmus_agent::dataplane::tunnel::{Tunnel, DEFAULT_MTU};
use isthmus_agent::uapi::server;

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
    },
}

fn run_tunnel(iface: &str, listen_port: u16, mtu: u16) -> anyhow::Result<()> {
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ']) {
        anyhow::bail!("interface name {iface:?} must be 1 to 15 characters, no '/' or spaces");
    }
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let tunnel = Tunnel::start(iface, listen_port, mtu)?;
    let uapi = server::serve(iface, Arc::new(tunnel))?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
    }
    // Removing the socket file is the only cleanup that outlives us: the kernel deletes the
    // TUN device and closes the sockets when the process exits.
    drop(uapi);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tunnel {
            iface,
            listen_port,
            mtu,
        } => run_tunnel(&iface, listen_port, mtu),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
