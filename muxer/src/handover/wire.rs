//! The handover channel's framing: one SOCK_SEQPACKET message per item, carrying a JSON header,
//! raw bytes after it, and descriptors (SCM_RIGHTS). Blocking; each end is used by one thread.
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

use super::Header;

/// Largest message: a header, and the bytes a paused connection had read but not yet written
/// (at most one 64 KiB pipe or one copy buffer each way).
const MAX_MESSAGE: usize = 512 * 1024;
/// Room for a connection's JSON header beside its pending bytes (a few hundred bytes; the
/// backend's name is the only long field).
const HEADER_ROOM: usize = 8 * 1024;
/// The kernel's default `net.core.wmem_max`: the most SO_SNDBUF asks for without CAP_NET_ADMIN.
pub(super) const DEFAULT_WMEM_MAX: usize = 212_992;
/// What one message can carry where `net.core.wmem_max` is the kernel's default: the send buffer
/// is capped at twice that, less 32 bytes (`unix_dgram_sendmsg`).
const DEFAULT_SENDABLE: usize = 2 * DEFAULT_WMEM_MAX - 32;
// A paused connection is one message, also on a machine with default limits.
const _: () = assert!(2 * crate::splice::LARGEST_BUFFER + HEADER_ROOM <= DEFAULT_SENDABLE);
const _: () = assert!(DEFAULT_SENDABLE <= MAX_MESSAGE);
/// Most descriptors in one message (listeners go one per message; connections carry two).
const MAX_FDS: usize = 4;

/// One end of the handover channel.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
    /// Where messages are received: allocated by the first, reused by the others (one per
    /// handed-over connection).
    buffer: Vec<u8>,
}

/// A received message.
#[derive(Debug)]
pub(crate) struct Message {
    /// What it is.
    pub(crate) header: Header,
    /// The descriptors it carried, in order.
    pub(crate) fds: Vec<OwnedFd>,
    /// The bytes after the header.
    pub(crate) payload: Vec<u8>,
}

impl Channel {
    /// A connected pair: the first end stays, the second goes to the successor (inheritable: no
    /// CLOEXEC).
    pub(crate) fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::empty(),
        )?;
        rustix::io::fcntl_setfd(&ours, rustix::io::FdFlags::CLOEXEC)?;
        for end in [&ours, &theirs] {
            // Large enough for the largest message. SO_SNDBUFFORCE (CAP_NET_ADMIN, which the
            // unit grants) ignores net.core.wmem_max; without it the kernel caps SO_SNDBUF there,
            // which still holds the largest connection at the default limit (DEFAULT_SENDABLE).
            if setsockopt(end, sockopt::SndBufForce, &(MAX_MESSAGE * 2)).is_err() {
                let _ = setsockopt(end, sockopt::SndBuf, &(MAX_MESSAGE * 2));
            }
        }
        Ok((Channel::new(ours), theirs))
    }

    /// The channel on an inherited descriptor.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Channel> {
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
        Ok(Channel::new(fd))
    }

    /// Asks for a send buffer of `bytes` (the kernel grants twice that, up to wmem_max).
    #[cfg(test)]
    pub(crate) fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        Ok(setsockopt(&self.fd, sockopt::SndBuf, &bytes)?)
    }

    fn new(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            buffer: Vec::new(),
        }
    }

    /// Sends one message.
    pub(crate) fn send(
        &self,
        header: &Header,
        fds: &[BorrowedFd<'_>],
        payload: &[&[u8]],
    ) -> io::Result<()> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let length = (json.len() as u32).to_le_bytes();
        let mut slices = vec![IoSlice::new(&length), IoSlice::new(&json)];
        slices.extend(payload.iter().map(|part| IoSlice::new(part)));
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &slices,
                control,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    /// Receives one message; `None` once the other end has closed.
    pub(crate) fn recv(&mut self) -> io::Result<Option<Message>> {
        self.buffer.resize(MAX_MESSAGE, 0);
        let buffer = &mut self.buffer;
        let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (length, fds, truncated) = loop {
            let mut slices = [IoSliceMut::new(buffer)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut slices,
                Some(&mut control),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(message) => {
                    let mut fds = Vec::new();
                    for cmsg in message.cmsgs()? {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            // SAFETY: the kernel just installed these descriptors in this
                            // process for this message; nothing else owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    let truncated = message
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (message.bytes, fds, truncated);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        };
        if length == 0 {
            return Ok(None);
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if truncated {
            return Err(bad("handover message truncated"));
        }
        let header_len = buffer
            .get(..4)
            .and_then(|bytes| bytes.try_into().ok())
            .map(|bytes: [u8; 4]| u32::from_le_bytes(bytes) as usize)
            .filter(|&header_len| 4 + header_len <= length)
            .ok_or_else(|| bad("handover message without a header"))?;
        let header: Header = serde_json::from_slice(&buffer[4..4 + header_len])
            .map_err(|error| bad(&format!("handover header: {error}")))?;
        let payload = buffer[4 + header_len..length].to_vec();
        Ok(Some(Message {
            header,
            fds,
            payload,
        }))
    }

    /// Whether a message (or the other end's close) is waiting, within `timeout`.
    pub(crate) fn readable_within(&self, timeout: std::time::Duration) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let timeout = Timespec::try_from(timeout).map_err(io::Error::other)?;
        match poll(&mut fds, Some(&timeout)) {
            Ok(ready) => Ok(ready > 0),
            Err(rustix::io::Errno::INTR) => Ok(false),
            Err(errno) => Err(errno.into()),
        }
    }
}
