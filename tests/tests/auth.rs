//! API keys per HTTP route (`[http.route.auth]`), end to end with curl: without a valid key a
//! request gets 401 and nothing reaches the upstream; with one it is forwarded without the key
//! (unless the route keeps it); repeated failures from one network get 429; keys come from the
//! file, the environment and a key file, and never appear in muxer's log.
use std::sync::atomic::Ordering;

use muxer_tests::backends::{self, HttpOptions};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, SERVER_V4};
use muxer_tests::netns_available;

const ENV_KEY: &str = "sk-env-3b9e2c";
const FILE_KEY: &str = "sk-file-77d0a1";
const KEPT_KEY: &str = "sk-kept-5c21f0";

#[test]
fn a_route_with_api_keys_answers_only_requests_that_carry_one() {
    if !netns_available("a_route_with_api_keys_answers_only_requests_that_carry_one") {
        return;
    }
    let link = Link::new();
    let llm = backends::http_with(
        &link.server,
        "127.0.0.1:30000".parse().unwrap(),
        "llm",
        HttpOptions::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, format!("# one key per line\n{FILE_KEY}\n")).unwrap();
    // A Basic user whose hash comes from `muxer hash-password`, as the README says.
    let mut hashing = std::process::Command::new(muxer_tests::muxer::binary())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(hashing.stdin.as_mut().unwrap(), b"correct horse battery\n").unwrap();
    let hashed = hashing.wait_with_output().unwrap();
    assert!(hashed.status.success());
    let hash = String::from_utf8(hashed.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let config = format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\"]\n[sniff]\non_timeout = \"close\"\n\
         [[http.route]]\nname = \"api\"\npath = \"/api/\"\nstrip_prefix = true\n\
         upstreams = [\"127.0.0.1:30000\"]\n\
         [http.route.auth]\nbearer_env = \"MUXER_TEST_API_KEY\"\nbearer_file = \"{}\"\n\
         [[http.route]]\nname = \"kept\"\npath = \"/kept/\"\nstrip_prefix = true\n\
         upstreams = [\"127.0.0.1:30000\"]\n\
         [http.route.auth]\nbearer = [\"{KEPT_KEY}\"]\nkeep_credentials = true\n\
         [[http.route]]\nname = \"basic\"\npath = \"/basic/\"\nstrip_prefix = true\n\
         upstreams = [\"127.0.0.1:30000\"]\n\
         [http.route.auth]\nbasic = [\"alice:{hash}\"]\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n",
        key_file.display()
    );
    let env = format!("MUXER_TEST_API_KEY={ENV_KEY}");
    let muxer = Muxer::start_as(
        &link.server,
        &config,
        "127.0.0.1:2222".parse().unwrap(),
        &["env", &env],
    );
    let curl = |path: &str, key: Option<&str>| -> (u16, String) {
        let url = format!("http://{SERVER_V4}:2222{path}");
        let header = key.map(|key| format!("Authorization: Bearer {key}"));
        let mut args = vec!["-sS", "--max-time", "10", "-D", "-", "-o", "-"];
        if let Some(header) = &header {
            args.extend(["-H", header.as_str()]);
        }
        args.push(&url);
        let out = link.client.run_ok("curl", &args);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        (status, out)
    };
    let served = || llm.observed.requests.load(Ordering::Relaxed);

    // No key, a wrong key, a key for another route: 401, and the upstream sees nothing.
    for key in [None, Some("sk-wrong"), Some(KEPT_KEY)] {
        let (status, out) = curl("/api/v1/models", key);
        assert_eq!(status, 401, "{key:?}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"muxer\""),
            "{out}"
        );
    }
    assert_eq!(served(), 0, "nothing reached the upstream");

    // The key from the environment and the one from the key file both work.
    for key in [ENV_KEY, FILE_KEY] {
        let (status, out) = curl("/api/v1/models", Some(key));
        assert_eq!(status, 200, "{out}");
        assert!(out.contains("\"llm\""), "{out}");
    }
    assert_eq!(served(), 2);
    // The key is removed before forwarding, unless the route keeps it.
    let (_, headers) = curl("/api/headers", Some(ENV_KEY));
    assert!(
        !headers.to_ascii_lowercase().contains("authorization"),
        "{headers}"
    );
    let (_, headers) = curl("/kept/headers", Some(KEPT_KEY));
    assert!(headers.contains(KEPT_KEY), "{headers}");
    // A route without keys is unaffected.
    assert_eq!(curl("/v1/models", None).0, 200);

    // Basic credentials, checked against the argon2 hash; a 401 there names Basic.
    let basic = |credentials: &str| {
        let url = format!("http://{SERVER_V4}:2222/basic/v1/models");
        link.client.run_ok(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "-D",
                "-",
                "-o",
                "-",
                "-u",
                credentials,
                &url,
            ],
        )
    };
    let answer = basic("alice:correct horse battery");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = basic("alice:wrong horse").to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 401"), "{answer}");
    assert!(
        answer.contains("www-authenticate: basic realm=\"muxer\""),
        "{answer}"
    );

    // Four failures so far; six more make ten, and then even the right key gets 429 for a
    // while from this network (no brute force), while routes without keys keep working.
    for _ in 0..6 {
        assert_eq!(curl("/api/v1/models", Some("sk-guess")).0, 401);
    }
    let (status, out) = curl("/api/v1/models", Some(ENV_KEY));
    assert_eq!(status, 429, "{out}");
    assert!(
        out.to_ascii_lowercase().contains("retry-after: 60"),
        "{out}"
    );
    assert_eq!(curl("/v1/models", None).0, 200);

    let log = muxer.log();
    for key in [
        ENV_KEY,
        FILE_KEY,
        KEPT_KEY,
        "sk-guess",
        "sk-wrong",
        "correct horse",
        "wrong horse",
    ] {
        assert!(!log.contains(key), "{key} in the log");
    }
    assert!(log.contains("status=401"), "401s are logged: {log}");
}
