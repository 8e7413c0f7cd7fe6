//! The SSH door stays open (docs/lockout.md): sshd sees each client's real address through
//! port 22 (and per-client loopback addresses without CAP_NET_ADMIN), the reply rule goes with a
//! clean exit and is harmless after a crash, no mix of holders from one IPv4 address and one IPv6
//! /64 keeps a second host from logging in, and every way of holding a connection ends by its own
//! timeout. Real sshd, ssh, curl and raw clients in network namespaces.
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use muxer_tests::backends::{self, Backend};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use muxer_tests::sshd::Sshd;
use muxer_tests::{netns_available, wait_for};

const READY: &str = "127.0.0.1:2222";
/// The second, well-behaved host.
const SECOND_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// HTTP/2 prior-knowledge preface and an empty SETTINGS frame: what the idle HTTP/2 attack sends.
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn config(limits: &str, http: &str) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"tc\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         [sniff]\ntimeout = \"1s\"\non_timeout = \"ssh\"\n\
         [limits]\n{limits}\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [http]\n{http}\n\
         [[http.route]]\npath = \"/ws\"\nupstreams = [\"127.0.0.1:30002\"]\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n\
         [[tunnel]]\nname = \"node\"\nupstream = \"127.0.0.1:7000\"\n"
    )
}

/// sshd on 0.0.0.0:22 and [::]:22 (a real box), an HTTP backend, a WebSocket echo, a TCP echo
/// behind the tunnel, and muxer redirecting port 22.
struct Server {
    link: Link,
    sshd: Sshd,
    muxer: Muxer,
    _backends: Vec<Backend>,
}

fn server(config: &str) -> Server {
    let link = Link::new();
    let sshd = Sshd::start(&link.server, &["0.0.0.0:22", "[::]:22"]);
    let backends = vec![
        backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm"),
        backends::websocket_echo(&link.server, "127.0.0.1:30002".parse().unwrap()),
        backends::echo(&link.server, "127.0.0.1:7000".parse().unwrap()),
    ];
    let muxer = Muxer::start(&link.server, config, READY.parse().unwrap());
    Server {
        link,
        sshd,
        muxer,
        _backends: backends,
    }
}

fn port22(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 22)
}

impl Server {
    /// A connection from `from` to port 22 of the server (same family), or `None` if refused.
    fn connect(&self, from: IpAddr, receive_buffer: Option<usize>) -> Option<TcpStream> {
        let to = port22(self.link.server_ip(from.is_ipv6()));
        self.link.connect_from(from, to, receive_buffer).ok()
    }

    /// Sends `bytes` on a new connection from `from`; the connection if the write went through.
    fn send(&self, from: IpAddr, bytes: &[u8], receive_buffer: Option<usize>) -> Option<TcpStream> {
        let mut stream = self.connect(from, receive_buffer)?;
        stream.write_all(bytes).ok()?;
        Some(stream)
    }

    /// Sends a request head and reads the response head: the connection if it starts with
    /// `expect`.
    fn exchange(&self, from: IpAddr, head: &str, expect: &str) -> Option<TcpStream> {
        let mut stream = self.send(from, head.as_bytes(), None)?;
        let head = read_head(&mut stream)?;
        head.starts_with(expect).then_some(stream)
    }

    fn stats(&self) -> serde_json::Value {
        self.muxer.stats()
    }

    fn counter(&self, group: &str, name: &str) -> u64 {
        self.stats()["daemon"][group][name].as_u64().unwrap_or(0)
    }

