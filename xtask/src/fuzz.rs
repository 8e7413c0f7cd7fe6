//! `cargo xtask fuzz [--time SECS] [TARGET…]`: runs every cargo-fuzz target in `fuzz/` (or the
//! named ones) for a bounded time each, starting from the committed seeds in `fuzz/seeds/TARGET`
//! and keeping what it learns in `fuzz/corpus/TARGET` (not committed). A crash fails the command;
//! libFuzzer leaves the input in `fuzz/artifacts/TARGET/`, which then becomes a regression test.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build;
use crate::setup::status;

/// Seconds per target unless `--time` says otherwise (CI's budget).
const DEFAULT_SECONDS: u64 = 30;
/// The cargo-fuzz release known to work here.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Parses `--time SECS` and target names, installs cargo-fuzz if missing, and runs the targets.
pub(crate) fn run(args: &[String]) -> Result<()> {
    cargo_fuzz()?;
    let fuzz_dir = build::workspace_root().join("fuzz");
    // The targets as fuzz/Cargo.toml declares them.
    let listed = String::from_utf8(
        Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["fuzz", "list"])
            .output()
            .context("cargo fuzz list")?
            .stdout,
    )?;
    let all: Vec<&str> = listed.split_whitespace().collect();
    let mut seconds = DEFAULT_SECONDS;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--time" {
            let value = args.next().context("--time needs a number of seconds")?;
            seconds = value
                .parse()
                .with_context(|| format!("--time {value:?}: not a number of seconds"))?;
        } else if all.contains(&arg.as_str()) {
            targets.push(arg.as_str());
        } else {
            bail!("unknown fuzz argument {arg:?}; targets: {}", all.join(", "));
        }
    }
    if targets.is_empty() {
        targets = all;
    }
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("create {}", corpus.display()))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        status(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(&seeds)
                .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10"]),
        )
        .with_context(|| {
            format!("fuzz target {target} found a crash: see fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}
