//! The mapping of docs/agents.md ("What the clients see"): one AG-UI event in, the stream events it becomes out. Pure
//! (no I/O, no clock but the run's start), so every row is tested here on its own.
//!
//! It also writes down what the run adds to the thread's conversation (the assistant's text and
//! tool calls, the tool results, in AG-UI message form), or takes the agent's `MESSAGES_SNAPSHOT`
//! as the whole thread (docs/agents.md, v2), and follows the thread's state through
//! `STATE_SNAPSHOT` and `STATE_DELTA`, so the next run of the thread is sent both. A run's
//! interrupts (AG-UI 1.0's outcome, LangGraph's `on_interrupt`) go with its end.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::protocol::{AgentOutput, RunStatus};
use crate::store::raw;
use crate::store::Conversation;

/// A run that cannot go on: the `agent_error` it ends with.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    fn protocol(message: impl Into<String>) -> Failure {
        Failure::new(AGENT_PROTOCOL, message)
    }
}

/// The failure codes of docs/agents.md, "When the agent misbehaves".
pub const AGENT_UNAVAILABLE: &str = "agent_unavailable";
pub const AGENT_HTTP_ERROR: &str = "agent_http_error";
pub const AGENT_PROTOCOL: &str = "agent_protocol";
pub const AGENT_TIMEOUT: &str = "agent_timeout";
/// `RUN_ERROR` from the agent itself.
pub const AGENT_ERROR: &str = "agent_error";

/// Events between a call's `TOOL_CALL_CHUNK`s that do not end the call.
const CHUNKS_PASS: [&str; 6] = [
    "TOOL_CALL_CHUNK",
    "RAW",
    "ACTIVITY_SNAPSHOT",
    "ACTIVITY_DELTA",
    "REASONING_ENCRYPTED_VALUE",
    "SUBAGENT_STARTED",
];

/// The `CUSTOM` event LangGraph's AG-UI adapter (`ag-ui-langgraph`) raises for `interrupt()`.
pub const LANGGRAPH_INTERRUPT: &str = "on_interrupt";

/// What one upstream event comes to.
#[derive(Debug, PartialEq)]
pub enum Mapped {
    /// Stream events to publish (possibly none); the run goes on.
    Events(Vec<AgentOutput>),
    /// The run's terminal event, after `steps` (a tool call the end closed): nothing of the run
    /// after it.
    End { steps: Vec<AgentOutput>, end: AgentOutput },
}

struct ToolCall {
    name: String,
    args: String,
    ended: Option<Instant>,
}

/// One run's reading of the upstream events.
pub struct Mapping {
    agent: String,
    message_id: String,
    started: Instant,
    run_started: bool,
    /// All assistant text of the run, for `agent_completed`, up to `max_text_bytes`.
    text: String,
    max_text_bytes: usize,
    /// Arguments of one tool call are bounded like one event.
    max_args_bytes: usize,
    tool_calls: HashMap<String, ToolCall>,
    /// Roles of the text messages opened by `TEXT_MESSAGE_START`.
    roles: HashMap<String, String>,
    /// The text message chunks without a `messageId` belong to: the last one named, else one of
    /// the run's own (AG-UI: a `TEXT_MESSAGE_CHUNK` continues the current message).
    current_text: Option<String>,
    /// The run's messages for the conversation, in order of first appearance.
    transcript: Vec<Map<String, Value>>,
    transcript_index: HashMap<String, usize>,
    state: Value,
    state_changed: bool,
    /// What the run's end says beyond the mapping: `agent_code`, `result`, `usage`,
    /// `interrupts`.
    details: Map<String, Value>,
    /// The thread's conversation as the agent last gave it whole (`MESSAGES_SNAPSHOT`), and how
    /// much of the transcript came before it: the snapshot is the thread (docs/agents.md, v2).
    snapshot: Option<(Vec<Value>, usize)>,
    /// The tool call `TOOL_CALL_CHUNK`s are building: the next event not in [`CHUNKS_PASS`]
    /// ends it, as a `TOOL_CALL_END` would (AG-UI's chunk events).
    chunk_call: Option<String>,
    /// Bytes of assistant text in the transcript, held to `max_text_bytes`.
    transcript_text: usize,
    /// Interrupts raised by a framework's own event (LangGraph's `CUSTOM` `on_interrupt`), for
    /// the run's end.
    interrupts: Vec<Value>,
}

/// The first `room` bytes of `text`, cut on a character boundary.
fn head(text: &str, room: usize) -> &str {
    let mut cut = text.len().min(room);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

fn field<'a>(event: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    event.get(name).and_then(Value::as_str)
}