    /// Open connections of the classes that share the pool left after the SSH reserve.
    fn shared_open(&self) -> u64 {
        let stats = self.stats();
        ["http", "tls", "tunnel", "upgraded", "fallback"]
            .iter()
            .map(|class| {
                stats["daemon"]["classes"][class]["open"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Logs in through port 22 from `from`, timed.
    fn timed_login(&self, from: IpAddr, host: IpAddr) -> Duration {
        let started = Instant::now();
        let seen = self.sshd.connection(
            &self.link.client,
            &host.to_string(),
            22,
            &["-b", &from.to_string()],
        );
        let took = started.elapsed();
        assert!(seen.through_muxer(), "{seen:?}");
        assert_eq!(seen.client, from.to_string(), "sshd sees the second host");
        took
    }
}

/// Reads up to the end of a response head; `None` on EOF or error first.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Whether the peer closed `stream` (EOF or reset) within `limit`, reading and discarding data.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

const WEBSOCKET: &str =
    "GET /ws HTTP/1.1\r\nHost: gpu\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const TUNNEL: &str = "CONNECT node:22 HTTP/1.1\r\nHost: node:22\r\n\r\n";
const SLOW_READ: &str = "GET /bytes/500000000 HTTP/1.1\r\nHost: gpu\r\n\r\n";
const TRICKLE: &str = "POST /sha256 HTTP/1.1\r\nHost: gpu\r\nContent-Length: 1000000\r\n\r\nx";

/// Every kind of holder the attacker uses, round robin.
fn hold_one(server: &Server, from: IpAddr, kind: usize) -> Option<TcpStream> {
    match kind % 6 {
        0 => server.send(from, H2_HELLO, None),
        1 => server.send(from, SLOW_READ.as_bytes(), Some(4096)),
        2 => server.send(from, TRICKLE.as_bytes(), None),
        3 => server.exchange(from, TUNNEL, "HTTP/1.1 200"),
        4 => server.exchange(from, WEBSOCKET, "HTTP/1.1 101"),
        _ => server.connect(from, None), // silent: sniffed, then sent to sshd
    }
}

#[test]
fn one_address_and_one_64_holding_every_class_cannot_keep_a_second_host_out() {
    if !netns_available("one_address_and_one_64_holding_every_class_cannot_keep_a_second_host_out")
    {
        return;
    }
    // Scaled down: 60 slots, 20 of them only for SSH and sniffing; 30 per source network. The
    // attacker's two networks can fill the 40 shared slots but never the door.
    let server = server(&config(
        "max_connections = 60\nssh_reserve = 20\nmax_connections_per_source = 30\n\
         max_sniffing_per_source = 8\nssh_startups_per_source = 4",
        // Long enough that no holder times out during the test.
        "header_read_timeout = \"120s\"\nidle_timeout = \"120s\"\nwrite_timeout = \"120s\"\n\
         body_rate_grace = \"120s\"\ntunnel_idle_timeout = \"120s\"",
    ));
    server.link.add_client_address(SECOND_HOST.into());
    let attacker_v6: Vec<IpAddr> = (0x100..0x110u16)
        .map(|host| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, host)))
        .collect();
    for address in &attacker_v6 {
        server.link.add_client_address(*address);
    }

    // Failed logins from the attacker (no key): they reach sshd as the attacker.
    for _ in 0..3 {
        let mut args = vec![
            "-b".to_owned(),
            CLIENT_V4.to_string(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
        ];
        args.extend(server.sshd.ssh_args(&SERVER_V4.to_string(), 22, "true"));
        let args: Vec<String> = args
            .into_iter()
            .map(|arg| {
                if arg.ends_with("client_key") {
                    "/dev/null".into()
                } else {
                    arg
                }
            })
            .collect();
        let output = server
            .link
            .client
            .run("ssh", &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            !output.status.success(),
            "a login without the key must fail"
        );
    }

    // The attack: 60 holders from the IPv4 address, 60 from the /64 (spread over 17 addresses).
    let mut held = Vec::new();
    for round in 0..60 {
        held.extend(hold_one(&server, CLIENT_V4.into(), round));
        let from = if round % 17 == 16 {
            CLIENT_V6.into()
        } else {
            attacker_v6[round % 16]
        };
        held.extend(hold_one(&server, from, round));
    }
    wait_for(
        "the shared classes to be full",
        Duration::from_secs(10),
        || (server.shared_open() == 40).then_some(()),
    );
    let refused = server.stats()["daemon"]["refused"].clone();
    for reason in ["shared_classes_full", "per_source_sniffing_limit"] {
        assert!(
            refused[reason].as_u64().unwrap_or(0) > 0,
            "{reason} not counted: {refused}"
        );
    }

    // The second host: logs in through port 22 within 2 s, every time, over IPv4 and (from the
    // server's IPv6 address) via its IPv4 route.
    for attempt in 0..5 {
        let took = server.timed_login(SECOND_HOST.into(), SERVER_V4.into());
        assert!(
            took < Duration::from_secs(2),
            "login {attempt} took {took:?}"
        );
    }
    // Its HTTP is refused with a 503 while the shared classes are full; SSH is not.
    let mut http = server
        .send(
            SECOND_HOST.into(),
            b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\n\r\n",
            None,
        )
        .expect("connect");
    let head = read_head(&mut http).unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let took = server.timed_login(SECOND_HOST.into(), SERVER_V4.into());
    assert!(took < Duration::from_secs(2), "login took {took:?}");

    // The counters say what happened, and the table shows the classes.
    let stats = server.stats();
    let classes = &stats["daemon"]["classes"];
    assert_eq!(classes["http"]["limit"], 40, "{classes}");
    assert_eq!(classes["ssh"]["limit"], 60, "{classes}");
    let table = server.link.server.run_ok(
        &muxer_tests::muxer::binary().display().to_string(),
        &[
            "stats",
            "--socket",
            &server.muxer.socket().display().to_string(),
        ],
    );
    assert!(table.contains("open/limit by class:"), "{table}");
    assert!(table.contains("shared_classes_full"), "{table}");
    drop(held);
}

#[test]
fn every_holder_is_closed_by_its_own_timeout_and_releases_its_upstream() {
    if !netns_available("every_holder_is_closed_by_its_own_timeout_and_releases_its_upstream") {
        return;
    }
    let server = server(&config(
        "",
        "header_read_timeout = \"1500ms\"\nidle_timeout = \"2s\"\nwrite_timeout = \"2s\"\n\
         body_min_rate = 1000\nbody_rate_grace = \"2s\"\ntunnel_idle_timeout = \"2s\"\n\
         ping_interval = \"2s\"\nping_timeout = \"2s\"",
    ));
    let from: IpAddr = CLIENT_V4.into();
    let timeout_count = |kind: &str| server.counter("timeouts", kind);

    // Each holder, then the timeout that must end it.
    let mut slowloris = server
        .send(from, b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\n", None)
        .unwrap();
    let mut keepalive = server
        .exchange(
            from,
            "GET /v1/models HTTP/1.1\r\nHost: gpu\r\n\r\n",
            "HTTP/1.1 200",
        )
        .unwrap();
    let mut h2_silent = server.send(from, H2_HELLO, None).unwrap();
    let mut tunnel = server.exchange(from, TUNNEL, "HTTP/1.1 200").unwrap();
    let mut websocket = server.exchange(from, WEBSOCKET, "HTTP/1.1 101").unwrap();
    let mut slow_reader = server.send(from, SLOW_READ.as_bytes(), Some(4096)).unwrap();
    let mut trickle = server.send(from, TRICKLE.as_bytes(), None).unwrap();
    // The trickle keeps sending, just too slowly: 2 bytes a second against a minimum of 1000.
    let mut trickling = trickle.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(500));
            if trickling.write_all(b"x").is_err() {
                return;
            }
        }
    });
    // An HTTP/2 client that completes a request, then keeps the connection without a stream.
    let h2_idle = h2_one_request(&server.link, SocketAddr::new(SERVER_V4.into(), 22));

