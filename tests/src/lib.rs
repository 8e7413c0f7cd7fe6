//! Test harness: network namespaces joined by veth links, and the real programs the scenarios
//! run inside them (muxer itself, OpenSSH's sshd, HTTP and TCP backends).
//!
//! Every namespace, process and temporary file is owned by a guard that removes it on drop, so a
//! failing test cleans up too. Addresses come from 198.18.0.0/15 and fd00::/8 only.

pub mod backends;
pub mod fuzz_checks;
pub mod muxer;
pub mod netns;
pub mod packets;
pub mod process;
pub mod public_host;
pub mod sshd;
pub mod systemd;

use std::time::{Duration, Instant};

/// Whether namespace tests can run here. As root they always run. Without root they are skipped
/// with a loud message, except in CI (`CI` set) or with `MUXER_REQUIRE_NETNS=1`, where skipping
/// would hide a broken setup, so the test fails instead.
pub fn netns_available(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let required = std::env::var_os("CI").is_some()
        || std::env::var_os("MUXER_REQUIRE_NETNS").is_some_and(|v| v == "1");
    assert!(!required, "{test}: network-namespace tests need root, and CI/MUXER_REQUIRE_NETNS requires them to run");
    eprintln!("\n!!!!!! SKIPPED {test}: network-namespace tests need root (run `cargo xtask test` as root) !!!!!!\n");
    false
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    to_hex(&sha2::Sha256::digest(data))
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The generator behind [`test_data`], for producing it incrementally.
#[derive(Clone, Debug)]
pub struct DataGenerator(u64);

impl DataGenerator {
    /// Starts at the beginning of the sequence.
    pub fn new() -> DataGenerator {
        DataGenerator(0x9e37_79b9_7f4a_7c15)
    }

    /// The next byte.
    pub fn next_byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as u8
    }
}

impl Default for DataGenerator {
    fn default() -> Self {
        Self::new()
    }
}

/// `len` bytes of deterministic, incompressible-looking data.
pub fn test_data(len: usize) -> Vec<u8> {
    let mut generator = DataGenerator::new();
    (0..len).map(|_| generator.next_byte()).collect()
}
