//! The HTTP router end to end, with real curl where it matters: routing, path canonicalisation,
//! header hygiene, streaming (SSE latency, 100 MiB both ways), client aborts, WebSocket, h2c,
//! failures and limits.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use muxer_tests::backends::{self, Backend, HttpBackend, HttpOptions};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, SERVER_V4};
use muxer_tests::packets;
use muxer_tests::process::status_kib;
use muxer_tests::{netns_available, sha256_hex, test_data, wait_for};

const BASE: &str = "http://198.18.0.2:2222";

fn config(http: &str) -> String {
    format!(
        "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [sniff]\non_timeout = \"close\"\n\
         {http}"
    )
}

const ROUTES: &str = "[http]\nheader_read_timeout = \"1s\"\nmax_body_bytes = 209715200\n\
    trusted_proxies = [\"198.18.0.3/32\"]\n\
    [[http.route]]\npath = \"/embedding-model/\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:30001\"]\n\
    [[http.route]]\npath = \"/ws\"\nupstreams = [\"127.0.0.1:30002\"]\n\
    [[http.route]]\nname = \"keepalive\"\npath = \"/ka/\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:30003\"]\n\
    [[http.route]]\nname = \"wild\"\nhost = \"*.example.com\"\nupstreams = [\"127.0.0.1:30001\"]\n\
    [[http.route]]\nname = \"down\"\npath = \"/down\"\nupstreams = [\"127.0.0.1:39999\"]\n\
    [[http.route]]\nname = \"pair\"\npath = \"/pair/\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:39999\", \"127.0.0.1:30000\"]\n\
    [[http.route]]\nname = \"impatient\"\npath = \"/impatient/\"\nstrip_prefix = true\nresponse_timeout = \"300ms\"\nupstreams = [\"127.0.0.1:30000\"]\n\
    [[http.route]]\nname = \"raw\"\npath = \"/raw/\"\nupstreams = [\"127.0.0.1:30009\"]\n\
    [[http.route]]\nname = \"liar\"\npath = \"/liar/\"\nupgrades = [\"websocket\", \"foo\"]\nupstreams = [\"127.0.0.1:30010\"]\n\
    [[http.route]]\nname = \"rawhost\"\npath = \"/rawhost/\"\nhost_header = \"internal.svc:8080\"\nupstreams = [\"127.0.0.1:30009\"]\n\
    [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n";

struct Server {
    link: Link,
    llm: HttpBackend,
    _embed: Backend,
    _ws: Backend,
    _raw: Backend,
    _liar: Backend,
    keepalive: HttpBackend,
    muxer: Muxer,
}

fn server() -> Server {
    let link = Link::new();
    let llm = backends::http_with(
        &link.server,
        "127.0.0.1:30000".parse().unwrap(),
        "llm",
        HttpOptions::default(),
    );
    let embed = backends::http(&link.server, "127.0.0.1:30001".parse().unwrap(), "embed");
    let ws = backends::websocket_echo(&link.server, "127.0.0.1:30002".parse().unwrap());
    let raw = backends::raw_head_echo(&link.server, "127.0.0.1:30009".parse().unwrap());
    // Answers every request with a 101 to h2c, whatever was asked.
    let liar = backends::fixed_reply(
        &link.server,
        "127.0.0.1:30010".parse().unwrap(),
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    );
    let keepalive = backends::http_with(
        &link.server,
        "127.0.0.1:30003".parse().unwrap(),
        "short-keepalive",
        HttpOptions {
            keep_alive: Some(Duration::from_secs(1)),
        },
    );
    let muxer = Muxer::start(
        &link.server,
        &config(ROUTES),
        "127.0.0.1:2222".parse().unwrap(),
    );
    Server {
        link,
        llm,
        _embed: embed,
        _ws: ws,
        _raw: raw,
        _liar: liar,
        keepalive,
        muxer,
    }
}

impl Server {
    /// A plain TCP connection to muxer from the client namespace.
    fn raw_connection(&self) -> TcpStream {
        self.link.connect((SERVER_V4, 2222).into())
    }

    /// curl ARGS, returning (status code, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let mut all = vec!["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        let out = self.link.client.run_ok("curl", &all);
        let (body, code) = out.rsplit_once('\n').expect("status line");
        (code.trim().parse().expect("status"), body.to_owned())
    }

    /// curl reading `/sse` (with `extra` arguments), and its lines as they arrive.
    fn sse_with_curl(
        &self,
        extra: &[&str],
    ) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
        muxer_tests::process::sse_curl(&self.link.client, &format!("{BASE}/sse"), 10, extra)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.curl(&["--path-as-is", &format!("{BASE}{path}")])
    }
}

