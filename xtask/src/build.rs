//! `cargo xtask build`: the release binary, with the eBPF object embedded by muxer's build.rs and
//! optimised with the committed profile of muxer under the benchmark's load (docs/pgo.md).
use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::setup::status;

/// The workspace root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Cargo's target directory (`CARGO_TARGET_DIR` when set).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), Into::into)
}

/// Builds `muxer` with `profile` ("release" or "dev") and returns the binary's path. Release
/// builds use the committed PGO profile when there is one.
pub(crate) fn muxer(profile: &str) -> Result<PathBuf> {
    binary(profile, "muxer", "muxer")
}

/// Builds another release binary of the workspace with the same flags as muxer's (so the two
/// builds share their compiled dependencies instead of rebuilding them in turn).
pub(crate) fn release_bin(package: &str, bin: &str) -> Result<PathBuf> {
    binary("release", package, bin)
}

/// Builds `package`'s binary `bin` with `profile`, with the PGO profile in release builds, and
/// returns its path.
fn binary(profile: &str, package: &str, bin: &str) -> Result<PathBuf> {
    let mut command = Command::new("cargo");
    command.current_dir(workspace_root()).args([
        "build",
        "--package",
        package,
        "--bin",
        bin,
        "--profile",
        profile,
    ]);
    if profile == "release" {
        crate::pgo::use_profile(&mut command);
    }
    status(&mut command)?;
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(target_dir().join(dir).join(bin))
}

/// Builds the release binary.
pub(crate) fn release() -> Result<PathBuf> {
    crate::setup::run()?;
    muxer("release")
}
