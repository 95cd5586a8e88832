//! The registry: the supervisor actor that knows every connection, owns every state transition
//! (protocol section 3) and every user's stream (sections 5 and 6), and fans events out.
//!
//! It processes one message at a time, so each user's "assign seq, append to history, deliver"
//! is atomic without locks. Nothing a single connection does can hurt the others here: every
//! message names a connection id that may already be gone, and every "no" is an answer to the
//! asking session, a metric and a log line, never a panic.

pub mod messages;
pub mod stream;
pub mod users;

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
use crate::ratelimit::Verdict;
use crate::state::ConnectionState;
pub use messages::*;
use stream::{HistoryLimits, ResumeRequest};
use users::{SeenMessage, UserLimits, Users};

/// The parts of the configuration the registry acts on.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub max_sessions_per_user: usize,
    pub users: UserLimits,
    pub setup_delay: Duration,
    pub fail_setup_user_prefix: String,
    pub max_outbound_bytes: usize,
    pub max_runs_per_user: usize,
    pub run_timeout: Duration,
    pub max_response_bytes: usize,
}

impl RegistrySettings {
    pub fn from_config(config: &Config) -> RegistrySettings {
        RegistrySettings {
            max_sessions_per_user: config.limits.max_sessions_per_user,
            users: UserLimits {
                history: HistoryLimits {
                    events: config.history.events_per_user,
                    bytes: config.history.max_bytes_per_user,
                },
                max_history_bytes: config.history.max_bytes,
                max_users: config.history.max_users,
                dedupe_per_user: config.history.dedupe_per_user,
                ttl: Duration::from_secs(config.history.ttl_secs),
                messages_per_second: config.limits.user_messages_per_second,
            },
            setup_delay: Duration::from_millis(config.faults.setup_delay_ms),
            fail_setup_user_prefix: config.faults.fail_setup_user_prefix.clone(),
            max_outbound_bytes: config.limits.max_outbound_bytes,
            max_runs_per_user: config.agent.max_runs_per_user,
            run_timeout: Duration::from_secs(config.agent.run_timeout_secs),
            max_response_bytes: config.agent.max_response_bytes,
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

/// A run that has started and not ended.
struct Run {
    // Shared strings: each of the run's events needs them while the registry is borrowed mutably.
    user_id: Rc<str>,
    thread_id: Rc<str>,
    started: Instant,
    /// The answer streamed so far, for the `agent_completed` of a cancelled run.
    response: String,
    /// The message that started the run, for an `agent_started` the registry has to supply.
    message_id: String,
    /// `agent_started` is on the stream: a run ended before its agent started it (timeout,
    /// agent unavailable, cancel) gets one from the registry first, so every run that reaches
    /// clients starts with `agent_started`.
    announced: bool,
}

pub struct Registry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    agent: AgentHandle,
    connections: HashMap<ConnectionId, Connection>,
    users: Users,
    runs: HashMap<String, Run>,
    /// Reused to serialise events, so each costs one exact-size allocation.
    scratch: Vec<u8>,
    /// Set by [`Shutdown`]: a session registered after it is told to close at once.
    shutting_down: bool,
    trimmer: crate::memory::Trimmer,
}

/// Gives back a map's table once it is four times larger than what it holds.
pub(crate) fn shrink_if_oversized<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) -> bool {
    let oversized = map.capacity() > 4 * map.len().max(256);
    if oversized {
        map.shrink_to_fit();
    }
    oversized
}

/// `prefix` + 16 random characters: message and run ids.
fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 16);
    id
}

