//! The command line's contract for bad input: one line naming the file and key, exit code 2,
//! nothing started. Needs no privileges.
use std::process::Command;
use std::time::{Duration, Instant};

use muxer_tests::muxer::binary;

fn muxer(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run muxer")
}

#[test]
fn run_with_a_bad_config_exits_2_with_one_line_naming_the_key_and_listens_on_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    // A free port: if muxer started anything before validating, it would bind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &path,
        format!("[listen]\naddresses = [\"127.0.0.1:{port}\"]\n[sniff]\ntimeout = \"soon\"\n[ssh]\nupstream = \"127.0.0.1:22\"\n"),
    )
    .unwrap();
    let started = Instant::now();
    let output = muxer(&["run", "--config", path.to_str().unwrap()]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("sniff.timeout"),
        "{stderr}"
    );
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port must still be free");
}

#[test]
fn missing_config_file_is_a_one_line_error() {
    let output = muxer(&["run", "--config", "/nonexistent/muxer.toml"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/muxer.toml"), "{stderr}");
}

#[test]
fn check_accepts_the_bundled_config_and_rejects_a_bad_one() {
    let bundled = concat!(env!("CARGO_MANIFEST_DIR"), "/../muxer.toml");
    let output = muxer(&["check", "--config", bundled]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "[ssh]\nupstrem = \"127.0.0.1:22\"\n").unwrap();
    let output = muxer(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("ssh.upstrem"), "{stderr}");
}

#[test]
fn stats_and_reload_say_clearly_when_muxer_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    for command in ["stats", "reload"] {
        let output = muxer(&[command, "--socket", socket.to_str().unwrap()]);
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains("muxer is not running"),
            "{command}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
