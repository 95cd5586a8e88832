//! Runs (protocol sections 4 and 5): a user message becomes an echo on the stream and a run of
//! the agent; the agent's events go onto the stream; every run ends with exactly one terminal
//! event, whether the agent ends it, the client cancels it, or its deadline passes.

use std::rc::Rc;
use std::time::Instant;

use actix::prelude::*;
use log::{debug, info, warn};

use serde_json::Value;

use super::{new_id, CancelRequest, HttpRunRefusal, Registry, RunStep, SubmitMessage};
use crate::agent::{AgentEvent, Checkpoint, RunRequest, StartRun, StopRun};
use crate::base::ConnectionId;
use crate::broker::{BrokerError, Conversation, NewEvent, SeenMessage, Submitted};
use crate::metrics::Failure;
use crate::protocol::{
    user_message_payload, AgentOutput, ErrorCode, EventKind, RunStatus, ServerFrame, UserMessage,
};
use crate::ratelimit::Verdict;

/// Who sent a user message, and so where its answers go.
pub(super) enum Origin {
    /// A WebSocket session: ack and error frames.
    Session(ConnectionId),
    /// An AG-UI client (`POST /ag-ui`): one answer, then the run's steps.
    Http {
        answer: futures_channel::oneshot::Sender<Result<String, HttpRunRefusal>>,
        steps: futures_channel::mpsc::Sender<RunStep>,
        /// The client's `runId`, when it chose one.
        run_id: Option<String>,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Session(id) => id.fmt(f),
            Origin::Http { .. } => f.write_str("ag-ui client"),
        }
    }
}

/// A run that has started and not ended.
pub(super) struct Run {
    // Shared strings: each of the run's events needs them while the registry is borrowed mutably.
    pub(super) user_id: Rc<str>,
    pub(super) thread_id: Rc<str>,
    pub(super) started: Instant,
    /// The answer streamed so far, for the `agent_completed` of a cancelled run.
    pub(super) response: String,
    /// The message that started the run, for an `agent_started` the registry has to supply.
    pub(super) message_id: String,
    /// `agent_started` is on the stream: a run ended before its agent started it (timeout,
    /// agent unavailable, cancel) gets one from the registry first, so every run that reaches
    /// clients starts with `agent_started`.
    pub(super) announced: bool,
}

impl Registry {
    /// Ends a run with its terminal event: out of the run table and of its user's count, then
    /// onto the stream. Nothing of the run is published after this.
    pub(super) fn end_run(&mut self, ctx: &mut Context<Self>, run_id: &str, output: AgentOutput) {
        self.end_run_with(ctx, run_id, output, Vec::new());
    }

    /// [`Registry::end_run`], with the agent's original AG-UI events for an AG-UI client.
    fn end_run_with(
        &mut self,
        ctx: &mut Context<Self>,
        run_id: &str,
        output: AgentOutput,
        ag_ui: Vec<Value>,
    ) {
        let Some(run) = self.runs.remove(run_id) else { return };
        if let Some(user) = self.local.get_mut(&*run.user_id) {
            user.runs_in_progress = user.runs_in_progress.saturating_sub(1);
        }
        let (outcome, code) = match &output {
            AgentOutput::Completed { status: RunStatus::Ok, .. } => ("ok", ""),
            AgentOutput::Completed { status: RunStatus::Cancelled, .. } => ("cancelled", ""),
            AgentOutput::Error { code, .. } => ("error", code.as_str()),
            _ => ("error", ""),
        };
        self.metrics.run_ended(outcome, code, run.started.elapsed());
        self.broker.run_ended(&run.user_id, run_id);
        if !run.announced {
            let agent = self.agent.as_ref().map_or_else(String::new, |a| a.name.clone());
            let started = AgentOutput::Started { agent, message_id: run.message_id.clone() };
            self.publish_output(ctx, &run, run_id, &started);
            self.observe(run_id, started, Vec::new());
        }
        self.publish_output(ctx, &run, run_id, &output);
        // The last step an AG-UI client gets; dropping its channel ends the client's response.
        if let Some(mut steps) = self.observers.remove(run_id) {
            let _ = steps.try_send(RunStep { output, ag_ui });
        }
        // A shutdown may be waiting for the last run to end.
        self.advance_shutdown(ctx);
    }