fn required<'a>(event: &'a Map<String, Value>, kind: &str, name: &str) -> Result<&'a str, Failure> {
    field(event, name).ok_or_else(|| Failure::protocol(format!("{kind} without a string `{name}`")))
}

impl Mapping {
    pub fn new(
        agent: String,
        message_id: String,
        state: Value,
        max_text_bytes: usize,
        max_args_bytes: usize,
    ) -> Mapping {
        Mapping {
            agent,
            message_id,
            started: Instant::now(),
            run_started: false,
            text: String::new(),
            max_text_bytes,
            max_args_bytes,
            tool_calls: HashMap::new(),
            roles: HashMap::new(),
            current_text: None,
            transcript: Vec::new(),
            transcript_index: HashMap::new(),
            state,
            state_changed: false,
            details: Map::new(),
            snapshot: None,
            transcript_text: 0,
            chunk_call: None,
            interrupts: Vec::new(),
        }
    }

    /// What the run's end adds to its terminal event, if anything (`AgentEvent::details`).
    pub fn details(&mut self) -> Option<Map<String, Value>> {
        (!self.details.is_empty()).then(|| std::mem::take(&mut self.details))
    }

    /// Maps one event, as received (one `data:` of the SSE body, parsed).
    pub fn map(&mut self, event: Value) -> Result<Mapped, Failure> {
        // A tool call built of chunks ends at the first event that is not one of its chunks,
        // except those that say nothing of messages (as `@ag-ui/client`'s chunk transform).
        let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
        let closes = self.chunk_call.is_some() && !CHUNKS_PASS.contains(&kind);
        let closed = match self.chunk_call.take() {
            Some(id) if closes => Some(self.end_tool_call(&id)?),
            still => {
                self.chunk_call = still;
                None
            }
        };
        let mapped = self.map_one(event)?;
        Ok(match (closed, mapped) {
            (None, mapped) => mapped,
            (Some(ended), Mapped::Events(mut events)) => {
                events.insert(0, ended);
                Mapped::Events(events)
            }
            (Some(ended), Mapped::End { mut steps, end }) => {
                steps.insert(0, ended);
                Mapped::End { steps, end }
            }
        })
    }

