//! The I/O side of sniffing: read with a deadline into a bounded buffer, run the probe table after
//! every read, stop as soon as it decides.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant};

use super::{classify, Detected, Verdict};

/// The sniff buffer's first size; it doubles up to the configured maximum when an opening needs it.
const INITIAL_BUFFER: usize = 1024;

/// Why the probes could not name a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undecided {
    /// Every probe said `NoMatch`.
    NoMatch,
    /// The buffer filled up while some probe still wanted more bytes.
    Overflow,
    /// The client stopped sending (half-closed) before any probe decided.
    EndOfInput,
}

/// How sniffing ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SniffOutcome {
    /// A probe matched.
    Detected(Detected),
    /// The deadline passed first (a client waiting for the server to speak, like SSH).
    Timeout,
    /// No probe can decide; the connection goes to the fallback route.
    Undecided(Undecided),
    /// The client closed without sending a byte.
    ClosedEmpty,
}

/// The outcome plus every byte read while sniffing, which must reach the backend first.
#[derive(Debug)]
pub struct Sniffed {
    /// What the probes decided.
    pub outcome: SniffOutcome,
    /// The bytes read so far, in order, unchanged.
    pub prefix: Vec<u8>,
}

/// Reads from `stream` until the probe table decides, `max_bytes` are buffered, the stream ends,
/// or `timeout` (measured from the call) passes. `initial` holds bytes already read from the
/// stream (after a PROXY header); they are classified first.
pub async fn sniff<S>(
    stream: &mut S,
    initial: Vec<u8>,
    timeout: Duration,
    max_bytes: usize,
) -> std::io::Result<Sniffed>
where
    S: AsyncRead + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut filled = initial.len().min(max_bytes);
    let mut buf = initial;
    // Start small and grow only for openings that need it (large ClientHellos): most first reads
    // are a few dozen bytes, and a full-size buffer per new connection is memory for nothing.
    buf.resize(filled.max(INITIAL_BUFFER.min(max_bytes)), 0);
    if filled > 0 {
        match classify(&buf[..filled]) {
            Verdict::Match(detected) => {
                return Ok(finish(buf, filled, SniffOutcome::Detected(detected)))
            }
            Verdict::NoMatch => {
                let outcome = SniffOutcome::Undecided(Undecided::NoMatch);
                return Ok(finish(buf, filled, outcome));
            }
            Verdict::NeedMore => {}
        }
    }
    let outcome = loop {
        if filled >= max_bytes {
            break SniffOutcome::Undecided(Undecided::Overflow);
        }
        if filled == buf.len() {
            buf.resize((buf.len() * 2).min(max_bytes), 0);
        }
        let read = match timeout_at(deadline, stream.read(&mut buf[filled..])).await {
            Err(_elapsed) => break SniffOutcome::Timeout,
            Ok(read) => read?,
        };
        if read == 0 {
            break if filled == 0 {
                SniffOutcome::ClosedEmpty
            } else {
                SniffOutcome::Undecided(Undecided::EndOfInput)
            };
        }
        filled += read;
        match classify(&buf[..filled]) {
            Verdict::Match(detected) => break SniffOutcome::Detected(detected),
            Verdict::NeedMore => {}
            Verdict::NoMatch => break SniffOutcome::Undecided(Undecided::NoMatch),
        }
    };
    Ok(finish(buf, filled, outcome))
}

