//! A stand-in for systemd's side of a `Type=notify` unit with `FileDescriptorStoreMax=`: the
//! notify socket (`READY=1`, `MAINPID=`, `FDSTORE=1`/`FDSTOREREMOVE=1` with `FDNAME=`), the
//! descriptor store, and starting the service with the stored descriptors (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`). systemd is not PID 1 on the test machines.
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// The notify socket, read by a thread of its own as systemd reads it (promptly: a sender whose
/// messages queue up would block), and the descriptor store.
pub struct FakeSystemd {
    dir: tempfile::TempDir,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    deaf: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Copies made for a start, open until this is dropped (the child has its own by then).
    passed: Vec<Vec<OwnedFd>>,
}

/// What the notify socket brought.
#[derive(Default)]
struct Received {
    store: Vec<(String, OwnedFd)>,
    states: Vec<String>,
}

impl Default for FakeSystemd {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Takes in one message, keeping and removing descriptors as asked; false on timeout.
fn receive(socket: &UnixDatagram, received: &Mutex<Received>) -> bool {
    let mut buffer = vec![0u8; 4096];
    let mut control = nix::cmsg_space!([RawFd; 16]);
    let mut slices = [IoSliceMut::new(&mut buffer)];
    let message = match recvmsg::<()>(
        socket.as_raw_fd(),
        &mut slices,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(message) => message,
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return false,
        Err(error) => panic!("notify socket: {error}"),
    };
    let mut fds = Vec::new();
    for cmsg in message.cmsgs().expect("control messages") {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: received just now; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let length = message.bytes;
    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let name = lines
        .iter()
        .find_map(|line| line.strip_prefix("FDNAME="))
        .unwrap_or("stored")
        .to_owned();
    let mut received = received.lock().expect("lock");
    if lines.contains(&"FDSTORE=1") {
        received
            .store
            .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
    } else if lines.contains(&"FDSTOREREMOVE=1") {
        received.store.retain(|(stored, _)| *stored != name);
    }
    received
        .states
        .extend(lines.iter().map(|line| line.to_string()));
    true
}

impl FakeSystemd {
    /// A notify socket in a directory of its own, and its reader.
    pub fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = UnixDatagram::bind(dir.path().join("notify")).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let deaf = Arc::new(AtomicBool::new(false));
        let reader = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            let deaf = Arc::clone(&deaf);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if deaf.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    } else {
                        receive(&socket, &received);
                    }
                }
            })
        };
        FakeSystemd {
            dir,
            received,
            stop,
            deaf,
            reader: Some(reader),
            passed: Vec::new(),
        }
    }

    /// Stops reading the notify socket (a systemd too busy to read), or reads again.
    pub fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::Relaxed);
    }

    /// The notify socket's path (`NOTIFY_SOCKET`).
    pub fn notify_socket(&self) -> PathBuf {
        self.dir.path().join("notify")
    }

    /// Every state line received so far, in order (`READY=1`, `MAINPID=…`, …).
    pub fn states(&self) -> Vec<String> {
        self.received.lock().expect("lock").states.clone()
    }

    /// The names in the store now.
    pub fn stored(&self) -> Vec<String> {
        let received = self.received.lock().expect("lock");
        received
            .store
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `command` (as `ip netns exec` builds it: the program replaces `ip` in place) started the
    /// way systemd starts a service: with the notify socket, and the stored descriptors as 3, 4,
    /// … with their names and `LISTEN_PID` (set by a shell that then execs, keeping its pid).
    pub fn wrap(&mut self, command: &Command) -> Command {
        let received = self.received.lock().expect("lock");
        let mut wrapped = Command::new("sh");
        wrapped
            .args(["-c", "LISTEN_PID=$$ exec \"$@\"", "sh"])
            .arg(command.get_program())
            .args(command.get_args())
            .env("NOTIFY_SOCKET", self.notify_socket())
            .env("FDSTORE", "4096")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES");
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if received.store.is_empty() {
            return wrapped;
        }
        // Copies numbered above the child's 3, 4, … so that no dup2 overwrites a source; kept
        // open here until this is dropped (the child has its own from the fork on).
        let passed: Vec<OwnedFd> = received
            .store
            .iter()
            .map(|(_, fd)| rustix::io::fcntl_dupfd_cloexec(fd, 1000).expect("dup"))
            .collect();
        let names: Vec<&str> = received
            .store
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        wrapped
            .env("LISTEN_FDS", passed.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let raw: Vec<RawFd> = passed.iter().map(AsRawFd::as_raw_fd).collect();
        drop(received);
        self.passed.push(passed);
        // SAFETY: between fork and exec only dup2, which is async-signal-safe, runs.
        unsafe {
            wrapped.pre_exec(move || {
                for (index, &fd) in raw.iter().enumerate() {
                    if libc::dup2(fd, 3 + index as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        wrapped
    }
}
