//! The userspace multiplexer end to end: real OpenSSH, curl and HTTP/TCP backends in a server
//! namespace, clients in a client namespace, muxer between them on port 2222.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use muxer_tests::backends::{self, Backend};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, SERVER_V4, SERVER_V6};
use muxer_tests::process::{cpu_seconds, status_kib};
use muxer_tests::sshd::Sshd;
use muxer_tests::{netns_available, sha256_hex, test_data, wait_for};

const MUX_PORT: u16 = 2222;

fn mux_v4() -> SocketAddr {
    SocketAddr::from((SERVER_V4, MUX_PORT))
}

/// A config like the bundled one, with `extra` TOML appended (sections not already present).
fn config(sniff_timeout: &str, extra: &str) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:{MUX_PORT}\", \"[::]:{MUX_PORT}\"]\n\
         [sniff]\ntimeout = \"{sniff_timeout}\"\non_timeout = \"ssh\"\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n{extra}"
    )
}

/// The usual server side: sshd on 127.0.0.1:22, the HTTP backend on 127.0.0.1:30000, muxer.
struct Server {
    link: Link,
    sshd: Sshd,
    _http: Backend,
    muxer: Muxer,
}

fn server(sniff_timeout: &str, extra: &str) -> Server {
    let link = Link::new();
    let sshd = Sshd::start(&link.server, &["127.0.0.1:22"]);
    let http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let muxer = Muxer::start(
        &link.server,
        &config(sniff_timeout, extra),
        "127.0.0.1:2222".parse().unwrap(),
    );
    Server {
        link,
        sshd,
        _http: http,
        muxer,
    }
}

fn read_to_end(mut stream: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read to end");
    out
}

#[test]
fn ssh_runs_a_command_and_scp_copies_50_mib_over_ipv4_and_ipv6() {
    if !netns_available("ssh_runs_a_command_and_scp_copies_50_mib_over_ipv4_and_ipv6") {
        return;
    }
    let server = server("2s", "");
    for host in [SERVER_V4.to_string(), SERVER_V6.to_string()] {
        let out = server.link.client.run_ok(
            "ssh",
            &as_str(&server.sshd.ssh_args(
                &host,
                MUX_PORT,
                "echo hello-from-$(hostname -s) && id -u",
            )),
        );
        assert!(out.starts_with("hello-from-"), "{out}");
        assert!(out.ends_with("0\n"), "{out}");
    }

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("payload.bin");
    let data = test_data(50 * 1024 * 1024);
    std::fs::write(&source, &data).unwrap();
    let copied = dir.path().join("copied.bin");
    let mut args = server.sshd.client_options();
    args.extend([
        "-P".into(),
        MUX_PORT.to_string(),
        source.display().to_string(),
        format!("root@{SERVER_V4}:{}", copied.display()),
    ]);
    server.link.client.run_ok("scp", &as_str(&args));
    let remote = server.link.client.run_ok(
        "ssh",
        &as_str(&server.sshd.ssh_args(
            &SERVER_V4.to_string(),
            MUX_PORT,
            &format!("sha256sum {}", copied.display()),
        )),
    );
    assert_eq!(remote.split_whitespace().next().unwrap(), sha256_hex(&data));
    server.muxer.wait_for_log("protocol=\"ssh\"");
}

fn as_str(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Run as the unit runs it (no `RUST_LOG`): per-request access lines only with
/// `access_log = true`, each connection's own line either way.
#[test]
fn access_lines_are_written_only_when_asked_for() {
    if !netns_available("access_lines_are_written_only_when_asked_for") {
        return;
    }
    for (top, expected) in [("", false), ("access_log = true\n", true)] {
        let link = Link::new();
        let _http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
        let muxer = Muxer::start_as(
            &link.server,
            &format!("{top}{}", config("2s", "")),
            "127.0.0.1:2222".parse().unwrap(),
            &["env", "-u", "RUST_LOG"],
        );
        let url = format!("http://{SERVER_V4}:{MUX_PORT}/v1/models");
        link.client
            .run_ok("curl", &["-sS", "--fail", "--max-time", "10", &url]);
        // The connection's line comes after its requests' lines.
        muxer.wait_for_log("http router");
        let log = muxer.log();
        assert_eq!(log.contains("path=/v1/models"), expected, "{top:?}: {log}");
    }
}

#[test]
fn curl_get_and_a_20_mib_chunked_post_reach_the_http_backend() {
    if !netns_available("curl_get_and_a_20_mib_chunked_post_reach_the_http_backend") {
        return;
    }
    let server = server("2s", "");
    for url in [
        format!("http://{SERVER_V4}:{MUX_PORT}/v1/models"),
        format!("http://[{SERVER_V6}]:{MUX_PORT}/v1/models"),
    ] {
        let body = server
            .link
            .client
            .run_ok("curl", &["-sS", "--fail", "--max-time", "10", &url]);
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["data"][0]["id"], "llm");
    }

    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("post.bin");
    let data = test_data(20 * 1024 * 1024);
    std::fs::write(&payload, &data).unwrap();
    let out = server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("@{}", payload.display()),
            &format!("http://{SERVER_V4}:{MUX_PORT}/sha256"),
        ],
    );
    assert_eq!(out, format!("{} {}", sha256_hex(&data), data.len()));
}

