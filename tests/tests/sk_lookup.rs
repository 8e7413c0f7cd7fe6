//! The sk_lookup steering mode end to end: real ssh, scp and curl to port 22 of a server namespace
//! whose sshd also listens on port 22; no packet rewritten (no TC program attached), connections
//! are ordinary sockets on port 22; fail-open on SIGKILL and SIGTERM; a restart restores it.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use muxer_tests::process::Running;
use muxer_tests::public_host::PublicHost;
use muxer_tests::{netns_available, sha256_hex, test_data, wait_for};

const READY: &str = "127.0.0.1:2222";

fn config() -> String {
    "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
     [redirect]\nmode = \"sk_lookup\"\nports = [22]\n\
     [ssh]\nupstream = \"127.0.0.1:22\"\n\
     [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n"
        .to_owned()
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
    /// Whether a new connection to port 22 gets sshd's banner within `limit` of now.
    fn sshd_answers_port_22_within(&self, limit: Duration) -> bool {
        let started = Instant::now();
        let stream = self.link.client.enter(|| {
            std::net::TcpStream::connect_timeout(&SocketAddr::from((SERVER_V4, 22)), limit)
        });
        let Ok(mut stream) = stream else { return false };
        stream.set_read_timeout(Some(limit)).unwrap();
        let mut banner = [0u8; 8];
        std::io::Read::read_exact(&mut stream, &mut banner).is_ok()
            && &banner == b"SSH-2.0-"
            && started.elapsed() < limit
    }
}

