//! `cargo xtask bench [--quick]`: release builds, the contenders' Debian packages, then the
//! benchmark binary (`tests/src/bin/muxer-bench.rs`), which writes `target/bench/report.md`.
use anyhow::Result;

use crate::build;
use crate::setup::{self, status};

/// What the contenders and the load generators need.
pub(crate) const BENCH_PACKAGES: &[&str] = &[
    "nginx-light",
    "iperf3",
    "wrk",
    "sslh",
    "caddy",
    "haproxy",
    "iptables",
];

/// Runs the benchmark; `args` go to the benchmark binary (`--quick`, `--out FILE`).
pub(crate) fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    setup::debian_packages(BENCH_PACKAGES)?;
    let muxer = build::muxer("release")?;
    let bench = build::release_bin("muxer-tests", "muxer-bench")?;
    let mut command = setup::privileged(&bench.display().to_string());
    command
        .current_dir(build::workspace_root())
        .args(args)
        .env("MUXER_BIN", muxer);
    status(&mut command)
}