fn finish(mut buf: Vec<u8>, filled: usize, outcome: SniffOutcome) -> Sniffed {
    buf.truncate(filled);
    buf.shrink_to_fit();
    Sniffed {
        outcome,
        prefix: buf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::samples::{all_samples, JUNK};
    use tokio::io::AsyncWriteExt;

    const LONG: Duration = Duration::from_secs(5);

    /// Feeds `chunks` through an in-memory pipe, then keeps the writer open (like a live client).
    async fn sniff_chunks(chunks: Vec<Vec<u8>>, timeout: Duration, max: usize) -> Sniffed {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            client // keep open
        });
        let sniffed = sniff(&mut server, Vec::new(), timeout, max).await.unwrap();
        drop(writer);
        sniffed
    }

    #[tokio::test]
    async fn split_at_every_offset_gives_the_same_answer_and_bytes() {
        for (sample, expected) in all_samples() {
            for at in 0..=sample.len() {
                let chunks = vec![sample[..at].to_vec(), sample[at..].to_vec()];
                let sniffed = sniff_chunks(chunks, LONG, 64 * 1024).await;
                assert_eq!(
                    sniffed.outcome,
                    SniffOutcome::Detected(expected.clone()),
                    "split at {at}"
                );
                assert!(sample.starts_with(&sniffed.prefix) && !sniffed.prefix.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn byte_by_byte_keeps_every_byte() {
        for (sample, expected) in all_samples() {
            let chunks = sample.iter().map(|b| vec![*b]).collect();
            let sniffed = sniff_chunks(chunks, LONG, 64 * 1024).await;
            assert_eq!(sniffed.outcome, SniffOutcome::Detected(expected));
            assert!(sample.starts_with(&sniffed.prefix));
        }
    }

    #[tokio::test]
    async fn initial_bytes_are_classified_first() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let sniffed = sniff(&mut server, b"SSH-2.0-x".to_vec(), LONG, 1024)
            .await
            .unwrap();
        assert_eq!(
            sniffed.outcome,
            SniffOutcome::Detected(crate::sniff::Detected::Ssh)
        );
        assert_eq!(sniffed.prefix, b"SSH-2.0-x");
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        let sniffed = sniff(&mut server, b"GE".to_vec(), LONG, 1024)
            .await
            .unwrap();
        assert_eq!(
            sniffed.outcome,
            SniffOutcome::Detected(crate::sniff::Detected::Http(
                crate::sniff::HttpVersion::Http1
            ))
        );
        assert_eq!(sniffed.prefix, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn junk_is_undecided_with_its_bytes() {
        for junk in JUNK {
            let sniffed = sniff_chunks(vec![junk.to_vec()], LONG, 1024).await;
            assert_eq!(sniffed.outcome, SniffOutcome::Undecided(Undecided::NoMatch));
            assert_eq!(&sniffed.prefix, junk);
        }
    }

    #[tokio::test]
    async fn overflow_goes_undecided() {
        // A ClientHello larger than the buffer keeps the TLS probe asking for more.
        let hello = crate::sniff::samples::client_hello(Some("big.example"), &[], 5000, 1);
        let sniffed = sniff_chunks(vec![hello.clone()], LONG, 1000).await;
        assert_eq!(
            sniffed.outcome,
            SniffOutcome::Undecided(Undecided::Overflow)
        );
        assert_eq!(sniffed.prefix, hello[..1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_at_the_deadline() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let started = Instant::now();
        let sniffed = sniff(&mut server, Vec::new(), Duration::from_millis(1500), 1024)
            .await
            .unwrap();
        assert_eq!(sniffed.outcome, SniffOutcome::Timeout);
        assert!(sniffed.prefix.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1500) && waited < Duration::from_millis(1502),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn partial_opening_then_silence_times_out_keeping_bytes() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"SS").await.unwrap();
        let sniffed = sniff(&mut server, Vec::new(), Duration::from_millis(200), 1024)
            .await
            .unwrap();
        assert_eq!(sniffed.outcome, SniffOutcome::Timeout);
        assert_eq!(sniffed.prefix, b"SS");
    }

    #[tokio::test]
    async fn close_without_bytes_and_half_sent_opening() {
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        let sniffed = sniff(&mut server, Vec::new(), LONG, 1024).await.unwrap();
        assert_eq!(sniffed.outcome, SniffOutcome::ClosedEmpty);

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GE").await.unwrap();
        drop(client);
        let sniffed = sniff(&mut server, Vec::new(), LONG, 1024).await.unwrap();
        assert_eq!(
            sniffed.outcome,
            SniffOutcome::Undecided(Undecided::EndOfInput)
        );
        assert_eq!(sniffed.prefix, b"GE");
    }
}