#[test]
fn silent_client_gets_the_sshd_banner_after_the_probe_timeout() {
    if !netns_available("silent_client_gets_the_sshd_banner_after_the_probe_timeout") {
        return;
    }
    let server = server("600ms", "");
    let mut stream = server.link.connect(mux_v4());
    let started = Instant::now();
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).expect("banner");
    let waited = started.elapsed();
    assert_eq!(&banner, b"SSH-2.0-");
    assert!(
        waited >= Duration::from_millis(600),
        "banner after {waited:?}, before the timeout"
    );
    assert!(
        waited < Duration::from_millis(1500),
        "banner only after {waited:?}"
    );
}

#[test]
fn ssh_and_http_interleaved_byte_by_byte_both_reach_the_right_backend() {
    if !netns_available("ssh_and_http_interleaved_byte_by_byte_both_reach_the_right_backend") {
        return;
    }
    let server = server("5s", "");
    let mut ssh = server.link.connect(mux_v4());
    let mut http = server.link.connect(mux_v4());
    ssh.set_nodelay(true).unwrap();
    http.set_nodelay(true).unwrap();
    let ssh_hello = b"SSH-2.0-interleaved_test\r\n";
    let request = b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n";
    for i in 0..ssh_hello.len().max(request.len()) {
        if let Some(b) = ssh_hello.get(i) {
            ssh.write_all(&[*b]).unwrap();
        }
        if let Some(b) = request.get(i) {
            http.write_all(&[*b]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let response = String::from_utf8(read_to_end(http)).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"id\":\"llm\""), "{response}");
    let mut banner = [0u8; 8];
    ssh.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
}

#[test]
fn many_connections_leak_no_descriptors_or_threads() {
    if !netns_available("many_connections_leak_no_descriptors_or_threads") {
        return;
    }
    // 75 connections held open from one address: past the per-source defaults for sniffing
    // and SSH startups, which this test is not about.
    let server = server(
        "300ms",
        "[limits]\nmax_sniffing_per_source = 1000\nssh_startups_per_source = 1000\n",
    );
    // Warm up the runtime's worker threads before taking the baseline.
    let request = b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n";
    let mut warm = server.link.connect(mux_v4());
    warm.write_all(request).unwrap();
    read_to_end(warm);
    let baseline_fds = wait_for("muxer to settle", Duration::from_secs(5), || {
        let fds = server.muxer.open_fds();
        std::thread::sleep(Duration::from_millis(100));
        (fds == server.muxer.open_fds()).then_some(fds)
    });
    let baseline_threads = server.muxer.threads();

    let mut open = Vec::new();
    for round in 0..300 {
        let mut stream = server.link.connect(mux_v4());
        match round % 4 {
            0 => {
                stream.write_all(request).unwrap();
                assert!(read_to_end(stream).starts_with(b"HTTP/1.1 200"));
            }
            1 => {
                stream.write_all(b"\x00\x01junk").unwrap(); // no fallback: closed
                assert!(read_to_end(stream).is_empty());
            }
            2 => drop(stream),      // connect then close
            _ => open.push(stream), // left open while others come and go
        }
    }
    assert!(
        server.muxer.open_fds() > baseline_fds,
        "held connections must show up"
    );
    drop(open);
    wait_for(
        "descriptors back to the baseline",
        Duration::from_secs(10),
        || (server.muxer.open_fds() == baseline_fds).then_some(()),
    );
    assert!(
        server.muxer.threads() <= baseline_threads + 2,
        "threads grew from {baseline_threads}"
    );
}

#[test]
fn junk_reaches_the_fallback_unchanged_and_half_close_travels_both_ways() {
    if !netns_available("junk_reaches_the_fallback_unchanged_and_half_close_travels_both_ways") {
        return;
    }
    let server = server("2s", "[fallback]\nupstream = \"127.0.0.1:7000\"\n");
    let _echo = backends::echo(&server.link.server, "127.0.0.1:7000".parse().unwrap());
    let junk = b"\x00\xffnot a protocol\r\n".repeat(1000);
    let mut stream = server.link.connect(mux_v4());
    stream.write_all(&junk).unwrap();
    // Half-close: the echo server only closes its side after it sees our FIN through muxer.
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(stream), junk);
}

