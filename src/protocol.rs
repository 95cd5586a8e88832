//! The wire contract (docs/protocol.md): every JSON shape a client sends or receives, the error
//! codes and the close codes. No other module builds or parses protocol JSON, so a reader looking
//! for a behaviour of the protocol by name finds it here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::ConnectionState;

/// The WebSocket subprotocol selected when the client offers it.
pub const SUBPROTOCOL: &str = "agentwire.v1";

/// Close codes of section 7.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const SERVER_ERROR: u16 = 1011;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TOKEN_INVALID: u16 = 4001;
    pub const AUTH_TIMEOUT: u16 = 4002;
    pub const TOKEN_EXPIRED: u16 = 4003;
    pub const TOO_MANY_SESSIONS: u16 = 4004;
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Codes carried by `error` frames (section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    UnknownType,
    InvalidToken,
    Forbidden,
    NotFound,
    NotReady,
    RateLimited,
    SetupFailed,
    Internal,
    /// docs/agents.md: `agent.max_concurrent_runs` runs are in progress; no run was started.
    AgentBusy,
    /// docs/scale-out.md: the stream store cannot be reached; nothing was taken (send it again with
    /// the same `client_msg_id`).
    Unavailable,
    /// docs/conversations.md: storing the message would take the user past
    /// `store.max_bytes_per_user`; nothing was stored.
    QuotaExceeded,
    /// docs/conversations.md: the thread's run is still going and `agent.on_busy` refuses (or
    /// too many messages wait behind it); not echoed, nothing stored.
    ThreadBusy,
    /// docs/agents.md, v2: the thread's last run stopped to ask; a `user_message` waits for its
    /// `resume_run` (unless `agent.on_busy = "interrupt"`). Not echoed, nothing stored.
    ThreadInterrupted,
}

/// Field limits a client frame is checked against; they come from `[limits]`.
#[derive(Clone, Copy, Debug)]
pub struct FieldLimits {
    pub max_content_chars: usize,
}

pub const MAX_THREAD_ID_CHARS: usize = 128;
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;
pub const MAX_RUN_ID_CHARS: usize = 128;
pub const MAX_TOKEN_BYTES: usize = 8192;
/// The largest `auth` frame: a token of the largest size and room for its other fields.
pub const MAX_AUTH_FRAME_BYTES: usize = MAX_TOKEN_BYTES + 1024;

// ---------------------------------------------------------------------------------------------
// Client to server
// ---------------------------------------------------------------------------------------------

/// A frame a client sent, parsed and validated.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    Auth(AuthFrame),
    /// Also a `tool_result` or `resume_run` (`UserMessage::answers`). Boxed: a frame is moved
    /// whole between actors, and this is its largest kind.
    UserMessage(Box<UserMessage>),
    CancelRun {
        run_id: String,
    },
    Ping {
        id: Option<Value>,
    },
}

impl ClientFrame {
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Auth(_) => "auth",
            ClientFrame::UserMessage(message) => message.frame_type(),
            ClientFrame::CancelRun { .. } => "cancel_run",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

#[derive(Clone, Deserialize, PartialEq)]
pub struct AuthFrame {
    pub token: String,
    #[serde(default)]
    pub last_seq: Option<u64>,
    #[serde(default)]
    pub epoch: Option<String>,
}

// The token must never reach a log line, so Debug leaves it out.
impl std::fmt::Debug for AuthFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFrame")
            .field("token", &"<redacted>")
            .field("last_seq", &self.last_seq)
            .field("epoch", &self.epoch)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UserMessage {
    pub thread_id: String,
    pub content: String,
    #[serde(default)]
    pub client_msg_id: Option<String>,
    /// What the client gives its run's agent (docs/agents.md, v2).
    #[serde(flatten)]
    pub client: ClientInput,
    /// What the message answers: nothing (a `user_message`), a frontend tool's call
    /// (`tool_result`) or an interrupt (`resume_run`). Set by the frame's type, not a field.
    #[serde(skip)]
    pub answers: Answers,
    /// The message's id as the client named it (an AG-UI client's `messages[].id`): the stored
    /// message keeps it, so the client's next input is matched by it. Agentwire makes one else.
    #[serde(skip)]
    pub id: Option<String>,
}

/// What a message of a thread answers (docs/protocol.md, `tool_result` and `resume_run`). Each
/// goes the way of a `user_message` (stored, echoed, acked, its run queued behind the thread's),
/// and its run is told what it answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Answers {
    #[default]
    Nothing,
    /// A frontend tool's result: stored as a `tool` message of this call.
    ToolCall(String),
    /// The answer to an interrupt: `RunAgentInput.resume` (and `forwardedProps.command.resume`).
    Interrupt { interrupt_id: String, value: Value },
}

