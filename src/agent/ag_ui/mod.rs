//! The `ag-ui` runtime: any AG-UI agent behind agentwire (docs/agents.md). One run is one POST of a
//! `RunAgentInput` to `agent.url`, whose Server-Sent Events body is read as it arrives and mapped
//! onto the user's stream (`mapping.rs`).
//!
//! Runs are tasks on this runtime's own arbiter, never on the registry's thread: a slow or dead
//! agent delays its own runs only. A run has a bounded number of steps sent to the registry and
//! not yet handled ([`IN_FLIGHT`]), so an agent that streams faster than the registry publishes is read only as
//! fast as it is published, without a round trip per event. The
//! HTTP and SSE work is reqwest's (a pooled client with a connect timeout) and
//! eventsource-stream's; this file adds the timeouts and limits of the failure table.

pub mod mapping;

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use log::{debug, info, warn};
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{AgentEvent, Checkpoint, RunRequest, StartRun, StopRun};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{AgentOutput, Answers};
use mapping::{Failure, Mapped, Mapping, AGENT_HTTP_ERROR, AGENT_PROTOCOL, AGENT_TIMEOUT, AGENT_UNAVAILABLE};

/// How runs reach the agent: shared by every run of the runtime.
pub struct Upstream {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    name: String,
    idle_timeout: Duration,
    run_timeout: Duration,
    /// `agent.max_event_bytes`: the largest event accepted from the agent.
    max_event_bytes: usize,
    max_response_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Upstream {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Upstream {
        let agent = &config.agent;
        // reqwest is built without a TLS crypto provider of its own; rustls's ring provider is
        // the process's (installing it twice is harmless).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(agent.connect_timeout_secs.get()))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            // Building fails only without a TLS provider, which was installed just above.
            .expect("the HTTP client builds");
        Upstream {
            client,
            url: agent.url.clone(),
            // Validated at start (`config/validate.rs`), so this is never the default.
            headers: agent.header_map().unwrap_or_default(),
            name: agent.display_name(),
            idle_timeout: Duration::from_secs(agent.idle_timeout_secs.get()),
            run_timeout: Duration::from_secs(agent.run_timeout_secs.get()),
            max_event_bytes: config.agent.max_event_bytes.get(),
            max_response_bytes: agent.max_response_bytes.get(),
            metrics,
        }
    }
}

/// AG-UI's `RunAgentInput`, as docs/agents.md gives it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunAgentInput<'a> {
    thread_id: &'a str,
    run_id: &'a str,
    messages: &'a [Box<RawValue>],
    state: &'a RawValue,
    tools: &'a Value,
    context: &'a Value,
    /// The client's own (`POST /ag-ui`), with agentwire's under `agentwire`.
    forwarded_props: Value,
    /// AG-UI 1.0: the answers to the interrupts the thread's last run stopped with.
    #[serde(skip_serializing_if = "Option::is_none")]
    resume: Option<Value>,
}

/// Who the run is for: the agent's only word on the user (docs/agents.md).
#[derive(Serialize)]
struct Identity<'a> {
    user_id: &'a str,
    message_id: &'a str,
    client_msg_id: Option<&'a str>,
}

const EMPTY_STATE: &str = "{}";

/// What a run's end adds to its terminal event (`AgentEvent::details`).
type Details = serde_json::Map<String, Value>;

/// Steps of one run between checkpoints: a run has at most twice this many handed to the registry
/// and not yet handled, enough to pipeline its events, few enough that a flooding agent waits
/// for the registry instead of piling up.
const IN_FLIGHT: usize = 64;

impl Upstream {
    /// One run, start to end: its steps and then exactly one terminal event go to `sink`.
    async fn run(
        self: Rc<Self>,
        run: RunRequest,
        sink: Recipient<AgentEvent>,
        checkpoints: Recipient<Checkpoint>,
    ) {
        let run_id = run.run_id.clone();
        // The agent's events not yet handed over with a step go with the run's end. After a
        // failure they are dropped (one of them may be what failed): the client gets RUN_ERROR.
        let mut unsent = Vec::new();
        let (output, turn, details) = match self.stream(&run, &sink, &checkpoints, &mut unsent).await {
            Ok(ended) => ended,
            Err(failure) => {
                warn!("run {run_id}: agent_error {}: {}", failure.code, failure.message);
                unsent.clear();
                (AgentOutput::Error { code: failure.code.into(), message: failure.message }, None, None)
            }
        };
        sink.do_send(AgentEvent { run_id, output, turn, ag_ui: unsent, details });
    }

