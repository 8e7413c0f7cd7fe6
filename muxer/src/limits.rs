//! Connection capacity by class, so that SSH always finds room (docs/lockout.md).
//!
//! Every connection holds one [`ConnectionSlot`] for its whole life, tunnels and upgraded
//! connections included. A slot starts in the [`Class::Sniffing`] class and moves to the class of
//! its route once sniffed. Three limits apply:
//! - all connections together: `limits.max_connections`. Only at this limit does the accept loop
//!   wait (new connections then queue in the kernel's backlog);
//! - the *shared* classes (HTTP, TLS, tunnels, upgrades, fallback) together may use at most
//!   `max_connections - ssh_reserve`: the reserve is only for connections being sniffed and SSH,
//!   so no amount of HTTP can take the slots an SSH login needs. A connection classified into a
//!   full shared pool is refused after sniffing (HTTP/1 gets a 503) while SSH still gets in;
//! - per source network (IPv4 /32 and IPv6 /64 by default, like sshd's
//!   `PerSourceNetBlockSize`): all of one network's connections; lower, its connections still
//!   being sniffed; and its SSH connections young enough to still be logging in, so that one
//!   source cannot push sshd past its global `MaxStartups`.
//!
//! The parked (idle) HTTP keep-alive connections are registered in [`IdleConnections`], so that at
//! the process's descriptor limit the longest-idle ones can be closed to admit new connections.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::Limits;

/// What a connection is, for capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Class {
    /// Accepted, protocol not known yet.
    Sniffing,
    /// SSH (or a silent client sent to SSH).
    Ssh,
    /// Served by the HTTP router.
    Http,
    /// TLS passthrough.
    Tls,
    /// A `CONNECT` tunnel.
    Tunnel,
    /// An upgraded HTTP connection (WebSocket).
    Upgraded,
    /// The `[fallback]` backend.
    Fallback,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 7] = [
        Class::Sniffing,
        Class::Ssh,
        Class::Http,
        Class::Tls,
        Class::Tunnel,
        Class::Upgraded,
        Class::Fallback,
    ];

    /// Name in stats and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Sniffing => "sniffing",
            Class::Ssh => "ssh",
            Class::Http => "http",
            Class::Tls => "tls",
            Class::Tunnel => "tunnel",
            Class::Upgraded => "upgraded",
            Class::Fallback => "fallback",
        }
    }

    /// Whether the class may use the SSH reserve.
    fn reserved(self) -> bool {
        matches!(self, Class::Sniffing | Class::Ssh)
    }

    fn from_u8(value: u8) -> Class {
        Class::ALL
            .get(usize::from(value))
            .copied()
            .unwrap_or(Class::Fallback)
    }
}

/// Why a connection was refused or closed early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source network had `max_connections_per_source` open.
    PerSource,
    /// Its source network had `max_sniffing_per_source` connections still being sniffed.
    PerSourceSniffing,
    /// Its source network had `ssh_startups_per_source` young SSH connections.
    PerSourceSshStartups,
    /// The shared classes (HTTP, TLS, tunnels, upgrades, fallback) were full.
    SharedFull,
    /// The upstream had `max_connections_per_upstream` open and its queue was full or too slow.
    UpstreamFull,
    /// An idle HTTP keep-alive connection closed to free a descriptor for a new connection.
    IdleEvicted,
}

impl Refusal {
    /// Every reason, in report order.
    pub const ALL: [Refusal; 6] = [
        Refusal::PerSource,
        Refusal::PerSourceSniffing,
        Refusal::PerSourceSshStartups,
        Refusal::SharedFull,
        Refusal::UpstreamFull,
        Refusal::IdleEvicted,
    ];

    /// Name in stats, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerSource => "per_source_limit",
            Refusal::PerSourceSniffing => "per_source_sniffing_limit",
            Refusal::PerSourceSshStartups => "per_source_ssh_startups",
            Refusal::SharedFull => "shared_classes_full",
            Refusal::UpstreamFull => "upstream_full",
            Refusal::IdleEvicted => "idle_evicted_for_descriptors",
        }
    }
}

