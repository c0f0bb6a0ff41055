//! A response body that holds the request's slots until its last byte is sent, or until it is
//! dropped (client gone, connection reset, panic): streaming responses count as in flight.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use prometheus_client::metrics::gauge::Gauge;

use super::table::Admitted;

/// Any error a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the gateway sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of bytes already in hand.
pub(super) fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// What an admitted request holds while it is in flight.
#[derive(Debug)]
pub(super) struct Hold {
    pub admitted: Admitted,
    pub started: Instant,
    pub gauge: Option<Gauge>,
    /// The request's access-log line, queued when the hold ends.
    pub log: Option<super::visibility::PendingLog>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(slot) = &self.admitted.slot {
            slot.owner()
                .record_duration(self.started.elapsed().as_nanos() as u64);
        }
        if let Some(g) = &self.gauge {
            g.dec();
        }
        if let Some(log) = self.log.take() {
            log.finish(self.started, self.admitted.slot.is_some());
        }
        // The slot guards in `admitted` drop next and return the slots.
    }
}

pin_project_lite::pin_project! {
    /// Wraps a body; the hold is released at end of stream, on error, or on drop.
    pub(super) struct Held<B> {
        #[pin]
        inner: B,
        hold: Option<Hold>,
    }
}

impl<B> Held<B> {
    pub(super) fn new(inner: B, hold: Hold) -> Self {
        Self {
            inner,
            hold: Some(hold),
        }
    }
}

impl<B: Body> Body for Held<B>
where
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // The server stops polling once `is_end_stream` says so, so the last frame may be the
        // last call: release there, not only on `None`.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(log) = this.hold.as_mut().and_then(|h| h.log.as_mut()) {
                    log.record.bytes += frame.data_ref().map_or(0, |d| bytes::Buf::remaining(d) as u64);
                }
                this.inner.is_end_stream()
            }
            Poll::Ready(Some(Err(_))) => {
                drop(this.hold.take());
                false
            }
            Poll::Pending => false,
        };
        if ended {
            drop(this.hold.take());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
