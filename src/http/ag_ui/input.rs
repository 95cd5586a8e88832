//! What agentwire takes from an AG-UI client's `RunAgentInput`: the thread, the client's run id,
//! the messages it names (the new ones, by `id`, start the run: docs/ag-ui.md), an interrupt's
//! answer (`resume`), and what goes to the agent as given. Every refusal names the field, for a
//! 400 the client can act on.

use serde_json::Value;

use crate::protocol::{answer_text, Answers, MAX_RUN_ID_CHARS, MAX_THREAD_ID_CHARS};

/// The parts of a `RunAgentInput` a run is made of.
#[derive(Debug, PartialEq)]
pub struct RunInput {
    pub thread_id: String,
    pub run_id: Option<String>,
    /// The input's `user` and `tool` messages, in order: the last one the thread does not have
    /// yet starts the run.
    pub messages: Vec<Candidate>,
    /// The first entry of `resume` (AG-UI 1.0): the interrupt answered, and the answer.
    pub resume: Option<(String, Value)>,
    /// The client's `tools`, `context`, `state`, `forwardedProps` and `resume`, passed to the
    /// agent as given.
    pub client: crate::protocol::ClientInput,
}

/// A `user` or `tool` message of the input.
#[derive(Debug, PartialEq)]
pub struct Candidate {
    pub id: Option<String>,
    /// Where it is in the input, for errors: `messages[3]`.
    pub at: usize,
    pub content: Value,
    /// A `tool` message's call: a frontend tool's result.
    pub tool_call_id: Option<String>,
}

impl Candidate {
    /// The message as a thread's message: its text (a user's must have some, within
    /// `limits.max_content_chars`) and what it answers.
    pub fn taken(&self, max_content_chars: usize) -> Result<(String, Answers), FieldError> {
        let field = format!("messages[{}].content", self.at);
        let content = match (&self.content, &self.tool_call_id) {
            (Value::String(text), _) => text.clone(),
            // Multimodal input: the text parts, in order; other parts are not for this agent.
            (Value::Array(parts), None) => parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            (Value::Null, Some(_)) => String::new(),
            (other, Some(_)) => answer_text(other),
            _ => return Err(wrong(field, "must be a string, or an array of parts with text")),
        };
        let chars = content.chars().count();
        if chars == 0 && self.tool_call_id.is_none() {
            return Err(wrong(field, "has no text"));
        }
        if chars > max_content_chars {
            return Err(wrong(
                field,
                format!("is {chars} characters, over limits.max_content_chars ({max_content_chars})"),
            ));
        }
        let answers = match &self.tool_call_id {
            Some(call) => Answers::ToolCall(call.clone()),
            None => Answers::Nothing,
        };
        Ok((content, answers))
    }
}

