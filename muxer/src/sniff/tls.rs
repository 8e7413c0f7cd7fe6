//! TLS: a ClientHello, reassembled across handshake records, with its SNI and ALPN.
//!
//! Large post-quantum key shares push a ClientHello past one TLS record, and clients may split it
//! across reads anywhere, so the probe concatenates the fragments of every handshake record until
//! the whole ClientHello message is there, then parses it with `tls-parser`.
use std::borrow::Cow;

use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, SNIType, TlsExtension,
    TlsMessage, TlsMessageHandshake,
};

use super::{ClientHelloInfo, Detected, Verdict};

const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT_LEN: usize = 1 << 14;

/// Matches a complete TLS ClientHello, possibly spread over several handshake records.
pub fn probe(bytes: &[u8]) -> Verdict {
    match reassemble_client_hello(bytes) {
        Reassembly::Complete(message) => parse_client_hello(&message),
        Reassembly::Incomplete => Verdict::NeedMore,
        Reassembly::NotTls => Verdict::NoMatch,
    }
}

enum Reassembly<'a> {
    /// The whole handshake message (header included).
    Complete(Cow<'a, [u8]>),
    Incomplete,
    NotTls,
}

/// Walks the records in `bytes`, checking each header as soon as its bytes are there, and joins
/// the handshake fragments until the ClientHello message is whole.
fn reassemble_client_hello(bytes: &[u8]) -> Reassembly<'_> {
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut rest = bytes;
    loop {
        if !record_header_plausible(rest) {
            return Reassembly::NotTls;
        }
        if rest.len() < RECORD_HEADER_LEN {
            return Reassembly::Incomplete;
        }
        let fragment_len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if fragment_len == 0 || fragment_len > MAX_FRAGMENT_LEN {
            return Reassembly::NotTls;
        }
        let available = (rest.len() - RECORD_HEADER_LEN).min(fragment_len);
        let fragment = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + available];
        message = if message.is_empty() {
            Cow::Borrowed(fragment)
        } else {
            let mut joined = message.into_owned();
            joined.extend_from_slice(fragment);
            Cow::Owned(joined)
        };
        match handshake_state(&message) {
            HandshakeState::NotClientHello => return Reassembly::NotTls,
            HandshakeState::Complete(len) => {
                return Reassembly::Complete(match message {
                    Cow::Borrowed(b) => Cow::Borrowed(&b[..len]),
                    Cow::Owned(mut v) => {
                        v.truncate(len);
                        Cow::Owned(v)
                    }
                })
            }
            HandshakeState::Partial => {}
        }
        if available < fragment_len {
            return Reassembly::Incomplete;
        }
        rest = &rest[RECORD_HEADER_LEN + fragment_len..];
    }
}

/// Checks the header bytes of the record at the start of `bytes` that have arrived: content type
/// handshake, protocol major version 3, minor version 0 (SSL 3.0) to 4.
fn record_header_plausible(bytes: &[u8]) -> bool {
    let content_type_ok = bytes.first().is_none_or(|&b| b == CONTENT_TYPE_HANDSHAKE);
    let major_ok = bytes.get(1).is_none_or(|&b| b == 3);
    let minor_ok = bytes.get(2).is_none_or(|&b| b <= 4);
    content_type_ok && major_ok && minor_ok
}

enum HandshakeState {
    NotClientHello,
    Partial,
    /// The complete message is this many bytes long (header included).
    Complete(usize),
}

fn handshake_state(message: &[u8]) -> HandshakeState {
    match message.first() {
        None => return HandshakeState::Partial,
        Some(&HANDSHAKE_CLIENT_HELLO) => {}
        Some(_) => return HandshakeState::NotClientHello,
    }
    if message.len() < HANDSHAKE_HEADER_LEN {
        return HandshakeState::Partial;
    }
    let body_len =
        usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]);
    let total = HANDSHAKE_HEADER_LEN + body_len;
    if message.len() >= total {
        HandshakeState::Complete(total)
    } else {
        HandshakeState::Partial
    }
}

