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

/// Installs the global subscriber: `RUST_LOG` or `info`, human-readable or JSON lines on stderr.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
