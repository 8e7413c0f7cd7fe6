//! `cargo xtask bench`: muxer against the stack it replaces, side by side in one run.
//!
//! Every contender gets fresh client and server namespaces joined by a veth pair, the same
//! backends (nginx with a tiny fixed reply, an iperf3 server, sshd, an SSE server), and the same
//! load (wrk -c32 with one and with two threads against nginx with as many workers, iperf3, an
//! SSE first-byte probe). Runs are interleaved (run 1 of every contender, then run 2, …) so that
//! drift on a noisy machine hits all alike; the report gives medians and ratios. Not a test:
//! nothing here asserts; targets missed are reported.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use muxer_tests::backends::{self, Backend};
use muxer_tests::netns::{Link, Netns, SERVER_V4};
use muxer_tests::process::{cpu_seconds, Running};
use muxer_tests::sshd::Sshd;
use muxer_tests::wait_for;

const NGINX_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;
const SSE_PORT: u16 = 30000;
const ECHO_PORT: u16 = 7000;
const CADDY_PORT: u16 = 8080;
const MUX_PORT: u16 = 2222;
/// Caddy's and HAProxy's own HTTPS ports (muxer serves HTTPS on port 22 itself).
const CADDY_TLS_PORT: u16 = 8443;
const HAPROXY_TLS_PORT: u16 = 8444;

struct Options {
    /// Contenders to measure (`--only a,b`: labels' short names); all by default.
    contenders: Vec<Contender>,
    /// Where the load generator runs (`--lab local|remote`).
    lab: Lab,
    /// wrk threads and nginx workers (`--shape 1|2`).
    shape: u32,
    runs: usize,
    seconds: u32,
    idle_connections: usize,
    /// The hard open-file limit every process here inherits (`None`: unlimited).
    open_file_limit: Option<u64>,
    out: PathBuf,
}

impl Options {
    /// Idle connections to hold for a memory figure: spliced ones are capped by the open-file
    /// limit ([`spliced_capacity`]).
    fn idle_connections_for(&self, figure: Figure) -> usize {
        match figure {
            Figure::IdleSplicedKib => self
                .idle_connections
                .min(spliced_capacity(self.open_file_limit)),
            _ => self.idle_connections,
        }
    }
}

/// The machine's layout during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lab {
    /// Every process floats over both CPUs: client, proxy and backend share them.
    Local,
    /// A remote client, modelled: the load generators on CPU 0 alone, the proxy and the backends
    /// (and everything they start) on CPU 1 — as on a GPU box whose clients are elsewhere.
    Remote,
}

impl Lab {
    fn describe(self) -> &'static str {
        match self {
            Lab::Local => "local lab: load generator, proxy and backends share both CPUs",
            Lab::Remote => {
                "remote-client lab: load generators confined to CPU 0, proxy and backends to CPU 1"
            }
        }
    }
}

/// Confines this process (and so what it starts from now on) to `cpu`, or frees it.
fn confine(cpu: Option<usize>) {
    let mut set = rustix::thread::CpuSet::new();
    match cpu {
        Some(cpu) => set.set(cpu),
        None => {
            let cpus = std::thread::available_parallelism()
                .map_or(2, usize::from)
                .max(2);
            for cpu in 0..cpus {
                set.set(cpu);
            }
        }
    }
    if let Err(error) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("bench: cannot set the CPU affinity: {error}");
    }
}