impl UserMessage {
    /// The client frame it came as: errors about it name this as their `ref`.
    pub fn frame_type(&self) -> &'static str {
        match self.answers {
            Answers::Nothing => "user_message",
            Answers::ToolCall(_) => "tool_result",
            Answers::Interrupt { .. } => "resume_run",
        }
    }
}

/// `{"type":"tool_result","thread_id","tool_call_id","content"}`: the result of a frontend tool
/// (`tool_executing` with `client_tool: true`). `content` that is not a string is its JSON text.
#[derive(Deserialize)]
struct ToolResultFrame {
    thread_id: String,
    tool_call_id: String,
    content: Value,
    #[serde(default)]
    client_msg_id: Option<String>,
    /// The client's tools (and context, state) for the run that goes on: it may call one again.
    #[serde(flatten)]
    client: ClientInput,
}

/// `{"type":"resume_run","thread_id","interrupt_id","value"}`: the answer to an interrupt.
#[derive(Deserialize)]
struct ResumeRunFrame {
    thread_id: String,
    interrupt_id: String,
    #[serde(default)]
    value: Value,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(flatten)]
    client: ClientInput,
}

/// The text a stored message shows of a JSON answer: a string as it is, anything else as JSON.
pub fn answer_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// What a client gives the agent of its message's run, into `RunAgentInput` as given: its
/// frontend tools (`[{name, description, parameters}]`), readable context
/// (`[{description, value}]`) and shared state (instead of the thread's stored one).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ClientInput {
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub state: Option<Value>,
    /// An AG-UI client's `forwardedProps` (`POST /ag-ui` only): passed on, agentwire's own keys
    /// under `forwardedProps.agentwire`.
    #[serde(skip)]
    pub forwarded_props: Option<Value>,
    /// An AG-UI client's `resume` (`POST /ag-ui` only), passed on as given.
    #[serde(skip)]
    pub resume: Option<Value>,
}

