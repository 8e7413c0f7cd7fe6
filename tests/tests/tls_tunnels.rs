//! TLS passthrough by SNI and ALPN (real openssl s_server/s_client), named tunnels through HTTP
//! CONNECT (real ssh with nc and socat, curl -p), and the PROXY protocol both ways.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use muxer_tests::backends::{self, Backend};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, Netns, SERVER_V4, SERVER_V6};
use muxer_tests::process::Running;
use muxer_tests::sshd::Sshd;
use muxer_tests::{netns_available, wait_for};

const READY: &str = "127.0.0.1:2222";
const LISTEN: &str =
    "[listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n[sniff]\non_timeout = \"close\"\n";

fn certificate(dir: &Path, name: &str) {
    let output = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .output()
        .expect("openssl req");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn s_server(netns: &Netns, dir: &Path, name: &str, port: u16, alpn: Option<&str>) -> Running {
    certificate(dir, name);
    let mut command = netns.command("openssl");
    command
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("-cert")
        .arg(dir.join(format!("{name}.crt")))
        .arg("-key")
        .arg(dir.join(format!("{name}.key")));
    if let Some(alpn) = alpn {
        command.args(["-alpn", alpn]);
    }
    let mut server = Running::spawn(
        &format!("s_server {name}"),
        command,
        dir.join(format!("{name}.log")),
    );
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for(&format!("s_server {name}"), Duration::from_secs(10), || {
        server.assert_running();
        netns.enter(|| TcpStream::connect(address).ok()).map(drop)
    });
    server
}

/// The certificate subject the server behind muxer presented.
fn s_client(link: &Link, sni: Option<&str>, alpn: Option<&str>, extra: &[&str]) -> String {
    let mut args = vec!["s_client", "-connect", "198.18.0.2:2222"];
    match sni {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    if let Some(alpn) = alpn {
        args.extend(["-alpn", alpn]);
    }
    args.extend_from_slice(extra);
    let output = link
        .client
        .command("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("subject=")
                .map(|s| s.replace(' ', ""))
        })
        .unwrap_or_else(|| format!("no certificate: {text}"))
}

#[test]
fn tls_is_routed_by_sni_and_alpn_without_being_terminated() {
    if !netns_available("tls_is_routed_by_sni_and_alpn_without_being_terminated") {
        return;
    }
    let link = Link::new();
    let dir = tempfile::tempdir().unwrap();
    let _servers = [
        s_server(&link.server, dir.path(), "a.example", 9001, None),
        s_server(&link.server, dir.path(), "b.example", 9002, None),
        s_server(&link.server, dir.path(), "b-h2.example", 9003, Some("h2")),
        s_server(&link.server, dir.path(), "default.example", 9004, None),
    ];
    let config = format!(
        "{LISTEN}[tls]\ndefault = \"127.0.0.1:9004\"\n\
         [[tls.route]]\nsni = \"a.example\"\nupstream = \"127.0.0.1:9001\"\n\
         [[tls.route]]\nsni = \"b.example\"\nupstream = \"127.0.0.1:9002\"\n\
         [[tls.route]]\nsni = \"B.example\"\nalpn = [\"h2\"]\nupstream = \"127.0.0.1:9003\"\n\
         [[tls.route]]\nsni = \"*.split.example\"\nupstream = \"127.0.0.1:9001\"\n"
    );
    let _muxer = Muxer::start(&link.server, &config, READY.parse().unwrap());
    assert_eq!(
        s_client(&link, Some("a.example"), None, &[]),
        "CN=a.example"
    );
    assert_eq!(
        s_client(&link, Some("A.EXAMPLE"), None, &[]),
        "CN=a.example"
    );
    assert_eq!(
        s_client(&link, Some("b.example"), Some("http/1.1"), &[]),
        "CN=b.example"
    );
    assert_eq!(
        s_client(&link, Some("b.example"), Some("h2,http/1.1"), &[]),
        "CN=b-h2.example"
    );
    assert_eq!(
        s_client(&link, None, None, &[]),
        "CN=default.example",
        "no SNI → default"
    );
    assert_eq!(
        s_client(&link, Some("unknown.example"), None, &[]),
        "CN=default.example"
    );
    // A ClientHello over 512 bytes sent in 512-byte records: split across records.
    let long_alpn: Vec<String> = (0..10)
        .map(|i| format!("proto-{i:02}-{}", "x".repeat(30)))
        .collect();
    let alpn = format!("h2,{}", long_alpn.join(","));
    assert_eq!(
        s_client(
            &link,
            Some("node.split.example"),
            Some(&alpn),
            &["-max_send_frag", "512"]
        ),
        "CN=a.example"
    );
}

#[test]
fn without_a_tls_default_unmatched_hellos_are_closed() {
    if !netns_available("without_a_tls_default_unmatched_hellos_are_closed") {
        return;
    }
    let link = Link::new();
    let dir = tempfile::tempdir().unwrap();
    let _server = s_server(&link.server, dir.path(), "a.example", 9001, None);
    let config =
        format!("{LISTEN}[[tls.route]]\nsni = \"a.example\"\nupstream = \"127.0.0.1:9001\"\n");
    let muxer = Muxer::start(&link.server, &config, READY.parse().unwrap());
    assert_eq!(
        s_client(&link, Some("a.example"), None, &[]),
        "CN=a.example"
    );
    assert!(s_client(&link, Some("other.example"), None, &[]).starts_with("no certificate"));
    assert!(s_client(&link, None, None, &[]).starts_with("no certificate"));
    muxer.wait_for_log("close=no route configured");
}

struct TunnelServer {
    link: Link,
    sshd: Sshd,
    _http: Backend,
    _muxer: Muxer,
}

fn tunnel_server() -> TunnelServer {
    let link = Link::new();
    // A second machine behind the public one: another address of the server namespace.
    muxer_tests::netns::ip(&[
        "-n",
        link.server.name(),
        "addr",
        "add",
        "198.18.0.3/32",
        "dev",
        "lo",
    ]);
    let sshd = Sshd::start(&link.server, &["198.18.0.3:22"]);
    let http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let config = format!(
        "{LISTEN}\
         [[tunnel]]\nname = \"node-2\"\nupstream = \"198.18.0.3:22\"\n\
         [[tunnel]]\nname = \"web\"\nupstream = \"127.0.0.1:30000\"\n\
         [[tunnel]]\nname = \"secure\"\nupstream = \"127.0.0.1:30000\"\nusername = \"alice\"\npassword = \"s3cret:pw\"\n\
         [[tunnel]]\nname = \"restricted\"\nupstream = \"127.0.0.1:30000\"\nallow = [\"203.0.113.0/24\"]\n"
    );
    let muxer = Muxer::start(&link.server, &config, READY.parse().unwrap());
    TunnelServer {
        link,
        sshd,
        _http: http,
        _muxer: muxer,
    }
}

#[test]
fn ssh_reaches_a_second_host_through_a_named_tunnel_with_nc_and_socat() {
    if !netns_available("ssh_reaches_a_second_host_through_a_named_tunnel_with_nc_and_socat") {
        return;
    }
    let server = tunnel_server();
    for proxy_command in [
        "ProxyCommand=nc -X connect -x 198.18.0.2:2222 %h %p",
        "ProxyCommand=socat - PROXY:198.18.0.2:%h:%p,proxyport=2222",
    ] {
        let mut args = server.sshd.client_options();
        args.extend([
            "-o".into(),
            proxy_command.into(),
            "root@node-2".into(),
            "echo $SSH_CONNECTION".into(),
        ]);
        let out = server
            .link
            .client
            .run_ok("ssh", &args.iter().map(String::as_str).collect::<Vec<_>>());
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            fields.get(2),
            Some(&"198.18.0.3"),
            "{proxy_command}: reached {out}"
        );
    }
}