fn parse_client_hello(message: &[u8]) -> Verdict {
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
        parse_tls_message_handshake(message)
    else {
        return Verdict::NoMatch;
    };
    let mut info = ClientHelloInfo::default();
    if let Some(raw_extensions) = hello.ext {
        let Ok((_, extensions)) = parse_tls_client_hello_extensions(raw_extensions) else {
            return Verdict::NoMatch;
        };
        for extension in extensions {
            match extension {
                TlsExtension::SNI(names) => {
                    info.sni = names
                        .iter()
                        .find(|(kind, _)| *kind == SNIType::HostName)
                        .and_then(|(_, name)| std::str::from_utf8(name).ok())
                        .map(str::to_ascii_lowercase);
                }
                TlsExtension::ALPN(protocols) => {
                    info.alpn = protocols.iter().map(|p| p.to_vec()).collect();
                }
                _ => {}
            }
        }
    }
    Verdict::Match(Detected::Tls(info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::samples::client_hello;

    fn expected(sni: Option<&str>, alpn: &[&[u8]]) -> Verdict {
        Verdict::Match(Detected::Tls(ClientHelloInfo {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }))
    }

    #[test]
    fn one_record_hello() {
        let hello = client_hello(Some("Api.Example.COM"), &[b"h2", b"http/1.1"], 0, 1);
        assert_eq!(
            probe(&hello),
            expected(Some("api.example.com"), &[b"h2", b"http/1.1"])
        );
    }

    #[test]
    fn hello_without_extensions_of_interest() {
        let hello = client_hello(None, &[], 0, 1);
        assert_eq!(probe(&hello), expected(None, &[]));
    }

    #[test]
    fn hello_split_over_records_like_a_post_quantum_key_share() {
        // 1216-byte ML-KEM-768 share plus X25519: a ~1.8 KB hello, here forced over 4 records, and
        // a 20 KB one that cannot fit a single record at all.
        for (padding, records) in [(1216, 4), (20_000, 2), (20_000, 7)] {
            let hello = client_hello(Some("pq.example"), &[b"h2"], padding, records);
            assert_eq!(probe(&hello), expected(Some("pq.example"), &[b"h2"]));
            for end in 0..hello.len() {
                assert_eq!(probe(&hello[..end]), Verdict::NeedMore, "prefix {end}");
            }
        }
    }

    #[test]
    fn split_handshake_header_is_joined() {
        // Record boundaries inside the 4-byte handshake header itself.
        let hello = client_hello(Some("x.example"), &[], 0, 1);
        let message = &hello[RECORD_HEADER_LEN..];
        let mut split = Vec::new();
        for chunk in [&message[..1], &message[1..3], &message[3..]] {
            split.extend_from_slice(&[0x16, 3, 1]);
            split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            split.extend_from_slice(chunk);
        }
        assert_eq!(probe(&split), expected(Some("x.example"), &[]));
    }

    #[test]
    fn rejects_what_is_not_a_client_hello() {
        assert_eq!(probe(&[0x17, 3, 3, 0, 5]), Verdict::NoMatch); // application data
        assert_eq!(probe(&[0x16, 2, 0]), Verdict::NoMatch); // SSLv2-ish version
        assert_eq!(probe(&[0x16, 3, 9]), Verdict::NoMatch);
        assert_eq!(probe(&[0x16, 3, 1, 0, 0]), Verdict::NoMatch); // empty fragment
        assert_eq!(probe(&[0x16, 3, 1, 0x50, 0]), Verdict::NoMatch); // oversized fragment
        assert_eq!(probe(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Verdict::NoMatch); // ServerHello
                                                                              // A ClientHello followed by a non-handshake record before it is complete.
        let hello = client_hello(Some("a.example"), &[], 0, 2);
        let first_len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        let mut broken = hello[..RECORD_HEADER_LEN + first_len].to_vec();
        broken.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
        assert_eq!(probe(&broken), Verdict::NoMatch);
    }

    #[test]
    fn garbage_inside_a_complete_hello_is_rejected() {
        let mut hello = client_hello(Some("a.example"), &[], 0, 1);
        // Claim a session id longer than the message.
        hello[RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + 32] = 0xff;
        assert_eq!(probe(&hello), Verdict::NoMatch);
    }
}
