//! How much of a client the server reads, and when, so that what a client sends is bounded in
//! bytes from the first byte.
//!
//! actix-web-actors' frame decoder pulls every chunk the connection offers into its own buffer
//! before decoding one frame, so a client that sends faster than its session handles frames grows
//! that buffer without limit (1,000 such clients took a server to 4 GB). The gate sits between
//! the connection's byte stream and the decoder and holds the next chunk back:
//!
//! - while a whole frame has passed that the session has not handled yet: the decoder's buffer
//!   holds at most one frame plus the rest of one chunk, and actix-http stops reading the socket
//!   when its own small buffer is full, so the kernel (and then the client) waits, not our heap;
//! - in pieces of at most 16 KiB, however much actix-http read at once.
//!
//! And it ends the stream (the session then closes the connection):
//! - when a client that is not authenticated sends more than `limits.unauthenticated_bytes`
//!   (its `auth` frame included), judged from the header of the frame that would go past it:
//!   pausing such a client would leave actix-http's read buffers growing (measured: about
//!   500 KB per connection under a flood), closing it frees everything at once;
//! - at a frame header that announces more than the size limit (see [`FrameGuard`]), instead
//!   of buffering that frame.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures_util::Stream;

use super::frame_guard::FrameGuard;

/// The session's side of the gate. The session actor and the byte stream it reads run in one
/// task (its `WebsocketContext`), so plain cells are enough: nothing here crosses threads.
#[derive(Clone, Default)]
pub struct ReadGate {
    shared: Rc<Shared>,
}

#[derive(Default)]
struct Shared {
    handled: Cell<u64>,
    authenticated: Cell<bool>,
    oversized: Cell<bool>,
    overdrawn: Cell<bool>,
    /// The connection's byte stream itself failed (a reset, a read error).
    payload_failed: Cell<bool>,
    /// The reading task, parked while the gate is shut.
    waker: Cell<Option<Waker>>,
}

impl ReadGate {
    /// The session has handled one frame (any frame, or a decoding error).
    pub fn frame_handled(&self) {
        self.shared.handled.set(self.shared.handled.get() + 1);
        self.wake();
    }

    /// The client is authenticated: no allowance from now on.
    pub fn authenticated(&self) {
        self.shared.authenticated.set(true);
        self.wake();
    }

    /// A frame header announced more than the size limit (the stream ended with an error).
    pub fn tripped_on_oversized(&self) -> bool {
        self.shared.oversized.get()
    }

    /// A client that was not authenticated sent more than its allowance (the stream ended).
    pub fn tripped_on_allowance(&self) -> bool {
        self.shared.overdrawn.get()
    }

    /// The connection's byte stream failed under the decoder. With the gate's own two ends,
    /// this tells every I/O error actix-web-actors 4.3.1 reports apart from its only other one,
    /// a text frame that is not UTF-8 (`session.rs`).
    pub fn payload_failed(&self) -> bool {
        self.shared.payload_failed.get()
    }

    fn wake(&self) {
        if let Some(waker) = self.shared.waker.take() {
            waker.wake();
        }
    }

    fn park(&self, cx: &Context<'_>) {
        self.shared.waker.set(Some(cx.waker().clone()));
    }

    /// Wraps the connection's byte stream.
    pub fn guard<S>(
        &self,
        inner: S,
        max_message_bytes: usize,
        unauthenticated_bytes: usize,
    ) -> GatedPayload<S> {
        GatedPayload {
            inner,
            frames: FrameGuard::new(max_message_bytes),
            max_message_bytes,
            gate: self.clone(),
            allowance: unauthenticated_bytes,
            rest: Bytes::new(),
        }
    }
}

/// The most handed to the decoder at once.
const PIECE: usize = 16 * 1024;

/// The connection's byte stream as the decoder sees it.
pub struct GatedPayload<S> {
    inner: S,
    frames: FrameGuard,
    max_message_bytes: usize,
    gate: ReadGate,
    /// Bytes the client may still send before it is authenticated.
    allowance: usize,
    /// What is left of the last chunk actix-http handed over (it reads as much as the kernel
    /// has): passed on a piece at a time.
    rest: Bytes,
}

impl<S> GatedPayload<S> {
    fn overdrawn(&self) -> Poll<Option<Result<Bytes, PayloadError>>> {
        self.gate.shared.overdrawn.set(true);
        Poll::Ready(Some(Err(PayloadError::Overflow)))
    }
}