    fn map_one(&mut self, event: Value) -> Result<Mapped, Failure> {
        let Value::Object(fields) = &event else {
            return Err(Failure::protocol("an event that is not a JSON object"));
        };
        let Some(kind) = field(fields, "type") else {
            return Err(Failure::protocol("an event without a string `type`"));
        };
        if !self.run_started {
            if kind != "RUN_STARTED" {
                return Err(Failure::protocol(format!("the first event is {kind}, not RUN_STARTED")));
            }
            self.run_started = true;
            let started =
                AgentOutput::Started { agent: self.agent.clone(), message_id: self.message_id.clone() };
            return Ok(Mapped::Events(vec![started]));
        }
        let one = |output| Ok(Mapped::Events(vec![output]));
        let none = || Ok(Mapped::Events(Vec::new()));
        match kind {
            "RUN_STARTED" => Err(Failure::protocol("a second RUN_STARTED in one run")),
            "RUN_FINISHED" => {
                // AG-UI 1.0: the run's `result`, and the tokens it used, go with its end.
                for key in ["result", "usage"] {
                    if let Some(value) = fields.get(key).filter(|v| !v.is_null()) {
                        self.details.insert(key.to_owned(), value.clone());
                    }
                }
                // AG-UI 1.0's interrupt outcome (it supersedes a framework's own interrupt
                // events of the run, which may say the same again).
                let outcome = fields.get("outcome");
                let outcome_type = outcome.and_then(|o| o.get("type")).and_then(Value::as_str);
                if outcome_type == Some("interrupt") {
                    let given = outcome.and_then(|o| o.get("interrupts")).and_then(Value::as_array);
                    let interrupts: Vec<Value> = given
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .map(|(at, i)| self.interrupt(i.clone(), at + 1))
                        .collect();
                    self.interrupts = interrupts;
                }
                let status = if outcome_type == Some("cancelled") {
                    // AG-UI 1.0: a run that stopped because it was told to.
                    RunStatus::Cancelled
                } else if self.interrupts.is_empty() {
                    RunStatus::Ok
                } else {
                    let interrupts = Value::Array(std::mem::take(&mut self.interrupts));
                    self.details.insert("interrupts".into(), interrupts);
                    RunStatus::Interrupted
                };
                Ok(Mapped::End {
                    steps: Vec::new(),
                    end: AgentOutput::Completed {
                        status,
                        content: std::mem::take(&mut self.text),
                        duration_ms: self.started.elapsed().as_millis() as u64,
                    },
                })
            }
            "RUN_ERROR" => {
                // The agent's own code is kept beside agentwire's `agent_error`.
                if let Some(code) = fields.get("code").filter(|v| !v.is_null()) {
                    self.details.insert("agent_code".into(), code.clone());
                }
                let message = field(fields, "message").unwrap_or("the agent reported an error");
                let end = AgentOutput::Error { code: AGENT_ERROR.into(), message: message.to_owned() };
                Ok(Mapped::End { steps: Vec::new(), end })
            }
            "TEXT_MESSAGE_START" => {
                let id = required(fields, kind, "messageId")?;
                let role = field(fields, "role").unwrap_or("assistant");
                self.roles.insert(id.to_owned(), role.to_owned());
                self.current_text = Some(id.to_owned());
                none()
            }
            "TEXT_MESSAGE_CONTENT" | "TEXT_MESSAGE_CHUNK" => {
                let id = match field(fields, "messageId") {
                    Some(id) => {
                        self.current_text = Some(id.to_owned());
                        Some(id.to_owned())
                    }
                    // Without an id a chunk continues the current message, or starts the run's.
                    None if kind == "TEXT_MESSAGE_CHUNK" => Some(
                        self.current_text.get_or_insert_with(|| format!("{}-text", self.message_id)).clone(),
                    ),
                    None => None,
                };
                let id = id.as_deref();
                let role = field(fields, "role")
                    .or_else(|| id.and_then(|id| self.roles.get(id)).map(String::as_str))
                    .unwrap_or("assistant");
                if role != "assistant" {
                    return one(AgentOutput::Passthrough { ag_ui: event });
                }
                let delta = match (kind, field(fields, "delta")) {
                    (_, Some(delta)) => delta,
                    ("TEXT_MESSAGE_CHUNK", None) => return none(),
                    _ => return Err(Failure::protocol("TEXT_MESSAGE_CONTENT without a string `delta`")),
                };
                if delta.is_empty() {
                    return none();
                }
                self.keep_text(delta);
                // What the thread keeps of the run's text is bounded as its answer is: a verbose
                // agent's text streams whole, and is stored up to `agent.max_response_bytes`.
                let kept = head(delta, self.max_text_bytes.saturating_sub(self.transcript_text));
                if let (Some(id), false) = (id, kept.is_empty()) {
                    self.transcript_text += kept.len();
                    let message = self.message(id, "assistant");
                    let content = message.entry("content").or_insert_with(|| Value::String(String::new()));
                    if let Value::String(content) = content {
                        content.push_str(kept);
                    }
                }
                one(AgentOutput::MessageChunk { delta: delta.to_owned() })
            }
            "TEXT_MESSAGE_END" => none(),
            _ if kind.starts_with("THINKING_") || kind.starts_with("REASONING_") => {
                match field(fields, "delta") {
                    Some("") => none(),
                    Some(delta) => one(AgentOutput::Thinking { text: delta.to_owned() }),
                    // The family's framing events (`*_START`, `*_END`) frame the content, as
                    // TEXT_MESSAGE_START/END do; anything else of it passes through.
                    None if kind.ends_with("_START") || kind.ends_with("_END") => none(),
                    None => one(AgentOutput::Passthrough { ag_ui: event }),
                }
            }
            "TOOL_CALL_START" => {
                let id = required(fields, kind, "toolCallId")?;
                let name = required(fields, kind, "toolCallName")?;
                self.start_tool_call(id, name, field(fields, "parentMessageId"));
                none()
            }
            "TOOL_CALL_ARGS" => {
                let id = required(fields, kind, "toolCallId")?;
                let delta = required(fields, kind, "delta")?;
                self.add_arguments(kind, id, delta)?;
                none()
            }
            "TOOL_CALL_END" => {
                let id = required(fields, kind, "toolCallId")?;
                one(self.end_tool_call(id)?)
            }
            "TOOL_CALL_CHUNK" => {
                // The first chunk of a call names it; the chunks after it may not (AG-UI: they
                // continue the call in progress). A chunk naming another call ends this one.
                let mut out = Vec::new();
                let id = match field(fields, "toolCallId") {
                    Some(id) if self.chunk_call.as_deref() == Some(id) => id.to_owned(),
                    Some(id) => {
                        if let Some(open) = self.chunk_call.take() {
                            out.push(self.end_tool_call(&open)?);
                        }
                        if !self.tool_calls.contains_key(id) {
                            let name = required(fields, kind, "toolCallName")?;
                            self.start_tool_call(id, name, field(fields, "parentMessageId"));
                        }
                        self.chunk_call = Some(id.to_owned());
                        id.to_owned()
                    }
                    None => self.chunk_call.clone().ok_or_else(|| {
                        Failure::protocol("TOOL_CALL_CHUNK without `toolCallId` and no call in progress")
                    })?,
                };
                if let Some(delta) = field(fields, "delta").filter(|d| !d.is_empty()) {
                    self.add_arguments(kind, &id, delta)?;
                }
                Ok(Mapped::Events(out))
            }
            "MESSAGES_SNAPSHOT" => {
                let Some(Value::Array(messages)) = fields.get("messages") else {
                    return Err(Failure::protocol("MESSAGES_SNAPSHOT without an array `messages`"));
                };
                // Only messages a thread can hold: objects with a string `id` and `role`.
                let messages: Vec<Value> = messages
                    .iter()
                    .filter(|m| {
                        m.get("id").is_some_and(Value::is_string)
                            && m.get("role").is_some_and(Value::is_string)
                    })
                    .cloned()
                    .collect();
                // A snapshot with no message is no thread: it replaces nothing.
                if !messages.is_empty() {
                    self.snapshot = Some((messages, self.transcript.len()));
                }
                one(AgentOutput::Passthrough { ag_ui: event })
            }
            "TOOL_CALL_RESULT" => {
                let id = required(fields, kind, "toolCallId")?.to_owned();
                let content = match fields.get("content") {
                    Some(Value::String(content)) => content.clone(),
                    Some(other) => other.to_string(),
                    None => return Err(Failure::protocol("TOOL_CALL_RESULT without `content`")),
                };
                let (tool, duration_ms) = match self.tool_calls.get(&id) {
                    Some(call) => {
                        (call.name.clone(), call.ended.map_or(0, |e| e.elapsed().as_millis() as u64))
                    }
                    // A result for a call made in an earlier run (a client-side tool, say).
                    None => (String::new(), 0),
                };
                let message_id =
                    field(fields, "messageId").map(str::to_owned).unwrap_or_else(|| format!("{id}-result"));
                let message = self.message(&message_id, "tool");
                message.insert("content".into(), Value::String(content.clone()));
                message.insert("toolCallId".into(), Value::String(id.clone()));
                one(AgentOutput::ToolCompleted {
                    tool_call_id: id,
                    tool,
                    ok: true,
                    result: Value::String(content),
                    duration_ms,
                })
            }
            "STATE_SNAPSHOT" => {
                if let Some(snapshot) = fields.get("snapshot") {
                    self.state = snapshot.clone();
                    self.state_changed = true;
                }
                one(AgentOutput::Passthrough { ag_ui: event })
            }
            "STATE_DELTA" => {
                if let Some(delta) = fields.get("delta") {
                    self.apply_state_delta(delta);
                }
                one(AgentOutput::Passthrough { ag_ui: event })
            }
            "CUSTOM" if field(fields, "name") == Some(LANGGRAPH_INTERRUPT) => {
                // LangGraph's adapter gives the value of `interrupt(...)` as JSON text.
                let value = match fields.get("value") {
                    Some(Value::String(text)) => {
                        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                    }
                    Some(value) => value.clone(),
                    None => Value::Null,
                };
                // Its id is LangGraph's own when the adapter passes the raw interrupt along.
                let id = fields.get("rawEvent").and_then(|raw| raw.get("id")).filter(|id| id.is_string());
                let interrupt = match id {
                    Some(id) => json!({"id": id, "value": value}),
                    None => self.interrupt(json!({"value": value}), self.interrupts.len() + 1),
                };
                self.interrupts.push(interrupt);
                one(AgentOutput::Passthrough { ag_ui: event })
            }
            _ => one(AgentOutput::Passthrough { ag_ui: event }),
        }
    }