/// A field of the input that is missing or wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub fn wrong(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// Reads a `RunAgentInput` (already parsed as JSON). Its `tools`, `context`, `state`,
/// `forwardedProps` and `resume` go to the agent as given; the thread's conversation is kept by
/// agentwire (docs/ag-ui.md).
pub fn parse(input: &Value) -> Result<RunInput, FieldError> {
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
    let Some(Value::Array(given)) = fields.get("messages") else {
        return Err(wrong("messages", "is required: an array of messages ending with the user's"));
    };
    let mut messages = Vec::new();
    for (at, message) in given.iter().enumerate() {
        let tool_call_id = match message["role"].as_str() {
            Some("user") => None,
            Some("tool") => match message["toolCallId"].as_str() {
                Some(call) if (1..=MAX_RUN_ID_CHARS).contains(&call.chars().count()) => Some(call.to_owned()),
                _ => {
                    return Err(wrong(format!("messages[{at}].toolCallId"), "is required for a tool message"))
                }
            },
            _ => continue,
        };
        let id = match &message["id"] {
            Value::Null => None,
            Value::String(id) if (1..=MAX_RUN_ID_CHARS).contains(&id.chars().count()) => Some(id.clone()),
            _ => return Err(wrong(format!("messages[{at}].id"), "must be a string of 1 to 128 characters")),
        };
        messages.push(Candidate { id, at, content: message["content"].clone(), tool_call_id });
    }
    let resume = match fields.get("resume") {
        None | Some(Value::Null) => None,
        Some(Value::Array(entries)) if !entries.is_empty() => {
            let Some(interrupt_id) = entries[0]["interruptId"].as_str().filter(|id| !id.is_empty()) else {
                return Err(wrong("resume[0].interruptId", "is required: the interrupt answered"));
            };
            // AG-UI 1.0 calls the answer `payload`; `value` is taken too.
            let value = entries[0].get("payload").or_else(|| entries[0].get("value")).cloned();
            Some((interrupt_id.to_owned(), value.unwrap_or(Value::Null)))
        }
        Some(_) => return Err(wrong("resume", "must be a non-empty array of {interruptId, payload}")),
    };
    let present = |name: &str| fields.get(name).filter(|v| !v.is_null()).cloned();
    let client = crate::protocol::ClientInput {
        tools: present("tools"),
        context: present("context"),
        state: present("state"),
        forwarded_props: present("forwardedProps"),
        resume: present("resume"),
    };
    client.check().map_err(|(field, why)| wrong(field, why))?;
    if matches!(&client.forwarded_props, Some(props) if !props.is_object()) {
        return Err(wrong("forwardedProps", "must be an object"));
    }
    Ok(RunInput { thread_id, run_id, messages, resume, client })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(input: Value) -> String {
        match parse(&input) {
            Ok(run) => run.messages.last().map(|m| m.taken(100).unwrap_err().field).unwrap_or_default(),
            Err(wrong) => wrong.field,
        }
    }

    #[test]
    fn takes_the_thread_the_run_id_the_messages_and_what_goes_to_the_agent() {
        let input = json!({"threadId": "t", "runId": "r1", "messages": [
            {"id": "1", "role": "user", "content": "first"},
            {"id": "2", "role": "assistant", "content": "answer"},
            {"id": "3", "role": "user", "content": [{"type": "text", "text": "second"}, {"type": "binary", "mimeType": "image/png"}]},
            {"id": "4", "role": "tool", "content": "x", "toolCallId": "c"},
        ], "state": {}, "tools": [], "context": [], "forwardedProps": {"a": 1}});
        let run = parse(&input).unwrap();
        assert_eq!((run.thread_id.as_str(), run.run_id.as_deref()), ("t", Some("r1")));
        let ids: Vec<_> = run.messages.iter().map(|m| m.id.as_deref().unwrap()).collect();
        assert_eq!(ids, ["1", "3", "4"]);
        assert_eq!(run.messages[1].taken(100), Ok(("second".into(), Answers::Nothing)));
        assert_eq!(run.messages[2].taken(100), Ok(("x".into(), Answers::ToolCall("c".into()))));
        assert_eq!(run.client.forwarded_props, Some(json!({"a": 1})));
        assert_eq!(run.resume, None);
        let resume = json!({"threadId": "t", "messages": [], "resume": [{"interruptId": "i1", "status": "resolved", "payload": "yes"}]});
        assert_eq!(parse(&resume).unwrap().resume, Some(("i1".into(), json!("yes"))));
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
            field_of(json!({"threadId": "t", "messages": [{"role": "user", "content": 3}]})),
            "messages[0].content"
        );
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [{"role": "user", "content": "x".repeat(101)}]})),
            "messages[0].content"
        );
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].toolCallId"
        );
        assert_eq!(
            field_of(json!({"threadId": "t", "messages": [], "resume": [{"payload": 1}]})),
            "resume[0].interruptId"
        );
        assert_eq!(field_of(json!({"threadId": "t", "messages": [], "forwardedProps": 3})), "forwardedProps");
    }
}
