//! The broker: where users' streams live, under the registry (the way Centrifugo's `centrifuge`
//! puts a `Broker` under its `Node`).
//!
//! The registry owns connections and everything node-local (who is connected here, rates, runs);
//! the broker owns what must be one thing however many nodes there are: each user's stream (seqs,
//! history, epoch, resume), the `client_msg_id` dedupe, and the per-user session count. Every
//! call may be answered later and may fail, as a broker across the network would be: the
//! registry never waits for an answer (it acts on it when it comes, in the order it asked, per
//! user; see `registry/broker_calls.rs`), and a failed call is an error to whoever asked, never a
//! silent loss. A call's effect is decided when it is made, in call order: a remote
//! implementation keeps that by sending a user's calls in order over one connection.
//!
//! Implementations: [`memory::MemoryBroker`] (one process; answers at once),
//! [`redis::RedisBroker`] (several processes on one Redis, docs/scale-out.md), and
//! [`faulty::Faulty`], which wraps another with a delay and failures on demand (`[faults]`), to
//! rehearse a slow or broken broker.

pub mod faulty;
pub mod memory;
pub mod redis;
pub mod stream;
pub mod users;

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytestring::ByteString;
use serde_json::Value;

pub use stream::ResumeRequest;

use crate::base::ConnectionId;
use crate::metrics::Failure;
use crate::protocol::{EventKind, ResumeInfo};

/// A broker's answer, possibly later.
pub type Call<T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>>>>;

/// A call the broker could not carry out; nothing of it took effect.
///
/// The variant says whose move it is: `Unavailable` is the store being away (try again later;
/// `/readyz` answers 503, a `user_message` gets `unavailable`), `Unexpected` is an answer this
/// code does not understand (a bug or a version mismatch, logged as such), `Injected` is
/// `faults.broker_fail_user_prefix` at work. The metric label comes from the variant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("the stream store is unavailable: {0}")]
    Unavailable(String),
    /// The call may or may not have taken effect (it timed out, or the connection dropped
    /// after it was sent): only a retry that is idempotent can tell (docs/scale-out.md).
    #[error("the stream store did not answer in time; the call may have taken effect: {0}")]
    Unknown(String),
    #[error("the stream store answered unexpectedly: {0}")]
    Unexpected(String),
    #[error("the broker refused the call (faults.broker_fail_user_prefix)")]
    Injected,
}

impl BrokerError {
    /// How a connection's setup or a message failed by it is counted.
    pub fn failure(&self) -> Failure {
        match self {
            BrokerError::Unavailable(_) | BrokerError::Unknown(_) => Failure::BrokerUnavailable,
            BrokerError::Unexpected(_) => Failure::BrokerUnexpected,
            BrokerError::Injected => Failure::BrokerInjected,
        }
    }
}

/// An event to append to a user's stream; the broker gives it its seq and its wire form.
pub struct NewEvent<'a> {
    pub kind: EventKind,
    pub thread_id: &'a str,
    pub run_id: Option<&'a str>,
    pub payload: &'a Value,
}

/// An event on a stream: its seq and the frame every session of the user receives.
#[derive(Clone, Debug)]
pub struct Stored {
    pub seq: u64,
    pub frame: ByteString,
}

/// What a session resuming (or starting) on a stream gets: section 6.
#[derive(Debug, Default)]
pub struct Attached {
    pub epoch: String,
    pub last_seq: u64,
    pub info: Option<ResumeInfo>,
    pub frames: Vec<ByteString>,
    /// `processing_ready.runs` as of `last_seq`, from a broker that follows runs itself (one
    /// shared by several nodes: a run may be another node's); `None` when the registry's own
    /// runs are the whole picture (docs/conversations.md, "Joining a run in progress").
    pub runs: Option<Vec<Value>>,
}

/// What is remembered of a `client_msg_id`, so a repeat is acked with the same ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenMessage {
    pub message_id: String,
    pub run_id: String,
    pub seq: u64,
    pub at: Instant,
    /// The submit call that appended it (empty where it is not kept): tells the call whose
    /// answer was lost from a retry that appended it since (`registry/runs.rs::resolve`).
    pub attempt: String,
}

/// What [`Broker::submit`] remembers of a message: its ids, the call's own attempt id, and
/// whether it starts a run (a broker shared by several processes records the run as this
/// process's at once, so that if this process goes away before the run starts, the run is still
/// ended, `node_lost`).
#[derive(Clone, Copy, Debug)]
pub struct SubmitIds<'a> {
    pub message_id: &'a str,
    pub run_id: &'a str,
    pub attempt: &'a str,
    pub starts_run: bool,
}

/// The answer to [`Broker::submit`].
#[derive(Debug)]
pub enum Submitted {
    /// The `user_message` is on the stream; with the claim of its run's thread when the broker
    /// made it in the same step (`None`: not asked; `Some(None)`: the run holds the thread;
    /// `Some(Some(run))`: another node's run does, see [`Broker::claim_thread`]).
    Appended(Stored, Option<Option<String>>),
    /// Its `client_msg_id` was seen before: nothing was appended.
    Seen(SeenMessage),
}