impl ClientInput {
    /// `tools` and `context` must be arrays (of objects); the field that is not, if any.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        for (name, list) in [("tools", &self.tools), ("context", &self.context)] {
            match list {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) if items.iter().all(Value::is_object) => {}
                Some(_) => return Err((name, "must be an array of objects")),
            }
        }
        if let Some(Value::Array(tools)) = &self.tools {
            if !tools.iter().all(|tool| tool["name"].is_string()) {
                return Err(("tools", "must each have a string `name`"));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct CancelRunFrame {
    run_id: String,
}

#[derive(Deserialize)]
struct PingFrame {
    #[serde(default)]
    id: Option<Value>,
}

/// A `ping` id is echoed back, so it is held to what an echo needs: a string of at most this
/// many characters, or an integer. Anything else is `bad_message`.
pub const MAX_PING_ID_CHARS: usize = 64;

fn check_ping_id(id: &Value, reference: Option<&str>) -> Result<(), FrameError> {
    match id {
        Value::String(s) if s.chars().take(MAX_PING_ID_CHARS + 1).count() <= MAX_PING_ID_CHARS => Ok(()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
        _ => Err(FrameError::bad(
            format!("field `id` must be a string of at most {MAX_PING_ID_CHARS} characters or an integer"),
            reference,
        )),
    }
}

/// Only the `type` of a frame, for frames that are not parsed yet (section 3's early messages
/// before authentication): every other field is skipped without being built.
#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// The `type` of a frame (at most 64 characters of it), reading nothing else into memory;
/// `None` for text that is not a JSON object with a string `type`.
pub fn peek_type(text: &str) -> Option<String> {
    let peeked: TypeOnly<'_> = serde_json::from_str(text).ok()?;
    peeked.kind.map(|kind| truncate(&kind, 64).to_owned())
}

/// An `auth` frame read straight into its fields (no intermediate JSON tree), for a connection
/// that is not authenticated yet.
pub fn parse_auth_frame(text: &str) -> Result<AuthFrame, FrameError> {
    let reference = Some("auth");
    let frame: AuthFrame =
        serde_json::from_str(text).map_err(|e| FrameError::bad(e.to_string(), reference))?;
    check_auth_frame(&frame)?;
    Ok(frame)
}

fn check_auth_frame(frame: &AuthFrame) -> Result<(), FrameError> {
    let reference = Some("auth");
    check_len("token", &frame.token, 1, MAX_TOKEN_BYTES, reference)?;
    if let Some(epoch) = &frame.epoch {
        check_len("epoch", epoch, 0, 64, reference)?;
    }
    Ok(())
}

/// Why a client frame was not accepted; becomes an `error` frame and the connection stays open.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// The `type` of the offending frame, when it had one.
    pub reference: Option<String>,
}

impl FrameError {
    fn bad(message: impl Into<String>, reference: Option<&str>) -> Self {
        FrameError {
            code: ErrorCode::BadMessage,
            message: message.into(),
            reference: reference.map(str::to_owned),
        }
    }

    pub fn to_frame(&self) -> ServerFrame<'_> {
        ServerFrame::Error { code: self.code, message: &self.message, reference: self.reference.as_deref() }
    }
}

/// Parses one text frame into a [`ClientFrame`], or says precisely what is wrong with it.
pub fn parse_client_frame(text: &str, limits: FieldLimits) -> Result<ClientFrame, FrameError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| FrameError::bad(format!("invalid JSON: {e}"), None))?;
    let Value::Object(object) = value else {
        return Err(FrameError::bad("a frame must be a JSON object", None));
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err(FrameError::bad("field `type` must be a string", None)),
        None => return Err(FrameError::bad("missing field `type`", None)),
    };
    let value = Value::Object(object);
    let reference = Some(kind.as_str());
    let fields = |e: serde_json::Error| FrameError::bad(e.to_string(), reference);
    match kind.as_str() {
        "auth" => {
            let frame: AuthFrame = serde_json::from_value(value).map_err(fields)?;
            check_auth_frame(&frame)?;
            Ok(ClientFrame::Auth(frame))
        }
        "user_message" => {
            let frame: UserMessage = serde_json::from_value(value).map_err(fields)?;
            checked(frame, limits)
        }
        "tool_result" => {
            let frame: ToolResultFrame = serde_json::from_value(value).map_err(fields)?;
            let message = UserMessage {
                thread_id: frame.thread_id,
                content: answer_text(&frame.content),
                client_msg_id: frame.client_msg_id,
                client: frame.client,
                answers: Answers::ToolCall(frame.tool_call_id),
                id: None,
            };
            checked(message, limits)
        }
        "resume_run" => {
            let frame: ResumeRunFrame = serde_json::from_value(value).map_err(fields)?;
            let message = UserMessage {
                thread_id: frame.thread_id,
                content: answer_text(&frame.value),
                client_msg_id: frame.client_msg_id,
                client: frame.client,
                answers: Answers::Interrupt { interrupt_id: frame.interrupt_id, value: frame.value },
                id: None,
            };
            checked(message, limits)
        }
        "cancel_run" => {
            let frame: CancelRunFrame = serde_json::from_value(value).map_err(fields)?;
            check_len("run_id", &frame.run_id, 1, MAX_RUN_ID_CHARS, reference)?;
            Ok(ClientFrame::CancelRun { run_id: frame.run_id })
        }
        "ping" => {
            let frame: PingFrame = serde_json::from_value(value).map_err(fields)?;
            if let Some(id) = &frame.id {
                check_ping_id(id, reference)?;
            }
            Ok(ClientFrame::Ping { id: frame.id })
        }
        _ => Err(FrameError {
            code: ErrorCode::UnknownType,
            message: format!("unknown message type `{}`", truncate(&kind, 64)),
            reference: Some(truncate(&kind, 64).to_owned()),
        }),
    }
}

/// A `user_message`, `tool_result` or `resume_run` held to section 4's limits (an answer may
/// be empty: a tool may return nothing; words may not).
fn checked(message: UserMessage, limits: FieldLimits) -> Result<ClientFrame, FrameError> {
    let reference = Some(message.frame_type());
    let least = usize::from(message.answers == Answers::Nothing);
    check_len("thread_id", &message.thread_id, 1, MAX_THREAD_ID_CHARS, reference)?;
    check_len("content", &message.content, least, limits.max_content_chars, reference)?;
    if let Some(id) = &message.client_msg_id {
        check_len("client_msg_id", id, 1, MAX_CLIENT_MSG_ID_CHARS, reference)?;
    }
    if let Err((field, why)) = message.client.check() {
        return Err(FrameError::bad(format!("field `{field}` {why}"), reference));
    }
    let answered = match &message.answers {
        Answers::ToolCall(id) => Some(("tool_call_id", id)),
        Answers::Interrupt { interrupt_id, .. } => Some(("interrupt_id", interrupt_id)),
        Answers::Nothing => None,
    };
    if let Some((name, id)) = answered {
        check_len(name, id, 1, MAX_RUN_ID_CHARS, reference)?;
    }
    Ok(ClientFrame::UserMessage(Box::new(message)))
}