/// Huge pages would let the kernel make a mostly idle heap resident 2 MiB at a time, in the
/// background (docs/benchmarks.md): the daemon turns them off for itself.
#[test]
fn the_daemon_keeps_its_heap_out_of_huge_pages() {
    if !netns_available("the_daemon_keeps_its_heap_out_of_huge_pages") {
        return;
    }
    let server = server("2s", "");
    let pid = server.muxer.process.pid();
    assert_eq!(status_kib(pid, "THP_enabled"), Some(0));
}

#[test]
fn idle_spliced_connections_cost_little_memory() {
    if !netns_available("idle_spliced_connections_cost_little_memory") {
        return;
    }
    let server = server("2s", "[fallback]\nupstream = \"127.0.0.1:7000\"\n");
    let _echo = backends::echo(&server.link.server, "127.0.0.1:7000".parse().unwrap());
    let pid = server.muxer.process.pid();
    let mut held = Vec::new();
    let mut open = |count: usize| {
        for _ in 0..count {
            let mut stream = server.link.connect(mux_v4());
            stream.write_all(b"hello, idle\n").unwrap();
            let mut echoed = [0u8; 12];
            stream.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"hello, idle\n");
            held.push(stream);
        }
    };
    // Warm up (pools, the allocator's first pages), then count: under the per-address limit.
    open(50);
    std::thread::sleep(Duration::from_millis(200));
    let before = status_kib(pid, "VmRSS").unwrap();
    let count = 900;
    open(count);
    std::thread::sleep(Duration::from_millis(200));
    let per_connection = (status_kib(pid, "VmRSS").unwrap() - before) as f64 / count as f64;
    eprintln!("{per_connection:.2} KiB per idle spliced connection");
    let open_now = server.muxer.stats()["daemon"]["routes"]["unknown"]["open"]
        .as_u64()
        .unwrap();
    assert_eq!(open_now, 950);
    // An idle spliced connection holds two registered sockets and a small task (~1.2 KiB of
    // heap; measured here ~2.3 KiB with a fixed share that 900 connections do not amortise, ~1 KiB
    // per connection at 8 000). A copy buffer held while idle would add 16 KiB.
    assert!(
        per_connection < 4.0,
        "{per_connection:.2} KiB per idle spliced connection"
    );
}

#[test]
fn unknown_traffic_without_a_fallback_is_closed_and_disturbs_nothing() {
    if !netns_available("unknown_traffic_without_a_fallback_is_closed_and_disturbs_nothing") {
        return;
    }
    let server = server("2s", "");
    let mut ssh = server.link.connect(mux_v4());
    ssh.write_all(b"SSH-2.0-bystander\r\n").unwrap();
    let mut banner = [0u8; 8];
    ssh.read_exact(&mut banner).unwrap();
    for junk in [
        &b"\x16\x03\x01\x00\x00"[..],
        b"BREW /pot HTTP/1.1\r\n",
        b"\x00\x00\x00\x00",
    ] {
        let mut stream = server.link.connect(mux_v4());
        stream.write_all(junk).unwrap();
        assert!(read_to_end(stream).is_empty());
    }
    // The bystander SSH connection still works: sshd answers our key exchange init with its own.
    let mut more = [0u8; 64];
    let n = ssh.read(&mut more).expect("bystander still open");
    assert!(n > 0);
    server.muxer.wait_for_log("protocol=\"unknown\"");
}

