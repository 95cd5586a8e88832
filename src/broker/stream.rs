//! One user's event stream (protocol sections 5 and 6): the epoch, the `seq` counter and the
//! bounded history that resume replays from. Pure data, owned by the in-memory broker, whose
//! calls a registry shard makes one at a time: that is what makes "assign seq, append" atomic
//! per user (the Redis broker does the same in one script, `redis/scripts.rs`).

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

/// How much history one stream may keep: `history.events_per_user` and
/// `history.max_bytes_per_user`.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    pub events: usize,
    pub bytes: usize,
}

pub struct UserStream {
    epoch: String,
    last_seq: u64,
    history: VecDeque<StoredEvent>,
    limits: HistoryLimits,
    /// Bytes of the frames in `history`.
    bytes: usize,
    /// When the user's last session closed, or the last event while none is open; `None` while
    /// a session is open.
    pub idle_since: Option<Instant>,
}

impl UserStream {
    pub fn new(limits: HistoryLimits) -> UserStream {
        let epoch = Alphanumeric.sample_string(&mut rand::rng(), 8).to_ascii_lowercase();
        UserStream { epoch, last_seq: 0, history: VecDeque::new(), limits, bytes: 0, idle_since: None }
    }

    /// Bytes the history holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The seq of the oldest event kept, if any.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.history.front().map(|e| e.seq)
    }

    /// Drops the oldest event kept; returns its bytes (0 when there was none).
    pub fn drop_oldest(&mut self) -> usize {
        let dropped = self.history.pop_front().map_or(0, |e| e.frame.len());
        self.bytes -= dropped;
        dropped
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

    /// Keeps an event for resume, dropping the oldest beyond the count and byte limits (an
    /// event larger than the byte limit is not kept at all). Returns the bytes the history grew
    /// by, which is negative when more was dropped than added.
    pub fn push(&mut self, seq: u64, frame: ByteString) -> isize {
        let before = self.bytes as isize;
        self.bytes += frame.len();
        self.history.push_back(StoredEvent { seq, frame });
        while self.history.len() > self.limits.events || self.bytes > self.limits.bytes {
            self.drop_oldest();
        }
        self.bytes as isize - before
    }

    /// Section 6: everything retained after `last_seq`, `complete` when nothing was lost. Without
    /// a request (a fresh client) there is nothing to replay and no `resume` in the answer.
    pub fn replay(&self, request: Option<&ResumeRequest>) -> Replay {
        let Some(request) = request else {
            return Replay::default();
        };
        let oldest = self.history.front().map_or(self.last_seq + 1, |e| e.seq);
        let resumed = verdict(request, &self.epoch, self.last_seq, oldest);
        let frames: Vec<ByteString> =
            self.history.iter().filter(|e| e.seq > resumed.after).map(|e| e.frame.clone()).collect();
        let info = ResumeInfo {
            from_seq: resumed.from_seq,
            replayed: frames.len() as u64,
            complete: resumed.complete,
        };
        Replay { info: Some(info), frames }
    }
}

/// Section 6's judgement of a resume against a stream of `epoch` whose newest seq is
/// `last_seq` and oldest kept one `oldest` (`last_seq + 1` when none is kept): whether it is
/// complete, which seq the replay starts after, and the first seq replayed.
pub struct Verdict {
    pub complete: bool,
    pub after: u64,
    pub from_seq: u64,
}

pub fn verdict(request: &ResumeRequest, epoch: &str, last_seq: u64, oldest: u64) -> Verdict {
    let same_epoch = request.epoch.as_deref().is_none_or(|e| e == epoch);
    let complete = same_epoch && request.last_seq <= last_seq && oldest <= request.last_seq + 1;
    if complete {
        Verdict { complete, after: request.last_seq, from_seq: request.last_seq + 1 }
    } else {
        Verdict { complete, after: 0, from_seq: oldest }
    }
}

impl UserStream {
    /// The kept events from `from_seq` on.
    pub fn from(&self, from_seq: u64) -> Vec<(u64, ByteString)> {
        self.history.iter().filter(|e| e.seq >= from_seq).map(|e| (e.seq, e.frame.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(events: usize) -> HistoryLimits {
        HistoryLimits { events, bytes: usize::MAX }
    }

    fn stream_with(capacity: usize, events: u64) -> UserStream {
        let mut stream = UserStream::new(limits(capacity));
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
    fn bytes_are_capped_oldest_first() {
        let mut stream = UserStream::new(HistoryLimits { events: 100, bytes: 10 });
        for frame in ["aaaa", "bbbb", "cccc"] {
            let seq = stream.next_seq();
            stream.push(seq, ByteString::from(frame));
        }
        assert_eq!(stream.bytes(), 8);
        let (frames, info) = resume(&stream, 0, None);
        assert_eq!(frames, ["bbbb", "cccc"]);
        assert!(!info.complete, "seq 1 was dropped for bytes");
        // An event larger than the whole budget empties the history and is not kept either.
        let seq = stream.next_seq();
        assert_eq!(stream.push(seq, ByteString::from("x".repeat(11))), -8);
        assert_eq!((stream.bytes(), stream.oldest_seq()), (0, None));
    }

    #[test]
    fn fresh_stream_resume_from_zero_is_complete() {
        let stream = UserStream::new(limits(10));
        let (frames, info) = resume(&stream, 0, None);
        assert!(frames.is_empty());
        assert_eq!(info, ResumeInfo { from_seq: 1, replayed: 0, complete: true });
        assert!(stream.replay(None).info.is_none());
    }
}
