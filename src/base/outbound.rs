//! The count of one session's unsent output, in exact wire bytes (protocol section 7, 4008),
//! and the deliveries the registry has handed over that the session has not taken yet.
//!
//! A session whose peer stops reading is frozen: the HTTP dispatcher stops polling its
//! `WebsocketContext` once its own write buffer holds 32 KiB (actix-web #2441), so frames pile up
//! first in the actor's mailbox and then in the context's buffer. Both are counted here: bytes are
//! added when a frame is handed to the session (the registry, for events) or written by the
//! session itself (its own frames), and subtracted when the dispatcher takes encoded bytes from
//! the context to write them to the socket. What is counted is therefore everything not yet
//! handed to the socket, and the registry refuses to add beyond `limits.max_outbound_bytes`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::Delivery;

#[derive(Clone, Debug)]
pub struct Outbound(Arc<Shared>);

#[derive(Default)]
struct Shared {
    bytes: AtomicI64,
    /// Below this many unsent bytes, `room` is called (`i64::MIN`: nobody waits).
    room_below: AtomicI64,
    room: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Deliveries in the order they were handed over. The registry wakes the session with one
    /// mailbox message when it puts the first one here, and the session takes all there are when
    /// it runs: a session that is behind takes several publishes at once and writes them to its
    /// socket together, instead of one mailbox message, one wake-up and one write each.
    inbox: Mutex<Vec<Delivery>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("bytes", &self.bytes).finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn new() -> Outbound {
        Outbound(Arc::new(Shared { room_below: AtomicI64::new(i64::MIN), ..Shared::default() }))
    }

    /// Counts `bytes` more; returns the new total.
    pub fn add(&self, bytes: usize) -> i64 {
        self.0.bytes.fetch_add(bytes as i64, Ordering::AcqRel) + bytes as i64
    }

    /// The dispatcher took `bytes` to write them.
    pub fn release(&self, bytes: usize) {
        let now = self.0.bytes.fetch_sub(bytes as i64, Ordering::AcqRel) - bytes as i64;
        if now < self.0.room_below.load(Ordering::Acquire) {
            self.make_room();
        }
    }

    /// Calls `room` once the unsent bytes are below `level` (at once if they are already): how
    /// a session with a resume backlog learns that its peer has read enough for more, without
    /// polling. One waiter at a time; a new one replaces the last.
    pub fn when_below(&self, level: i64, room: impl FnOnce() + Send + 'static) {
        *self.0.room.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(room));
        self.0.room_below.store(level, Ordering::Release);
        // Released in between: nobody would call it.
        if self.pending() < level {
            self.make_room();
        }
    }

    fn make_room(&self) {
        self.0.room_below.store(i64::MIN, Ordering::Release);
        let room = self.0.room.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(room) = room {
            room();
        }
    }

    pub fn pending(&self) -> i64 {
        self.0.bytes.load(Ordering::Acquire)
    }

    /// Queues a delivery for the session; true when the inbox was empty, i.e. the session has
    /// no wake-up on its way and must be sent one.
    pub fn hand_over(&self, delivery: Delivery) -> bool {
        let mut inbox = self.0.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        inbox.push(delivery);
        inbox.len() == 1
    }

    /// Everything handed over so far, in order, swapped into `taken` (an emptied vector the
    /// session keeps, so neither side allocates again for each publish).
    pub fn take_deliveries(&self, taken: &mut Vec<Delivery>) {
        let mut inbox = self.0.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::swap(&mut *inbox, taken);
    }
}

/// Bytes a server-to-client frame with `payload` bytes takes on the wire (RFC 6455 5.2: servers
/// do not mask, so the header is 2, 4 or 10 bytes).
pub fn encoded_len(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65_535 => 4,
            _ => 10,
        }
}

/// Bytes a close frame with this reason takes: the code and the description are its payload.
pub fn close_frame_len(description: Option<&str>, has_code: bool) -> usize {
    let payload = if has_code { 2 + description.map_or(0, str::len) } else { 0 };
    encoded_len(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes() {
        assert_eq!(encoded_len(0), 2);
        assert_eq!(encoded_len(125), 127);
        assert_eq!(encoded_len(126), 130);
        assert_eq!(encoded_len(65_535), 65_539);
        assert_eq!(encoded_len(65_536), 65_546);
        assert_eq!(close_frame_len(Some("bye"), true), 7);
        assert_eq!(close_frame_len(None, false), 2);
    }

    #[test]
    fn wakes_once_per_empty_inbox() {
        let outbound = Outbound::new();
        let delivery =
            || Delivery::new(std::sync::Arc::from(vec![bytestring::ByteString::from("x")]), 0, None);
        assert!(outbound.hand_over(delivery()));
        assert!(!outbound.hand_over(delivery()));
        let mut taken = Vec::new();
        outbound.take_deliveries(&mut taken);
        assert_eq!(taken.len(), 2);
        assert!(outbound.hand_over(delivery()));
    }

    #[test]
    fn room_is_made_once_below_the_level() {
        use std::sync::atomic::AtomicUsize;
        let outbound = Outbound::new();
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        outbound.add(1000);
        let counted = std::sync::Arc::clone(&calls);
        outbound.when_below(500, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        outbound.release(400);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "600 left is not below 500");
        outbound.release(200);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        outbound.release(100);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "once");
        let counted = std::sync::Arc::clone(&calls);
        outbound.when_below(500, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2, "already below: at once");
    }

    #[test]
    fn counts_up_and_down() {
        let outbound = Outbound::new();
        assert_eq!(outbound.add(100), 100);
        outbound.clone().release(40);
        assert_eq!(outbound.pending(), 60);
    }
}