/// Lengths are counted in Unicode characters, as the protocol says.
fn check_len(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
    reference: Option<&str>,
) -> Result<(), FrameError> {
    // Counting stops one past the maximum so a huge string costs no more than a legal one.
    let chars = value.chars().take(max + 1).count();
    if chars < min {
        return Err(FrameError::bad(format!("field `{field}` must not be empty"), reference));
    }
    if chars > max {
        return Err(FrameError::bad(format!("field `{field}` is longer than {max} characters"), reference));
    }
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Server to client
// ---------------------------------------------------------------------------------------------

/// What `processing_ready` says about a resume the client asked for (section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ResumeInfo {
    pub from_seq: u64,
    pub replayed: u64,
    pub complete: bool,
}

/// Frames addressed to one session (events of the user stream are [`Event`]s).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    ConnectionState {
        state: ConnectionState,
        connection_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<ResumeInfo>,
        /// `processing_ready` only: the user's runs in progress as of `last_seq`
        /// (docs/conversations.md, "Joining a run in progress").
        #[serde(skip_serializing_if = "Option::is_none")]
        runs: Option<&'a [Value]>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        server_time: u64,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<&'a str>,
        message_id: &'a str,
        run_id: &'a str,
        seq: u64,
    },
    AuthOk {
        expires_at: u64,
    },
    TokenExpiring {
        expires_at: u64,
    },
}

impl ServerFrame<'_> {
    /// A `connection_state` frame of a setup step before `processing_ready`.
    pub fn connection_state<'a>(
        state: ConnectionState,
        connection_id: &'a str,
        user_id: Option<&'a str>,
    ) -> ServerFrame<'a> {
        ServerFrame::ConnectionState {
            state,
            connection_id,
            user_id,
            epoch: None,
            last_seq: None,
            resume: None,
            runs: None,
        }
    }

    pub fn error<'a>(code: ErrorCode, message: &'a str, reference: Option<&'a str>) -> ServerFrame<'a> {
        ServerFrame::Error { code, message, reference }
    }

    pub fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"type":"error","code":"internal","message":"serialisation failed"}"#)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The user stream (section 5)
// ---------------------------------------------------------------------------------------------

/// The event types of a user stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    UserMessage,
    AgentStarted,
    AgentThinking,
    ToolExecuting,
    ToolCompleted,
    AgentMessageChunk,
    AgentCompleted,
    AgentError,
    /// docs/agents.md: an upstream AG-UI event with no native mapping, passed through as received.
    AgentEvent,
    /// docs/conversations.md: a thread was made or renamed (`{thread_id, title, updated_at}`).
    /// Not publishable: only the store's changes make it, as with `ThreadDeleted`.
    ThreadUpdated,
    /// docs/conversations.md: a thread was deleted (`{thread_id}`).
    ThreadDeleted,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::UserMessage,
        EventKind::AgentStarted,
        EventKind::AgentThinking,
        EventKind::ToolExecuting,
        EventKind::ToolCompleted,
        EventKind::AgentMessageChunk,
        EventKind::AgentCompleted,
        EventKind::AgentError,
        EventKind::AgentEvent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UserMessage => "user_message",
            EventKind::AgentStarted => "agent_started",
            EventKind::AgentThinking => "agent_thinking",
            EventKind::ToolExecuting => "tool_executing",
            EventKind::ToolCompleted => "tool_completed",
            EventKind::AgentMessageChunk => "agent_message_chunk",
            EventKind::AgentCompleted => "agent_completed",
            EventKind::AgentError => "agent_error",
            EventKind::AgentEvent => "agent_event",
            EventKind::ThreadUpdated => "thread_updated",
            EventKind::ThreadDeleted => "thread_deleted",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// A run ends with exactly one terminal event.
    pub fn is_terminal(self) -> bool {
        matches!(self, EventKind::AgentCompleted | EventKind::AgentError)
    }
}