impl<S> Stream for GatedPayload<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.gate.tripped_on_oversized() || this.gate.tripped_on_allowance() {
            return Poll::Ready(None);
        }
        // A whole frame is waiting for the session: park until it is handled. Checked again
        // after parking, as the session may have handled it in between.
        if this.frames.completed() > this.gate.shared.handled.get() {
            this.gate.park(cx);
            if this.frames.completed() > this.gate.shared.handled.get() {
                return Poll::Pending;
            }
        }
        if this.rest.is_empty() {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => this.rest = bytes,
                Poll::Ready(Some(Err(e))) => {
                    this.gate.shared.payload_failed.set(true);
                    return Poll::Ready(Some(Err(e)));
                }
                other => return other,
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(PIECE));
        let authenticated = this.gate.shared.authenticated.get();
        if authenticated {
            this.frames.set_limit(this.max_message_bytes);
        } else {
            // A frame that announces more than the allowance left is judged from its header.
            this.frames.set_limit(this.max_message_bytes.min(this.allowance));
            match this.allowance.checked_sub(piece.len()) {
                Some(left) => this.allowance = left,
                None => return this.overdrawn(),
            }
        }
        match this.frames.inspect(&piece) {
            Ok(()) => Poll::Ready(Some(Ok(piece))),
            Err(too_big) if !authenticated && too_big.announced <= this.max_message_bytes as u64 => {
                this.overdrawn()
            }
            Err(_) => {
                this.gate.shared.oversized.set(true);
                Poll::Ready(Some(Err(PayloadError::Overflow)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn chunks(sizes: &[usize]) -> impl Stream<Item = Result<Bytes, PayloadError>> + Unpin {
        // Each chunk one whole 125-byte frame (2-byte header, 4-byte mask, 119 bytes), repeated.
        let frame: Vec<u8> = [&[0x81u8, 0x80 | 119, 1, 2, 3, 4][..], &[b'x'; 119][..]].concat();
        let list: Vec<Result<Bytes, PayloadError>> =
            sizes.iter().map(|n| Ok(Bytes::from(frame.repeat(*n)))).collect();
        futures_util::stream::iter(list)
    }

    #[actix_web::test]
    async fn holds_the_next_piece_until_the_session_handled_the_frame_before() {
        let gate = ReadGate::default();
        gate.authenticated();
        let mut payload = gate.guard(chunks(&[1, 1]), 4096, 4096);
        assert_eq!(payload.next().await.unwrap().unwrap().len(), 125);
        let held = futures_util::FutureExt::now_or_never(payload.next());
        assert!(held.is_none(), "a second frame passed before the first was handled");
        gate.frame_handled();
        assert_eq!(payload.next().await.unwrap().unwrap().len(), 125);
    }

    #[actix_web::test]
    async fn hands_large_chunks_over_in_pieces() {
        let gate = ReadGate::default();
        gate.authenticated();
        // 200 frames in one chunk: 25,000 bytes, handed over as 16 KiB and the rest.
        let mut payload = gate.guard(chunks(&[200]), 4096, 4096);
        assert_eq!(payload.next().await.unwrap().unwrap().len(), PIECE);
        for _ in 0..200 {
            gate.frame_handled();
        }
        assert_eq!(payload.next().await.unwrap().unwrap().len(), 25_000 - PIECE);
    }

    #[actix_web::test]
    async fn ends_an_unauthenticated_stream_past_its_allowance() {
        let gate = ReadGate::default();
        // An allowance of 1,000 bytes; frames of 125 bytes, one per chunk.
        let per_allowance = 1_000 / 125;
        let mut payload = gate.guard(chunks(&vec![1; per_allowance + 1]), 4096, 1_000);
        for _ in 0..per_allowance {
            assert!(payload.next().await.unwrap().is_ok());
            gate.frame_handled();
        }
        assert!(payload.next().await.unwrap().is_err());
        assert!(gate.tripped_on_allowance());
        assert!(payload.next().await.is_none());
    }

    #[actix_web::test]
    async fn judges_an_unauthenticated_frame_from_its_header_against_the_allowance() {
        let gate = ReadGate::default();
        // The header of a 2,000-byte frame, with 1,000 bytes allowed: ended before its payload.
        let header = Bytes::from_static(&[0x81, 0x80 | 126, 0x07, 0xd0, 1, 2, 3, 4]);
        let mut payload = gate.guard(futures_util::stream::iter(vec![Ok(header)]), 4096, 1_000);
        assert!(payload.next().await.unwrap().is_err());
        assert!(gate.tripped_on_allowance() && !gate.tripped_on_oversized());
    }
}
