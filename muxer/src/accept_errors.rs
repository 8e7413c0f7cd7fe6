//! What an accept loop does when `accept` fails. Out of descriptors or kernel memory the listener
//! stays readable, so retrying at once would spin a core at 100 % until something closes: every
//! loop (the public listeners, the control socket, the metrics endpoint) waits instead, and says
//! so at most once a second per loop. Other errors (a client that gave up before we accepted)
//! are retried at once.
use std::io;
use std::time::Duration;

use tracing::{debug, warn};

use crate::log_limit::LogLimit;

/// How long a loop waits after running out of descriptors with nothing to free.
pub(crate) const FD_EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);

/// Whether `error` means the process or the system ran out of descriptors or memory.
pub(crate) fn is_fd_exhaustion(error: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(error.raw_os_error(), Some(code) if [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| errno.raw_os_error() == code))
}

/// Handles a failed accept on the `what` loop: waits [`FD_EXHAUSTION_BACKOFF`] (and warns through
/// `warning`) when out of descriptors, returns at once otherwise.
pub(crate) async fn back_off(error: &io::Error, what: &'static str, warning: &LogLimit) {
    if !is_fd_exhaustion(error) {
        debug!(%error, what, "accept failed");
        return;
    }
    if let Some(suppressed) = warning.allow() {
        warn!(%error, suppressed, "{what}: out of file descriptors; accepting again shortly");
    }
    tokio::time::sleep(FD_EXHAUSTION_BACKOFF).await;
}