#[test]
fn upstream_requests_are_in_origin_form_and_http_1_0_clients_get_a_host_named() {
    if !netns_available(
        "upstream_requests_are_in_origin_form_and_http_1_0_clients_get_a_host_named",
    ) {
        return;
    }
    let server = server();
    let (code, head) = server.curl(&[&format!("{BASE}/raw/x?y=1")]);
    assert_eq!(code, 200);
    assert!(head.starts_with("GET /raw/x?y=1 HTTP/1.1\r\n"), "{head:?}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nhost: 198.18.0.2:2222\r\n"), "{head:?}");

    // Absolute form from the client and a path that needs canonicalising: origin form upstream.
    for (target, expected) in [
        (
            "http://198.18.0.2:2222/raw/abs?q=1",
            "GET /raw/abs?q=1 HTTP/1.1\r\n",
        ),
        ("/raw/a/./b//c?q=2", "GET /raw/a/b/c?q=2 HTTP/1.1\r\n"),
    ] {
        let mut stream = server.raw_connection();
        let request = format!("GET {target} HTTP/1.1\r\nHost: 198.18.0.2:2222\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let (head, body) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.starts_with(expected), "{target}: {body:?}");
    }

    // An absolute-form target's authority is routed on and sent as Host, whatever Host the client
    // put beside it; a second Host header is refused.
    let mut stream = server.raw_connection();
    stream
        .write_all(b"GET http://198.18.0.2:2222/raw/abs HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lower = body.to_ascii_lowercase();
    assert!(lower.contains("\r\nhost: 198.18.0.2:2222\r\n"), "{body:?}");
    assert!(!lower.contains("evil.example"), "{body:?}");
    let mut stream = server.raw_connection();
    stream
        .write_all(b"GET /raw/two HTTP/1.1\r\nHost: 198.18.0.2:2222\r\nHost: evil.example\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut stream);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    // A route's host_header replaces Host; the client's Host goes on in X-Forwarded-Host.
    let (code, head) = server.curl(&[
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: secret",
        &format!("{BASE}/rawhost/a"),
    ]);
    assert_eq!(code, 200);
    let lower = head.to_ascii_lowercase();
    for expected in [
        "get /rawhost/a http/1.1\r\n",
        "\r\nhost: internal.svc:8080\r\n",
        "\r\nx-forwarded-host: 198.18.0.2:2222\r\n",
        "\r\nx-forwarded-for: 198.18.0.1\r\n",
        "\r\nx-forwarded-proto: http\r\n",
    ] {
        assert!(lower.contains(expected), "{expected:?} missing in {head:?}");
    }
    assert_eq!(lower.matches("\r\nhost:").count(), 1, "{head:?}");
    assert!(!lower.contains("x-hop"), "{head:?}");
    assert!(
        !lower.contains("\r\nconnection: keep-alive, x-hop"),
        "{head:?}"
    );

    // HTTP/1.0 allows a request without Host; HTTP/1.1 upstreams require one.
    let mut stream = server.raw_connection();
    stream.write_all(b"GET /raw/old HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.contains(" 200 OK\r\n"), "{reply:?}");
    assert!(reply.contains("GET /raw/old HTTP/1.1\r\n"), "{reply:?}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("\r\nhost: 127.0.0.1:30009\r\n"),
        "{reply:?}"
    );
}

#[test]
fn routes_strip_prefixes_canonicalise_paths_and_clean_headers() {
    if !netns_available("routes_strip_prefixes_canonicalise_paths_and_clean_headers") {
        return;
    }
    let server = server();
    let cases: &[(&str, u16, &str)] = &[
        ("/v1/models", 200, "\"id\":\"llm\""),
        ("/embedding-model/v1/models", 200, "\"id\":\"embed\""),
        ("/embedding-model/", 200, "embed GET /"),
        ("/embedding-model", 200, "llm GET /embedding-model"),
        ("/embedding-modelx", 200, "llm GET /embedding-modelx"),
        (
            "/embedding-model/v1//x?a=1&b=%2F",
            200,
            "embed GET /v1/x?a=1&b=%2F",
        ),
        ("/embedding-model/../admin", 200, "llm GET /admin"),
        ("/embedding-model/%2e%2e/admin", 200, "llm GET /admin"),
        ("/embedding-model/./v1/./models", 200, "\"id\":\"embed\""),
        ("/embedding-model%2Fv1/models", 400, "400"),
        ("/embedding-model/..%2f..%2fetc", 400, "400"),
        ("/x%00y", 400, "400"),
        ("/../etc/passwd", 400, "400"),
    ];
    for (path, status, needle) in cases {
        let (code, body) = server.get(path);
        assert_eq!(code, *status, "{path}: {body}");
        assert!(body.contains(needle), "{path}: {body:?} lacks {needle:?}");
    }
    let (code, body) = server.curl(&[
        "-H",
        "Host: API.Example.com:22",
        &format!("{BASE}/v1/models"),
    ]);
    assert_eq!(
        (code, body.contains("\"id\":\"embed\"")),
        (200, true),
        "wildcard host route: {body}"
    );

    let (code, body) = server.curl(&[
        "-H",
        "X-Forwarded-For: 203.0.113.7",
        "-H",
        "Forwarded: for=203.0.113.7",
        "-H",
        "X-Real-IP: 203.0.113.7",
        "-H",
        "Connection: X-Drop-Me",
        "-H",
        "X-Drop-Me: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "Authorization: Bearer top-secret-token",
        "-H",
        "Cookie: session=top-secret-cookie",
        &format!("{BASE}/headers"),
    ]);
    assert_eq!(code, 200);
    let headers: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The client is no trusted proxy: what it claims about earlier hops is replaced.
    assert_eq!(headers["x-forwarded-for"], "198.18.0.1");
    assert_eq!(headers["forwarded"], "for=198.18.0.1");
    assert_eq!(headers["x-real-ip"], "198.18.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "198.18.0.2:2222");
    assert_eq!(headers["host"], "198.18.0.2:2222", "Host kept as sent");
    assert_eq!(headers["authorization"], "Bearer top-secret-token");
    for hop in ["x-drop-me", "keep-alive", "connection"] {
        assert!(headers.get(hop).is_none(), "{hop} forwarded: {headers}");
    }
    // From a trusted proxy (http.trusted_proxies) the chain is kept and appended to.
    server
        .link
        .add_client_address("198.18.0.3".parse().unwrap());
    let (code, body) = server.curl(&[
        "--interface",
        "198.18.0.3",
        "-H",
        "X-Forwarded-For: 203.0.113.7",
        "-H",
        "X-Real-IP: 203.0.113.7",
        &format!("{BASE}/headers"),
    ]);
    assert_eq!(code, 200);
    let headers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 198.18.0.3");
    assert_eq!(headers["x-real-ip"], "203.0.113.7");
    server.muxer.wait_for_log("path=/headers");
    let log = server.muxer.log();
    assert!(!log.contains("top-secret"), "credentials in the log");
    assert!(
        log.contains("route=default") && log.contains("status=200") && log.contains("ttfb_ms="),
        "{log}"
    );
}

#[test]
fn sse_events_reach_the_client_within_20_ms_of_emission() {
    if !netns_available("sse_events_reach_the_client_within_20_ms_of_emission") {
        return;
    }
    let server = server();
    // Also as a connection's last request: a streamed response is never corked.
    for extra in [&[][..], &["-H", "Connection: close"][..]] {
        let (mut curl, lines) = server.sse_with_curl(extra);
        let mut delays = Vec::new();
        while delays.len() < 40 {
            let line = lines.recv().expect("event");
            let arrived = backends::now_micros();
            if let Some(emitted) = line.strip_prefix("data: ") {
                delays.push(arrived - emitted.parse::<u64>().unwrap());
            }
        }
        let _ = curl.kill();
        let _ = curl.wait();
        delays.sort_unstable();
        let worst = *delays.last().unwrap();
        assert!(
            worst <= 20_000,
            "{extra:?}: slowest event took {worst} µs; all: {delays:?}"
        );
    }
}

/// The TCP segments the client namespace receives from the muxer port while `exchange` runs
/// there: (payload bytes, FIN), captured with a packet socket.
fn segments_from_muxer(link: &Link, exchange: impl FnOnce() + Send) -> Vec<(usize, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let done = std::sync::atomic::AtomicBool::new(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let capture = scope.spawn(|| {
            link.client.enter(|| {
                // ETH_P_ALL, in network byte order.
                let socket = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0x0300)))
                    .expect("packet socket");
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut segments = Vec::new();
                let mut frame = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
                while !done.load(Ordering::Relaxed) {
                    let Ok(len) = socket.recv(&mut frame) else {
                        continue;
                    };
                    // SAFETY: recv initialised the first `len` bytes.
                    let frame: Vec<u8> = frame[..len]
                        .iter()
                        .map(|b| unsafe { b.assume_init() })
                        .collect();
                    if let Some(segment) = segment_from(&frame, 2222) {
                        segments.push(segment);
                    }
                }
                segments
            })
        });
        ready_rx.recv().unwrap();
        exchange();
        // The last segments may still be in flight.
        std::thread::sleep(Duration::from_millis(100));
        done.store(true, Ordering::Relaxed);
        capture.join().unwrap()
    })
}

