//! What a run has produced so far, followed from its stream events whatever agent runs it: the
//! messages the store keeps when the run ends (assistant text, tool calls, tool results, in the
//! AG-UI message shape; docs/conversations.md, "What is stored, and when").
//!
//! An AG-UI agent's own transcript (`agent/ag_ui/mapping.rs`) is stored instead when it sends
//! one, since it carries the agent's own message ids.

use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::protocol::AgentOutput;

/// A run's answer as it streams.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Message id prefix: the run's id.
    run_id: String,
    parts: Vec<Part>,
    /// Text it may still keep (`agent.max_response_bytes`): a verbose agent does not grow the
    /// server's memory without bound; what is cut is said (`truncated`).
    room: usize,
    truncated: bool,
    /// The run's thinking so far (not stored: a tab that joins the run shows it).
    thinking: String,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Call { id: String, tool: String, args: Value },
    Result { id: String, result: Value },
}

impl Transcript {
    pub fn new(run_id: &str, max_text_bytes: usize) -> Transcript {
        Transcript {
            run_id: run_id.to_owned(),
            parts: Vec::new(),
            room: max_text_bytes,
            truncated: false,
            thinking: String::new(),
        }
    }

    /// The part of `text` that fits, counted off the room left.
    fn take<'t>(&mut self, text: &'t str) -> &'t str {
        let mut cut = text.len().min(self.room);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.room -= cut;
        self.truncated |= cut < text.len();
        &text[..cut]
    }

    /// Follows one of the run's outputs.
    pub fn follow(&mut self, output: &AgentOutput) {
        match output {
            AgentOutput::MessageChunk { delta } => {
                let delta = self.take(delta);
                match self.parts.last_mut() {
                    Some(Part::Text(text)) => text.push_str(delta),
                    _ if delta.is_empty() => {}
                    _ => self.parts.push(Part::Text(delta.to_owned())),
                }
            }
            AgentOutput::Thinking { text } => {
                let text = self.take(text);
                self.thinking.push_str(text);
            }
            AgentOutput::ToolExecuting { tool_call_id, tool, args } => self.parts.push(Part::Call {
                id: tool_call_id.clone(),
                tool: tool.clone(),
                args: args.clone(),
            }),
            AgentOutput::ToolCompleted { tool_call_id, result, .. } => {
                self.parts.push(Part::Result { id: tool_call_id.clone(), result: result.clone() })
            }
            // A run's final answer given whole (a publisher's `agent_completed`, or an agent
            // that did not stream it): it is the text when nothing streamed.
            AgentOutput::Completed { content, .. } if !content.is_empty() && !self.has_text() => {
                let content = self.take(content).to_owned();
                self.parts.push(Part::Text(content))
            }
            _ => {}
        }
    }

    /// The run as a tab that joins it is shown it (docs/conversations.md, "Joining a run in
    /// progress"): the text and thinking so far, each tool call with its result once it has one.
    pub fn snapshot(&self) -> Value {
        let content = self.text();
        let tool_calls: Vec<Value> = self
            .parts
            .iter()
            .filter_map(|part| {
                let Part::Call { id, tool, args } = part else { return None };
                let mut call = json!({"tool_call_id": id, "tool": tool, "args": args});
                let result = self.parts.iter().find_map(|p| match p {
                    Part::Result { id: done, result } if done == id => Some(result.clone()),
                    _ => None,
                });
                if let Some(result) = result {
                    call["result"] = result;
                }
                Some(call)
            })
            .collect();
        let mut snapshot = json!({"content": content, "thinking": self.thinking, "tool_calls": tool_calls});
        if self.truncated {
            snapshot["truncated"] = Value::Bool(true);
        }
        snapshot
    }

    /// The answer's text so far (what a cancelled run's `agent_completed` carries), within
    /// `agent.max_response_bytes`.
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| if let Part::Text(t) = p { Some(t.as_str()) } else { None })
            .collect()
    }

    fn has_text(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Text(_)))
    }

    /// The AG-UI messages of the run so far: consecutive tool calls in one assistant message,
    /// their results after it as `tool` messages, text as assistant messages.
    pub fn messages(&self) -> Vec<Box<RawValue>> {
        let mut messages = Vec::new();
        let mut calls: Vec<Value> = Vec::new();
        let mut results: Vec<Value> = Vec::new();
        let flush = |calls: &mut Vec<Value>, results: &mut Vec<Value>, messages: &mut Vec<Value>| {
            if !calls.is_empty() {
                let id = format!("{}-{}", self.run_id, messages.len());
                messages.push(json!({"id": id, "role": "assistant", "toolCalls": std::mem::take(calls)}));
            }
            messages.append(results);
        };
        let mut values = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => {
                    flush(&mut calls, &mut results, &mut values);
                    let id = format!("{}-{}", self.run_id, values.len());
                    values.push(json!({"id": id, "role": "assistant", "content": text}));
                }
                Part::Call { id, tool, args } => {
                    if !results.is_empty() {
                        flush(&mut calls, &mut results, &mut values);
                    }
                    let arguments = args.as_str().map_or_else(|| args.to_string(), str::to_owned);
                    calls.push(json!({"id": id, "type": "function", "function": {"name": tool, "arguments": arguments}}));
                }
                Part::Result { id, result } => {
                    let content = result.as_str().map_or_else(|| result.to_string(), str::to_owned);
                    let message_id = format!("{}-r{}", self.run_id, results.len() + values.len());
                    results.push(
                        json!({"id": message_id, "role": "tool", "toolCallId": id, "content": content}),
                    );
                }
            }
        }
        flush(&mut calls, &mut results, &mut values);
        messages.extend(values.iter().filter_map(|v| serde_json::value::to_raw_value(v).ok()));
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(transcript: &Transcript) -> Vec<Value> {
        transcript.messages().iter().map(|m| serde_json::from_str(m.get()).unwrap()).collect()
    }

    #[test]
    fn a_tool_call_its_result_then_text() {
        let mut t = Transcript::new("r_1", 1 << 20);
        t.follow(&AgentOutput::ToolExecuting {
            tool_call_id: "c1".into(),
            tool: "calc".into(),
            args: json!({"x": 1}),
        });
        let result = AgentOutput::ToolCompleted {
            tool_call_id: "c1".into(),
            tool: "calc".into(),
            ok: true,
            result: json!(42),
            duration_ms: 1,
        };
        t.follow(&result);
        t.follow(&AgentOutput::MessageChunk { delta: "it is ".into() });
        t.follow(&AgentOutput::MessageChunk { delta: "42".into() });
        let m = roles(&t);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[0]["role"], "assistant");
        assert_eq!(m[0]["toolCalls"][0]["function"]["name"], "calc");
        assert_eq!(m[0]["toolCalls"][0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!((m[1]["role"].as_str(), m[1]["toolCallId"].as_str()), (Some("tool"), Some("c1")));
        assert_eq!(m[1]["content"], "42");
        assert_eq!((m[2]["role"].as_str(), m[2]["content"].as_str()), (Some("assistant"), Some("it is 42")));
    }

    #[test]
    fn text_is_kept_within_its_room() {
        let mut t = Transcript::new("r", 5);
        t.follow(&AgentOutput::MessageChunk { delta: "abc".into() });
        t.follow(&AgentOutput::MessageChunk { delta: "déf".into() });
        assert_eq!(roles(&t)[0]["content"], "abcd");
        assert_eq!(t.snapshot()["truncated"], true);
    }

    #[test]
    fn a_whole_answer_counts_only_when_nothing_streamed() {
        let mut t = Transcript::new("r", 1 << 20);
        let done = |content: &str| AgentOutput::Completed {
            status: crate::protocol::RunStatus::Ok,
            content: content.into(),
            duration_ms: 0,
        };
        t.follow(&done("whole"));
        assert_eq!(roles(&t)[0]["content"], "whole");
        let mut streamed = Transcript::new("r", 1 << 20);
        streamed.follow(&AgentOutput::MessageChunk { delta: "streamed".into() });
        streamed.follow(&done("streamed"));
        assert_eq!(roles(&streamed).len(), 1);
    }
}
