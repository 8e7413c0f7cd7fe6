//! Handing the running daemon's sockets to a successor process (`muxer upgrade`, SIGUSR2), so
//! that SSH sessions survive an upgrade (docs/handover.md).
//!
//! The old process starts the new binary with one end of a SOCK_SEQPACKET pair
//! (`MUXER_HANDOVER_FD`) and sends it every listening socket. The successor binds nothing it was
//! given, attaches its kernel programs beside the old ones, starts serving and answers `Ready`.
//! Only then does the old process stop accepting and pause each spliced connection between two
//! writes: both sockets and the bytes it had read but not yet written go over as a [`Parcel`],
//! and the successor goes on splicing. HTTP requests in flight finish in the old process. If the
//! successor fails before `Ready`, the old process has given nothing up and serves on.
pub(crate) mod fd_store;
mod wire;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client_source::UsedSource;
use crate::config::Target;

pub(crate) use wire::Channel;

/// The environment variable naming the inherited channel's descriptor.
pub(crate) const FD_VARIABLE: &str = "MUXER_HANDOVER_FD";

/// Why a handover did not happen. The old process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The successor could not be started.
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The successor exited before taking over.
    #[error("the new process exited ({0}) before taking over; its reason is in the log")]
    Exited(std::process::ExitStatus),
    /// The successor did not take over in time (it was killed).
    #[error("the new process did not take over within {0:?}; it was stopped")]
    Timeout(Duration),
    /// The channel failed.
    #[error("handover channel: {0}")]
    Channel(#[from] io::Error),
    /// The other side sent something out of order.
    #[error("handover channel: unexpected {0}")]
    Protocol(&'static str),
    /// The kernel attachments could not be offered to the successor.
    #[error("kernel redirect: {0}")]
    Redirect(String),
}

/// What a handed-over listening socket is for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "role")]
pub(crate) enum Role {
    /// A socket of a listen address's SO_REUSEPORT group.
    Listen,
    /// A socket of the internal port where connections to `public_port` are redirected.
    Internal {
        /// The public port.
        public_port: u16,
    },
    /// The control socket.
    Control,
    /// The metrics endpoint.
    Metrics,
}

/// What a spliced connection's log line and counters need in the successor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ConnectionMeta {
    /// The client (as the log names it: the PROXY header's address where there was one).
    pub(crate) client: SocketAddr,
    /// The protocol label (`ssh`, `tls`, …).
    pub(crate) protocol: String,
    /// Where the connection's route led.
    pub(crate) target: Target,
    /// The backend's address as configured.
    pub(crate) backend: String,
    /// The source the upstream saw, where muxer chose one.
    pub(crate) upstream_source: Option<UsedSource>,
    /// Bytes so far, client → backend and back.
    pub(crate) bytes: (u64, u64),
    /// Milliseconds since the connection was accepted.
    pub(crate) age_ms: u64,
    /// Lengths of the pending bytes in the payload: client → backend first.
    pub(crate) pending: (usize, usize),
    /// The prefix of its names in systemd's descriptor store, if it is kept there.
    pub(crate) stored: Option<String>,
}

/// One channel message's header.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub(crate) enum Header {
    /// A listening socket (one descriptor).
    Listener(Role),
    /// All listening sockets were sent.
    ListenersDone,
    /// The successor serves (its process id).
    Ready {
        /// Its pid.
        pid: u32,
    },
    /// A spliced connection (descriptors: client, upstream; payload: the pending bytes).
    Connection(ConnectionMeta),
    /// Nothing more will come.
    Done,
}

/// A paused spliced connection on its way to the successor.
#[derive(Debug)]
pub(crate) struct Parcel {
    /// Its description.
    pub(crate) meta: ConnectionMeta,
    /// The client's socket.
    pub(crate) client: OwnedFd,
    /// The backend's socket.
    pub(crate) upstream: OwnedFd,
    /// Read from the client, not yet written to the backend.
    pub(crate) pending_up: Vec<u8>,
    /// Read from the backend, not yet written to the client.
    pub(crate) pending_down: Vec<u8>,
}

/// The successor, from the old process's side.
pub(crate) struct Successor {
    child: Child,
    channel: Channel,
}

