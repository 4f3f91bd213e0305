//! The scale test's full measurement (issue 14, part 3), run by hand as root:
//!
//! ```text
//! cargo run --release -p isthmus-tests --bin isthmus-scale -- --clusters 10 --nodes 100
//! cargo run --release -p isthmus-tests --bin isthmus-scale -- --clusters 1 --nodes 1000
//! ```
//!
//! Prints the figures as a Markdown table (tests/src/scale.rs says what each one is).
//! `make test` runs a short form (tests/tests/scale.rs).

use std::time::Duration;

use anyhow::{bail, Context};
use isthmus_tests::scale::{run, ScaleOptions};

fn parse(args: &[String]) -> anyhow::Result<ScaleOptions> {
    let mut o = ScaleOptions {
        clusters: 10,
        nodes: 100,
        real_agents: 2,
        heartbeat: Duration::from_secs(60),
        window: Duration::from_secs(180),
        joins: 5,
        settle: Duration::from_secs(300),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value: u64 = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} takes a number"))?;
        let n = usize::try_from(value)?;
        match flag.as_str() {
            "--clusters" => o.clusters = n,
            "--nodes" => o.nodes = n,
            "--real-agents" => o.real_agents = n,
            "--heartbeat" => o.heartbeat = Duration::from_secs(value),
            "--window" => o.window = Duration::from_secs(value),
            "--joins" => o.joins = n,
            "--settle" => o.settle = Duration::from_secs(value),
            _ => bail!(
                "unknown flag {flag}; flags: --clusters --nodes --real-agents --heartbeat \
                 (s) --window (s) --joins --settle (s)"
            ),
        }
    }
    Ok(o)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = parse(&args)?;
    eprintln!("{options:?}");
    let figures = run(&options).await?;
    println!("{figures}");
    Ok(())
}
