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

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::config::{Http, Tunnel};
use crate::metrics::HttpMetrics;
use crate::runtime::Runtime;

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
    /// Per-request metrics.
    pub metrics: Arc<HttpMetrics>,
}

impl HttpContext {
    /// Compiles `[http]` and `[[tunnel]]`.
    pub fn new(settings: Http, tunnels: &[Tunnel], metrics: Arc<HttpMetrics>) -> HttpContext {
        HttpContext {
            metrics,
            router: router::Router::new(&settings.routes, settings.failure_cooldown),
            clients: upstream::Clients::new(&settings),
            tunnels: tunnel::Tunnels::new(tunnels),
            settings,
        }
    }
}

/// Serves HTTP on `client` (whose first bytes, `prefix`, were already read) until it closes, or
/// until shutdown, when in-flight requests finish and the connection closes. Each request uses
/// the router current when it arrives, so a reload applies to open keep-alive connections too.
pub async fn serve(
    client: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    context: Arc<HttpContext>,
    traffic: Arc<stream::Traffic>,
    runtime: Arc<Runtime>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let local = client.local_addr()?;
    let settings = &context.settings;
    let io = TokioIo::new(stream::Replayed::new(prefix, client, traffic));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32);
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
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    }
}