    /// One interrupt as `agent_completed` gives it: `{id, value}`. An AG-UI 1.0 interrupt is its
    /// own value (`reason`, `message`, `toolCallId`, ... as the agent gave them); one without an
    /// `id` (LangGraph's) is given one, unique in the run, for `resume_run` to name.
    fn interrupt(&self, given: Value, nth: usize) -> Value {
        let id = given.get("id").and_then(Value::as_str).map(str::to_owned);
        match id {
            Some(id) => json!({"id": id, "value": given}),
            None => {
                let id = format!("{}-interrupt-{nth}", self.message_id);
                let value = given.get("value").cloned().unwrap_or(given);
                json!({"id": id, "value": value})
            }
        }
    }

    fn start_tool_call(&mut self, id: &str, name: &str, parent: Option<&str>) {
        // A call started again (LangGraph's adapter does, resuming an interrupted tool) is the
        // same call: its arguments come again, once.
        if let Some(call) = self.tool_calls.get_mut(id) {
            call.args.clear();
            call.ended = None;
            return;
        }
        let parent = parent.map(str::to_owned).unwrap_or_else(|| format!("{id}-message"));
        let call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": ""}});
        let message = self.message(&parent, "assistant");
        if let Value::Array(calls) = message.entry("toolCalls").or_insert_with(|| Value::Array(Vec::new())) {
            calls.push(call);
        }
        self.tool_calls
            .insert(id.to_owned(), ToolCall { name: name.to_owned(), args: String::new(), ended: None });
    }

