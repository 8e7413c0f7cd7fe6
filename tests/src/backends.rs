//! Real servers for muxer to forward to: an HTTP/1.1 + HTTP/2 server (hyper) and a TCP echo
//! server. Each binds inside a namespace and runs on its own thread until dropped.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::netns::Netns;

/// A server running on its own thread; stopped when dropped.
pub struct Backend {
    /// Where it listens.
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start<F, Fut>(netns: &Netns, address: SocketAddr, serve: F) -> Backend
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = netns
        .enter(|| std::net::TcpListener::bind(address))
        .expect("bind backend");
    listener.set_nonblocking(true).expect("nonblocking");
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let accept = async {
                loop {
                    if let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(serve(stream));
                    }
                }
            };
            tokio::select! {
                _ = accept => {}
                _ = stopped => {}
            }
        });
        runtime.shutdown_background();
    });
    Backend {
        address,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// What an HTTP backend observed, for tests to check.
#[derive(Debug, Default)]
pub struct Observed {
    /// When each `/sse` stream was abandoned by its reader (muxer dropped it).
    pub sse_cancelled: Mutex<Vec<Instant>>,
    /// Number of requests served.
    pub requests: AtomicU64,
    /// Number of TCP connections accepted.
    pub connections: AtomicU64,
}

/// Options of [`http_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpOptions {
    /// Close idle keep-alive connections after this long (like uvicorn's `timeout_keep_alive`).
    pub keep_alive: Option<Duration>,
}

/// An HTTP backend and what it observed.
pub struct HttpBackend {
    /// The server.
    pub backend: Backend,
    /// What it saw.
    pub observed: Arc<Observed>,
}

/// Starts an HTTP server named `name` on `address` inside `netns`; see [`http_with`].
pub fn http(netns: &Netns, address: SocketAddr, name: &'static str) -> Backend {
    http_with(netns, address, name, HttpOptions::default()).backend
}

/// Starts an HTTP/1.1 + HTTP/2 server named `name` on `address` inside `netns`:
/// - `GET /v1/models`: a JSON model list whose model id is `name`;
/// - `POST /sha256`: streams the request body and answers `<hex sha256> <length>`;
/// - `GET /bytes/N`: streams N bytes of [`crate::test_data`] in 64 KiB chunks;
/// - `GET /sse`: a `text/event-stream` with one event every 50 ms, each carrying its emission
///   time in microseconds since the Unix epoch, until the reader goes away (or `?count=N` events);
/// - `GET /headers`: the request headers as a JSON object;
/// - `GET /slow?ms=N`: answers after N milliseconds;
/// - `POST /v1/chat/completions`: OpenAI's chat completion, streamed (server-sent events) when
///   the request asks for `"stream": true`;
/// - anything else: `<name> <method> <path-and-query>` as text.
pub fn http_with(
    netns: &Netns,
    address: SocketAddr,
    name: &'static str,
    options: HttpOptions,
) -> HttpBackend {
    let observed = Arc::new(Observed::default());
    let seen = Arc::clone(&observed);
    let backend = start(netns, address, move |stream| {
        let seen = Arc::clone(&seen);
        async move {
            seen.connections.fetch_add(1, Ordering::Relaxed);
            let service =
                hyper::service::service_fn(move |request| handle(request, name, Arc::clone(&seen)));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Some(keep_alive) = options.keep_alive {
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(keep_alive);
            }
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
    });
    HttpBackend { backend, observed }
}

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into()).boxed_unsync()
}

/// Microseconds since the Unix epoch: comparable across processes on this machine.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64
}