impl Successor {
    /// Starts `binary` with `args` (the old process's own), sends it `listeners` and waits up to
    /// `timeout` until it serves; returns it and its pid. On failure nothing was given up: the
    /// successor is stopped (if still running) and reaped.
    pub(crate) fn start(
        binary: &Path,
        args: &[OsString],
        listeners: &[(Role, BorrowedFd<'_>)],
        timeout: Duration,
    ) -> Result<(Successor, u32), HandoverError> {
        let mut successor = Successor::spawn(binary, args)?;
        let ready = successor
            .send_listeners(listeners)
            .and_then(|()| successor.await_ready(timeout));
        match ready {
            Ok(pid) => Ok((successor, pid)),
            Err(error) => {
                // A successor that exited on its own is the better reason (a broken channel is
                // its consequence); one still running is stopped.
                let exited = successor.exit_status_within(Duration::from_secs(1));
                if exited.is_none() {
                    let _ = successor.child.kill();
                    let _ = successor.child.wait();
                }
                Err(match (exited, error) {
                    (Some(status), HandoverError::Channel(_)) => HandoverError::Exited(status),
                    (_, error) => error,
                })
            }
        }
    }

    /// The successor's exit status if it exits within `limit` (a broken channel precedes the
    /// exit by a moment).
    fn exit_status_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }

    fn spawn(binary: &Path, args: &[OsString]) -> Result<Successor, HandoverError> {
        let spawn_error = |source| HandoverError::Spawn {
            binary: binary.to_owned(),
            source,
        };
        let (channel, theirs) = Channel::pair().map_err(spawn_error)?;
        let child = Command::new(binary)
            .args(args)
            .env(FD_VARIABLE, theirs.as_raw_fd().to_string())
            .spawn()
            .map_err(spawn_error)?;
        drop(theirs);
        Ok(Successor { child, channel })
    }

    fn send_listeners(&self, listeners: &[(Role, BorrowedFd<'_>)]) -> Result<(), HandoverError> {
        for (role, fd) in listeners {
            self.channel.send(&Header::Listener(*role), &[*fd], &[])?;
        }
        self.channel.send(&Header::ListenersDone, &[], &[])?;
        Ok(())
    }

    fn await_ready(&mut self, timeout: Duration) -> Result<u32, HandoverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(HandoverError::Exited(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandoverError::Timeout(timeout));
            }
            if !self
                .channel
                .readable_within(left.min(Duration::from_millis(50)))?
            {
                continue;
            }
            match self.channel.recv()? {
                Some(message) => match message.header {
                    Header::Ready { pid } => return Ok(pid),
                    _ => return Err(HandoverError::Protocol("message instead of ready")),
                },
                None => {
                    // Closed: the successor is exiting; report its status.
                    let status = self.child.wait()?;
                    return Err(HandoverError::Exited(status));
                }
            }
        }
    }

    /// Sends one paused connection.
    pub(crate) fn send_connection(&self, parcel: &Parcel) -> io::Result<()> {
        self.channel.send(
            &Header::Connection(parcel.meta.clone()),
            &[parcel.client.as_fd(), parcel.upstream.as_fd()],
            &[&parcel.pending_up, &parcel.pending_down],
        )
    }

    /// Tells the successor that nothing more comes.
    pub(crate) fn finish(self) {
        let _ = self.channel.send(&Header::Done, &[], &[]);
    }
}

/// What a process inherited before it serves: from a predecessor handing over (with the channel
/// the connections come over), or from systemd's descriptor store after a restart.
#[derive(Debug)]
pub(crate) struct Inheritance {
    channel: Option<Channel>,
    listeners: Vec<(Role, OwnedFd)>,
}

/// The inheritance this process was started with (`muxer upgrade` started it), if any: every
/// listening socket of the old process.
pub(crate) fn inherit() -> Result<Option<Inheritance>, HandoverError> {
    let Some(value) = std::env::var_os(FD_VARIABLE) else {
        return Ok(None);
    };
    let fd: i32 = value
        .to_str()
        .and_then(|text| text.parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or(HandoverError::Protocol("MUXER_HANDOVER_FD value"))?;
    // Checked before taking ownership: a number that names no open descriptor is refused.
    rustix::io::fcntl_getfd(
        // SAFETY: borrowed only for this call; `fcntl` on a closed number fails with EBADF.
        unsafe { BorrowedFd::borrow_raw(fd) },
    )
    .map_err(io::Error::from)?;
    // SAFETY: the old process passed this descriptor for us alone, and nothing else in this
    // process refers to it (checked open just above).
    let mut channel = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
    let mut listeners = Vec::new();
    loop {
        let message = channel
            .recv()?
            .ok_or(HandoverError::Protocol("end before the listeners"))?;
        match message.header {
            Header::Listener(role) => {
                let fd = message
                    .fds
                    .into_iter()
                    .next()
                    .ok_or(HandoverError::Protocol("listener without a socket"))?;
                listeners.push((role, fd));
            }
            Header::ListenersDone => break,
            _ => return Err(HandoverError::Protocol("message among the listeners")),
        }
    }
    Ok(Some(Inheritance {
        channel: Some(channel),
        listeners,
    }))
}

fn local_address(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd)
        .local_addr()
        .ok()
        .and_then(|address| address.as_socket())
}

impl Inheritance {
    /// The listen sockets systemd's descriptor store gave back.
    pub(crate) fn from_store(listeners: Vec<OwnedFd>) -> Inheritance {
        Inheritance {
            channel: None,
            listeners: listeners.into_iter().map(|fd| (Role::Listen, fd)).collect(),
        }
    }

