//! The session's encoded output on its way to the socket, counted off the session's unsent bytes
//! as the HTTP dispatcher takes it (protocol section 7, 4008; docs/architecture.md, "What the
//! code relies on in actix-web-actors").

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_util::Stream;

use crate::base::Outbound;

/// The session's encoded output on its way to the HTTP dispatcher: each chunk it takes is off
/// the session's unsent count.
pub(super) struct CountedOutput<S> {
    pub(super) inner: S,
    pub(super) outbound: Outbound,
}

impl<S: Stream<Item = Result<Bytes, actix_web::Error>> + Unpin> Stream for CountedOutput<S> {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &next {
            self.outbound.release(bytes.len());
        }
        next
    }
}
