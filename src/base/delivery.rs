//! What a registry shard hands a session: frames, shared between every session of the user.

use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;

/// Frames handed to a session: events of the user's stream or a frame for this session alone
/// (ack, error). A batch of events is serialised once and the one allocation is shared by every
/// session of the user: handing it over costs one reference count per session, not one per
/// frame (each frame's count is contended by every thread that writes it).
#[derive(Debug)]
pub struct Delivery {
    batch: Arc<[ByteString]>,
    /// Where this session's part of the batch starts (its replay may have had the first ones).
    from: usize,
    /// When the events were created; `None` for frames that are not stream events.
    pub created: Option<Instant>,
}

impl Delivery {
    /// `batch[from..]`; `from` is within the batch (clamped otherwise).
    pub fn new(batch: Arc<[ByteString]>, from: usize, created: Option<Instant>) -> Delivery {
        let from = from.min(batch.len());
        Delivery { batch, from, created }
    }

    pub fn frames(&self) -> &[ByteString] {
        &self.batch[self.from..]
    }
}
