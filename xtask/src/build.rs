//! `cargo xtask build`: the release binary, with the eBPF object embedded by muxer's build.rs.
use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::setup::status;

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds `muxer` with `profile` ("release" or "dev") and returns the binary's path.
pub(crate) fn muxer(profile: &str) -> Result<PathBuf> {
    let root = workspace_root();
    status(Command::new("cargo").current_dir(&root).args([
        "build",
        "--package",
        "muxer",
        "--profile",
        profile,
    ]))?;
    let dir = if profile == "dev" { "debug" } else { profile };
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join(dir).join("muxer"))
}

/// Builds the release binary.
pub(crate) fn release() -> Result<PathBuf> {
    crate::setup::run()?;
    muxer("release")
}
