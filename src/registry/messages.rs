//! The typed messages between sessions, HTTP routes and the registry.
//!
//! Sessions ask with `do_send` and the registry answers through the session's own mailbox
//! ([`ToSession`]), never as a reply future: one FIFO carries both the setup answers and the
//! events that follow, so no event can overtake the `processing_ready` frame.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;

use crate::admission::SetupTicket;
use crate::auth::Identity;
use crate::base::{ConnectionId, Outbound};
use crate::broker::ResumeRequest;
use crate::protocol::{ErrorCode, PublishResponse, PublishedEvent, ResumeInfo, UserMessage};
use crate::state::ConnectionState;

// ----- registry -> registry -------------------------------------------------------------------

/// Every shard of the process, for each shard to know where a user lives.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shards(pub super::Registries);

// ----- session -> registry ---------------------------------------------------------------------

/// A session started: record it as `accepted`, answered with [`ToSession::Accepted`]. With the
/// token given at the upgrade the session asks for its whole setup at once: the registry then
/// goes on through `authenticated`, `services_ready` and `processing_ready`, checking the table
/// and answering at each step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: ConnectionId,
    pub session: Recipient<ToSession>,
    /// The session's unsent output; the registry stops delivering past
    /// `limits.max_outbound_bytes`.
    pub outbound: Outbound,
    pub identity: Option<Identity>,
    pub resume: Option<ResumeRequest>,
    /// Counts the message under `limits.max_registry_backlog` until the shard takes it up.
    pub waiting: SetupTicket,
}

/// The token of an `auth` frame verified: set the connection up from `authenticated` on, as
/// [`Register`] does with a token given at the upgrade.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Authenticate {
    pub id: ConnectionId,
    pub identity: Identity,
    pub resume: Option<ResumeRequest>,
    pub waiting: SetupTicket,
}

/// A `user_message` from a `processing_ready` session: ack, echo, start a run.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubmitMessage {
    pub id: ConnectionId,
    pub message: UserMessage,
}

/// A `cancel_run` from a `processing_ready` session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelRequest {
    pub id: ConnectionId,
    pub run_id: String,
}

// ----- AG-UI clients (`POST /ag-ui`) -> registry -----------------------------------------------

/// One step of a run, for an AG-UI client that follows it: the stream event's output, and the
/// agent's original AG-UI events when the agent speaks AG-UI (`http/ag_ui/render.rs`).
#[derive(Debug)]
pub struct RunStep {
    pub output: crate::protocol::AgentOutput,
    pub ag_ui: Vec<serde_json::Value>,
    /// What the step weighs (its JSON), counted in [`Follower::unread`] until the client takes it.
    pub bytes: usize,
}

/// The steps of a run an AG-UI client follows (`POST /ag-ui`), and the bytes of those it has
/// not taken yet: a client that does not read stops following once they pass
/// `limits.max_outbound_bytes` (or the channel's steps), so what it holds up is bounded.
#[derive(Clone)]
pub struct Follower {
    pub steps: futures_channel::mpsc::Sender<RunStep>,
    pub unread: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Follower {
    /// Hands a step over unless the client is too far behind; false: it no longer follows.
    pub fn hand(&mut self, step: RunStep, max_unread: usize) -> bool {
        use std::sync::atomic::Ordering;
        if self.unread.load(Ordering::Acquire).saturating_add(step.bytes) > max_unread {
            return false;
        }
        self.unread.fetch_add(step.bytes, Ordering::AcqRel);
        self.steps.try_send(step).is_ok()
    }
}

/// The bytes of a step's JSON, counted without keeping the text.
pub fn weight(output: &crate::protocol::AgentOutput, ag_ui: &[serde_json::Value]) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    for event in ag_ui {
        let _ = serde_json::to_writer(&mut count, event);
    }
    let _ = serde_json::to_writer(&mut count, &output.payload());
    count.0
}

/// Why a user message from an AG-UI client started no run.
pub type HttpRunRefusal = (ErrorCode, String);

/// `POST /ag-ui`: a user message on `thread_id` from an AG-UI client of `user_id`, echoed to the
/// user's sessions like any other; its run's steps go to `steps` as well as onto the stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartHttpRun {
    pub user_id: String,
    pub thread_id: String,
    pub content: String,
    /// The client's `tools`, `context`, `state` and `forwardedProps`, for the agent.
    pub client: crate::protocol::ClientInput,
    /// The new message's id as the client gave it, if it did.
    pub message_id: Option<String>,
    /// A frontend tool's result, or an interrupt's answer (`resume`), instead of user words.
    pub answers: crate::protocol::Answers,
    /// The client's `runId`; a fresh one when `None`.
    pub run_id: Option<String>,
    pub steps: Follower,
    /// The run id once the run started, or why it did not.
    pub answer: futures_channel::oneshot::Sender<Result<String, HttpRunRefusal>>,
}

