//! Developer tasks: `cargo xtask setup | build | run | test | bench | pgo | fuzz`.
mod bench;
mod build;
mod fuzz;
mod pgo;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "muxer's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (rust-src, bpf-linker, Debian packages). Idempotent.
    Setup,
    /// Build the release binary (eBPF programs embedded, optimised with the committed PGO profile).
    Build,
    /// Set up, build, and run `muxer run --config muxer.toml` as root (via sudo when needed).
    Run {
        /// Extra arguments for `muxer run`; `--config FILE` replaces the bundled muxer.toml.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark muxer against direct, the seed's sslh+iptables+Caddy stack and HAProxy.
    Bench {
        /// `--quick` (one short run, under 2 minutes), `--out FILE` (default target/bench/report.md),
        /// `--only direct,seed-select,muxer` (a subset of the contenders, while tuning),
        /// `--shape 1|2` (wrk threads and nginx workers; default: both), `--lab local|remote`
        /// (remote: load generators on CPU 0, proxy and backends on CPU 1), `--runs N`
        /// (interleaved runs per contender in full mode; default 3).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Train the PGO profile release builds use: an instrumented muxer under the benchmark's
    /// muxer loads, merged into muxer/pgo/muxer.profdata (commit it with muxer/pgo/trained-on).
    Pgo,
    /// Run every cargo-fuzz target (or the named ones) from the committed seeds for a bounded time.
    Fuzz {
        /// `--time SECS` per target (default 30), then target names (default: all).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test, including the network-namespace and eBPF ones (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build => build::release().map(drop),
        Command::Run { args } => run::run(&args),
        Command::Test { args } => test::run(&args),
        Command::Bench { args } => bench::run(&args),
        Command::Pgo => pgo::run(),
        Command::Fuzz { args } => fuzz::run(&args),
    }
}
