//! Log output for `muxer run`. Lines are formatted where they happen but written by a thread of
//! their own, in batches: a connection's task never waits on stderr, a pipe, or journald. The
//! queue holds 128 000 lines; beyond that lines are dropped rather than stalling the data path,
//! and counted (`muxer stats`: `log_lines_dropped`). journald additionally rate-limits the unit
//! (`LogRateLimit*=` in the installed unit file).
//!
//! The queue is one buffer under a mutex, and the writer thread is woken once per batch (by the
//! line that makes the buffer non-empty), then lets lines gather for [`GATHER`] before one
//! `write`. tracing-appender's channel, used before, woke the writer for nearly every line: 3.4 µs
//! of CPU per line on these machines, half of what a connection's log line cost (perf,
//! docs/benchmarks.md).
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::log_format::{PlainEvent, PlainFields};

/// Lines the queue holds before it drops new ones.
const MAX_QUEUED_LINES: usize = 128_000;
/// How long the writer lets lines gather after the first of a batch.
const GATHER: Duration = Duration::from_millis(10);
/// How long shutdown waits for the queued lines to be written (stderr may be a pipe nobody
/// reads).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Lines waiting for the writer thread.
#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// Signalled when the buffer becomes non-empty, and at shutdown.
    ready: Condvar,
    /// Signalled by the writer when it has written everything and ended.
    done: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    closing: bool,
    finished: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Queues one formatted line (tracing-subscriber writes each event with one call), or counts
    /// it dropped when the queue is full.
    fn push(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.lines >= MAX_QUEUED_LINES {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.lines == 0;
        pending.bytes.extend_from_slice(line);
        pending.lines += 1;
        drop(pending);
        if first {
            self.ready.notify_one();
        }
    }

    /// The writer thread: one `write` per batch, until shutdown has been asked for and the queue
    /// is empty.
    fn write_batches(&self, out: &mut impl Write) {
        let mut spare = Vec::new();
        loop {
            let mut pending = self.lock();
            while pending.lines == 0 && !pending.closing {
                pending = self
                    .ready
                    .wait(pending)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            if pending.lines == 0 {
                pending.finished = true;
                drop(pending);
                self.done.notify_all();
                return;
            }
            if !pending.closing {
                drop(pending);
                std::thread::sleep(GATHER);
                pending = self.lock();
            }
            let mut batch = std::mem::replace(&mut pending.bytes, std::mem::take(&mut spare));
            pending.lines = 0;
            drop(pending);
            // Nowhere to report a failed write to: the lines are lost, as on a closed stderr.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            spare = batch;
        }
    }

    /// Asks the writer to finish and waits up to [`FLUSH_TIMEOUT`] for it.
    fn close(&self) {
        let mut pending = self.lock();
        pending.closing = true;
        self.ready.notify_one();
        let (pending, _) = self
            .done
            .wait_timeout_while(pending, FLUSH_TIMEOUT, |pending| !pending.finished)
            .unwrap_or_else(|poison| poison.into_inner());
        drop(pending);
    }
}

impl Write for &Queue {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the subscriber writes its lines to.
struct QueueWriter(Arc<Queue>);

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = &'a Queue;

    fn make_writer(&'a self) -> &'a Queue {
        &self.0
    }
}

/// Keeps the writer thread; dropping it writes what is still queued (waiting at most a second).
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(Arc<Queue>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

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
    let queue = Arc::new(Queue::default());
    let _ = QUEUE.set(Arc::clone(&queue));
    let writer_queue = Arc::clone(&queue);
    let spawned = std::thread::Builder::new()
        .name("muxer-log".into())
        // Not `stderr().lock()`: a panic message from another thread must not wait for it.
        .spawn(move || writer_queue.write_batches(&mut std::io::stderr()));
    if let Err(error) = spawned {
        eprintln!("muxer: cannot start the log writer thread: {error}");
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(QueueWriter(Arc::clone(&queue)));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder
            .with_ansi(ansi)
            .fmt_fields(PlainFields)
            .event_format(PlainEvent::default())
            .init(),
    }
    LogGuard(queue)
}

/// Lines dropped because the writer fell behind.
pub fn lines_dropped() -> u64 {
    QUEUE
        .get()
        .map_or(0, |queue| queue.dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_format::tests::Captured;

    #[test]
    fn access_lines_are_filtered_out_unless_asked_for() {
        let off = EnvFilter::new(default_filter(false)).to_string();
        assert!(off.contains("muxer::access=warn"), "{off}");
        assert_eq!(default_filter(true), "info");
    }

    /// Lines come out whole and in order, in batches, all of them by the time close returns.
    #[test]
    fn queued_lines_are_written_in_order_before_close_returns() {
        let queue = Arc::new(Queue::default());
        let written = Captured::default();
        let writer = {
            let queue = Arc::clone(&queue);
            let mut out = written.clone();
            std::thread::spawn(move || queue.write_batches(&mut out))
        };
        for n in 0..1000 {
            (&*queue)
                .write_all(format!("line {n}\n").as_bytes())
                .unwrap();
        }
        queue.close();
        writer.join().unwrap();
        let written = written.text();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(n, line)| *line == format!("line {n}")));
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 0);
    }

    /// With nobody writing, the queue fills up to its limit and drops the rest, counted;
    /// pushing never waits.
    #[test]
    fn a_full_queue_drops_and_counts_lines() {
        let queue = Queue::default();
        for _ in 0..MAX_QUEUED_LINES + 5 {
            queue.push(b"x\n");
        }
        assert_eq!(queue.lock().lines, MAX_QUEUED_LINES);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 5);
    }

    /// A writer stuck on its output (a pipe nobody reads) holds shutdown up for at most
    /// FLUSH_TIMEOUT.
    #[test]
    fn close_gives_up_on_a_stuck_writer() {
        let queue = Queue::default();
        queue.push(b"never written\n");
        let started = std::time::Instant::now();
        queue.close();
        let waited = started.elapsed();
        assert!(
            waited >= FLUSH_TIMEOUT && waited < FLUSH_TIMEOUT * 10,
            "{waited:?}"
        );
    }
}
