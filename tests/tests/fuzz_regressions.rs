//! Every fuzz target's property over its committed seeds and over every input that ever made it
//! fail (`fuzz/regressions/TARGET/`, where a crash found by `cargo xtask fuzz` is copied from
//! `fuzz/artifacts/`), as an ordinary test: no nightly, no libFuzzer.
use std::path::PathBuf;

use muxer_tests::fuzz_checks::TARGETS;

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.file_name().is_some_and(|name| name != ".keep"))
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a readable input");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_seed_and_every_past_crash_holds_its_targets_property() {
    for (target, check) in TARGETS {
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "no seeds for fuzz target {target}");
        for (path, bytes) in seeds.iter().chain(&inputs("regressions", target)) {
            eprintln!("{target}: {}", path.display());
            check(bytes);
        }
    }
}

#[test]
fn the_fuzz_crate_has_a_target_for_every_check() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    for (target, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml lacks target {target}"
        );
    }
}