/// The answer to [`Broker::publish_once`].
#[derive(Debug)]
pub enum Published {
    /// Appended now: what to deliver.
    New(Vec<Stored>),
    /// The key was used before: its events were appended then, with these seqs; nothing now.
    Again(Vec<u64>),
}

/// A session as the broker records it for the connections API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub connection_id: String,
    pub node: String,
    pub connected_at: u64,
}

/// What a broker shared by several processes hears from the others, for the registry.
#[derive(Debug)]
pub enum RemoteBatch {
    /// Events appended to `user`'s stream (by any node, this one included), in seq order.
    Events { user: String, epoch: String, events: Vec<Stored> },
    /// The broker lost its subscriptions for a while and has them back: every user here may
    /// have missed events, to be filled from the streams.
    Reconnected,
    /// Another process asks this one to cancel a run it runs.
    Cancel { user: String, run_id: String },
    /// This process was taken for dead while it was away (paused past its lease) and its runs
    /// were ended by another: it must emit nothing more and stop (docs/scale-out.md, fencing).
    Fenced,
}

/// The user stream store. Calls take effect in the order they are made.
pub trait Broker {
    /// Appends events to the user's stream (making it if needed): seqs assigned, history kept
    /// within its caps. Answers the stored events in seq order: what to deliver.
    fn append(&mut self, user: &str, events: &[NewEvent<'_>]) -> Call<Vec<Stored>>;

    /// [`Broker::append`], once per `key` of the user (remembered like a `client_msg_id`): a
    /// publish sent again after an answer that never came (`Idempotency-Key`), a run's end sent
    /// again after a timeout, appends nothing twice.
    fn publish_once(&mut self, user: &str, key: &str, events: &[NewEvent<'_>]) -> Call<Published>;

    /// Appends a `user_message` unless its `client_msg_id` (when given) was seen within the TTL,
    /// and remembers it with `ids` (`message_id`, `run_id`, and the call's own `attempt`): the dedupe check and the append in one
    /// step, so two tabs sending the same id cannot both start a run.
    fn submit(
        &mut self,
        user: &str,
        client_msg_id: Option<&str>,
        ids: SubmitIds<'_>,
        echo: &NewEvent<'_>,
    ) -> Call<Submitted>;

    /// Whether `client_msg_id` was seen within the TTL (a check only; see [`Broker::submit`]).
    fn seen(&mut self, user: &str, client_msg_id: &str) -> Call<Option<SeenMessage>>;

    /// The stream's epoch and last seq, and the replay after `resume` with its verdict.
    fn attach(&mut self, user: &str, resume: Option<&ResumeRequest>) -> Call<Attached>;

    /// The kept events of the user's stream from `from_seq` on: what fills a gap.
    fn range(&mut self, user: &str, from_seq: u64) -> Call<Vec<Stored>>;

    /// Counts a session against the user's cap; `false` (and nothing counted) when the user
    /// already has `cap`.
    fn admit(&mut self, user: &str, connection: ConnectionId, cap: usize) -> Call<bool>;

    /// A session no longer counts against its user's cap. The last one leaving starts the
    /// stream's TTL.
    fn leave(&mut self, user: &str, connection: ConnectionId) -> Call<()>;

    /// This process has sessions of `user` now (`true`), or no longer has (`false`): a broker
    /// shared by several processes sends a user's events from elsewhere only where they are
    /// wanted, to the registry's one delivery entry point (`registry/fanout.rs`).
    fn interest(&mut self, user: &str, present: bool);

    /// Events from other processes, once: taken by the registry when it starts. `None` for a
    /// broker of one process.
    fn remote_events(&mut self) -> Option<futures_channel::mpsc::Receiver<RemoteBatch>> {
        None
    }

    /// The user's sessions on every node, as far as the broker knows them (a broker of one
    /// process knows none beyond the registry's own).
    fn sessions(&mut self, _user: &str) -> Call<Vec<SessionRecord>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    /// A run started here on `thread_id`: a broker shared by several processes records which
    /// one runs it, for cancels from elsewhere and for ending it if this process goes away.
    fn run_started(&mut self, _user: &str, _run_id: &str, _thread_id: &str) {}

    /// A run of `thread_id` is about to start here: `None` when it may (a broker shared by
    /// several processes then records it as the thread's holder until its terminal event is
    /// appended), or the run of another process that holds the thread now. Runs of one thread
    /// never interleave (`agent.on_busy`, docs/conversations.md); in one process the registry's
    /// own `Busy` sees to it, so a broker of one process always answers `None`.
    fn claim_thread(&mut self, _user: &str, _thread_id: &str, _run_id: &str) -> Call<Option<String>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The run ended and its terminal event is on the stream (its record goes).
    fn run_ended(&mut self, _user: &str, _run_id: &str) {}

    /// Asks the process that runs `run_id` of `user` to cancel it; `false` when none does.
    fn cancel_elsewhere(&mut self, _user: &str, _run_id: &str) -> Call<bool> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Whether the store answers now: `/readyz`.
    fn ping(&mut self) -> Call<()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Periodic upkeep: forgets what outlived its TTL, gives back room. `true` when memory was
    /// freed.
    fn upkeep(&mut self) -> bool;

    /// (user streams, bytes of history) held here, for the metrics.
    fn gauges(&self) -> (usize, usize);
}
