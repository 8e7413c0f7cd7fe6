//! `cargo xtask run`: set up, build, and run muxer with the bundled config as root.
use anyhow::{bail, Result};

use crate::build;
use crate::setup::privileged;

/// Runs `muxer run --config muxer.toml ARGS`; an explicit `--config`/`-c` in ARGS wins.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let binary = build::release()?;
    let mut command = privileged(&binary.display().to_string());
    command.current_dir(build::workspace_root()).arg("run");
    if !args
        .iter()
        .any(|a| a == "--config" || a == "-c" || a.starts_with("--config="))
    {
        command.args(["--config", "muxer.toml"]);
    }
    command.args(args);
    eprintln!("xtask: {command:?}");
    let status = command.status()?;
    if !status.success() {
        bail!("muxer exited with {status}");
    }
    Ok(())
}
