//! `muxer upgrade` end to end: real OpenSSH sessions through port 22 (kernel redirect in each
//! mode) live on while a new muxer process takes every socket over; a successor that cannot
//! start leaves the old process serving; fail-open still holds after a handover.
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{BpfFs, SERVER_V4};
use muxer_tests::process::Running;
use muxer_tests::public_host::PublicHost;
use muxer_tests::systemd::FakeSystemd;
use muxer_tests::{netns_available, sha256_hex, test_data, wait_for};

const READY: &str = "127.0.0.1:2222";
const TICKS: usize = 150;

/// A private bpffs (other tests' muxers remove what they find in the shared pin directory) and
/// the pin directory in it.
fn pins() -> (BpfFs, PathBuf) {
    let bpffs = BpfFs::mount();
    let dir = bpffs.path().join("muxer");
    (bpffs, dir)
}

fn config(mode: &str, pin_dir: &Path) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"{mode}\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         pin_dir = \"{}\"\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n\
         [limits]\nssh_startups_per_source = 64\n",
        pin_dir.display()
    )
}

/// An ssh session through port 22 whose standard input and output the test holds; killed on
/// drop.
struct Session {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Session {
    fn open(host: &PublicHost, remote: &str, tty: bool) -> Session {
        let mut command = host.link.client.command("ssh");
        if tty {
            command.arg("-tt");
        }
        command
            .args(host.sshd.ssh_args(&SERVER_V4.to_string(), 22, remote))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("start ssh");
        let input = child.stdin.take().expect("stdin");
        let output = BufReader::new(child.stdout.take().expect("stdout"));
        Session {
            child,
            input,
            output,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.output.read_line(&mut line).expect("read from ssh");
        line.trim_end().to_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An idle session: answers one line with `alive-LINE`, once muxer has it open.
fn idle_session(host: &PublicHost) -> Session {
    let mut session = Session::open(host, "echo open; read line; echo alive-$line", false);
    assert_eq!(session.line(), "open");
    session
}

fn check_idle_session(mut session: Session, index: usize) {
    writeln!(session.input, "{index}").expect("write to ssh");
    session.input.flush().expect("flush");
    assert_eq!(
        session.line(),
        format!("alive-{index}"),
        "idle session {index}"
    );
}

/// Reads the ticker's lines on a thread, with their arrival times.
fn read_ticks(mut session: Session) -> mpsc::Receiver<(String, Instant)> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || loop {
        let mut line = String::new();
        match session.output.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = line.trim_end().to_owned();
                if sender.send((line, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
    receiver
}

/// Every tick in order, none lost or repeated, none more than 1 s after the one before.
fn check_ticks(ticks: &[(String, Instant)]) {
    let numbers: Vec<usize> = ticks
        .iter()
        .filter_map(|(line, _)| line.strip_prefix("tick-")?.parse().ok())
        .collect();
    assert_eq!(numbers, (0..TICKS).collect::<Vec<_>>(), "ticks: {ticks:?}");
    let longest = ticks
        .windows(2)
        .map(|pair| pair[1].1 - pair[0].1)
        .max()
        .unwrap_or_default();
    assert!(longest < Duration::from_secs(1), "a gap of {longest:?}");
}

/// The old process's and the successor's log lines about the handover.
fn handed_over(muxer: &Muxer) -> usize {
    muxer
        .log()
        .matches("connection handed over to the new process")
        .count()
}

enum Trigger {
    Command,
    Signal,
}

fn sessions_survive_an_upgrade(mode: &str, with_scp: bool, trigger: Trigger, test: &str) {
    if !netns_available(test) {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let mut muxer = Muxer::start(
        &host.link.server,
        &config(mode, &pin_dir),
        READY.parse().unwrap(),
    );
    let old_pid = muxer.process.pid();

    let dir = tempfile::tempdir().unwrap();
    let upload = with_scp.then(|| {
        let data = test_data(200 * 1024 * 1024);
        let source = dir.path().join("up.bin");
        std::fs::write(&source, &data).unwrap();
        (source, sha256_hex(&data))
    });
    let idle: Vec<Session> = (0..20).map(|_| idle_session(&host)).collect();
    let ticker = Session::open(
        &host,
        &format!("i=0; while [ $i -lt {TICKS} ]; do echo tick-$i; i=$((i+1)); sleep 0.1; done"),
        true,
    );
    let ticks = read_ticks(ticker);
    let scp = upload.map(|(source, expected)| {
        let mut args = host.sshd.client_options();
        args.extend([
            // 160 Mbit/s: about 10 s, so the upgrade lands in the middle.
            "-l".into(),
            "160000".into(),
            "-P".into(),
            "22".into(),
            source.display().to_string(),
            format!("root@{SERVER_V4}:{}", dir.path().join("copy.bin").display()),
        ]);
        let mut command = host.link.client.command("scp");
        command.args(&args);
        let copy = Running::spawn("scp", command, dir.path().join("scp.log"));
        (copy, expected)
    });
    let mut received = Vec::new();
    while received.len() < 10 {
        received.push(ticks.recv_timeout(Duration::from_secs(10)).expect("tick"));
    }
    if with_scp {
        wait_for("the copy to be under way", Duration::from_secs(10), || {
            let copied = std::fs::metadata(dir.path().join("copy.bin")).ok()?.len();
            (copied > 10 * 1024 * 1024).then_some(())
        });
    }

    match trigger {
        Trigger::Command => {
            let output = muxer.upgrade(None);
            assert!(
                output.status.success(),
                "muxer upgrade: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Trigger::Signal => {
            muxer.process.signal(rustix::process::Signal::USR2);
            let pid = wait_for("the successor's pid", Duration::from_secs(30), || {
                let log = muxer.log();
                let line = log
                    .lines()
                    .find(|line| line.contains("the new process accepts now"))?;
                line.split("pid=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            });
            muxer.process.succeeded_by(pid, Duration::from_secs(60));
        }
    }
    assert_ne!(muxer.process.pid(), old_pid);
    let moved = handed_over(&muxer);
    assert!(
        moved >= 21 + usize::from(with_scp),
        "{moved} connections handed over"
    );

    // The ticker went on without a gap; the copy finished intact.
    while received.len() < TICKS {
        match ticks.recv_timeout(Duration::from_secs(10)) {
            Ok(tick) => received.push(tick),
            Err(_) => break,
        }
    }
    check_ticks(&received);
    if let Some((mut copy, expected)) = scp {
        let status = wait_for("the copy to finish", Duration::from_secs(60), || {
            copy.try_exit_status()
        });
        assert!(status.success(), "scp: {}", copy.log());
        let copied = std::fs::read(dir.path().join("copy.bin")).unwrap();
        assert_eq!(sha256_hex(&copied), expected, "the copy differs");
    }
    for (index, session) in idle.into_iter().enumerate() {
        check_idle_session(session, index);
    }

    // The new process serves new connections, answers on the control socket, and counts the
    // sessions it took over.
    assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
    let stats = muxer.stats();
    assert!(
        stats["daemon"]["routes"]["ssh"]["total"]
            .as_u64()
            .unwrap_or(0)
            >= 21,
        "{stats}"
    );
    assert_eq!(stats["redirect"]["state"], "attached", "{stats}");

    // Fail-open holds for the successor: killed, port 22 reaches sshd within a second.
    muxer.process.signal_and_wait(rustix::process::Signal::KILL);
    let killed = Instant::now();
    wait_for("sshd's banner on port 22", Duration::from_secs(1), || {
        banner(&host).then_some(())
    });
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert!(!host.ssh(&SERVER_V4.to_string()).through_muxer());
}

/// Whether a new connection to port 22 gets an SSH banner.
fn banner(host: &PublicHost) -> bool {
    host.link.client.enter(|| {
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(
            &SocketAddr::from((SERVER_V4, 22)),
            Duration::from_millis(300),
        ) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
        let mut banner = [0u8; 8];
        std::io::Read::read_exact(&mut stream, &mut banner).is_ok() && &banner == b"SSH-2.0-"
    })
}

#[test]
fn tc_an_upgrade_keeps_a_ticking_session_an_scp_in_flight_and_20_idle_sessions() {
    sessions_survive_an_upgrade(
        "tc",
        true,
        Trigger::Command,
        "tc_an_upgrade_keeps_a_ticking_session_an_scp_in_flight_and_20_idle_sessions",
    );
}

#[test]
fn xdp_an_upgrade_keeps_a_ticking_session_and_20_idle_sessions() {
    sessions_survive_an_upgrade(
        "xdp",
        false,
        Trigger::Command,
        "xdp_an_upgrade_keeps_a_ticking_session_and_20_idle_sessions",
    );
}

#[test]
fn sk_lookup_sigusr2_upgrades_and_keeps_a_ticking_session_and_20_idle_sessions() {
    sessions_survive_an_upgrade(
        "sk_lookup",
        false,
        Trigger::Signal,
        "sk_lookup_sigusr2_upgrades_and_keeps_a_ticking_session_and_20_idle_sessions",
    );
}

#[test]
fn a_successor_that_cannot_start_leaves_the_old_process_serving() {
    if !netns_available("a_successor_that_cannot_start_leaves_the_old_process_serving") {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let mut muxer = Muxer::start(
        &host.link.server,
        &config("xdp", &pin_dir),
        READY.parse().unwrap(),
    );
    let pid = muxer.process.pid();
    let mut session = idle_session(&host);

    // A binary that exits at once, and the right binary with a config it rejects.
    let output = muxer.upgrade(Some(std::path::Path::new("/bin/false")));
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(said.contains("exited"), "{said}");
    let good = std::fs::read_to_string(muxer.config_path()).unwrap();
    std::fs::write(muxer.config_path(), "[listen]\nworkers = \"many\"\n").unwrap();
    let output = muxer.upgrade(None);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(said.contains("exit status: 2"), "{said}");
    assert!(
        muxer.log().contains("workers"),
        "the successor's reason is logged"
    );

    // Nothing changed: same process, the XDP link taken back, sessions and new logins work.
    assert_eq!(muxer.process.pid(), pid);
    muxer.process.assert_running();
    writeln!(session.input, "7").unwrap();
    assert_eq!(session.line(), "alive-7");
    assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
    let pins: Vec<String> = std::fs::read_dir(&pin_dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with("handover-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "handover pins left: {pins:?}");

    // With the config repaired, the upgrade goes through.
    std::fs::write(muxer.config_path(), good).unwrap();
    let output = muxer.upgrade(None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
}

/// Names in the fake systemd's store that start with `prefix`.
fn stored(systemd: &FakeSystemd, prefix: &str) -> usize {
    systemd
        .stored()
        .iter()
        .filter(|name| name.starts_with(prefix))
        .count()
}

fn sessions_survive_sigkill_through_the_descriptor_store(mode: &str, test: &str) {
    if !netns_available(test) {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let mut systemd = FakeSystemd::new();
    let mut muxer = Muxer::start_under(
        &host.link.server,
        &config(mode, &pin_dir),
        READY.parse().unwrap(),
        &mut systemd,
    );
    wait_for("READY=1", Duration::from_secs(10), || {
        systemd
            .states()
            .iter()
            .any(|state| state == "READY=1")
            .then_some(())
    });
    // Two listen addresses, one socket per worker each.
    assert_eq!(stored(&systemd, "listen"), 4, "{:?}", systemd.stored());
    let internal_markers = stored(&systemd, "internal.22.");
    assert_eq!(internal_markers, usize::from(mode != "sk_lookup"));

    let idle: Vec<Session> = (0..5).map(|_| idle_session(&host)).collect();
    wait_for("the sessions in the store", Duration::from_secs(10), || {
        (stored(&systemd, "conn.") == 10).then_some(())
    });

    muxer.process.signal_and_wait(rustix::process::Signal::KILL);
    // Nothing runs: port 22 reaches sshd at once (the internal ports' sockets are not stored).
    let killed = Instant::now();
    wait_for("sshd's banner on port 22", Duration::from_secs(1), || {
        banner(&host).then_some(())
    });
    assert!(killed.elapsed() < Duration::from_secs(1));

    // systemd restarts muxer with the stored descriptors: the idle sessions answer.
    muxer.restart_under(&host.link.server, READY.parse().unwrap(), &mut systemd);
    assert!(
        muxer
            .log()
            .contains("systemd's descriptor store gave back listen_sockets=4 connections=5"),
        "{}",
        muxer.log()
    );
    for (index, session) in idle.into_iter().enumerate() {
        check_idle_session(session, index);
    }
    assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
    // Ended sessions leave the store; the restored internal port was bound again.
    wait_for(
        "the ended sessions out of the store",
        Duration::from_secs(10),
        || (stored(&systemd, "conn.") == 0).then_some(()),
    );
    assert_eq!(stored(&systemd, "internal.22."), internal_markers);
    assert_eq!(stored(&systemd, "listen"), 4);
}

#[test]
fn tc_idle_sessions_survive_sigkill_and_a_restart_with_systemds_descriptor_store() {
    sessions_survive_sigkill_through_the_descriptor_store(
        "tc",
        "tc_idle_sessions_survive_sigkill_and_a_restart_with_systemds_descriptor_store",
    );
}

#[test]
fn sk_lookup_idle_sessions_survive_sigkill_and_a_restart_with_systemds_descriptor_store() {
    sessions_survive_sigkill_through_the_descriptor_store(
        "sk_lookup",
        "sk_lookup_idle_sessions_survive_sigkill_and_a_restart_with_systemds_descriptor_store",
    );
}

#[test]
fn a_systemd_that_stops_reading_its_notify_socket_stalls_no_connection() {
    if !netns_available("a_systemd_that_stops_reading_its_notify_socket_stalls_no_connection") {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let mut systemd = FakeSystemd::new();
    let muxer = Muxer::start_under(
        &host.link.server,
        &config("tc", &pin_dir),
        READY.parse().unwrap(),
        &mut systemd,
    );
    // Its queue holds 10 messages by default; every session adds four (two kept, two removed).
    systemd.set_deaf(true);
    let started = Instant::now();
    for _ in 0..15 {
        assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
    }
    let mut session = idle_session(&host);
    writeln!(session.input, "1").unwrap();
    assert_eq!(session.line(), "alive-1");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "sessions took {:?}",
        started.elapsed()
    );
    // Once systemd reads again, the store catches up: nothing of the ended sessions is left.
    systemd.set_deaf(false);
    drop(session);
    wait_for("the store to catch up", Duration::from_secs(10), || {
        (stored(&systemd, "conn.") == 0).then_some(())
    });
    drop(muxer);
}

#[test]
fn an_upgrade_typed_in_an_ssh_session_keeps_it_and_lets_http_in_flight_finish() {
    if !netns_available(
        "an_upgrade_typed_in_an_ssh_session_keeps_it_and_lets_http_in_flight_finish",
    ) {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let mut muxer = Muxer::start(
        &host.link.server,
        &config("tc", &pin_dir),
        READY.parse().unwrap(),
    );
    // A stream in flight: 60 events, one every 50 ms, through port 22.
    let (mut curl, events) = sse_stream(&host, 60);
    let mut seen = 0;
    while seen < 5 {
        let line = events.recv_timeout(Duration::from_secs(10)).expect("event");
        seen += usize::from(line.starts_with("data: "));
    }
    // An idle keep-alive connection, one request done.
    let mut idle_http = host.link.client.enter(|| {
        std::net::TcpStream::connect(SocketAddr::from((SERVER_V4, 22))).expect("connect")
    });
    idle_http
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: gpu\r\n\r\n")
        .unwrap();
    let mut response = BufReader::new(idle_http.try_clone().unwrap());
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        response.read_line(&mut line).unwrap();
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    std::io::Read::read_exact(&mut response, &mut body).unwrap();

    // The user's own session through port 22 runs the upgrade, then goes on.
    let command = format!(
        "{} upgrade --socket {}; i=0; while [ $i -lt 10 ]; do echo ok-$i; i=$((i+1)); sleep 0.1; done",
        muxer_tests::muxer::binary().display(),
        muxer.socket().display()
    );
    let mut own = Session::open(&host, &command, false);
    let said = own.line();
    let pid: u32 = said
        .strip_prefix("muxer: process ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("muxer upgrade said {said:?}"));
    for index in 0..10 {
        assert_eq!(
            own.line(),
            format!("ok-{index}"),
            "the session that upgraded"
        );
    }

    // The stream finished in the old process, every event there; the idle keep-alive
    // connection was closed between requests.
    let mut rest = 0;
    while let Ok(line) = events.recv_timeout(Duration::from_secs(10)) {
        rest += usize::from(line.starts_with("data: "));
    }
    assert_eq!(seen + rest, 60, "events of the stream in flight");
    assert!(curl.wait().unwrap().success());
    idle_http
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut response, &mut byte).unwrap_or(0),
        0,
        "the idle keep-alive connection is closed"
    );
    muxer.process.succeeded_by(pid, Duration::from_secs(60));
    // New requests and logins reach the new process.
    let models = host.link.client.run_ok(
        "curl",
        &["-sS", "--fail", &format!("http://{SERVER_V4}:22/v1/models")],
    );
    assert!(models.contains("llm"), "{models}");
    assert!(host.ssh(&SERVER_V4.to_string()).through_muxer());
}

/// curl reading `count` SSE events (one every 50 ms) through port 22, and its lines.
fn sse_stream(host: &PublicHost, count: u32) -> (std::process::Child, mpsc::Receiver<String>) {
    let url = format!("http://{SERVER_V4}:22/sse?count={count}");
    muxer_tests::process::sse_curl(&host.link.client, &url, 30, &[])
}

#[test]
fn a_successor_killed_while_the_old_process_drains_leaves_port_22_to_sshd() {
    if !netns_available("a_successor_killed_while_the_old_process_drains_leaves_port_22_to_sshd") {
        return;
    }
    let host = PublicHost::new();
    let (_bpffs, pin_dir) = pins();
    let muxer = Muxer::start(
        &host.link.server,
        &config("tc", &pin_dir),
        READY.parse().unwrap(),
    );
    let old = muxer.process.pid();
    // A stream in flight keeps the old process draining (shutdown_grace) after the handover.
    let (mut curl, events) = sse_stream(&host, 200);
    events
        .recv_timeout(Duration::from_secs(10))
        .expect("a first event");
    let output = std::process::Command::new(muxer_tests::muxer::binary())
        .args(["upgrade", "--socket"])
        .arg(muxer.socket())
        .output()
        .expect("muxer upgrade");
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    let successor: u32 = said
        .strip_prefix("muxer: process ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("muxer upgrade said {said:?}"));
    muxer.wait_for_log("the new process accepts now");
    assert!(
        std::path::Path::new(&format!("/proc/{old}")).exists(),
        "the old process must still be draining for this to mean anything"
    );

    // The successor dies; the old one is still draining its stream. Port 22 must reach sshd.
    let pid = rustix::process::Pid::from_raw(successor as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    let killed = Instant::now();
    wait_for("sshd's banner on port 22", Duration::from_secs(1), || {
        banner(&host).then_some(())
    });
    assert!(killed.elapsed() < Duration::from_secs(1));
    let _ = curl.kill();
    let _ = curl.wait();
}
