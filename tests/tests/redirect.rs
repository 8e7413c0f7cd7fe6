//! The kernel redirect end to end: real ssh and curl to port 22 of a server namespace whose sshd
//! also listens on port 22, as on a real machine; fail-open when muxer dies; stale state removed.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{BpfFs, CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use muxer_tests::process::{status_kib, Running};
use muxer_tests::public_host::PublicHost;
use muxer_tests::{netns_available, sha256_hex, test_data, wait_for};

const READY: &str = "127.0.0.1:2222";

fn config(mode: &str, extra: &str) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"{mode}\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n{extra}"
    )
}

/// The public host of [`PublicHost`], with this file's checks.
struct Server(PublicHost);

impl std::ops::Deref for Server {
    type Target = PublicHost;

    fn deref(&self) -> &PublicHost {
        &self.0
    }
}

fn server() -> Server {
    Server(PublicHost::new())
}

impl Server {
    fn curl_models(&self, url_host: &str) -> serde_json::Value {
        let url = format!("http://{url_host}:22/v1/models");
        let body = self
            .link
            .client
            .run_ok("curl", &["-sS", "--fail", "--max-time", "10", &url]);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
    }

    fn set_tx_checksum_offload(&self, on: bool) {
        let state = if on { "on" } else { "off" };
        self.link
            .client
            .run_ok("ethtool", &["-K", &self.link.client_if, "tx", state]);
        self.link
            .server
            .run_ok("ethtool", &["-K", &self.link.server_if, "tx", state]);
    }

    /// Names of the TCX programs on the server's interface, both directions, and `xdp` if an XDP
    /// program is attached to it.
    fn attached_programs(&self) -> String {
        let link = self
            .link
            .server
            .run_ok("ip", &["link", "show", "dev", &self.link.server_if]);
        let xdp = link.contains("prog/xdp");
        use aya::programs::{tc::TcAttachType, SchedClassifier};
        self.link.server.enter(|| {
            let mut names = Vec::new();
            for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, programs) =
                    SchedClassifier::query_tcx(&self.link.server_if, direction).expect("query tcx");
                names.extend(
                    programs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
                );
            }
            if xdp {
                names.push("xdp".into());
            }
            names.join(" ")
        })
    }
}

fn redirect_end_to_end(mode: &str, test: &str) {
    if !netns_available(test) {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config(mode, ""),
        READY.parse().unwrap(),
    );
    // Loading the eBPF object allocates tens of MB once; muxer gives them back after attaching.
    // Waited for, not sampled once: the memory is returned just after the attach is logged.
    let pid = muxer.process.pid();
    wait_for(
        "start-up memory to be given back",
        Duration::from_secs(5),
        || {
            let (peak, resident) = (status_kib(pid, "VmHWM")?, status_kib(pid, "VmRSS")?);
            (peak - resident > 10 * 1024).then_some(())
        },
    );
    let v6 = format!("[{SERVER_V6}]");
    let (mut ssh_connections, mut http_connections) = (0u64, 0u64);
    for offload in [true, false] {
        server.set_tx_checksum_offload(offload);
        for (host, client) in [
            (SERVER_V4.to_string(), CLIENT_V4.to_string()),
            (SERVER_V6.to_string(), CLIENT_V6.to_string()),
        ] {
            let seen = server.ssh(&host);
            assert!(
                seen.through_muxer(),
                "ssh to {host}:22 must go through muxer: {seen:?}"
            );
            assert_eq!(seen.client, client, "sshd must see the real client");
            assert!(
                server
                    .sshd
                    .log()
                    .contains(&format!("Connection from {client} port")),
                "sshd's log names the real client:\n{}",
                server.sshd.log()
            );
            ssh_connections += 1;
        }
        for host in [SERVER_V4.to_string(), v6.clone()] {
            assert_eq!(server.curl_models(&host)["data"][0]["id"], "llm");
            http_connections += 1;
        }
        // Bulk data through the rewritten path, both ways, checksummed.
        let dir = tempfile::tempdir().unwrap();
        let data = test_data(8 * 1024 * 1024);
        std::fs::write(dir.path().join("up.bin"), &data).unwrap();
        let mut args = server.sshd.client_options();
        args.extend([
            "-P".into(),
            "22".into(),
            dir.path().join("up.bin").display().to_string(),
            format!("root@{SERVER_V4}:{}", dir.path().join("copy.bin").display()),
        ]);
        server
            .link
            .client
            .run_ok("scp", &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            std::fs::read(dir.path().join("copy.bin"))
                .map(|d| sha256_hex(&d))
                .unwrap(),
            sha256_hex(&data)
        );
        ssh_connections += 1;
    }

    let permissions = std::fs::metadata(muxer.socket()).unwrap().permissions();
    let socket_mode = std::os::unix::fs::PermissionsExt::mode(&permissions) & 0o777;
    assert_eq!(socket_mode, 0o600, "control socket mode");
    let stats = muxer.stats();
    assert_eq!(stats["redirect"]["state"], "attached");
    let ingress = stats["redirect"]["ingress"].as_str().unwrap();
    if mode == "xdp" {
        assert!(ingress.starts_with("xdp"), "{ingress}");
    } else {
        assert_eq!(ingress, "tc");
    }
    wait_for("connections to close", Duration::from_secs(5), || {
        let stats = muxer.stats();
        (stats["daemon"]["routes"]["ssh"]["open"] == 0
            && stats["daemon"]["routes"]["http"]["open"] == 0)
            .then_some(())
    });
    let stats = muxer.stats();
    assert_eq!(stats["daemon"]["routes"]["ssh"]["total"], ssh_connections);
    assert_eq!(stats["daemon"]["routes"]["http"]["total"], http_connections);
    let kernel = &stats["kernel"];
    assert_eq!(
        kernel["global"]["connections_redirected"],
        ssh_connections + http_connections
    );
    assert_eq!(kernel["global"]["dropped"], 0);
    let port = &kernel["ports"][0];
    assert_eq!(port["port"], 22);
    // Everything the daemon received from clients came through the redirect: packet bytes
    // include headers, so they exceed the payload bytes.
    let payload_in: u64 = ["ssh", "http"]
        .iter()
        .map(|r| stats["daemon"]["routes"][r]["bytes_in"].as_u64().unwrap())
        .sum();
    let payload_out: u64 = ["ssh", "http"]
        .iter()
        .map(|r| stats["daemon"]["routes"][r]["bytes_out"].as_u64().unwrap())
        .sum();
    assert!(
        port["in_bytes"].as_u64().unwrap() > payload_in,
        "{port} vs {payload_in}"
    );
    assert!(
        port["out_bytes"].as_u64().unwrap() > payload_out,
        "{port} vs {payload_out}"
    );
    assert!(port["in_packets"].as_u64().unwrap() > 0 && port["out_packets"].as_u64().unwrap() > 0);
}

