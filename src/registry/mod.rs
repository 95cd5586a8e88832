//! The registry: the supervisor actor that knows every connection, owns every state transition
//! (protocol section 3) and every user's stream (sections 5 and 6), and fans events out.
//!
//! It processes one message at a time, so each user's "assign seq, append to history, deliver"
//! is atomic without locks. Nothing a single connection does can hurt the others here: every
//! message names a connection id that may already be gone, and every "no" is an answer to the
//! asking session, a metric and a log line, never a panic.

pub mod messages;
pub mod stream;

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use log::{debug, info, warn};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;

use crate::agent::{AgentEvent, AgentHandle, RunRequest, StartRun, StopRun};
use crate::auth::Identity;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::{encoded_len, Outbound};
use crate::protocol::{
    close, now_ms, user_message_payload, AgentOutput, ErrorCode, Event, EventKind, PublishResponse,
    RunStatus, ServerFrame,
};
use crate::state::ConnectionState;
pub use messages::*;
use stream::{ResumeRequest, UserStream};

/// The parts of the configuration the registry acts on.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub max_sessions_per_user: usize,
    pub events_per_user: usize,
    pub history_ttl: Duration,
    pub setup_delay: Duration,
    pub fail_setup_user_prefix: String,
    pub max_outbound_bytes: usize,
}

impl RegistrySettings {
    pub fn from_config(config: &Config) -> RegistrySettings {
        RegistrySettings {
            max_sessions_per_user: config.limits.max_sessions_per_user,
            events_per_user: config.history.events_per_user,
            history_ttl: Duration::from_secs(config.history.ttl_secs),
            setup_delay: Duration::from_millis(config.faults.setup_delay_ms),
            fail_setup_user_prefix: config.faults.fail_setup_user_prefix.clone(),
            max_outbound_bytes: config.limits.max_outbound_bytes,
        }
    }
}

struct Connection {
    state: ConnectionState,
    user_id: Option<String>,
    /// The one handle the registry sends through: `try_send` on it respects the mailbox bound.
    session: Recipient<ToSession>,
    outbound: Outbound,
    /// Over its outbound budget: no more deliveries, a 4008 close is on its way.
    slow: bool,
    connected_at: u64,
}

/// What the registry remembers of a `client_msg_id` so a repeat is acked with the same ids.
struct SeenMessage {
    message_id: String,
    run_id: String,
    seq: u64,
    at: Instant,
}

struct User {
    /// Connections holding one of the user's session slots (authenticated and later).
    sessions: Vec<ConnectionId>,
    stream: UserStream,
    seen_messages: HashMap<String, SeenMessage>,
}

/// A run that has started and not ended.
struct Run {
    // Shared strings: each of the run's events needs them while the registry is borrowed mutably.
    user_id: Rc<str>,
    thread_id: Rc<str>,
    started: Instant,
    /// The answer streamed so far, for the `agent_completed` of a cancelled run.
    response: String,
}

pub struct Registry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    agent: AgentHandle,
    connections: HashMap<ConnectionId, Connection>,
    users: HashMap<String, User>,
    runs: HashMap<String, Run>,
    /// Reused to serialise events, so each costs one exact-size allocation.
    scratch: Vec<u8>,
    /// Set by [`Shutdown`]: a session registered after it is told to close at once.
    shutting_down: bool,
}

/// `prefix` + 16 random characters: message and run ids.
fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 16);
    id
}

/// Hands frames to one session within its outbound budget, as one mailbox message however many
/// they are. Over budget, or with its mailbox full, the session is flagged slow and told to close
/// with 4008; nothing more is sent to it.
fn deliver(
    connection: &mut Connection,
    id: ConnectionId,
    frames: &[ByteString],
    created: Option<Instant>,
    max_outbound_bytes: usize,
    metrics: &Metrics,
) -> bool {
    let Some((first, rest)) = frames.split_first() else { return true };
    if connection.slow {
        return false;
    }
    let cost: usize = frames.iter().map(|f| encoded_len(f.len())).sum();
    let queued = connection.outbound.add(cost);
    let sent = queued <= max_outbound_bytes as i64 && {
        let delivery = Delivery { first: first.clone(), rest: rest.to_vec(), created };
        connection.session.try_send(ToSession::Deliver(delivery)).is_ok()
    };
    if sent {
        metrics.frames_sent.inc_by(frames.len() as u64);
        return true;
    }
    connection.outbound.release(cost);
    connection.slow = true;
    warn!("{id}: slow consumer: unsent output over {max_outbound_bytes} bytes; closing with 4008");
    // One control message, so it may bypass the bound (a full mailbox would refuse it).
    connection.session.do_send(ToSession::SlowConsumer);
    false
}

