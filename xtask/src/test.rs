//! `cargo xtask test`: every test, the network-namespace and eBPF ones included.
use std::process::Command;

use anyhow::Result;

use crate::build;
use crate::setup::{self, status};

/// Sets up, builds the debug binary the integration tests start, and runs the whole suite. As
/// root (and always in CI) the namespace tests must run rather than skip.
pub(crate) fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let binary = build::muxer("dev")?;
    let mut command = Command::new("cargo");
    command
        .current_dir(build::workspace_root())
        .args(["test", "--workspace", "--exclude", "muxer-ebpf"])
        .args(args)
        // One test at a time: several assert timings (SSE within 20 ms, probe and idle timeouts)
        // that a neighbouring 100 MiB transfer on a 2-core machine would disturb.
        .args(["--", "--test-threads=1"])
        .env("MUXER_BIN", &binary)
        .env("MUXER_TEST_PYTHON", setup::openai_python());
    if setup::is_root() {
        command.env("MUXER_REQUIRE_NETNS", "1");
    } else {
        eprintln!(
            "xtask: WARNING: not root, so the network-namespace and eBPF tests will be SKIPPED"
        );
    }
    status(&mut command)
}