    // Counted first: reading the slow reader before its timeout would make it a reader.
    wait_for(
        "every timeout to be counted",
        Duration::from_secs(15),
        || {
            let counts = server.stats()["daemon"]["timeouts"].clone();
            let ok = [
                ("header_read", 1),
                ("keepalive_idle", 1),
                ("http2_first_request", 1),
                ("http2_idle", 1),
                ("write_stalled", 1),
                ("body_too_slow", 1),
                ("tunnel_idle", 2),
            ]
            .iter()
            .all(|(kind, at_least)| counts[kind].as_u64().unwrap_or(0) >= *at_least);
            ok.then_some(())
        },
    );
    for (what, stream) in [
        ("slowloris", &mut slowloris),
        ("idle keep-alive", &mut keepalive),
        ("silent HTTP/2", &mut h2_silent),
        ("idle tunnel", &mut tunnel),
        ("idle WebSocket", &mut websocket),
        ("slow reader", &mut slow_reader),
        ("trickled body", &mut trickle),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(5)),
            "{what} was not closed"
        );
    }
    trickler.join().unwrap();
    wait_for(
        "the idle HTTP/2 connection to close",
        Duration::from_secs(5),
        || h2_idle.is_finished().then_some(()),
    );
    assert_eq!(timeout_count("http2_ping"), 0, "nobody ignored a PING here");
    // Nothing is left open, and the slow reader's upstream connection was released.
    wait_for("every class to be empty", Duration::from_secs(5), || {
        let classes = server.stats()["daemon"]["classes"].clone();
        let open: u64 = classes
            .as_object()
            .unwrap()
            .values()
            .map(|class| class["open"].as_u64().unwrap_or(0))
            .sum();
        (open == 0).then_some(())
    });
    wait_for(
        "no upstream connection to the backend",
        Duration::from_secs(5),
        || {
            let sockets = server.link.server.run_ok(
                "ss",
                &["-Htn", "state", "established", "( dport = :30000 )"],
            );
            sockets.trim().is_empty().then_some(())
        },
    );
}

