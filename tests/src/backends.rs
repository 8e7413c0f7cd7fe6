//! Real servers for muxer to forward to: an HTTP/1.1 + HTTP/2 server (hyper) and a TCP echo
//! server. Each binds inside a namespace and runs on its own thread until dropped.
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
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

/// Starts an HTTP server named `name` on `address` inside `netns`:
/// - `GET /v1/models`: a JSON model list whose model id is `name`;
/// - `POST /sha256`: streams the request body and answers `<hex sha256> <length>`;
/// - anything else: `<name> <method> <path>` as text.
pub fn http(netns: &Netns, address: SocketAddr, name: &'static str) -> Backend {
    start(netns, address, move |stream| async move {
        let service = hyper::service::service_fn(move |request| handle(request, name));
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .await;
    })
}

async fn handle(
    request: Request<Incoming>,
    name: &'static str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let text = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => {
            let body =
                serde_json::json!({"object": "list", "data": [{"id": name, "object": "model"}]});
            return Ok(Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("response"));
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
            format!("{} {length}", crate::to_hex(&hasher.finalize()))
        }
        _ => format!("{name} {method} {path}"),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
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
