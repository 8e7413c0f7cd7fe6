//! Upstreams: round robin that skips recently failed upstreams (passive health), each upstream
//! with its pool of idle connections.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

use super::pool::{Pool, PoolSettings};
use crate::config::Upstream;

/// Errors carried by bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of requests sent upstream.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

fn millis_since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[derive(Debug)]
struct UpstreamState {
    pool: Arc<Pool>,
    /// Skip until this many milliseconds after process start.
    failed_until: AtomicU64,
}

/// A route's upstreams.
#[derive(Debug)]
pub struct UpstreamSet {
    upstreams: Vec<UpstreamState>,
    next: AtomicUsize,
    cooldown: Duration,
}

impl UpstreamSet {
    /// The set for `upstreams`; one that fails to connect is skipped for `cooldown`.
    pub fn new(upstreams: &[Upstream], cooldown: Duration, pool: PoolSettings) -> UpstreamSet {
        UpstreamSet {
            upstreams: upstreams
                .iter()
                .map(|u| UpstreamState {
                    pool: Pool::new(u.as_str().to_owned(), pool),
                    failed_until: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            cooldown,
        }
    }

    /// Number of upstreams.
    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    /// Whether there are none (never, for a validated config).
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The next upstream in round-robin order that has not failed recently; when all have, the
    /// plain round-robin choice (a request still beats a certain error).
    pub fn pick(&self) -> usize {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = millis_since_start();
        (0..self.upstreams.len())
            .map(|offset| (start + offset) % self.upstreams.len())
            .find(|&index| self.upstreams[index].failed_until.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % self.upstreams.len())
    }

    /// `host:port` of upstream `index`.
    pub fn authority(&self, index: usize) -> &str {
        self.upstreams[index].pool.authority()
    }

    /// The connection pool of upstream `index`.
    pub fn pool(&self, index: usize) -> &Arc<Pool> {
        &self.upstreams[index].pool
    }

    /// Takes upstream `index` out of rotation for the cooldown.
    pub fn mark_failed(&self, index: usize) {
        let until = millis_since_start() + self.cooldown.as_millis() as u64;
        self.upstreams[index]
            .failed_until
            .store(until, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: PoolSettings = PoolSettings {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        tcp_keepalive: Duration::from_secs(60),
        workers: 1,
        max_connections: 64,
        queue: 4,
        queue_timeout: Duration::from_secs(1),
    };

    #[test]
    fn round_robin_skips_failed_upstreams_until_the_cooldown_ends() {
        let upstreams: Vec<Upstream> = ["a:1", "b:1", "c:1"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        let set = UpstreamSet::new(&upstreams, Duration::from_millis(100), POOL);
        let picks: Vec<usize> = (0..6).map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        set.mark_failed(1);
        let picks: Vec<usize> = (0..6).map(|_| set.pick()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        std::thread::sleep(Duration::from_millis(150));
        let picks: Vec<usize> = (0..3).map(|_| set.pick()).collect();
        assert!(picks.contains(&1));
    }

    #[test]
    fn all_failed_still_picks_something() {
        let upstreams: Vec<Upstream> = ["a:1", "b:1"].iter().map(|u| u.parse().unwrap()).collect();
        let set = UpstreamSet::new(&upstreams, Duration::from_secs(60), POOL);
        set.mark_failed(0);
        set.mark_failed(1);
        let index = set.pick();
        assert!(index < 2);
    }
}