#[test]
fn idle_spliced_connections_are_closed_after_the_idle_timeout() {
    if !netns_available("idle_spliced_connections_are_closed_after_the_idle_timeout") {
        return;
    }
    let server = server(
        "2s",
        "[fallback]\nupstream = \"127.0.0.1:7000\"\n[splice]\nidle_timeout = \"500ms\"\n",
    );
    let _echo = backends::echo(&server.link.server, "127.0.0.1:7000".parse().unwrap());
    let mut stream = server.link.connect(mux_v4());
    // Activity keeps it open past the timeout...
    for _ in 0..4 {
        stream.write_all(b"ping").unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(stream.read(&mut buf).unwrap(), 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    server.muxer.wait_for_log("close=idle timeout");
}

#[test]
fn connection_limits_refuse_per_address_and_pause_globally() {
    if !netns_available("connection_limits_refuse_per_address_and_pause_globally") {
        return;
    }
    let mut server = server(
        "2s",
        "[fallback]\nupstream = \"127.0.0.1:7000\"\n[limits]\nmax_connections = 3\nmax_connections_per_ip = 2\n",
    );
    let _echo = backends::echo(&server.link.server, "127.0.0.1:7000".parse().unwrap());
    let echo_once = |stream: &mut TcpStream| -> bool {
        if stream.write_all(b"x").is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        matches!(stream.read(&mut b), Ok(1))
    };
    // Per address: the client namespace's IPv4 address gets two; the third is closed.
    let mut first = server.link.connect(mux_v4());
    let mut second = server.link.connect(mux_v4());
    assert!(echo_once(&mut first) && echo_once(&mut second));
    let mut third = server.link.connect(mux_v4());
    assert!(
        !echo_once(&mut third),
        "third connection from one address must be refused"
    );

    // Globally: a third connection from another address (IPv6) is served; a fourth waits.
    let v6 = SocketAddr::from((SERVER_V6, MUX_PORT));
    let mut other = server.link.connect(v6);
    assert!(echo_once(&mut other));
    let mut waiting = server.link.connect(v6);
    waiting
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    waiting.write_all(b"y").unwrap();
    let mut b = [0u8; 1];
    assert!(
        waiting.read(&mut b).is_err(),
        "fourth connection must wait while three are open"
    );
    drop(first);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(waiting.read(&mut b).unwrap(), 1, "served once a slot frees");
    server.muxer.process.assert_running();
}

/// muxer in `link`'s server namespace, splicing every connection to an echo backend on
/// 127.0.0.1:7000 (the caller starts it), under a hard limit of 64 descriptors (muxer raises its
/// soft limit to it, then runs out); `extra` goes into `[listen]` and may add sections. The control
/// socket is `dir/muxer.sock`.
fn start_with_64_descriptors(
    link: &Link,
    dir: &std::path::Path,
    extra: &str,
) -> muxer_tests::process::Running {
    let config = dir.join("muxer.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddresses = [\"0.0.0.0:{MUX_PORT}\"]\n{extra}[sniff]\non_timeout = \"close\"\n\
             [fallback]\nupstream = \"127.0.0.1:7000\"\n[control]\nsocket = \"{}\"\n",
            dir.join("muxer.sock").display()
        ),
    )
    .unwrap();
    let mut command = link.server.command("prlimit");
    command
        .args(["--nofile=32:64", "--"])
        .arg(muxer_tests::muxer::binary())
        .args(["run", "--config"])
        .arg(&config);
    muxer_tests::process::Running::spawn("muxer", command, dir.join("muxer.log"))
}

/// Up to `count` connections from `link`'s client to muxer, each having sent a line.
fn hold_connections(link: &Link, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| {
            let mut stream = link
                .client
                .enter(|| TcpStream::connect_timeout(&mux_v4(), Duration::from_secs(2)))
                .ok()?;
            let _ = stream.write_all(b"hold\n");
            Some(stream)
        })
        .collect()
}

