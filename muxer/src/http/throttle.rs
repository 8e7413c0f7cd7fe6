//! Failed attempts per source network (a wrong tunnel name or credentials, a wrong API key): past
//! [`MAX_FAILURES`] within [`FAILURE_WINDOW`] the network gets 429 until the window ends, correct
//! credentials or not, so keys and names cannot be brute-forced. One instance per purpose.
use std::collections::HashMap;
use std::time::Instant;

/// Failed requests allowed per source network within [`FAILURE_WINDOW`]; past them the
/// network gets 429 until the window ends, correct credentials or not (no brute force).
const MAX_FAILURES: u32 = 10;
/// The window failures are counted in.
const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Networks remembered at most; older windows are forgotten first.
const MAX_TRACKED: usize = 10_000;

/// Recent failures per source network.
#[derive(Debug, Default)]
pub(crate) struct Failures(std::sync::Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>);

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, (u32, Instant)>> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Whether `network` has failed too often lately.
    pub(crate) fn throttled(&self, network: std::net::IpAddr) -> bool {
        self.lock().get(&network).is_some_and(|(count, since)| {
            *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW
        })
    }

    /// Counts a failure of `network`.
    pub(crate) fn record(&self, network: std::net::IpAddr) {
        let mut failures = self.lock();
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(network).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}
