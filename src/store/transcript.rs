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
    /// Text it may still keep for the store (`agent.max_response_bytes`): a verbose agent does
    /// not grow the server's memory without bound.
    room: usize,
    /// What a tab that joins the run is shown of its text and thinking: the last
    /// `agent.max_response_bytes` of each, so that the live events it gets next follow on.
    shown_text: Tail,
    /// The run's thinking (not stored: a tab that joins the run shows it).
    shown_thinking: Tail,
}

/// The last `cap` bytes of a growing text (on a character's boundary), kept in at most twice
/// that: the front is dropped in one go when it is reached, not at every push.
#[derive(Debug, Default)]
struct Tail {
    text: String,
    cap: usize,
    dropped: bool,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail { text: String::new(), cap, dropped: false }
    }

    fn push(&mut self, more: &str) {
        self.text.push_str(more);
        if self.text.len() > self.cap.saturating_mul(2) {
            let from = self.start();
            self.text.drain(..from);
            self.dropped = true;
        }
    }

    /// Where the last `cap` bytes begin, moved forward to a character's boundary.
    fn start(&self) -> usize {
        let mut from = self.text.len().saturating_sub(self.cap);
        while !self.text.is_char_boundary(from) {
            from += 1;
        }
        from
    }

    fn shown(&self) -> &str {
        &self.text[self.start()..]
    }

    fn cut(&self) -> bool {
        self.dropped || self.start() > 0
    }
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
            shown_text: Tail::new(max_text_bytes),
            shown_thinking: Tail::new(max_text_bytes),
        }
    }

    /// The part of `text` that fits, counted off the room left.
    fn take<'t>(&mut self, text: &'t str) -> &'t str {
        let mut cut = text.len().min(self.room);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.room -= cut;
        &text[..cut]
    }

    /// Follows one of the run's outputs.
    pub fn follow(&mut self, output: &AgentOutput) {
        match output {
            AgentOutput::MessageChunk { delta } => {
                self.shown_text.push(delta);
                let delta = self.take(delta);
                match self.parts.last_mut() {
                    Some(Part::Text(text)) => text.push_str(delta),
                    _ if delta.is_empty() => {}
                    _ => self.parts.push(Part::Text(delta.to_owned())),
                }
            }
            AgentOutput::Thinking { text } => self.shown_thinking.push(text),
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
    /// progress"): the text and thinking so far (their last `agent.max_response_bytes` each,
    /// `truncated` when that is not all), each tool call with its result once it has one.
    pub fn snapshot(&self) -> Value {
        let content = self.shown_text.shown();
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
        let thinking = self.shown_thinking.shown();
        let mut snapshot = json!({"content": content, "thinking": thinking, "tool_calls": tool_calls});
        if self.shown_text.cut() || self.shown_thinking.cut() {
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
        assert_eq!(roles(&t)[0]["content"], "abcd", "what is stored: the first bytes");
        let snapshot = t.snapshot();
        assert_eq!(snapshot["truncated"], true);
        assert_eq!(snapshot["content"], "cdéf", "what a joining tab is shown: the last bytes");
        for i in 0..100 {
            t.follow(&AgentOutput::MessageChunk { delta: format!("{}", i % 10) });
        }
        assert_eq!(t.snapshot()["content"], "56789", "the tail follows the text");
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
