//! Body adapters for streaming proxying: an idle timeout between frames, and an observer that
//! counts bytes and reports once when the body ends or is dropped (client gone).
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::upstream::BoxError;

/// No frame arrived for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// Fails with [`BodyIdleTimeout`] when `inner` yields no frame for `idle`.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        idle: Duration,
        sleep: Pin<Box<Sleep>>,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(*this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

/// How a body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every frame was delivered.
    Complete,
    /// The body failed (upstream error, timeout, limit).
    Failed,
    /// Dropped before the end: the receiver went away (client disconnected).
    Abandoned,
}

impl BodyEnd {
    /// Label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::Failed => "failed",
            BodyEnd::Abandoned => "client gone",
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts data bytes into `counter` and calls `on_end` exactly once.
    pub struct Observed<B, F: FnOnce(BodyEnd)> {
        #[pin]
        inner: B,
        counter: Arc<AtomicU64>,
        on_end: Option<F>,
    }

    impl<B, F: FnOnce(BodyEnd)> PinnedDrop for Observed<B, F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(on_end) = this.project().on_end.take() {
                on_end(BodyEnd::Abandoned);
            }
        }
    }
}

impl<B, F: FnOnce(BodyEnd)> Observed<B, F> {
    /// Wraps `inner`; `on_end` runs at the end of the stream, on error, or on drop. A body that is
    /// already at its end reports at once.
    pub fn new(inner: B, counter: Arc<AtomicU64>, on_end: F) -> Self
    where
        B: Body,
    {
        let mut observed = Observed {
            inner,
            counter,
            on_end: Some(on_end),
        };
        if observed.inner.is_end_stream() {
            if let Some(on_end) = observed.on_end.take() {
                on_end(BodyEnd::Complete);
            }
        }
        observed
    }
}

impl<B, F> Body for Observed<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnOnce(BodyEnd),
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let end = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // A sized body may never be polled past its last frame.
                this.inner.is_end_stream().then_some(BodyEnd::Complete)
            }
            Poll::Ready(Some(Err(_))) => Some(BodyEnd::Failed),
            Poll::Ready(None) => Some(BodyEnd::Complete),
            Poll::Pending => None,
        };
        if let Some(end) = end {
            if let Some(on_end) = this.on_end.take() {
                on_end(end);
            }
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
