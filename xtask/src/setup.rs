//! `cargo xtask setup`: installs what is missing, and does nothing (quickly) when nothing is.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The bpf-linker version known to work with nightly's LLVM (docs/ebpf-build.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Cargo feature of bpf-linker matching nightly's LLVM major version.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Debian packages the tests run for real.
pub(crate) const TEST_PACKAGES: &[&str] = &[
    "openssh-server",
    "openssh-client",
    "curl",
    "iproute2",
    "ethtool",
    "procps",
    "openssl",
    "ca-certificates",
    "bpftool",
    "util-linux",
    "netcat-openbsd",
    "socat",
    "systemd",
    "hostname",
    "python3-venv",
];

/// The official OpenAI Python client the HTTPS tests drive (from PyPI), in a virtual environment.
const OPENAI_CLIENT: &str = "openai>=1.40,<3";

/// Installs everything building and testing need.
pub(crate) fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages(TEST_PACKAGES)?;
    openai_client()?;
    Ok(())
}

/// The virtual environment's python, with the `openai` package.
pub(crate) fn openai_python() -> PathBuf {
    crate::build::workspace_root().join("target/openai-venv/bin/python")
}

/// Creates `target/openai-venv` with the `openai` package, unless it is there already. Debian's
/// python, not whatever `python3` a user's PATH finds first.
fn openai_client() -> Result<()> {
    let python = openai_python();
    let ready = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|out| out.status.success());
    if ready {
        return Ok(());
    }
    let venv = crate::build::workspace_root().join("target/openai-venv");
    eprintln!(
        "xtask: installing the openai Python client into {}",
        venv.display()
    );
    status(
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv),
    )?;
    status(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        OPENAI_CLIENT,
    ]))
}

/// Runs `command`, failing with its name when it does not succeed.
pub(crate) fn status(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs `command` and returns its standard output, failing with its standard error.
pub(crate) fn output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for nightly");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        {
            return Ok(());
        }
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's libLLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let nightly_lib = PathBuf::from(sysroot.trim()).join("lib");
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".cache/muxer-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("create {}", prefix_lib.display()))?;
    let mut versioned = None;
    for entry in std::fs::read_dir(&nightly_lib)
        .with_context(|| format!("read {}", nightly_lib.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM") && name.contains(".so") {
            link(&path, &prefix_lib.join(&name))?;
            if name.starts_with("libLLVM.so.") {
                versioned = Some(path);
            }
        }
    }
    let versioned =
        versioned.with_context(|| format!("no libLLVM.so.* in {}", nightly_lib.display()))?;
    link(&versioned, &prefix_lib.join("libLLVM.so"))?;
    status(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
                "--locked",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

fn link(target: &std::path::Path, at: &std::path::Path) -> Result<()> {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).with_context(|| format!("symlink {}", at.display()))
}

/// Whether the effective user is root.
pub(crate) fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// Prefixes `sudo` unless already root.
pub(crate) fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.arg(program);
        command
    }
}

/// Installs the Debian packages among `packages` that are not installed yet.
pub(crate) fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Status}", package])
                .output()
                .map_or(true, |out| {
                    String::from_utf8_lossy(&out.stdout).trim() != "installed"
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    status(privileged("apt-get").args(["update", "-qq"]))?;
    status(
        privileged("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
