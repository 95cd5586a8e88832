//! The mapping of docs/agents.md ("What the clients see"): one AG-UI event in, the stream events it becomes out. Pure
//! (no I/O, no clock but the run's start), so every row is tested here on its own.
//!
//! It also writes down what the run adds to the thread's conversation (the assistant's text and
//! tool calls, the tool results, in AG-UI message form) and follows the thread's state through
//! `STATE_SNAPSHOT` and `STATE_DELTA`, so the next run of the thread is sent both.

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

/// What one upstream event comes to.
#[derive(Debug, PartialEq)]
pub enum Mapped {
    /// Stream events to publish (possibly none); the run goes on.
    Events(Vec<AgentOutput>),
    /// The run's terminal event: nothing of the run after it.
    End(AgentOutput),
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
    /// What the run's end says beyond the mapping: `agent_code`, `result`, `usage`.
    details: Map<String, Value>,
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
        }
    }

    /// What the run's end adds to its terminal event, if anything (`AgentEvent::details`).
    pub fn details(&mut self) -> Option<Map<String, Value>> {
        (!self.details.is_empty()).then(|| std::mem::take(&mut self.details))
    }

    /// Maps one event, as received (one `data:` of the SSE body, parsed).
    pub fn map(&mut self, event: Value) -> Result<Mapped, Failure> {
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
                Ok(Mapped::End(AgentOutput::Completed {
                    status: RunStatus::Ok,
                    content: std::mem::take(&mut self.text),
                    duration_ms: self.started.elapsed().as_millis() as u64,
                }))
            }
            "RUN_ERROR" => {
                // The agent's own code is kept beside agentwire's `agent_error`.
                if let Some(code) = fields.get("code").filter(|v| !v.is_null()) {
                    self.details.insert("agent_code".into(), code.clone());
                }
                let message = field(fields, "message").unwrap_or("the agent reported an error");
                Ok(Mapped::End(AgentOutput::Error { code: AGENT_ERROR.into(), message: message.to_owned() }))
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
                if let Some(id) = id {
                    let message = self.message(id, "assistant");
                    let content = message.entry("content").or_insert_with(|| Value::String(String::new()));
                    if let Value::String(content) = content {
                        content.push_str(delta);
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
                let id = required(fields, kind, "toolCallId")?.to_owned();
                let name = required(fields, kind, "toolCallName")?.to_owned();
                let parent = field(fields, "parentMessageId")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{id}-message"));
                let call = json!({"id": id, "type": "function", "function": {"name": name, "arguments": ""}});
                let message = self.message(&parent, "assistant");
                if let Value::Array(calls) =
                    message.entry("toolCalls").or_insert_with(|| Value::Array(Vec::new()))
                {
                    calls.push(call);
                }
                self.tool_calls.insert(id, ToolCall { name, args: String::new(), ended: None });
                none()
            }
            "TOOL_CALL_ARGS" => {
                let id = required(fields, kind, "toolCallId")?;
                let delta = required(fields, kind, "delta")?;
                let max = self.max_args_bytes;
                let call = self.tool_call(kind, id)?;
                if call.args.len() + delta.len() > max {
                    return Err(Failure::protocol(format!(
                        "the arguments of tool call {id} are over agent.max_event_bytes ({max})"
                    )));
                }
                call.args.push_str(delta);
                none()
            }
            "TOOL_CALL_END" => {
                let id = required(fields, kind, "toolCallId")?.to_owned();
                let call = self.tool_call(kind, &id)?;
                call.ended = Some(Instant::now());
                let (tool, arguments) = (call.name.clone(), call.args.clone());
                let args =
                    serde_json::from_str(&arguments).unwrap_or_else(|_| Value::String(arguments.clone()));
                self.set_arguments(&id, arguments);
                one(AgentOutput::ToolExecuting { tool_call_id: id, tool, args })
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
            _ => one(AgentOutput::Passthrough { ag_ui: event }),
        }
    }

    /// What the run adds to its thread: its messages, and the state when the run changed it.
    pub fn turn(&self) -> Conversation {
        Conversation {
            messages: self.transcript.iter().map(|m| raw(&Value::Object(m.clone()))).collect(),
            state: self.state_changed.then(|| raw(&self.state)),
        }
    }

    fn keep_text(&mut self, delta: &str) {
        let room = self.max_text_bytes.saturating_sub(self.text.len());
        let mut cut = delta.len().min(room);
        while !delta.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&delta[..cut]);
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
            Mapped::End(AgentOutput::Completed { status: RunStatus::Ok, content, .. }) => {
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
            Mapped::End(AgentOutput::Error { code: AGENT_ERROR.into(), message: "model overloaded".into() })
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
}