/// An event to append to a user's stream.
struct NewEvent<'a> {
    kind: EventKind,
    thread_id: &'a str,
    run_id: Option<&'a str>,
    payload: &'a Value,
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The registry's mailbox is unbounded on purpose: sessions `do_send` a handful of setup
        // messages each, and HTTP routes wait for answers.
        let sweep = self.settings.history_ttl.min(Duration::from_secs(5)).max(Duration::from_millis(100));
        ctx.run_interval(sweep, |registry, _| registry.forget_idle_streams());
    }
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Arc<Metrics>, agent: AgentHandle) -> Registry {
        Registry {
            settings,
            metrics,
            agent,
            connections: HashMap::new(),
            users: HashMap::new(),
            runs: HashMap::new(),
            scratch: Vec::with_capacity(4096),
            shutting_down: false,
        }
    }

    /// The one place a connection changes state: checks the table, records, counts.
    fn transition(&mut self, id: ConnectionId, to: ConnectionState) -> Result<ConnectionState, ()> {
        let Some(connection) = self.connections.get_mut(&id) else {
            debug!("{id}: transition to {to} for a connection that is gone");
            return Err(());
        };
        let from = connection.state;
        if !from.can_transition_to(to) {
            self.metrics.state_transitions_refused.inc();
            warn!("{id}: refused transition {from} -> {to}");
            return Err(());
        }
        connection.state = to;
        self.metrics.state_transitions.with_label_values(&[from.as_str(), to.as_str()]).inc();
        let gauge_to = (to != ConnectionState::Closed).then_some(to);
        self.metrics.move_gauge(Some(from), gauge_to);
        debug!("{id}: {from} -> {to}");
        Ok(from)
    }

    fn tell(&self, id: ConnectionId, message: ToSession) {
        if let Some(connection) = self.connections.get(&id) {
            // Setup answers are a bounded handful per connection, so they may bypass the mailbox
            // capacity; events never do (see `deliver`).
            connection.session.do_send(message);
        }
    }

    /// Moves a connection in setup to `failed` and tells its session to close with `close_code`
    /// (after the error frame, if any); `reason` labels the failure metric.
    fn fail_setup(
        &mut self,
        id: ConnectionId,
        reason: &'static str,
        close_code: u16,
        error: Option<(ErrorCode, String)>,
    ) {
        if self.transition(id, ConnectionState::Failed).is_ok() {
            self.metrics.fail(reason);
            warn!("{id}: setup failed: {reason}");
            self.release_user_slot(id);
            self.tell(id, ToSession::Refused { error, close_code, reason });
        }
    }

    fn release_user_slot(&mut self, id: ConnectionId) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.as_deref()) else {
            return;
        };
        if let Some(user) = self.users.get_mut(user_id) {
            user.sessions.retain(|s| *s != id);
            if user.sessions.is_empty() {
                user.stream.idle_since = Some(std::time::Instant::now());
            }
        }
    }

    fn user_mut(&mut self, user_id: &str) -> &mut User {
        let capacity = self.settings.events_per_user;
        self.users.entry(user_id.to_owned()).or_insert_with(|| {
            let mut stream = UserStream::new(capacity);
            // A stream created by a publish, before any session, starts its TTL at once.
            stream.idle_since = Some(Instant::now());
            User { sessions: Vec::new(), stream, seen_messages: HashMap::new() }
        })
    }

    /// Appends events to a user's stream and fans them out to the user's ready sessions: each
    /// serialised once and shared by all, all of them in one message per session. Returns their
    /// seqs and how many sessions they reached.
    fn publish(&mut self, user_id: &str, events: &[NewEvent<'_>]) -> (Vec<u64>, usize) {
        let created = Instant::now();
        let mut scratch = std::mem::take(&mut self.scratch);
        let user = self.user_mut(user_id);
        let mut seqs = Vec::with_capacity(events.len());
        let mut frames = Vec::with_capacity(events.len());
        for event in events {
            let seq = user.stream.next_seq();
            let wire = Event {
                kind: event.kind,
                seq,
                ts: now_ms(),
                thread_id: event.thread_id,
                run_id: event.run_id,
                payload: event.payload,
            };
            let frame = wire.to_frame(&mut scratch);
            user.stream.push(seq, frame.clone());
            seqs.push(seq);
            frames.push(frame);
        }
        // Section 6: an offline user's stream is kept for the TTL after its last event.
        if user.sessions.is_empty() {
            user.stream.idle_since = Some(created);
        }
        self.scratch = scratch;
        self.metrics.events_published.inc_by(events.len() as u64);
        let Some(user) = self.users.get(user_id) else { return (seqs, 0) };
        let max = self.settings.max_outbound_bytes;
        let mut reached = 0;
        for id in &user.sessions {
            if let Some(connection) = self.connections.get_mut(id) {
                if connection.state == ConnectionState::ProcessingReady
                    && deliver(connection, *id, &frames, Some(created), max, &self.metrics)
                {
                    reached += 1;
                }
            }
        }
        (seqs, reached)
    }

    /// Appends one event; returns its seq.
    fn publish_one(&mut self, user_id: &str, event: NewEvent<'_>) -> u64 {
        self.publish(user_id, std::slice::from_ref(&event)).0[0]
    }

    /// A frame for one session alone (ack, error), under the same budget as events.
    fn send_to(&mut self, id: ConnectionId, frame: ServerFrame<'_>) {
        let max = self.settings.max_outbound_bytes;
        if let Some(connection) = self.connections.get_mut(&id) {
            let frame = ByteString::from(frame.to_text());
            deliver(connection, id, std::slice::from_ref(&frame), None, max, &self.metrics);
        }
    }

    /// The user of a `processing_ready` connection; requests from any other state are ignored.
    fn ready_user(&self, id: ConnectionId) -> Option<String> {
        let connection = self.connections.get(&id)?;
        if connection.state != ConnectionState::ProcessingReady {
            debug!("{id}: request in state {} ignored", connection.state);
            return None;
        }
        connection.user_id.clone()
    }

    /// Streams of users with no session for `history.ttl_secs` are forgotten (section 6), and
    /// so are the `client_msg_id`s seen longer ago than that.
    fn forget_idle_streams(&mut self) {
        let ttl = self.settings.history_ttl;
        let before = self.users.len();
        self.users.retain(|_, user| {
            user.seen_messages.retain(|_, seen| seen.at.elapsed() < ttl);
            !user.sessions.is_empty() || user.stream.idle_since.is_none_or(|since| since.elapsed() < ttl)
        });
        let forgotten = before - self.users.len();
        if forgotten > 0 {
            debug!("forgot {forgotten} idle user streams");
        }
    }

    /// `authenticated`: binds the connection to its user, within the user's session cap. Then
    /// goes on to `services_ready`, after the `[faults]` delay if one is set.
    fn authenticate(
        &mut self,
        id: ConnectionId,
        identity: Identity,
        resume: Option<ResumeRequest>,
        ctx: &mut Context<Self>,
    ) {
        let Some(connection) = self.connections.get(&id) else {
            debug!("{id}: vanished before authentication");
            return;
        };
        if connection.state != ConnectionState::Accepted {
            let _ = self.transition(id, ConnectionState::Authenticated); // counts the refusal
            self.refuse_out_of_order(id);
            return;
        }
        let user_id = identity.user_id;
        let cap = self.settings.max_sessions_per_user;
        let user = self.user_mut(&user_id);
        if user.sessions.len() >= cap {
            self.fail_setup(id, "too_many_sessions", close::TOO_MANY_SESSIONS, None);
            return;
        }
        user.sessions.push(id);
        user.stream.idle_since = None;
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.user_id = Some(user_id);
        }
        if self.transition(id, ConnectionState::Authenticated).is_err() {
            return;
        }
        self.tell(id, ToSession::Authenticated);
        let delay = self.settings.setup_delay;
        if delay.is_zero() {
            self.attach(id, resume);
        } else {
            // A timer, not a sleep: the registry keeps serving everyone else meanwhile.
            ctx.run_later(delay, move |registry, _| registry.attach(id, resume));
        }
    }

    /// `services_ready`: the user's stream is attached. This is where a setup can fail.
    fn attach(&mut self, id: ConnectionId, resume: Option<ResumeRequest>) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.clone()) else {
            debug!("{id}: vanished before services_ready");
            return;
        };
        let prefix = &self.settings.fail_setup_user_prefix;
        if !prefix.is_empty() && user_id.starts_with(prefix.as_str()) {
            let message = "the user's services could not be set up".to_owned();
            self.fail_setup(id, "setup_failed", close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
            return;
        }
        self.user_mut(&user_id);
        if self.transition(id, ConnectionState::ServicesReady).is_err() {
            self.refuse_out_of_order(id);
            return;
        }
        self.tell(id, ToSession::ServicesReady);
        self.activate(id, &user_id, resume);
    }

    /// `processing_ready`: from now on the connection is in the fan-out. The replay is computed
    /// in the same step, so no event can fall between the two.
    fn activate(&mut self, id: ConnectionId, user_id: &str, resume: Option<ResumeRequest>) {
        if self.transition(id, ConnectionState::ProcessingReady).is_err() {
            self.refuse_out_of_order(id);
            return;
        }
        let stream = &self.user_mut(user_id).stream;
        let replay = stream.replay(resume.as_ref());
        let answer = ToSession::ProcessingReady {
            epoch: stream.epoch().to_owned(),
            last_seq: stream.last_seq(),
            resume: replay.info,
            replay: replay.frames,
        };
        info!("{id}: processing_ready for user {user_id}");
        self.tell(id, answer);
    }

    /// A session asked for a step its connection is not in: contained as a setup failure.
    fn refuse_out_of_order(&mut self, id: ConnectionId) {
        let message = "connection setup went out of order".to_owned();
        self.fail_setup(id, "setup_failed", close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
    }
}

