//! TLS termination (`[[tls.route]]` with `terminate = true`, docs/tls.md): the route's
//! certificate — from PEM files, re-read on reload, or self-signed once into `state_dir` — is
//! served with rustls (ring), HTTP/2 or HTTP/1.1 by ALPN, and the decrypted stream goes to the
//! HTTP router like a plain connection.
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tracing::info;

use crate::certs::{read_identity, self_signed_paths, server_config, Identity};
use crate::config::TlsRoute;
use crate::http::stream::{ClientStream, Replayed, Traffic};
use crate::sniff::HttpVersion;

/// The names a self-signed certificate covers: the route's name, `localhost`, and every address
/// of this host at generation time (clients mostly connect by IP address).
fn self_signed_names(sni: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if !sni.starts_with('*') {
        names.push(sni.to_ascii_lowercase());
    }
    if let Ok(addresses) = nix::ifaddrs::getifaddrs() {
        for address in addresses {
            let ip: Option<IpAddr> = address.address.and_then(|address| {
                address
                    .as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) =
                ip.filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            {
                names.push(ip.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The self-signed identity in `state_dir`, generated (ECDSA P-256) on first use and kept.
fn self_signed(state_dir: &Path, sni: &str) -> Result<Identity, String> {
    let (key_path, cert_path) = self_signed_paths(state_dir);
    if key_path.exists() && cert_path.exists() {
        return read_identity(&cert_path, &key_path);
    }
    let failed = |what: &str, error: &dyn std::fmt::Display| format!("{what}: {error}");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|error| failed("generating a key", &error))?;
    let names = self_signed_names(sni);
    let mut params =
        rcgen::CertificateParams::new(names.clone()).map_err(|error| failed("names", &error))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "muxer self-signed");
    let cert = params
        .self_signed(&key)
        .map_err(|error| failed("signing", &error))?;
    let dir = key_path.parent().unwrap_or(state_dir);
    std::fs::create_dir_all(dir).map_err(|error| failed(&dir.display().to_string(), &error))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())
        .map_err(|error| failed(&cert_path.display().to_string(), &error))?;
    info!(cert = %cert_path.display(), ?names, "generated a self-signed certificate; `muxer cert` prints its pin");
    read_identity(&cert_path, &key_path)
}

/// Writes `contents` to `path`, readable by this user only from the start.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(|error| format!("{}: {error}", path.display()))
}

/// The server configuration of a terminating route (generating its self-signed identity the
/// first time).
pub(crate) fn route_config(
    route: &TlsRoute,
    state_dir: &Path,
) -> Result<Arc<ServerConfig>, String> {
    let (certs, key) = match (&route.cert, &route.key) {
        (Some(cert), Some(key)) => read_identity(cert, key)?,
        _ => self_signed(state_dir, &route.sni)?,
    };
    server_config(certs, key)
}

/// `sha256//BASE64` of the public key of the PEM private key at `key` (the SubjectPublicKeyInfo
/// its certificate carries): curl's `--pinnedpubkey` format.
pub fn pin(key: &Path) -> Result<String, String> {
    let pem =
        std::fs::read_to_string(key).map_err(|error| format!("{}: {error}", key.display()))?;
    let key =
        rcgen::KeyPair::from_pem(&pem).map_err(|error| format!("{}: {error}", key.display()))?;
    use rcgen::PublicKeyData as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.subject_public_key_info());
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// A client connection whose TLS muxer terminated.
pub(crate) struct TlsClient(TlsStream<Replayed<TcpStream>>);

/// Completes the TLS handshake on `client` (whose first bytes, `prefix`, the sniffer read)
/// within `timeout`; returns the stream and the HTTP version ALPN chose.
pub(crate) async fn accept(
    config: Arc<ServerConfig>,
    client: TcpStream,
    prefix: Vec<u8>,
    timeout: Duration,
) -> io::Result<(TlsClient, HttpVersion)> {
    // The raw bytes are not counted: the HTTP layer counts what was decrypted.
    let replayed = Replayed::new(prefix, client, Arc::new(Traffic::default()));
    let accepting = tokio_rustls::TlsAcceptor::from(config).accept(replayed);
    let stream = tokio::time::timeout(timeout, accepting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let version = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => HttpVersion::Http2PriorKnowledge,
        _ => HttpVersion::Http1,
    };
    Ok((TlsClient(stream), version))
}

impl AsyncRead for TlsClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsFd for TlsClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl ClientStream for TlsClient {
    fn tcp(&self) -> &TcpStream {
        self.0.get_ref().0.get_ref()
    }

    fn has_buffered(&mut self) -> bool {
        self.0
            .get_mut()
            .1
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
    }
}