    /// Whether a predecessor still runs and hands over (rather than systemd restoring sockets
    /// after the previous process ended).
    pub(crate) fn has_predecessor(&self) -> bool {
        self.channel.is_some()
    }

    /// The inherited sockets of the listen address `address` (its SO_REUSEPORT group).
    pub(crate) fn take_listen(&mut self, address: SocketAddr) -> Vec<StdTcpListener> {
        self.take(|role, fd| {
            role == Role::Listen && local_address(fd).is_some_and(|bound| same(bound, address))
        })
        .into_iter()
        .map(|(_, fd)| StdTcpListener::from(fd))
        .collect()
    }

    /// The inherited internal-port sockets, by public port.
    pub(crate) fn take_internal(&mut self) -> BTreeMap<u16, Vec<StdTcpListener>> {
        let mut ports: BTreeMap<u16, Vec<StdTcpListener>> = BTreeMap::new();
        for (role, fd) in self.take(|role, _| matches!(role, Role::Internal { .. })) {
            if let Role::Internal { public_port } = role {
                ports
                    .entry(public_port)
                    .or_default()
                    .push(StdTcpListener::from(fd));
            }
        }
        ports
    }

    /// The inherited control socket.
    pub(crate) fn take_control(&mut self) -> Option<StdUnixListener> {
        self.take(|role, _| role == Role::Control)
            .pop()
            .map(|(_, fd)| StdUnixListener::from(fd))
    }

    /// The inherited metrics socket, if it listens on `address`.
    pub(crate) fn take_metrics(&mut self, address: SocketAddr) -> Option<StdTcpListener> {
        self.take(|role, fd| {
            role == Role::Metrics && local_address(fd).is_some_and(|bound| same(bound, address))
        })
        .pop()
        .map(|(_, fd)| StdTcpListener::from(fd))
    }

    fn take(&mut self, wanted: impl Fn(Role, &OwnedFd) -> bool) -> Vec<(Role, OwnedFd)> {
        let (taken, kept) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|(role, fd)| wanted(*role, fd));
        self.listeners = kept;
        taken
    }

    /// Tells the predecessor (if any) that this process serves; returns the channel the
    /// connections come over. Inherited sockets nobody took (an address no longer configured)
    /// are closed.
    pub(crate) fn ready(self) -> Result<Option<Channel>, HandoverError> {
        if let Some(channel) = &self.channel {
            channel.send(
                &Header::Ready {
                    pid: std::process::id(),
                },
                &[],
                &[],
            )?;
        }
        Ok(self.channel)
    }
}

/// Whether a bound address is the configured one (port 0 in the config matches any port).
fn same(bound: SocketAddr, configured: SocketAddr) -> bool {
    bound.ip() == configured.ip() && (configured.port() == 0 || bound.port() == configured.port())
}