/// Cancels `run_id` for an AG-UI client of `user_id` that went away (the request was aborted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelRunOf {
    pub user_id: String,
    pub run_id: String,
}

/// Setup failed on the session's side (its setup deadline passed): move to `failed`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fail {
    pub id: ConnectionId,
    pub failure: crate::metrics::Failure,
}

/// The session is closing: stop fanning out to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Closing {
    pub id: ConnectionId,
}

/// The session's actor stopped: forget it, whatever state it was in.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub id: ConnectionId,
}

// ----- registry -> session ---------------------------------------------------------------------

/// Everything the registry tells a session, in the order the session must act on it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum ToSession {
    Accepted,
    Authenticated,
    ServicesReady,
    ProcessingReady {
        epoch: String,
        last_seq: u64,
        resume: Option<ResumeInfo>,
        replay: Vec<ByteString>,
        /// The user's runs in progress as of `last_seq`, for a tab that joins one.
        runs: Vec<serde_json::Value>,
    },
    /// Setup refused: send the error frame (if any), then close with `close_code`.
    Refused {
        error: Option<(ErrorCode, String)>,
        close_code: u16,
        reason: &'static str,
    },
    /// Answers decided in one go (a whole setup, when the broker answers at once), in order, in
    /// one mailbox message: one wake-up of the session's thread instead of one each.
    Several(Vec<ToSession>),
    /// Deliveries wait in the session's `Outbound` inbox: take them all (one wake-up however
    /// many were handed over meanwhile).
    Deliveries,
    /// The session's unsent output passed its budget: close with 4008.
    SlowConsumer,
    /// The server is shutting down: close with 1012 after what was already handed over.
    Shutdown,
}

// ----- HTTP -> registry ------------------------------------------------------------------------

/// One row of `GET /api/v1/users/{user_id}/connections`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionView {
    pub connection_id: String,
    /// The process the session is on (`broker.node_id`).
    pub node: String,
    /// Known to the session's own node only: `null` in rows of other nodes.
    pub state: Option<ConnectionState>,
    pub connected_at: u64,
    /// Bytes handed to the session and not yet written to its socket (its node only).
    pub unsent_bytes: Option<i64>,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<ConnectionView>, crate::broker::BrokerError>")]
pub struct ListConnections {
    pub user_id: String,
}

/// `POST /api/v1/publish`: all events of the batch, atomically, onto one user's stream. Answers
/// `None` when the request was abandoned (its HTTP wait ran out) before the registry took it,
/// `Some(Err)` when the broker failed it (nothing was published).
#[derive(Message)]
#[rtype(result = "Option<Result<PublishResponse, PublishError>>")]
pub struct Publish {
    pub user_id: String,
    pub events: Vec<PublishedEvent>,
    pub ticket: PublishTicket,
    /// The publisher's `Idempotency-Key`: published once per key of the user.
    pub idempotency_key: Option<String>,
}

/// Why a publish published nothing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The stream store did not take the events.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// A publisher's answer (`agent_completed` with a `response`) could not be stored first.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Decides once, between an HTTP handler that stops waiting and the registry that takes the
/// publish, which of the two won: a 503 then always means "nothing was published".
#[derive(Clone, Debug, Default)]
pub struct PublishTicket(Arc<AtomicU8>);

impl PublishTicket {
    const PENDING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    pub fn new() -> PublishTicket {
        PublishTicket::default()
    }

    /// The registry takes the publish; false when the caller had already given up.
    pub fn take(&self) -> bool {
        self.settle(Self::TAKEN)
    }

    /// The caller gives up; false when the registry had already taken it.
    pub fn abandon(&self) -> bool {
        self.settle(Self::ABANDONED)
    }

    fn settle(&self, to: u8) -> bool {
        self.0.compare_exchange(Self::PENDING, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// Graceful shutdown: runs in progress get half of `server.shutdown_grace_secs` to end, then end
/// with `agent_error` `node_shutdown`; then every session is told to close with 1012. Answers
/// how many were told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

/// The threads API changed a thread (docs/conversations.md): its user's tabs hear of it
/// (`thread_updated` with the title, `thread_deleted` without), and a deleted thread's run in
/// progress is cancelled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ThreadChanged {
    pub user_id: String,
    pub thread_id: String,
    /// `Some`: renamed to this; `None`: deleted.
    pub title: Option<String>,
    pub cancel: Option<String>,
}

/// Answered while the registry runs: what `/readyz` asks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Probe;

/// `/readyz`: does the broker answer?
#[derive(Message)]
#[rtype(result = "Result<(), crate::broker::BrokerError>")]
pub struct ProbeBroker;
