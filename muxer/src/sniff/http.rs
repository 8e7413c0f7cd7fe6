//! HTTP: an HTTP/1.x request line starts with a method token and a space (RFC 9112 §3); HTTP/2 with
//! prior knowledge starts with the fixed connection preface (RFC 9113 §3.4).
use super::{first_match, literal_prefix, Detected, HttpVersion, Verdict};

/// The RFC 9110 §9 methods plus PATCH (RFC 5789), each followed by the space that ends the token.
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Matches an HTTP/1.x method token followed by a space, or the whole HTTP/2 preface.
pub fn probe(bytes: &[u8]) -> Verdict {
    let methods = METHODS
        .iter()
        .map(|method| literal_prefix(bytes, method, || Detected::Http(HttpVersion::Http1)));
    let preface = std::iter::once_with(|| {
        literal_prefix(bytes, H2_PREFACE, || {
            Detected::Http(HttpVersion::Http2PriorKnowledge)
        })
    });
    first_match(methods.chain(preface))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_matches() {
        for method in METHODS {
            let mut request = method.to_vec();
            request.extend_from_slice(b"/ HTTP/1.1\r\n");
            assert_eq!(
                probe(&request),
                Verdict::Match(Detected::Http(HttpVersion::Http1))
            );
        }
    }

    #[test]
    fn token_without_space_waits_and_lowercase_is_rejected() {
        assert_eq!(probe(b"GET"), Verdict::NeedMore);
        assert_eq!(probe(b"P"), Verdict::NeedMore);
        assert_eq!(probe(b"PATC"), Verdict::NeedMore);
        assert_eq!(probe(b"get / HTTP/1.1"), Verdict::NoMatch);
        assert_eq!(probe(b"GETX / HTTP/1.1"), Verdict::NoMatch);
        assert_eq!(probe(b"BREW /pot HTTP/1.1"), Verdict::NoMatch);
    }

    #[test]
    fn h2_preface_needs_all_of_it() {
        assert_eq!(probe(&H2_PREFACE[..10]), Verdict::NeedMore);
        assert_eq!(
            probe(H2_PREFACE),
            Verdict::Match(Detected::Http(HttpVersion::Http2PriorKnowledge))
        );
        assert_eq!(probe(b"PRI * HTTP/1.1\r\n"), Verdict::NoMatch);
    }
}