impl Handler<Register> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Register, ctx: &mut Self::Context) {
        let id = msg.id;
        let connection = Connection {
            state: ConnectionState::Accepted,
            user_id: None,
            session: msg.session,
            outbound: msg.outbound,
            slow: false,
            connected_at: now_ms(),
        };
        if self.connections.insert(id, connection).is_some() {
            // Ids are unique by construction; a duplicate would be a bug, never silently merged.
            warn!("{id}: registered twice");
        }
        self.metrics.connections_opened.inc();
        self.metrics.move_gauge(None, Some(ConnectionState::Accepted));
        debug!("{id}: accepted");
        self.tell(id, ToSession::Accepted);
        if self.shutting_down {
            // The upgrade raced the shutdown: it gets the same 1012 as every other session.
            self.tell(id, ToSession::Shutdown);
            return;
        }
        if let Some(identity) = msg.identity {
            self.authenticate(id, identity, msg.resume, ctx);
        }
    }
}

impl Handler<Authenticate> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Authenticate, ctx: &mut Self::Context) {
        self.authenticate(msg.id, msg.identity, msg.resume, ctx);
    }
}

impl Handler<SubmitMessage> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SubmitMessage, ctx: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        let message = msg.message;
        let client_msg_id = message.client_msg_id.as_deref();
        // A repeated client_msg_id is acked again with the same ids and starts nothing.
        if let Some(seen) = client_msg_id.and_then(|c| self.user_mut(&user_id).seen_messages.get(c)) {
            let (message_id, run_id, seq) = (seen.message_id.clone(), seen.run_id.clone(), seen.seq);
            debug!("{id}: repeated client_msg_id; acked again");
            let ack = ServerFrame::Ack { client_msg_id, message_id: &message_id, run_id: &run_id, seq };
            self.send_to(id, ack);
            return;
        }
        let message_id = new_id("m_");
        let run_id = new_id("r_");
        let payload = user_message_payload(&message_id, &message.content, client_msg_id);
        let echo = NewEvent {
            kind: EventKind::UserMessage,
            thread_id: &message.thread_id,
            run_id: None,
            payload: &payload,
        };
        let seq = self.publish_one(&user_id, echo);
        self.send_to(id, ServerFrame::Ack { client_msg_id, message_id: &message_id, run_id: &run_id, seq });
        if let Some(client_msg_id) = message.client_msg_id {
            let seen = SeenMessage {
                message_id: message_id.clone(),
                run_id: run_id.clone(),
                seq,
                at: Instant::now(),
            };
            self.user_mut(&user_id).seen_messages.insert(client_msg_id, seen);
        }
        let run = Run {
            user_id: Rc::from(user_id.as_str()),
            thread_id: Rc::from(message.thread_id.as_str()),
            started: Instant::now(),
            response: String::new(),
        };
        self.runs.insert(run_id.clone(), run);
        debug!("{id}: run {run_id} started for user {user_id}");
        let request = RunRequest {
            run_id,
            user_id,
            thread_id: message.thread_id,
            message_id,
            content: message.content,
        };
        self.agent.start.do_send(StartRun { run: request, sink: ctx.address().recipient() });
    }
}

