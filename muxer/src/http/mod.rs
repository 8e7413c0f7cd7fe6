//! The HTTP router: serves a sniffed HTTP connection with hyper (HTTP/1.1 and HTTP/2 cleartext)
//! and forwards each request to its route's upstream. Layers, in request order: [`stream`] (the
//! sniffed bytes replayed), [`path`] (one canonical path), [`router`] (route choice), [`headers`]
//! (hop-by-hop, forwarding headers), [`proxy`] (forwarding, upgrades, errors), [`upstream`]
//! (pooled client, round robin, passive health), [`body`] (streaming adapters).

pub mod body;
pub mod headers;
pub mod path;
pub mod proxy;
pub mod router;
pub mod stream;
pub mod tunnel;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{Http, Tunnel};
use crate::metrics::HttpMetrics;
use crate::runtime::Runtime;
use crate::sniff::HttpVersion;

/// Everything the router needs, built once per configuration.
#[derive(Debug)]
pub struct HttpContext {
    /// Limits and timeouts.
    pub settings: Http,
    /// The routing table.
    pub router: router::Router,
    /// Upstream clients.
    pub clients: upstream::Clients,
    /// Named tunnels for `CONNECT`.
    pub tunnels: tunnel::Tunnels,
    /// TCP keepalive for tunnel upstream sockets (`splice.tcp_keepalive`).
    pub tcp_keepalive: std::time::Duration,
    /// Per-request metrics.
    pub metrics: Arc<HttpMetrics>,
}

impl HttpContext {
    /// Compiles `[http]` and `[[tunnel]]`.
    pub fn new(
        settings: Http,
        tunnels: &[Tunnel],
        tcp_keepalive: std::time::Duration,
        metrics: Arc<HttpMetrics>,
    ) -> HttpContext {
        HttpContext {
            tcp_keepalive,
            metrics,
            router: router::Router::new(&settings.routes, settings.failure_cooldown),
            clients: upstream::Clients::new(&settings),
            tunnels: tunnel::Tunnels::new(tunnels),
            settings,
        }
    }
}

/// Drives a hyper server connection until it ends; on shutdown, lets in-flight requests finish
/// and closes it.
macro_rules! drive {
    ($connection:expr, $shutdown:expr) => {{
        let connection = $connection;
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result,
            () = $shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    }};
}

/// Serves HTTP on `client` (whose first bytes, `prefix`, were already read) until it closes, or
/// until shutdown, when in-flight requests finish and the connection closes. `version` is what
/// the sniffer saw, so no second detection runs. Each request uses the router current when it
/// arrives, so a reload applies to open keep-alive connections too.
pub async fn serve(
    client: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    context: Arc<HttpContext>,
    traffic: Arc<stream::Traffic>,
    runtime: Arc<Runtime>,
    version: HttpVersion,
) -> Result<(), hyper::Error> {
    let local = client
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let io = TokioIo::new(stream::Replayed::new(prefix, client, traffic));
    let header_limit = context.settings.max_header_bytes;
    let header_read_timeout = context.settings.header_read_timeout;
    let shutdown = runtime.shutdown.clone();
    let service = hyper::service::service_fn(move |request| {
        let current = runtime
            .current
            .load()
            .http
            .clone()
            .unwrap_or_else(|| Arc::clone(&context));
        proxy::handle(request, current, peer, local)
    });
    match version {
        HttpVersion::Http1 => {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(header_limit)
                .keep_alive(true);
            drive!(
                builder.serve_connection(io, service).with_upgrades(),
                shutdown
            )
        }
        HttpVersion::Http2PriorKnowledge => {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_header_list_size(header_limit as u32);
            drive!(builder.serve_connection(io, service), shutdown)
        }
    }
}