    /// One of the run's events onto its user's stream.
    fn publish_output(&mut self, ctx: &mut Context<Self>, run: &Run, run_id: &str, output: &AgentOutput) {
        let payload = output.payload();
        let event = NewEvent {
            kind: output.kind(),
            thread_id: &run.thread_id,
            run_id: Some(run_id),
            payload: &payload,
        };
        self.publish_one(ctx, &run.user_id, event);
    }

    /// `agent.run_timeout_secs`: a run whose agent never ends it is ended here.
    pub(super) fn end_overdue_runs(&mut self, ctx: &mut Context<Self>) {
        let deadline = self.settings.run_timeout;
        let overdue: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, run)| run.started.elapsed() >= deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for run_id in overdue {
            warn!("run {run_id}: no end after {deadline:?}; ended with agent_timeout");
            self.metrics.fail(Failure::AgentTimeout);
            if let Some(agent) = &self.agent {
                agent.stop.do_send(StopRun { run_id: run_id.clone() });
            }
            let output = AgentOutput::Error {
                code: "agent_timeout".into(),
                message: format!("the agent did not finish within {} seconds", deadline.as_secs()),
            };
            self.end_run(ctx, &run_id, output);
        }
    }
}

/// A user message between the steps of its submission: who sent it and what it is.
pub(super) struct Pending {
    pub(super) origin: Origin,
    pub(super) user_id: String,
    pub(super) message: UserMessage,
}

/// A user message within its user's rate and caps, given its ids, while the broker stores it.
struct Admitted {
    pending: Pending,
    message_id: String,
    run_id: String,
    /// A run was counted against the user's cap (there is an agent).
    starts_run: bool,
    created: Instant,
}

impl Handler<SubmitMessage> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SubmitMessage, ctx: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        let pending = Pending { origin: Origin::Session(id), user_id, message: msg.message };
        // A repeated client_msg_id is acked again with the same ids and starts nothing, even
        // over the rate limit: it asks for nothing new.
        let Some(client_msg_id) = pending.message.client_msg_id.as_deref() else {
            return self.submit(ctx, pending);
        };
        let call = self.broker.seen(&pending.user_id, client_msg_id);
        let user_id = pending.user_id.clone();
        self.when(ctx, &user_id, call, move |registry, answer, ctx| registry.on_seen(ctx, pending, answer));
    }
}

impl Registry {
    /// Step 2 of a session's message with a `client_msg_id`: seen before, or submitted now.
    fn on_seen(
        &mut self,
        ctx: &mut Context<Self>,
        pending: Pending,
        answer: Result<Option<SeenMessage>, BrokerError>,
    ) {
        match answer {
            Ok(Some(seen)) => self.repeated(pending, &seen),
            Ok(None) => self.submit(ctx, pending),
            Err(e) => self.message_not_stored(pending.origin, &e),
        }
    }

    /// A message whose `client_msg_id` was seen: a session is acked again with the same ids.
    fn repeated(&mut self, pending: Pending, seen: &SeenMessage) {
        let client_msg_id = pending.message.client_msg_id.as_deref().unwrap_or_default();
        match pending.origin {
            Origin::Session(id) => {
                debug!("{id}: repeated client_msg_id; acked again");
                let ack = ServerFrame::Ack {
                    client_msg_id: Some(client_msg_id),
                    message_id: &seen.message_id,
                    run_id: &seen.run_id,
                    seq: seen.seq,
                };
                self.send_to(id, ack);
            }
            // AG-UI clients send no client_msg_id, so nothing of theirs is seen.
            http => self.refuse(http, ErrorCode::BadMessage, "a repeated message"),
        }
    }

    fn message_not_stored(&mut self, origin: Origin, error: &BrokerError) {
        warn!("{origin}: user_message not stored: broker: {error}");
        self.metrics.fail(error.failure());
        let message = "the message could not be stored now; send it again with the same client_msg_id";
        self.refuse(origin, ErrorCode::Unavailable, message);
    }