#[test]
fn tc_redirect_carries_ssh_curl_and_scp_on_ipv4_and_ipv6_with_checksum_offload_on_and_off() {
    redirect_end_to_end(
        "tc",
        "tc_redirect_carries_ssh_curl_and_scp_on_ipv4_and_ipv6_with_checksum_offload_on_and_off",
    );
}

#[test]
fn xdp_redirect_carries_ssh_curl_and_scp_on_ipv4_and_ipv6_with_checksum_offload_on_and_off() {
    redirect_end_to_end(
        "xdp",
        "xdp_redirect_carries_ssh_curl_and_scp_on_ipv4_and_ipv6_with_checksum_offload_on_and_off",
    );
}

#[test]
fn tc_sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect() {
    sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect(
        "tc",
        "tc_sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect",
    );
}

#[test]
fn xdp_sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect() {
    sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect(
        "xdp",
        "xdp_sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect",
    );
}

fn sigkill_fails_open_within_a_second_and_a_restart_restores_the_redirect(mode: &str, test: &str) {
    if !netns_available(test) {
        return;
    }
    let server = server();
    let host = SERVER_V4.to_string();
    let mut muxer = Muxer::start(
        &server.link.server,
        &config(mode, ""),
        READY.parse().unwrap(),
    );
    assert!(server.ssh(&host).through_muxer());
    let ingress = if mode == "xdp" { "xdp" } else { "tc_ingress" };
    assert!(server.attached_programs().contains(ingress));

    // A session open through muxer while it dies.
    let dir = tempfile::tempdir().unwrap();
    let session_args = server.sshd.ssh_args(&host, 22, "sleep 30");
    let mut command = server.link.client.command("ssh");
    command.args(&session_args);
    let _through_muxer = Running::spawn("ssh session", command, dir.path().join("session.log"));
    wait_for("the session to open", Duration::from_secs(10), || {
        (muxer.stats()["daemon"]["routes"]["ssh"]["open"] == 1).then_some(())
    });

    muxer.process.signal_and_wait(rustix::process::Signal::KILL);
    let killed = Instant::now();
    // A new connection to port 22 reaches sshd directly, at once.
    let mut stream = server
        .link
        .client
        .enter(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((SERVER_V4, 22)),
                Duration::from_secs(1),
            )
        })
        .expect("port 22 must accept right after SIGKILL");
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut banner = [0u8; 8];
    std::io::Read::read_exact(&mut stream, &mut banner).expect("sshd banner");
    assert_eq!(&banner, b"SSH-2.0-");
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "took {:?}",
        killed.elapsed()
    );
    let direct = server.ssh(&host);
    assert!(!direct.through_muxer(), "direct to sshd: {direct:?}");
    assert_eq!(direct.client, CLIENT_V4.to_string());
    let attached = server.attached_programs();
    assert!(attached.is_empty(), "left attached:\n{attached}");

    // A session opened while muxer is down survives its return.
    let established = || {
        server
            .link
            .client
            .run_ok("ss", &["-Htn", "state", "established", "( dport = :22 )"])
            .lines()
            .count()
    };
    let before = established();
    let mut command = server.link.client.command("ssh");
    command.args(server.sshd.ssh_args(&host, 22, "sleep 3; echo survived"));
    let mut during_downtime =
        Running::spawn("downtime session", command, dir.path().join("downtime.log"));
    wait_for(
        "the downtime session's connection",
        Duration::from_secs(10),
        || (established() > before).then_some(()),
    );

    let muxer = Muxer::start(
        &server.link.server,
        &config(mode, ""),
        READY.parse().unwrap(),
    );
    assert!(server.ssh(&host).through_muxer(), "redirect restored");
    let status = wait_for(
        "the downtime session to finish",
        Duration::from_secs(10),
        || during_downtime.try_exit_status(),
    );
    assert!(
        status.success(),
        "downtime session failed: {}",
        during_downtime.log()
    );
    assert!(during_downtime.log().contains("survived"));
    assert!(
        muxer.stats()["kernel"]["global"]["passed_untracked"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn direct_connections_to_the_muxer_port_are_served_unrewritten() {
    if !netns_available("direct_connections_to_the_muxer_port_are_served_unrewritten") {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config("tc", ""),
        READY.parse().unwrap(),
    );
    let body = server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://{SERVER_V4}:2222/v1/models"),
        ],
    );
    assert!(body.contains("\"llm\""), "{body}");
    assert_eq!(
        server.curl_models(&SERVER_V4.to_string())["data"][0]["id"],
        "llm"
    );
    let stats = muxer.stats();
    assert_eq!(
        stats["kernel"]["global"]["connections_redirected"], 1,
        "only the port-22 connection is redirected"
    );
    // The listen port is not the internal port: connections to it are never rewritten.
    let internal = stats["redirect"]["internal_ports"]["22"].as_u64().unwrap();
    assert_ne!(internal, 2222);

    // `muxer stats --watch` refreshes with rates.
    let mut command = std::process::Command::new(muxer_tests::muxer::binary());
    command
        .args(["stats", "--watch", "--interval", "200ms", "--socket"])
        .arg(muxer.socket());
    let log = muxer.dir().join("watch.log");
    let watching = Running::spawn("stats --watch", command, log);
    std::thread::sleep(Duration::from_millis(900));
    let screen = watching.log();
    drop(watching);
    assert!(screen.matches("muxer up").count() >= 3, "{screen}");
    assert!(screen.contains("/s"), "rates expected: {screen}");
    assert!(screen.contains("tc on veth-s"), "{screen}");
    assert!(
        screen.contains(&format!("internal ports 22→{internal}")),
        "{screen}"
    );
}

