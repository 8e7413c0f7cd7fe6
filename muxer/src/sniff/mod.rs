//! Protocol detection over a connection's first bytes.
//!
//! A probe is a pure function over the bytes received so far ([`Probe`]); [`classify`] runs the
//! probe table, and [`sniff`] owns the I/O: it reads with a per-connection deadline into a bounded
//! buffer and re-runs the table after every read until one probe decides.

mod driver;
pub mod http;
pub mod ssh;
pub mod tls;

pub use driver::{sniff, SniffOutcome, Sniffed, Undecided};

/// What a probe says about the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The bytes are this protocol.
    Match(Detected),
    /// The bytes so far are a valid beginning of this protocol; more are needed to decide.
    NeedMore,
    /// The bytes cannot be this protocol.
    NoMatch,
}

/// A recognised protocol, with what the probe learned on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An SSH identification string (`SSH-`).
    Ssh,
    /// HTTP/1.x request line, or the HTTP/2 prior-knowledge preface.
    Http(HttpVersion),
    /// A complete TLS ClientHello.
    Tls(ClientHelloInfo),
}

impl Detected {
    /// The protocol's short name, as used in logs, stats and config.
    pub fn protocol(&self) -> Protocol {
        match self {
            Detected::Ssh => Protocol::Ssh,
            Detected::Http(_) => Protocol::Http,
            Detected::Tls(_) => Protocol::Tls,
        }
    }
}

/// The protocols muxer tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// SSH.
    Ssh,
    /// HTTP/1.x or HTTP/2 cleartext.
    Http,
    /// TLS (any protocol inside).
    Tls,
}

impl Protocol {
    /// Lower-case name for logs and stats.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Tls => "tls",
        }
    }
}

/// Which HTTP framing the client opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge, cleartext).
    Http2PriorKnowledge,
}

/// What the TLS probe read from a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The server_name extension's host name, lower-cased, if present and valid UTF-8.
    pub sni: Option<String>,
    /// The ALPN protocol names offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// A pure protocol probe over the bytes received so far.
pub type Probe = fn(&[u8]) -> Verdict;

/// The probe table, in priority order: the first `Match` wins.
pub const PROBES: &[Probe] = &[ssh::probe, http::probe, tls::probe];

/// Runs every probe over `bytes`: the first `Match` wins; otherwise `NeedMore` if any probe still
/// waits for more bytes; otherwise `NoMatch`.
pub fn classify(bytes: &[u8]) -> Verdict {
    first_match(PROBES.iter().map(|probe| probe(bytes)))
}

/// Combines verdicts, evaluating lazily: the first `Match` wins; otherwise `NeedMore` if any
/// verdict is `NeedMore`; otherwise `NoMatch`.
fn first_match(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
    let mut need_more = false;
    for verdict in verdicts {
        match verdict {
            Verdict::Match(detected) => return Verdict::Match(detected),
            Verdict::NeedMore => need_more = true,
            Verdict::NoMatch => {}
        }
    }
    if need_more {
        Verdict::NeedMore
    } else {
        Verdict::NoMatch
    }
}

/// Shared by the literal-prefix probes: `Match` once `bytes` starts with `literal`, `NeedMore`
/// while `bytes` is a proper prefix of it.
fn literal_prefix(bytes: &[u8], literal: &[u8], detected: impl FnOnce() -> Detected) -> Verdict {
    if bytes.starts_with(literal) {
        Verdict::Match(detected())
    } else if literal.starts_with(bytes) {
        Verdict::NeedMore
    } else {
        Verdict::NoMatch
    }
}

#[cfg(test)]
pub(crate) mod samples;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use samples::*;

    fn expect_progressive(sample: &[u8], expected: &Detected) {
        // Byte by byte: every proper prefix must leave the door open (never NoMatch), and once a
        // prefix matches, it matches the right protocol.
        for end in 0..=sample.len() {
            match classify(&sample[..end]) {
                Verdict::Match(got) => {
                    assert_eq!(&got, expected, "prefix of {end} bytes");
                    return;
                }
                Verdict::NeedMore => {}
                Verdict::NoMatch => panic!("prefix of {end} bytes rejected"),
            }
        }
        panic!("never matched")
    }

    #[test]
    fn every_sample_matches_whole_and_byte_by_byte() {
        for (sample, expected) in all_samples() {
            assert_eq!(classify(&sample), Verdict::Match(expected.clone()));
            expect_progressive(&sample, &expected);
        }
    }

    #[test]
    fn junk_is_no_match() {
        for junk in JUNK {
            assert_eq!(classify(junk), Verdict::NoMatch, "{junk:?}");
        }
    }

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(classify(b""), Verdict::NeedMore);
    }

    proptest! {
        #[test]
        fn no_probe_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            for probe in PROBES {
                let _ = probe(&bytes);
            }
            let _ = classify(&bytes);
        }

        #[test]
        fn tls_probe_survives_mutated_client_hellos(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            records in 1usize..6,
        ) {
            let mut hello = client_hello(Some("mutate.example"), &[b"h2"], 600, records);
            for (at, byte) in flips {
                let at = at % hello.len();
                hello[at] = byte;
            }
            for end in 0..=hello.len() {
                let _ = tls::probe(&hello[..end]);
            }
        }

        #[test]
        fn tls_hello_with_random_fields_is_recognised(
            sni in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}",
            padding in 0usize..20_000,
            records in 1usize..8,
        ) {
            let hello = client_hello(Some(&sni), &[b"http/1.1"], padding, records);
            let expected = Detected::Tls(ClientHelloInfo {
                sni: Some(sni.clone()),
                alpn: vec![b"http/1.1".to_vec()],
            });
            prop_assert_eq!(classify(&hello), Verdict::Match(expected));
        }
    }
}