    /// A user message that starts nothing: an error frame to a session, the answer to an AG-UI
    /// client.
    fn refuse(&mut self, origin: Origin, code: ErrorCode, message: &str) {
        match origin {
            Origin::Session(id) => self.send_to(id, ServerFrame::error(code, message, Some("user_message"))),
            Origin::Http { answer, .. } => {
                let _ = answer.send(Err((code, message.to_owned())));
            }
        }
    }

    /// Why the user's message may not go on now, if it may not: the user's rate and caps
    /// (section 4), checked before anything is stored.
    fn refusal(&mut self, pending: &Pending) -> Option<(ErrorCode, &'static str)> {
        let max_runs = self.settings.max_runs_per_user;
        let starts_run = self.agent.is_some();
        let shutting_down = self.shutting_down;
        // docs/agents.md: `agent.max_concurrent_runs` across all users, for agents upstream.
        let max_concurrent = self.agent.as_ref().and_then(|a| a.max_concurrent_runs);
        let agent_busy = max_concurrent.is_some_and(|max| self.runs.len() >= max);
        let run_id_taken = match &pending.origin {
            Origin::Http { run_id: Some(run_id), .. } => self.runs.contains_key(run_id),
            _ => false,
        };
        let user = self.local_user(&pending.user_id);
        // `limits.user_messages_per_second`: one user's tabs together, not each on its own.
        if shutting_down {
            Some((ErrorCode::Unavailable, "the server is shutting down; send it again after reconnecting"))
        } else if user.limiter.check(Instant::now()) != Verdict::Allow {
            Some((ErrorCode::RateLimited, "too many messages from this user across its sessions; slow down"))
        } else if starts_run && user.runs_in_progress >= max_runs {
            let why = "too many runs in progress for this user; wait for one to end or cancel one";
            Some((ErrorCode::RateLimited, why))
        } else if run_id_taken {
            Some((ErrorCode::BadMessage, "a run with this runId is in progress"))
        } else if agent_busy {
            Some((
                ErrorCode::AgentBusy,
                "the agent has as many runs in progress as it takes; try again shortly",
            ))
        } else {
            None
        }
    }

