//! HTTPS on port 22: TLS terminated by muxer (self-signed, or certificate files), through the
//! kernel redirect, with real curl, openssl and the official `openai` Python client; per-route
//! keys; SSH on the same port unaffected.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use muxer_tests::backends::{self, HttpBackend, HttpOptions};
use muxer_tests::muxer::Muxer;
use muxer_tests::netns::{Link, SERVER_V4};
use muxer_tests::sshd::Sshd;
use muxer_tests::{netns_available, wait_for};

const READY: &str = "127.0.0.1:2222";
const KEY: &str = "sk-test-key";

/// The server namespace: sshd on 22, the model API (counted) on 30000, a WebSocket echo on
/// 30002, muxer with a terminating TLS route.
struct Host {
    link: Link,
    sshd: Sshd,
    api: HttpBackend,
    _ws: backends::Backend,
    state: tempfile::TempDir,
    muxer: Muxer,
}

/// `tls_route` is the body of the `[[tls.route]]` table.
fn host(tls_route: &str) -> Host {
    let link = Link::new();
    let sshd = Sshd::start(&link.server, &["0.0.0.0:22", "[::]:22"]);
    let api = backends::http_with(
        &link.server,
        "127.0.0.1:30000".parse().unwrap(),
        "llm",
        HttpOptions::default(),
    );
    let ws = backends::websocket_echo(&link.server, "127.0.0.1:30002".parse().unwrap());
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "state_dir = \"{state}\"\n\
         [listen]\naddresses = [\"0.0.0.0:2222\", \"[::]:2222\"]\n\
         [redirect]\nmode = \"tc\"\ninterfaces = [\"veth-s\"]\nports = [22]\n\
         [ssh]\nupstream = \"127.0.0.1:22\"\n\
         [http]\n\
         [[http.route]]\npath = \"/ws\"\nupstreams = [\"127.0.0.1:30002\"]\nrequire_tls = true\n\
         [[http.route]]\nupstreams = [\"127.0.0.1:30000\"]\nrequire_tls = true\n\
         [http.route.auth]\nbearer = [\"{KEY}\"]\n\
         [[tls.route]]\n{tls_route}\n",
        state = state.path().display()
    );
    let muxer = Muxer::start(&link.server, &config, READY.parse().unwrap());
    Host {
        link,
        sshd,
        api,
        _ws: ws,
        state,
        muxer,
    }
}

impl Host {
    fn self_signed_cert(&self) -> PathBuf {
        self.state.path().join("tls/self-signed-cert.pem")
    }