impl Handler<AgentEvent> for Registry {
    type Result = ();

    fn handle(&mut self, msg: AgentEvent, _: &mut Self::Context) {
        let AgentEvent { run_id, output } = msg;
        let Some(run) = self.runs.get_mut(&run_id) else {
            // The run was cancelled (or never existed): nothing of it after its end.
            debug!("event of ended run {run_id} dropped");
            return;
        };
        if let AgentOutput::MessageChunk { delta } = &output {
            run.response.push_str(delta);
        }
        let kind = output.kind();
        let (user_id, thread_id) = if kind.is_terminal() {
            let run = self.runs.remove(&run_id).expect("looked up above");
            (run.user_id, run.thread_id)
        } else {
            (run.user_id.clone(), run.thread_id.clone())
        };
        let payload = output.payload();
        self.publish_one(
            &user_id,
            NewEvent { kind, thread_id: &thread_id, run_id: Some(&run_id), payload: &payload },
        );
    }
}

impl Handler<CancelRequest> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CancelRequest, _: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        // Another user's run is indistinguishable from an unknown one.
        let owned = self.runs.get(&msg.run_id).is_some_and(|run| *run.user_id == *user_id);
        let Some(run) = owned.then(|| self.runs.remove(&msg.run_id)).flatten() else {
            let message = format!("no running run {} of yours", msg.run_id);
            self.send_to(id, ServerFrame::error(ErrorCode::NotFound, &message, Some("cancel_run")));
            return;
        };
        info!("{id}: run {} cancelled", msg.run_id);
        self.agent.stop.do_send(StopRun { run_id: msg.run_id.clone() });
        let output = AgentOutput::Completed {
            status: RunStatus::Cancelled,
            content: run.response,
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        let payload = output.payload();
        let end = NewEvent {
            kind: EventKind::AgentCompleted,
            thread_id: &run.thread_id,
            run_id: Some(&msg.run_id),
            payload: &payload,
        };
        self.publish_one(&user_id, end);
    }
}