#[test]
fn an_http2_client_that_ignores_pings_is_closed_by_the_ping_timeout() {
    if !netns_available("an_http2_client_that_ignores_pings_is_closed_by_the_ping_timeout") {
        return;
    }
    let server = server(&config(
        "",
        "idle_timeout = \"30s\"\nping_interval = \"1s\"\nping_timeout = \"1s\"",
    ));
    // Opens a stream to a slow answer (so the connection is not idle), then reads nothing: the
    // server's PING is never acknowledged.
    let mut stream = server.send(CLIENT_V4.into(), H2_HELLO, None).unwrap();
    let path = b"/slow?ms=60000";
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x41, 3, b'g', b'p', b'u']);
    let mut frame = vec![0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    stream.write_all(&frame).unwrap();
    wait_for("the ping timeout", Duration::from_secs(10), || {
        (server.counter("timeouts", "http2_ping") >= 1).then_some(())
    });
    assert!(closed_within(&mut stream, Duration::from_secs(5)));
}

/// Makes one HTTP/2 request to `to` from the client namespace with hyper's client (which answers
/// PINGs), then keeps the connection open: the returned thread ends when the server closes it.
fn h2_one_request(link: &Link, to: SocketAddr) -> std::thread::JoinHandle<()> {
    let stream = link.connect(to);
    stream.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            use http_body_util::{BodyExt, Empty};
            let stream = tokio::net::TcpStream::from_std(stream).unwrap();
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            let driving = tokio::spawn(connection);
            let request = hyper::Request::builder()
                .uri("http://gpu/v1/models")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            let _ = driving.await;
        });
    });
    handle
}