#[test]
fn sk_lookup_steers_ssh_scp_and_curl_on_ipv4_and_ipv6_without_rewriting_packets() {
    if !netns_available(
        "sk_lookup_steers_ssh_scp_and_curl_on_ipv4_and_ipv6_without_rewriting_packets",
    ) {
        return;
    }
    let server = server();
    let muxer = Muxer::start(&server.link.server, &config(), READY.parse().unwrap());
    let mut steered = 0u64;
    for (host, client) in [
        (SERVER_V4.to_string(), CLIENT_V4.to_string()),
        (SERVER_V6.to_string(), CLIENT_V6.to_string()),
    ] {
        let seen = server.ssh(&host);
        assert!(seen.through_muxer(), "{host}: {seen:?}");
        assert_eq!(seen.client, client);
        steered += 1;
    }
    for host in [SERVER_V4.to_string(), format!("[{SERVER_V6}]")] {
        let body = server.link.client.run_ok(
            "curl",
            &[
                "-sS",
                "--fail",
                "--max-time",
                "10",
                &format!("http://{host}:22/v1/models"),
            ],
        );
        assert!(body.contains("\"llm\""), "{body}");
        steered += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = test_data(8 * 1024 * 1024);
    std::fs::write(dir.path().join("up.bin"), &data).unwrap();
    let mut args = server.sshd.client_options();
    args.extend([
        "-P".into(),
        "22".into(),
        dir.path().join("up.bin").display().to_string(),
        format!(
            "root@[{SERVER_V6}]:{}",
            dir.path().join("copy.bin").display()
        ),
    ]);
    server
        .link
        .client
        .run_ok("scp", &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        sha256_hex(&std::fs::read(dir.path().join("copy.bin")).unwrap()),
        sha256_hex(&data)
    );
    steered += 1;

    // An open session is an ordinary muxer socket on port 22: nothing rewrites its packets.
    let mut command = server.link.client.command("ssh");
    command.args(server.sshd.ssh_args(&SERVER_V4.to_string(), 22, "sleep 30"));
    let _session = Running::spawn("ssh session", command, dir.path().join("session.log"));
    steered += 1;
    wait_for("muxer's socket on port 22", Duration::from_secs(10), || {
        let sockets = server
            .link
            .server
            .run_ok("ss", &["-Htnp", "state", "established", "( sport = :22 )"]);
        sockets.contains("muxer").then_some(())
    });
    let stats = muxer.stats();
    assert_eq!(stats["redirect"]["state"], "attached");
    assert_eq!(stats["redirect"]["ingress"], "sk_lookup");
    let kernel = &stats["kernel"]["global"];
    assert_eq!(kernel["sk_lookup_assigned"], steered, "{kernel}");
    assert!(
        kernel["sk_lookup_local"].as_u64().unwrap() >= 4,
        "muxer's own connections to sshd pass: {kernel}"
    );
    assert_eq!(kernel["sk_lookup_errors"], 0);
    assert_eq!(kernel["connections_redirected"], 0, "no packet rewritten");
    let tcx = server
        .link
        .server
        .run_ok("bpftool", &["net", "show", "dev", "veth-s"]);
    assert!(
        !tcx.contains("tc_ingress") && !tcx.contains("tc_egress"),
        "{tcx}"
    );
    // Local logins are not steered.
    let local = server
        .sshd
        .connection(&server.link.server, "127.0.0.1", 22, &[]);
    assert_eq!(local.client, "127.0.0.1");
    assert!(
        local.through_muxer(),
        "sshd accepted on loopback: {local:?}"
    );
}

#[test]
fn sk_lookup_fails_open_on_sigkill_and_sigterm_and_a_restart_restores_it() {
    if !netns_available("sk_lookup_fails_open_on_sigkill_and_sigterm_and_a_restart_restores_it") {
        return;
    }
    let server = server();
    let host = SERVER_V4.to_string();
    let mut muxer = Muxer::start(&server.link.server, &config(), READY.parse().unwrap());
    assert!(server.ssh(&host).through_muxer());

    muxer.process.signal_and_wait(rustix::process::Signal::KILL);
    assert!(
        server.sshd_answers_port_22_within(Duration::from_secs(1)),
        "port 22 must reach sshd within a second of SIGKILL"
    );
    let direct = server.ssh(&host);
    assert!(!direct.through_muxer(), "{direct:?}");

    // A restart steers again; SIGTERM hands port 22 back at once, before the grace period ends.
    let mut muxer = Muxer::start(&server.link.server, &config(), READY.parse().unwrap());
    assert!(server.ssh(&host).through_muxer(), "steering restored");
    let mut slow = server.link.client.command("curl");
    slow.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://{host}:22/slow?ms=3000"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let _in_flight = Running::spawn("slow request", slow, dir.path().join("slow.log"));
    wait_for("the slow request to arrive", Duration::from_secs(5), || {
        (muxer.stats()["daemon"]["routes"]["http"]["open"] == 1).then_some(())
    });
    muxer.process.signal(rustix::process::Signal::TERM);
    muxer.wait_for_log("stopped accepting");
    assert!(server.sshd_answers_port_22_within(Duration::from_secs(1)));
    assert!(
        !server.ssh(&host).through_muxer(),
        "sshd's own while muxer drains"
    );
    let status = muxer.process.signal_and_wait(rustix::process::Signal::TERM);
    assert!(status.success(), "{status}");
}

#[test]
fn an_earlier_muxer_still_holding_its_link_neither_steals_connections_nor_stays() {
    if !netns_available(
        "an_earlier_muxer_still_holding_its_link_neither_steals_connections_nor_stays",
    ) {
        return;
    }
    use rustix::process::Signal;
    let server = server();
    let host = SERVER_V4.to_string();
    // A muxer that hangs: its link and its sockets in its map stay, but it accepts nothing.
    let hung = Muxer::start(&server.link.server, &config(), READY.parse().unwrap());
    hung.process.signal(Signal::STOP);
    let second = config().replace(":2222", ":2223");
    let second_ready = "127.0.0.1:2223".parse().unwrap();

    // Without CAP_SYS_ADMIN the hung muxer's link cannot be opened, let alone removed, but the new
    // muxer's program replaces its choice.
    let limited = [
        "setpriv",
        "--inh-caps=-all,+bpf,+net_admin,+net_raw",
        "--ambient-caps=-all,+bpf,+net_admin,+net_raw",
        "--bounding-set=-all,+bpf,+net_admin,+net_raw",
        "--",
    ];
    let newer = Muxer::start_as(&server.link.server, &second, second_ready, &limited);
    newer.wait_for_log("kernel redirect attached");
    assert!(
        newer
            .log()
            .contains("other sk_lookup programs on this network namespace"),
        "{}",
        newer.log()
    );
    assert!(server.ssh(&host).through_muxer());
    assert_eq!(newer.stats()["daemon"]["routes"]["ssh"]["total"], 1);
    drop(newer);

    // With it, the stale link is found by its program's name and detached.
    let newest = Muxer::start(&server.link.server, &second, second_ready);
    let log = newest.log();
    assert!(
        log.contains("removed a stale sk_lookup link of an earlier muxer"),
        "{log}"
    );
    assert!(!log.contains("other sk_lookup programs"), "{log}");
    assert!(server.ssh(&host).through_muxer());
    assert_eq!(newest.stats()["daemon"]["routes"]["ssh"]["total"], 1);
    hung.process.signal(Signal::CONT);
}
