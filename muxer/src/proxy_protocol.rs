//! PROXY protocol (v1 text, v2 binary): headers muxer sends upstream carrying the real client
//! address, and headers it accepts from trusted sources (a provider's load balancer).
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant};

use crate::config::ProxyVersion;

/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// A v2 header is 16 bytes plus at most 64 KiB of addresses and TLVs.
const MAX_HEADER: usize = 16 + 65535;

/// The header to send upstream for a connection from `client` to `local`.
pub fn encode(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        ProxyVersion::V2 => Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (client, local),
        )
        .build()
        .expect("writing to a Vec cannot fail"),
    }
}

/// Both addresses in one family (an IPv4 client reaching an IPv6 socket shows up v4-mapped).
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical =
        |address: SocketAddr| SocketAddr::new(address.ip().to_canonical(), address.port());
    let (client, local) = (canonical(client), canonical(local));
    match (client.ip(), local.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) => (
            client,
            SocketAddr::new(IpAddr::from([0u8; 4]), local.port()),
        ),
        (IpAddr::V6(_), IpAddr::V4(v4)) => (
            client,
            SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), local.port()),
        ),
        _ => (client, local),
    }
}

/// Whether `bytes` begin like a PROXY header (v1 or v2).
pub fn looks_like_header(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ") || bytes.starts_with(V2_SIGNATURE)
}

/// Whether `bytes` could still grow into a PROXY header.
fn could_be_header(bytes: &[u8]) -> bool {
    b"PROXY ".starts_with(&bytes[..bytes.len().min(6)])
        || V2_SIGNATURE.starts_with(&bytes[..bytes.len().min(12)])
}

/// Whether `source` may send PROXY headers.
pub fn trusted(trusted: &[IpNet], source: IpAddr) -> bool {
    let source = source.to_canonical();
    trusted.iter().any(|net| net.contains(&source))
}

/// A PROXY header that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// The header is malformed.
    #[error("malformed PROXY header")]
    Malformed,
    /// The connection ended or timed out inside the header.
    #[error("incomplete PROXY header")]
    Incomplete,
    /// Reading failed.
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// What a trusted source sent first.
#[derive(Debug)]
pub struct Inbound {
    /// The client address the header carries (`None`: no header, or a LOCAL/UNKNOWN one).
    pub client: Option<SocketAddr>,
    /// Bytes read after the header (or all bytes read, without one): the start of the stream.
    pub rest: Vec<u8>,
}

/// Reads a PROXY header from a trusted source if one is there. Without one, the bytes read so
/// far are handed back unchanged.
pub async fn read_inbound<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<Inbound, InboundError> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if !buf.is_empty() && !could_be_header(&buf) {
            return Ok(Inbound {
                client: None,
                rest: buf,
            });
        }
        if let Some((client, used)) = complete_header(&buf)? {
            let rest = buf.split_off(used);
            return Ok(Inbound { client, rest });
        }
        let want = chunk.len().min(MAX_HEADER - buf.len());
        let read = match timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Err(_) if buf.is_empty() => {
                return Ok(Inbound {
                    client: None,
                    rest: buf,
                })
            }
            Err(_) => return Err(InboundError::Incomplete),
            Ok(read) => read?,
        };
        if read == 0 {
            return if buf.is_empty() {
                Ok(Inbound {
                    client: None,
                    rest: buf,
                })
            } else {
                Err(InboundError::Incomplete)
            };
        }
        buf.extend_from_slice(&chunk[..read]);
    }
}