#[test]
fn the_reply_rule_goes_with_a_clean_exit_and_is_harmless_after_sigkill() {
    if !netns_available("the_reply_rule_goes_with_a_clean_exit_and_is_harmless_after_sigkill") {
        return;
    }
    let mut server = server(&config("", ""));
    let rules = |family: &str| server.link.server.run_ok("ip", &[family, "rule", "show"]);
    // In place before the redirect is attached, which Muxer::start waits for.
    for family in ["-4", "-6"] {
        assert!(rules(family).contains("lookup 1022"), "{}", rules(family));
    }
    // The connection log line names the source sshd saw.
    let seen = server
        .sshd
        .connection(&server.link.client, &SERVER_V6.to_string(), 22, &[]);
    assert!(
        seen.through_muxer() && seen.client == CLIENT_V6.to_string(),
        "{seen:?}"
    );
    server
        .muxer
        .wait_for_log(&format!("upstream_source=\"[{CLIENT_V6}]:"));

    // A clean exit removes the rules and the routes.
    let status = server
        .muxer
        .process
        .signal_and_wait(rustix::process::Signal::TERM);
    assert!(status.success(), "{status}");
    for family in ["-4", "-6"] {
        assert!(!rules(family).contains("lookup 1022"), "{}", rules(family));
        let table = server
            .link
            .server
            .run_ok("ip", &[family, "route", "show", "table", "1022"]);
        assert!(table.trim().is_empty(), "{table}");
    }

    // After SIGKILL the rule stays behind: port 22 and local logins still reach sshd.
    let mut muxer = Muxer::start(&server.link.server, &config("", ""), READY.parse().unwrap());
    // Installed just after the redirect attaches (before any connection is served).
    wait_for("the reply rule", Duration::from_secs(5), || {
        rules("-4").contains("lookup 1022").then_some(())
    });
    muxer.process.signal_and_wait(rustix::process::Signal::KILL);
    assert!(
        rules("-4").contains("lookup 1022"),
        "left behind by the crash"
    );
    for host in [SERVER_V4.to_string(), SERVER_V6.to_string()] {
        let direct = server.sshd.connection(&server.link.client, &host, 22, &[]);
        assert!(!direct.through_muxer(), "{direct:?}");
    }
    for local in ["127.0.0.1", "::1"] {
        let seen = server.sshd.connection(&server.link.server, local, 22, &[]);
        assert_eq!(seen.client, local, "a local login");
    }
    // A new muxer starts over the leftovers and forwards transparently again.
    let _again = Muxer::start(&server.link.server, &config("", ""), READY.parse().unwrap());
    let seen = server
        .sshd
        .connection(&server.link.client, &SERVER_V4.to_string(), 22, &[]);
    assert!(
        seen.through_muxer() && seen.client == CLIENT_V4.to_string(),
        "{seen:?}"
    );
}

#[test]
fn without_cap_net_admin_two_clients_get_two_loopback_sources() {
    if !netns_available("without_cap_net_admin_two_clients_get_two_loopback_sources") {
        return;
    }
    let link = Link::new();
    link.add_client_address(SECOND_HOST.into());
    let sshd = Sshd::start(&link.server, &["127.0.0.1:22"]);
    let config = "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
                  [ssh]\nupstream = \"127.0.0.1:22\"\n";
    // Root without CAP_NET_ADMIN (nor CAP_NET_RAW): no reply rule, no IP_TRANSPARENT.
    let muxer = Muxer::start_as(
        &link.server,
        config,
        READY.parse().unwrap(),
        &[
            "setpriv",
            "--inh-caps=-net_admin,-net_raw",
            "--bounding-set=-net_admin,-net_raw",
            "--",
        ],
    );
    muxer.wait_for_log("needs CAP_NET_ADMIN");
    let mut seen = Vec::new();
    for from in [CLIENT_V4, SECOND_HOST] {
        let connection = sshd.connection(
            &link.client,
            &SERVER_V4.to_string(),
            2222,
            &["-b", &from.to_string()],
        );
        let address: Ipv4Addr = connection.client.parse().unwrap();
        assert!(
            address.is_loopback() && address != Ipv4Addr::LOCALHOST,
            "{connection:?}"
        );
        seen.push(address);
    }
    assert_ne!(seen[0], seen[1], "two clients, two loopback sources");
    // The same client keeps its address.
    let again = sshd.connection(
        &link.client,
        &SERVER_V4.to_string(),
        2222,
        &["-b", &CLIENT_V4.to_string()],
    );
    assert_eq!(again.client, seen[0].to_string());
    assert_eq!(
        muxer.log().matches("needs CAP_NET_ADMIN").count(),
        1,
        "said once"
    );
    muxer.wait_for_log("(per-client-loopback)");
}