/// A way of holding a connection open that a timeout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// An HTTP/1 request head did not arrive within `http.header_read_timeout` (slowloris).
    HeaderRead,
    /// An idle HTTP/1 keep-alive connection sent no next request within `http.idle_timeout`.
    KeepAliveIdle,
    /// An HTTP/2 connection opened no stream within `http.idle_timeout`.
    Http2FirstRequest,
    /// An HTTP/2 connection had no open stream for `http.idle_timeout`.
    Http2Idle,
    /// An HTTP/2 PING went unanswered for `http.ping_timeout`.
    Http2Ping,
    /// The client took no response bytes for `http.write_timeout`.
    WriteStalled,
    /// A request body arrived slower than `http.body_min_rate`.
    BodyTooSlow,
    /// A tunnel or upgraded connection was silent for `http.tunnel_idle_timeout`.
    TunnelIdle,
}

impl Timeout {
    /// Every kind, in report order.
    pub const ALL: [Timeout; 8] = [
        Timeout::HeaderRead,
        Timeout::KeepAliveIdle,
        Timeout::Http2FirstRequest,
        Timeout::Http2Idle,
        Timeout::Http2Ping,
        Timeout::WriteStalled,
        Timeout::BodyTooSlow,
        Timeout::TunnelIdle,
    ];

    /// Name in stats and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::HeaderRead => "header_read",
            Timeout::KeepAliveIdle => "keepalive_idle",
            Timeout::Http2FirstRequest => "http2_first_request",
            Timeout::Http2Idle => "http2_idle",
            Timeout::Http2Ping => "http2_ping",
            Timeout::WriteStalled => "write_stalled",
            Timeout::BodyTooSlow => "body_too_slow",
            Timeout::TunnelIdle => "tunnel_idle",
        }
    }
}

/// Open count and limit of one class, as reported.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClassSnapshot {
    /// Connections of this class open now.
    pub open: u64,
    /// The most this class can have open: its pool's size (shared with the pool's other classes).
    pub limit: u64,
}

/// The configured numbers, applied to connections admitted from now on.
#[derive(Debug)]
struct Settings {
    total: AtomicUsize,
    shared: AtomicUsize,
    per_source: AtomicUsize,
    sniffing_per_source: AtomicUsize,
    ssh_startups_per_source: AtomicUsize,
    ssh_startup_window_ms: AtomicU64,
    prefix_v4: AtomicU8,
    prefix_v6: AtomicU8,
}

/// Open connections of one source network, shared by its connections' slots: classifying and
/// closing a connection touch only these atomics; the map of sources is locked to admit, and to
/// forget a network when its last connection closes.
#[derive(Debug)]
struct Source {
    network: IpAddr,
    all: AtomicUsize,
    sniffing: AtomicUsize,
    /// Open SSH connections that may still be logging in: when each became SSH, and its slot.
    ssh_startups: Mutex<Vec<(Instant, u32)>>,
}

impl Source {
    fn new(network: IpAddr) -> Arc<Source> {
        Arc::new(Source {
            network,
            all: AtomicUsize::new(0),
            sniffing: AtomicUsize::new(0),
            ssh_startups: Mutex::new(Vec::new()),
        })
    }

    fn ssh_startups(&self) -> MutexGuard<'_, Vec<(Instant, u32)>> {
        self.ssh_startups
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Every limit, shared by all workers.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// One permit per connection; the accept loop waits here only when everything is full.
    total: Arc<Semaphore>,
    settings: Settings,
    /// Open connections of the shared classes.
    shared_open: AtomicUsize,
    next_id: AtomicU32,
    class_open: [AtomicU64; Class::ALL.len()],
    refusals: [AtomicU64; Refusal::ALL.len()],
    timeouts: [AtomicU64; Timeout::ALL.len()],
    sources: Mutex<HashMap<IpAddr, Arc<Source>>>,
    /// The parked HTTP keep-alive connections, closable at the descriptor limit.
    pub idle: IdleConnections,
}