#[test]
fn control_and_metrics_back_off_when_out_of_descriptors_and_metrics_drops_silent_clients() {
    if !netns_available(
        "control_and_metrics_back_off_when_out_of_descriptors_and_metrics_drops_silent_clients",
    ) {
        return;
    }
    let link = Link::new();
    let _echo = backends::echo(&link.server, "127.0.0.1:7000".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("muxer.sock");
    let mut muxer = start_with_64_descriptors(
        &link,
        dir.path(),
        "workers = 1\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
    );
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9464));
    wait_for("the metrics endpoint", Duration::from_secs(10), || {
        muxer.assert_running();
        link.server
            .enter(|| TcpStream::connect(metrics).ok())
            .map(drop)
    });

    // A metrics client that starts a request head and goes silent is closed by the header timeout.
    let mut silent = link.server.enter(|| TcpStream::connect(metrics)).unwrap();
    silent.write_all(b"GET /metr").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(12),
        "closed after {waited:?} with {:?}",
        String::from_utf8_lossy(&rest)
    );

    // 60 held connections need 120 descriptors: the process runs out.
    let held = hold_connections(&link, 60);
    wait_for("descriptors to run out", Duration::from_secs(10), || {
        muxer
            .log()
            .contains("out of file descriptors")
            .then_some(())
    });
    // Silent control and metrics clients queue up while no descriptor is free: once one of each
    // took the last free descriptor, the next ones cannot be accepted.
    let _control: Vec<_> = (0..3)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let _scrapers: Vec<_> = (0..3)
        .map(|_| link.server.enter(|| TcpStream::connect(metrics)).unwrap())
        .collect();
    wait_for("both loops to back off", Duration::from_secs(10), || {
        let log = muxer.log();
        (log.contains("control socket: out of file descriptors")
            && log.contains("metrics endpoint: out of file descriptors"))
        .then_some(())
    });
    // Accept loops that retried at once would keep a core busy; backing off costs next to nothing.
    let before = cpu_seconds(muxer.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(muxer.pid()) - before;
    assert!(
        used < 0.5,
        "{used:.2} s of CPU in 2 s while out of descriptors"
    );
    muxer.assert_running();

    drop(held);
    let stats = wait_for(
        "muxer stats to answer again",
        Duration::from_secs(10),
        || {
            let output = std::process::Command::new(muxer_tests::muxer::binary())
                .args(["stats", "--json", "--socket"])
                .arg(&socket)
                .output()
                .ok()?;
            output.status.success().then_some(output.stdout)
        },
    );
    assert!(String::from_utf8_lossy(&stats).contains("uptime_seconds"));
}

#[test]
fn running_out_of_descriptors_pauses_accepting_without_crashing() {
    if !netns_available("running_out_of_descriptors_pauses_accepting_without_crashing") {
        return;
    }
    let link = Link::new();
    let _echo = backends::echo(&link.server, "127.0.0.1:7000".parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut muxer = start_with_64_descriptors(&link, dir.path(), "");
    wait_for("muxer", Duration::from_secs(10), || {
        muxer.assert_running();
        link.client
            .enter(|| TcpStream::connect(mux_v4()).ok())
            .map(drop)
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", muxer.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    assert!(
        open_files.split_whitespace().filter(|w| *w == "64").count() == 2,
        "soft limit raised to hard: {open_files}"
    );

    // 60 connections held open need 120 descriptors: many cannot be served for now.
    let held = hold_connections(&link, 60);
    std::thread::sleep(Duration::from_millis(2500));
    muxer.assert_running();
    let log = muxer.log();
    let warnings = log.matches("out of file descriptors").count();
    assert!(warnings >= 1, "no warning: {log}");
    assert!(
        warnings <= 4,
        "warned {warnings} times in ~2.5 s: at most once a second"
    );
    // Freeing descriptors lets it serve again.
    drop(held);
    let served = wait_for("muxer to serve again", Duration::from_secs(10), || {
        let mut stream = link
            .client
            .enter(|| TcpStream::connect_timeout(&mux_v4(), Duration::from_secs(2)))
            .ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(b"again\n").ok()?;
        let mut reply = [0u8; 6];
        stream.read_exact(&mut reply).ok()?;
        Some(reply)
    });
    assert_eq!(&served, b"again\n");
    muxer.assert_running();
}

#[test]
fn both_forwarding_methods_carry_bulk_data_and_half_close() {
    if !netns_available("both_forwarding_methods_carry_bulk_data_and_half_close") {
        return;
    }
    for method in ["copy", "splice"] {
        let link = Link::new();
        let _echo = backends::echo(&link.server, "127.0.0.1:7000".parse().unwrap());
        let config = format!(
            "[listen]\naddresses = [\"0.0.0.0:{MUX_PORT}\"]\n[sniff]\non_timeout = \"close\"\n\
             [splice]\nmethod = \"{method}\"\n[fallback]\nupstream = \"127.0.0.1:7000\"\n"
        );
        let muxer = Muxer::start(&link.server, &config, "127.0.0.1:2222".parse().unwrap());
        let mut data = b"\x00not a protocol".to_vec();
        data.extend(test_data(8 * 1024 * 1024));
        let stream = link.connect(mux_v4());
        let mut writer = stream.try_clone().unwrap();
        let sent = data.clone();
        let sending = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let echoed = read_to_end(stream);
        sending.join().unwrap();
        assert_eq!(echoed.len(), data.len(), "{method}");
        assert_eq!(sha256_hex(&echoed), sha256_hex(&data), "{method}");
        muxer.wait_for_log("close=finished");
    }
}