    fn add_arguments(&mut self, kind: &str, id: &str, delta: &str) -> Result<(), Failure> {
        let max = self.max_args_bytes;
        let call = self.tool_call(kind, id)?;
        if call.args.len() + delta.len() > max {
            return Err(Failure::protocol(format!(
                "the arguments of tool call {id} are over agent.max_event_bytes ({max})"
            )));
        }
        call.args.push_str(delta);
        Ok(())
    }

    /// A tool call's end (`TOOL_CALL_END`, or the end of its chunks): its `tool_executing`.
    fn end_tool_call(&mut self, id: &str) -> Result<AgentOutput, Failure> {
        let call = self.tool_call("TOOL_CALL_END", id)?;
        call.ended = Some(Instant::now());
        let (tool, arguments) = (call.name.clone(), call.args.clone());
        let args = serde_json::from_str(&arguments).unwrap_or_else(|_| Value::String(arguments.clone()));
        self.set_arguments(id, arguments);
        Ok(AgentOutput::ToolExecuting { tool_call_id: id.to_owned(), tool, args })
    }

    /// What the run adds to its thread: its messages, and the state when the run changed it.
    /// After a `MESSAGES_SNAPSHOT` the messages are the thread's whole conversation (`whole`):
    /// the snapshot, then what the run added after it.
    pub fn turn(&self) -> Conversation {
        let state = self.state_changed.then(|| raw(&self.state));
        let Some((snapshot, at)) = &self.snapshot else {
            let messages = self.transcript.iter().map(|m| raw(&Value::Object(m.clone()))).collect();
            return Conversation { messages, state, whole: false };
        };
        let known: std::collections::HashSet<&str> =
            snapshot.iter().filter_map(|m| m.get("id").and_then(Value::as_str)).collect();
        let after = self.transcript[*at..]
            .iter()
            .filter(|m| !m.get("id").and_then(Value::as_str).is_some_and(|id| known.contains(id)))
            .map(|m| raw(&Value::Object(m.clone())));
        let messages = snapshot.iter().map(raw).chain(after).collect();
        Conversation { messages, state, whole: true }
    }

    fn keep_text(&mut self, delta: &str) {
        let room = self.max_text_bytes.saturating_sub(self.text.len());
        self.text.push_str(head(delta, room));
    }

    fn tool_call(&mut self, kind: &str, id: &str) -> Result<&mut ToolCall, Failure> {
        self.tool_calls
            .get_mut(id)
            .ok_or_else(|| Failure::protocol(format!("{kind} for tool call {id}, which was not started")))
    }

    /// The transcript's message `id`, made (with `role`) when new.
    fn message(&mut self, id: &str, role: &str) -> &mut Map<String, Value> {
        let at = match self.transcript_index.get(id) {
            Some(&at) => at,
            None => {
                let mut message = Map::new();
                message.insert("id".into(), Value::String(id.to_owned()));
                message.insert("role".into(), Value::String(role.to_owned()));
                self.transcript.push(message);
                self.transcript_index.insert(id.to_owned(), self.transcript.len() - 1);
                self.transcript.len() - 1
            }
        };
        &mut self.transcript[at]
    }

    fn set_arguments(&mut self, tool_call_id: &str, arguments: String) {
        for message in &mut self.transcript {
            let Some(Value::Array(calls)) = message.get_mut("toolCalls") else { continue };
            for call in calls.iter_mut().filter(|c| c["id"] == tool_call_id) {
                call["function"]["arguments"] = Value::String(arguments.clone());
            }
        }
    }

