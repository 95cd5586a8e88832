//! Runs (protocol sections 4 and 5): a user message becomes an echo on the stream and a run of
//! the agent; the agent's events go onto the stream; every run ends with exactly one terminal
//! event, whether the agent ends it, the client cancels it, or its deadline passes.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use actix::prelude::*;
use log::{debug, info, warn};

use serde_json::Value;

use super::{new_id, weight, CancelRequest, Follower, HttpRunRefusal, Registry, RunStep, SubmitMessage};
use crate::agent::{AgentEvent, Checkpoint, RunRequest, StartRun, StopRun};
use crate::base::ConnectionId;
use crate::broker::{BrokerError, NewEvent, SeenMessage, Stored, SubmitIds, Submitted};
use crate::config::{OnBusy, MAX_WAITING_PER_THREAD};
use crate::metrics::Failure;
use crate::protocol::{
    user_message_payload, AgentOutput, Answers, ErrorCode, EventKind, RunStatus, ServerFrame, UserMessage,
};
use crate::ratelimit::Verdict;
use crate::store::{Added, Confirmed, Conversation, NewUserMessage, RunMessages, StoreError, Transcript};

/// Who sent a user message, and so where its answers go.
pub(super) enum Origin {
    /// A WebSocket session: ack and error frames.
    Session(ConnectionId),
    /// An AG-UI client (`POST /ag-ui`): one answer, then the run's steps.
    Http {
        answer: futures_channel::oneshot::Sender<Result<String, HttpRunRefusal>>,
        steps: Follower,
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
    /// The message that started the run, for an `agent_started` the registry has to supply.
    pub(super) message_id: String,
    /// `agent_started` is on the stream: a run ended before its agent started it (timeout,
    /// agent unavailable, cancel) gets one from the registry first, so every run that reaches
    /// clients starts with `agent_started`.
    pub(super) announced: bool,
    /// The thread's turn of the message that started the run: what it produces is stored
    /// under it (docs/conversations.md).
    pub(super) turn: i64,
    /// What the run has produced so far, in AG-UI messages.
    pub(super) transcript: Transcript,
    /// The seq of its `agent_started`, once on the stream.
    pub(super) started_seq: Option<u64>,
    /// The names of the tools the client declared (`user_message.tools`): a `tool_executing` of
    /// one says `client_tool: true`, for the client to run it (docs/agents.md, v2).
    pub(super) client_tools: Vec<String>,
}

impl Run {
    /// A run of the message `started`, keeping at most `max_text_bytes` of its text.
    fn new(started: &Started, max_text_bytes: usize) -> Run {
        Run {
            user_id: Rc::from(started.user_id.as_str()),
            thread_id: Rc::from(started.message.thread_id.as_str()),
            started: Instant::now(),
            message_id: started.message_id.clone(),
            announced: false,
            turn: started.turn,
            transcript: Transcript::new(&started.run_id, max_text_bytes),
            started_seq: None,
            client_tools: started
                .message
                .client
                .tools
                .iter()
                .flat_map(|tools| tools.as_array().into_iter().flatten())
                .filter_map(|tool| tool["name"].as_str().map(str::to_owned))
                .collect(),
        }
    }

