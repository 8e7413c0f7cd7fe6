//! `cargo xtask pgo`: profile-guided optimisation. Trains an instrumented muxer under the
//! benchmark's own loads and writes the merged profile that every release build then uses
//! (docs/pgo.md says why and what it buys).
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::build::{self, target_dir, workspace_root};
use crate::setup::{self, status};

/// The committed profile, merged sparse (functions training never ran carry no profile rather
/// than a "cold" one, so the paths it did not exercise are optimised as without PGO).
const PROFILE: &str = "muxer/pgo/muxer.profdata";
/// Which sources and toolchain the profile was trained on.
const TRAINED_ON: &str = "muxer/pgo/trained-on";
/// What the profile describes: when any of these change, parts of it go stale.
const SOURCES: &[&str] = &[
    "muxer/src",
    "muxer/Cargo.toml",
    "muxer-common/src",
    "Cargo.lock",
];
/// The benchmark's contenders the training runs: HTTP and HTTPS keep-alive and new connections,
/// bulk splice and copy, SSE, idle connections; at the default log level and at `warn`.
const TRAINING: &[&str] = &["--quick", "--only", "muxer,muxer-default-log,muxer-splice"];

/// Adds the committed profile to `command`'s RUSTFLAGS (every crate of the build: fat LTO
/// optimises hyper's and tokio's code in muxer's unit, with their profile). Without a profile
/// the build goes on without PGO, saying so.
pub(crate) fn use_profile(command: &mut Command) {
    let profile = workspace_root().join(PROFILE);
    if !profile.exists() {
        eprintln!("xtask: no {PROFILE}, so no PGO; `cargo xtask pgo` trains one");
        return;
    }
    // Hashing the sources once per xtask run (a bench builds two binaries) and saying so once.
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        let current = sources_digest(&workspace_root()).ok();
        let trained = std::fs::read_to_string(workspace_root().join(TRAINED_ON)).ok();
        let fresh = matches!((&current, &trained), (Some(now), Some(recorded))
            if recorded.lines().next() == Some(format!("sources {now}").as_str()));
        if !fresh {
            eprintln!(
                "xtask: {PROFILE} was trained on other sources: what changed since builds \
                 without its guidance until `cargo xtask pgo` refreshes it"
            );
        }
    });
    let profile = profile.canonicalize().unwrap_or(profile);
    // A function whose code changed since training is compiled without profile; LLVM would warn
    // once per such function, the line above says it once.
    let flags = format!(
        "-Cprofile-use={} -Cllvm-args=-no-pgo-warn-mismatch",
        profile.display()
    );
    command.env("RUSTFLAGS", with_user_flags(&flags));
}

/// `flags` after whatever RUSTFLAGS the user set.
fn with_user_flags(flags: &str) -> String {
    match std::env::var("RUSTFLAGS") {
        Ok(user) if !user.trim().is_empty() => format!("{user} {flags}"),
        _ => flags.to_owned(),
    }
}

/// Builds an instrumented muxer, runs the benchmark's muxer loads against it, and merges what it
/// recorded into [`PROFILE`].
pub(crate) fn run() -> Result<()> {
    setup::run()?;
    setup::debian_packages(crate::bench::BENCH_PACKAGES)?;
    let profdata = llvm_profdata()?;
    let work = target_dir().join("pgo");
    let raw = work.join("raw");
    let instrumented = instrumented_build(&work, &raw)?;
    // The build's scripts and proc macros were instrumented too and wrote profiles of their own.
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw).with_context(|| format!("create {}", raw.display()))?;
    let bench = build::release_bin("muxer-tests", "muxer-bench")?;
    let report = work.join("training-report.md");
    status(
        setup::privileged(&bench.display().to_string())
            .current_dir(workspace_root())
            .args(TRAINING)
            .arg("--out")
            .arg(&report)
            .env("MUXER_BIN", &instrumented),
    )?;
    if profiles_in(&raw)? == 0 {
        bail!(
            "the instrumented muxer wrote no profile into {} (it writes one when it exits on \
             SIGTERM)",
            raw.display()
        );
    }
    let profile = workspace_root().join(PROFILE);
    if let Some(dir) = profile.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    status(
        Command::new(&profdata)
            .args(["merge", "--sparse", "-o"])
            .arg(&profile)
            .arg(&raw),
    )?;
    let trained_on = format!(
        "sources {}\n{}training: muxer-bench {}\n",
        sources_digest(&workspace_root())?,
        rustc(&["-V"])?,
        TRAINING.join(" ")
    );
    std::fs::write(workspace_root().join(TRAINED_ON), trained_on)?;
    eprintln!("xtask: wrote {PROFILE}; commit it with {TRAINED_ON}");
    Ok(())
}