#[test]
fn curl_proxy_tunnels_answer_200_or_one_indistinct_407_and_throttle_failures() {
    if !netns_available("curl_proxy_tunnels_answer_200_or_one_indistinct_407_and_throttle_failures")
    {
        return;
    }
    let server = tunnel_server();
    let curl = |target: &str, extra: &[&str]| -> (String, String) {
        let mut args = vec![
            "-sS",
            "--max-time",
            "10",
            "-p",
            "-x",
            "http://198.18.0.2:2222",
            "-w",
            "\n%{http_connect}",
        ];
        args.extend_from_slice(extra);
        args.push(target);
        let output = server.link.client.run("curl", &args);
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, connect) = out.rsplit_once('\n').unwrap_or(("", &out));
        (connect.trim().to_owned(), body.to_owned())
    };
    let (code, body) = curl("http://web/v1/models", &[]);
    assert_eq!(code, "200");
    assert!(body.contains("\"id\":\"llm\""), "{body}");
    // Never an open proxy, and no enumeration: an unknown name, an address, a source outside
    // `allow` and wrong credentials all get the same 407.
    let (code, unknown) = curl("http://nothere/", &[]);
    assert_eq!(
        code, "407",
        "unknown names are refused: never an open proxy"
    );
    assert_eq!(
        curl("http://198.18.0.3:22/", &[]).0,
        "407",
        "addresses are not names"
    );
    assert_eq!(
        curl("http://restricted/", &[]),
        (code.clone(), unknown.clone())
    );
    assert_eq!(
        curl("http://secure/v1/models", &[]),
        (code.clone(), unknown.clone())
    );
    assert_eq!(
        curl("http://secure/v1/models", &["--proxy-user", "alice:wrong"]).0,
        "407"
    );
    let (code, body) = curl(
        "http://secure/v1/models",
        &["--proxy-user", "alice:s3cret:pw"],
    );
    assert_eq!(code, "200");
    assert!(body.contains("\"id\":\"llm\""), "{body}");
    // Five failures so far from this network; five more, and it is throttled, right password
    // or not.
    for _ in 0..5 {
        assert_eq!(
            curl("http://secure/", &["--proxy-user", "alice:guess"]).0,
            "407"
        );
    }
    assert_eq!(
        curl(
            "http://secure/v1/models",
            &["--proxy-user", "alice:s3cret:pw"]
        )
        .0,
        "429",
        "a network with ten failures in a minute is throttled"
    );
}