    /// RFC 6902 JSON Patch, as AG-UI's `STATE_DELTA` carries. A patch that does not apply leaves
    /// the state as it was (the event still passes through for clients to judge).
    fn apply_state_delta(&mut self, delta: &Value) {
        let patched = serde_json::from_value::<json_patch::Patch>(delta.clone())
            .map_err(|e| e.to_string())
            .and_then(|patch| {
                let mut state = self.state.clone();
                json_patch::patch(&mut state, &patch).map(|_| state).map_err(|e| e.to_string())
            });
        match patched {
            Ok(state) => {
                self.state = state;
                self.state_changed = true;
            }
            Err(e) => log::warn!("STATE_DELTA that does not apply to the thread's state ignored: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping() -> Mapping {
        Mapping::new("ag-ui".into(), "m_1".into(), json!({}), 1 << 20, 1000)
    }

    fn events(mapping: &mut Mapping, event: Value) -> Vec<AgentOutput> {
        match mapping.map(event) {
            Ok(Mapped::Events(events)) => events,
            other => panic!("expected events, got {other:?}"),
        }
    }

    fn parsed(turn: &Conversation, at: usize) -> Value {
        serde_json::from_str(turn.messages[at].get()).unwrap()
    }

    fn started() -> Mapping {
        let mut m = mapping();
        let out = events(&mut m, json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r"}));
        assert_eq!(out, vec![AgentOutput::Started { agent: "ag-ui".into(), message_id: "m_1".into() }]);
        m
    }

    /// `TEXT_MESSAGE_CHUNK`s without a `messageId` continue the current message (or start the
    /// run's own): the whole text is in the turn, not only the chunks that named it.
    #[test]
    fn chunks_without_an_id_continue_the_current_message() {
        let mut m = started();
        for delta in ["Hel", "lo"] {
            events(&mut m, json!({"type": "TEXT_MESSAGE_CHUNK", "delta": delta}));
        }
        events(&mut m, json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": "a2", "delta": "Bye"}));
        events(&mut m, json!({"type": "TEXT_MESSAGE_CHUNK", "delta": " now"}));
        let turn = m.turn();
        assert_eq!(turn.messages.len(), 2);
        assert_eq!(
            (parsed(&turn, 0)["id"].as_str(), parsed(&turn, 0)["content"].as_str()),
            (Some("m_1-text"), Some("Hello"))
        );
        assert_eq!(
            (parsed(&turn, 1)["id"].as_str(), parsed(&turn, 1)["content"].as_str()),
            (Some("a2"), Some("Bye now"))
        );
    }

    #[test]
    fn the_first_event_must_be_run_started() {
        let failure = mapping().map(json!({"type": "TEXT_MESSAGE_START", "messageId": "a"})).unwrap_err();
        assert_eq!(failure.code, AGENT_PROTOCOL);
        assert!(mapping().map(json!(["not", "an", "object"])).is_err());
        assert!(mapping().map(json!({"no": "type"})).is_err());
    }

    #[test]
    fn text_becomes_chunks_and_the_completed_response() {
        let mut m = started();
        assert!(events(&mut m, json!({"type": "TEXT_MESSAGE_START", "messageId": "a", "role": "assistant"}))
            .is_empty());
        let out = events(&mut m, json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "Hel"}));
        assert_eq!(out, vec![AgentOutput::MessageChunk { delta: "Hel".into() }]);
        events(&mut m, json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": "a", "delta": "lo"}));
        assert!(events(&mut m, json!({"type": "TEXT_MESSAGE_END", "messageId": "a"})).is_empty());
        match m.map(json!({"type": "RUN_FINISHED"})).unwrap() {
            Mapped::End { end: AgentOutput::Completed { status: RunStatus::Ok, content, .. }, .. } => {
                assert_eq!(content, "Hello")
            }
            other => panic!("{other:?}"),
        }
        let turn = m.turn();
        assert_eq!(turn.messages.len(), 1);
        assert_eq!(parsed(&turn, 0), json!({"id": "a", "role": "assistant", "content": "Hello"}));
        assert!(turn.state.is_none());
    }

    #[test]
    fn a_tool_call_is_one_tool_executing_at_its_end_and_its_result_a_tool_completed() {
        let mut m = started();
        let start = json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "add", "parentMessageId": "a"});
        assert!(events(&mut m, start).is_empty());
        assert!(events(&mut m, json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{\"x\":"}))
            .is_empty());
        events(&mut m, json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "1}"}));
        let out = events(&mut m, json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}));
        assert_eq!(
            out,
            vec![AgentOutput::ToolExecuting {
                tool_call_id: "c1".into(),
                tool: "add".into(),
                args: json!({"x": 1})
            }]
        );
        let out = events(
            &mut m,
            json!({"type": "TOOL_CALL_RESULT", "messageId": "t1", "toolCallId": "c1", "content": "2"}),
        );
        match &out[..] {
            [AgentOutput::ToolCompleted { tool_call_id, tool, ok: true, result, .. }] => {
                assert_eq!((tool_call_id.as_str(), tool.as_str(), result), ("c1", "add", &json!("2")));
            }
            other => panic!("{other:?}"),
        }
        let turn = m.turn();
        let call =
            json!({"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"x\":1}"}});
        assert_eq!(parsed(&turn, 0), json!({"id": "a", "role": "assistant", "toolCalls": [call]}));
        assert_eq!(parsed(&turn, 1), json!({"id": "t1", "role": "tool", "content": "2", "toolCallId": "c1"}));
    }

    #[test]
    fn arguments_that_are_not_json_stay_a_string() {
        let mut m = started();
        events(&mut m, json!({"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "echo"}));
        events(&mut m, json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "plain words"}));
        match &events(&mut m, json!({"type": "TOOL_CALL_END", "toolCallId": "c"}))[..] {
            [AgentOutput::ToolExecuting { args, .. }] => assert_eq!(args, &json!("plain words")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tool_events_out_of_order_and_oversized_arguments_are_protocol_failures() {
        let mut m = started();
        let failure = m.map(json!({"type": "TOOL_CALL_END", "toolCallId": "nope"})).unwrap_err();
        assert_eq!(failure.code, AGENT_PROTOCOL);
        events(&mut m, json!({"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "t"}));
        let failure = m
            .map(json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "x".repeat(1001)}))
            .unwrap_err();
        assert_eq!(failure.code, AGENT_PROTOCOL);
    }

    #[test]
    fn reasoning_is_thinking_and_run_error_is_agent_error() {
        let mut m = started();
        assert!(events(&mut m, json!({"type": "REASONING_START", "messageId": "r"})).is_empty());
        let out =
            events(&mut m, json!({"type": "REASONING_MESSAGE_CONTENT", "messageId": "r", "delta": "hmm"}));
        assert_eq!(out, vec![AgentOutput::Thinking { text: "hmm".into() }]);
        let out = events(&mut m, json!({"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "so"}));
        assert_eq!(out, vec![AgentOutput::Thinking { text: "so".into() }]);
        let end = m.map(json!({"type": "RUN_ERROR", "message": "model overloaded"})).unwrap();
        assert_eq!(
            end,
            Mapped::End {
                steps: Vec::new(),
                end: AgentOutput::Error { code: AGENT_ERROR.into(), message: "model overloaded".into() }
            }
        );
    }

    #[test]
    fn everything_else_passes_through_as_received_and_state_follows_the_thread() {
        let mut m = started();
        for event in [
            json!({"type": "STEP_STARTED", "stepName": "plan"}),
            json!({"type": "CUSTOM", "name": "x", "value": [1, 2]}),
            json!({"type": "SOMETHING_NEW", "x": true}),
            json!({"type": "MESSAGES_SNAPSHOT", "messages": []}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "u", "role": "user", "delta": "not the agent's"}),
        ] {
            assert_eq!(events(&mut m, event.clone()), vec![AgentOutput::Passthrough { ag_ui: event }]);
        }
        events(&mut m, json!({"type": "STATE_SNAPSHOT", "snapshot": {"count": 1}}));
        let delta =
            json!({"type": "STATE_DELTA", "delta": [{"op": "replace", "path": "/count", "value": 2}]});
        assert_eq!(events(&mut m, delta.clone()), vec![AgentOutput::Passthrough { ag_ui: delta }]);
        // A patch that does not apply is passed through and leaves the state alone.
        events(&mut m, json!({"type": "STATE_DELTA", "delta": [{"op": "remove", "path": "/missing"}]}));
        assert_eq!(m.turn().state.unwrap().get(), r#"{"count":2}"#);
    }

    /// `TOOL_CALL_CHUNK`s are a tool call like START/ARGS/END: the first names it, the rest
    /// continue it, and the next event of another kind (or a chunk of another call) ends it.
    #[test]
    fn tool_call_chunks_are_assembled_into_one_call() {
        let mut m = started();
        let first = json!({"type": "TOOL_CALL_CHUNK", "toolCallId": "c1", "toolCallName": "calculate", "parentMessageId": "a", "delta": "{\"expr"});
        assert!(events(&mut m, first).is_empty());
        assert!(events(&mut m, json!({"type": "TOOL_CALL_CHUNK", "delta": "\": \"2+3\"}"})).is_empty());
        let second =
            json!({"type": "TOOL_CALL_CHUNK", "toolCallId": "c2", "toolCallName": "now", "delta": "{}"});
        let out = events(&mut m, second);
        assert_eq!(
            out,
            vec![AgentOutput::ToolExecuting {
                tool_call_id: "c1".into(),
                tool: "calculate".into(),
                args: json!({"expr": "2+3"})
            }]
        );
        let out = events(
            &mut m,
            json!({"type": "TOOL_CALL_RESULT", "messageId": "r1", "toolCallId": "c1", "content": "5"}),
        );
        assert!(
            matches!(&out[..], [AgentOutput::ToolExecuting { tool_call_id, .. }, AgentOutput::ToolCompleted { .. }] if tool_call_id == "c2"),
            "{out:?}"
        );
        let turn = m.turn();
        assert_eq!(parsed(&turn, 0)["toolCalls"][0]["function"]["arguments"], "{\"expr\": \"2+3\"}");
        assert_eq!(parsed(&turn, 1)["toolCalls"][0]["function"]["name"], "now");
        // A chunk stream ended by the run's end: the call is executed before the end.
        let mut m = started();
        events(
            &mut m,
            json!({"type": "TOOL_CALL_CHUNK", "toolCallId": "c", "toolCallName": "t", "delta": "{}"}),
        );
        match m.map(json!({"type": "RUN_FINISHED"})).unwrap() {
            Mapped::End { steps, end: AgentOutput::Completed { .. } } => {
                assert!(matches!(&steps[..], [AgentOutput::ToolExecuting { .. }]), "{steps:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            started().map(json!({"type": "TOOL_CALL_CHUNK", "delta": "x"})).unwrap_err().code,
            AGENT_PROTOCOL
        );
    }

    /// After a `MESSAGES_SNAPSHOT` the run's turn is the snapshot (ids as the agent gave them),
    /// plus what came after it, and says it is the whole thread.
    #[test]
    fn a_messages_snapshot_is_the_thread() {
        let mut m = started();
        events(
            &mut m,
            json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "add", "parentMessageId": "a"}),
        );
        events(&mut m, json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}));
        events(
            &mut m,
            json!({"type": "TOOL_CALL_RESULT", "messageId": "event-id", "toolCallId": "c1", "content": "2"}),
        );
        let snapshot = json!([
            {"id": "u1", "role": "user", "content": "1 + 1?"},
            {"id": "a", "role": "assistant", "toolCalls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
            {"id": "checkpoint-id", "role": "tool", "toolCallId": "c1", "content": "2"},
            "not a message",
        ]);
        events(&mut m, json!({"type": "MESSAGES_SNAPSHOT", "messages": snapshot}));
        events(&mut m, json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": "a2", "delta": "It is 2."}));
        let turn = m.turn();
        assert!(turn.whole);
        let ids: Vec<Value> = (0..turn.messages.len()).map(|at| parsed(&turn, at)["id"].clone()).collect();
        assert_eq!(ids, [json!("u1"), json!("a"), json!("checkpoint-id"), json!("a2")]);
    }

    /// AG-UI 1.0's interrupt outcome and LangGraph's `on_interrupt` both end the run
    /// `interrupted`, with `{id, value}` each.
    #[test]
    fn interrupts_end_the_run_interrupted() {
        let mut m = started();
        let outcome = json!({"type": "interrupt", "interrupts": [{"id": "i1", "reason": "approval", "message": "Go?"}]});
        match m.map(json!({"type": "RUN_FINISHED", "outcome": outcome})).unwrap() {
            Mapped::End { end: AgentOutput::Completed { status: RunStatus::Interrupted, .. }, .. } => {}
            other => panic!("{other:?}"),
        }
        let details = m.details().unwrap();
        assert_eq!(
            details["interrupts"],
            json!([{"id": "i1", "value": {"id": "i1", "reason": "approval", "message": "Go?"}}])
        );

        let mut m = started();
        let custom = json!({"type": "CUSTOM", "name": "on_interrupt", "value": "{\"question\": \"Sure?\"}"});
        assert_eq!(events(&mut m, custom.clone()), vec![AgentOutput::Passthrough { ag_ui: custom }]);
        match m.map(json!({"type": "RUN_FINISHED"})).unwrap() {
            Mapped::End { end: AgentOutput::Completed { status: RunStatus::Interrupted, .. }, .. } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m.details().unwrap()["interrupts"],
            json!([{"id": "m_1-interrupt-1", "value": {"question": "Sure?"}}])
        );
    }

    /// A verbose agent's text streams whole, and the run keeps (for its answer and the thread)
    /// at most `max_text_bytes` of it, cut on a character boundary.
    #[test]
    fn what_a_run_keeps_of_its_text_is_bounded() {
        let mut m = Mapping::new("ag-ui".into(), "m_1".into(), json!({}), 10, 1000);
        events(&mut m, json!({"type": "RUN_STARTED"}));
        for _ in 0..4 {
            let out =
                events(&mut m, json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "ééé"}));
            assert_eq!(out, vec![AgentOutput::MessageChunk { delta: "ééé".into() }]);
        }
        assert_eq!(parsed(&m.turn(), 0)["content"], "ééééé");
        match m.map(json!({"type": "RUN_FINISHED"})).unwrap() {
            Mapped::End { end: AgentOutput::Completed { content, .. }, .. } => assert_eq!(content, "ééééé"),
            other => panic!("{other:?}"),
        }
    }
}