/// (payload bytes, FIN) of an Ethernet/IPv4/TCP frame whose source port is `port`.
fn segment_from(frame: &[u8], port: u16) -> Option<(usize, bool)> {
    // IPv4 TCP only: the capture also sees ARP and IPv6 neighbour discovery.
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let l4 = packets::tcp_offset(frame);
    if frame.len() < l4 + 20 || packets::ports(frame).0 != port {
        return None;
    }
    let ip_end = 14 + usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let tcp_len = usize::from(frame[l4 + 12] >> 4) * 4;
    Some((ip_end - l4 - tcp_len, frame[l4 + 13] & packets::FIN != 0))
}

#[test]
fn a_connections_last_short_response_leaves_with_its_fin_at_once() {
    if !netns_available("a_connections_last_short_response_leaves_with_its_fin_at_once") {
        return;
    }
    let server = server();
    for request in [
        "GET /v1/models HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        "GET /v1/models HTTP/1.0\r\n\r\n",
    ] {
        let mut elapsed = Duration::ZERO;
        let segments = segments_from_muxer(&server.link, || {
            let started = Instant::now();
            let mut stream = server
                .link
                .connect(std::net::SocketAddr::from((SERVER_V4, 2222)));
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).unwrap();
            elapsed = started.elapsed();
            assert!(response.starts_with(b"HTTP/1."), "{response:?}");
        });
        // TCP_CORK holds a partial segment for up to 200 ms unless the FIN pushes it out.
        assert!(
            elapsed < Duration::from_millis(100),
            "{request:?} took {elapsed:?}"
        );
        let with_data: Vec<_> = segments.iter().filter(|s| s.0 > 0).collect();
        assert_eq!(with_data.len(), 1, "{request:?}: {segments:?}");
        assert!(
            with_data[0].1,
            "{request:?}: the response carries the FIN: {segments:?}"
        );
        assert!(
            !segments.iter().any(|s| s.0 == 0 && s.1),
            "{request:?}: a FIN of its own: {segments:?}"
        );
    }
    // A keep-alive request's response goes out without a FIN (which follows once the client
    // closes).
    let segments = segments_from_muxer(&server.link, || {
        let mut stream = server
            .link
            .connect(std::net::SocketAddr::from((SERVER_V4, 2222)));
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: m\r\n\r\n")
            .unwrap();
        let (head, _) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    });
    assert!(
        segments.iter().any(|s| s.0 > 0) && !segments.iter().any(|s| s.0 > 0 && s.1),
        "{segments:?}"
    );
}

