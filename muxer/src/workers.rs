//! Worker threads: each runs its own single-threaded tokio runtime and accepts from its own
//! listening socket per address (one SO_REUSEPORT group per address), so a connection, the
//! upstream connections its requests use, and every wake-up between them stay on one thread.
//! Which worker's socket the kernel picks for a new connection is steered by CPU
//! ([`crate::steering`]); a worker far ahead hands a connection over before serving it.
//!
//! Why not one work-stealing runtime: with one, each proxied request crossed threads (the
//! client's task on one worker, the upstream's I/O event on another), and on a 2-core machine
//! shared with the backends those crossings cost more than the HTTP work itself.
use std::net::TcpListener as StdTcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::affinity;
use crate::http::pool;
use crate::listener;
use crate::runtime::Runtime;
use crate::steering::Steering;

/// A worker that could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Its runtime could not be built.
    #[error("cannot start worker {index}'s async runtime: {source}")]
    Runtime {
        /// Which worker.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// Its thread could not be spawned.
    #[error("cannot spawn worker thread {index}: {source}")]
    Thread {
        /// Which worker.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The running workers.
pub(crate) struct Workers {
    threads: Vec<JoinHandle<()>>,
    steering: Arc<Steering>,
    stop_accepting: CancellationToken,
    accepting: TaskTracker,
    exit: CancellationToken,
}

impl Workers {
    /// Starts one worker per entry of `listeners` (each entry: that worker's socket for every
    /// listen address), serving with `runtime`; with `pin`, each worker's thread is pinned to a
    /// CPU of its own ([`crate::affinity`]). Worker `i` also accepts on the sockets that arrive
    /// through `adopt[i]` later (internal ports).
    pub(crate) fn start(
        listeners: Vec<Vec<StdTcpListener>>,
        adopt: Vec<UnboundedReceiver<StdTcpListener>>,
        runtime: &Arc<Runtime>,
        pin: bool,
    ) -> Result<Workers, WorkerError> {
        let worker_count = listeners.len();
        let cpus = if pin {
            affinity::plan(worker_count)
        } else {
            vec![None; worker_count]
        };
        let stop_accepting = CancellationToken::new();
        let accepting = TaskTracker::new();
        let exit = CancellationToken::new();
        let tokio_runtimes = (0..worker_count)
            .map(|index| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| WorkerError::Runtime { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (steering, handoffs) = Steering::new(
            tokio_runtimes
                .iter()
                .map(|runtime| runtime.handle().clone())
                .collect(),
        );
        let mut threads = Vec::with_capacity(worker_count);
        let per_worker = listeners
            .into_iter()
            .zip(tokio_runtimes)
            .zip(handoffs)
            .zip(adopt)
            .zip(cpus);
        for (index, ((((sockets, tokio_runtime), handoffs), adopt), cpu)) in per_worker.enumerate()
        {
            let runtime = Arc::clone(runtime);
            let steering = Arc::clone(&steering);
            let stop_accepting = stop_accepting.clone();
            let accepting_token = accepting.token();
            let exit = exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("muxer-worker-{index}"))
                .spawn(move || {
                    pool::set_thread_shard(index);
                    // Before the runtime starts: the claim of the first accept is then right.
                    if let Some(cpu) = cpu {
                        match affinity::pin_current_thread(cpu) {
                            Ok(()) => steering.record_pinned(index, cpu),
                            Err(error) => warn!(worker = index, %error, "worker not pinned"),
                        }
                    }
                    tokio_runtime.block_on(async move {
                        tokio::select! {
                            result = listener::accept_loop(sockets, adopt, runtime, index, steering, handoffs) => {
                                if let Err(error) = result {
                                    error!(worker = index, %error, "cannot register listening sockets");
                                }
                            }
                            () = stop_accepting.cancelled() => {}
                        }
                        // The listeners are closed now.
                        drop(accepting_token);
                        exit.cancelled().await;
                    });
                })
                .map_err(|source| WorkerError::Thread { index, source })?;
            threads.push(thread);
        }
        accepting.close();
        Ok(Workers {
            threads,
            steering,
            stop_accepting,
            accepting,
            exit,
        })
    }

    /// The workers' loads and CPU claims.
    pub(crate) fn steering(&self) -> Arc<Steering> {
        Arc::clone(&self.steering)
    }

    /// Closes every listening socket and returns once all are closed; connections already
    /// accepted go on.
    pub(crate) async fn stop_accepting(&self) {
        self.stop_accepting.cancel();
        self.accepting.wait().await;
    }

    /// Ends every worker, dropping the connections they still serve, and waits for the threads.
    pub(crate) fn exit(self) {
        self.stop_accepting.cancel();
        self.exit.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