    /// Sends the request and maps the events until the run's end; the end itself is returned.
    async fn stream(
        &self,
        run: &RunRequest,
        sink: &Recipient<AgentEvent>,
        checkpoints: &Recipient<Checkpoint>,
        unsent: &mut Vec<Value>,
    ) -> Result<(AgentOutput, Option<crate::store::Conversation>, Option<Details>), Failure> {
        let sent = Instant::now();
        let deadline = sent + self.run_timeout;
        let empty: Box<RawValue> =
            RawValue::from_string(EMPTY_STATE.to_owned()).unwrap_or_else(|_| RawValue::NULL.to_owned());
        // The client's state, when it gave one, is the run's; else the thread's stored one.
        let given = run.client.state.as_ref().and_then(|s| serde_json::value::to_raw_value(s).ok());
        let state = given.as_deref().or(run.conversation.state.as_deref()).unwrap_or(&empty);
        let none = Value::Array(Vec::new());
        let identity = Identity {
            user_id: &run.user_id,
            message_id: &run.message_id,
            client_msg_id: run.client_msg_id.as_deref(),
        };
        let (forwarded_props, resume) = forwarded(run, identity);
        let input = RunAgentInput {
            thread_id: &run.thread_id,
            run_id: &run.run_id,
            messages: &run.conversation.messages,
            state,
            tools: run.client.tools.as_ref().unwrap_or(&none),
            context: run.client.context.as_ref().unwrap_or(&none),
            forwarded_props,
            resume,
        };
        let body = serde_json::to_vec(&input).map_err(|e| Failure::new(AGENT_PROTOCOL, e.to_string()))?;
        let request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body)
            .send();
        let response = match self.within(deadline, request).await? {
            Ok(response) => response,
            Err(e) => {
                return Err(Failure::new(
                    AGENT_UNAVAILABLE,
                    format!("the agent could not be reached: {}", cause(&e)),
                ))
            }
        };
        let status = response.status();
        if !status.is_success() {
            return Err(Failure::new(AGENT_HTTP_ERROR, format!("the agent answered HTTP {status}")));
        }
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.to_ascii_lowercase().starts_with("text/event-stream") {
            return Err(Failure::new(
                AGENT_PROTOCOL,
                format!("the agent answered {content_type:?}, not text/event-stream"),
            ));
        }