    /// curl from the client with `args`; returns (exit code, stdout).
    fn curl(&self, args: &[&str]) -> (i32, String) {
        let output = self
            .link
            .client
            .run("curl", &[&["-sS", "--max-time", "10"], args].concat());
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    /// `/v1/models` with the key, trusting only a certificate with the public key `pin`.
    fn models_with_pin(&self, pin: &str) {
        let (code, body) = self.curl(&[
            "--pinnedpubkey",
            pin,
            "-k",
            "-H",
            BEARER,
            &url("/v1/models"),
        ]);
        assert_eq!(code, 0, "{body}");
        assert!(body.contains("\"llm\""), "{body}");
    }

    fn requests(&self) -> u64 {
        self.api.observed.requests.load(Ordering::Relaxed)
    }

    fn ssh_through_muxer(&self) -> bool {
        self.sshd
            .connection(&self.link.client, &SERVER_V4.to_string(), 22, &[])
            .through_muxer()
    }
}

fn url(path: &str) -> String {
    format!("https://{SERVER_V4}:22{path}")
}

const BEARER: &str = "Authorization: Bearer sk-test-key";

#[test]
fn the_api_answers_over_https_only_and_only_with_the_key_while_ssh_shares_the_port() {
    if !netns_available(
        "the_api_answers_over_https_only_and_only_with_the_key_while_ssh_shares_the_port",
    ) {
        return;
    }
    // Beside the terminating route, a passthrough one to a TLS server of its own.
    let host = host(
        "sni = \"gpu.test\"\nterminate = true\nself_signed = true\ndefault = true\n\
         [[tls.route]]\nsni = \"pass.test\"\nupstream = \"127.0.0.1:30003\"",
    );
    let cert = host.self_signed_cert();
    let cacert = cert.display().to_string();
    let _passthrough = tls_server(&host, "127.0.0.1:30003");
    let (code, page) = host.curl(&[
        "-k",
        "--resolve",
        &format!("pass.test:22:{SERVER_V4}"),
        "https://pass.test:22/",
    ]);
    assert_eq!(code, 0, "{page}");
    assert!(
        page.contains("s_server"),
        "the passthrough server answered: {page}"
    );

    // `muxer cert` prints the pin of the certificate muxer generated.
    let pin = printed_pin(&host.muxer.config_path());

    // By IP address (no SNI) through port 22: the default route's certificate, its IP in it.
    let (code, body) = host.curl(&["--cacert", &cacert, "-H", BEARER, &url("/v1/models")]);
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("\"llm\""), "{body}");
    host.models_with_pin(&pin);
    let wrong_pin = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let (code, _) = host.curl(&["--pinnedpubkey", wrong_pin, "-k", &url("/v1/models")]);
    assert_eq!(code, 90, "curl must refuse a certificate with another key");
    // HTTP/2 by ALPN, and the upstream is told the client used HTTPS.
    let (code, body) = host.curl(&[
        "--http2",
        "--cacert",
        &cacert,
        "-H",
        BEARER,
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url("/v1/models"),
    ]);
    assert_eq!((code, body.as_str()), (0, "2"));
    let (_, headers) = host.curl(&["--cacert", &cacert, "-H", BEARER, &url("/headers")]);
    let headers: serde_json::Value = serde_json::from_str(&headers).expect("headers JSON");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert!(
        headers.get("authorization").is_none(),
        "the key is stripped: {headers}"
    );
    // SSE over TLS.
    let (code, events) = host.curl(&[
        "-N",
        "--cacert",
        &cacert,
        "-H",
        BEARER,
        &url("/sse?count=5"),
    ]);
    assert_eq!(code, 0);
    assert_eq!(events.matches("data: ").count(), 5, "{events}");

    // No key, a wrong key, and plain HTTP: refused, and nothing reaches the upstream.
    let before = host.requests();
    for args in [
        vec![
            "--cacert",
            &cacert,
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "-D",
            "-",
        ],
        vec![
            "--cacert",
            &cacert,
            "-H",
            "Authorization: Bearer sk-wrong",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
        ],
    ] {
        let (_, out) = host.curl(&[args.as_slice(), &[url("/v1/models").as_str()]].concat());
        assert!(out.ends_with("401"), "{out}");
    }
    let (_, www) = host.curl(&[
        "--cacert",
        &cacert,
        "-o",
        "/dev/null",
        "-D",
        "-",
        &url("/v1/models"),
    ]);
    assert!(
        www.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{www}"
    );
    let (_, plain) = host.curl(&[
        "-H",
        BEARER,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://{SERVER_V4}:22/v1/models"),
    ]);
    assert_eq!(plain, "403", "require_tls refuses plain HTTP");
    assert_eq!(
        host.requests(),
        before,
        "refused requests reached the upstream"
    );
    // Ten failures within a minute from one network: then 429, the right key included.
    let code_of = |key: &str| {
        host.curl(&[
            "--cacert",
            &cacert,
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url("/v1/models"),
        ])
        .1
    };
    // Three failures above (no key twice, a wrong key), seven more make ten.
    let statuses: Vec<String> = (0..7).map(|_| code_of("sk-wrong")).collect();
    assert!(statuses.iter().all(|s| s == "401"), "{statuses:?}");
    assert_eq!(code_of(KEY), "429", "throttled after ten failures");
    assert_eq!(
        host.requests(),
        before,
        "throttled requests reached the upstream"
    );