    /// Section 4: within the user's rate and runs cap, the message goes onto the stream (unless
    /// its `client_msg_id` got there first), is acked, and starts a run.
    pub(super) fn submit(&mut self, ctx: &mut Context<Self>, pending: Pending) {
        if let Some((code, refusal)) = self.refusal(&pending) {
            debug!("{}: user_message of user {} refused: {refusal}", pending.origin, pending.user_id);
            if code == ErrorCode::AgentBusy {
                self.metrics.agent_runs.with_label_values(&["refused", "agent_busy"]).inc();
            }
            return self.refuse(pending.origin, code, refusal);
        }
        let starts_run = self.agent.is_some();
        if starts_run {
            self.local_user(&pending.user_id).runs_in_progress += 1;
        }
        let requested_run_id = match &pending.origin {
            Origin::Http { run_id, .. } => run_id.clone(),
            Origin::Session(_) => None,
        };
        let admitted = Admitted {
            message_id: new_id("m_"),
            run_id: requested_run_id.unwrap_or_else(|| new_id("r_")),
            starts_run,
            created: Instant::now(),
            pending,
        };
        let message = &admitted.pending.message;
        let client_msg_id = message.client_msg_id.as_deref();
        let payload = user_message_payload(&admitted.message_id, &message.content, client_msg_id);
        let echo = NewEvent {
            kind: EventKind::UserMessage,
            thread_id: &message.thread_id,
            run_id: None,
            payload: &payload,
        };
        let user_id = admitted.pending.user_id.clone();
        let ids = (admitted.message_id.as_str(), admitted.run_id.as_str());
        let call = self.broker.submit(&user_id, client_msg_id, ids, &echo);
        self.when(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_submitted(ctx, admitted, answer)
        });
    }

    /// The broker's answer to a submitted message: the echo delivered, the sender acked and the
    /// run started; or, when the message did not go on, the run's count given back.
    fn on_submitted(
        &mut self,
        ctx: &mut Context<Self>,
        admitted: Admitted,
        answer: Result<Submitted, BrokerError>,
    ) {
        let Admitted { pending, message_id, run_id, starts_run, created } = admitted;
        let stored = match answer {
            Ok(Submitted::Appended(stored)) => stored,
            Ok(Submitted::Seen(seen)) => {
                self.run_not_started(&pending.user_id, starts_run);
                return self.repeated(pending, &seen);
            }
            Err(e) => {
                self.run_not_started(&pending.user_id, starts_run);
                return self.message_not_stored(pending.origin, &e);
            }
        };
        self.metrics.events_published.inc();
        let Pending { origin, user_id, message } = pending;
        self.deliver_events(ctx, &user_id, std::slice::from_ref(&stored), created, true);
        match origin {
            Origin::Session(id) => {
                let client_msg_id = message.client_msg_id.as_deref();
                let ack = ServerFrame::Ack {
                    client_msg_id,
                    message_id: &message_id,
                    run_id: &run_id,
                    seq: stored.seq,
                };
                self.send_to(id, ack);
                if starts_run {
                    self.start_run(ctx, &id.to_string(), user_id, run_id, message_id, message, None);
                }
            }
            Origin::Http { answer, steps, .. } => {
                if starts_run {
                    let started = run_id.clone();
                    self.start_run(ctx, "ag-ui", user_id, started, message_id, message, Some(steps));
                }
                let _ = answer.send(Ok(run_id));
            }
        }
    }

    fn run_not_started(&mut self, user_id: &str, counted: bool) {
        if !counted {
            return;
        }
        if let Some(user) = self.local.get_mut(user_id) {
            user.runs_in_progress = user.runs_in_progress.saturating_sub(1);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_run(
        &mut self,
        ctx: &mut Context<Self>,
        who: &str,
        user_id: String,
        run_id: String,
        message_id: String,
        message: UserMessage,
        observer: Option<futures_channel::mpsc::Sender<RunStep>>,
    ) {
        let run = Run {
            user_id: Rc::from(user_id.as_str()),
            thread_id: Rc::from(message.thread_id.as_str()),
            started: Instant::now(),
            response: String::new(),
            message_id: message_id.clone(),
            announced: false,
        };
        self.runs.insert(run_id.clone(), run);
        debug!("{who}: run {run_id} started for user {user_id}");
        self.broker.run_started(&user_id, &run_id, &message.thread_id);
        let forward_ag_ui = observer.is_some();
        if let Some(observer) = observer {
            self.observers.insert(run_id.clone(), observer);
        }
        let Some(agent) = &self.agent else { return };
        let wants_conversation = agent.conversation;
        let turn = wants_conversation.then(|| Conversation::message(&message_id, "user", &message.content));
        let request = RunRequest {
            run_id,
            user_id,
            thread_id: message.thread_id,
            message_id,
            client_msg_id: message.client_msg_id,
            content: message.content,
            conversation: Conversation::default(),
            forward_ag_ui,
        };
        let Some(turn) = turn else { return self.send_run(ctx, request) };
        // The thread's conversation, with this message added, goes with the run: AG-UI agents
        // keep nothing between requests.
        let call = self.broker.converse(&request.user_id, &request.thread_id, turn);
        let user_id = request.user_id.clone();
        self.when(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_conversation(ctx, request, answer)
        });
    }

    /// The thread's conversation read for a run: the run goes to the agent with it, unless it
    /// was cancelled meanwhile.
    fn on_conversation(
        &mut self,
        ctx: &mut Context<Self>,
        mut request: RunRequest,
        answer: Result<Conversation, BrokerError>,
    ) {
        if !self.runs.contains_key(&request.run_id) {
            return; // cancelled while the conversation was read
        }
        match answer {
            Ok(conversation) => {
                request.conversation = conversation;
                self.send_run(ctx, request);
            }
            Err(e) => {
                warn!("run {}: the thread's conversation could not be read: broker: {e}", request.run_id);
                let output = AgentOutput::Error {
                    code: "broker_unavailable".into(),
                    message: "the conversation could not be read; send the message again".into(),
                };
                self.end_run(ctx, &request.run_id, output);
            }
        }
    }

    /// Hands a run to the runtime.
    fn send_run(&mut self, ctx: &mut Context<Self>, request: RunRequest) {
        let Some(agent) = &self.agent else { return };
        let run_id = request.run_id.clone();
        // The runtime's mailbox is bounded (`agent.max_queued_runs`): a runtime that is behind
        // ends the run at once instead of piling requests up.
        let start = StartRun {
            run: request,
            sink: ctx.address().recipient(),
            checkpoints: ctx.address().recipient(),
        };
        if agent.start.try_send(start).is_err() {
            warn!("run {run_id}: the agent runtime is behind (agent.max_queued_runs); run ended");
            self.metrics.fail(Failure::AgentUnavailable);
            let output = AgentOutput::Error {
                code: "agent_unavailable".into(),
                message: "the agent is too busy to take this run; try again shortly".into(),
            };
            self.end_run(ctx, &run_id, output);
        }
    }
}