#[test]
fn at_the_descriptor_limit_the_longest_idle_keepalive_connections_make_room() {
    if !netns_available("at_the_descriptor_limit_the_longest_idle_keepalive_connections_make_room")
    {
        return;
    }
    let link = Link::new();
    let sshd = Sshd::start(&link.server, &["127.0.0.1:22"]);
    let _http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let config = "[listen]\naddresses = [\"0.0.0.0:2222\"]\nworkers = 1\n\
                  [http]\nidle_timeout = \"10m\"\n[[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n\
                  [ssh]\nupstream = \"127.0.0.1:22\"\n";
    // 96 descriptors: room for a few dozen connections besides muxer's own.
    let muxer = Muxer::start_as(
        &link.server,
        config,
        READY.parse().unwrap(),
        &["prlimit", "--nofile=96:96", "--"],
    );
    let to = SocketAddr::new(SERVER_V4.into(), 2222);
    let request = b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\n\r\n";
    let mut idle = Vec::new();
    for index in 0..120 {
        let mut stream = link.connect_from(CLIENT_V4.into(), to, None).unwrap();
        stream.write_all(request).unwrap();
        let head = read_head(&mut stream).unwrap_or_default();
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "keep-alive connection {index}: {head:?}"
        );
        idle.push(stream);
    }
    let evicted = idle
        .iter_mut()
        .map(|stream| closed_within(stream, Duration::from_millis(200)))
        .filter(|closed| *closed)
        .count();
    assert!(evicted > 0, "no idle connection was closed");
    let refused = muxer.stats()["daemon"]["refused"]["idle_evicted_for_descriptors"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refused >= evicted as u64,
        "{refused} counted, {evicted} seen"
    );
    // The newest idle connections were kept; the oldest went first.
    assert!(
        !closed_within(idle.last_mut().unwrap(), Duration::from_millis(200)),
        "the newest idle connection was closed"
    );
    // And SSH still gets in.
    let seen = sshd.connection(&link.client, &SERVER_V4.to_string(), 2222, &[]);
    assert!(seen.through_muxer(), "{seen:?}");
    muxer.wait_for_log(
        "out of file descriptors; closing the longest-idle HTTP keep-alive connections",
    );
}

#[test]
fn a_full_upstream_queues_briefly_then_answers_503() {
    if !netns_available("a_full_upstream_queues_briefly_then_answers_503") {
        return;
    }
    let server = server(&config(
        "",
        "max_connections_per_upstream = 2\nupstream_queue = 1\nupstream_queue_timeout = \"500ms\"",
    ));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut stream = server.connect(CLIENT_V4.into(), None).unwrap();
            std::thread::spawn(move || {
                stream
                    .write_all(
                        b"GET /slow?ms=3000 HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n",
                    )
                    .unwrap();
                read_head(&mut stream).unwrap_or_default()
            })
        })
        .collect();
    let heads: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let count = |status: &str| heads.iter().filter(|h| h.starts_with(status)).count();
    assert_eq!(
        (count("HTTP/1.1 200"), count("HTTP/1.1 503")),
        (2, 2),
        "{heads:?}"
    );
    assert_eq!(server.counter("refused", "upstream_full"), 2);
}

#[test]
fn http2_clients_are_told_the_stream_limit() {
    if !netns_available("http2_clients_are_told_the_stream_limit") {
        return;
    }
    let server = server(&config("", "max_concurrent_streams = 7"));
    let mut stream = server.send(CLIENT_V4.into(), H2_HELLO, None).unwrap();
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(header[3], 4, "the server's first frame is SETTINGS");
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).unwrap();
    let streams = payload.chunks(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == 3)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(streams, Some(7), "SETTINGS_MAX_CONCURRENT_STREAMS");
}