    // SSH on the same port is unaffected.
    assert!(host.ssh_through_muxer());
    // The self-signed certificate is kept across restarts: a new muxer serves the same key.
    let config = std::fs::read_to_string(host.muxer.config_path()).unwrap();
    let mut host = host;
    host.muxer
        .process
        .signal_and_wait(rustix::process::Signal::TERM);
    let restarted = Muxer::start(&host.link.server, &config, READY.parse().unwrap());
    assert_eq!(printed_pin(&restarted.config_path()), pin);
    host.models_with_pin(&pin);
    host.muxer = restarted;
}

/// The public-key pin `muxer cert` prints for the config at `path`.
fn printed_pin(path: &Path) -> String {
    let printed = Command::new(muxer_tests::muxer::binary())
        .args(["cert", "--config"])
        .arg(path)
        .output()
        .expect("muxer cert");
    assert!(printed.status.success(), "{printed:?}");
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.contains("--pinnedpubkey"), "{printed}");
    printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("public-key pin: "))
        .unwrap_or_else(|| panic!("no pin in {printed}"))
        .to_owned()
}

#[test]
fn the_openai_client_streams_a_chat_completion_and_websockets_work_over_tls() {
    if !netns_available("the_openai_client_streams_a_chat_completion_and_websockets_work_over_tls")
    {
        return;
    }
    let host = host("sni = \"gpu.test\"\nterminate = true\nself_signed = true\ndefault = true");
    let cert = host.self_signed_cert();
    let python = std::env::var_os("MUXER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openai-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} missing: `cargo xtask test` installs the openai client",
        python.display()
    );
    let script = format!(
        "import httpx, openai\n\
         def client(key):\n\
         \x20   return openai.OpenAI(base_url='https://{SERVER_V4}:22/v1', api_key=key,\n\
         \x20       http_client=httpx.Client(verify='{cert}'), max_retries=0)\n\
         stream = client('{KEY}').chat.completions.create(model='llm', stream=True,\n\
         \x20   messages=[{{'role': 'user', 'content': 'hi'}}])\n\
         print(''.join(c.choices[0].delta.content or '' for c in stream if c.choices))\n\
         try:\n\
         \x20   client('sk-wrong').models.list()\n\
         except openai.AuthenticationError as error:\n\
         \x20   print('refused', error.status_code)\n",
        cert = cert.display()
    );
    let output = host
        .link
        .client
        .command(&python.display().to_string())
        .args(["-c", &script])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, "Hello from the GPU\nrefused 401\n");

    // A WebSocket over TLS, through port 22.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let connector = connector(&[std::fs::read(&cert).unwrap()]);
    let stream = host
        .link
        .client
        .enter(|| std::net::TcpStream::connect((SERVER_V4, 22)).expect("connect"));
    runtime().block_on(async {
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let name =
            rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from(SERVER_V4).into());
        let tls = connector.connect(name, stream).await.expect("TLS");
        let (mut socket, response) =
            tokio_tungstenite::client_async(format!("wss://{SERVER_V4}:22/ws"), tls)
                .await
                .expect("WebSocket");
        assert_eq!(response.status(), 101);
        socket.send(Message::text("over TLS")).await.unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::text("over TLS")
        );
        socket.close(None).await.unwrap();
    });
}

