//! What agentwire takes from an AG-UI client's `RunAgentInput`: the thread, the client's run id,
//! and the last user message. Every refusal names the field, for a 400 the client can act on.

use serde_json::Value;

use crate::protocol::{MAX_RUN_ID_CHARS, MAX_THREAD_ID_CHARS};

/// The parts of a `RunAgentInput` a run is made of.
#[derive(Debug, PartialEq)]
pub struct RunInput {
    pub thread_id: String,
    pub run_id: Option<String>,
    /// The text of the last `user` message of `messages`.
    pub content: String,
    /// The client's `tools`, `context` and `state`, passed to the agent as given.
    pub client: crate::protocol::ClientInput,
}

/// A field of the input that is missing or wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn wrong(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// Reads a `RunAgentInput` (already parsed as JSON). Its `tools`, `context` and `state` go to
/// the agent as given; the thread's conversation is kept by agentwire (docs/ag-ui.md).
pub fn parse(input: &Value, max_content_chars: usize) -> Result<RunInput, FieldError> {
    let Value::Object(fields) = input else {
        return Err(wrong("body", "must be a JSON object (a RunAgentInput)"));
    };
    let thread_id = match fields.get("threadId") {
        Some(Value::String(t)) if (1..=MAX_THREAD_ID_CHARS).contains(&t.chars().count()) => t.clone(),
        Some(Value::String(_)) => return Err(wrong("threadId", "must be 1 to 128 characters")),
        _ => return Err(wrong("threadId", "is required: a string naming the thread")),
    };
    let run_id = match fields.get("runId") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if (1..=MAX_RUN_ID_CHARS).contains(&r.chars().count()) => Some(r.clone()),
        Some(_) => return Err(wrong("runId", "must be a string of 1 to 128 characters")),
    };
    let Some(Value::Array(messages)) = fields.get("messages") else {
        return Err(wrong("messages", "is required: an array of messages ending with the user's"));
    };
    let Some((at, message)) = messages.iter().enumerate().rev().find(|(_, m)| m["role"] == "user") else {
        return Err(wrong("messages", "has no message with role \"user\""));
    };
    let field = format!("messages[{at}].content");
    let content = match &message["content"] {
        Value::String(text) => text.clone(),
        // Multimodal input: the text parts, in order; other parts are not for this agent.
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return Err(wrong(field, "must be a string, or an array of parts with text")),
    };
    let chars = content.chars().count();
    if chars == 0 {
        return Err(wrong(field, "has no text"));
    }
    if chars > max_content_chars {
        return Err(wrong(
            field,
            format!("is {chars} characters, over limits.max_content_chars ({max_content_chars})"),
        ));
    }
    let present = |name: &str| fields.get(name).filter(|v| !v.is_null()).cloned();
    let client = crate::protocol::ClientInput {
        tools: present("tools"),
        context: present("context"),
        state: present("state"),
    };
    client.check().map_err(|(field, why)| wrong(field, why))?;
    Ok(RunInput { thread_id, run_id, content, client })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(input: Value) -> String {
        parse(&input, 100).unwrap_err().field
    }

    #[test]
    fn takes_the_thread_the_run_id_and_the_last_user_message() {
        let input = json!({"threadId": "t", "runId": "r1", "messages": [
            {"id": "1", "role": "user", "content": "first"},
            {"id": "2", "role": "assistant", "content": "answer"},
            {"id": "3", "role": "user", "content": [{"type": "text", "text": "second"}, {"type": "binary", "mimeType": "image/png"}]},
            {"id": "4", "role": "tool", "content": "x", "toolCallId": "c"},
        ], "state": {}, "tools": [], "context": [], "forwardedProps": {}});
        assert_eq!(
            parse(&input, 100),
            Ok(RunInput {
                thread_id: "t".into(),
                run_id: Some("r1".into()),
                content: "second".into(),
                client: crate::protocol::ClientInput {
                    tools: Some(json!([])),
                    context: Some(json!([])),
                    state: Some(json!({})),
                },
            })
        );
        let tools = json!({"threadId": "t", "messages": [{"role": "user", "content": "x"}], "tools": [1]});
        assert_eq!(field_of(tools), "tools");
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        assert_eq!(field_of(json!([])), "body");
        assert_eq!(field_of(json!({"messages": []})), "threadId");
        assert_eq!(field_of(json!({"threadId": "", "messages": []})), "threadId");
        assert_eq!(field_of(json!({"threadId": "t", "runId": 5, "messages": []})), "runId");
        assert_eq!(field_of(json!({"threadId": "t"})), "messages");
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [{"role": "assistant", "content": "x"}]})),
            "messages"
        );
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [{"role": "user", "content": 3}]})),
            "messages[0].content"
        );
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [{"role": "user", "content": "x".repeat(101)}]})),
            "messages[0].content"
        );
    }
}