    /// The stream event's payload of one of the run's steps: a call of a tool the client
    /// declared says so (`client_tool: true`), for the client to run it.
    fn payload(&self, output: &AgentOutput) -> Value {
        let mut payload = output.payload();
        if let AgentOutput::ToolExecuting { tool, .. } = output {
            if self.client_tools.iter().any(|name| name == tool) {
                payload["client_tool"] = Value::Bool(true);
            }
        }
        payload
    }
}

/// A run that has ended and waits for its messages to be stored before its terminal event goes
/// out (docs/conversations.md, durability order).
struct Ending {
    run: Run,
    run_id: String,
    output: AgentOutput,
    ag_ui: Vec<Value>,
    messages: RunMessages,
    /// Its share of `Registry::unstored_bytes`.
    bytes: usize,
    /// Added to the terminal event's payload (`AgentEvent::details`).
    details: Option<serde_json::Map<String, Value>>,
}

/// The bytes of ended runs' messages a registry shard holds while the store does not take them
/// (docs/conversations.md, "When the store fails"): their ends wait, retried every
/// [`STORE_RETRY`], until the store is back; a run that ends when they are at this bound ends
/// `agent_error` `store_unavailable` at once instead (its events went out; its messages are not
/// kept).
pub(super) const MAX_UNSTORED_BYTES: usize = 64 << 20;
const STORE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// How often, and for how long, a message whose append timed out is looked for (`resolve`).
const RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// A session's message whose echo's append timed out, until it is known whether Redis ran it.
struct Resolution {
    admitted: Admitted,
    since: Instant,
}

/// How often a run's terminal event the broker did not take is sent again (`publish_end`).
const END_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A run's terminal event, kept until the broker takes it.
#[derive(Clone)]
struct Terminal {
    user_id: String,
    thread_id: String,
    run_id: String,
    kind: EventKind,
    payload: Value,
}
/// How often a run waiting for another node's run of its thread asks again, in case the end
/// was not heard (no session of the user here, so no subscription to the user's events).
const CLAIM_AGAIN: std::time::Duration = std::time::Duration::from_secs(1);

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
        self.end_run_storing(ctx, run_id, output, ag_ui, None, None);
    }

    /// Ends a run: its messages (the agent's own `turn` when it gave one, else the registry's
    /// transcript) are stored first, then the terminal event goes out.
    fn end_run_storing(
        &mut self,
        ctx: &mut Context<Self>,
        run_id: &str,
        output: AgentOutput,
        ag_ui: Vec<Value>,
        turn: Option<Conversation>,
        details: Option<serde_json::Map<String, Value>>,
    ) {
        let Some(mut run) = self.runs.remove(run_id) else { return };
        if let Some(usage) = details.as_ref().and_then(|d| d.get("usage")) {
            self.count_tokens(usage);
        }
        if let Some(user) = self.local.get_mut(&*run.user_id) {
            user.runs_in_progress = user.runs_in_progress.saturating_sub(1);
        }
        let (outcome, code) = match &output {
            AgentOutput::Completed { status, .. } => (status.as_str(), ""),
            AgentOutput::Error { code, .. } => ("error", code.as_str()),
            _ => ("error", ""),
        };
        self.metrics.run_ended(outcome, code, run.started.elapsed());
        if !run.announced {
            let agent = self.agent.as_ref().map_or_else(String::new, |a| a.name.clone());
            let started = AgentOutput::Started { agent, message_id: run.message_id.clone() };
            self.publish_output(ctx, &run, run_id, &started);
            self.observe(run_id, started, Vec::new());
        }
        run.transcript.follow(&output);
        let status = match &output {
            AgentOutput::Completed { status, .. } => status.as_str(),
            _ => "error",
        };
        let interrupts = details.as_ref().and_then(|d| d.get("interrupts")).map(crate::store::raw);
        let turn = turn.unwrap_or_default();
        // The registry's transcript stands in for a turn the agent gave none of; never whole.
        let whole = turn.whole && !turn.messages.is_empty();
        let messages = if turn.messages.is_empty() { run.transcript.messages() } else { turn.messages };
        let messages = RunMessages {
            user_id: run.user_id.to_string(),
            thread_id: run.thread_id.to_string(),
            turn: run.turn,
            run_id: run_id.to_owned(),
            status,
            messages,
            state: turn.state,
            whole,
            interrupts,
            created_at: crate::protocol::now_ms(),
        };
        let bytes = messages.messages.iter().map(|m| m.get().len()).sum::<usize>()
            + messages.state.as_ref().map_or(0, |s| s.get().len());
        let ending = Ending { run, run_id: run_id.to_owned(), output, ag_ui, messages, bytes, details };
        if self.unstored_bytes.saturating_add(bytes) > MAX_UNSTORED_BYTES {
            let e = StoreError::Unavailable("ended runs waiting for the store are at their bound".into());
            return self.end_unstored(ctx, ending, &e);
        }
        self.unstored_bytes += bytes;
        self.store_run(ctx, ending);
    }

    /// Writes an ended run's messages; once they are stored, its terminal event goes out.
    fn store_run(&mut self, ctx: &mut Context<Self>, ending: Ending) {
        let call = self.settings.store.add_run_messages(ending.messages.clone());
        let user_id = ending.messages.user_id.clone();
        self.when_stored(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_run_stored(ctx, ending, answer)
        });
    }

    fn on_run_stored(&mut self, ctx: &mut Context<Self>, ending: Ending, answer: Result<(), StoreError>) {
        match answer {
            Ok(()) => {
                self.unstored_bytes = self.unstored_bytes.saturating_sub(ending.bytes);
                self.announce_end(ctx, ending);
            }
            // The store is away: the end waits for it, within MAX_UNSTORED_BYTES.
            Err(StoreError::Unavailable(e)) if !self.shutting_down => {
                debug!("run {}: messages not stored yet ({e}); trying again", ending.run_id);
                ctx.run_later(STORE_RETRY, move |registry, ctx| registry.store_run(ctx, ending));
            }
            Err(e) => {
                self.unstored_bytes = self.unstored_bytes.saturating_sub(ending.bytes);
                self.end_unstored(ctx, ending, &e);
            }
        }
    }

    /// A run whose messages will not be stored ends `agent_error` `store_unavailable`.
    fn end_unstored(&mut self, ctx: &mut Context<Self>, mut ending: Ending, e: &StoreError) {
        warn!("run {}: its messages could not be stored: {e}", ending.run_id);
        self.metrics.fail(e.failure());
        ending.output = AgentOutput::Error {
            code: "store_unavailable".into(),
            message: "the conversation could not be stored; send the message again".into(),
        };
        self.announce_end(ctx, ending);
    }

    /// `agentwire_agent_tokens_total`: the tokens of a run's `usage`, whatever the framework
    /// calls them (`input_tokens`/`output_tokens`, `inputTokens`/`outputTokens`,
    /// `prompt_tokens`/`completion_tokens`).
    fn count_tokens(&self, usage: &Value) {
        let kinds = [
            ("input", ["input_tokens", "inputTokens", "prompt_tokens", "promptTokens"]),
            ("output", ["output_tokens", "outputTokens", "completion_tokens", "completionTokens"]),
        ];
        for (kind, names) in kinds {
            if let Some(count) = names.iter().find_map(|name| usage.get(*name).and_then(Value::as_u64)) {
                self.metrics.agent_tokens.with_label_values(&[kind]).inc_by(count);
            }
        }
    }

    /// The terminal event of a run whose messages are stored (or given up on) goes out.
    fn announce_end(&mut self, ctx: &mut Context<Self>, ending: Ending) {
        let Ending { run, run_id, output, ag_ui, details, .. } = ending;
        let mut payload = output.payload();
        if let (Some(details), Value::Object(fields)) = (details, &mut payload) {
            // What the agent said of its run's end (docs/agents.md): never over agentwire's own.
            for (key, value) in details {
                fields.entry(key).or_insert(value);
            }
        }
        let terminal = Terminal {
            user_id: run.user_id.to_string(),
            thread_id: run.thread_id.to_string(),
            run_id: run_id.clone(),
            kind: output.kind(),
            payload,
        };
        self.publish_end(ctx, terminal);
        // The last step an AG-UI client gets; dropping its channel ends the client's response.
        if let Some(mut steps) = self.observers.remove(&run_id) {
            let bytes = weight(&output, &ag_ui);
            // The last step goes whatever the client's backlog: its end.
            let _ = steps.steps.try_send(RunStep { output, ag_ui, bytes });
        }
        self.thread_run_ended(ctx, &run.user_id, &run.thread_id, &run_id);
        // A shutdown may be waiting for the last run to end.
        self.advance_shutdown(ctx);
    }

    /// `processing_ready.runs`: the user's started runs in progress, as of the stream position
    /// the tab starts from (docs/conversations.md, "Joining a run in progress"), with the
    /// in-process broker. A run's state is followed as its events are appended, which there is
    /// exactly the stream's order. A broker shared by several nodes follows runs itself, in the
    /// script that appends their events, and answers them with the attach (`Attached::runs`).
    pub(super) fn runs_snapshot(&self, user_id: &str) -> Vec<Value> {
        let mut runs: Vec<(&String, &Run)> = self
            .runs
            .iter()
            .filter(|(_, run)| *run.user_id == *user_id && run.started_seq.is_some())
            .collect();
        runs.sort_by_key(|(_, run)| run.started_seq);
        runs.into_iter()
            .map(|(run_id, run)| {
                let mut snapshot = run.transcript.snapshot();
                snapshot["run_id"] = Value::from(run_id.as_str());
                snapshot["thread_id"] = Value::from(&*run.thread_id);
                snapshot["started_seq"] = Value::from(run.started_seq);
                snapshot
            })
            .collect()
    }

    /// Whether `agent.on_busy` refuses a message on this thread now: its run is going and the
    /// setting is `reject`, or too many already wait behind it.
    fn thread_refuses(&self, user_id: &str, thread_id: &str) -> bool {
        let Some(busy) = self.local.get(user_id).and_then(|user| user.busy.get(thread_id)) else {
            return false;
        };
        busy.running.is_some()
            && match self.settings.on_busy {
                OnBusy::Reject => true,
                OnBusy::Enqueue | OnBusy::Interrupt => busy.waiting.len() >= MAX_WAITING_PER_THREAD,
            }
    }

    /// The thread's run `run_id` has its end on the stream: the next waiting run starts (or,
    /// during a shutdown, ends `node_shutdown` without starting).
    fn thread_run_ended(&mut self, ctx: &mut Context<Self>, user_id: &str, thread_id: &str, run_id: &str) {
        let Some(user) = self.local.get_mut(user_id) else { return };
        let Some(busy) = user.busy.get_mut(thread_id) else { return };
        if busy.running.as_deref() == Some(run_id) {
            busy.running = None;
            busy.remote = false;
        }
        if busy.running.is_some() {
            return;
        }
        let Some(next) = busy.waiting.pop_front() else {
            user.busy.remove(thread_id);
            return;
        };
        if self.shutting_down {
            let output = AgentOutput::Error {
                code: "node_shutdown".into(),
                message: "the server is shutting down; send the message again".into(),
            };
            return self.end_waiting(ctx, next, output);
        }
        self.start_run(ctx, &next.who, next.started, next.observer);
    }

    /// Ends a run that never started (it waited behind its thread's run) as if it had: it
    /// reaches clients as `agent_started` and its end, and its thread goes on.
    fn end_waiting(&mut self, ctx: &mut Context<Self>, waiting: Waiting, output: AgentOutput) {
        let Waiting { started, observer, .. } = waiting;
        let run_id = started.run_id.clone();
        self.runs.insert(run_id.clone(), Run::new(&started, 0));
        if let Some(observer) = observer {
            self.observers.insert(run_id.clone(), observer);
        }
        self.end_run(ctx, &run_id, output);
    }

    /// A waiting run of the user, taken out of its thread's queue.
    fn take_waiting(&mut self, user_id: &str, run_id: &str) -> Option<Waiting> {
        self.local.get_mut(user_id)?.busy.values_mut().find_map(|busy| {
            let at = busy.waiting.iter().position(|w| w.started.run_id == run_id)?;
            busy.waiting.remove(at)
        })
    }

    /// A run's terminal event onto the stream. While the broker is away it is sent again every
    /// [`END_RETRY`], in the user's call order, until Redis takes it: every run ends, exactly
    /// once (docs/scale-out.md, "Redis away mid-run").
    fn publish_end(&mut self, ctx: &mut Context<Self>, terminal: Terminal) {
        let sent = terminal.clone(); // kept for sending again
        let end = NewEvent {
            kind: sent.kind,
            thread_id: &sent.thread_id,
            run_id: Some(&sent.run_id),
            payload: &sent.payload,
        };
        let user_id = terminal.user_id.clone();
        // Keyed by the run: an end sent again after a timeout whose append ran is not a second
        // end.
        let key = format!("end:{}", terminal.run_id);
        self.publish_keyed(ctx, &user_id, &key, std::slice::from_ref(&end), move |registry, answer, ctx| {
            match answer {
                Ok((seqs, _)) => {
                    // Its record goes once its end is on the stream: until then another node's
                    // run of the thread waits for it (`claim_thread`), a reaper would end it, and
                    // an end sent again is still fenced as this node's (docs/scale-out.md).
                    registry.broker.run_ended(&terminal.user_id, &terminal.run_id);
                    // The stream event that completed the run's messages, for the threads API.
                    let user_id = terminal.user_id.as_str();
                    let epoch = registry.local.get(user_id).and_then(|u| u.epoch.clone());
                    if let (Some(seq), Some(epoch)) = (seqs.last(), epoch) {
                        let confirmed = Confirmed::Run(terminal.run_id);
                        registry.settings.store.confirm(user_id, confirmed, &epoch, *seq);
                    }
                }
                Err(BrokerError::Unavailable(_) | BrokerError::Unknown(_)) if !registry.shutting_down => {
                    debug!("run {}: its end is sent again once the broker takes it", terminal.run_id);
                    ctx.run_later(END_RETRY, move |registry, ctx| registry.publish_end(ctx, terminal));
                }
                Err(e) => {
                    warn!("run {}: its end was not published: {e}", terminal.run_id);
                    registry.broker.run_ended(&terminal.user_id, &terminal.run_id);
                }
            }
        });
    }

    /// A run's event the broker did not take: the tabs would miss it, so the run goes no
    /// further. Its agent is stopped and it ends `agent_error` `broker_unavailable`, an end
    /// sent until the broker takes it (`publish_end`).
    fn step_lost(&mut self, ctx: &mut Context<Self>, run_id: &str, e: &BrokerError) {
        if !self.runs.contains_key(run_id) {
            return;
        }
        warn!("run {run_id}: an event was not published ({e}); the run ends with broker_unavailable");
        if let Some(agent) = &self.agent {
            agent.stop.do_send(StopRun { run_id: run_id.to_owned() });
        }
        let output = AgentOutput::Error {
            code: "broker_unavailable".into(),
            message: "the server could not keep this run's events; send the message again".into(),
        };
        self.end_run(ctx, run_id, output);
    }

    /// One of a run's events onto its user's stream; a failure ends the run (`step_lost`).
    fn publish_step(&mut self, ctx: &mut Context<Self>, user_id: &str, run_id: &str, event: NewEvent<'_>) {
        let run = run_id.to_owned();
        self.publish(ctx, user_id, std::slice::from_ref(&event), move |registry, answer, ctx| {
            if let Err(e) = answer {
                registry.step_lost(ctx, &run, &e);
            }
        });
    }

    /// One of the run's events onto its user's stream.
    fn publish_output(&mut self, ctx: &mut Context<Self>, run: &Run, run_id: &str, output: &AgentOutput) {
        let payload = run.payload(output);
        let event = NewEvent {
            kind: output.kind(),
            thread_id: &run.thread_id,
            run_id: Some(run_id),
            payload: &payload,
        };
        self.publish_step(ctx, &run.user_id, run_id, event);
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

/// A thread's run going here and the runs waiting behind it (`agent.on_busy`).
#[derive(Default)]
pub(super) struct Busy {
    running: Option<String>,
    /// `running` is another node's run (the thread's holder in the shared broker): its end is
    /// looked for in the user's events (`remote_runs_ended`).
    remote: bool,
    waiting: VecDeque<Waiting>,
}

/// A run acked and waiting for its thread's current run to end.
struct Waiting {
    who: String,
    started: Started,
    observer: Option<Follower>,
}

/// What a run starts from: its user message, stored as the thread's `turn`.
struct Started {
    user_id: String,
    run_id: String,
    message_id: String,
    message: UserMessage,
    turn: i64,
    /// The claim of its thread the broker made with the message (`Submitted::Appended`): good
    /// for a run that starts at once, not for one that waits.
    claim: Option<Option<String>>,
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
    /// The thread's turn the store gave the message.
    turn: i64,
    /// This submission's own id, kept with the `client_msg_id` by the broker (`resolve`).
    attempt: String,
    /// The claim of its run's thread made with it (`Started::claim`).
    claim: Option<Option<String>>,
}

impl Handler<SubmitMessage> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SubmitMessage, ctx: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.ready_user(id) else { return };
        let pending = Pending { origin: Origin::Session(id), user_id, message: msg.message };
        let Some(client_msg_id) = pending.message.client_msg_id.as_deref() else {
            return self.submit(ctx, pending);
        };
        // Within the limits, the store tells a repeat (it keeps every client_msg_id), and the
        // broker's submit dedupes again: one round trip to the broker (docs/scale-out.md).
        let Some(refusal) = self.refusal(&pending) else { return self.store_message(ctx, pending) };
        // Over them, a repeated client_msg_id is still acked again with the same ids and starts
        // nothing: it asks for nothing new. The broker says whether it is one.
        let call = self.broker.seen(&pending.user_id, client_msg_id);
        let user_id = pending.user_id.clone();
        self.when(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_seen(ctx, pending, answer, refusal)
        });
    }
}

