//! `cargo xtask bench [--quick]`: release builds, the contenders' Debian packages, then the
//! benchmark binary (`tests/src/bin/muxer-bench.rs`), which writes `target/bench/report.md`.
use std::process::Command;

use anyhow::Result;

use crate::build::workspace_root;
use crate::setup::{self, status};

/// What the contenders and the load generators need.
const BENCH_PACKAGES: &[&str] = &[
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
    let root = workspace_root();
    crate::build::muxer("release")?;
    status(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "muxer-tests",
        "--bin",
        "muxer-bench",
    ]))?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let release = target.join("release");
    let mut command = setup::privileged(&release.join("muxer-bench").display().to_string());
    command
        .current_dir(&root)
        .args(args)
        .env("MUXER_BIN", release.join("muxer"));
    status(&mut command)
}
