//! systemd's file descriptor store (docs/handover.md): under a unit with
//! `FileDescriptorStoreMax=`, muxer keeps its listen sockets and both sockets of every spliced
//! connection there, so that after a crash and `Restart=on-failure` the new process gets them back
//! (`LISTEN_FDS`) and idle sessions live on.
//!
//! Names (`FDNAME=`): `listen` for a listen socket; `internal.P.X` for a marker (a memfd) saying
//! that public port P was redirected to internal port X, since the connections redirected before
//! the crash are tied to X; `conn.I.T.client` and `conn.I.T.upstream` for a spliced connection, I
//! unique (pid and counter) and T its route (`ssh`, `tls`, `fallback`). Names outlive the process
//! that chose them: a successor or a restarted process removes a connection's entries by the same
//! names when it ends. The internal ports' listening
//! sockets are never stored: while no process runs, nothing may listen there, so that the kernel
//! program lets new connections to port 22 reach sshd (fail-open).
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

use sd_notify::NotifyState;
use tracing::warn;

use crate::config::Target;

/// Where systemd is told what to keep; off unless the unit keeps descriptors.
///
/// The messages go through a thread of their own: a notify socket whose reader lags (its queue
/// holds `net.unix.max_dgram_qlen` messages, 10 by default) blocks the sender, and a worker
/// blocked there would stall every connection it serves.
#[derive(Debug, Default)]
pub(crate) struct FdStore {
    notes: Option<Mutex<Sender<Note>>>,
    /// Process id and counter make each connection's name unique across restarts.
    pid: u32,
    next: AtomicU64,
}

/// One message for systemd.
#[derive(Debug)]
enum Note {
    /// Keep these (copies of the caller's) descriptors under this name.
    Store(String, Vec<OwnedFd>),
    /// Drop every descriptor of this name.
    Remove(String),
}

/// Sends the notes in order until every sender is gone.
fn send_notes(notes: Receiver<Note>) {
    for note in notes {
        let result = match &note {
            Note::Store(name, fds) => {
                let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &fds)
            }
            Note::Remove(name) => {
                sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
            }
        };
        if let Err(error) = result {
            warn!(?note, %error, "systemd's descriptor store did not take a message");
        }
    }
}

fn target_name(target: Target) -> &'static str {
    match target {
        Target::Tls => "tls",
        Target::Fallback => "fallback",
        _ => "ssh",
    }
}

fn target_from(name: &str) -> Target {
    match name {
        "tls" => Target::Tls,
        "fallback" => Target::Fallback,
        _ => Target::Ssh,
    }
}

impl FdStore {
    /// On when systemd says the unit keeps descriptors (`$FDSTORE`, systemd 254 and later) or the
    /// unit says so itself (`$MUXER_FD_STORE`, which the installed unit sets for older systemd),
    /// and there is a notify socket.
    pub(crate) fn from_environment() -> FdStore {
        let positive = |name| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse::<u64>().ok())
                .is_some_and(|count| count > 0)
        };
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some()
            && (positive("FDSTORE") || positive("MUXER_FD_STORE"));
        let notes = enabled
            .then(|| {
                let (sender, receiver) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("muxer-fd-store".into())
                    .spawn(move || send_notes(receiver))
                    .map_err(|error| warn!(%error, "systemd's descriptor store unused: no thread"))
                    .ok()
                    .map(|_| Mutex::new(sender))
            })
            .flatten();
        FdStore {
            notes,
            pid: std::process::id(),
            next: AtomicU64::new(0),
        }
    }

    /// Whether anything is stored.
    pub(crate) fn enabled(&self) -> bool {
        self.notes.is_some()
    }

    fn send(&self, note: Note) {
        if let Some(notes) = &self.notes {
            let sent = notes
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .send(note);
            if sent.is_err() {
                warn!("systemd's descriptor store unused: its thread ended");
            }
        }
    }

    fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) {
        let copies: std::io::Result<Vec<OwnedFd>> =
            fds.iter().map(|fd| fd.try_clone_to_owned()).collect();
        match copies {
            Ok(copies) => self.send(Note::Store(name.to_owned(), copies)),
            Err(error) => warn!(name, %error, "cannot keep a socket in systemd's descriptor store"),
        }
    }

    fn remove(&self, name: &str) {
        self.send(Note::Remove(name.to_owned()));
    }

    /// Keeps the listen sockets.
    pub(crate) fn keep_listeners<'a>(&self, sockets: impl IntoIterator<Item = BorrowedFd<'a>>) {
        if !self.enabled() {
            return;
        }
        for socket in sockets {
            self.store("listen", &[socket]);
        }
    }

    /// Notes that connections to `public_port` are redirected to `internal_port`.
    pub(crate) fn keep_internal_port(&self, public_port: u16, internal_port: u16) {
        if !self.enabled() {
            return;
        }
        match rustix::fs::memfd_create("muxer-internal-port", rustix::fs::MemfdFlags::CLOEXEC) {
            Ok(marker) => self.store(
                &format!("internal.{public_port}.{internal_port}"),
                &[marker.as_fd()],
            ),
            Err(error) => warn!(%error, "cannot create the internal port's marker"),
        }
    }

    /// Removes the note that `public_port` went to `internal_port` (bound elsewhere now).
    pub(crate) fn forget_internal_port(&self, public_port: u16, internal_port: u16) {
        if self.enabled() {
            self.remove(&format!("internal.{public_port}.{internal_port}"));
        }
    }

    /// Keeps a spliced connection's sockets; returns the prefix of their names, for
    /// [`FdStore::forget`].
    pub(crate) fn keep_connection(
        &self,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        target: Target,
    ) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("conn.{}x{id}.{}", self.pid, target_name(target));
        self.store(&format!("{prefix}.client"), &[client]);
        self.store(&format!("{prefix}.upstream"), &[upstream]);
        Some(prefix)
    }

    /// Removes a connection's sockets from the store, once it ended.
    pub(crate) fn forget(&self, prefix: &str) {
        self.remove(&format!("{prefix}.client"));
        self.remove(&format!("{prefix}.upstream"));
    }
}