#[test]
fn stale_filters_and_pins_are_removed_at_start_and_pins_are_readable_then_removed_on_exit() {
    if !netns_available(
        "stale_filters_and_pins_are_removed_at_start_and_pins_are_readable_then_removed_on_exit",
    ) {
        return;
    }
    use aya::programs::tc::{self, NlOptions, TcAttachOptions, TcAttachType};
    let server = server();
    let bpffs = BpfFs::mount();
    let pin_dir = bpffs.path().join("muxer");
    std::fs::create_dir(&pin_dir).unwrap();

    // What an earlier muxer on a kernel without TCX would leave: a netlink TC filter (which
    // outlives its process) and pinned maps.
    server.link.server.enter(|| {
        let mut loaded = muxer::redirect::load(&[(22, 3022)]).unwrap();
        let _ = tc::qdisc_add_clsact("veth-s");
        let program: &mut aya::programs::SchedClassifier =
            muxer::redirect::program(&mut loaded.ebpf, muxer_common::PROGRAM_TC_INGRESS).unwrap();
        program
            .attach_with_options(
                "veth-s",
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .unwrap();
        loaded
            .ebpf
            .map(muxer_common::COUNTERS_MAP)
            .unwrap()
            .pin(pin_dir.join(muxer_common::COUNTERS_MAP))
            .unwrap();
        // Dropping the object would detach the filter; an earlier muxer's would have stayed.
        std::mem::forget(loaded);
    });
    let filters = server
        .link
        .server
        .run_ok("tc", &["filter", "show", "dev", "veth-s", "ingress"]);
    assert!(filters.contains("tc_ingress"), "setup failed: {filters}");

    let extra = format!("pin_dir = \"{}\"\n", pin_dir.display());
    let config = config("tc", "").replace("ports = [22]\n", &format!("ports = [22]\n{extra}"));
    let mut muxer = Muxer::start(&server.link.server, &config, READY.parse().unwrap());
    let log = muxer.log();
    assert!(log.contains("removed a stale TC filter"), "{log}");
    assert!(log.contains("removed a stale pin"), "{log}");
    let filters = server
        .link
        .server
        .run_ok("tc", &["filter", "show", "dev", "veth-s", "ingress"]);
    assert!(
        !filters.contains("tc_ingress"),
        "stale filter still there: {filters}"
    );
    assert!(server.ssh(&SERVER_V4.to_string()).through_muxer());

    // Another process reads the pinned counters.
    let pinned = pin_dir.join(muxer_common::COUNTERS_MAP);
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    // Without BTF for the value type, bpftool prints each CPU's u64 as little-endian hex bytes.
    let redirected: u64 = entries[muxer_common::Counter::ConnectionsRedirected as usize]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cpu| {
            let bytes: Vec<u8> = cpu["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
                })
                .collect();
            u64::from_le_bytes(bytes.try_into().unwrap())
        })
        .sum();
    assert_eq!(redirected, 1);

    let status = muxer.process.signal_and_wait(rustix::process::Signal::TERM);
    assert!(status.success(), "{status}");
    assert_eq!(
        std::fs::read_dir(&pin_dir).unwrap().count(),
        0,
        "pins left after a clean exit"
    );
    assert!(!server.attached_programs().contains("tc_"));
}