impl Handler<Publish> for Registry {
    type Result = MessageResult<Publish>;

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        if !msg.ticket.take() {
            debug!("publish to user {} abandoned by its caller before it was taken", msg.user_id);
            return MessageResult(None);
        }
        let events: Vec<NewEvent<'_>> = msg
            .events
            .iter()
            .map(|e| NewEvent {
                kind: e.kind,
                thread_id: &e.thread_id,
                run_id: e.run_id.as_deref(),
                payload: &e.payload,
            })
            .collect();
        let (seqs, sessions) = self.publish(&msg.user_id, &events);
        MessageResult(Some(PublishResponse { seqs, sessions }))
    }
}

impl Handler<Fail> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Fail, _: &mut Self::Context) {
        if self.transition(msg.id, ConnectionState::Failed).is_ok() {
            self.metrics.fail(msg.reason);
            warn!("{}: setup failed: {}", msg.id, msg.reason);
            self.release_user_slot(msg.id);
        }
    }
}

impl Handler<Closing> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Closing, _: &mut Self::Context) {
        let state = self.connections.get(&msg.id).map(|c| c.state);
        if state.is_some_and(|s| s.can_transition_to(ConnectionState::Closing)) {
            let _ = self.transition(msg.id, ConnectionState::Closing);
        }
        // A closing session may take a while to stop (its peer may not be reading its close
        // frame); its place under the user's session cap is free from now on.
        self.release_user_slot(msg.id);
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        let id = msg.id;
        let Some(state) = self.connections.get(&id).map(|c| c.state) else {
            return;
        };
        if state.can_transition_to(ConnectionState::Closing) {
            let _ = self.transition(id, ConnectionState::Closing);
        }
        let _ = self.transition(id, ConnectionState::Closed);
        self.release_user_slot(id);
        if let Some(connection) = self.connections.remove(&id) {
            let user = connection.user_id.as_deref().unwrap_or("-");
            info!("{id}: closed (user {user}, was {state})");
        }
    }
}

impl Handler<ListConnections> for Registry {
    type Result = MessageResult<ListConnections>;

    fn handle(&mut self, msg: ListConnections, _: &mut Self::Context) -> Self::Result {
        let Some(user) = self.users.get(&msg.user_id) else {
            return MessageResult(Vec::new());
        };
        let views = user
            .sessions
            .iter()
            .filter_map(|id| {
                self.connections.get(id).map(|c| ConnectionView {
                    connection_id: id.to_string(),
                    state: c.state,
                    connected_at: c.connected_at,
                    unsent_bytes: c.outbound.pending(),
                })
            })
            .collect();
        MessageResult(views)
    }
}

impl Handler<Shutdown> for Registry {
    type Result = usize;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> usize {
        self.shutting_down = true;
        // Queued behind every delivery already handed to each session, so those go out first.
        for connection in self.connections.values() {
            connection.session.do_send(ToSession::Shutdown);
        }
        info!("shutdown: telling {} sessions to close with 1012", self.connections.len());
        self.connections.len()
    }
}

impl Handler<Probe> for Registry {
    type Result = ();

    fn handle(&mut self, _: Probe, _: &mut Self::Context) {}
}