#[test]
fn a_client_that_disconnects_cancels_the_upstream_within_a_second() {
    if !netns_available("a_client_that_disconnects_cancels_the_upstream_within_a_second") {
        return;
    }
    let server = server();
    let (mut curl, lines) = server.sse_with_curl(&[]);
    for _ in 0..6 {
        lines.recv().expect("event");
    }
    curl.kill().unwrap();
    let killed = Instant::now();
    curl.wait().unwrap();
    let cancelled = wait_for(
        "the upstream to see the abort",
        Duration::from_secs(3),
        || {
            server
                .llm
                .observed
                .sse_cancelled
                .lock()
                .unwrap()
                .first()
                .copied()
        },
    );
    let delay = cancelled.duration_since(killed);
    assert!(
        delay <= Duration::from_secs(1),
        "upstream kept generating for {delay:?}"
    );
    server.muxer.wait_for_log("end=\"client gone\"");
}

#[test]
fn hundred_mib_upload_and_download_stream_with_equal_checksums() {
    if !netns_available("hundred_mib_upload_and_download_stream_with_equal_checksums") {
        return;
    }
    let server = server();
    let size = 100 * 1024 * 1024;
    let data = test_data(size);
    let expected = sha256_hex(&data);
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("upload.bin");
    std::fs::write(&upload, &data).unwrap();
    let (code, body) = server.curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{BASE}/sha256"),
    ]);
    assert_eq!((code, body), (200, format!("{expected} {size}")));

    let download = dir.path().join("download.bin");
    server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "-o",
            download.to_str().unwrap(),
            &format!("{BASE}/bytes/{size}"),
        ],
    );
    assert_eq!(sha256_hex(&std::fs::read(&download).unwrap()), expected);

    // Streaming, not buffering: muxer's peak memory stays far below one body.
    let peak_kib = status_kib(server.muxer.process.pid(), "VmHWM").unwrap();
    assert!(
        peak_kib < 48 * 1024,
        "muxer peaked at {peak_kib} KiB while moving 100 MiB bodies"
    );
}

#[test]
fn websocket_upgrades_are_tunnelled() {
    if !netns_available("websocket_upgrades_are_tunnelled") {
        return;
    }
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = server();
    let stream = server.raw_connection();
    stream.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let (mut socket, response) =
            tokio_tungstenite::client_async("ws://198.18.0.2:2222/ws", stream)
                .await
                .unwrap();
        assert_eq!(response.status(), 101);
        socket
            .send(Message::text("hello through muxer"))
            .await
            .unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::text("hello through muxer")
        );
        let big = test_data(1 << 20);
        socket.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::binary(big));
        socket.close(None).await.unwrap();
    });
}

#[test]
fn h2c_prior_knowledge_is_served() {
    if !netns_available("h2c_prior_knowledge_is_served") {
        return;
    }
    let server = server();
    let out = server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--fail",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_version}",
            &format!("{BASE}/embedding-model/v1/models"),
        ],
    );
    let (body, version) = out.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    assert!(body.contains("\"id\":\"embed\""), "{body}");
}

#[test]
fn an_unreachable_upstream_is_a_short_502_naming_the_route() {
    if !netns_available("an_unreachable_upstream_is_a_short_502_naming_the_route") {
        return;
    }
    let server = server();
    let (code, body) = server.get("/down/x");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("route down"), "{body}");
    assert!(
        !body.contains("39999") && !body.to_lowercase().contains("refused"),
        "internals leaked: {body}"
    );
}

#[test]
fn a_slow_header_client_is_cut_at_the_header_timeout() {
    if !netns_available("a_slow_header_client_is_cut_at_the_header_timeout") {
        return;
    }
    let server = server();
    let mut stream = server.raw_connection();
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
}

