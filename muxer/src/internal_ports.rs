//! The internal listening ports of the TC/XDP redirect: one per public port, on every listen
//! address, where muxer accepts the connections redirected from that public port and nothing else
//! (docs/redirect.md). A packet's port then tells the kernel programs which public port it
//! belongs to, and the kernel's socket table which connections are muxer's: no flow table.
//!
//! The kernel picks each port (bind to port 0, so nothing else on the host holds it and no
//! outgoing connection gets it as its source port). Each worker gets its socket of every new
//! group through a channel, so a reload that adds a public port adds its listener to running
//! workers. A group stays open for the daemon's life: re-adding a port reuses it.
use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::info;

use crate::listener::{self, ListenError};
use crate::runtime::HandoverHub;

/// Attempts at finding one port free on every listen address.
const BIND_ATTEMPTS: usize = 16;

/// The internal ports bound so far, and the way to each worker's accept loop.
pub(crate) struct InternalPorts {
    /// Public port → internal port.
    ports: BTreeMap<u16, u16>,
    /// The listen addresses (their IPs are the internal listeners' IPs).
    addresses: Vec<SocketAddr>,
    keepalive: Duration,
    /// One sender per worker: new listening sockets for its accept loop.
    workers: Vec<UnboundedSender<StdTcpListener>>,
    /// A copy of every internal socket with its public port, for a successor process.
    copies: Vec<(u16, OwnedFd)>,
    /// Public port → the internal port it had before a restart (systemd's descriptor store
    /// kept connections tied to it), tried first.
    preferred: BTreeMap<u16, u16>,
    /// Where a new internal port is noted for a restart.
    handover: Arc<HandoverHub>,
}

impl InternalPorts {
    /// Internal ports on `addresses`' IPs for `workers` workers; returns the receiving end of
    /// each worker's channel, in worker order.
    pub(crate) fn new(
        addresses: &[SocketAddr],
        workers: usize,
        keepalive: Duration,
        handover: Arc<HandoverHub>,
    ) -> (InternalPorts, Vec<UnboundedReceiver<StdTcpListener>>) {
        let (senders, receivers) = (0..workers).map(|_| unbounded_channel()).unzip();
        let internal = InternalPorts {
            ports: BTreeMap::new(),
            addresses: addresses.to_vec(),
            keepalive,
            workers: senders,
            copies: Vec::new(),
            preferred: BTreeMap::new(),
            handover,
        };
        (internal, receivers)
    }

    /// Binds an internal port for every port of `public` that has none yet, hands the new
    /// sockets to the workers, and returns public port → internal port for all of them.
    pub(crate) fn ensure(&mut self, public: &[u16]) -> Result<&BTreeMap<u16, u16>, ListenError> {
        for &port in public {
            if self.ports.contains_key(&port) {
                continue;
            }
            let (internal, groups) = self.bind_for(port)?;
            self.hand_to_workers(port, groups.into_iter().flatten());
            info!(
                public_port = port,
                internal_port = internal,
                "internal port bound"
            );
            self.ports.insert(port, internal);
        }
        Ok(&self.ports)
    }

    /// Internal ports to bind again for their public ports (from systemd's descriptor store).
    pub(crate) fn prefer(&mut self, preferred: BTreeMap<u16, u16>) {
        self.preferred = preferred;
    }

    /// Binds `public`'s internal port: the one it had before a restart if free, else one the
    /// kernel picks (noted in systemd's store, if kept).
    fn bind_for(&self, public: u16) -> Result<(u16, Vec<Vec<StdTcpListener>>), ListenError> {
        let store = &self.handover.fd_store;
        if let Some(&before) = self.preferred.get(&public) {
            match self.bind_at(&self.addresses, before) {
                Ok(groups) => return Ok((before, groups)),
                Err(error) => {
                    tracing::warn!(public_port = public, internal_port = before, %error, "the internal port of before the restart is taken; connections restored on it will fail");
                    store.forget_internal_port(public, before);
                }
            }
        }
        let (internal, groups) = self.bind()?;
        store.keep_internal_port(public, internal);
        Ok((internal, groups))
    }

