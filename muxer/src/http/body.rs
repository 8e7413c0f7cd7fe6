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
pub(crate) struct BodyIdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// Fails with [`BodyIdleTimeout`] when `inner` yields no frame for `idle`.
    ///
    /// The timer is armed only when the body actually waits, and a frame only moves the deadline:
    /// most bodies arrive without waiting, and re-arming a runtime timer for every frame would
    /// cost more than forwarding the frame.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        idle: Duration,
        deadline: Instant,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            deadline: Instant::now() + idle,
            sleep: None,
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
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.deadline = Instant::now() + *this.idle;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*this.deadline)));
        if sleep.deadline() != *this.deadline {
            // Frames arrived since the timer was armed.
            sleep.as_mut().reset(*this.deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(*this.idle))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body arrived slower than the minimum rate.
#[derive(Debug, thiserror::Error)]
#[error("request body slower than {rate} bytes/s after a {grace:?} grace")]
pub(crate) struct BodyTooSlow {
    /// The minimum rate, bytes per second.
    pub rate: u64,
    /// The waiting time allowed on top of it.
    pub grace: Duration,
}

pin_project_lite::pin_project! {
    /// Fails with [`BodyTooSlow`] once the time spent waiting for `inner` exceeds `grace` plus one
    /// second per `rate` bytes received (Apache's mod_reqtimeout rule), so a trickled body cannot
    /// hold a connection and an upstream request for ever. Only waiting counts: while the upstream
    /// is slow to take the body, the body is not polled and its clock does not run.
    pub struct MinRate<B, F> {
        #[pin]
        inner: B,
        rate: u64,
        grace: Duration,
        received: u64,
        waited: Duration,
        waiting_since: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        on_timeout: Option<F>,
    }
}

impl<B, F: FnOnce()> MinRate<B, F> {
    /// Wraps `inner`; `rate` 0 turns the check off. `on_timeout` runs when it fires.
    pub(crate) fn new(inner: B, rate: u64, grace: Duration, on_timeout: F) -> Self {
        MinRate {
            inner,
            rate,
            grace,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            sleep: None,
            on_timeout: Some(on_timeout),
        }
    }
}

impl<B, F> Body for MinRate<B, F>
where
    B: Body<Data = Bytes, Error = BoxError>,
    F: FnOnce(),
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.rate == 0 {
            return this.inner.poll_frame(cx);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if let Some(since) = this.waiting_since.take() {
                *this.waited += since.elapsed();
            }
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                *this.received += data.map_or(0, |d| d.len() as u64);
            }
            return Poll::Ready(frame);
        }
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let allowed =
            *this.grace + Duration::from_secs_f64(*this.received as f64 / *this.rate as f64);
        let deadline = since + allowed.saturating_sub(*this.waited);
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if let Some(on_timeout) = this.on_timeout.take() {
                    on_timeout();
                }
                Poll::Ready(Some(Err(Box::new(BodyTooSlow {
                    rate: *this.rate,
                    grace: *this.grace,
                }))))
            }
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
pub(crate) enum BodyEnd {
    /// Every frame was delivered.
    Complete,
    /// The body failed (upstream error, timeout, limit).
    Failed,
    /// Dropped before the end: the receiver went away (client disconnected).
    Abandoned,
}

impl BodyEnd {
    /// Label for logs.
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn new(inner: B, counter: Arc<AtomicU64>, on_end: F) -> Self
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed through a channel.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    const IDLE: Duration = Duration::from_secs(5);

    /// `Fed` behind the idle timeout and a minimum rate of 100 bytes/s after a 10 s grace.
    fn rated(
        rx: mpsc::Receiver<Bytes>,
        fired: Arc<AtomicU64>,
    ) -> impl Body<Data = Bytes, Error = BoxError> {
        MinRate::new(
            IdleTimeout::new(Fed(rx), Duration::from_secs(3600)),
            100,
            Duration::from_secs(10),
            move || {
                fired.fetch_add(1, Ordering::Relaxed);
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_fails_once_it_falls_below_the_minimum_rate() {
        let (tx, rx) = mpsc::channel(1);
        let fired = Arc::new(AtomicU64::new(0));
        // One byte every 5 s: each byte buys 10 ms, so the 10 s grace runs out during the third gap.
        let _feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let error = rated(rx, Arc::clone(&fired)).collect().await.unwrap_err();
        assert!(error.downcast_ref::<BodyTooSlow>().is_some(), "{error}");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(10) && elapsed < Duration::from_secs(11),
            "{elapsed:?}"
        );
        assert_eq!(fired.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_passes_however_long() {
        let (tx, rx) = mpsc::channel(1);
        let fired = Arc::new(AtomicU64::new(0));
        let feeder = tokio::spawn(async move {
            // 200 bytes/s for 60 s.
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.send(Bytes::from(vec![b'x'; 200])).await.unwrap();
            }
        });
        let body = rated(rx, Arc::clone(&fired))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), 12_000);
        assert_eq!(fired.load(Ordering::Relaxed), 0);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn gaps_shorter_than_the_idle_timeout_pass_however_long_the_body() {
        let (tx, rx) = mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(IDLE - Duration::from_millis(100)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let collected = IdleTimeout::new(Fed(rx), IDLE).collect().await.unwrap();
        assert_eq!(
            collected.to_bytes().len(),
            10,
            "45 s of body, never 5 s idle"
        );
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_longer_than_the_idle_timeout_fails_at_the_deadline() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = IdleTimeout::new(Fed(rx), IDLE);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(body.frame().await.unwrap().is_ok());
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok(), "a frame right away");
        // Now silent (the sender is kept open): fails IDLE after the last frame.
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyIdleTimeout>(), "{error}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(8) && waited < Duration::from_millis(8100),
            "{waited:?}"
        );
        drop(tx);
    }
}