/// The next request's head on a busy keep-alive connection has the same limit as the first, and
/// trickling bytes does not extend it: the limit runs from the last response, through parking.
#[test]
fn a_keep_alive_client_trickling_its_next_head_is_cut_at_the_header_timeout() {
    if !netns_available("a_keep_alive_client_trickling_its_next_head_is_cut_at_the_header_timeout")
    {
        return;
    }
    let server = server();
    let mut stream = server.raw_connection();
    // Back to back, so that the connection counts as busy and waits out the grace period in
    // hyper's hands before it is parked.
    for round in 0..3 {
        write!(stream, "GET /busy/{round} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, _) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // A bound on the wait, so that a connection never cut fails the test instead of hanging it.
    stream
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let started = Instant::now();
    let mut trickling = stream.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for byte in b"GET /never/finished HTTP/1.1\r\nHost: t\r\n"
            .iter()
            .take(20)
        {
            if trickling.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    trickler.join().unwrap();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(2800),
        "closed after {waited:?}"
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

#[test]
fn an_upstream_with_a_one_second_keep_alive_never_yields_a_502() {
    if !netns_available("an_upstream_with_a_one_second_keep_alive_never_yields_a_502") {
        return;
    }
    let server = server();
    // Requests spaced right around the upstream's keep-alive, where a pooled connection is most
    // likely to be closed by the upstream just as it is reused.
    let gaps = [990u64, 995, 1000, 1003, 1006, 1010, 1020, 980];
    for round in 0..24 {
        let (code, body) = server.get(&format!("/ka/round/{round}"));
        assert_eq!(code, 200, "round {round}: {body}");
        assert_eq!(body, format!("short-keepalive GET /round/{round}"));
        std::thread::sleep(Duration::from_millis(gaps[round % gaps.len()]));
    }
    let connections = server
        .keepalive
        .observed
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        connections > 1,
        "the upstream's keep-alive must have closed pooled connections"
    );
}

#[test]
fn a_post_on_a_pooled_connection_the_upstream_closed_is_sent_on_another_not_502() {
    if !netns_available(
        "a_post_on_a_pooled_connection_the_upstream_closed_is_sent_on_another_not_502",
    ) {
        return;
    }
    let link = Link::new();
    let upstream = backends::http_with(
        &link.server,
        "127.0.0.1:30003".parse().unwrap(),
        "short-keepalive",
        HttpOptions {
            keep_alive: Some(Duration::from_secs(1)),
        },
    );
    // One worker: idle upstream connections are kept per worker, and both requests must meet
    // the same one.
    let _muxer = Muxer::start(
        &link.server,
        "[listen]\naddresses = [\"0.0.0.0:2222\"]\nworkers = 1\n[sniff]\non_timeout = \"close\"\n\
         [http]\n[[http.route]]\nupstreams = [\"127.0.0.1:30003\"]\n",
        "127.0.0.1:2222".parse().unwrap(),
    );
    let curl = |args: &[&str]| -> String {
        let mut all = vec!["-sS", "--max-time", "30", "-o", "-", "-w", " %{http_code}"];
        all.extend_from_slice(args);
        link.client.run_ok("curl", &all)
    };
    assert_eq!(
        curl(&[&format!("{BASE}/v1/models")]).rsplit(' ').next(),
        Some("200")
    );
    // The upstream's one-second keep-alive closes the pooled connection: muxer's end of it waits
    // in CLOSE-WAIT, unread, until it is used again.
    wait_for(
        "the upstream closing the pooled connection",
        Duration::from_secs(10),
        || {
            let sockets = link
                .server
                .run_ok("ss", &["-Htn", "state", "close-wait", "( dport = :30003 )"]);
            (!sockets.trim().is_empty()).then_some(())
        },
    );
    // Not idempotent, so it could not be sent twice: it must never have reached the closed
    // connection, and goes on a new one.
    let data = test_data(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("upload.bin");
    std::fs::write(&upload, &data).unwrap();
    let reply = curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{BASE}/sha256"),
    ]);
    assert_eq!(reply, format!("{} {} 200", sha256_hex(&data), data.len()));
    let connections = upstream.observed.connections.load(Ordering::Relaxed);
    assert_eq!(connections, 2, "the POST went on a new connection");
}

/// A fresh muxer with its own `routes`, and the "llm" backend on 127.0.0.1:30000.
fn llm_behind(routes: &str) -> (Link, Backend, Muxer) {
    let link = Link::new();
    let llm = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let muxer = Muxer::start(
        &link.server,
        &config(routes),
        "127.0.0.1:2222".parse().unwrap(),
    );
    (link, llm, muxer)
}

#[test]
fn limits_answer_413_431_and_404() {
    if !netns_available("limits_answer_413_431_and_404") {
        return;
    }
    let routes = "[http]\nmax_body_bytes = 1048576\nmax_header_bytes = 8192\n\
        [[http.route]]\npath = \"/api/\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:30000\"]\n";
    let (link, _backend, _muxer) = llm_behind(routes);
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("2mib.bin");
    std::fs::write(&body, test_data(2 << 20)).unwrap();
    let status = |args: &[&str]| -> String {
        let mut all = vec![
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        all.extend_from_slice(args);
        link.client.run_ok("curl", &all)
    };
    let url = format!("{BASE}/api/sha256");
    let file = format!("@{}", body.display());
    assert_eq!(
        status(&["--data-binary", &file, &url]),
        "413",
        "declared length over the limit"
    );
    assert_eq!(
        status(&[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &file,
            &url
        ]),
        "413",
        "chunked over the limit"
    );
    let small = format!("{BASE}/api/sha256");
    assert_eq!(status(&["--data-binary", "small", &small]), "200");
    let huge_header = format!("X-Big: {}", "a".repeat(16 * 1024));
    assert_eq!(
        status(&["-H", &huge_header, &format!("{BASE}/api/x")]),
        "431"
    );
    assert_eq!(status(&[&format!("{BASE}/elsewhere")]), "404");
}

#[test]
fn round_robin_skips_a_dead_upstream_and_a_route_timeout_gives_504() {
    if !netns_available("round_robin_skips_a_dead_upstream_and_a_route_timeout_gives_504") {
        return;
    }
    let server = server();
    // One of the pair refuses connections: bodiless requests move on to the other, and once it
    // has failed it is skipped.
    for round in 0..10 {
        let (code, body) = server.get(&format!("/pair/round/{round}"));
        assert_eq!((code, body), (200, format!("llm GET /round/{round}")));
    }
    let (code, body) = server.get("/impatient/slow?ms=100");
    assert_eq!((code, body.as_str()), (200, "llm slow"));
    let started = Instant::now();
    let (code, body) = server.get("/impatient/slow?ms=2000");
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("route impatient"), "{body}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    // No total timeout elsewhere: a slow answer on the default route arrives.
    let (code, _) = server.get("/slow?ms=1500");
    assert_eq!(code, 200);
}

#[test]
fn idle_upstream_connections_are_reused_then_closed_after_the_pool_idle_timeout() {
    if !netns_available(
        "idle_upstream_connections_are_reused_then_closed_after_the_pool_idle_timeout",
    ) {
        return;
    }
    let link = Link::new();
    let llm = backends::http_with(
        &link.server,
        "127.0.0.1:30000".parse().unwrap(),
        "llm",
        HttpOptions::default(),
    );
    // One worker: idle connections are kept per worker, and this counts them.
    let mut muxer = Muxer::start(
        &link.server,
        "[listen]\naddresses = [\"0.0.0.0:2222\"]\nworkers = 1\n\
         [sniff]\non_timeout = \"close\"\n[http]\npool_idle_timeout = \"800ms\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n",
        "127.0.0.1:2222".parse().unwrap(),
    );
    let upstream_sockets = || {
        link.server
            .run_ok("ss", &["-Htn", "state", "all", "( dport = :30000 )"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // One request after another, each on a new client connection: one upstream connection.
    for _ in 0..5 {
        let out = link.client.run_ok(
            "curl",
            &["-sS", "--max-time", "10", &format!("{BASE}/v1/models")],
        );
        assert!(out.contains("\"id\":\"llm\""), "{out}");
    }
    let open = upstream_sockets();
    assert_eq!(open.len(), 1, "pooled and reused: {open:?}");
    assert!(open[0].starts_with("ESTAB"), "{open:?}");
    // Idle past the timeout: closed by muxer (nothing in CLOSE-WAIT or ESTAB left).
    std::thread::sleep(Duration::from_millis(2000));
    let open = upstream_sockets();
    assert!(
        open.iter().all(|l| l.starts_with("TIME-WAIT")),
        "idle upstream connection still open: {open:?}"
    );
    // And a new request still works.
    let out = link.client.run_ok(
        "curl",
        &["-sS", "--max-time", "10", &format!("{BASE}/v1/models")],
    );
    assert!(out.contains("\"id\":\"llm\""), "{out}");
    assert_eq!(llm.observed.requests.load(Ordering::Relaxed), 6);
    assert_eq!(
        llm.observed.connections.load(Ordering::Relaxed),
        2,
        "one connection for the first five requests, a new one after the timeout"
    );
    muxer.process.assert_running();
}

/// Reads HTTP/1.1 responses with `Content-Length` bodies from `stream`, returning each response's
/// head and body.
fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn an_idle_keep_alive_connection_serves_again_and_pipelined_requests_stay_in_order() {
    if !netns_available(
        "an_idle_keep_alive_connection_serves_again_and_pipelined_requests_stay_in_order",
    ) {
        return;
    }
    let server = server();
    let mut stream = server.raw_connection();
    // Idle between requests (muxer keeps only the socket then), shorter than the 1 s header
    // read timeout of this config.
    for (round, pause) in [0u64, 300, 600].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(pause));
        write!(stream, "GET /round/{round} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, format!("llm GET /round/{round}"));
    }
    // Three requests in one write, one with a body: answered in order on the same connection.
    stream
        .write_all(
            b"GET /p/1 HTTP/1.1\r\nHost: t\r\n\r\n\
              POST /p/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
              GET /p/3 HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
    for expected in ["llm GET /p/1", "llm POST /p/2", "llm GET /p/3"] {
        let (head, body) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, expected);
    }
    // Idle past the header read timeout: closed.
    std::thread::sleep(Duration::from_millis(1500));
    let mut rest = Vec::new();
    assert_eq!(
        stream.read_to_end(&mut rest).unwrap(),
        0,
        "closed when idle"
    );
}

#[test]
fn idle_keep_alive_connections_hold_no_hyper_buffers() {
    if !netns_available("idle_keep_alive_connections_hold_no_hyper_buffers") {
        return;
    }
    // Its own muxer: the shared config's 1 s idle timeout would close connections mid-count.
    let (link, _llm, muxer) = llm_behind("[[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n");
    let pid = muxer.process.pid();
    let open = |count: usize, held: &mut Vec<TcpStream>| {
        for index in 0..count {
            let mut stream = link.connect((SERVER_V4, 2222).into());
            // One write: write! would send pieces, each waiting out Nagle and a delayed ACK.
            let request = format!("GET /idle/{index} HTTP/1.1\r\nHost: t\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let (head, _) = read_response(&mut stream);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            held.push(stream);
        }
    };
    // Warm up (pool, allocator), then open connections that each served one request and idle.
    let mut held = Vec::new();
    open(50, &mut held);
    std::thread::sleep(Duration::from_millis(200));
    let before = status_kib(pid, "VmRSS").unwrap();
    // Below the per-address limit of 1000.
    let count = 900;
    open(count, &mut held);
    std::thread::sleep(Duration::from_millis(200));
    let per_connection = (status_kib(pid, "VmRSS").unwrap() - before) as f64 / count as f64;
    eprintln!("{per_connection:.1} KiB per idle keep-alive connection");
    // Parked, a connection keeps its socket, task and counters (~4 KiB); with hyper's 8 KiB read
    // buffer still referenced it was ~13 KiB.
    assert!(
        per_connection < 8.0,
        "{per_connection:.1} KiB per idle keep-alive connection"
    );
    let parked = || muxer.stats()["daemon"]["http_parked"].as_u64().unwrap();
    assert_eq!(
        parked(),
        held.len() as u64,
        "parked after their first request"
    );
    // Every connection is still open, and parked ones still serve. Answered at once, they count
    // as busy: left to hyper for the grace period, then parked again.
    for (index, stream) in held.iter_mut().enumerate() {
        let request = format!("GET /again/{index} HTTP/1.1\r\nHost: t\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let (_, body) = read_response(stream);
        assert_eq!(body, format!("llm GET /again/{index}"));
    }
    // A client with requests 10 ms apart is busy: its connection stays with hyper between them.
    let mut busy = held.pop().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                busy.write_all(b"GET /busy HTTP/1.1\r\nHost: t\r\n\r\n")
                    .unwrap();
                read_response(&mut busy);
                std::thread::sleep(Duration::from_millis(10));
            }
            busy
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        parked(),
        held.len() as u64,
        "a busy connection is not parked"
    );
    stop.store(true, Ordering::Relaxed);
    held.push(client.join().unwrap());
    wait_for(
        "the quiet connection parked",
        Duration::from_secs(3),
        || (parked() == held.len() as u64).then_some(()),
    );
    drop(held);
    wait_for(
        "closed connections unparked",
        Duration::from_secs(3),
        || (parked() == 0).then_some(()),
    );
}

#[test]
fn bytes_after_an_unread_request_body_are_never_served_as_a_request() {
    if !netns_available("bytes_after_an_unread_request_body_are_never_served_as_a_request") {
        return;
    }
    let server = server();
    let mut stream = server.raw_connection();
    // Declared larger than max_body_bytes: answered 413 without reading the body, whose first
    // bytes look like a request of their own.
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 300000000\r\n\r\n\
              GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply}");
    assert!(!reply.contains("smuggled"), "{reply}");
    assert!(!server.muxer.log().contains("path=/smuggled"));
}

#[test]
fn a_slowly_read_large_response_and_the_next_request_share_one_connection() {
    if !netns_available("a_slowly_read_large_response_and_the_next_request_share_one_connection") {
        return;
    }
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let (big, small) = (dir.path().join("big"), dir.path().join("small"));
    // Read at 20 MB/s: muxer's writes to the client block again and again, and the connection
    // must not be parked until the last byte is written.
    let connects = server.link.client.run_ok(
        "curl",
        &[
            "-sS",
            "--max-time",
            "30",
            "--limit-rate",
            "20M",
            "-w",
            "%{num_connects} ",
            "-o",
            big.to_str().unwrap(),
            &format!("{BASE}/bytes/8000000"),
            "-o",
            small.to_str().unwrap(),
            &format!("{BASE}/v1/models"),
        ],
    );
    assert_eq!(
        connects.split_whitespace().collect::<Vec<_>>(),
        ["1", "0"],
        "the second request reuses the first connection"
    );
    let body = std::fs::read(&big).unwrap();
    assert_eq!(body.len(), 8_000_000);
    assert_eq!(sha256_hex(&body), sha256_hex(&test_data(8_000_000)));
    let models = std::fs::read_to_string(&small).unwrap();
    assert!(models.contains("\"id\":\"llm\""), "{models}");
}

#[test]
fn a_request_head_arriving_in_pieces_keeps_the_connection_alive() {
    if !netns_available("a_request_head_arriving_in_pieces_keeps_the_connection_alive") {
        return;
    }
    let server = server();
    let mut stream = server.raw_connection();
    stream.set_nodelay(true).unwrap();
    // On a fresh connection, then on the same connection after a response (while it is idle).
    for round in 0..3 {
        write!(stream, "GET /pieces/{round} HT").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"TP/1.1\r\nHost: t\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"\r\n").unwrap();
        let (head, body) = read_response(&mut stream);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "round {round}: keep-alive dropped: {head}"
        );
        assert_eq!(body, format!("llm GET /pieces/{round}"));
    }
}

#[test]
fn upgrades_are_websocket_only_by_default_h2c_is_never_tunnelled_and_a_101_must_match() {
    if !netns_available(
        "upgrades_are_websocket_only_by_default_h2c_is_never_tunnelled_and_a_101_must_match",
    ) {
        return;
    }
    let server = server();
    let exchange = |request: &str| {
        let mut stream = server.raw_connection();
        stream.write_all(request.as_bytes()).unwrap();
        read_response(&mut stream)
    };
    // h2c: served as plain HTTP/1.1; the upstream sees neither Upgrade nor HTTP2-Settings.
    let (head, body) = exchange(
        "GET /raw/h2c HTTP/1.1\r\nHost: gpu\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let upstream = body.to_ascii_lowercase();
    assert!(
        upstream.starts_with("get /raw/h2c http/1.1\r\n"),
        "{body:?}"
    );
    assert!(
        !upstream.contains("upgrade") && !upstream.contains("http2-settings"),
        "{body:?}"
    );
    // Another protocol on a route that allows only WebSocket (the default): refused.
    let (head, _) =
        exchange("GET /raw/x HTTP/1.1\r\nHost: gpu\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // An upstream that switches to another protocol than asked (or to WebSocket without the
    // handshake's accept header) gets no tunnel: 502.
    for asked in ["websocket", "foo"] {
        let request = format!(
            "GET /liar/x HTTP/1.1\r\nHost: gpu\r\nConnection: Upgrade\r\nUpgrade: {asked}\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let (head, _) = exchange(&request);
        assert!(head.starts_with("HTTP/1.1 502"), "{asked}: {head}");
    }
    // A real WebSocket still works: websocket_upgrades_are_tunnelled.
}

#[test]
fn parameters_cannot_hide_dot_segments_and_overlong_utf8_is_refused() {
    if !netns_available("parameters_cannot_hide_dot_segments_and_overlong_utf8_is_refused") {
        return;
    }
    let server = server();
    let exchange = |target: &str| {
        let mut stream = server.raw_connection();
        let request = format!("GET {target} HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        read_response(&mut stream)
    };
    // `..;` is `..` to upstreams that drop parameters: it climbs out of the prefix here too, so the
    // request is routed (and forwarded) as /v1/models, never to the embedding route's upstream.
    let (head, body) = exchange("/embedding-model/..;/v1/models");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"id\":\"llm\""), "{body}");
    let (head, _) = exchange("/..;/etc/passwd");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    for overlong in ["/raw/%C0%AF", "/raw/%e0%80%af"] {
        let (head, body) = exchange(overlong);
        assert!(head.starts_with("HTTP/1.1 400"), "{overlong}: {head}");
        assert!(body.contains("overlong UTF-8"), "{body}");
    }
}

/// Sends `request` (one or more requests, exactly as given) on a fresh connection and returns
/// every byte muxer answers until it closes the connection (or 5 s pass).
fn raw_exchange(server: &Server, request: &[u8]) -> String {
    let mut stream = server.raw_connection();
    stream.write_all(request).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn every_smuggling_and_routing_bypass_request_gets_its_documented_answer() {
    if !netns_available("every_smuggling_and_routing_bypass_request_gets_its_documented_answer") {
        return;
    }
    let server = server();
    let cases: &[(&str, &[u8])] = &[
        ("absolute-form vs Host", b"GET http://gpu/raw/a HTTP/1.1\r\nHost: x.example.com\r\nConnection: close\r\n\r\n"),
        ("duplicate Host", b"GET /raw/b HTTP/1.1\r\nHost: gpu\r\nHost: x.example.com\r\nConnection: close\r\n\r\n"),
        ("h2c upgrade", b"GET /raw/c HTTP/1.1\r\nHost: gpu\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
        ("..;", b"GET /embedding-model/..;/raw/d HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n"),
        ("overlong UTF-8", b"GET /raw/%C0%AE%C0%AE/e HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n"),
        ("CL+TE", b"POST /raw/f HTTP/1.1\r\nHost: gpu\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /raw/smuggled HTTP/1.1\r\nHost: gpu\r\nConnection: close\r\n\r\n"),
        ("duplicate CL", b"POST /raw/g HTTP/1.1\r\nHost: gpu\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!"),
        ("obs-fold", b"GET /raw/h HTTP/1.1\r\nHost: gpu\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n"),
    ];
    // What each must get (docs/http.md, "Requests that try to confuse routing"): a 400 from muxer
    // itself, or one response whose upstream head (echoed by the /raw/ backend) is unambiguous.
    let answers: Vec<String> = cases
        .iter()
        .map(|(_, request)| raw_exchange(&server, request))
        .collect();
    let answer = |name: &str| -> String {
        let index = cases.iter().position(|(n, _)| *n == name).unwrap();
        answers[index].to_ascii_lowercase()
    };
    let refused = |name: &str, reason: &str| {
        let answer = answer(name);
        assert!(answer.starts_with("http/1.1 400"), "{name}: {answer}");
        assert!(answer.contains(reason), "{name}: {answer}");
        assert_eq!(answer.matches("http/1.1 ").count(), 1, "{name}: {answer}");
    };
    // Exactly one response, from the upstream, whose echoed request line and headers are `head`.
    let forwarded = |name: &str| -> String {
        let answer = answer(name);
        assert!(answer.starts_with("http/1.1 200"), "{name}: {answer}");
        assert_eq!(answer.matches("http/1.1 ").count(), 1, "{name}: {answer}");
        answer.split_once("\r\n\r\n").unwrap().1.to_owned()
    };

    let head = forwarded("absolute-form vs Host");
    assert!(head.starts_with("get /raw/a http/1.1\r\n"), "{head}");
    assert!(
        head.contains("\r\nhost: gpu\r\n"),
        "routed and sent as gpu: {head}"
    );
    assert!(!head.contains("x.example.com"), "{head}");
    refused("duplicate Host", "more than one host header");
    let head = forwarded("h2c upgrade");
    assert!(
        !head.contains("upgrade") && !head.contains("http2-settings"),
        "{head}"
    );
    let head = forwarded("..;");
    assert!(head.starts_with("get /raw/d http/1.1\r\n"), "{head}");
    refused("overlong UTF-8", "overlong utf-8");
    // Transfer-Encoding wins, Content-Length is dropped, and the connection closes after the
    // response: the bytes after the chunked body are never served as a request.
    let head = forwarded("CL+TE");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(!answer("CL+TE").contains("smuggled"));
    refused("duplicate CL", "");
    refused("obs-fold", "");
}