/// `openssl s_server -www` (its status page) on `address` in the server namespace, with a
/// certificate of its own.
fn tls_server(host: &Host, address: &str) -> muxer_tests::process::Running {
    let dir = host.state.path().join("passthrough");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let mut command = host.link.server.command("openssl");
    command
        .args(["s_server", "-www", "-accept", address, "-cert"])
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"));
    let server = muxer_tests::process::Running::spawn("s_server", command, dir.join("log"));
    let socket: std::net::SocketAddr = address.parse().unwrap();
    wait_for("s_server to listen", Duration::from_secs(10), || {
        host.link
            .server
            .enter(|| std::net::TcpStream::connect(socket).ok())
            .map(drop)
    });
    server
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A TLS client trusting the PEM certificates `roots`.
fn connector(roots: &[Vec<u8>]) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        store
            .add(rustls_pki_types::CertificateDer::from_pem_slice(pem).unwrap())
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A certificate for `gpu.test` and 198.18.0.2 with a fresh key: (cert PEM, key PEM).
fn certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["gpu.test".to_owned(), SERVER_V4.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The SHA-256 fingerprint of the certificate `openssl s_client` gets from port 22 for `sni`.
fn served_fingerprint(link: &Link, sni: &str) -> String {
    let script = format!(
        "openssl s_client -connect {SERVER_V4}:22 -servername {sni} </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    );
    link.client.run_ok("sh", &["-c", &script]).trim().to_owned()
}

fn fingerprint_of(pem: &Path) -> String {
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .expect("openssl x509");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn a_reload_swaps_the_certificate_and_keeps_open_connections() {
    if !netns_available("a_reload_swaps_the_certificate_and_keeps_open_connections") {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let (first_cert, first_key) = certificate();
    std::fs::write(&cert_path, &first_cert).unwrap();
    std::fs::write(&key_path, &first_key).unwrap();
    // A second terminating route, by name: its own (self-signed) certificate.
    let host = host(&format!(
        "sni = \"gpu.test\"\nterminate = true\ncert = \"{}\"\nkey = \"{}\"\n\
         [[tls.route]]\nsni = \"api.test\"\nterminate = true\nself_signed = true",
        cert_path.display(),
        key_path.display()
    ));
    let first = fingerprint_of(&cert_path);
    assert_eq!(served_fingerprint(&host.link, "gpu.test"), first);
    assert_eq!(
        served_fingerprint(&host.link, "api.test"),
        fingerprint_of(&host.self_signed_cert()),
        "the certificate is picked by SNI"
    );

    // A keep-alive HTTPS connection, one request answered.
    let mut session = host
        .link
        .client
        .command("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("{SERVER_V4}:22"),
            "-servername",
            "gpu.test",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut input = session.stdin.take().unwrap();
    let (lines, _reader) = {
        let (sender, receiver) = std::sync::mpsc::channel();
        let output = session.stdout.take().unwrap();
        // Chunks, not lines: a JSON body ends without a newline.
        let reader = std::thread::spawn(move || {
            let mut output = output;
            let mut chunk = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut output, &mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(read) => {
                        let text = String::from_utf8_lossy(&chunk[..read]).into_owned();
                        if sender.send(text).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        (receiver, reader)
    };
    let request = format!("GET /v1/models HTTP/1.1\r\nHost: gpu.test\r\n{BEARER}\r\n\r\n");
    let answered = |lines: &std::sync::mpsc::Receiver<String>| {
        let mut seen = String::new();
        wait_for(
            "a response on the open connection",
            Duration::from_secs(5),
            || {
                if let Ok(chunk) = lines.recv_timeout(Duration::from_millis(100)) {
                    seen.push_str(&chunk);
                }
                seen.contains("\"llm\"").then_some(())
            },
        )
    };
    input.write_all(request.as_bytes()).unwrap();
    input.flush().unwrap();
    answered(&lines);

    // A broken key file: the reload is refused, the first certificate stays.
    std::fs::write(&key_path, "not a key").unwrap();
    let refused = host
        .muxer
        .reload(&std::fs::read_to_string(host.muxer.config_path()).unwrap());
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(said.contains("tls.route[0].cert"), "{said}");
    assert_eq!(served_fingerprint(&host.link, "gpu.test"), first);

    // New files and a reload: new connections get the new certificate, the open one goes on.
    let (second_cert, second_key) = certificate();
    std::fs::write(&cert_path, &second_cert).unwrap();
    std::fs::write(&key_path, &second_key).unwrap();
    let reloaded = host
        .muxer
        .reload(&std::fs::read_to_string(host.muxer.config_path()).unwrap());
    assert!(reloaded.status.success(), "{reloaded:?}");
    let second = fingerprint_of(&cert_path);
    assert_ne!(first, second);
    assert_eq!(served_fingerprint(&host.link, "gpu.test"), second);
    input.write_all(request.as_bytes()).unwrap();
    input.flush().unwrap();
    answered(&lines);
    drop(input);
    let _ = session.kill();
    let _ = session.wait();
    assert!(host.ssh_through_muxer());
}