impl Handler<AgentEvent> for Registry {
    type Result = ();

    fn handle(&mut self, msg: AgentEvent, ctx: &mut Self::Context) {
        let AgentEvent { run_id, output, turn, ag_ui } = msg;
        let Some(run) = self.runs.get_mut(&run_id) else {
            // The run was cancelled (or never existed): nothing of it after its end.
            debug!("event of ended run {run_id} dropped");
            return;
        };
        if output.kind().is_terminal() {
            if let Some(turn) = turn {
                // What the run said goes into the thread's conversation for its next run.
                let (user_id, thread_id) = (run.user_id.clone(), run.thread_id.clone());
                let call = self.broker.converse(&user_id, &thread_id, turn);
                let ended = run_id.clone();
                self.when(ctx, &user_id, call, move |_, answer, _| {
                    if let Err(e) = answer {
                        warn!("run {ended}: its messages were not kept in the thread's conversation: broker: {e}");
                    }
                });
            }
            return self.end_run_with(ctx, &run_id, output, ag_ui);
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
            ctx,
            &user_id,
            NewEvent { kind: output.kind(), thread_id: &thread_id, run_id: Some(&run_id), payload: &payload },
        );
        self.observe(&run_id, output, ag_ui);
    }
}

impl Handler<Checkpoint> for Registry {
    type Result = ();

    fn handle(&mut self, _: Checkpoint, _: &mut Self::Context) {}
}

impl Handler<CancelRequest> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CancelRequest, ctx: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        if self.cancel_run(ctx, &user_id, &msg.run_id) {
            info!("{id}: run {} cancelled", msg.run_id);
            return;
        }
        // Not run here: perhaps by another process sharing the broker.
        let call = self.broker.cancel_elsewhere(&user_id, &msg.run_id);
        let run_id = msg.run_id;
        self.when(ctx, &user_id, call, move |registry, answer, _| match answer {
            Ok(true) => info!("{id}: run {run_id} cancelled on another node"),
            _ => {
                // Another user's run is indistinguishable from an unknown one.
                let message = format!("no running run {run_id} of yours");
                registry.send_to(id, ServerFrame::error(ErrorCode::NotFound, &message, Some("cancel_run")));
            }
        });
    }
}

impl Registry {
    /// Ends the user's run `run_id` as cancelled and stops its agent; `false` when the user has
    /// no such run in progress.
    pub(super) fn cancel_run(&mut self, ctx: &mut Context<Self>, user_id: &str, run_id: &str) -> bool {
        let Some(run) = self.runs.get_mut(run_id).filter(|run| *run.user_id == *user_id) else {
            return false;
        };
        if let Some(agent) = &self.agent {
            agent.stop.do_send(StopRun { run_id: run_id.to_owned() });
        }
        let output = AgentOutput::Completed {
            status: RunStatus::Cancelled,
            content: std::mem::take(&mut run.response),
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        self.end_run(ctx, run_id, output);
        true
    }
}
