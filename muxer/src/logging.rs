//! Log output for `muxer run`. Lines are formatted where they happen but written by a thread of
//! their own, in batches (one `write` for all lines queued since the last): a connection's task
//! never waits on stderr, a pipe, or journald. The queue holds 128 000 lines; beyond that lines
//! are dropped rather than stalling the data path, and counted (`muxer stats`: `log_lines_dropped`).
//! journald additionally rate-limits the unit (`LogRateLimit*=` in the installed unit file).
use std::io::{BufWriter, IsTerminal};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the writer thread; dropping it writes what is still queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code, reason = "held for its Drop")] WorkerGuard);

/// The filter when `RUST_LOG` is not set: `info`, with the per-request access lines only when
/// `access_log` asks for them.
fn default_filter(access_log: bool) -> &'static str {
    if access_log {
        "info"
    } else {
        "info,muxer::access=warn"
    }
}

/// Installs the global subscriber: `RUST_LOG` or the default filter ([`default_filter`]),
/// human-readable or JSON lines on stderr.
pub fn init(format: LogFormat, access_log: bool) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(access_log)));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("muxer-log")
        .finish(BufWriter::new(std::io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.with_ansi(ansi).init(),
    }
    LogGuard(guard)
}

/// Lines dropped because the writer fell behind.
pub fn lines_dropped() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_filtered_out_unless_asked_for() {
        let off = EnvFilter::new(default_filter(false)).to_string();
        assert!(off.contains("muxer::access=warn"), "{off}");
        assert_eq!(default_filter(true), "info");
    }
}