/// The header at the start of `buf` once it is complete: the client address it carries and its
/// length. `None` while more bytes are needed.
pub fn complete_header(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, InboundError> {
    if buf.starts_with(b"PROXY ") {
        let window = &buf[..buf.len().min(V1_MAX)];
        let Some(end) = window
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .map(|at| at + 2)
        else {
            return if buf.len() >= V1_MAX {
                Err(InboundError::Malformed)
            } else {
                Ok(None)
            };
        };
        let header = ppp::v1::Header::try_from(&buf[..end]).map_err(|_| InboundError::Malformed)?;
        return Ok(Some((v1_client(&header.addresses), end)));
    }
    if buf.len() >= 16 && buf.starts_with(V2_SIGNATURE) {
        let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if buf.len() < total {
            return Ok(None);
        }
        let header =
            ppp::v2::Header::try_from(&buf[..total]).map_err(|_| InboundError::Malformed)?;
        return Ok(Some((v2_client(&header.addresses), total)));
    }
    Ok(None)
}

fn v1_client(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_client(addresses: &ppp::v2::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn encodes_both_versions() {
        let v1 = encode(
            ProxyVersion::V1,
            addr("198.18.0.1:5000"),
            addr("198.18.0.2:22"),
        );
        assert_eq!(v1, b"PROXY TCP4 198.18.0.1 198.18.0.2 5000 22\r\n");
        let v2 = encode(
            ProxyVersion::V2,
            addr("[fd00::1]:5000"),
            addr("[fd00::2]:22"),
        );
        assert!(v2.starts_with(V2_SIGNATURE));
        assert_eq!(v2.len(), 16 + 36);
        // v4-mapped peers on a dual-stack socket become plain IPv4.
        let mapped = encode(
            ProxyVersion::V1,
            addr("[::ffff:198.18.0.1]:1"),
            addr("[::ffff:198.18.0.2]:2"),
        );
        assert_eq!(mapped, b"PROXY TCP4 198.18.0.1 198.18.0.2 1 2\r\n");
    }

    async fn inbound(chunks: Vec<Vec<u8>>) -> Result<Inbound, InboundError> {
        let (mut client, mut server) = tokio::io::duplex(1 << 17);
        tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            std::future::pending::<()>().await;
        });
        read_inbound(&mut server, Duration::from_millis(300)).await
    }

    #[tokio::test]
    async fn reads_headers_split_anywhere_and_keeps_what_follows() {
        for header in [
            encode(
                ProxyVersion::V1,
                addr("203.0.113.5:4444"),
                addr("198.18.0.2:22"),
            ),
            encode(
                ProxyVersion::V2,
                addr("203.0.113.5:4444"),
                addr("198.18.0.2:22"),
            ),
        ] {
            let mut stream = header.clone();
            stream.extend_from_slice(b"SSH-2.0-x\r\n");
            for at in 1..stream.len() {
                let result = inbound(vec![stream[..at].to_vec(), stream[at..].to_vec()])
                    .await
                    .unwrap();
                assert_eq!(
                    result.client,
                    Some(addr("203.0.113.5:4444")),
                    "split at {at}"
                );
                assert!(
                    b"SSH-2.0-x\r\n".starts_with(&result.rest),
                    "split at {at}: {:?}",
                    result.rest
                );
            }
        }
    }

    #[tokio::test]
    async fn no_header_hands_back_the_bytes() {
        let result = inbound(vec![b"SSH-2.0-x\r\n".to_vec()]).await.unwrap();
        assert_eq!(
            (result.client, result.rest),
            (None, b"SSH-2.0-x\r\n".to_vec())
        );
        let silent = inbound(vec![]).await.unwrap();
        assert!(silent.client.is_none() && silent.rest.is_empty());
    }

    #[tokio::test]
    async fn malformed_headers_are_errors() {
        assert!(matches!(
            inbound(vec![b"PROXY TCP4 nonsense\r\n".to_vec()]).await,
            Err(InboundError::Malformed)
        ));
        assert!(matches!(
            inbound(vec![b"PROXY TCP4 1.2.3".to_vec()]).await,
            Err(InboundError::Incomplete)
        ));
    }

    #[test]
    fn trust_and_detection() {
        let nets: Vec<IpNet> = vec!["198.18.0.0/24".parse().unwrap()];
        assert!(trusted(&nets, "198.18.0.9".parse().unwrap()));
        assert!(trusted(&nets, "::ffff:198.18.0.9".parse().unwrap()));
        assert!(!trusted(&nets, "fd00::1".parse().unwrap()));
        assert!(looks_like_header(b"PROXY TCP4 "));
        assert!(looks_like_header(V2_SIGNATURE));
        assert!(!looks_like_header(b"POST / HTTP/1.1"));
    }
}