        // Bytes read since the last whole event: the SSE parser buffers an event until it is
        // complete, so an endless one is cut off here instead of growing without bound.
        let unread = Rc::new(Cell::new(0usize));
        let counted = Rc::clone(&unread);
        // When the agent last sent anything: an SSE comment (a keep-alive) is no event, but it
        // proves the agent alive, so it holds off `idle_timeout_secs` (docs/agents.md, v2).
        let heard = Rc::new(Cell::new(Instant::now()));
        let hearing = Rc::clone(&heard);
        let limit = self.max_event_bytes;
        let body = response.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(|e| BodyError::Read(cause(&e)))?;
            hearing.set(Instant::now());
            counted.set(counted.get() + chunk.len());
            if counted.get() > limit.saturating_mul(2) {
                return Err(BodyError::Oversized);
            }
            Ok(chunk)
        });
        let mut events = body.eventsource();
        let initial_state = match &run.conversation.state {
            Some(state) => serde_json::from_str(state.get()).unwrap_or(Value::Null),
            None => Value::Object(Default::default()),
        };
        let mut mapping = Mapping::new(
            self.name.clone(),
            run.message_id.clone(),
            initial_state,
            self.max_response_bytes,
            self.max_event_bytes,
        );
        let mut first = true;
        let mut steps = 0usize;
        let mut checkpoint = None;
        loop {
            let next = loop {
                let idle = heard.get() + self.idle_timeout;
                match actix_web::rt::time::timeout(until(idle.min(deadline)), events.next()).await {
                    Ok(next) => break next,
                    Err(_) if Instant::now() >= deadline => return Err(self.overdue()),
                    // Bytes came meanwhile (a keep-alive): the wait starts again from them.
                    Err(_) if heard.get() + self.idle_timeout > Instant::now() => continue,
                    Err(_) => {
                        let secs = self.idle_timeout.as_secs();
                        return Err(Failure::new(
                            AGENT_TIMEOUT,
                            format!("no event from the agent for {secs} seconds, nor a keep-alive"),
                        ));
                    }
                }
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(body_failure(e, limit)),
                None => {
                    return Err(Failure::new(
                        AGENT_PROTOCOL,
                        "the agent's response ended without RUN_FINISHED or RUN_ERROR",
                    ))
                }
            };
            unread.set(0);
            if first {
                first = false;
                self.metrics.agent_first_event_seconds.observe(sent.elapsed().as_secs_f64());
            }
            if event.data.len() > limit {
                return Err(Failure::new(
                    AGENT_PROTOCOL,
                    format!("an event of {} bytes, over agent.max_event_bytes ({limit})", event.data.len()),
                ));
            }
            if event.data.trim().is_empty() {
                // A comment or keep-alive: it proves the agent is alive and carries nothing.
                continue;
            }
            let parsed: Value = serde_json::from_str(&event.data)
                .map_err(|e| Failure::new(AGENT_PROTOCOL, format!("an event that is not JSON: {e}")))?;
            if run.forward_ag_ui {
                unsent.push(parsed.clone());
            }
            let (outputs, end) = match mapping.map(parsed)? {
                Mapped::Events(outputs) => (outputs, None),
                Mapped::End { steps, end } => (steps, Some(end)),
            };
            for output in outputs {
                // `do_send`: into the registry's mailbox at once, in order.
                let ag_ui = std::mem::take(unsent);
                let run_id = run.run_id.clone();
                sink.do_send(AgentEvent { run_id, output, turn: None, ag_ui, details: None });
                steps += 1;
                if steps.is_multiple_of(IN_FLIGHT) {
                    // The registry answers a checkpoint after every step sent before it:
                    // waiting for the previous one bounds the steps not yet handled.
                    let previous = checkpoint.replace(checkpoints.send(Checkpoint));
                    if let Some(previous) = previous {
                        if previous.await.is_err() {
                            return Err(Failure::new(AGENT_PROTOCOL, "the registry is gone"));
                        }
                    }
                }
            }
            if let Some(end) = end {
                let details = mapping.details();
                // What the run made is the thread's only when it finished (or stopped to ask).
                let turn = matches!(end, AgentOutput::Completed { .. }).then(|| mapping.turn());
                return Ok((end, turn, details));
            }
        }
    }

    /// Waits for `work` until the run's deadline or the idle timeout, whichever comes first.
    async fn within<T>(
        &self,
        deadline: Instant,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Failure> {
        let idle = Instant::now() + self.idle_timeout;
        match actix_web::rt::time::timeout(until(idle.min(deadline)), work).await {
            Ok(done) => Ok(done),
            Err(_) if Instant::now() >= deadline => Err(self.overdue()),
            Err(_) => {
                let secs = self.idle_timeout.as_secs();
                Err(Failure::new(AGENT_TIMEOUT, format!("the agent did not answer within {secs} seconds")))
            }
        }
    }

    fn overdue(&self) -> Failure {
        let secs = self.run_timeout.as_secs();
        Failure::new(AGENT_TIMEOUT, format!("the agent did not finish within {secs} seconds"))
    }
}

