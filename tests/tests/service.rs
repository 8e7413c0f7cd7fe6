//! muxer as a service: the systemd unit, reloads under load, graceful SIGTERM, metrics, JSON logs,
//! and a run with nothing but CAP_BPF and CAP_NET_ADMIN as an unprivileged user.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muxer_tests::backends::{self, Backend};
use muxer_tests::muxer::{binary, Muxer};
use muxer_tests::netns::{Link, CLIENT_V4, SERVER_V4};
use muxer_tests::process::Running;
use muxer_tests::sshd::Sshd;
use muxer_tests::{netns_available, wait_for};

const READY: &str = "127.0.0.1:2222";

fn config(redirect: &str, routes: &str, extra: &str) -> String {
    format!(
        "{extra}\n[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"{redirect}\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n{routes}"
    )
}

const DEFAULT_ROUTE: &str = "[[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n";
const WITH_EMBEDDING: &str = "[[http.route]]\npath = \"/embedding-model/\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:30001\"]\n\
    [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n";

struct Server {
    link: Link,
    sshd: Sshd,
    _llm: Backend,
    _embed: Backend,
}

fn server() -> Server {
    let link = Link::new();
    let sshd = Sshd::start(&link.server, &["127.0.0.1:22", "0.0.0.0:22"]);
    let llm = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let embed = backends::http(&link.server, "127.0.0.1:30001".parse().unwrap(), "embed");
    Server {
        link,
        sshd,
        _llm: llm,
        _embed: embed,
    }
}

impl Server {
    /// Whether a login to `port` went through muxer (sshd accepted it on a loopback address),
    /// checking that sshd saw the client's real address either way.
    fn ssh_through_muxer(&self, port: u16) -> bool {
        let seen = self
            .sshd
            .connection(&self.link.client, &SERVER_V4.to_string(), port, &[]);
        assert_eq!(
            seen.client,
            CLIENT_V4.to_string(),
            "sshd sees the real client"
        );
        seen.through_muxer()
    }

    fn get(&self, url: &str) -> String {
        self.link
            .client
            .run_ok("curl", &["-sS", "--fail", "--max-time", "10", url])
    }
}

