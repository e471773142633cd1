//! `shoal`: the operator's command-line tool.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Operate the Shoal lazy-pulling snapshotter",
    long_about = "Operate the Shoal lazy-pulling snapshotter.\n\nThe daemon itself is \
`shoal-snapshotter`; see `shoal-snapshotter --help` and docs/containerd.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version of this build.
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!("shoal {}", env!("CARGO_PKG_VERSION")),
    }
}