#[test]
fn without_privileges_the_redirect_is_off_with_a_reason_and_serving_continues() {
    if !netns_available(
        "without_privileges_the_redirect_is_off_with_a_reason_and_serving_continues",
    ) {
        return;
    }
    let server = server();
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let muxer = Muxer::start_as(
        &server.link.server,
        &config("tc", ""),
        READY.parse().unwrap(),
        &wrapper,
    );
    muxer.wait_for_log("kernel redirect OFF");
    assert!(
        muxer.log().contains("needs CAP_BPF and CAP_NET_ADMIN"),
        "a missing privilege is named as the cause:\n{}",
        muxer.log()
    );
    let body = server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            &format!("http://{SERVER_V4}:2222/v1/models"),
        ],
    );
    assert!(body.contains("\"llm\""));
    assert!(
        !server.ssh(&SERVER_V4.to_string()).through_muxer(),
        "port 22 untouched"
    );
    let stats = muxer.stats();
    assert_eq!(stats["redirect"]["state"], "failed");
    assert!(
        stats["redirect"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot load the eBPF object"),
        "{stats}"
    );
    assert!(stats["kernel"].is_null());
}

#[test]
fn clients_reusing_ports_while_muxer_holds_time_wait_sockets_are_still_redirected() {
    if !netns_available(
        "clients_reusing_ports_while_muxer_holds_time_wait_sockets_are_still_redirected",
    ) {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config("tc", ""),
        READY.parse().unwrap(),
    );
    // `Connection: close` makes muxer close first, so its side of each connection sits in
    // TIME_WAIT while the client reuses the same source port for the next connection.
    let ports = 40_000u16..40_020;
    for round in 0..200usize {
        let port = ports.start + (round % ports.len()) as u16;
        let stream = server.link.client.enter(|| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((muxer_tests::netns::CLIENT_V4, port)).into())?;
            socket.connect_timeout(
                &SocketAddr::from((SERVER_V4, 22)).into(),
                Duration::from_secs(3),
            )?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
        });
        let mut stream =
            stream.unwrap_or_else(|e| panic!("round {round}: connect from port {port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut reply = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "round {round} from port {port} did not reach muxer: {reply:?}"
        );
    }
    assert_eq!(muxer.stats()["kernel"]["global"]["passed_no_listener"], 0);
}

#[test]
fn with_no_interface_to_attach_to_the_warning_names_that_cause_only() {
    if !netns_available("with_no_interface_to_attach_to_the_warning_names_that_cause_only") {
        return;
    }
    // A namespace with loopback only: nothing to attach the TC programs to.
    let netns = muxer_tests::netns::Netns::new("lonely");
    let config = "[listen]\naddresses = [\"0.0.0.0:2222\"]\n[redirect]\nmode = \"tc\"\n\
                  [ssh]\nupstream = \"127.0.0.1:22\"\n";
    // Through `env`: with a wrapper the harness does not wait for an attach that cannot come.
    let muxer = Muxer::start_as(&netns, config, READY.parse().unwrap(), &["env"]);
    muxer.wait_for_log("kernel redirect OFF");
    let log = muxer.log();
    assert!(log.contains("no interface to attach to"), "{log}");
    assert!(
        !log.contains("CAP_BPF"),
        "a privilege is not the cause here:\n{log}"
    );
}