impl Registry {
    /// Step 2 of a refused session's message with a `client_msg_id`: a repeat goes on (the
    /// store says whether its earlier attempt was finished, or failed after its append ran: a
    /// timeout whose script Redis ran); anything else is refused.
    fn on_seen(
        &mut self,
        ctx: &mut Context<Self>,
        pending: Pending,
        answer: Result<Option<SeenMessage>, BrokerError>,
        refusal: (ErrorCode, &'static str),
    ) {
        match answer {
            Ok(Some(_)) => self.store_message(ctx, pending),
            Ok(None) => self.refused(pending, refusal),
            Err(e) => {
                let reference = pending.message.frame_type();
                self.message_not_stored(pending.origin, reference, &e, e.failure(), true)
            }
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
            http => self.refuse(http, "user_message", ErrorCode::BadMessage, "a repeated message"),
        }
    }

    /// The stream (a `BrokerError`) or the store (a `StoreError`) did not take the message:
    /// `unavailable` (send it again) unless retrying cannot help.
    fn message_not_stored(
        &mut self,
        origin: Origin,
        reference: &'static str,
        error: &dyn std::fmt::Display,
        failure: Failure,
        retry: bool,
    ) {
        warn!("{origin}: user_message not stored: {error}");
        self.metrics.fail(failure);
        let (code, message) = if retry {
            (
                ErrorCode::Unavailable,
                "the message could not be stored now; send it again with the same client_msg_id",
            )
        } else {
            (ErrorCode::Internal, "the message could not be stored")
        };
        self.refuse(origin, reference, code, message);
    }

    /// A user message that starts nothing: an error frame to a session, the answer to an AG-UI
    /// client.
    fn refuse(&mut self, origin: Origin, reference: &'static str, code: ErrorCode, message: &str) {
        match origin {
            Origin::Session(id) => self.send_to(id, ServerFrame::error(code, message, Some(reference))),
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
        let thread_busy = starts_run && self.thread_refuses(&pending.user_id, &pending.message.thread_id);
        let user = self.local_user(&pending.user_id);
        // `limits.user_messages_per_second`: one user's tabs together, not each on its own.
        if shutting_down {
            Some((ErrorCode::Unavailable, "the server is shutting down; send it again after reconnecting"))
        } else if user.limiter.check(Instant::now()) != Verdict::Allow {
            Some((ErrorCode::RateLimited, "too many messages from this user across its sessions; slow down"))
        } else if starts_run && user.runs_in_progress >= max_runs {
            let why = "too many runs in progress for this user; wait for one to end or cancel one";
            Some((ErrorCode::RateLimited, why))
        } else if thread_busy {
            Some((ErrorCode::ThreadBusy, "this thread's run is still going; wait for it to end or cancel it"))
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
        match self.refusal(&pending) {
            Some(refusal) => self.refused(pending, refusal),
            None => self.store_message(ctx, pending),
        }
    }

    fn refused(&mut self, pending: Pending, (code, refusal): (ErrorCode, &'static str)) {
        debug!("{}: user_message of user {} refused: {refusal}", pending.origin, pending.user_id);
        if code == ErrorCode::AgentBusy {
            self.metrics.agent_runs.with_label_values(&["refused", "agent_busy"]).inc();
        }
        let reference = pending.message.frame_type();
        self.refuse(pending.origin, reference, code, refusal);
    }

    /// A message admitted (or a repeat, which asks for nothing new) is stored, then echoed.
    fn store_message(&mut self, ctx: &mut Context<Self>, pending: Pending) {
        let starts_run = self.agent.is_some();
        if starts_run {
            self.local_user(&pending.user_id).runs_in_progress += 1;
        }
        let requested_run_id = match &pending.origin {
            Origin::Http { run_id, .. } => run_id.clone(),
            Origin::Session(_) => None,
        };
        let admitted = Admitted {
            message_id: pending.message.id.clone().unwrap_or_else(|| new_id("m_")),
            run_id: requested_run_id.unwrap_or_else(|| new_id("r_")),
            starts_run,
            created: Instant::now(),
            turn: 0,
            attempt: new_id("a_"),
            claim: None,
            pending,
        };
        // Stored before anything else: an acked message is never lost (docs/conversations.md).
        let message = &admitted.pending.message;
        let new = NewUserMessage {
            user_id: admitted.pending.user_id.clone(),
            thread_id: message.thread_id.clone(),
            message_id: admitted.message_id.clone(),
            run_id: admitted.run_id.clone(),
            client_msg_id: message.client_msg_id.clone(),
            content: message.content.clone(),
            tool_call_id: match &message.answers {
                Answers::ToolCall(call) => Some(call.clone()),
                _ => None,
            },
            // Whether the thread waits for an interrupt's answer is the store's to say: it
            // knows across restarts and nodes (docs/agents.md, v2).
            refused_when_interrupted: message.answers == Answers::Nothing
                && self.settings.on_busy != OnBusy::Interrupt
                && self.agent.is_some(),
            answers_interrupt: match &message.answers {
                Answers::Interrupt { interrupt_id, .. } => Some(interrupt_id.clone()),
                _ => None,
            },
            created_at: crate::protocol::now_ms(),
        };
        let call = self.settings.store.add_user_message(new);
        let user_id = admitted.pending.user_id.clone();
        self.when_stored(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_stored(ctx, admitted, answer)
        });
    }

    /// The store's answer to a user message: stored (or stored before, its echo never
    /// confirmed) goes on to the stream; a repeat is acked again; the rest is refused.
    fn on_stored(
        &mut self,
        ctx: &mut Context<Self>,
        mut admitted: Admitted,
        answer: Result<Added, StoreError>,
    ) {
        let user_id = admitted.pending.user_id.clone();
        match answer {
            Ok(Added::Stored { turn, new_thread, evicted }) => {
                admitted.turn = turn;
                let thread_id = admitted.pending.message.thread_id.clone();
                if let Some(title) = new_thread {
                    self.thread_changed(ctx, &user_id, &thread_id, Some(&title));
                }
                for gone in evicted {
                    self.thread_changed(ctx, &user_id, &gone, None);
                }
                self.append_echo(ctx, admitted);
            }
            Ok(Added::Repeat { message_id, run_id, turn, seq: None }) => {
                // Stored by an attempt that failed before its echo: this one finishes it.
                admitted.message_id = message_id;
                admitted.run_id = run_id;
                admitted.turn = turn;
                self.append_echo(ctx, admitted);
            }
            Ok(Added::Repeat { message_id, run_id, seq: Some(seq), .. }) => {
                self.run_not_started(&user_id, admitted.starts_run);
                let seen =
                    SeenMessage { message_id, run_id, seq, at: Instant::now(), attempt: String::new() };
                self.repeated(admitted.pending, &seen);
            }
            Ok(Added::Interrupted) => {
                self.run_not_started(&user_id, admitted.starts_run);
                let why = "this thread's run stopped to ask; answer it with resume_run";
                let reference = admitted.pending.message.frame_type();
                self.refuse(admitted.pending.origin, reference, ErrorCode::ThreadInterrupted, why);
            }
            Ok(Added::NoSuchInterrupt) => {
                self.run_not_started(&user_id, admitted.starts_run);
                let why = "this thread has no interrupt of that id to answer";
                let reference = admitted.pending.message.frame_type();
                self.refuse(admitted.pending.origin, reference, ErrorCode::NotFound, why);
            }
            Ok(Added::QuotaExceeded) => {
                self.run_not_started(&user_id, admitted.starts_run);
                let why = "this user's stored conversations are at store.max_bytes_per_user; delete a thread";
                let reference = admitted.pending.message.frame_type();
                self.refuse(admitted.pending.origin, reference, ErrorCode::QuotaExceeded, why);
            }
            Err(e) => {
                self.run_not_started(&user_id, admitted.starts_run);
                let retry = matches!(e, StoreError::Unavailable(_));
                let reference = admitted.pending.message.frame_type();
                self.message_not_stored(admitted.pending.origin, reference, &e, e.failure(), retry);
            }
        }
    }

    /// The echo of a stored message onto the user's stream (the broker's dedupe and append in
    /// one step).
    fn append_echo(&mut self, ctx: &mut Context<Self>, admitted: Admitted) {
        let message = &admitted.pending.message;
        // An AG-UI client's tool result is added without an echo (docs/ag-ui.md): the run that
        // goes on from it is what the tabs see.
        if matches!(admitted.pending.origin, Origin::Http { .. })
            && matches!(message.answers, Answers::ToolCall(_))
        {
            return self.go_on(ctx, admitted, 0);
        }
        let client_msg_id = message.client_msg_id.as_deref();
        let mut payload = user_message_payload(&admitted.message_id, &message.content, client_msg_id);
        // What the message answers goes with its echo: a tab shows a frontend tool's result
        // as that, not as the user's words (docs/protocol.md, `tool_result`, `resume_run`).
        match &message.answers {
            Answers::Nothing => {}
            Answers::ToolCall(call) => {
                payload["role"] = Value::from("tool");
                payload["tool_call_id"] = Value::from(call.as_str());
            }
            Answers::Interrupt { interrupt_id, value } => {
                payload["interrupt_id"] = Value::from(interrupt_id.as_str());
                payload["value"] = value.clone();
            }
        }
        let echo = NewEvent {
            kind: EventKind::UserMessage,
            thread_id: &message.thread_id,
            run_id: None,
            payload: &payload,
        };
        let user_id = admitted.pending.user_id.clone();
        let ids = SubmitIds {
            message_id: &admitted.message_id,
            run_id: &admitted.run_id,
            attempt: &admitted.attempt,
            starts_run: admitted.starts_run,
        };
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
        mut admitted: Admitted,
        answer: Result<Submitted, BrokerError>,
    ) {
        let stored = match answer {
            Ok(Submitted::Appended(stored, claim)) => {
                admitted.claim = claim;
                stored
            }
            Ok(Submitted::Seen(seen)) => {
                self.run_not_started(&admitted.pending.user_id, admitted.starts_run);
                return self.repeated(admitted.pending, &seen);
            }
            Err(e) => {
                self.run_not_started(&admitted.pending.user_id, admitted.starts_run);
                let reference = admitted.pending.message.frame_type();
                // Sent but not answered in time: Redis may have appended it. This node finds out
                // once Redis answers again, and starts the run if it did (`resolve`).
                let ambiguous = matches!(e, BrokerError::Unknown(_))
                    && admitted.starts_run
                    && admitted.pending.message.client_msg_id.is_some();
                match admitted.pending.origin {
                    Origin::Session(id) if ambiguous => {
                        self.message_not_stored(Origin::Session(id), reference, &e, e.failure(), true);
                        let resolution = Resolution { admitted, since: Instant::now() };
                        ctx.run_later(RESOLVE_EVERY, move |registry, ctx| registry.resolve(ctx, resolution));
                    }
                    origin => self.message_not_stored(origin, reference, &e, e.failure(), true),
                }
                return;
            }
        };
        self.metrics.events_published.inc();
        let user_id = admitted.pending.user_id.clone();
        self.deliver_events(ctx, &user_id, std::slice::from_ref(&stored), admitted.created, true);
        if let Some(epoch) = self.local.get(user_id.as_str()).and_then(|u| u.epoch.clone()) {
            let confirmed = Confirmed::Messages(vec![(admitted.message_id.clone(), admitted.run_id.clone())]);
            self.settings.store.confirm(&user_id, confirmed, &epoch, stored.seq);
        }
        self.go_on(ctx, admitted, stored.seq);
    }

    /// A message whose echo's append timed out: whether Redis ran it is asked (`seen`) until
    /// Redis answers, for up to [`RESOLVE_FOR`]. If it ran, its run starts here, the one node
    /// that knows nobody started it: a retry of the message (same `client_msg_id`) is acked as a
    /// repeat with that run's id, and the run exists (docs/scale-out.md, ambiguous failures).
    fn resolve(&mut self, ctx: &mut Context<Self>, resolution: Resolution) {
        let pending = &resolution.admitted.pending;
        let Some(client_msg_id) = pending.message.client_msg_id.as_deref() else { return };
        let call = self.broker.seen(&pending.user_id, client_msg_id);
        let user_id = pending.user_id.clone();
        self.when(ctx, &user_id, call, move |registry, answer, ctx| {
            let Resolution { mut admitted, since } = resolution;
            let run_id = admitted.run_id.clone();
            match answer {
                Ok(Some(seen)) if seen.attempt == admitted.attempt => {
                    info!("run {run_id}: its message's append ran though its answer was lost; started now");
                    let user_id = admitted.pending.user_id.as_str();
                    if let Some(epoch) = registry.local.get(user_id).and_then(|u| u.epoch.clone()) {
                        let confirmed = Confirmed::Messages(vec![(admitted.message_id.clone(), run_id)]);
                        registry.settings.store.confirm(user_id, confirmed, &epoch, seen.seq);
                    }
                    // Counted again, as when it was admitted (`run_not_started` took it off).
                    admitted.starts_run = registry.agent.is_some();
                    if admitted.starts_run {
                        registry.local_user(&admitted.pending.user_id).runs_in_progress += 1;
                    }
                    admitted.created = Instant::now();
                    registry.go_on(ctx, admitted, seen.seq);
                }
                // Not appended (or appended by another attempt, which started its own run).
                Ok(_) => debug!("run {run_id}: its message's append did not run"),
                Err(e) if since.elapsed() < RESOLVE_FOR => {
                    debug!("run {run_id}: whether its message was appended is not known yet ({e})");
                    let resolution = Resolution { admitted, since };
                    ctx.run_later(RESOLVE_EVERY, move |registry, ctx| registry.resolve(ctx, resolution));
                }
                Err(e) => {
                    warn!("run {run_id}: whether its message was appended is not known ({e}); given up")
                }
            }
        });
    }

    /// A message on its way (echoed, or an AG-UI client's tool result, which is not): the sender
    /// acked (a session, with the echo's `seq`) and the run started.
    fn go_on(&mut self, ctx: &mut Context<Self>, admitted: Admitted, seq: u64) {
        let Admitted { pending, message_id, run_id, starts_run, turn, claim, .. } = admitted;
        let Pending { origin, user_id, message } = pending;
        match origin {
            Origin::Session(id) => {
                let client_msg_id = message.client_msg_id.as_deref();
                let ack = ServerFrame::Ack { client_msg_id, message_id: &message_id, run_id: &run_id, seq };
                self.send_to(id, ack);
                if starts_run {
                    let who = id.to_string();
                    let started = Started { user_id, run_id, message_id, message, turn, claim };
                    self.start_run(ctx, &who, started, None);
                }
            }
            Origin::Http { answer, steps, .. } => {
                if starts_run {
                    let started =
                        Started { user_id, run_id: run_id.clone(), message_id, message, turn, claim };
                    self.start_run(ctx, "ag-ui", started, Some(steps));
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

    fn start_run(
        &mut self,
        ctx: &mut Context<Self>,
        who: &str,
        started: Started,
        observer: Option<Follower>,
    ) {
        let mut started = started;
        let claimed = started.claim.take();
        let thread = Rc::from(started.message.thread_id.as_str());
        let busy = self.local_user(&started.user_id).busy.entry(thread).or_default();
        if let Some(current) = busy.running.clone() {
            // Runs of one thread never interleave: this one starts when the current one's end
            // is on the stream (`thread_run_ended`).
            debug!("{who}: run {} waits for run {current} of its thread", started.run_id);
            let user_id = started.user_id.clone();
            let remote = busy.remote;
            busy.waiting.push_back(Waiting { who: who.to_owned(), started, observer });
            if self.settings.on_busy == OnBusy::Interrupt {
                self.interrupt(ctx, &user_id, &current, remote);
            }
            return;
        }
        busy.running = Some(started.run_id.clone());
        busy.remote = false;
        if let Some(holder) = claimed {
            // Claimed with its message (one round trip): the answer is in hand.
            return self.on_claimed(ctx, who, started, observer, Ok(holder));
        }
        if self.settings.redis.is_some() {
            // With several nodes the thread may be busy on another one: the shared broker says.
            let call =
                self.broker.claim_thread(&started.user_id, &started.message.thread_id, &started.run_id);
            let (user_id, who) = (started.user_id.clone(), who.to_owned());
            self.when(ctx, &user_id, call, move |registry, answer, ctx| {
                registry.on_claimed(ctx, &who, started, observer, answer)
            });
            return;
        }
        self.launch(ctx, who, started, observer);
    }

    /// The shared broker's answer to a run's claim of its thread: free (or the broker away: the
    /// run's own events will say so), the run starts; held by another node's run, it waits at
    /// the front of the thread's queue for that run's end.
    fn on_claimed(
        &mut self,
        ctx: &mut Context<Self>,
        who: &str,
        started: Started,
        observer: Option<Follower>,
        answer: Result<Option<String>, BrokerError>,
    ) {
        let holder = match answer {
            Ok(holder) => holder,
            Err(e) => {
                warn!("{who}: run {}: its thread's holder is not known ({e}); it starts", started.run_id);
                None
            }
        };
        let Some(holder) = holder else { return self.launch(ctx, who, started, observer) };
        debug!("{who}: run {} waits for run {holder} of its thread, on another node", started.run_id);
        let (user_id, thread_id) = (started.user_id.clone(), started.message.thread_id.clone());
        let busy = self.local_user(&user_id).busy.entry(Rc::from(thread_id.as_str())).or_default();
        busy.running = Some(holder.clone());
        busy.remote = true;
        busy.waiting.push_front(Waiting { who: who.to_owned(), started, observer });
        if self.settings.on_busy == OnBusy::Interrupt {
            self.interrupt(ctx, &user_id, &holder, true);
        }
        // The holder's end comes on the user's stream; while no session of the user is here to
        // hear it, the claim is tried again now and then.
        ctx.run_later(CLAIM_AGAIN, move |registry, ctx| {
            registry.claim_again(ctx, &user_id, &thread_id, &holder)
        });
    }

    /// `agent.on_busy = "interrupt"`: the thread's current run is cancelled, here or where it runs.
    fn interrupt(&mut self, ctx: &mut Context<Self>, user_id: &str, current: &str, remote: bool) {
        if remote {
            drop(self.broker.cancel_elsewhere(user_id, current));
        } else {
            self.cancel_run(ctx, user_id, current);
        }
    }

    /// A thread held by another node's run `holder`, looked at again: still waiting on it, the
    /// claim is made again for the first waiting run (as if `holder` had ended: it is not
    /// taken while it still holds the thread).
    fn claim_again(&mut self, ctx: &mut Context<Self>, user_id: &str, thread_id: &str, holder: &str) {
        let waiting_on_it = self
            .local
            .get(user_id)
            .and_then(|user| user.busy.get(thread_id))
            .is_some_and(|busy| busy.remote && busy.running.as_deref() == Some(holder));
        if waiting_on_it {
            self.thread_run_ended(ctx, user_id, thread_id, holder);
        }
    }

    /// Ends of other nodes' runs that hold a thread here, seen in the user's events: the runs
    /// waiting behind them go on.
    pub(super) fn remote_runs_ended(&mut self, ctx: &mut Context<Self>, user_id: &str, frames: &[Stored]) {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            kind: String,
            thread_id: String,
            run_id: Option<String>,
        }
        let Some(user) = self.local.get(user_id) else { return };
        if !user.busy.values().any(|busy| busy.remote) {
            return;
        }
        let ended: Vec<(String, String)> = frames
            .iter()
            .filter_map(|frame| serde_json::from_str::<Head>(&frame.frame).ok())
            .filter(|head| matches!(head.kind.as_str(), "agent_completed" | "agent_error"))
            .filter_map(|head| Some((head.thread_id, head.run_id?)))
            .filter(|(thread_id, run_id)| {
                user.busy
                    .get(thread_id.as_str())
                    .is_some_and(|busy| busy.remote && busy.running.as_ref() == Some(run_id))
            })
            .collect();
        for (thread_id, run_id) in ended {
            self.thread_run_ended(ctx, user_id, &thread_id, &run_id);
        }
    }

    /// Starts a run that holds its thread.
    fn launch(&mut self, ctx: &mut Context<Self>, who: &str, started: Started, observer: Option<Follower>) {
        let run = Run::new(&started, self.settings.max_response_bytes);
        let Started { user_id, run_id, message_id, message, turn, .. } = started;
        self.runs.insert(run_id.clone(), run);
        debug!("{who}: run {run_id} started for user {user_id}");
        self.broker.run_started(&user_id, &run_id, &message.thread_id);
        self.settings.store.run_started(&user_id, &message.thread_id, &run_id);
        let forward_ag_ui = observer.is_some();
        if let Some(observer) = observer {
            self.observers.insert(run_id.clone(), observer);
        }
        let Some(agent) = &self.agent else { return };
        let wants_conversation = agent.conversation;
        let request = RunRequest {
            run_id,
            user_id,
            thread_id: message.thread_id,
            message_id,
            client_msg_id: message.client_msg_id,
            content: message.content,
            client: message.client,
            answers: message.answers,
            conversation: Conversation::default(),
            forward_ag_ui,
        };
        if !wants_conversation {
            return self.send_run(ctx, request);
        }
        // The thread from the store up to this message, included, goes with the run: AG-UI
        // agents keep nothing between requests (docs/conversations.md, "What the agent is
        // sent"); messages queued behind it are their own runs'.
        let limit = self.settings.history_messages;
        let call = self.settings.store.history(&request.user_id, &request.thread_id, turn, limit);
        let user_id = request.user_id.clone();
        self.when_stored(ctx, &user_id, call, move |registry, answer, ctx| {
            registry.on_conversation(ctx, request, answer)
        });
    }

    /// The thread's conversation read for a run: the run goes to the agent with it, unless it
    /// was cancelled meanwhile.
    fn on_conversation(
        &mut self,
        ctx: &mut Context<Self>,
        mut request: RunRequest,
        answer: Result<Conversation, StoreError>,
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
                warn!("run {}: the thread's conversation could not be read: {e}", request.run_id);
                let output = AgentOutput::Error {
                    code: "store_unavailable".into(),
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
        let AgentEvent { run_id, output, turn, ag_ui, details } = msg;
        let Some(run) = self.runs.get_mut(&run_id) else {
            // The run was cancelled (or never existed): nothing of it after its end.
            debug!("event of ended run {run_id} dropped");
            return;
        };
        if output.kind().is_terminal() {
            // What the run said is stored (the agent's own messages when it gave them) before
            // the terminal event goes out.
            return self.end_run_storing(ctx, &run_id, output, ag_ui, turn, details);
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
        if let AgentOutput::Passthrough { ag_ui: event } = &output {
            let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
            if !crate::config::forwards(&self.settings.forward_events, kind) {
                // Not for tabs (`agent.forward_events`: RAW, MESSAGES_SNAPSHOT...); an AG-UI
                // client following the run still gets it.
                return self.observe(&run_id, output, ag_ui);
            }
        }
        // What a cancel's `agent_completed` carries, what is stored and what a joining tab sees,
        // within `agent.max_response_bytes`; the events themselves all go out.
        run.transcript.follow(&output);
        let (user_id, thread_id) = (run.user_id.clone(), run.thread_id.clone());
        let payload = run.payload(&output);
        let event =
            NewEvent { kind: output.kind(), thread_id: &thread_id, run_id: Some(&run_id), payload: &payload };
        if let AgentOutput::Started { .. } = output {
            // Where a tab that joins the run sees it begin.
            let started = run_id.clone();
            self.publish(ctx, &user_id, std::slice::from_ref(&event), move |registry, answer, ctx| {
                match answer {
                    Ok((seqs, _)) => {
                        if let Some(run) = registry.runs.get_mut(&started) {
                            run.started_seq = seqs.first().copied();
                        }
                    }
                    Err(e) => registry.step_lost(ctx, &started, &e),
                }
            });
        } else {
            self.publish_step(ctx, &user_id, &run_id, event);
        }
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
            // Acked but waiting behind its thread's run: it ends without having started.
            let Some(waiting) = self.take_waiting(user_id, run_id) else { return false };
            let output = AgentOutput::Completed {
                status: RunStatus::Cancelled,
                content: String::new(),
                duration_ms: 0,
            };
            self.end_waiting(ctx, waiting, output);
            return true;
        };
        if let Some(agent) = &self.agent {
            agent.stop.do_send(StopRun { run_id: run_id.to_owned() });
        }
        let output = AgentOutput::Completed {
            status: RunStatus::Cancelled,
            content: run.transcript.text(),
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        self.end_run(ctx, run_id, output);
        true
    }
}
