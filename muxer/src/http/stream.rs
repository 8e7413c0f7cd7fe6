//! The client socket as hyper sees it: the sniffed bytes replayed first, bytes counted both ways
//! for the connection's log line, and a write-progress timeout for clients that stop reading.
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A client connection's byte stream as the HTTP layer serves it: the TCP socket itself, or TLS
/// over it ([`crate::tls_termination::TlsClient`]).
pub(crate) trait ClientStream:
    AsyncRead + AsyncWrite + AsFd + Unpin + Send + Sync + 'static
{
    /// The TCP socket underneath: its addresses, and its readiness while the connection is
    /// parked between requests.
    fn tcp(&self) -> &tokio::net::TcpStream;

    /// Whether bytes for the reader wait in the stream's own buffer (decrypted TLS data), so that
    /// a parked connection must not wait for the socket.
    fn has_buffered(&mut self) -> bool {
        false
    }
}

impl ClientStream for tokio::net::TcpStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

/// Bytes moved through a [`Replayed`] stream.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the client, prefix included.
    pub read: AtomicU64,
    /// To the client.
    pub written: AtomicU64,
    /// The client took no bytes for the write timeout and the connection was ended.
    write_stalled: AtomicBool,
}

impl Traffic {
    /// Whether the connection ended because the client stopped reading.
    pub fn write_stalled(&self) -> bool {
        self.write_stalled.load(Ordering::Relaxed)
    }
}

/// The client stopped reading: no byte could be written for the write timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client took no data for {0:?}")]
pub(crate) struct WriteStalled(pub Duration);

pin_project_lite::pin_project! {
    /// Reads `prefix` before `inner`; writes go straight to `inner`, and fail with
    /// [`WriteStalled`] when none can make progress for the write timeout.
    pub struct Replayed<S> {
        prefix: Vec<u8>,
        consumed: usize,
        #[pin]
        inner: S,
        traffic: Arc<Traffic>,
        write_timeout: Option<Duration>,
        // Armed while a write waits; allocated the first time one does.
        stall: Option<Pin<Box<Sleep>>>,
        stalled_since: Option<Instant>,
    }
}

impl<S> Replayed<S> {
    /// `inner` with `prefix` (already read from it) in front.
    pub(crate) fn new(prefix: Vec<u8>, inner: S, traffic: Arc<Traffic>) -> Self {
        traffic
            .read
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        Self::resume(prefix, inner, traffic)
    }

    /// `inner` with `prefix` in front, where `prefix` was already counted (bytes a previous
    /// reader took from this stream and did not use).
    pub(crate) fn resume(prefix: Vec<u8>, inner: S, traffic: Arc<Traffic>) -> Self {
        Replayed {
            prefix,
            consumed: 0,
            inner,
            traffic,
            write_timeout: None,
            stall: None,
            stalled_since: None,
        }
    }

    /// Fails writes that make no progress for `timeout`.
    pub(crate) fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = Some(timeout);
        self
    }

    /// The stream under the replayed bytes.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The prefix bytes not read yet, and the stream.
    pub(crate) fn into_parts(mut self) -> (Vec<u8>, S) {
        let rest = self.prefix.split_off(self.consumed);
        (rest, self.inner)
    }
}

impl<S: AsyncRead> AsyncRead for Replayed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.consumed < this.prefix.len() {
            let rest = &this.prefix[*this.consumed..];
            let count = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..count]);
            *this.consumed += count;
            if *this.consumed == this.prefix.len() {
                *this.prefix = Vec::new();
                *this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            this.traffic
                .read
                .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsFd> AsFd for Replayed<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<S> Replayed<S> {
    /// Counts a completed write and disarms the stall timer; while a write waits, arms it and
    /// turns the wait into [`WriteStalled`] once it has lasted the write timeout.
    fn progress<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        written: impl FnOnce(&T) -> usize,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        match polled {
            Poll::Ready(Ok(value)) => {
                let count = written(&value);
                this.traffic
                    .written
                    .fetch_add(count as u64, Ordering::Relaxed);
                *this.stalled_since = None;
                Poll::Ready(Ok(value))
            }
            Poll::Pending => {
                let Some(timeout) = *this.write_timeout else {
                    return Poll::Pending;
                };
                let since = *this.stalled_since.get_or_insert_with(Instant::now);
                let deadline = since + timeout;
                let sleep = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.traffic.write_stalled.store(true, Ordering::Relaxed);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    WriteStalled(timeout),
                )))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write(cx, data);
        self.progress(cx, polled, |count| *count)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.progress(cx, polled, |count| *count)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.progress(cx, polled, |()| 0)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn unread_prefix_comes_back_and_resumes_without_counting_twice() {
        let (_client, server) = tokio::io::duplex(64);
        let traffic = Arc::new(Traffic::default());
        let mut replayed = Replayed::new(b"GET / ".to_vec(), server, Arc::clone(&traffic));
        let mut first = [0u8; 4];
        replayed.read_exact(&mut first).await.unwrap();
        let (rest, server) = replayed.into_parts();
        assert_eq!(rest, b"/ ");
        let mut resumed = Replayed::resume(rest, server, Arc::clone(&traffic));
        let mut again = [0u8; 2];
        resumed.read_exact(&mut again).await.unwrap();
        assert_eq!(&again, b"/ ");
        assert_eq!(traffic.read.load(Ordering::Relaxed), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_fails_the_write_after_the_timeout() {
        let (_client, server) = tokio::io::duplex(16);
        let traffic = Arc::new(Traffic::default());
        let mut replayed = Replayed::new(Vec::new(), server, Arc::clone(&traffic))
            .with_write_timeout(Duration::from_secs(30));
        let started = Instant::now();
        let error = replayed.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert!(traffic.write_stalled());
        assert_eq!(
            traffic.written.load(Ordering::Relaxed),
            16,
            "what fitted was counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_not_a_stall() {
        let (mut client, server) = tokio::io::duplex(16);
        let traffic = Arc::new(Traffic::default());
        let mut replayed = Replayed::new(Vec::new(), server, Arc::clone(&traffic))
            .with_write_timeout(Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut total = 0;
            while total < 160 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += client.read(&mut buf).await.unwrap();
            }
        });
        replayed.write_all(&[0u8; 160]).await.unwrap();
        assert!(!traffic.write_stalled());
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn prefix_first_then_the_stream_with_counts() {
        let (mut client, server) = tokio::io::duplex(64);
        let traffic = Arc::new(Traffic::default());
        let mut replayed = Replayed::new(b"GET ".to_vec(), server, Arc::clone(&traffic));
        client.write_all(b"/ HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        replayed.read_to_end(&mut all).await.unwrap_or_default();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
        assert_eq!(traffic.read.load(Ordering::Relaxed), all.len() as u64);
    }
}