/// `forwardedProps` and `resume` of a run's input (docs/agents.md, v2): the client's
/// `forwardedProps` with agentwire's identity under `agentwire`; an interrupt's answer as AG-UI
/// 1.0's `resume` (the client's own when it gave one) and, for adapters that read it there
/// (LangGraph's), as `forwardedProps.command.resume`.
fn forwarded(run: &RunRequest, identity: Identity<'_>) -> (Value, Option<Value>) {
    let mut props = match &run.client.forwarded_props {
        Some(Value::Object(given)) => given.clone(),
        _ => serde_json::Map::new(),
    };
    props.insert("agentwire".into(), serde_json::to_value(identity).unwrap_or(Value::Null));
    let Answers::Interrupt { interrupt_id, value } = &run.answers else {
        return (Value::Object(props), run.client.resume.clone());
    };
    if let Value::Object(command) =
        props.entry("command").or_insert_with(|| Value::Object(Default::default()))
    {
        command.entry("resume").or_insert_with(|| value.clone());
    }
    let resume = run.client.resume.clone().unwrap_or_else(|| {
        // AG-UI 1.0 names the answer `payload` (and wants a `status`); `value` as docs/agents.md.
        serde_json::json!([{"interruptId": interrupt_id, "status": "resolved", "payload": value, "value": value}])
    });
    (Value::Object(props), Some(resume))
}

fn until(instant: Instant) -> Duration {
    instant.saturating_duration_since(Instant::now())
}

#[derive(Debug)]
enum BodyError {
    Read(String),
    Oversized,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Read(cause) => write!(f, "reading the agent's response failed: {cause}"),
            BodyError::Oversized => f.write_str("an event over agent.max_event_bytes"),
        }
    }
}

fn body_failure(error: eventsource_stream::EventStreamError<BodyError>, limit: usize) -> Failure {
    use eventsource_stream::EventStreamError;
    match error {
        EventStreamError::Transport(BodyError::Oversized) => {
            Failure::new(AGENT_PROTOCOL, format!("an event over agent.max_event_bytes ({limit})"))
        }
        // The connection broke mid-run: the body ended without the run's end.
        EventStreamError::Transport(read) => Failure::new(AGENT_PROTOCOL, read.to_string()),
        other => Failure::new(AGENT_PROTOCOL, format!("an unparseable event stream: {other}")),
    }
}

/// The innermost cause of an HTTP client error ("Connection refused", "deadline has elapsed"),
/// without the URL, which may carry a key.
fn cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = error;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// The runtime's actor: takes runs from the registry and stops them on cancel.
pub struct AgUiAgent {
    upstream: Rc<Upstream>,
    /// `agent.max_queued_runs`: the bound of this actor's mailbox.
    mailbox: usize,
    runs: HashMap<String, SpawnHandle>,
}

impl AgUiAgent {
    pub fn new(upstream: Upstream, mailbox: usize) -> AgUiAgent {
        AgUiAgent { upstream: Rc::new(upstream), mailbox, runs: HashMap::new() }
    }
}

impl Actor for AgUiAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox);
        info!("agent: AG-UI agent at {} (agent.url)", redacted(&self.upstream.url));
    }
}

/// The URL without its query, where a key may sit.
fn redacted(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

impl Handler<StartRun> for AgUiAgent {
    type Result = ();

    fn handle(&mut self, msg: StartRun, ctx: &mut Self::Context) {
        let StartRun { run, sink, checkpoints } = msg;
        let run_id = run.run_id.clone();
        debug!("run {run_id}: POST to the agent");
        let work = Rc::clone(&self.upstream).run(run, sink, checkpoints);
        let finished = run_id.clone();
        let handle = ctx.spawn(work.into_actor(self).map(move |_, agent, _| {
            agent.runs.remove(&finished);
        }));
        self.runs.insert(run_id, handle);
    }
}

impl Handler<StopRun> for AgUiAgent {
    type Result = ();

    fn handle(&mut self, msg: StopRun, ctx: &mut Self::Context) {
        // Dropping the run's task drops its response, which closes the upstream connection:
        // that is how an AG-UI agent learns of a cancel.
        if let Some(handle) = self.runs.remove(&msg.run_id) {
            debug!("run {}: upstream request closed", msg.run_id);
            ctx.cancel_future(handle);
        }
    }
}