/// A connection's place under the limits, held for its whole life. Shared (in an `Arc`) by an
/// HTTP connection and the tunnel it may become.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    /// The source network counted.
    source: Arc<Source>,
    class: AtomicU8,
    /// Names the slot among its source's SSH startups.
    id: u32,
    /// Whether it took a permit of the total limit (a handed-over connection may not have).
    holds_total: bool,
}

/// A global permit taken before `accept`; given to [`ConnectionLimits::admit`] or dropped.
#[derive(Debug)]
pub struct TotalPermit(tokio::sync::OwnedSemaphorePermit);

impl TotalPermit {
    /// A permit of no limit's, for tests of code that passes permits along.
    #[cfg(test)]
    pub(crate) fn detached() -> TotalPermit {
        let semaphore = Arc::new(Semaphore::new(1));
        match semaphore.try_acquire_owned() {
            Ok(permit) => TotalPermit(permit),
            Err(_) => unreachable!("a new semaphore has a permit"),
        }
    }
}

/// The counts of `network`, created empty if it has none yet.
fn source_entry(sources: &mut HashMap<IpAddr, Arc<Source>>, network: IpAddr) -> &Arc<Source> {
    sources
        .entry(network)
        .or_insert_with(|| Source::new(network))
}

impl ConnectionLimits {
    /// Limits from `limits`.
    pub fn new(limits: &Limits) -> Arc<Self> {
        let this = ConnectionLimits {
            total: Arc::new(Semaphore::new(limits.max_connections)),
            settings: Settings {
                total: AtomicUsize::new(limits.max_connections),
                shared: AtomicUsize::new(0),
                per_source: AtomicUsize::new(0),
                sniffing_per_source: AtomicUsize::new(0),
                ssh_startups_per_source: AtomicUsize::new(0),
                ssh_startup_window_ms: AtomicU64::new(0),
                prefix_v4: AtomicU8::new(32),
                prefix_v6: AtomicU8::new(64),
            },
            shared_open: AtomicUsize::new(0),
            next_id: AtomicU32::new(0),
            class_open: Default::default(),
            refusals: Default::default(),
            timeouts: Default::default(),
            sources: Mutex::new(HashMap::new()),
            idle: IdleConnections::default(),
        };
        this.store_settings(limits);
        Arc::new(this)
    }

    fn store_settings(&self, limits: &Limits) {
        let settings = &self.settings;
        settings
            .shared
            .store(limits.shared_capacity(), Ordering::Relaxed);
        settings
            .per_source
            .store(limits.max_connections_per_source, Ordering::Relaxed);
        settings
            .sniffing_per_source
            .store(limits.max_sniffing_per_source, Ordering::Relaxed);
        settings
            .ssh_startups_per_source
            .store(limits.ssh_startups_per_source, Ordering::Relaxed);
        settings.ssh_startup_window_ms.store(
            limits.ssh_startup_window.as_millis() as u64,
            Ordering::Relaxed,
        );
        settings
            .prefix_v4
            .store(limits.source_prefix_v4, Ordering::Relaxed);
        settings
            .prefix_v6
            .store(limits.source_prefix_v6, Ordering::Relaxed);
    }

