//! Network namespaces and the veth link between a client and a server namespace.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The client end's addresses.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The server end's addresses.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The client end's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// The server end's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A network namespace, deleted (with every process still in it killed) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name starting with `role` and brings its loopback up.
    pub fn new(role: &str) -> Netns {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("mx{}-{id}-{role}", std::process::id());
        ip(&["netns", "add", &name]);
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs `program ARGS` inside the namespace to completion.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    /// Runs `program ARGS` and panics with its output unless it succeeds; returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{program} {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs `f` on a thread that has joined this namespace. Sockets created there stay in the
    /// namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = std::fs::File::open(&path).expect("open netns");
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .expect("setns");
                    f()
                })
                .join()
                .expect("netns thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(output) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A client and a server namespace joined by one veth pair, each end holding one IPv4 and one
/// IPv6 address. Because each pair is isolated, every test can use the same addresses.
pub struct Link {
    /// Where clients (ssh, curl) run.
    pub client: Netns,
    /// Where muxer and the backends run.
    pub server: Netns,
    /// The client end's interface name (inside `client`).
    pub client_if: String,
    /// The server end's interface name (inside `server`).
    pub server_if: String,
}

impl Link {
    /// Creates both namespaces and the link, addresses assigned and up.
    pub fn new() -> Link {
        let client = Netns::new("c");
        let server = Netns::new("s");
        let (client_if, server_if) = ("veth-c".to_owned(), "veth-s".to_owned());
        ip(&[
            "link",
            "add",
            &client_if,
            "netns",
            client.name(),
            "type",
            "veth",
            "peer",
            "name",
            &server_if,
            "netns",
            server.name(),
        ]);
        for (netns, ifname, v4, v6) in [
            (&client, &client_if, CLIENT_V4, CLIENT_V6),
            (&server, &server_if, SERVER_V4, SERVER_V6),
        ] {
            ip(&[
                "-n",
                netns.name(),
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                ifname,
            ]);
            ip(&[
                "-n",
                netns.name(),
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ]);
            ip(&["-n", netns.name(), "link", "set", ifname, "up"]);
        }
        Link {
            client,
            server,
            client_if,
            server_if,
        }
    }

    /// A TCP connection from the client namespace to `to` (5 s to connect, reads time out after
    /// 10 s); panics when it cannot be made.
    pub fn connect(&self, to: SocketAddr) -> TcpStream {
        let stream = self
            .client
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Adds `address` (IPv4 in 198.18.0.0/24 or IPv6 in fd00::/64) to the client's interface, so
    /// that tests can play several client hosts.
    pub fn add_client_address(&self, address: IpAddr) {
        let cidr = match address {
            IpAddr::V4(v4) => format!("{v4}/24"),
            IpAddr::V6(v6) => format!("{v6}/64"),
        };
        let mut args = vec![
            "-n",
            self.client.name(),
            "addr",
            "add",
            &cidr,
            "dev",
            &self.client_if,
        ];
        if address.is_ipv6() {
            args.push("nodad");
        }
        ip(&args);
    }

    /// A TCP connection from the client namespace's address `from` to `to`, with a receive buffer
    /// of `receive_buffer` bytes when given (set before connecting, so the window stays small).
    pub fn connect_from(
        &self,
        from: IpAddr,
        to: SocketAddr,
        receive_buffer: Option<usize>,
    ) -> std::io::Result<TcpStream> {
        let stream = self.client.enter(|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )?;
            if let Some(size) = receive_buffer {
                socket.set_recv_buffer_size(size)?;
            }
            socket.bind(&SocketAddr::new(from, 0).into())?;
            socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
            Ok::<_, std::io::Error>(TcpStream::from(socket))
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }

    /// The server's address of the given family.
    pub fn server_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            SERVER_V6.into()
        } else {
            SERVER_V4.into()
        }
    }
}

impl Default for Link {
    fn default() -> Self {
        Self::new()
    }
}

/// A bpffs mounted on a temporary directory for one test, unmounted on drop.
pub struct BpfFs(tempfile::TempDir);

impl BpfFs {
    /// Mounts a fresh bpffs.
    pub fn mount() -> BpfFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t bpf");
        BpfFs(dir)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}