async fn handle(
    request: Request<Incoming>,
    name: &'static str,
    seen: Arc<Observed>,
) -> Result<Response<TestBody>, Infallible> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let path = request.uri().path().to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let method = request.method().clone();
    let response = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            let body =
                serde_json::json!({"object": "list", "data": [{"id": name, "object": "model"}]});
            Response::builder()
                .header("content-type", "application/json")
                .body(full(body.to_string()))
        }
        ("GET", "/headers") => {
            let mut map = serde_json::Map::new();
            for (key, value) in request.headers() {
                map.insert(key.as_str().to_owned(), value.to_str().unwrap_or("").into());
            }
            Response::builder().body(full(serde_json::Value::Object(map).to_string()))
        }
        ("POST", "/sha256") => {
            let mut body = request.into_body();
            let mut hasher = sha2::Sha256::new();
            let mut length = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    length += data.len();
                }
            }
            Response::builder().body(full(format!(
                "{} {length}",
                crate::to_hex(&hasher.finalize())
            )))
        }
        ("GET", "/sse") => {
            // `?count=N` ends the stream after N events; without it, it runs until abandoned.
            let count: Option<u32> = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("count="))
                .and_then(|n| n.parse().ok());
            let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_millis(50));
                for _ in 0..count.unwrap_or(u32::MAX) {
                    ticker.tick().await;
                    let event = Bytes::from(format!("data: {}\n\n", now_micros()));
                    if sender.send(event).await.is_err() {
                        seen.sse_cancelled.lock().unwrap().push(Instant::now());
                        return;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(ChannelBody { receiver }.boxed_unsync())
        }
        ("POST", "/v1/chat/completions") => {
            // OpenAI's streamed chat completion: the reply in three chunks, then `[DONE]`.
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            let asked: serde_json::Value = body
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default();
            let chunk = |delta: serde_json::Value, finish: Option<&str>| {
                let chunk = serde_json::json!({
                    "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1,
                    "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                });
                Bytes::from(format!("data: {chunk}\n\n"))
            };
            if asked["stream"] == true {
                let mut events = vec![chunk(serde_json::json!({"role": "assistant"}), None)];
                for word in ["Hello", " from", " the", " GPU"] {
                    events.push(chunk(serde_json::json!({"content": word}), None));
                }
                events.push(chunk(serde_json::json!({}), Some("stop")));
                events.push(Bytes::from_static(b"data: [DONE]\n\n"));
                let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
                tokio::spawn(async move {
                    for event in events {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if sender.send(event).await.is_err() {
                            return;
                        }
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(ChannelBody { receiver }.boxed_unsync())
            } else {
                let reply = serde_json::json!({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": name,
                    "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "Hello from the GPU"}}],
                });
                Response::builder()
                    .header("content-type", "application/json")
                    .body(full(reply.to_string()))
            }
        }
        ("GET", "/slow") => {
            // `?ms=N`: the response head comes after N milliseconds.
            let delay: u64 = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Response::builder().body(full(format!("{name} slow")))
        }
        ("GET", bytes) if bytes.starts_with("/bytes/") => {
            let total: usize = bytes["/bytes/".len()..].parse().unwrap_or(0);
            Response::builder().body(
                GeneratedBody {
                    remaining: total,
                    generator: crate::DataGenerator::new(),
                }
                .boxed_unsync(),
            )
        }
        _ => Response::builder().body(full(format!("{name} {method} {target}"))),
    };
    Ok(response.expect("response"))
}

/// A body fed by a channel; dropping it makes the sender's `send` fail.
struct ChannelBody {
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.receiver
            .poll_recv(cx)
            .map(|event| event.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }
}

/// A body of `remaining` bytes of [`crate::test_data`], generated as it is read.
struct GeneratedBody {
    remaining: usize,
    generator: crate::DataGenerator,
}

impl hyper::body::Body for GeneratedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let chunk = self.remaining.min(64 * 1024);
        self.remaining -= chunk;
        let bytes: Vec<u8> = (0..chunk).map(|_| self.generator.next_byte()).collect();
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(bytes)))))
    }
}

/// Starts a WebSocket echo server on `address` inside `netns` (tokio-tungstenite): every text or
/// binary message comes back unchanged.
pub fn websocket_echo(netns: &Netns, address: SocketAddr) -> Backend {
    start(netns, address, |stream| async move {
        use futures_util::{SinkExt, StreamExt};
        let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                return;
            }
        }
    })
}

/// Starts a server on `address` inside `netns` that checks for a PROXY protocol header (parsed
/// with the `ppp` crate, independently of muxer) and answers with what it found —
/// `v1 <client>`, `v2 <client>`, or `none` — followed by every byte after it (read until the
/// client half-closes), then closes.
pub fn proxy_header_echo(netns: &Netns, address: SocketAddr) -> Backend {
    start(netns, address, |mut stream| async move {
        // Clients half-close after their first bytes: read until EOF (muxer passes the FIN on).
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut buf)).await;
        let (found, rest): (String, &[u8]) = match ppp::HeaderResult::parse(&buf) {
            ppp::HeaderResult::V1(Ok(header)) => {
                let client = match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v1::Addresses::Unknown => "unknown".into(),
                };
                (format!("v1 {client}"), &buf[header.header.len()..])
            }
            ppp::HeaderResult::V2(Ok(header)) => {
                let client = match header.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        SocketAddr::from((a.source_address, a.source_port)).to_string()
                    }
                    _ => "unknown".into(),
                };
                (format!("v2 {client}"), &buf[header.header.len()..])
            }
            _ => ("none".to_owned(), &buf[..]),
        };
        let mut reply = format!("{found}\n").into_bytes();
        reply.extend_from_slice(rest);
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    })
}

/// Starts a TCP echo server on `address` inside `netns`: it echoes every byte, and when the client
/// half-closes it half-closes too.
pub fn echo(netns: &Netns, address: SocketAddr) -> Backend {
    start(netns, address, |mut stream| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
    })
}

/// Starts an HTTP server on `address` inside `netns` that answers every request with its raw
/// head, exactly as received (request line and headers), then closes: for checking what a proxy
/// put on the wire.
pub fn raw_head_echo(netns: &Netns, address: SocketAddr) -> Backend {
    start(netns, address, |mut stream| async move {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            head.len()
        )
        .into_bytes();
        reply.extend_from_slice(&head);
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    })
}

/// Starts a server on `address` inside `netns` that reads a request head and answers every
/// connection with `reply`, exactly as given, then keeps the connection open for a second: an
/// upstream that misbehaves on purpose (e.g. a `101` for a protocol nobody asked for).
pub fn fixed_reply(netns: &Netns, address: SocketAddr, reply: &'static [u8]) -> Backend {
    start(netns, address, move |mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        if stream.write_all(reply).await.is_ok() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}