/// Receives paused connections until the old process is done, handing each to `deliver`.
pub(crate) fn receive_connections(channel: &mut Channel, mut deliver: impl FnMut(Parcel)) {
    loop {
        let message = match channel.recv() {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "handover channel failed; no more connections come over");
                return;
            }
        };
        match message.header {
            Header::Connection(meta) => match parcel(meta, message.fds, message.payload) {
                Some(parcel) => deliver(parcel),
                None => tracing::warn!("a handed-over connection arrived incomplete; dropped"),
            },
            Header::Done => return,
            _ => tracing::warn!("unexpected handover message ignored"),
        }
    }
}

fn parcel(meta: ConnectionMeta, fds: Vec<OwnedFd>, mut payload: Vec<u8>) -> Option<Parcel> {
    let [client, upstream]: [OwnedFd; 2] = fds.try_into().ok()?;
    let (up, down) = meta.pending;
    if up.checked_add(down)? != payload.len() {
        return None;
    }
    let pending_down = payload.split_off(up);
    Some(Parcel {
        meta,
        client,
        upstream,
        pending_up: payload,
        pending_down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A paused connection with both copy buffers full and unwritten.
    fn full_parcel() -> Parcel {
        let (client, upstream) = std::os::unix::net::UnixStream::pair().unwrap();
        let largest = crate::splice::LARGEST_BUFFER;
        let pending_up: Vec<u8> = (0..largest).map(|i| (i % 251) as u8).collect();
        let pending_down: Vec<u8> = (0..largest).map(|i| (i % 241) as u8).collect();
        Parcel {
            meta: ConnectionMeta {
                client: "[fd00::1]:65535".parse().unwrap(),
                protocol: "ssh".into(),
                target: Target::Ssh,
                // The longest name a backend can have.
                backend: format!("{}.example:22", "a".repeat(240)),
                upstream_source: None,
                bytes: (u64::MAX, u64::MAX),
                age_ms: u64::MAX,
                pending: (pending_up.len(), pending_down.len()),
                stored: Some("muxer-connection-".repeat(8)),
            },
            client: client.into(),
            upstream: upstream.into(),
            pending_up,
            pending_down,
        }
    }

    /// Sends two fully paused connections over `sender` and checks what `receiver` gets.
    fn send_full_parcels(sender: Channel, mut receiver: Channel) {
        // The channel may hold only about one such message: the successor receives as they come.
        let receiving = std::thread::spawn(move || {
            let mut received = Vec::new();
            receive_connections(&mut receiver, |parcel| received.push(parcel));
            received
        });
        let sent = full_parcel();
        for _ in 0..2 {
            sender
                .send(
                    &Header::Connection(sent.meta.clone()),
                    &[sent.client.as_fd(), sent.upstream.as_fd()],
                    &[&sent.pending_up, &sent.pending_down],
                )
                .expect("one message holds a fully paused connection");
        }
        sender.send(&Header::Done, &[], &[]).unwrap();
        let received = receiving.join().unwrap();
        assert_eq!(received.len(), 2, "connections that came over");
        for parcel in received {
            assert!(
                parcel.pending_up == sent.pending_up,
                "client → backend bytes changed"
            );
            assert!(
                parcel.pending_down == sent.pending_down,
                "backend → client bytes changed"
            );
            assert_eq!(parcel.meta.backend, sent.meta.backend);
        }
    }

    #[test]
    fn connections_paused_with_both_buffers_full_cross_the_channel() {
        let (sender, theirs) = Channel::pair().unwrap();
        send_full_parcels(sender, Channel::from_fd(theirs).unwrap());
    }

    #[test]
    fn connections_paused_with_both_buffers_full_cross_a_channel_with_default_limits() {
        let (sender, theirs) = Channel::pair().unwrap();
        // The send buffer a process without CAP_NET_ADMIN gets where net.core.wmem_max is the
        // kernel's default.
        sender.set_send_buffer(wire::DEFAULT_WMEM_MAX).unwrap();
        send_full_parcels(sender, Channel::from_fd(theirs).unwrap());
    }
}
