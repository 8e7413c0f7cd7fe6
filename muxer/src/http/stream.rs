//! The client socket as hyper sees it: the sniffed bytes replayed first, and bytes counted both
//! ways for the connection's log line.
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes moved through a [`Replayed`] stream.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the client, prefix included.
    pub read: AtomicU64,
    /// To the client.
    pub written: AtomicU64,
}

pin_project_lite::pin_project! {
    /// Reads `prefix` before `inner`; writes go straight to `inner`.
    pub struct Replayed<S> {
        prefix: Vec<u8>,
        consumed: usize,
        #[pin]
        inner: S,
        traffic: Arc<Traffic>,
    }
}

impl<S> Replayed<S> {
    /// `inner` with `prefix` (already read from it) in front.
    pub fn new(prefix: Vec<u8>, inner: S, traffic: Arc<Traffic>) -> Self {
        traffic
            .read
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        Self::resume(prefix, inner, traffic)
    }

    /// `inner` with `prefix` in front, where `prefix` was already counted (bytes a previous
    /// reader took from this stream and did not use).
    pub fn resume(prefix: Vec<u8>, inner: S, traffic: Arc<Traffic>) -> Self {
        Replayed {
            prefix,
            consumed: 0,
            inner,
            traffic,
        }
    }

    /// Where this stream's bytes are counted.
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// The prefix bytes not read yet, and the stream.
    pub fn into_parts(mut self) -> (Vec<u8>, S) {
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

impl<S: AsyncWrite> AsyncWrite for Replayed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, data);
        if let Poll::Ready(Ok(count)) = &polled {
            this.traffic
                .written
                .fetch_add(*count as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(count)) = &polled {
            this.traffic
                .written
                .fetch_add(*count as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
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