/// Hands frames to one session within its outbound budget, as one mailbox message however many
/// they are. A session is slow when what it had not yet sent was already over the budget before
/// these frames (or its mailbox is full): it is flagged, told to close with 4008, and sent
/// nothing more. Judging the backlog before the frames, not after, is what lets a reading
/// session take a publish batch of up to `api.max_body_bytes` whole, which is about as large as
/// the budget itself; what a session can hold is then bounded by the budget plus one batch.
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
    let before = connection.outbound.add(cost) - cost as i64;
    let sent = before <= max_outbound_bytes as i64 && {
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
        // A quarter of the TTL, so a stream outlives its TTL by at most that much.
        let sweep = (self.settings.users.ttl / 4).min(Duration::from_secs(5)).max(Duration::from_millis(100));
        ctx.run_interval(sweep, |registry, _| {
            registry.users.forget_idle();
            registry.metrics.user_streams.set(registry.users.len() as i64);
            registry.metrics.history_bytes.set(registry.users.history_bytes() as i64);
            registry.metrics.runs_in_progress.set(registry.runs.len() as i64);
        });
        ctx.run_interval(Duration::from_secs(5), |registry, _| {
            // A table sized for a crowd that has left keeps the crowd's memory.
            let shrunk = shrink_if_oversized(&mut registry.connections)
                | shrink_if_oversized(&mut registry.runs)
                | registry.users.shrink_if_oversized();
            registry.trimmer.tick(registry.connections.len(), shrunk)
        });
        let overdue =
            (self.settings.run_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ctx.run_interval(overdue, |registry, _| registry.end_overdue_runs());
    }
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Arc<Metrics>, agent: AgentHandle) -> Registry {
        let users = Users::new(settings.users);
        Registry {
            settings,
            metrics,
            agent,
            connections: HashMap::new(),
            users,
            runs: HashMap::new(),
            scratch: Vec::with_capacity(4096),
            shutting_down: false,
            trimmer: crate::memory::Trimmer::new(),
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

    /// A connection the registry gave up on (slow): out of the fan-out and of its user's
    /// session cap at once, while its actor may take a while to stop.
    fn abandon(&mut self, id: ConnectionId) {
        if self.connections.get(&id).is_some_and(|c| c.state.can_transition_to(ConnectionState::Closing)) {
            let _ = self.transition(id, ConnectionState::Closing);
        }
        self.release_user_slot(id);
    }

    /// Appends events to a user's stream and fans them out to the user's ready sessions: each
    /// serialised once and shared by all, all of them in one message per session. Returns their
    /// seqs and how many sessions they reached.
    fn publish(&mut self, user_id: &str, events: &[NewEvent<'_>]) -> (Vec<u64>, usize) {
        let created = Instant::now();
        let mut scratch = std::mem::take(&mut self.scratch);
        let user = self.users.entry(user_id);
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
            seqs.push(seq);
            frames.push(wire.to_frame(&mut scratch));
        }
        // Section 6: an offline user's stream is kept for the TTL after its last event.
        if user.sessions.is_empty() {
            user.stream.idle_since = Some(created);
        }
        for (seq, frame) in seqs.iter().zip(&frames) {
            self.users.keep(user_id, *seq, frame.clone());
        }
        self.scratch = scratch;
        self.metrics.events_published.inc_by(events.len() as u64);
        let Some(user) = self.users.get(user_id) else { return (seqs, 0) };
        let max = self.settings.max_outbound_bytes;
        let mut reached = 0;
        let mut slow = Vec::new();
        for id in &user.sessions {
            if let Some(connection) = self.connections.get_mut(id) {
                if connection.state != ConnectionState::ProcessingReady {
                    continue;
                }
                if deliver(connection, *id, &frames, Some(created), max, &self.metrics) {
                    reached += 1;
                } else {
                    slow.push(*id);
                }
            }
        }
        for id in slow {
            self.abandon(id);
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
            if !deliver(connection, id, std::slice::from_ref(&frame), None, max, &self.metrics) {
                self.abandon(id);
            }
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
        let user = self.users.entry(&user_id);
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
        self.users.entry(&user_id);
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
        let stream = &self.users.entry(user_id).stream;
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
        self.metrics.registry_backlog.dec();
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
        self.trimmer.observe(self.connections.len());
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
        self.metrics.registry_backlog.dec();
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
        let max_runs = self.settings.max_runs_per_user;
        let user = self.users.entry(&user_id);
        // A repeated client_msg_id is acked again with the same ids and starts nothing.
        if let Some(seen) = client_msg_id.and_then(|c| user.seen(c)) {
            let (message_id, run_id, seq) = (seen.message_id.clone(), seen.run_id.clone(), seen.seq);
            debug!("{id}: repeated client_msg_id; acked again");
            let ack = ServerFrame::Ack { client_msg_id, message_id: &message_id, run_id: &run_id, seq };
            self.send_to(id, ack);
            return;
        }
        // `limits.user_messages_per_second`: one user's tabs together, not each on its own.
        let refusal = if user.limiter.check(Instant::now()) != Verdict::Allow {
            Some("too many messages from this user across its sessions; slow down")
        } else if user.runs_in_progress >= max_runs {
            Some("too many runs in progress for this user; wait for one to end or cancel one")
        } else {
            None
        };
        if let Some(message) = refusal {
            debug!("{id}: user_message of user {user_id} refused: {message}");
            self.send_to(id, ServerFrame::error(ErrorCode::RateLimited, message, Some("user_message")));
            return;
        }
        user.runs_in_progress += 1;
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
            let cap = self.users.limits().dedupe_per_user;
            self.users.entry(&user_id).remember(client_msg_id, seen, cap);
        }
        let run = Run {
            user_id: Rc::from(user_id.as_str()),
            thread_id: Rc::from(message.thread_id.as_str()),
            started: Instant::now(),
            response: String::new(),
            message_id: message_id.clone(),
            announced: false,
        };
        self.runs.insert(run_id.clone(), run);
        debug!("{id}: run {run_id} started for user {user_id}");
        let request = RunRequest {
            run_id: run_id.clone(),
            user_id,
            thread_id: message.thread_id,
            message_id,
            content: message.content,
        };
        // The runtime's mailbox is bounded (`agent.max_queued_runs`): a runtime that is behind
        // ends the run at once instead of piling requests up.
        let start = StartRun { run: request, sink: ctx.address().recipient() };
        if self.agent.start.try_send(start).is_err() {
            warn!("run {run_id}: the agent runtime is behind (agent.max_queued_runs); run ended");
            self.metrics.fail("agent_unavailable");
            let output = AgentOutput::Error {
                code: "agent_unavailable".into(),
                message: "the agent is too busy to take this run; try again shortly".into(),
            };
            self.end_run(&run_id, output);
        }
    }
}

impl Registry {
    /// Ends a run with its terminal event: out of the run table and of its user's count, then
    /// onto the stream. Nothing of the run is published after this.
    fn end_run(&mut self, run_id: &str, output: AgentOutput) {
        let Some(run) = self.runs.remove(run_id) else { return };
        if let Some(user) = self.users.get_mut(&run.user_id) {
            user.runs_in_progress = user.runs_in_progress.saturating_sub(1);
        }
        if !run.announced {
            let started =
                AgentOutput::Started { agent: self.agent.name.into(), message_id: run.message_id.clone() };
            let payload = started.payload();
            let event = NewEvent {
                kind: started.kind(),
                thread_id: &run.thread_id,
                run_id: Some(run_id),
                payload: &payload,
            };
            self.publish_one(&run.user_id, event);
        }
        let payload = output.payload();
        let end = NewEvent {
            kind: output.kind(),
            thread_id: &run.thread_id,
            run_id: Some(run_id),
            payload: &payload,
        };
        self.publish_one(&run.user_id, end);
    }

    /// `agent.run_timeout_secs`: a run whose agent never ends it is ended here.
    fn end_overdue_runs(&mut self) {
        let deadline = self.settings.run_timeout;
        let overdue: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, run)| run.started.elapsed() >= deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for run_id in overdue {
            warn!("run {run_id}: no end after {deadline:?}; ended with agent_timeout");
            self.metrics.fail("agent_timeout");
            self.agent.stop.do_send(StopRun { run_id: run_id.clone() });
            let output = AgentOutput::Error {
                code: "agent_timeout".into(),
                message: format!("the agent did not finish within {} seconds", deadline.as_secs()),
            };
            self.end_run(&run_id, output);
        }
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
        if output.kind().is_terminal() {
            return self.end_run(&run_id, output);
        }
        match (&output, run.announced) {
            (AgentOutput::Started { .. }, true) => {
                debug!("run {run_id}: a second agent_started dropped");
                return;
            }
            (AgentOutput::Started { .. }, false) => run.announced = true,
            (_, false) => {
                debug!("run {run_id}: an event before agent_started dropped");
                return;
            }
            _ => {}
        }
        if let AgentOutput::MessageChunk { delta } = &output {
            // Kept for a cancel's `agent_completed`, up to `agent.max_response_bytes`; the
            // chunks themselves all go out.
            let room = self.settings.max_response_bytes.saturating_sub(run.response.len());
            let mut cut = delta.len().min(room);
            while !delta.is_char_boundary(cut) {
                cut -= 1;
            }
            run.response.push_str(&delta[..cut]);
        }
        let (user_id, thread_id) = (run.user_id.clone(), run.thread_id.clone());
        let payload = output.payload();
        self.publish_one(
            &user_id,
            NewEvent { kind: output.kind(), thread_id: &thread_id, run_id: Some(&run_id), payload: &payload },
        );
    }
}

impl Handler<CancelRequest> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CancelRequest, _: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        // Another user's run is indistinguishable from an unknown one.
        let Some(run) = self.runs.get_mut(&msg.run_id).filter(|run| *run.user_id == *user_id) else {
            let message = format!("no running run {} of yours", msg.run_id);
            self.send_to(id, ServerFrame::error(ErrorCode::NotFound, &message, Some("cancel_run")));
            return;
        };
        info!("{id}: run {} cancelled", msg.run_id);
        self.agent.stop.do_send(StopRun { run_id: msg.run_id.clone() });
        let output = AgentOutput::Completed {
            status: RunStatus::Cancelled,
            content: std::mem::take(&mut run.response),
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        self.end_run(&msg.run_id, output);
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
        self.trimmer.observe(self.connections.len());
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