/// `program args` in the client namespace, on the client's CPU in the remote lab.
fn run_client(link: &Link, lab: Lab, program: &str, args: &[&str]) -> std::process::Output {
    match lab {
        Lab::Local => link.client.run(program, args),
        Lab::Remote => link
            .client
            .run("taskset", &[&["-c", "0", program], args].concat()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Contender {
    Direct,
    Caddy,
    SeedSelect,
    SeedFork,
    Haproxy,
    HaproxyHttp,
    /// HAProxy's HTTP router reached on its own port: no iptables rule in front (the second
    /// harness of #19 measured it so).
    HaproxyHttpDirect,
    MuxerTc,
    MuxerTcSplice,
    MuxerXdp,
    MuxerSkLookup,
    MuxerIptables,
    MuxerDefaultLog,
    /// muxer as the unit runs it (default logging), reached on its own port: no redirect in
    /// front, like [`Contender::HaproxyHttpDirect`].
    MuxerOwnPort,
    MuxerPinned,
    MuxerHashed,
}

impl Contender {
    const ALL: [Contender; 16] = [
        Contender::Direct,
        Contender::Caddy,
        Contender::SeedSelect,
        Contender::SeedFork,
        Contender::Haproxy,
        Contender::HaproxyHttp,
        Contender::HaproxyHttpDirect,
        Contender::MuxerTc,
        Contender::MuxerTcSplice,
        Contender::MuxerXdp,
        Contender::MuxerSkLookup,
        Contender::MuxerIptables,
        Contender::MuxerDefaultLog,
        Contender::MuxerOwnPort,
        Contender::MuxerPinned,
        Contender::MuxerHashed,
    ];

    /// Name for `--only`.
    fn short_name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Caddy => "caddy",
            Contender::SeedSelect => "seed-select",
            Contender::SeedFork => "seed-fork",
            Contender::Haproxy => "haproxy",
            Contender::HaproxyHttp => "haproxy-http",
            Contender::HaproxyHttpDirect => "haproxy-http-direct",
            Contender::MuxerTc => "muxer",
            Contender::MuxerTcSplice => "muxer-splice",
            Contender::MuxerXdp => "muxer-xdp",
            Contender::MuxerSkLookup => "muxer-sk-lookup",
            Contender::MuxerIptables => "muxer-iptables",
            Contender::MuxerDefaultLog => "muxer-default-log",
            Contender::MuxerOwnPort => "muxer-own-port",
            Contender::MuxerPinned => "muxer-pinned",
            Contender::MuxerHashed => "muxer-hashed",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Caddy => "Caddy alone",
            Contender::SeedSelect => "seed: iptables+sslh-select+Caddy",
            Contender::SeedFork => "seed: iptables+sslh-fork+Caddy",
            Contender::Haproxy => "iptables+HAProxy (TCP)",
            Contender::HaproxyHttp => "iptables+HAProxy (HTTP router)",
            Contender::HaproxyHttpDirect => "HAProxy (HTTP router) on its own port",
            Contender::MuxerTc => "muxer (TC redirect)",
            Contender::MuxerTcSplice => "muxer (TC, splice(2) instead of copying)",
            Contender::MuxerXdp => "muxer (XDP redirect)",
            Contender::MuxerSkLookup => "muxer (sk_lookup steering)",
            Contender::MuxerIptables => "muxer off + iptables",
            Contender::MuxerDefaultLog => "muxer (TC, default logging: a line per connection)",
            Contender::MuxerOwnPort => "muxer (default logging) on its own port",
            Contender::MuxerPinned => "muxer (TC, workers pinned)",
            Contender::MuxerHashed => "muxer (TC, workers not pinned, no CPU claims)",
        }
    }

    /// Port clients use for HTTPS, for the contenders that terminate TLS: Caddy and HAProxy
    /// on a port of their own (their best case: no sniffing in front), muxer on port 22.
    fn https_port(self) -> Option<u16> {
        match self {
            Contender::Caddy => Some(CADDY_TLS_PORT),
            Contender::HaproxyHttp | Contender::HaproxyHttpDirect => Some(HAPROXY_TLS_PORT),
            Contender::MuxerTc
            | Contender::MuxerTcSplice
            | Contender::MuxerXdp
            | Contender::MuxerSkLookup
            | Contender::MuxerIptables
            | Contender::MuxerDefaultLog
            | Contender::MuxerPinned
            | Contender::MuxerHashed => Some(22),
            Contender::MuxerOwnPort => Some(MUX_PORT),
            _ => None,
        }
    }

    /// Whether it routes HTTP requests (and sets forwarding headers) rather than passing bytes.
    fn routes_http(self) -> bool {
        !matches!(self, Contender::Direct | Contender::Haproxy)
    }

    /// Port clients use for HTTP, bulk TCP and SSE.
    fn ports(self) -> (u16, Option<u16>, Option<u16>) {
        match self {
            Contender::Direct => (NGINX_PORT, Some(IPERF_PORT), Some(SSE_PORT)),
            Contender::Caddy => (CADDY_PORT, None, Some(CADDY_PORT)),
            Contender::Haproxy => (22, Some(22), None),
            Contender::HaproxyHttpDirect | Contender::MuxerOwnPort => {
                (MUX_PORT, Some(MUX_PORT), Some(MUX_PORT))
            }
            _ => (22, Some(22), Some(22)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    KeepAliveRps,
    KeepAliveP50,
    KeepAliveP99,
    NewConnRps,
    NewConnP50,
    NewConnP99,
    KeepAliveCpuUs,
    NewConnCpuUs,
    HttpsKeepAliveRps,
    HttpsNewConnRps,
    HttpsKeepAliveCpuUs,
    HttpsNewConnCpuUs,
    BulkGbits,
    SseTtfbMs,
    CpuSecondsPerGb,
    IdleSplicedKib,
    IdleHttpKib,
}

impl Figure {
    fn label(self) -> &'static str {
        match self {
            Figure::KeepAliveRps => "HTTP keep-alive, requests/s",
            Figure::KeepAliveP50 => "HTTP keep-alive, p50 latency (ms)",
            Figure::KeepAliveP99 => "HTTP keep-alive, p99 latency (ms)",
            Figure::NewConnRps => "HTTP new connection per request, requests/s",
            Figure::NewConnP50 => "HTTP new connection per request, p50 latency (ms)",
            Figure::NewConnP99 => "HTTP new connection per request, p99 latency (ms)",
            Figure::KeepAliveCpuUs => "HTTP keep-alive, proxy CPU µs per request",
            Figure::NewConnCpuUs => "HTTP new connection per request, proxy CPU µs per request",
            Figure::HttpsKeepAliveRps => "HTTPS keep-alive, requests/s",
            Figure::HttpsNewConnRps => {
                "HTTPS new connection (full handshake) per request, requests/s"
            }
            Figure::HttpsKeepAliveCpuUs => "HTTPS keep-alive, proxy CPU µs per request",
            Figure::HttpsNewConnCpuUs => {
                "HTTPS new connection per request, proxy CPU µs per request"
            }
            Figure::BulkGbits => "bulk TCP via the SSH/fallback route (Gbit/s)",
            Figure::SseTtfbMs => "SSE time to first byte, median (ms)",
            Figure::CpuSecondsPerGb => "proxy CPU seconds per GB forwarded",
            Figure::IdleSplicedKib => "RSS per idle spliced connection (KiB)",
            Figure::IdleHttpKib => "RSS per idle HTTP keep-alive connection (KiB)",
        }
    }

    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::KeepAliveRps
                | Figure::NewConnRps
                | Figure::HttpsKeepAliveRps
                | Figure::HttpsNewConnRps
                | Figure::BulkGbits
        )
    }
}

type Samples = BTreeMap<(Figure, Contender), Vec<f64>>;

/// Idle connections held for the memory figures (the issue's 10 000).
const IDLE_CONNECTIONS: usize = 10_000;

/// Of those, the first ones, opened before the baseline is taken.
const IDLE_WARM_UP: usize = 50;

/// Descriptors a proxy holds besides its connections' (listening sockets, epoll, eventfds, eBPF
/// maps and programs, logs).
const DESCRIPTOR_HEADROOM: u64 = 200;

/// The most idle spliced connections a proxy can hold under the hard open-file limit `limit`:
/// each holds two descriptors there (client and upstream). An HTTP keep-alive connection holds
/// one (upstream connections are pooled), so that figure is not capped. The limit cannot be
/// raised without CAP_SYS_RESOURCE; on the benchmark machine it is 20 000, so 9 900.
fn spliced_capacity(limit: Option<u64>) -> usize {
    limit.map_or(usize::MAX, |limit| {
        usize::try_from(limit.saturating_sub(DESCRIPTOR_HEADROOM) / 2).unwrap_or(usize::MAX)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, address] = args.as_slice() {
        if flag == "--echo-server" {
            echo_server(address.parse().expect("--echo-server ADDRESS"));
            return;
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .windows(2)
        .find(|w| w[0] == "--out")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_else(|| PathBuf::from("target/bench/report.md"));
    let contenders: Vec<Contender> = match args.windows(2).find(|w| w[0] == "--only") {
        Some(w) => w[1]
            .split(',')
            .map(|name| {
                Contender::ALL
                    .into_iter()
                    .find(|c| c.short_name() == name)
                    .unwrap_or_else(|| {
                        let names: Vec<&str> =
                            Contender::ALL.iter().map(|c| c.short_name()).collect();
                        panic!(
                            "--only: unknown contender {name:?}; known: {}",
                            names.join(",")
                        )
                    })
            })
            .collect(),
        // Quick mode leaves out HAProxy's HTTP router, a reference rather than a target, to stay
        // under two minutes.
        None => Contender::ALL
            .into_iter()
            .filter(|&c| {
                !(quick && matches!(c, Contender::HaproxyHttp | Contender::HaproxyHttpDirect))
            })
            .collect(),
    };
    let value_of = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone());
    let lab = match value_of("--lab").as_deref() {
        None | Some("local") => Lab::Local,
        Some("remote") => Lab::Remote,
        Some(other) => panic!("--lab: {other:?} is neither local nor remote"),
    };
    // Both configurations unless one is asked for.
    let shapes: Vec<u32> = value_of("--shape").map_or(vec![1, 2], |n| {
        vec![n
            .parse()
            .ok()
            .filter(|n| (1..=2).contains(n))
            .expect("--shape: 1 or 2")]
    });
    let shape = shapes[0];
    // Interleaved runs per contender (full mode): more narrows the medians when two contenders
    // are close, as one run's ratio moves by ±10 % on these machines.
    let runs: usize = value_of("--runs").map_or(3, |n| {
        n.parse()
            .ok()
            .filter(|&n| n >= 1)
            .expect("--runs: a whole number of runs, at least 1")
    });
    let open_file_limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let options = if quick {
        Options {
            contenders: contenders.clone(),
            lab,
            shape,
            runs: 1,
            seconds: 2,
            idle_connections: 2_000,
            open_file_limit,
            out,
        }
    } else {
        Options {
            contenders,
            lab,
            shape,
            runs,
            seconds: 5,
            idle_connections: IDLE_CONNECTIONS,
            open_file_limit,
            out,
        }
    };
    assert!(
        rustix::process::geteuid().is_root(),
        "the benchmark needs root (network namespaces, iptables, eBPF)"
    );
    raise_fd_limit();
    let started = Instant::now();
    let mut options = options;
    let mut by_shape = Vec::new();
    for (pass, &shape) in shapes.iter().enumerate() {
        options.shape = shape;
        let mut samples = Samples::new();
        for run in 0..options.runs {
            // Each run starts one contender further on, so that no contender is always measured
            // first (or last) in a run while the machine's speed drifts.
            let count = options.contenders.len();
            let order = options.contenders.iter().cycle().skip(run % count.max(1));
            for &contender in order.take(count) {
                eprintln!(
                    "bench: shape {shape}, run {}/{} — {}",
                    run + 1,
                    options.runs,
                    contender.label()
                );
                measure(contender, &options, &mut samples);
                confine(None);
            }
        }
        // Memory per idle connection does not depend on the load's shape: measured once.
        if pass + 1 == shapes.len() {
            eprintln!("bench: idle-connection memory");
            for contender in [
                Contender::MuxerTc,
                Contender::Haproxy,
                Contender::HaproxyHttp,
                Contender::SeedSelect,
            ]
            .into_iter()
            .filter(|c| options.contenders.contains(c))
            {
                for figure in [Figure::IdleSplicedKib, Figure::IdleHttpKib] {
                    idle_memory(contender, figure, &options, &mut samples);
                }
            }
        }
        by_shape.push((shape, samples));
    }
    let elapsed = started.elapsed();
    let mut report_text = haproxy_targets(&by_shape, &options);
    for (shape, samples) in &by_shape {
        options.shape = *shape;
        report_text.push_str(&report(samples, &options, elapsed, quick));
    }
    let report = report_text;
    if let Some(dir) = options.out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&options.out, &report).unwrap();
    println!("{report}");
    eprintln!("bench: report written to {}", options.out.display());
}

/// Why the spliced figure holds fewer connections than asked, if it does.
fn spliced_cap_note(options: &Options) -> String {
    match options.open_file_limit {
        Some(limit)
            if options.idle_connections_for(Figure::IdleSplicedKib) < options.idle_connections =>
        {
            format!(
                " (spliced: capped by this machine's hard open-file limit of {limit}, which needs CAP_SYS_RESOURCE to raise; a spliced connection takes two descriptors in the proxy)"
            )
        }
        _ => String::new(),
    }
}

/// Soft limit up to the hard one (raising the hard one needs CAP_SYS_RESOURCE).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

/// A TCP echo server in its own process (the benchmark process holds the client sockets, and
/// one process cannot hold both ends of 10 000 connections under a 20 000-descriptor limit).
fn echo_server(address: SocketAddr) {
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// What every contender's server namespace runs.
struct Backends {
    _nginx: Running,
    _iperf: Running,
    _sshd: Sshd,
    _sse: Backend,
    dir: tempfile::TempDir,
}

fn sysctl(netns: &Netns, settings: &[&str]) {
    for setting in settings {
        netns.run_ok("sysctl", &["-qw", setting]);
    }
}

fn wait_port(netns: &Netns, port: u16) {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(&format!("port {port}"), Duration::from_secs(10), || {
        netns.enter(|| TcpStream::connect(address).ok()).map(drop)
    });
}

fn backends(link: &Link, nginx_workers: u32) -> Backends {
    // The wide ephemeral range holds the listening ports: a probe's source port once took
    // 30000 (TIME_WAIT after sshd's wait_port) just before the SSE backend bound it.
    let reserved = format!(
        "net.ipv4.ip_local_reserved_ports={MUX_PORT},{IPERF_PORT},{ECHO_PORT},{CADDY_PORT},\
         {NGINX_PORT},{CADDY_TLS_PORT},{HAPROXY_TLS_PORT},{SSE_PORT}"
    );
    for netns in [&link.client, &link.server] {
        sysctl(
            netns,
            &[
                "net.ipv4.ip_local_port_range=1024 65000",
                &reserved,
                "net.ipv4.tcp_tw_reuse=1",
                "net.core.somaxconn=65535",
            ],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let nginx_conf = dir.path().join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "daemon off; worker_processes {nginx_workers}; worker_rlimit_nofile 100000; pid {dir}/nginx.pid; error_log {dir}/nginx-error.log;\n\
             events {{ worker_connections 40000; }}\n\
             http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;\n\
               server {{ listen 0.0.0.0:{NGINX_PORT} backlog=65535; location / {{ return 200 \"ok\\n\"; }}\n\
                 location = /forwarded {{ return 200 \"{FORWARDED_ECHO}\\n\"; }} }} }}\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let mut command = link.server.command("nginx");
    command.arg("-c").arg(&nginx_conf);
    let nginx = Running::spawn("nginx", command, dir.path().join("nginx.log"));
    let mut command = link.server.command("iperf3");
    command.args(["-s", "-p", &IPERF_PORT.to_string()]);
    let iperf = Running::spawn("iperf3", command, dir.path().join("iperf3.log"));
    let sshd = Sshd::start(&link.server, &["127.0.0.1:22", "0.0.0.0:22"]);
    let sse = backends::http(
        &link.server,
        SocketAddr::from(([0, 0, 0, 0], SSE_PORT)),
        "sse",
    );
    wait_port(&link.server, NGINX_PORT);
    wait_port(&link.server, IPERF_PORT);
    Backends {
        _nginx: nginx,
        _iperf: iperf,
        _sshd: sshd,
        _sse: sse,
        dir,
    }
}

fn iptables_redirect(netns: &Netns) {
    netns.run_ok(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "22",
            "-j",
            "REDIRECT",
            "--to-port",
            &MUX_PORT.to_string(),
        ],
    );
}

fn caddy(link: &Link, dir: &Path, listen: &str) -> Running {
    let caddyfile = dir.join("Caddyfile");
    // The seed's Caddyfile, plus the SSE route the benchmark measures.
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n  admin off\n  auto_https off\n}}\n:{CADDY_PORT} {{\n  bind {listen}\n  handle_path /embedding-model/* {{\n    reverse_proxy 127.0.0.1:30001\n  }}\n  handle /sse {{\n    reverse_proxy 127.0.0.1:{SSE_PORT}\n  }}\n  handle {{\n    reverse_proxy 127.0.0.1:{NGINX_PORT}\n  }}\n}}\n\
             https://:{CADDY_TLS_PORT} {{\n  bind {listen}\n  tls {cert} {key}\n  reverse_proxy 127.0.0.1:{NGINX_PORT}\n}}\n",
            cert = dir.join("cert.pem").display(),
            key = dir.join("key.pem").display(),
        ),
    )
    .unwrap();
    let mut command = link.server.command("caddy");
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir);
    let caddy = Running::spawn("caddy", command, dir.join("caddy.log"));
    wait_port(&link.server, CADDY_PORT);
    caddy
}

/// The forwarding headers muxer's HTTP router (and Caddy's `reverse_proxy`) set on every request,
/// as HAProxy rules: the client's address replacing any a client sent (muxer trusts no client's
/// own `X-Forwarded-For`, and replaces its `Forwarded` or `X-Real-IP`, unless configured to),
/// the scheme, and the Host the client asked for. HAProxy sets none by default: without them the
/// backend behind it parsed 87 fewer bytes a request than behind muxer, so HAProxy's HTTP router
/// did less work than the proxies it is compared with; and a user who needs the client's address
/// (for logs, rate limits) writes these lines.
const HAPROXY_FORWARDING: &str = concat!(
    "  http-request set-header forwarded for=%[src] if { req.hdr(forwarded) -m found }\n",
    "  http-request set-header x-real-ip %[src] if { req.hdr(x-real-ip) -m found }\n",
    "  http-request set-header x-forwarded-for %[src]\n",
    "  http-request set-header x-forwarded-proto https if { ssl_fc }\n",
    "  http-request set-header x-forwarded-proto http unless { ssl_fc }\n",
    "  http-request set-header x-forwarded-host %[req.hdr(host)] if { req.hdr(host) -m found }\n",
);

/// HAProxy on the multiplexer port, sniffing like sslh (SSH by its banner, HTTP, anything else to
/// the fallback). `http`: HTTP goes to `mode http` backends that parse every request, route `/sse`
/// by path and reuse upstream connections — the job muxer's router does; otherwise HTTP is spliced
/// as TCP.
fn haproxy_config(http: bool, fallback_port: u16, dir: &Path) -> String {
    let (sse_rule, http_mode, sse_mode) = if http {
        let http_mode = format!("  mode http\n  http-reuse always\n{HAPROXY_FORWARDING}");
        // http-no-delay: forward each event at once, as SSE needs (HAProxy otherwise holds
        // small writes back and the first event arrives ~200 ms late).
        let sse_mode = format!("{http_mode}  option http-no-delay\n");
        (
            "  use_backend sse if HTTP { path_beg /sse }\n",
            http_mode,
            sse_mode,
        )
    } else {
        ("", "  mode tcp\n".to_owned(), "  mode tcp\n".to_owned())
    };
    // The HTTP router also serves HTTPS, on a port of its own, with the same certificate as
    // the others.
    let https = if http {
        format!(
            "frontend https\n  mode http\n  bind 0.0.0.0:{HAPROXY_TLS_PORT} ssl crt {} alpn h2,http/1.1\n\
               default_backend http\n",
            dir.join("combined.pem").display()
        )
    } else {
        String::new()
    };
    format!(
        "global\n  maxconn 9950\n\
         defaults\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  maxconn 9950\n\
         frontend mux\n  mode tcp\n  bind 0.0.0.0:{MUX_PORT}\n  tcp-request inspect-delay 2s\n\
           acl ssh req.payload(0,4) -m bin 5353482d\n\
           tcp-request content accept if ssh\n  tcp-request content accept if HTTP\n\
           tcp-request content accept if {{ req.len gt 0 }}\n\
           use_backend ssh if ssh\n{sse_rule}  use_backend http if HTTP\n  default_backend other\n\
         backend ssh\n  mode tcp\n  server s 127.0.0.1:22\n\
         backend http\n{http_mode}  server h 127.0.0.1:{NGINX_PORT}\n\
         backend sse\n{sse_mode}  server e 127.0.0.1:{SSE_PORT}\n\
         backend other\n  mode tcp\n  server o 127.0.0.1:{fallback_port}\n{https}"
    )
}

fn muxer_config(mode: &str, fallback_port: u16, method: &str, dir: &Path) -> String {
    // "pinned": copying, each worker on a CPU of its own; "hashed": copying, and the workers
    // claim no CPU (the kernel spreads connections by hash alone).
    let (method, pin, claim) = match method {
        "pinned" => ("copy", true, true),
        "hashed" => ("copy", false, false),
        other => (other, false, true),
    };
    format!(
        "[listen]\naddresses = [\"0.0.0.0:{MUX_PORT}\"]\npin_workers = {pin}\ncpu_steering = {claim}\n\
         [splice]\nmethod = \"{method}\"\n\
         [redirect]\nmode = \"{mode}\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         [limits]\nmax_connections = 200000\nmax_connections_per_source = 200000\n\
         max_sniffing_per_source = 200000\nssh_startups_per_source = 200000\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [fallback]\nupstream = \"127.0.0.1:{fallback_port}\"\n\
         [http]\n\
         [[http.route]]\npath = \"/sse\"\nupstreams = [\"127.0.0.1:{SSE_PORT}\"]\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:{NGINX_PORT}\"]\n\
         [[tls.route]]\nsni = \"bench\"\nterminate = true\ndefault = true\n\
         cert = \"{cert}\"\nkey = \"{key}\"\n",
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
    )
}

/// muxer in `mode`; `log` is its `RUST_LOG` unless `MUXER_BENCH_LOG` says otherwise.
fn muxer(
    link: &Link,
    dir: &Path,
    (mode, method): (&str, &str),
    fallback_port: u16,
    log: &str,
) -> Running {
    let config = dir.join("muxer.toml");
    let socket = dir.join("muxer.sock");
    std::fs::write(
        &config,
        format!(
            "{}\n[control]\nsocket = \"{}\"\n",
            muxer_config(mode, fallback_port, method, dir),
            socket.display()
        ),
    )
    .unwrap();
    let mut command = link
        .server
        .command(&muxer_tests::muxer::binary().display().to_string());
    command
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG");
    // Only warnings, as the other contenders log no requests, except for the contender that
    // measures the default logging (`log` empty: no RUST_LOG, as the unit runs it);
    // MUXER_BENCH_LOG overrides, for debugging.
    match std::env::var("MUXER_BENCH_LOG") {
        Ok(level) => {
            command.env("RUST_LOG", level);
        }
        Err(_) if !log.is_empty() => {
            command.env("RUST_LOG", log);
        }
        Err(_) => {}
    }
    let mut process = Running::spawn("muxer", command, dir.join("muxer.log"));
    wait_for("muxer", Duration::from_secs(10), || {
        process.assert_running();
        socket.exists().then_some(())
    });
    wait_port(&link.server, MUX_PORT);
    process
}

/// Starts the contender's proxy processes; returns them (the first is the one whose CPU counts).
fn start(
    contender: Contender,
    link: &Link,
    backends: &Backends,
    fallback_port: u16,
) -> Vec<Running> {
    let dir = backends.dir.path();
    tls_identity(dir);
    let sslh = |binary: &str| {
        let mut command = link.server.command(binary);
        command.args(["-f", "-n", "-p", &format!("0.0.0.0:{MUX_PORT}")]);
        command.args([
            "--ssh",
            "127.0.0.1:22",
            "--http",
            &format!("127.0.0.1:{CADDY_PORT}"),
        ]);
        command.args(["--anyprot", &format!("127.0.0.1:{fallback_port}")]);
        let process = Running::spawn(binary, command, dir.join("sslh.log"));
        wait_port(&link.server, MUX_PORT);
        process
    };
    match contender {
        Contender::Direct => Vec::new(),
        Contender::Caddy => vec![caddy(link, dir, "0.0.0.0")],
        Contender::SeedSelect | Contender::SeedFork => {
            iptables_redirect(&link.server);
            let caddy = caddy(link, dir, "127.0.0.1");
            let binary = if contender == Contender::SeedSelect {
                "sslh-select"
            } else {
                "sslh"
            };
            vec![sslh(binary), caddy]
        }
        Contender::Haproxy | Contender::HaproxyHttp | Contender::HaproxyHttpDirect => {
            if contender != Contender::HaproxyHttpDirect {
                iptables_redirect(&link.server);
            }
            let config = dir.join("haproxy.cfg");
            let http = contender != Contender::Haproxy;
            std::fs::write(&config, haproxy_config(http, fallback_port, dir)).unwrap();
            let mut command = link.server.command("haproxy");
            command.arg("-db").arg("-f").arg(&config);
            let process = Running::spawn("haproxy", command, dir.join("haproxy.log"));
            wait_port(&link.server, MUX_PORT);
            vec![process]
        }
        Contender::MuxerTc => vec![muxer(link, dir, ("tc", "copy"), fallback_port, "warn")],
        Contender::MuxerTcSplice => {
            vec![muxer(link, dir, ("tc", "splice"), fallback_port, "warn")]
        }
        Contender::MuxerXdp => vec![muxer(link, dir, ("xdp", "copy"), fallback_port, "warn")],
        Contender::MuxerSkLookup => {
            vec![muxer(
                link,
                dir,
                ("sk_lookup", "copy"),
                fallback_port,
                "warn",
            )]
        }
        Contender::MuxerDefaultLog => vec![muxer(link, dir, ("tc", "copy"), fallback_port, "")],
        Contender::MuxerOwnPort => vec![muxer(link, dir, ("off", "copy"), fallback_port, "")],
        Contender::MuxerPinned => {
            vec![muxer(link, dir, ("tc", "pinned"), fallback_port, "warn")]
        }
        Contender::MuxerHashed => {
            vec![muxer(link, dir, ("tc", "hashed"), fallback_port, "warn")]
        }
        Contender::MuxerIptables => {
            iptables_redirect(&link.server);
            vec![muxer(link, dir, ("off", "copy"), fallback_port, "warn")]
        }
    }
}

/// One ECDSA P-256 certificate for every contender that terminates TLS: `cert.pem`, `key.pem`,
/// and both in `combined.pem` (HAProxy's format).
fn tls_identity(dir: &Path) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["bench".to_owned(), SERVER_V4.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap().pem();
    let key = key.serialize_pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), &key).unwrap();
    std::fs::write(dir.join("combined.pem"), format!("{cert}{key}")).unwrap();
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (`/proc/stat`).
fn machine_cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Waits, for at most [`SETTLE_LIMIT`], until the machine is at least 90 % idle over a quarter
/// second, so that work one contender leaves behind does not land in the next one's figures:
/// tearing its namespaces down leaves the kernel tens of thousands of TIME_WAIT sockets and
/// conntrack entries to free in the background. (Here the machine has so far always been quiet
/// within the first quarter second; the bulk figure's run-to-run spread has other causes.)
fn settle() {
    let started = Instant::now();
    while started.elapsed() < SETTLE_LIMIT {
        let (busy_before, total_before) = machine_cpu_ticks();
        std::thread::sleep(Duration::from_millis(250));
        let (busy, total) = machine_cpu_ticks();
        if (busy - busy_before) * 10 <= (total - total_before).max(1) {
            break;
        }
    }
    if started.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "bench: waited {:.1} s for the machine to settle",
            started.elapsed().as_secs_f64()
        );
    }
}

/// The longest [`settle`] waits.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// The anonymous part of `pid`'s resident memory (heap, stacks, anonymous mappings): what
/// connections cost. Not all of VmRSS: its file-backed part is the program's code and data pages,
/// which grow as code runs for the first time, whatever the number of connections (0.6 MB while
/// 10 000 HTTP connections were opened against muxer by hand: 0.06 KiB of noise per connection).
fn rss_kib(pid: u32) -> f64 {
    muxer_tests::process::status_kib(pid, "RssAnon").unwrap_or(0) as f64
}

fn parse_duration_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// A connection from the client namespace to the server's `port`; `timeout` bounds the connect
/// and every read.
fn client_connect(link: &Link, port: u16, timeout: Duration) -> Option<TcpStream> {
    let stream = link
        .client
        .enter(|| TcpStream::connect_timeout(&SocketAddr::from((SERVER_V4, port)), timeout))
        .ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    Some(stream)
}

/// Waits until an HTTP request from the client namespace to `port` gets an HTTP answer: a proxy
/// may listen (and its control socket exist) before its redirect of port 22 is in place, and until
/// then port 22 is sshd's.
fn wait_for_http(link: &Link, port: u16) {
    wait_for(
        &format!("HTTP through port {port}"),
        Duration::from_secs(20),
        || http_get(link, port, "/").filter(|answer| answer.starts_with("HTTP/")),
    );
}

/// The whole answer to one `GET path` (Host `bench`, `Connection: close`) from the client
/// namespace to `port`, if the connection opened and closed within the timeouts.
fn http_get(link: &Link, port: u16, path: &str) -> Option<String> {
    let mut stream = client_connect(link, port, Duration::from_secs(2))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// What the backend's `/forwarded` answers: the forwarding headers it received, `|`-separated
/// (nginx variables; a missing header is empty).
const FORWARDED_ECHO: &str = "$http_x_forwarded_for|$http_x_forwarded_proto|$http_x_forwarded_host";

/// Whether the backend behind `contender` receives the client's address, the scheme and the
/// original Host, as behind muxer: every HTTP router in the comparison then does the same work
/// for each request, and the backend parses the same bytes behind each. Panics when not, before
/// any load: such a run would compare unequal work.
fn check_forwarding_headers(link: &Link, port: u16, contender: Contender) {
    let answer = http_get(link, port, "/forwarded").unwrap_or_default();
    let body = answer.rsplit("\r\n\r\n").next().unwrap_or("").trim();
    let fields: Vec<&str> = body.split('|').collect();
    assert!(
        matches!(fields.as_slice(), [client, "http", "bench"] if !client.is_empty()),
        "bench: behind {}, the backend saw X-Forwarded-For|-Proto|-Host = {body:?}, not the \
         client's address, http and bench",
        contender.short_name()
    );
}

/// `(requests/s, p50 ms, p99 ms, whether wrk reported errors)` from wrk.
fn wrk(link: &Link, url: &str, options: &Options, close: bool) -> Option<(f64, f64, f64, bool)> {
    let duration = format!("{}s", options.seconds);
    let threads = format!("-t{}", options.shape);
    let mut args = vec![threads.as_str(), "-c32", "-d", &duration, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let output = run_client(link, options.lab, "wrk", &args);
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let percentile = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| parse_duration_ms(v.trim()))
    };
    let errors = text.contains("Non-2xx") || text.contains("Socket errors");
    if errors {
        eprintln!("bench: wrk reported errors on {url}:\n{text}");
    }
    Some((rps, percentile("50%")?, percentile("99%")?, errors))
}

/// `(Gbit/s, bytes)` from iperf3.
fn iperf(link: &Link, port: u16, options: &Options) -> Option<(f64, f64)> {
    let seconds = options.seconds;
    let output = run_client(
        link,
        options.lab,
        "iperf3",
        &[
            "-c",
            &SERVER_V4.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let received = &json["end"]["sum_received"];
    Some((
        received["bits_per_second"].as_f64()? / 1e9,
        received["bytes"].as_f64()?,
    ))
}

/// Median time (ms) from starting to connect to the first SSE event byte.
fn sse_ttfb(link: &Link, port: u16) -> Option<f64> {
    let mut times = Vec::new();
    for _ in 0..25 {
        let started = Instant::now();
        let mut stream = client_connect(link, port, Duration::from_secs(5))?;
        stream.set_nodelay(true).ok()?;
        stream
            .write_all(b"GET /sse HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            .ok()?;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !seen.windows(5).any(|w| w == b"data:") {
            let n = stream.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Some(median(&mut times))
}

/// The median of `contender`'s samples of `figure`, if it has any.
fn median_of(samples: &Samples, figure: Figure, contender: Contender) -> Option<f64> {
    samples
        .get(&(figure, contender))
        .map(|v| median(&mut v.clone()))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn measure(contender: Contender, options: &Options, samples: &mut Samples) {
    settle();
    let link = Link::new();
    // In the remote lab, everything started from here to the client's loads is on CPU 1.
    if options.lab == Lab::Remote {
        confine(Some(1));
    }
    let backends = backends(&link, options.shape);
    let processes = start(contender, &link, &backends, IPERF_PORT);
    if options.lab == Lab::Remote {
        confine(Some(0));
    }
    let (http_port, bulk_port, sse_port) = contender.ports();
    wait_for_http(&link, http_port);
    if contender.routes_http() {
        check_forwarding_headers(&link, http_port, contender);
    }
    let mut add =
        |figure: Figure, value: f64| samples.entry((figure, contender)).or_default().push(value);
    let show_log_on_errors = |errors: bool| {
        if let (true, Some(proxy)) = (errors, processes.first()) {
            let log = proxy.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("bench: the proxy's last log lines:");
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
        }
    };
    // The proxy's own CPU time (its threads and reaped children, from /proc) per request.
    let proxy_cpu = || processes.first().map(|proxy| cpu_seconds(proxy.pid()));
    let per_request = |before: Option<f64>, rps: f64| {
        let spent = proxy_cpu()? - before?;
        (rps > 0.0).then(|| spent * 1e6 / (rps * f64::from(options.seconds)))
    };
    let http_url = format!("http://{SERVER_V4}:{http_port}/");
    let before = proxy_cpu();
    if let Some((rps, p50, p99, errors)) = wrk(&link, &http_url, options, false) {
        show_log_on_errors(errors);
        add(Figure::KeepAliveRps, rps);
        add(Figure::KeepAliveP50, p50);
        add(Figure::KeepAliveP99, p99);
        if let Some(us) = per_request(before, rps) {
            add(Figure::KeepAliveCpuUs, us);
        }
    }
    let before = proxy_cpu();
    if let Some((rps, p50, p99, errors)) = wrk(&link, &http_url, options, true) {
        show_log_on_errors(errors);
        add(Figure::NewConnRps, rps);
        add(Figure::NewConnP50, p50);
        add(Figure::NewConnP99, p99);
        if let Some(us) = per_request(before, rps) {
            add(Figure::NewConnCpuUs, us);
        }
    }
    if let Some(port) = contender.https_port() {
        let https_url = format!("https://{SERVER_V4}:{port}/");
        for (close, rps_figure, cpu_figure) in [
            (
                false,
                Figure::HttpsKeepAliveRps,
                Figure::HttpsKeepAliveCpuUs,
            ),
            (true, Figure::HttpsNewConnRps, Figure::HttpsNewConnCpuUs),
        ] {
            let before = proxy_cpu();
            if let Some((rps, _, _, errors)) = wrk(&link, &https_url, options, close) {
                show_log_on_errors(errors);
                add(rps_figure, rps);
                if let Some(us) = per_request(before, rps) {
                    add(cpu_figure, us);
                }
            }
        }
    }
    if let Some(port) = bulk_port {
        let cpu_before: f64 = processes.first().map_or(0.0, |p| cpu_seconds(p.pid()));
        if let Some((gbits, bytes)) = iperf(&link, port, options) {
            add(Figure::BulkGbits, gbits);
            if let Some(proxy) = processes.first() {
                add(
                    Figure::CpuSecondsPerGb,
                    (cpu_seconds(proxy.pid()) - cpu_before) / (bytes / 1e9),
                );
            }
        }
    }
    if let Some(port) = sse_port {
        if let Some(ms) = sse_ttfb(&link, port) {
            add(Figure::SseTtfbMs, ms);
        }
    }
    stop(processes);
}

/// Stops the contender's processes with SIGTERM (killed if still there after a few seconds): an
/// instrumented muxer (`cargo xtask pgo`) writes its profile only on a clean exit.
fn stop(processes: Vec<Running>) {
    for mut process in processes {
        process.stop(rustix::process::Signal::TERM, Duration::from_secs(10));
    }
}

/// Anonymous RSS growth per connection with `options.idle_connections` idle connections open (at most
/// [`spliced_capacity`] spliced ones), each having carried one exchange: spliced
/// (junk → fallback → an echo server) and HTTP keep-alive.
fn idle_memory(contender: Contender, figure: Figure, options: &Options, samples: &mut Samples) {
    settle();
    let link = Link::new();
    let backends = backends(&link, options.shape);
    let mut command = link
        .server
        .command(&std::env::current_exe().unwrap().display().to_string());
    command.args(["--echo-server", &format!("127.0.0.1:{ECHO_PORT}")]);
    let _echo = Running::spawn("echo server", command, backends.dir.path().join("echo.log"));
    wait_port(&link.server, ECHO_PORT);
    let processes = start(contender, &link, &backends, ECHO_PORT);
    if processes.is_empty() {
        return;
    }
    wait_for_http(&link, 22);
    // Every process of the contender counts (the seed stack is sslh and Caddy).
    let rss = || processes.iter().map(|p| rss_kib(p.pid())).sum::<f64>();
    let wanted = options.idle_connections_for(figure);
    let mut open = |request: &[u8], expect: &[u8]| {
        let mut held = Vec::with_capacity(wanted);
        let exchange = || -> Option<TcpStream> {
            let mut stream = client_connect(&link, 22, Duration::from_secs(3))?;
            stream.write_all(request).ok()?;
            let mut reply = vec![0u8; expect.len()];
            stream.read_exact(&mut reply).ok()?;
            (reply == expect).then_some(stream)
        };
        // The first connections are not counted: they pay for one-off set-up (pools, the
        // allocator's first pages) that the rest do not.
        let mut before = None;
        while held.len() < wanted {
            if held.len() == IDLE_WARM_UP {
                std::thread::sleep(Duration::from_millis(300));
                before = Some(rss());
            }
            match exchange() {
                Some(stream) => held.push(stream),
                None => break,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = rss();
        if held.len() < wanted {
            notes_push(format!(
                "{}: {} refused or failed connection {} of {}.",
                figure.label(),
                contender.label(),
                held.len() + 1,
                wanted
            ));
        }
        if let Some(before) = before.filter(|_| held.len() > IDLE_WARM_UP) {
            samples
                .entry((figure, contender))
                .or_default()
                .push((after - before) / (held.len() - IDLE_WARM_UP) as f64);
        }
        drop(held);
    };
    // Each figure in a fresh instance, so memory freed by one does not hide the other's growth.
    if figure == Figure::IdleSplicedKib {
        open(b"hello, idle\n", b"hello, idle\n");
    } else {
        open(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n", b"HTTP/1.1 200");
    }
    stop(processes);
}

static NOTES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn notes_push(note: String) {
    eprintln!("bench: {note}");
    NOTES.lock().unwrap().push(note);
}

fn version(command: &str, args: &[&str]) -> String {
    Command::new(command)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// The report's opening: muxer at its default log level against HAProxy's HTTP router (default
/// threads) behind iptables and, when measured, on its own port, for every load shape measured,
/// as ratios from this run.
fn haproxy_targets(by_shape: &[(u32, Samples)], options: &Options) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("# muxer benchmark\n\n## Against HAProxy's HTTP router\n\n");
    let muxer = if options.contenders.contains(&Contender::MuxerDefaultLog) {
        Contender::MuxerDefaultLog
    } else {
        Contender::MuxerTc
    };
    let _ = writeln!(
        out,
        "{} against HAProxy's HTTP router with its default thread count (one per CPU), from the same run: behind the iptables rule a one-port host needs (`iptables+HAProxy`) and, when measured, reached on its own port with nothing in front (`own port`; last, with muxer on its own port as well). CPU is the proxy's own, read from /proc. Each ratio is the median of the runs' own ratios (both measured in the same run, minutes apart), their range in brackets. Ratios of CPU per request: lower is better.\n",
        // A run of only the own-port contenders names the muxer it measured.
        [muxer, Contender::MuxerOwnPort]
            .into_iter()
            .find(|contender| options.contenders.contains(contender))
            .unwrap_or(muxer)
            .label()
    );
    let _ = writeln!(
        out,
        "| target | against | shape | measured | met |\n|---|---|---|---|---|"
    );
    // Which muxer against which HAProxy; a pair is left out unless both were measured, but
    // the first always has its rows.
    let pairs = [
        (muxer, Contender::HaproxyHttp, "iptables+HAProxy"),
        (muxer, Contender::HaproxyHttpDirect, "HAProxy, own port"),
        (
            Contender::MuxerOwnPort,
            Contender::HaproxyHttpDirect,
            "HAProxy, own port; muxer on its own port too",
        ),
    ];
    let targets = [
        (
            "CPU per keep-alive request ≤ 0.8 × HAProxy's",
            Figure::KeepAliveCpuUs,
            0.8,
            false,
        ),
        (
            "CPU per new-connection request ≤ 0.8 × HAProxy's",
            Figure::NewConnCpuUs,
            0.8,
            false,
        ),
        (
            "keep-alive requests/s ≥ 1.2 × HAProxy's",
            Figure::KeepAliveRps,
            1.2,
            true,
        ),
        (
            "new-connection requests/s ≥ 1.2 × HAProxy's",
            Figure::NewConnRps,
            1.2,
            true,
        ),
    ];
    for (shape, samples) in by_shape {
        let mut row = |name: &str, against: &str, measured: Option<PairedRatio>, goal, at_least| {
            let _ = writeln!(
                out,
                "| {name} | {against} | wrk -t{shape} | {} | {} |",
                measured.map_or("not measured".into(), |r| r.to_string()),
                verdict(measured.map(|r| r.median), goal, at_least)
            );
        };
        for (name, figure, goal, at_least) in targets {
            for (index, (ours, router, against)) in pairs.into_iter().enumerate() {
                let measured_both = [ours, router]
                    .iter()
                    .all(|contender| options.contenders.contains(contender));
                if index == 0 || measured_both {
                    let measured = paired_ratio(samples, figure, ours, router);
                    row(name, against, measured, goal, at_least);
                }
            }
        }
        let bulk = paired_ratio(samples, Figure::BulkGbits, muxer, Contender::Direct);
        row("bulk TCP ≥ 0.95 × direct", "direct", bulk, 0.95, true);
    }
    // Measured once, in the last pass.
    if let Some(kib) = by_shape
        .iter()
        .find_map(|(_, samples)| median_of(samples, Figure::IdleHttpKib, Contender::MuxerTc))
    {
        let _ = writeln!(
            out,
            "| ≤ 1.1 KiB per idle HTTP keep-alive connection | – | – | {kib:.2} KiB | {} |",
            verdict(Some(kib), 1.1, false)
        );
    }
    out
}

/// One contender's figure over another's, from the same run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PairedRatio {
    /// The median of the runs' ratios.
    median: f64,
    /// The lowest and highest of them.
    range: (f64, f64),
}

impl std::fmt::Display for PairedRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (low, high) = self.range;
        if low == high {
            write!(f, "{:.2}×", self.median)
        } else {
            write!(f, "{:.2}× ({low:.2}–{high:.2})", self.median)
        }
    }
}

/// `a`'s `figure` over `b`'s, run by run: the two were measured minutes apart in each run, while
/// this machine's speed drifts by more than the differences measured over the tens of minutes
/// of a full run. The median of the per-run ratios, with their range; when a run is missing a
/// sample of either, the ratio of the medians (no range).
fn paired_ratio(
    samples: &Samples,
    figure: Figure,
    a: Contender,
    b: Contender,
) -> Option<PairedRatio> {
    let (ours, theirs) = (samples.get(&(figure, a))?, samples.get(&(figure, b))?);
    let paired =
        !ours.is_empty() && ours.len() == theirs.len() && theirs.iter().all(|&value| value != 0.0);
    if !paired {
        let ratio = median_of(samples, figure, a)? / median_of(samples, figure, b)?;
        return ratio.is_finite().then_some(PairedRatio {
            median: ratio,
            range: (ratio, ratio),
        });
    }
    let mut ratios: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
    let median = median(&mut ratios);
    Some(PairedRatio {
        median,
        range: (ratios[0], ratios[ratios.len() - 1]),
    })
}

/// "yes", or by how much `measured` misses `goal`.
fn verdict(measured: Option<f64>, goal: f64, at_least: bool) -> String {
    match measured {
        Some(m) if (at_least && m >= goal) || (!at_least && m <= goal) => "yes".into(),
        Some(m) if at_least => format!("**no**: {:.0} % short", (1.0 - m / goal) * 100.0),
        Some(m) => format!("**no**: {:.0} % over", (m / goal - 1.0) * 100.0),
        None => "**no**".into(),
    }
}

fn report(samples: &Samples, options: &Options, elapsed: Duration, quick: bool) -> String {
    use std::fmt::Write as _;
    let value = |figure: Figure, contender: Contender| median_of(samples, figure, contender);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n# wrk -t{shape}, nginx with {shape} worker(s)\n",
        shape = options.shape
    );
    let _ = writeln!(
        out,
        "{} run(s) per contender ({}), {} s per load, medians shown; each contender starts once the machine is 90 % idle. Client and server are network namespaces joined by a veth pair on one machine ({}); wrk -t{shape} -c32 against nginx ({shape} worker(s)) returning a 3-byte body; iperf3 single stream; {} idle HTTP keep-alive and {} idle spliced connections for memory (anonymous RSS: heap and stacks, not code pages){}. Generated by `cargo xtask bench{}` in {:.0} s.\n",
        options.runs,
        if options.runs > 1 { "interleaved" } else { "quick mode" },
        options.seconds,
        options.lab.describe(),
        options.idle_connections_for(Figure::IdleHttpKib),
        options.idle_connections_for(Figure::IdleSplicedKib),
        spliced_cap_note(options),
        if quick { " --quick" } else { "" },
        elapsed.as_secs_f64(),
        shape = options.shape,
    );
    let _ = writeln!(
        out,
        "Machine: {} cores, kernel {}; {}; {}; Caddy {}; {}; {}; {}; {}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        version("uname", &["-r"]),
        version(
            &muxer_tests::muxer::binary().display().to_string(),
            &["--version"]
        ),
        version("sslh-select", &["-V"]),
        version("caddy", &["version"]),
        version("haproxy", &["-v"]),
        version("nginx", &["-v"]),
        version("wrk", &["-v"]),
        version("iperf3", &["--version"]),
    );
    let _ = write!(out, "| figure |");
    for contender in &options.contenders {
        let _ = write!(out, " {} |", contender.label());
    }
    let _ = writeln!(
        out,
        " muxer ÷ direct | muxer ÷ seed (sslh-select) | muxer ÷ Caddy alone | muxer ÷ HAProxy (HTTP router) |"
    );
    let _ = writeln!(
        out,
        "|---|{}---|---|---|---|",
        "---|".repeat(options.contenders.len())
    );
    let figures = [
        Figure::KeepAliveRps,
        Figure::KeepAliveP50,
        Figure::KeepAliveP99,
        Figure::NewConnRps,
        Figure::NewConnP50,
        Figure::NewConnP99,
        Figure::KeepAliveCpuUs,
        Figure::NewConnCpuUs,
        Figure::HttpsKeepAliveRps,
        Figure::HttpsNewConnRps,
        Figure::HttpsKeepAliveCpuUs,
        Figure::HttpsNewConnCpuUs,
        Figure::BulkGbits,
        Figure::SseTtfbMs,
        Figure::CpuSecondsPerGb,
        Figure::IdleSplicedKib,
        Figure::IdleHttpKib,
    ];
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    };
    for figure in figures {
        let _ = write!(out, "| {} |", figure.label());
        for &contender in &options.contenders {
            match value(figure, contender) {
                Some(v) if v.abs() >= 100.0 => {
                    let _ = write!(out, " {v:.0} |");
                }
                Some(v) => {
                    let _ = write!(out, " {v:.2} |");
                }
                None => {
                    let _ = write!(out, " – |");
                }
            }
        }
        let muxer = value(figure, Contender::MuxerTc);
        let _ = writeln!(
            out,
            " {} | {} | {} | {} |",
            ratio(muxer, value(figure, Contender::Direct)),
            ratio(muxer, value(figure, Contender::SeedSelect)),
            ratio(muxer, value(figure, Contender::Caddy)),
            ratio(muxer, value(figure, Contender::HaproxyHttp))
        );
    }

    let _ = writeln!(out, "\n## Targets (muxer with the TC redirect)\n");
    let _ = writeln!(out, "| target | measured | met |\n|---|---|---|");
    let mut target = |name: &str, measured: Option<f64>, goal: f64, at_least: bool, unit: &str| {
        // Targets against a contender left out of this run are left out.
        let Some(m) = measured else { return };
        let text = format!("{m:.2}{unit}");
        let verdict = verdict(measured, goal, at_least);
        let _ = writeln!(out, "| {name} | {text} | {verdict} |");
    };
    let div = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let m = Contender::MuxerTc;
    target(
        "bulk TCP ≥ 0.8 × direct",
        div(
            value(Figure::BulkGbits, m),
            value(Figure::BulkGbits, Contender::Direct),
        ),
        0.8,
        true,
        "×",
    );
    target(
        "keep-alive HTTP ≥ 3 × the seed's stack",
        div(
            value(Figure::KeepAliveRps, m),
            value(Figure::KeepAliveRps, Contender::SeedSelect),
        ),
        3.0,
        true,
        "×",
    );
    target(
        "new connection per request ≥ 0.7 × direct",
        div(
            value(Figure::NewConnRps, m),
            value(Figure::NewConnRps, Contender::Direct),
        ),
        0.7,
        true,
        "×",
    );
    target(
        "SSE time to first byte within 1 ms of direct",
        value(Figure::SseTtfbMs, m)
            .zip(value(Figure::SseTtfbMs, Contender::Direct))
            .map(|(a, b)| a - b),
        1.0,
        false,
        " ms",
    );
    target(
        "new HTTPS connections ≥ 1.3 × Caddy's",
        div(
            value(Figure::HttpsNewConnRps, m),
            value(Figure::HttpsNewConnRps, Contender::Caddy),
        ),
        1.3,
        true,
        "×",
    );
    target(
        "new HTTPS connections ≥ 1.0 × HAProxy's",
        div(
            value(Figure::HttpsNewConnRps, m),
            value(Figure::HttpsNewConnRps, Contender::HaproxyHttp),
        ),
        1.0,
        true,
        "×",
    );
    target(
        "HTTPS keep-alive ≥ 2 × Caddy's",
        div(
            value(Figure::HttpsKeepAliveRps, m),
            value(Figure::HttpsKeepAliveRps, Contender::Caddy),
        ),
        2.0,
        true,
        "×",
    );
    target(
        "≤ 2 KiB per idle spliced connection",
        value(Figure::IdleSplicedKib, m),
        2.0,
        false,
        " KiB",
    );
    target(
        "≤ 14 KiB per idle HTTP keep-alive connection",
        value(Figure::IdleHttpKib, m),
        14.0,
        false,
        " KiB",
    );

    let notes = NOTES.lock().unwrap();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for note in notes.iter() {
            let _ = writeln!(out, "- {note}");
        }
    }
    let mut comparison =
        |title: &str, column: &str, figures: &[Figure], a: Contender, b: Contender| {
            if !(options.contenders.contains(&a) && options.contenders.contains(&b)) {
                return;
            }
            let _ = writeln!(out, "\n## {title}\n");
            let _ = writeln!(out, "| figure | {column} |\n|---|---|");
            for &figure in figures {
                let better = if figure.higher_is_better() {
                    "higher is better"
                } else {
                    "lower is better"
                };
                let _ = writeln!(
                    out,
                    "| {} ({better}) | {} |",
                    figure.label(),
                    ratio(value(figure, a), value(figure, b))
                );
            }
        };
    comparison(
        "splice(2) vs copying, same muxer",
        "splice ÷ copy",
        &[Figure::BulkGbits, Figure::CpuSecondsPerGb],
        Contender::MuxerTcSplice,
        Contender::MuxerTc,
    );
    comparison(
        "sk_lookup steering vs TC redirect, same muxer",
        "sk_lookup ÷ TC",
        &[
            Figure::BulkGbits,
            Figure::NewConnRps,
            Figure::KeepAliveRps,
            Figure::CpuSecondsPerGb,
        ],
        Contender::MuxerSkLookup,
        Contender::MuxerTc,
    );
    comparison(
        "XDP redirect vs TC redirect, same muxer",
        "XDP ÷ TC",
        &[Figure::BulkGbits, Figure::NewConnRps, Figure::KeepAliveRps],
        Contender::MuxerXdp,
        Contender::MuxerTc,
    );
    comparison(
        "default logging (one line per connection) vs warnings only, same muxer",
        "default ÷ warn",
        &[
            Figure::KeepAliveRps,
            Figure::NewConnRps,
            Figure::KeepAliveP99,
            Figure::KeepAliveCpuUs,
            Figure::NewConnCpuUs,
        ],
        Contender::MuxerDefaultLog,
        Contender::MuxerTc,
    );
    let placement = [
        Figure::NewConnRps,
        Figure::KeepAliveRps,
        Figure::BulkGbits,
        Figure::CpuSecondsPerGb,
    ];
    comparison(
        "pinned vs floating workers (the default), same muxer",
        "pinned ÷ floating",
        &placement,
        Contender::MuxerPinned,
        Contender::MuxerTc,
    );
    comparison(
        "no CPU claims (hash spreading) vs claims (the default), same muxer",
        "hashed ÷ claims",
        &placement,
        Contender::MuxerHashed,
        Contender::MuxerTc,
    );
    comparison(
        "TC redirect vs iptables REDIRECT, same muxer",
        "TC ÷ iptables",
        &[Figure::BulkGbits, Figure::NewConnRps, Figure::KeepAliveRps],
        Contender::MuxerTc,
        Contender::MuxerIptables,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_connections_are_capped_by_the_open_file_limit() {
        assert_eq!(spliced_capacity(Some(20_000)), 9_900);
        assert_eq!(spliced_capacity(Some(1_048_576)), 524_188);
        assert_eq!(spliced_capacity(Some(100)), 0);
        assert_eq!(spliced_capacity(None), usize::MAX);
    }

    #[test]
    fn only_a_binding_cap_is_reported() {
        let options = |limit| Options {
            contenders: Vec::new(),
            lab: Lab::Local,
            shape: 2,
            runs: 1,
            seconds: 1,
            idle_connections: IDLE_CONNECTIONS,
            open_file_limit: limit,
            out: PathBuf::new(),
        };
        let capped = options(Some(20_000));
        assert_eq!(capped.idle_connections_for(Figure::IdleSplicedKib), 9_900);
        assert_eq!(capped.idle_connections_for(Figure::IdleHttpKib), 10_000);
        assert!(spliced_cap_note(&capped).contains("open-file limit of 20000"));
        let roomy = options(Some(65_536));
        assert_eq!(roomy.idle_connections_for(Figure::IdleSplicedKib), 10_000);
        assert_eq!(spliced_cap_note(&roomy), "");
        assert_eq!(spliced_cap_note(&options(None)), "");
    }

    #[test]
    fn ratios_pair_the_samples_of_one_run() {
        let (ours, theirs) = (Contender::MuxerDefaultLog, Contender::HaproxyHttp);
        let figure = Figure::KeepAliveCpuUs;
        let mut samples = Samples::new();
        // The machine slows down over the runs: both contenders' figures double, their ratio
        // stays 0.9 in every run but one; the ratio of the medians would say 0.6.
        samples.insert((figure, ours), vec![9.0, 18.0, 36.0]);
        samples.insert((figure, theirs), vec![10.0, 20.0, 30.0]);
        let paired = paired_ratio(&samples, figure, ours, theirs).unwrap();
        assert!((paired.median - 0.9).abs() < 1e-9);
        assert_eq!(paired.range, (0.9, 1.2));
        assert_eq!(paired.to_string(), "0.90× (0.90–1.20)");
        // A run without a sample of one of them: the ratio of the medians, no range.
        samples.insert((figure, theirs), vec![10.0, 30.0]);
        let unpaired = paired_ratio(&samples, figure, ours, theirs).unwrap();
        assert!((unpaired.median - 18.0 / 30.0).abs() < 1e-9);
        assert_eq!(unpaired.to_string(), "0.60×");
        assert_eq!(
            paired_ratio(&samples, Figure::BulkGbits, ours, theirs),
            None
        );
    }

    #[test]
    fn the_targets_table_compares_with_each_haproxy_measured() {
        let mut samples = Samples::new();
        for (contender, cpu, rps) in [
            (Contender::MuxerDefaultLog, 30.0, 30_000.0),
            (Contender::HaproxyHttp, 40.0, 24_000.0),
            (Contender::HaproxyHttpDirect, 36.0, 26_000.0),
            (Contender::MuxerOwnPort, 27.0, 31_200.0),
        ] {
            samples.insert((Figure::KeepAliveCpuUs, contender), vec![cpu]);
            samples.insert((Figure::KeepAliveRps, contender), vec![rps]);
        }
        let options = |contenders| Options {
            contenders,
            lab: Lab::Local,
            shape: 1,
            runs: 1,
            seconds: 1,
            idle_connections: IDLE_CONNECTIONS,
            open_file_limit: None,
            out: PathBuf::new(),
        };
        let both = vec![
            Contender::HaproxyHttp,
            Contender::HaproxyHttpDirect,
            Contender::MuxerDefaultLog,
            Contender::MuxerOwnPort,
        ];
        let table = haproxy_targets(&[(1, samples.clone())], &options(both));
        assert!(table.contains(&format!(
            "{} against HAProxy's HTTP router",
            Contender::MuxerDefaultLog.label()
        )));
        assert!(table.contains(
            "| CPU per keep-alive request ≤ 0.8 × HAProxy's | iptables+HAProxy | wrk -t1 | 0.75× | yes |"
        ));
        assert!(table.contains(
            "| CPU per keep-alive request ≤ 0.8 × HAProxy's | HAProxy, own port | wrk -t1 | 0.83× | **no**: 4 % over |"
        ));
        assert!(table.contains(
            "| keep-alive requests/s ≥ 1.2 × HAProxy's | HAProxy, own port | wrk -t1 | 1.15× | **no**: 4 % short |"
        ));
        assert!(table.contains(
            "| keep-alive requests/s ≥ 1.2 × HAProxy's | HAProxy, own port; muxer on its own port too | wrk -t1 | 1.20× | yes |"
        ));
        assert!(table
            .contains("| bulk TCP ≥ 0.95 × direct | direct | wrk -t1 | not measured | **no** |"));
        // Without the own-port contenders in the run, no rows against them.
        let one = vec![Contender::HaproxyHttp, Contender::MuxerDefaultLog];
        let table = haproxy_targets(&[(1, samples.clone())], &options(one));
        assert!(!table.contains("own port |") && !table.contains("own port too |"));
        // With only the own-port contenders, the table says which muxer it measured.
        let own_ports = vec![Contender::HaproxyHttpDirect, Contender::MuxerOwnPort];
        let table = haproxy_targets(&[(1, samples)], &options(own_ports));
        assert!(table.contains(&format!(
            "{} against HAProxy's HTTP router",
            Contender::MuxerOwnPort.label()
        )));
        assert!(table.contains(
            "| keep-alive requests/s ≥ 1.2 × HAProxy's | HAProxy, own port; muxer on its own port too | wrk -t1 | 1.20× | yes |"
        ));
    }
}