#[test]
fn the_installed_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let output = Command::new(binary())
        .args(["install", "--root", "/", "--no-system-setup"])
        .args([
            "--binary",
            &path("bin/muxer"),
            "--config",
            &path("etc/muxer.toml"),
            "--unit",
            &path("muxer.service"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let unit = std::fs::read_to_string(path("muxer.service")).unwrap();
    assert!(
        unit.contains("AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n"),
        "{unit}"
    );
    assert!(std::fs::read_to_string(path("etc/muxer.toml"))
        .unwrap()
        .contains("[[http.route]]"));
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(path("muxer.service"))
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// Requests in a loop on keep-alive connections until stopped; returns every status seen.
fn request_loop(link: &Link, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    let netns = link.client.name().to_owned();
    std::thread::spawn(move || {
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let url = format!("http://{SERVER_V4}:2222/v1/models");
            let mut command = Command::new("ip");
            command.args([
                "netns",
                "exec",
                &netns,
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                "%{http_code}\n",
            ]);
            for _ in 0..5 {
                command.args(["-o", "/dev/null", &url]);
            }
            let output = command.output().unwrap();
            statuses.extend(
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(str::to_owned),
            );
            if !output.status.success() {
                statuses.push(format!(
                    "curl failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
        statuses
    })
}

#[test]
fn reloads_apply_new_routes_while_requests_and_an_ssh_session_carry_on() {
    if !netns_available("reloads_apply_new_routes_while_requests_and_an_ssh_session_carry_on") {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config("tc", DEFAULT_ROUTE, ""),
        READY.parse().unwrap(),
    );
    let config_path = muxer.config_path();
    let original = std::fs::read_to_string(&config_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = server.link.client.command("ssh");
    command.args(
        server
            .sshd
            .ssh_args(&SERVER_V4.to_string(), 22, "sleep 4; echo still-alive"),
    );
    let mut session = Running::spawn("ssh session", command, dir.path().join("session.log"));
    let stop = Arc::new(AtomicBool::new(false));
    let requests = request_loop(&server.link, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));

    assert!(server
        .get(&format!(
            "http://{SERVER_V4}:2222/embedding-model/v1/models"
        ))
        .starts_with("llm GET"));
    // Reload through the control socket: a new route and new limits.
    let updated = original
        .replace(DEFAULT_ROUTE, WITH_EMBEDDING)
        .replace("[ssh]", "[limits]\nmax_connections = 5000\n[ssh]");
    let reload = muxer.reload(&updated);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert!(String::from_utf8_lossy(&reload.stdout).contains("reloaded"));
    assert!(server
        .get(&format!(
            "http://{SERVER_V4}:2222/embedding-model/v1/models"
        ))
        .contains("\"embed\""));
    assert!(server
        .get(&format!("http://{SERVER_V4}:22/embedding-model/v1/models"))
        .contains("\"embed\""));

    // And with SIGHUP: back to the original routes.
    std::fs::write(&config_path, &original).unwrap();
    muxer.process.signal(rustix::process::Signal::HUP);
    wait_for("the SIGHUP reload", Duration::from_secs(5), || {
        server
            .get(&format!(
                "http://{SERVER_V4}:2222/embedding-model/v1/models"
            ))
            .starts_with("llm GET")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let statuses = requests.join().unwrap();
    assert!(statuses.len() > 20, "too few requests: {statuses:?}");
    let failed: Vec<&String> = statuses.iter().filter(|s| *s != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during reloads: {failed:?}",
        failed.len(),
        statuses.len()
    );

    let status = wait_for("the ssh session", Duration::from_secs(10), || {
        session.try_exit_status()
    });
    assert!(
        status.success() && session.log().contains("still-alive"),
        "{}",
        session.log()
    );
    assert_eq!(muxer.stats()["redirect"]["state"], "attached");
    assert!(
        server.ssh_through_muxer(22),
        "redirect still in place after reloads"
    );
}

#[test]
fn an_invalid_reload_is_rejected_and_the_old_config_keeps_serving() {
    if !netns_available("an_invalid_reload_is_rejected_and_the_old_config_keeps_serving") {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config("off", WITH_EMBEDDING, ""),
        READY.parse().unwrap(),
    );
    let config_path = muxer.config_path();
    let original = std::fs::read_to_string(&config_path).unwrap();
    let reload = muxer.reload(&original.replace("strip_prefix = true", "strip_prefix = \"yes\""));
    assert_eq!(reload.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert!(
        stderr.contains("http.route[0].strip_prefix") && stderr.contains("previous config"),
        "{stderr}"
    );
    muxer.wait_for_log("reload rejected");
    muxer.process.signal(rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(server
        .get(&format!(
            "http://{SERVER_V4}:2222/embedding-model/v1/models"
        ))
        .contains("\"embed\""));
    assert!(server.ssh_through_muxer(2222));
}

#[test]
fn sigterm_detaches_first_and_lets_an_in_flight_stream_finish() {
    if !netns_available("sigterm_detaches_first_and_lets_an_in_flight_stream_finish") {
        return;
    }
    let server = server();
    let mut muxer = Muxer::start(
        &server.link.server,
        &config("tc", DEFAULT_ROUTE, ""),
        READY.parse().unwrap(),
    );
    // 40 events, one every 50 ms, through the redirected port.
    let (mut curl, lines) = muxer_tests::process::sse_curl(
        &server.link.client,
        &format!("http://{SERVER_V4}:22/sse?count=40"),
        20,
        &[],
    );
    let mut events = 0usize;
    let mut count_events = |lines: &std::sync::mpsc::Receiver<String>| {
        events += lines
            .try_iter()
            .filter(|line| line.starts_with("data: "))
            .count();
        events
    };
    wait_for("a few events", Duration::from_secs(5), || {
        (count_events(&lines) >= 5).then_some(())
    });
    muxer.process.signal(rustix::process::Signal::TERM);
    let signalled = Instant::now();

    // New connections to port 22 reach sshd directly at once, while the stream still runs.
    wait_for("muxer to stop accepting", Duration::from_secs(1), || {
        muxer.log().contains("stopped accepting").then_some(())
    });
    assert!(!server.ssh_through_muxer(22));
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "fallback took {:?}",
        signalled.elapsed()
    );
    assert!(
        count_events(&lines) < 40,
        "the stream must still be running for this to mean anything"
    );
    // No new connections on the listen port.
    let refused = server.link.client.enter(|| {
        TcpStream::connect_timeout(
            &SocketAddr::from((SERVER_V4, 2222)),
            Duration::from_millis(500),
        )
    });
    assert!(refused.is_err(), "still accepting after SIGTERM");

    assert!(curl.wait().unwrap().success(), "the stream was cut");
    // The reader thread ends with curl's output, so every line is in the channel by then.
    let received = count_events(&lines)
        + lines
            .iter()
            .filter(|line| line.starts_with("data: "))
            .count();
    assert_eq!(
        received, 40,
        "every event of the in-flight response arrived"
    );
    let status = wait_for("muxer to exit", Duration::from_secs(10), || {
        muxer.process.try_exit_status()
    });
    assert!(status.success(), "{status}");
    assert!(muxer.log().contains("kernel redirect detached"));
}

#[test]
fn metrics_and_json_logs() {
    if !netns_available("metrics_and_json_logs") {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config(
            "tc",
            DEFAULT_ROUTE,
            "log_format = \"json\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        ),
        READY.parse().unwrap(),
    );
    server.get(&format!("http://{SERVER_V4}:22/v1/models"));
    server.get(&format!("http://{SERVER_V4}:2222/nothing-here"));
    assert!(server.ssh_through_muxer(22));
    let metrics = server
        .link
        .server
        .run_ok("curl", &["-sS", "--fail", "http://127.0.0.1:9464/metrics"]);
    for needle in [
        "muxer_http_requests_total{route=\"default\",status=\"200\"} 2",
        "muxer_http_upstream_response_seconds_bucket{le=",
        "muxer_http_time_to_first_byte_seconds_count{route=\"default\"} 2",
        "muxer_connections_total{protocol=\"http\"} 2",
        "muxer_connections_total{protocol=\"ssh\"} 1",
        "muxer_probe_outcomes_total{outcome=\"timeout\"} 0",
        // curl closed its connections: none parked.
        "muxer_http_parked_connections 0",
        "muxer_class_connections{class=\"ssh\"} 0",
        "muxer_class_limit{class=\"http\"} 18000",
        "muxer_class_limit{class=\"sniffing\"} 20000",
        "muxer_refused_total{reason=\"shared_classes_full\"} 0",
        "muxer_timeouts_total{kind=\"write_stalled\"} 0",
        "muxer_worker_connections{worker=\"0\"} ",
        "muxer_kernel_packets_total{counter=\"connections_redirected\"} 2",
        "muxer_kernel_port_packets_total{port=\"22\",direction=\"in\"}",
        "# EOF",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    // The metrics port is not reachable from outside unless configured so.
    let outside = server.link.client.run(
        "curl",
        &["-sS", "--max-time", "2", "http://198.18.0.2:9464/metrics"],
    );
    assert!(!outside.status.success());

    muxer.wait_for_log("\"protocol\":\"ssh\"");
    for line in muxer.log().lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(muxer.log().contains("\"route\":\"default\""));
}

#[test]
fn with_only_cap_bpf_and_cap_net_admin_everything_works_including_the_redirect() {
    if !netns_available(
        "with_only_cap_bpf_and_cap_net_admin_everything_works_including_the_redirect",
    ) {
        return;
    }
    let server = server();
    // As systemd's ExecStartPre=+ does: a pin directory the unprivileged user owns.
    let bpffs = muxer_tests::netns::BpfFs::mount();
    let pin_dir = bpffs.path().join("muxer");
    std::fs::create_dir(&pin_dir).unwrap();
    rustix::fs::chown(
        &pin_dir,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    std::fs::set_permissions(
        bpffs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+bpf,+net_admin",
        "--ambient-caps=-all,+bpf,+net_admin",
        "--bounding-set=-all,+bpf,+net_admin",
        "--",
    ];
    let config = config("tc", DEFAULT_ROUTE, "").replace(
        "ports = [22]\n",
        &format!("ports = [22]\npin_dir = \"{}\"\n", pin_dir.display()),
    );
    let muxer = Muxer::start_as(
        &server.link.server,
        &config,
        READY.parse().unwrap(),
        &wrapper,
    );
    muxer.wait_for_log("kernel redirect attached");
    let status = std::fs::read_to_string(format!("/proc/{}/status", muxer.process.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    assert!(status.contains("CapEff:\t0000008000001000"), "{status}");

    assert!(
        server.ssh_through_muxer(22),
        "ssh on port 22 through the redirect"
    );
    assert!(server
        .get(&format!("http://{SERVER_V4}:22/v1/models"))
        .contains("\"llm\""));
    let stats = muxer.stats();
    assert_eq!(stats["redirect"]["state"], "attached");
    assert_eq!(stats["kernel"]["global"]["connections_redirected"], 2);
    assert!(
        pin_dir.join(muxer_common::COUNTERS_MAP).exists(),
        "counters pinned by the unprivileged daemon"
    );
    assert!(!muxer.log().contains("WARN"), "{}", muxer.log());
}

#[test]
fn reloading_redirect_ports_never_leaves_port_22_unredirected() {
    if !netns_available("reloading_redirect_ports_never_leaves_port_22_unredirected") {
        return;
    }
    let server = server();
    let muxer = Muxer::start(
        &server.link.server,
        &config("tc", DEFAULT_ROUTE, ""),
        READY.parse().unwrap(),
    );
    let config_path = muxer.config_path();
    let original = std::fs::read_to_string(&config_path).unwrap();
    let reload = |text: String| {
        let output = muxer.reload(&text);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // HTTP to port 22 in a loop: any request that reached sshd instead of muxer fails.
    let stop = Arc::new(AtomicBool::new(false));
    let netns = server.link.client.name().to_owned();
    let flag = Arc::clone(&stop);
    let looping = std::thread::spawn(move || {
        let mut results = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let output = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!("http://{SERVER_V4}:22/v1/models"))
                .output()
                .unwrap();
            results.push(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        results
    });
    std::thread::sleep(Duration::from_millis(300));
    reload(original.replace("ports = [22]", "ports = [22, 2022]"));
    assert!(
        server
            .get(&format!("http://{SERVER_V4}:2022/v1/models"))
            .contains("\"llm\""),
        "new port redirected"
    );
    std::thread::sleep(Duration::from_millis(300));
    reload(
        original
            .replace("ports = [22]", "ports = [2022, 22]")
            .replace("interfaces = [\"veth-s\"]", "interfaces = []"),
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let results = looping.join().unwrap();
    let failed: Vec<&String> = results.iter().filter(|r| *r != "200").collect();
    assert!(
        results.len() > 5 && failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );

    // Removing 22 hands it back to sshd; 2022 stays redirected.
    reload(original.replace("ports = [22]", "ports = [2022]"));
    assert!(!server.ssh_through_muxer(22));
    assert!(server
        .get(&format!("http://{SERVER_V4}:2022/v1/models"))
        .contains("\"llm\""));
    let stats = muxer.stats();
    assert_eq!(stats["redirect"]["ports"], serde_json::json!([2022]));
}

#[test]
fn a_log_reader_that_stops_reading_never_stalls_requests() {
    if !netns_available("a_log_reader_that_stops_reading_never_stalls_requests") {
        return;
    }
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("muxer.toml");
    std::fs::write(
        &config_path,
        format!(
            "{}\n[control]\nsocket = \"{}\"\n",
            config("off", DEFAULT_ROUTE, ""),
            dir.path().join("muxer.sock").display()
        ),
    )
    .unwrap();
    // stderr is a pipe nobody reads (like a stuck journald): its 64 KiB fill up after a few
    // hundred access lines, and a logger writing from the connection's task would stop there.
    let mut child = server
        .link
        .server
        .command(&binary().display().to_string())
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = child.stderr.take();
    wait_for("muxer to listen", Duration::from_secs(10), || {
        server
            .link
            .client
            .enter(|| TcpStream::connect((SERVER_V4, 2222)).ok())
            .map(drop)
    });
    // 3000 requests on one keep-alive connection: about 600 KiB of access lines.
    let url = format!("http://{SERVER_V4}:2222/v1/models?n=[1-3000]");
    // curl's --max-time bounds each transfer; `timeout` bounds all of them.
    let codes = server.link.client.run_ok(
        "timeout",
        &[
            "60",
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &url,
        ],
    );
    assert_eq!(
        codes.lines().filter(|code| *code == "200").count(),
        3000,
        "requests stalled or failed: {}",
        codes.lines().rev().take(3).collect::<Vec<_>>().join(",")
    );
    let _ = child.kill();
    let _ = child.wait();
}
