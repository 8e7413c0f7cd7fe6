//! Warnings an outside party can trigger (a PROXY header from anyone, running out of descriptors
//! under a flood) are limited per kind: at most one line per interval for the whole process, and
//! the next line that passes says how many were suppressed in between, so a flood cannot flood
//! the journal too.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One kind of warning's limiter; meant to live in a `static`.
#[derive(Debug)]
pub(crate) struct LogLimit {
    interval: Duration,
    /// Milliseconds since the process's reference instant (offset by `interval`) of the last line.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub(crate) const fn per(interval: Duration) -> LogLimit {
        LogLimit {
            interval,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` when a line may be written now (`suppressed`: lines dropped since the
    /// last one), `None` when this one is to be dropped (and counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let interval = self.interval.as_millis() as u64;
        // Offset by the interval so that the first line always passes.
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + interval;
        let last = self.last.load(Ordering::Relaxed);
        let passes = now.saturating_sub(last) >= interval
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if passes {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_those_dropped() {
        let limit = LogLimit::per(Duration::from_millis(200));
        assert_eq!(limit.allow(), Some(0), "the first line passes");
        for _ in 0..5 {
            assert_eq!(limit.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            limit.allow(),
            Some(5),
            "the next line reports the five dropped"
        );
        assert_eq!(limit.allow(), None);
    }
}
