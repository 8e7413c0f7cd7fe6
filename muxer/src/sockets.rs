//! Socket helpers every part of the data path shares: the options each forwarded socket gets, and
//! a bounded connect that applies them.
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Sets the options every forwarded socket gets: no Nagle delay, TCP keepalive.
pub(crate) fn tune_socket<S: std::os::fd::AsFd>(stream: &S, keepalive: Duration) {
    let socket = SockRef::from(stream);
    // Failures here only cost latency or dead-peer detection; the connection still works.
    let _ = socket.set_tcp_nodelay(true);
    let interval = (keepalive / 4).max(Duration::from_secs(1));
    let _ = socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(interval),
    );
}

/// Connects to `upstream` within `timeout` (else `TimedOut`) and gives the socket the options
/// every forwarded socket gets ([`tune_socket`]).
pub(crate) async fn connect_tuned(
    upstream: &str,
    timeout: Duration,
    keepalive: Duration,
) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(upstream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    tune_socket(&stream, keepalive);
    Ok(stream)
}
