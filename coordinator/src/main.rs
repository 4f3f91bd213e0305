//! `isthmus-coordinator`: admits WireGuardPeers, allocates mesh IPs and computes the
//! topology. Built by the control-plane issue; until then it only says so.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "isthmus-coordinator",
    version,
    about = "isthmus coordinator (control-plane issue)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    Cli::parse();
    anyhow::bail!("the coordinator is not built yet; see the control-plane issue")
}