/// The envelope of every stream event:
/// `{"type":T,"seq":N,"ts":T,"thread_id":"...","run_id":"...","payload":{...}}`.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub seq: u64,
    pub ts: u64,
    pub thread_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<&'a str>,
    pub payload: &'a Value,
}

impl Event<'_> {
    /// Serialises through `scratch` (reused across events) into shared bytes of exactly the
    /// frame's size: one allocation per event, none wasted in the history that keeps it.
    pub fn to_frame(&self, scratch: &mut Vec<u8>) -> bytestring::ByteString {
        scratch.clear();
        // Cannot fail: every field is a string, an integer or a `Value` (whose keys are strings).
        if serde_json::to_writer(&mut *scratch, self).is_err() {
            scratch.clear();
        }
        let bytes = bytes::Bytes::copy_from_slice(scratch);
        // serde_json writes UTF-8 only.
        bytestring::ByteString::try_from(bytes).unwrap_or_default()
    }
}

/// The payload of the `user_message` echo.
pub fn user_message_payload(message_id: &str, content: &str, client_msg_id: Option<&str>) -> Value {
    serde_json::json!({"message_id": message_id, "content": content, "client_msg_id": client_msg_id})
}

/// `agent_completed`'s `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    Cancelled,
    /// The agent stopped to ask (AG-UI 1.0's interrupt outcome): `interrupts` beside it, and
    /// `resume_run` answers (docs/protocol.md, `agent_completed`).
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// One step of an agent run, as an agent runtime produces it; the registry turns it into a
/// stream event.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentOutput {
    Started {
        agent: String,
        message_id: String,
    },
    Thinking {
        text: String,
    },
    ToolExecuting {
        tool_call_id: String,
        tool: String,
        args: Value,
    },
    ToolCompleted {
        tool_call_id: String,
        tool: String,
        ok: bool,
        result: Value,
        duration_ms: u64,
    },
    MessageChunk {
        delta: String,
    },
    Completed {
        status: RunStatus,
        content: String,
        duration_ms: u64,
    },
    Error {
        code: String,
        message: String,
    },
    /// `agent_event` `{ag_ui: <the AG-UI event as received>}`.
    Passthrough {
        ag_ui: Value,
    },
}

impl AgentOutput {
    pub fn kind(&self) -> EventKind {
        match self {
            AgentOutput::Started { .. } => EventKind::AgentStarted,
            AgentOutput::Thinking { .. } => EventKind::AgentThinking,
            AgentOutput::ToolExecuting { .. } => EventKind::ToolExecuting,
            AgentOutput::ToolCompleted { .. } => EventKind::ToolCompleted,
            AgentOutput::MessageChunk { .. } => EventKind::AgentMessageChunk,
            AgentOutput::Completed { .. } => EventKind::AgentCompleted,
            AgentOutput::Error { .. } => EventKind::AgentError,
            AgentOutput::Passthrough { .. } => EventKind::AgentEvent,
        }
    }