/// Sends `first` then half-closes, returning everything the server sent back.
fn exchange(stream: &mut TcpStream, first: &[u8]) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(first).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn proxy_protocol_carries_the_real_client_both_ways_and_spoofing_is_rejected() {
    if !netns_available("proxy_protocol_carries_the_real_client_both_ways_and_spoofing_is_rejected")
    {
        return;
    }
    let link = Link::new();
    let _checker = backends::proxy_header_echo(&link.server, "127.0.0.1:7001".parse().unwrap());
    let _http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
    let config = format!(
        "{LISTEN}[proxy_protocol]\ntrusted = [\"198.18.0.1/32\"]\n\
         [fallback]\nupstream = \"127.0.0.1:7001\"\nproxy_protocol = \"v1\"\n\
         [[tunnel]]\nname = \"pp2\"\nupstream = \"127.0.0.1:7001\"\nproxy_protocol = \"v2\"\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\n"
    );
    let muxer = Muxer::start(&link.server, &config, READY.parse().unwrap());
    let v4 = SocketAddr::from((SERVER_V4, 2222));
    let v6 = SocketAddr::from((SERVER_V6, 2222));
    let connect = |to: SocketAddr| link.connect(to);

    // Outbound v1: the checker sees this client's own address.
    let mut stream = connect(v4);
    let me = stream.local_addr().unwrap();
    assert_eq!(
        exchange(&mut stream, b"hello\n"),
        format!("v1 {me}\nhello\n")
    );

    // Outbound v2, through a tunnel.
    let mut stream = connect(v4);
    let me = stream.local_addr().unwrap();
    stream
        .write_all(b"CONNECT pp2:1 HTTP/1.1\r\nHost: pp2:1\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let reply = exchange(&mut stream, b"tunnelled\n");
    assert!(
        reply.ends_with(&format!("v2 {me}\ntunnelled\n")),
        "{reply:?}"
    );

    // Inbound from the trusted load balancer: its header's client is the client.
    let mut stream = connect(v4);
    let reply = exchange(
        &mut stream,
        b"PROXY TCP4 203.0.113.50 198.18.0.2 5555 22\r\nhello\n",
    );
    assert_eq!(reply, "v1 203.0.113.50:5555\nhello\n");
    // (HTTP clients do not half-close: muxer takes a client's EOF as "gone" and cancels.)
    let mut stream = connect(v4);
    stream
        .write_all(b"PROXY TCP4 203.0.113.51 198.18.0.2 5556 22\r\nGET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains("\"x-forwarded-for\":\"203.0.113.51\""),
        "{reply}"
    );
    muxer.wait_for_log("client=203.0.113.51:5556");
    // A trusted source may also connect without a header.
    let mut stream = connect(v4);
    let me = stream.local_addr().unwrap();
    assert_eq!(
        exchange(&mut stream, b"plain\n"),
        format!("v1 {me}\nplain\n")
    );

    // The same headers from an untrusted source (IPv6 here) are refused before anything is
    // forwarded.
    for spoof in [
        b"PROXY TCP4 203.0.113.66 198.18.0.2 5555 22\r\nhello\n".to_vec(),
        muxer::proxy_protocol::encode(
            muxer::config::ProxyVersion::V2,
            "203.0.113.66:1".parse().unwrap(),
            "198.18.0.2:22".parse().unwrap(),
        ),
    ] {
        let mut stream = connect(v6);
        assert_eq!(
            exchange(&mut stream, &spoof),
            "",
            "spoofed header forwarded"
        );
    }
    muxer.wait_for_log("rejected: PROXY header from an untrusted source");
    assert!(!muxer.log().contains("203.0.113.66"));

    // A flood of them cannot flood the log: one warning a second, the next naming how many it
    // left out. (Each connection's own close line stays: that is the access log.)
    let spoof = b"PROXY TCP4 203.0.113.66 198.18.0.2 5555 22\r\nhello\n";
    let flooding = std::time::Instant::now();
    for _ in 0..50 {
        let mut stream = connect(v6);
        assert_eq!(exchange(&mut stream, spoof), "");
    }
    let warning = "PROXY header from a source not in proxy_protocol.trusted";
    let warnings = muxer.log().matches(warning).count() as u64;
    // One a second at most: the two earlier ones, plus one per second the flood took, plus one.
    let allowed = 2 + flooding.elapsed().as_secs() + 1;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} warnings for 52 spoofed headers in {:?}",
        flooding.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1100));
    let mut stream = connect(v6);
    assert_eq!(exchange(&mut stream, spoof), "");
    wait_for("the warning with its count", Duration::from_secs(5), || {
        muxer
            .log()
            .lines()
            .filter(|line| line.contains(warning))
            .any(|line| !line.contains("suppressed=0"))
            .then_some(())
    });
}