/// A spliced connection systemd gave back.
#[derive(Debug)]
pub(crate) struct RestoredConnection {
    /// The client's socket.
    pub(crate) client: OwnedFd,
    /// The backend's socket.
    pub(crate) upstream: OwnedFd,
    /// Its route.
    pub(crate) target: Target,
    /// The prefix of its names in the store.
    pub(crate) stored: String,
}

impl RestoredConnection {
    /// Removes the connection from the store (it ended while no process ran).
    pub(crate) fn close_in_store(self, store: &FdStore) {
        store.forget(&self.stored);
    }
}

/// What systemd gave back at start (`LISTEN_FDS`), if anything.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// Listen sockets.
    pub(crate) listeners: Vec<OwnedFd>,
    /// Public port → internal port, as before the restart.
    pub(crate) internal_ports: BTreeMap<u16, u16>,
    /// Spliced connections.
    pub(crate) connections: Vec<RestoredConnection>,
}

/// The descriptors systemd passed with their names, sorted into what muxer stored.
pub(crate) fn restored() -> Restored {
    let mut restored = Restored::default();
    let passed = match sd_notify::listen_fds_with_names() {
        Ok(passed) => passed,
        Err(error) => {
            warn!(%error, "cannot read the descriptors systemd passed");
            return restored;
        }
    };
    // Name prefix → (client, upstream).
    let mut halves: BTreeMap<String, (Option<OwnedFd>, Option<OwnedFd>)> = BTreeMap::new();
    for (raw, name) in passed {
        // SAFETY: systemd passed these descriptors to this process alone (LISTEN_PID matched);
        // nothing else in the process refers to them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            ["listen"] => restored.listeners.push(fd),
            ["internal", public, internal] => {
                if let (Ok(public), Ok(internal)) = (public.parse(), internal.parse()) {
                    restored.internal_ports.insert(public, internal);
                }
            }
            ["conn", id, target, side @ ("client" | "upstream")] => {
                let entry = halves.entry(format!("conn.{id}.{target}")).or_default();
                if *side == "client" {
                    entry.0 = Some(fd);
                } else {
                    entry.1 = Some(fd);
                }
            }
            _ => warn!(name, "an unknown descriptor from systemd's store closed"),
        }
    }
    for (prefix, halves) in halves {
        match halves {
            (Some(client), Some(upstream)) => restored.connections.push(RestoredConnection {
                client,
                upstream,
                target: target_from(prefix.rsplit('.').next().unwrap_or("ssh")),
                stored: prefix,
            }),
            _ => warn!(
                prefix,
                "half a connection came back from systemd's store; closed"
            ),
        }
    }
    restored
}