    pub fn payload(&self) -> Value {
        use serde_json::json;
        match self {
            AgentOutput::Started { agent, message_id } => json!({"agent": agent, "message_id": message_id}),
            AgentOutput::Thinking { text } => json!({"text": text}),
            AgentOutput::ToolExecuting { tool_call_id, tool, args } => {
                json!({"tool_call_id": tool_call_id, "tool": tool, "args": args})
            }
            AgentOutput::ToolCompleted { tool_call_id, tool, ok, result, duration_ms } => json!({
                "tool_call_id": tool_call_id, "tool": tool, "ok": ok, "result": result, "duration_ms": duration_ms
            }),
            AgentOutput::MessageChunk { delta } => json!({"delta": delta}),
            AgentOutput::Completed { status, content, duration_ms } => {
                json!({"status": status, "response": {"content": content}, "duration_ms": duration_ms})
            }
            AgentOutput::Error { code, message } => json!({"code": code, "message": message}),
            AgentOutput::Passthrough { ag_ui } => json!({"ag_ui": ag_ui}),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP bodies (section 8)
// ---------------------------------------------------------------------------------------------

/// `POST /api/v1/publish` request.
#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    pub user_id: String,
    pub events: Vec<Value>,
}

/// One event of a publish batch, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedEvent {
    pub kind: EventKind,
    pub thread_id: String,
    pub run_id: Option<String>,
    pub payload: Value,
}

/// Validates one event of a publish batch; the message says which field of which event is wrong.
pub fn parse_published_event(index: usize, value: Value) -> Result<PublishedEvent, String> {
    let at = |what: &str| format!("events[{index}]: {what}");
    let Value::Object(mut object) = value else { return Err(at("must be an object")) };
    let kind = match object.get("type") {
        Some(Value::String(name)) => {
            EventKind::parse(name).ok_or_else(|| at(&format!("unknown event type `{name}`")))?
        }
        _ => return Err(at("missing string field `type`")),
    };
    let thread_id = match object.get("thread_id") {
        Some(Value::String(t)) if (1..=MAX_THREAD_ID_CHARS).contains(&t.chars().count()) => t.clone(),
        Some(Value::String(_)) => return Err(at("`thread_id` must be 1 to 128 characters")),
        _ => return Err(at("missing string field `thread_id`")),
    };
    let run_id = match object.get("run_id") {
        // Section 5: `run_id` is absent on `user_message`; one that carries it is not an echo.
        Some(Value::String(_)) if kind == EventKind::UserMessage => {
            return Err(at("`user_message` events carry no `run_id`"))
        }
        None | Some(Value::Null) if kind == EventKind::UserMessage => None,
        Some(Value::String(r)) if (1..=MAX_RUN_ID_CHARS).contains(&r.chars().count()) => Some(r.clone()),
        Some(Value::String(_)) => return Err(at("`run_id` must be 1 to 128 characters")),
        _ => return Err(at("missing string field `run_id`")),
    };
    let payload = match object.remove("payload") {
        Some(payload @ Value::Object(_)) => payload,
        _ => return Err(at("`payload` must be an object")),
    };
    Ok(PublishedEvent { kind, thread_id, run_id, payload })
}

/// `GET /healthz` and `GET /readyz` answers: `{"status":"ok"}`, `{"status":"ready"}`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub status: &'static str,
}

/// `GET /client.json`: what a frontend needs to know before it signs in.
#[derive(Debug, Serialize)]
pub struct ClientInfo {
    pub dev_tokens: bool,
    pub subprotocol: &'static str,
}

/// `GET /api/v1/users/{user_id}/connections` answer (`connections`: one row per connection).
#[derive(Debug, Serialize)]
pub struct ConnectionsResponse<Row: Serialize> {
    pub user_id: String,
    pub connections: Vec<Row>,
}

/// `POST /dev/token` answer.
#[derive(Debug, Serialize)]
pub struct DevTokenResponse {
    pub token: String,
    pub expires_at: u64,
}

/// `POST /api/v1/publish` answer.
#[derive(Debug, Serialize)]
pub struct PublishResponse {
    pub seqs: Vec<u64>,
    pub sessions: usize,
}

/// Body of an HTTP error answer: `{"error":"invalid_token","message":"..."}`.
#[derive(Debug, Serialize)]
pub struct HttpError<'a> {
    pub error: &'a str,
    pub message: &'a str,
}

