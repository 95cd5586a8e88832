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

// ---------------------------------------------------------------------------------------------
// Client to server
// ---------------------------------------------------------------------------------------------

/// A frame a client sent, parsed and validated.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    Auth(AuthFrame),
    UserMessage(UserMessage),
    CancelRun { run_id: String },
    Ping { id: Option<Value> },
}

impl ClientFrame {
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Auth(_) => "auth",
            ClientFrame::UserMessage(_) => "user_message",
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
        ServerFrame::Error {
            code: self.code,
            message: &self.message,
            reference: self.reference.as_deref(),
        }
    }
}

/// Parses one text frame into a [`ClientFrame`], or says precisely what is wrong with it.
pub fn parse_client_frame(text: &str, limits: FieldLimits) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::bad(format!("invalid JSON: {e}"), None))?;
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
            check_len("token", &frame.token, 1, MAX_TOKEN_BYTES, reference)?;
            if let Some(epoch) = &frame.epoch {
                check_len("epoch", epoch, 0, 64, reference)?;
            }
            Ok(ClientFrame::Auth(frame))
        }
        "user_message" => {
            let frame: UserMessage = serde_json::from_value(value).map_err(fields)?;
            check_len(
                "thread_id",
                &frame.thread_id,
                1,
                MAX_THREAD_ID_CHARS,
                reference,
            )?;
            check_len(
                "content",
                &frame.content,
                1,
                limits.max_content_chars,
                reference,
            )?;
            if let Some(id) = &frame.client_msg_id {
                check_len("client_msg_id", id, 1, MAX_CLIENT_MSG_ID_CHARS, reference)?;
            }
            Ok(ClientFrame::UserMessage(frame))
        }
        "cancel_run" => {
            let frame: CancelRunFrame = serde_json::from_value(value).map_err(fields)?;
            check_len("run_id", &frame.run_id, 1, MAX_RUN_ID_CHARS, reference)?;
            Ok(ClientFrame::CancelRun {
                run_id: frame.run_id,
            })
        }
        "ping" => {
            let frame: PingFrame = serde_json::from_value(value).map_err(fields)?;
            Ok(ClientFrame::Ping { id: frame.id })
        }
        _ => Err(FrameError {
            code: ErrorCode::UnknownType,
            message: format!("unknown message type `{}`", truncate(&kind, 64)),
            reference: Some(truncate(&kind, 64).to_owned()),
        }),
    }
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
        return Err(FrameError::bad(
            format!("field `{field}` must not be empty"),
            reference,
        ));
    }
    if chars > max {
        return Err(FrameError::bad(
            format!("field `{field}` is longer than {max} characters"),
            reference,
        ));
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
    pub fn connection_state(state: ConnectionState, connection_id: &str) -> ServerFrame<'_> {
        ServerFrame::ConnectionState {
            state,
            connection_id,
            user_id: None,
            epoch: None,
            last_seq: None,
            resume: None,
        }
    }

    pub fn error<'a>(
        code: ErrorCode,
        message: &'a str,
        reference: Option<&'a str>,
    ) -> ServerFrame<'a> {
        ServerFrame::Error {
            code,
            message,
            reference,
        }
    }

    pub fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"type":"error","code":"internal","message":"serialisation failed"}"#)
        })
    }
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

    const LIMITS: FieldLimits = FieldLimits {
        max_content_chars: 10,
    };

    fn err(text: &str) -> FrameError {
        parse_client_frame(text, LIMITS).unwrap_err()
    }

    #[test]
    fn parses_every_client_type() {
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","id":7}"#, LIMITS).unwrap(),
            ClientFrame::Ping {
                id: Some(Value::from(7))
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"cancel_run","run_id":"r_1"}"#, LIMITS).unwrap(),
            ClientFrame::CancelRun {
                run_id: "r_1".into()
            }
        );
        let msg = parse_client_frame(
            r#"{"type":"user_message","thread_id":"t","content":"héllo","client_msg_id":"c1"}"#,
            LIMITS,
        )
        .unwrap();
        assert_eq!(msg.type_name(), "user_message");
        let auth = parse_client_frame(
            r#"{"type":"auth","token":"x","last_seq":3,"epoch":"e"}"#,
            LIMITS,
        )
        .unwrap();
        assert!(matches!(
            auth,
            ClientFrame::Auth(AuthFrame {
                last_seq: Some(3),
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_frames_with_precise_errors() {
        assert_eq!(err("{nope").code, ErrorCode::BadMessage);
        assert_eq!(err("[1,2]").message, "a frame must be a JSON object");
        assert_eq!(
            err(r#"{"type":5}"#).message,
            "field `type` must be a string"
        );
        assert_eq!(err(r#"{"id":1}"#).message, "missing field `type`");
        let unknown = err(r#"{"type":"launch"}"#);
        assert_eq!(
            (unknown.code, unknown.reference.as_deref()),
            (ErrorCode::UnknownType, Some("launch"))
        );
        let missing = err(r#"{"type":"user_message","content":"x"}"#);
        assert_eq!(missing.message, "missing field `thread_id`");
        assert_eq!(missing.reference.as_deref(), Some("user_message"));
        assert!(
            err(r#"{"type":"user_message","thread_id":1,"content":"x"}"#)
                .message
                .starts_with("invalid type")
        );
    }

    #[test]
    fn counts_content_in_characters() {
        let ten = "é".repeat(10);
        let ok = format!(r#"{{"type":"user_message","thread_id":"t","content":"{ten}"}}"#);
        assert!(parse_client_frame(&ok, LIMITS).is_ok());
        let eleven = format!(r#"{{"type":"user_message","thread_id":"t","content":"{ten}e"}}"#);
        assert!(err(&eleven).message.contains("longer than 10"));
        assert!(
            err(r#"{"type":"user_message","thread_id":"","content":"x"}"#)
                .message
                .contains("must not be empty")
        );
    }

    #[test]
    fn auth_frame_debug_hides_the_token() {
        let frame = AuthFrame {
            token: "secret.jwt.value".into(),
            last_seq: None,
            epoch: None,
        };
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
            resume: Some(ResumeInfo {
                from_seq: 41,
                replayed: 1,
                complete: true,
            }),
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