/// Builds muxer instrumented to count into `raw`, in a target directory of its own (its flags
/// differ from every other build's). Returns the binary's path.
fn instrumented_build(work: &Path, raw: &Path) -> Result<PathBuf> {
    let target = work.join("instrumented");
    let flags = format!("-Cprofile-generate={}", absolute(raw)?.display());
    status(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["build", "--release", "--package", "muxer"])
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", with_user_flags(&flags)),
    )?;
    Ok(target.join("release").join("muxer"))
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    Ok(path.canonicalize()?)
}

/// How many raw profiles `dir` holds.
fn profiles_in(dir: &Path) -> Result<usize> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "profraw"))
        .count())
}

/// The toolchain's own llvm-profdata (rustup's llvm-tools: its LLVM reads what rustc writes),
/// installed when missing.
fn llvm_profdata() -> Result<PathBuf> {
    let sysroot = rustc(&["--print", "sysroot"])?;
    let version = rustc(&["-vV"])?;
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .context("rustc -vV names no host")?;
    let path = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !path.exists() {
        eprintln!("xtask: installing rustup's llvm-tools (llvm-profdata)");
        status(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    }
    Ok(path)
}

/// `rustc ARGS` as the workspace's builds run it (its directory picks the toolchain).
fn rustc(args: &[&str]) -> Result<String> {
    setup::output(
        Command::new("rustc")
            .current_dir(workspace_root())
            .args(args),
    )
}

/// SHA-256 over the paths (relative to `root`) and contents of [`SOURCES`], files in sorted order.
fn sources_digest(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    for source in SOURCES {
        collect_files(&root.join(source), &mut files)?;
    }
    files.sort();
    let mut hasher = Sha256::new();
    for file in &files {
        let relative = file.strip_prefix(root).unwrap_or(file);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(std::fs::read(file).with_context(|| format!("read {}", file.display()))?);
        hasher.update([0]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("read {}", path.display()))? {
            collect_files(&entry?.path(), files)?;
        }
    } else {
        files.push(path.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree with every source the digest reads.
    fn sources(root: &Path) {
        for source in SOURCES {
            let path = root.join(source);
            if path.extension().is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, "[package]\n").unwrap();
            } else {
                std::fs::create_dir_all(&path).unwrap();
                std::fs::write(path.join("lib.rs"), "fn a() {}\n").unwrap();
            }
        }
    }

    #[test]
    fn the_sources_digest_follows_content_and_names_not_the_checkout_path() {
        let base = std::env::temp_dir().join(format!("xtask-pgo-{}", std::process::id()));
        let (one, two) = (base.join("one"), base.join("two"));
        sources(&one);
        sources(&two);
        let digest = sources_digest(&one).unwrap();
        assert_eq!(
            digest,
            sources_digest(&two).unwrap(),
            "same sources elsewhere"
        );
        std::fs::write(two.join("muxer/src/lib.rs"), "fn b() {}\n").unwrap();
        assert_ne!(digest, sources_digest(&two).unwrap(), "an edited file");
        std::fs::write(two.join("muxer/src/lib.rs"), "fn a() {}\n").unwrap();
        std::fs::write(two.join("muxer/src/new.rs"), "").unwrap();
        assert_ne!(digest, sources_digest(&two).unwrap(), "a new file");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