/// Milliseconds since the Unix epoch, the unit of every timestamp on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FieldLimits = FieldLimits { max_content_chars: 10 };

    fn err(text: &str) -> FrameError {
        parse_client_frame(text, LIMITS).unwrap_err()
    }

    #[test]
    fn parses_every_client_type() {
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","id":7}"#, LIMITS).unwrap(),
            ClientFrame::Ping { id: Some(Value::from(7)) }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"cancel_run","run_id":"r_1"}"#, LIMITS).unwrap(),
            ClientFrame::CancelRun { run_id: "r_1".into() }
        );
        let msg = parse_client_frame(
            r#"{"type":"user_message","thread_id":"t","content":"héllo","client_msg_id":"c1"}"#,
            LIMITS,
        )
        .unwrap();
        assert_eq!(msg.type_name(), "user_message");
        let auth =
            parse_client_frame(r#"{"type":"auth","token":"x","last_seq":3,"epoch":"e"}"#, LIMITS).unwrap();
        assert!(matches!(auth, ClientFrame::Auth(AuthFrame { last_seq: Some(3), .. })));
    }

    #[test]
    fn rejects_bad_frames_with_precise_errors() {
        assert_eq!(err("{nope").code, ErrorCode::BadMessage);
        assert_eq!(err("[1,2]").message, "a frame must be a JSON object");
        assert_eq!(err(r#"{"type":5}"#).message, "field `type` must be a string");
        assert_eq!(err(r#"{"id":1}"#).message, "missing field `type`");
        let unknown = err(r#"{"type":"launch"}"#);
        assert_eq!((unknown.code, unknown.reference.as_deref()), (ErrorCode::UnknownType, Some("launch")));
        let missing = err(r#"{"type":"user_message","content":"x"}"#);
        assert_eq!(missing.message, "missing field `thread_id`");
        assert_eq!(missing.reference.as_deref(), Some("user_message"));
        assert!(err(r#"{"type":"user_message","thread_id":1,"content":"x"}"#)
            .message
            .starts_with("invalid type"));
    }

    #[test]
    fn counts_content_in_characters() {
        let ten = "é".repeat(10);
        let ok = format!(r#"{{"type":"user_message","thread_id":"t","content":"{ten}"}}"#);
        assert!(parse_client_frame(&ok, LIMITS).is_ok());
        let eleven = format!(r#"{{"type":"user_message","thread_id":"t","content":"{ten}e"}}"#);
        assert!(err(&eleven).message.contains("longer than 10"));
        assert!(err(r#"{"type":"user_message","thread_id":"","content":"x"}"#)
            .message
            .contains("must not be empty"));
    }

    #[test]
    fn published_events_are_validated_field_by_field() {
        let ok =
            serde_json::json!({"type":"agent_thinking","thread_id":"t","run_id":"r","payload":{"text":"x"}});
        assert_eq!(parse_published_event(0, ok).unwrap().kind, EventKind::AgentThinking);
        let echo = serde_json::json!({"type":"user_message","thread_id":"t","payload":{}});
        assert_eq!(parse_published_event(0, echo).unwrap().run_id, None);
        for (bad, why) in [
            (
                serde_json::json!({"type":"agent_dancing","thread_id":"t","run_id":"r","payload":{}}),
                "unknown event type",
            ),
            (serde_json::json!({"type":"agent_thinking","run_id":"r","payload":{}}), "thread_id"),
            (serde_json::json!({"type":"agent_thinking","thread_id":"t","payload":{}}), "run_id"),
            (
                serde_json::json!({"type":"agent_thinking","thread_id":"t","run_id":"r","payload":[]}),
                "payload",
            ),
            (serde_json::json!("nope"), "object"),
        ] {
            let message = parse_published_event(3, bad).unwrap_err();
            assert!(message.starts_with("events[3]") && message.contains(why), "{message}");
        }
    }

    #[test]
    fn agent_outputs_have_the_documented_payloads() {
        let done =
            AgentOutput::Completed { status: RunStatus::Cancelled, content: "par".into(), duration_ms: 5 };
        assert_eq!(done.kind(), EventKind::AgentCompleted);
        assert_eq!(
            done.payload(),
            serde_json::json!({"status":"cancelled","response":{"content":"par"},"duration_ms":5})
        );
        let event = Event {
            kind: EventKind::AgentThinking,
            seq: 3,
            ts: 10,
            thread_id: "t",
            run_id: Some("r_1"),
            payload: &serde_json::json!({"text":"hm"}),
        };
        assert_eq!(
            event.to_frame(&mut Vec::new()).to_string(),
            r#"{"type":"agent_thinking","seq":3,"ts":10,"thread_id":"t","run_id":"r_1","payload":{"text":"hm"}}"#
        );
    }

    #[test]
    fn auth_frame_debug_hides_the_token() {
        let frame = AuthFrame { token: "secret.jwt.value".into(), last_seq: None, epoch: None };
        assert!(!format!("{frame:?}").contains("secret"));
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let ready = ServerFrame::ConnectionState {
            state: ConnectionState::ProcessingReady,
            connection_id: "ws_1",
            user_id: Some("alice"),
            epoch: Some("k3f9a1"),
            last_seq: Some(41),
            runs: None,
            resume: Some(ResumeInfo { from_seq: 41, replayed: 1, complete: true }),
        };
        assert_eq!(
            ready.to_text(),
            r#"{"type":"connection_state","state":"processing_ready","connection_id":"ws_1","user_id":"alice","epoch":"k3f9a1","last_seq":41,"resume":{"from_seq":41,"replayed":1,"complete":true}}"#
        );
        let error = ServerFrame::error(ErrorCode::NotReady, "queue full", Some("ping"));
        assert_eq!(
            error.to_text(),
            r#"{"type":"error","code":"not_ready","message":"queue full","ref":"ping"}"#
        );
    }
}
