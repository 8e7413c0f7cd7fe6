//! Connection limits: a global cap that pauses the accept loop, and a per-client-address cap that
//! refuses the excess at accept.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Both limits, shared by every listener.
#[derive(Debug)]
pub struct ConnectionLimits {
    global: Arc<Semaphore>,
    /// The global limit now in force.
    global_max: Mutex<usize>,
    per_ip: Arc<PerIp>,
}

#[derive(Debug)]
struct PerIp {
    max: AtomicUsize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Held for a connection's lifetime; dropping it frees the connection's slot in both limits.
#[derive(Debug)]
pub struct ConnectionSlot {
    _global: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<PerIp>,
}

impl ConnectionLimits {
    /// Limits of `max_connections` in all and `max_per_ip` from one address.
    pub fn new(max_connections: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            global: Arc::new(Semaphore::new(max_connections)),
            global_max: Mutex::new(max_connections),
            per_ip: Arc::new(PerIp {
                max: AtomicUsize::new(max_per_ip),
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Waits until a global slot is free. The accept loop calls this before `accept`, so at the
    /// limit new connections wait in the kernel's backlog instead of being accepted and dropped.
    pub async fn wait_for_global(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.global)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Applies new limits to connections accepted from now on; open connections keep their slots.
    pub fn resize(&self, max_connections: usize, max_per_ip: usize) {
        self.per_ip.max.store(max_per_ip, Ordering::Relaxed);
        let mut current = self
            .global_max
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if max_connections > *current {
            self.global.add_permits(max_connections - *current);
        } else {
            // Free permits go at once; the rest as open connections close.
            let excess = *current - max_connections;
            let forgotten = self.global.forget_permits(excess);
            if forgotten < excess {
                let global = Arc::clone(&self.global);
                let mut remaining = excess - forgotten;
                tokio::spawn(async move {
                    while remaining > 0 {
                        match global.acquire().await {
                            Ok(permit) => {
                                permit.forget();
                                remaining -= 1;
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        *current = max_connections;
    }

    /// Whether every global slot is taken right now.
    pub fn global_exhausted(&self) -> bool {
        self.global.available_permits() == 0
    }

    /// Claims a per-address slot for `ip`, or `None` when `ip` is at its limit.
    pub fn admit(&self, global: OwnedSemaphorePermit, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.per_ip.max.load(Ordering::Relaxed) {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            _global: global,
            ip,
            per_ip: Arc::clone(&self.per_ip),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_ip_limit_counts_and_releases() {
        let limits = ConnectionLimits::new(10, 2);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let first = limits.admit(limits.wait_for_global().await, a).unwrap();
        let _second = limits.admit(limits.wait_for_global().await, a).unwrap();
        assert!(limits.admit(limits.wait_for_global().await, a).is_none());
        assert!(limits.admit(limits.wait_for_global().await, b).is_some());
        drop(first);
        assert!(limits.admit(limits.wait_for_global().await, a).is_some());
    }

    #[tokio::test]
    async fn resizing_applies_to_new_connections() {
        let limits = ConnectionLimits::new(1, 1);
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let slot = limits.admit(limits.wait_for_global().await, ip).unwrap();
        limits.resize(2, 2);
        let second = limits.admit(limits.wait_for_global().await, ip).unwrap();
        assert!(limits.global_exhausted());
        limits.resize(1, 1);
        drop(slot);
        drop(second);
        tokio::task::yield_now().await;
        let _only = limits.wait_for_global().await;
        assert!(limits.global_exhausted(), "shrunk back to one");
    }

    #[tokio::test]
    async fn global_limit_waits_and_resumes() {
        let limits = ConnectionLimits::new(1, 5);
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let slot = limits.admit(limits.wait_for_global().await, ip).unwrap();
        assert!(limits.global_exhausted());
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            limits.wait_for_global(),
        );
        assert!(waiting.await.is_err(), "a second global slot must wait");
        drop(slot);
        assert!(!limits.global_exhausted());
        let _ = limits.wait_for_global().await;
    }
}
