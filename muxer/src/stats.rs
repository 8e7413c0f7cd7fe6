//! The daemon's own counters: connections and bytes per route, probe outcomes, errors. Cheap
//! relaxed atomics, read by `muxer stats` through the control socket.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

/// Counters for one kind of connection.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections ever accepted for this route.
    pub total: AtomicU64,
    /// Bytes from clients to the backend.
    pub bytes_in: AtomicU64,
    /// Bytes from the backend to clients.
    pub bytes_out: AtomicU64,
}

/// Every counter of the daemon.
#[derive(Debug, Default)]
pub struct Stats {
    /// SSH connections.
    pub ssh: RouteCounters,
    /// HTTP connections.
    pub http: RouteCounters,
    /// TLS connections.
    pub tls: RouteCounters,
    /// Connections no probe recognised.
    pub unknown: RouteCounters,
    /// Clients that sent nothing before the probe timeout.
    pub probe_timeouts: AtomicU64,
    /// Backends that could not be reached.
    pub upstream_connect_errors: AtomicU64,
    /// Connections closed because no backend is configured for them.
    pub no_route: AtomicU64,
}

/// A point-in-time copy of [`RouteCounters`].
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RouteSnapshot {
    /// Connections open now.
    pub open: u64,
    /// Connections ever accepted.
    pub total: u64,
    /// Bytes from clients.
    pub bytes_in: u64,
    /// Bytes to clients.
    pub bytes_out: u64,
}

impl RouteCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> RouteSnapshot {
        RouteSnapshot {
            open: self.open.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// Picks one route's counters out of [`Stats`].
pub(crate) type PickRoute = fn(&Stats) -> &RouteCounters;

impl Stats {
    /// Counts a connection on the route `pick` names as open until the guard drops. The guard
    /// owns its way to the counters, so it can move to another task.
    pub fn open(self: &Arc<Self>, pick: PickRoute) -> OpenGuard {
        let counters = pick(self);
        counters.total.fetch_add(1, Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard {
            stats: Arc::clone(self),
            pick,
        }
    }
}

/// Decrements [`RouteCounters::open`] when dropped.
#[derive(Debug)]
pub struct OpenGuard {
    stats: Arc<Stats>,
    pick: PickRoute,
}

impl OpenGuard {
    /// Adds bytes moved in each direction.
    pub fn add_bytes(&self, bytes_in: u64, bytes_out: u64) {
        let counters = (self.pick)(&self.stats);
        counters.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        counters.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        (self.pick)(&self.stats)
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}
