//! One user's event stream (protocol sections 5 and 6): the epoch, the `seq` counter and the
//! bounded history that resume replays from. Pure data, owned by the registry, which is the
//! stream's only writer; that is what makes "assign seq, append, fan out" atomic per user.

use std::collections::VecDeque;
use std::time::Instant;

use bytestring::ByteString;
use rand::distr::{Alphanumeric, SampleString};

use crate::protocol::ResumeInfo;

/// What a reconnecting client says it has already seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeRequest {
    pub last_seq: u64,
    pub epoch: Option<String>,
}

/// The events a resuming session must receive before live ones, and how complete they are.
#[derive(Debug, Default)]
pub struct Replay {
    pub frames: Vec<ByteString>,
    pub info: Option<ResumeInfo>,
}

struct StoredEvent {
    seq: u64,
    frame: ByteString,
}

pub struct UserStream {
    epoch: String,
    last_seq: u64,
    history: VecDeque<StoredEvent>,
    capacity: usize,
    /// When the user's last session closed; `None` while a session is open.
    pub idle_since: Option<Instant>,
}

impl UserStream {
    pub fn new(capacity: usize) -> UserStream {
        let epoch = Alphanumeric.sample_string(&mut rand::rng(), 8).to_ascii_lowercase();
        UserStream { epoch, last_seq: 0, history: VecDeque::new(), capacity, idle_since: None }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Reserves the next `seq`; the caller serialises the event with it and calls [`Self::push`].
    pub fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// Keeps an event for resume, dropping the oldest beyond the capacity.
    pub fn push(&mut self, seq: u64, frame: ByteString) {
        if self.history.len() == self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(StoredEvent { seq, frame });
    }

    /// Section 6: everything retained after `last_seq`, `complete` when nothing was lost. Without
    /// a request (a fresh client) there is nothing to replay and no `resume` in the answer.
    pub fn replay(&self, request: Option<&ResumeRequest>) -> Replay {
        let Some(request) = request else {
            return Replay::default();
        };
        let oldest = self.history.front().map_or(self.last_seq + 1, |e| e.seq);
        let same_epoch = request.epoch.as_deref().is_none_or(|e| e == self.epoch);
        let complete = same_epoch && request.last_seq <= self.last_seq && oldest <= request.last_seq + 1;
        let after = if complete { request.last_seq } else { 0 };
        let frames: Vec<ByteString> =
            self.history.iter().filter(|e| e.seq > after).map(|e| e.frame.clone()).collect();
        let from_seq = if complete { request.last_seq + 1 } else { oldest };
        Replay { info: Some(ResumeInfo { from_seq, replayed: frames.len() as u64, complete }), frames }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_with(capacity: usize, events: u64) -> UserStream {
        let mut stream = UserStream::new(capacity);
        for _ in 0..events {
            let seq = stream.next_seq();
            stream.push(seq, ByteString::from(seq.to_string()));
        }
        stream
    }

    fn resume(stream: &UserStream, last_seq: u64, epoch: Option<&str>) -> (Vec<String>, ResumeInfo) {
        let replay = stream.replay(Some(&ResumeRequest { last_seq, epoch: epoch.map(str::to_owned) }));
        (replay.frames.iter().map(|f| f.to_string()).collect(), replay.info.unwrap())
    }

    #[test]
    fn replays_exactly_the_missed_events() {
        let stream = stream_with(10, 5);
        let epoch = stream.epoch().to_owned();
        let (frames, info) = resume(&stream, 3, Some(&epoch));
        assert_eq!(frames, ["4", "5"]);
        assert_eq!(info, ResumeInfo { from_seq: 4, replayed: 2, complete: true });
        let (frames, info) = resume(&stream, 5, None);
        assert!(frames.is_empty());
        assert!(info.complete);
    }

    #[test]
    fn incomplete_when_history_no_longer_reaches_back() {
        let stream = stream_with(3, 10);
        let (frames, info) = resume(&stream, 2, None);
        assert_eq!(frames, ["8", "9", "10"]);
        assert_eq!(info, ResumeInfo { from_seq: 8, replayed: 3, complete: false });
        // Exactly at the edge: seq 8 is the oldest kept and the next one needed.
        assert!(resume(&stream, 7, None).1.complete);
    }

    #[test]
    fn incomplete_on_stale_epoch_or_future_seq() {
        let stream = stream_with(10, 4);
        let (frames, info) = resume(&stream, 2, Some("other"));
        assert_eq!(frames.len(), 4);
        assert!(!info.complete);
        assert!(!resume(&stream, 9, None).1.complete);
    }

    #[test]
    fn fresh_stream_resume_from_zero_is_complete() {
        let stream = UserStream::new(10);
        let (frames, info) = resume(&stream, 0, None);
        assert!(frames.is_empty());
        assert_eq!(info, ResumeInfo { from_seq: 1, replayed: 0, complete: true });
        assert!(stream.replay(None).info.is_none());
    }
}
