//! `skiff`: the command line of the skiff router.

use clap::Parser;

/// skiff connects services across sites into one application network secured with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "skiff", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