    /// Takes over the internal sockets a previous process passed (public port → its sockets on
    /// every listen address), keeping their port numbers: the connections redirected to them
    /// before the handover are tied to those ports.
    pub(crate) fn adopt(&mut self, inherited: BTreeMap<u16, Vec<StdTcpListener>>) {
        for (public, sockets) in inherited {
            let Some(internal) = sockets
                .first()
                .and_then(|socket| socket.local_addr().ok())
                .map(|address| address.port())
            else {
                continue;
            };
            self.hand_to_workers(public, sockets);
            info!(
                public_port = public,
                internal_port = internal,
                "internal port taken over"
            );
            self.ports.insert(public, internal);
        }
    }

    /// Gives `sockets` (of `public`'s internal port) to the workers in turn, keeping a copy.
    fn hand_to_workers(&mut self, public: u16, sockets: impl IntoIterator<Item = StdTcpListener>) {
        for (index, socket) in sockets.into_iter().enumerate() {
            if let Ok(copy) = socket.as_fd().try_clone_to_owned() {
                self.copies.push((public, copy));
            }
            // A worker that stopped accepting drops the socket: nothing to do.
            let _ = self.workers[index % self.workers.len()].send(socket);
        }
    }

    /// Closes the copies kept for a successor (stopping: nothing may listen on an internal
    /// port once the workers stop accepting).
    pub(crate) fn close_copies(&mut self) {
        self.copies.clear();
    }

    /// Every internal socket, with its public port (for a successor process).
    pub(crate) fn sockets(&self) -> impl Iterator<Item = (u16, BorrowedFd<'_>)> {
        self.copies.iter().map(|(public, fd)| (*public, fd.as_fd()))
    }

    /// One group per listen address, all on one port the kernel picked.
    fn bind(&self) -> Result<(u16, Vec<Vec<StdTcpListener>>), ListenError> {
        let count = self.workers.len();
        let Some(first) = self.addresses.first() else {
            return Err(ListenError {
                address: SocketAddr::from(([0, 0, 0, 0], 0)),
                call: "bind (no listen address)",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let first_group = listener::bind_group(with_port(*first, 0), count, self.keepalive)?;
            let port = first_group
                .first()
                .and_then(|socket| socket.local_addr().ok())
                .map_or(0, |address| address.port());
            let mut groups = vec![first_group];
            // The other addresses need the same port; if one has it taken, try another port.
            match self.bind_at(&self.addresses[1..], port) {
                Ok(rest) => {
                    groups.extend(rest);
                    return Ok((port, groups));
                }
                Err(error)
                    if error.source.kind() == io::ErrorKind::AddrInUse
                        && attempt < BIND_ATTEMPTS => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// One group per address of `addresses`, all on `port`.
    fn bind_at(
        &self,
        addresses: &[SocketAddr],
        port: u16,
    ) -> Result<Vec<Vec<StdTcpListener>>, ListenError> {
        addresses
            .iter()
            .map(|&address| {
                listener::bind_group(with_port(address, port), self.workers.len(), self.keepalive)
            })
            .collect()
    }
}

fn with_port(mut address: SocketAddr, port: u16) -> SocketAddr {
    address.set_port(port);
    address
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_port_per_public_port_on_every_address_and_every_worker_gets_its_socket() {
        let addresses: Vec<SocketAddr> = vec![
            "127.0.0.1:2222".parse().unwrap(),
            "[::1]:2222".parse().unwrap(),
        ];
        let (mut internal, mut receivers) =
            InternalPorts::new(&addresses, 2, Duration::from_secs(30), Default::default());
        let ports = internal.ensure(&[22, 443]).unwrap().clone();
        assert_eq!(ports.len(), 2);
        assert_ne!(ports[&22], ports[&443]);
        assert!(!ports.values().any(|&port| port == 0 || port == 2222));
        // Asking again binds nothing new.
        assert_eq!(internal.ensure(&[443, 22]).unwrap(), &ports);
        for receiver in &mut receivers {
            let mut bound = Vec::new();
            while let Ok(socket) = receiver.try_recv() {
                bound.push(socket.local_addr().unwrap());
            }
            bound.sort();
            let mut expected: Vec<SocketAddr> = ports
                .values()
                .flat_map(|&port| addresses.iter().map(move |&a| with_port(a, port)))
                .collect();
            expected.sort();
            assert_eq!(bound, expected);
        }
    }
}
