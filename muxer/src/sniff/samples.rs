//! Test inputs shared by the probe and driver tests: well-formed openings of every protocol, a
//! ClientHello builder, and junk.
use super::{ClientHelloInfo, Detected, HttpVersion};

/// Openings that probes must never recognise.
pub(crate) const JUNK: &[&[u8]] = &[
    b"\x00\x00\x00\x00",
    b"hello world\r\n",
    b"\xff\xfd\x18",
    b"get / HTTP/1.1\r\n",
    b"\x16\x03\x07",
    b"SSL-2.0\r\n",
    b"GETTY",
];

/// Builds a TLS 1.3-style ClientHello with optional SNI, ALPN, and a key_share-like extension of
/// `padding` bytes, then cuts the handshake message into `records` TLS records.
pub(crate) fn client_hello(
    sni: Option<&str>,
    alpn: &[&[u8]],
    padding: usize,
    records: usize,
) -> Vec<u8> {
    fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut extensions = Vec::new();
    if let Some(name) = sni {
        let mut list = vec![0u8];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&list);
        extension(&mut extensions, 0x0000, &body);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for protocol in alpn {
            list.push(protocol.len() as u8);
            list.extend_from_slice(protocol);
        }
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&list);
        extension(&mut extensions, 0x0010, &body);
    }
    // supported_versions: TLS 1.3
    extension(&mut extensions, 0x002b, &[2, 3, 4]);
    if padding > 0 {
        // An unknown extension type carrying opaque bytes, like a large key share would.
        extension(
            &mut extensions,
            0xfe0d,
            &vec![0x5a; padding.min(u16::MAX as usize - 8)],
        );
    }

    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0x22; 32]); // legacy session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);

    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);

    let records = records.max(message.len().div_ceil(1 << 14)).max(1);
    let chunk = message.len().div_ceil(records);
    let mut out = Vec::new();
    for fragment in message.chunks(chunk) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
        out.extend_from_slice(fragment);
    }
    out
}

/// A sample opening of every protocol with what the probes must report for it.
pub(crate) fn all_samples() -> Vec<(Vec<u8>, Detected)> {
    let http1 = Detected::Http(HttpVersion::Http1);
    vec![
        (
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec(),
            Detected::Ssh,
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            http1.clone(),
        ),
        (b"PATCH /x HTTP/1.1\r\n".to_vec(), http1.clone()),
        (
            b"CONNECT node-2:22 HTTP/1.1\r\n\r\n".to_vec(),
            http1.clone(),
        ),
        (b"OPTIONS * HTTP/1.1\r\n".to_vec(), http1),
        (
            super::http::H2_PREFACE.to_vec(),
            Detected::Http(HttpVersion::Http2PriorKnowledge),
        ),
        (
            client_hello(Some("llm.example"), &[b"h2"], 1500, 3),
            Detected::Tls(ClientHelloInfo {
                sni: Some("llm.example".into()),
                alpn: vec![b"h2".to_vec()],
            }),
        ),
    ]
}