    /// Applies new limits to connections admitted from now on; open connections keep their slots.
    pub fn resize(&self, limits: &Limits) {
        self.store_settings(limits);
        let current = self
            .settings
            .total
            .swap(limits.max_connections, Ordering::Relaxed);
        let wanted = limits.max_connections;
        if wanted > current {
            self.total.add_permits(wanted - current);
        } else if wanted < current {
            // Free permits go at once; the rest as open connections close.
            let excess = current - wanted;
            let forgotten = self.total.forget_permits(excess);
            if forgotten < excess {
                let total = Arc::clone(&self.total);
                let mut remaining = excess - forgotten;
                tokio::spawn(async move {
                    while remaining > 0 {
                        match total.acquire().await {
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
    }

    /// Waits until a connection may be accepted: only when every slot of every class is taken.
    pub async fn wait_for_total(&self) -> TotalPermit {
        // The semaphore is never closed.
        loop {
            if let Ok(permit) = Arc::clone(&self.total).acquire_owned().await {
                return TotalPermit(permit);
            }
        }
    }

    /// Whether every slot is taken right now.
    pub fn total_exhausted(&self) -> bool {
        self.total.available_permits() == 0
    }

    /// The source network `ip` counts under: its /32 (IPv4) or /64 (IPv6) by default.
    pub fn source_network(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let prefix = u32::from(self.settings.prefix_v4.load(Ordering::Relaxed).min(32));
                let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let prefix = u32::from(self.settings.prefix_v6.load(Ordering::Relaxed).min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    fn sources(&self) -> MutexGuard<'_, HashMap<IpAddr, Arc<Source>>> {
        // Counts stay consistent through a panic: each update is one statement.
        self.sources
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Admits a new connection from `ip` as [`Class::Sniffing`], or refuses it when its source
    /// network is at one of its limits.
    pub fn admit(
        self: &Arc<Self>,
        permit: TotalPermit,
        ip: IpAddr,
    ) -> Result<ConnectionSlot, Refusal> {
        let network = self.source_network(ip);
        let source = {
            let mut sources = self.sources();
            let source = source_entry(&mut sources, network);
            let all = source.all.load(Ordering::Relaxed);
            let refusal = if all >= self.settings.per_source.load(Ordering::Relaxed) {
                Some(Refusal::PerSource)
            } else if source.sniffing.load(Ordering::Relaxed)
                >= self.settings.sniffing_per_source.load(Ordering::Relaxed)
            {
                Some(Refusal::PerSourceSniffing)
            } else {
                None
            };
            if let Some(refusal) = refusal {
                if all == 0 {
                    sources.remove(&network);
                }
                drop(sources);
                self.count_refusal(refusal);
                return Err(refusal);
            }
            // Increments happen under the map's lock, so admissions never overshoot a limit;
            // decrements (classify, close) do not need it.
            source.all.fetch_add(1, Ordering::Relaxed);
            source.sniffing.fetch_add(1, Ordering::Relaxed);
            Arc::clone(source)
        };
        // The slot gives the permit back itself when it drops.
        permit.0.forget();
        self.class_open[Class::Sniffing as usize].fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            source,
            class: AtomicU8::new(Class::Sniffing as u8),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            holds_total: true,
        })
    }

    /// Counts a connection a previous process handed over, from `ip`, in `class`. Never refused:
    /// it is an established session; it takes a slot of the total limit when one is free.
    pub(crate) fn adopt(self: &Arc<Self>, ip: IpAddr, class: Class) -> ConnectionSlot {
        let network = self.source_network(ip);
        let source = {
            let mut sources = self.sources();
            let source = source_entry(&mut sources, network);
            source.all.fetch_add(1, Ordering::Relaxed);
            Arc::clone(source)
        };
        let holds_total = match Arc::clone(&self.total).try_acquire_owned() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        };
        if !class.reserved() {
            self.shared_open.fetch_add(1, Ordering::Relaxed);
        }
        self.class_open[class as usize].fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            limits: Arc::clone(self),
            source,
            class: AtomicU8::new(class as u8),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            holds_total,
        }
    }

    /// Counts a refusal.
    pub fn count_refusal(&self, refusal: Refusal) {
        self.refusals[refusal as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection (or a request's body) ended by a timeout.
    pub fn count_timeout(&self, timeout: Timeout) {
        self.timeouts[timeout as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections ended by each kind of timeout so far.
    pub fn timeouts(&self) -> BTreeMap<String, u64> {
        by_name(Timeout::ALL.map(Timeout::as_str), &self.timeouts)
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        by_name(Refusal::ALL.map(Refusal::as_str), &self.refusals)
    }

    /// Open connections and limit per class.
    pub fn classes(&self) -> BTreeMap<String, ClassSnapshot> {
        let total = self.settings.total.load(Ordering::Relaxed) as u64;
        let shared = self.settings.shared.load(Ordering::Relaxed) as u64;
        Class::ALL
            .iter()
            .map(|&class| {
                let snapshot = ClassSnapshot {
                    open: self.class_open[class as usize].load(Ordering::Relaxed),
                    limit: if class.reserved() { total } else { shared },
                };
                (class.as_str().to_owned(), snapshot)
            })
            .collect()
    }

    /// Counts `slot` as an SSH startup of its source, unless that source has as many as allowed.
    fn take_ssh_startup(&self, slot: &ConnectionSlot) -> bool {
        let limit = self
            .settings
            .ssh_startups_per_source
            .load(Ordering::Relaxed);
        let window =
            Duration::from_millis(self.settings.ssh_startup_window_ms.load(Ordering::Relaxed));
        let now = Instant::now();
        let mut startups = slot.source.ssh_startups();
        startups.retain(|(since, _)| now.duration_since(*since) < window);
        if startups.len() >= limit {
            return false;
        }
        startups.push((now, slot.id));
        true
    }

    /// Takes a place in the shared pool, if there is one.
    fn take_shared(&self) -> bool {
        let limit = self.settings.shared.load(Ordering::Relaxed);
        self.shared_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < limit).then_some(open + 1)
            })
            .is_ok()
    }
}

/// Counters by name, for reports: `names[i]` names `counters[i]`.
fn by_name<const N: usize>(names: [&str; N], counters: &[AtomicU64; N]) -> BTreeMap<String, u64> {
    names
        .iter()
        .zip(counters)
        .map(|(name, counter)| ((*name).to_owned(), counter.load(Ordering::Relaxed)))
        .collect()
}

impl ConnectionSlot {
    /// The limits this slot is counted in (for the refusal and timeout counters).
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// The connection's class now.
    pub fn class(&self) -> Class {
        Class::from_u8(self.class.load(Ordering::Relaxed))
    }

    /// Moves the connection to `class`: from sniffing to its route's class once sniffed, or from
    /// HTTP to a tunnel or an upgraded connection. Refused (and the slot left as it was) when
    /// `class` is a shared class and the shared pool is full.
    pub fn classify(&self, class: Class) -> Result<(), Refusal> {
        let from = self.class();
        if from == class {
            return Ok(());
        }
        let limits = &self.limits;
        if class == Class::Ssh && !limits.take_ssh_startup(self) {
            limits.count_refusal(Refusal::PerSourceSshStartups);
            return Err(Refusal::PerSourceSshStartups);
        }
        if !class.reserved() && from.reserved() && !limits.take_shared() {
            limits.count_refusal(Refusal::SharedFull);
            return Err(Refusal::SharedFull);
        }
        if class.reserved() && !from.reserved() {
            limits.shared_open.fetch_sub(1, Ordering::Relaxed);
        }
        if from == Class::Sniffing {
            self.source.sniffing.fetch_sub(1, Ordering::Relaxed);
        }
        limits.class_open[from as usize].fetch_sub(1, Ordering::Relaxed);
        limits.class_open[class as usize].fetch_add(1, Ordering::Relaxed);
        self.class.store(class as u8, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let class = self.class();
        let limits = &self.limits;
        let source = &self.source;
        match class {
            Class::Sniffing => {
                source.sniffing.fetch_sub(1, Ordering::Relaxed);
            }
            Class::Ssh => source.ssh_startups().retain(|(_, id)| *id != self.id),
            _ => {}
        }
        if source.all.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The network's last connection: forget it, unless one was admitted meanwhile.
            let mut sources = limits.sources();
            let last = source.all.load(Ordering::Relaxed) == 0
                && sources
                    .get(&source.network)
                    .is_some_and(|current| Arc::ptr_eq(current, source));
            if last {
                sources.remove(&source.network);
            }
        }
        if !class.reserved() {
            limits.shared_open.fetch_sub(1, Ordering::Relaxed);
        }
        limits.class_open[class as usize].fetch_sub(1, Ordering::Relaxed);
        if self.holds_total {
            limits.total.add_permits(1);
        }
    }
}

/// The parked HTTP keep-alive connections, oldest first, so that the longest-idle ones can be
/// closed when the process runs out of descriptors. Each entry is the waker of the connection's
/// task (set on its first poll); an evicted connection's entry is removed, and its absence is
/// what the connection finds when woken. No allocation of its own per connection: every idle
/// connection holds a registration (docs/benchmarks.md, memory per idle connection).
#[derive(Debug, Default)]
pub struct IdleConnections {
    parked: Mutex<BTreeMap<u64, Option<Waker>>>,
    next: AtomicU64,
}

/// A parked connection's registration; removed on drop.
#[derive(Debug)]
pub struct ParkedEntry<'a> {
    registry: &'a IdleConnections,
    key: u64,
}

impl ParkedEntry<'_> {
    /// Whether the connection was told to close; registers `cx` to be woken when it is.
    pub fn poll_evicted(&self, cx: &mut std::task::Context<'_>) -> bool {
        let mut parked = self.registry.lock();
        match parked.get_mut(&self.key) {
            None => true,
            Some(waker) => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                false
            }
        }
    }
}

impl IdleConnections {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Option<Waker>>> {
        self.parked
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Registers a connection that just parked.
    pub fn park(&self) -> ParkedEntry<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, None);
        ParkedEntry {
            registry: self,
            key,
        }
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells up to `count` of the longest-parked connections to close; returns how many.
    pub fn evict_oldest(&self, count: usize) -> usize {
        let evicted: Vec<Option<Waker>> = {
            let mut parked = self.lock();
            let keys: Vec<u64> = parked.keys().take(count).copied().collect();
            keys.iter().filter_map(|key| parked.remove(key)).collect()
        };
        let count = evicted.len();
        // Woken outside the lock: a woken connection's task may run on this thread at once.
        for waker in evicted.into_iter().flatten() {
            waker.wake();
        }
        count
    }
}

impl Drop for ParkedEntry<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> Arc<ConnectionLimits> {
        let config = crate::config::Config::parse(
            &format!("[limits]\n{text}\n[ssh]\nupstream = \"127.0.0.1:22\""),
            std::path::Path::new("t"),
        )
        .unwrap();
        ConnectionLimits::new(&config.limits)
    }

    async fn admit(limits: &Arc<ConnectionLimits>, ip: &str) -> Result<ConnectionSlot, Refusal> {
        let permit = limits.wait_for_total().await;
        limits.admit(permit, ip.parse().unwrap())
    }

    #[tokio::test]
    async fn per_source_limits_count_networks_and_release() {
        let limits = limits("max_connections_per_source = 2\nmax_sniffing_per_source = 2");
        let first = admit(&limits, "198.18.0.1").await.unwrap();
        let _second = admit(&limits, "198.18.0.1").await.unwrap();
        assert_eq!(
            admit(&limits, "198.18.0.1").await.unwrap_err(),
            Refusal::PerSource
        );
        assert!(admit(&limits, "198.18.0.2").await.is_ok(), "another /32");
        // One IPv6 /64 is one source.
        let _a = admit(&limits, "fd00::1").await.unwrap();
        let _b = admit(&limits, "fd00::ffff:2").await.unwrap();
        assert_eq!(
            admit(&limits, "fd00::3").await.unwrap_err(),
            Refusal::PerSource
        );
        assert!(admit(&limits, "fd00:0:0:1::1").await.is_ok(), "another /64");
        drop(first);
        assert!(admit(&limits, "198.18.0.1").await.is_ok());
        assert_eq!(limits.refusals()["per_source_limit"], 2);
        drop((_second, _a, _b));
        assert_eq!(
            limits.sources().len(),
            0,
            "networks with no connection are forgotten"
        );
    }

    #[tokio::test]
    async fn sniffing_has_its_own_lower_per_source_limit() {
        let limits = limits("max_connections_per_source = 10\nmax_sniffing_per_source = 1");
        let first = admit(&limits, "198.18.0.1").await.unwrap();
        assert_eq!(
            admit(&limits, "198.18.0.1").await.unwrap_err(),
            Refusal::PerSourceSniffing
        );
        first.classify(Class::Ssh).unwrap();
        let _second = admit(&limits, "198.18.0.1").await.unwrap();
    }

    #[tokio::test]
    async fn the_reserve_keeps_room_for_ssh_when_http_is_full() {
        let limits = limits("max_connections = 4\nssh_reserve = 2");
        let http: Vec<_> = ["198.18.0.1", "198.18.0.2"]
            .iter()
            .map(|ip| {
                let slot = limits.admit(
                    TotalPermit(Arc::clone(&limits.total).try_acquire_owned().unwrap()),
                    ip.parse().unwrap(),
                );
                let slot = slot.unwrap();
                slot.classify(Class::Http).unwrap();
                slot
            })
            .collect();
        let third = admit(&limits, "198.18.0.3").await.unwrap();
        assert_eq!(third.classify(Class::Http), Err(Refusal::SharedFull));
        assert_eq!(third.class(), Class::Sniffing, "left as it was");
        third.classify(Class::Ssh).unwrap();
        let fourth = admit(&limits, "198.18.0.4").await.unwrap();
        fourth.classify(Class::Ssh).unwrap();
        assert!(limits.total_exhausted());
        let classes = limits.classes();
        assert_eq!(classes["ssh"], ClassSnapshot { open: 2, limit: 4 });
        assert_eq!(classes["http"], ClassSnapshot { open: 2, limit: 2 });
        // An upgrade stays in the shared pool.
        http[0].classify(Class::Upgraded).unwrap();
        assert_eq!(limits.classes()["upgraded"].open, 1);
        drop(http);
        drop(third);
        assert!(!limits.total_exhausted());
        assert_eq!(limits.classes()["http"].open, 0);
        assert_eq!(limits.classes()["upgraded"].open, 0);
        assert_eq!(limits.shared_open.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn young_ssh_connections_per_source_are_capped_until_they_age_or_close() {
        let limits = limits("ssh_startups_per_source = 2\nssh_startup_window = \"150ms\"");
        let ssh = |slot: &ConnectionSlot| slot.classify(Class::Ssh);
        let first = admit(&limits, "198.18.0.1").await.unwrap();
        let second = admit(&limits, "198.18.0.1").await.unwrap();
        let third = admit(&limits, "198.18.0.1").await.unwrap();
        ssh(&first).unwrap();
        ssh(&second).unwrap();
        assert_eq!(ssh(&third), Err(Refusal::PerSourceSshStartups));
        let other = admit(&limits, "198.18.0.2").await.unwrap();
        ssh(&other).unwrap();
        drop(first);
        ssh(&third).unwrap();
        let fourth = admit(&limits, "198.18.0.1").await.unwrap();
        assert_eq!(ssh(&fourth), Err(Refusal::PerSourceSshStartups));
        // Once older than the window, sessions no longer count as logging in.
        tokio::time::sleep(Duration::from_millis(200)).await;
        ssh(&fourth).unwrap();
        assert_eq!(limits.refusals()["per_source_ssh_startups"], 2);
        drop((second, third));
    }

    #[tokio::test]
    async fn resizing_applies_to_new_connections() {
        let limits = limits("max_connections = 1\nssh_reserve = 0");
        let slot = admit(&limits, "198.18.0.1").await.unwrap();
        assert!(limits.total_exhausted());
        let bigger = crate::config::Config::parse(
            "[limits]\nmax_connections = 2\nssh_reserve = 0\n[ssh]\nupstream = \"a:1\"",
            std::path::Path::new("t"),
        )
        .unwrap();
        limits.resize(&bigger.limits);
        let second = admit(&limits, "198.18.0.1").await.unwrap();
        assert!(limits.total_exhausted());
        drop((slot, second));
        assert!(!limits.total_exhausted());
    }

    #[test]
    fn the_longest_parked_connections_are_evicted_first() {
        let idle = IdleConnections::default();
        let first = idle.park();
        let second = idle.park();
        let third = idle.park();
        assert_eq!(idle.len(), 3);
        assert_eq!(idle.evict_oldest(2), 2);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(first.poll_evicted(&mut cx));
        assert!(second.poll_evicted(&mut cx));
        assert!(!third.poll_evicted(&mut cx));
        drop((first, second));
        assert_eq!(idle.len(), 1);
        drop(third);
        assert!(idle.is_empty());
    }
}
