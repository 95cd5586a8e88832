//! A run's steps as the AG-UI events an AG-UI client reads, in the order AG-UI's rules demand:
//! one `RUN_STARTED` first; text messages and tool calls opened before their content and closed
//! after; exactly one `RUN_FINISHED` or `RUN_ERROR` last.
//!
//! With an AG-UI agent upstream a step carries the agent's own events and they pass through
//! unchanged; steps without them (the demo's, or a run's end decided by agentwire: a cancel, a
//! timeout) are rendered from the stream event. Whatever passes through is followed, so that a
//! rendered end still closes what the agent left open.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::protocol::{AgentOutput, RunStatus};
use crate::registry::RunStep;

pub struct Renderer {
    thread_id: String,
    run_id: String,
    started: bool,
    ended: bool,
    /// Text messages and tool calls opened and not yet closed.
    open_messages: BTreeSet<String>,
    open_tool_calls: BTreeSet<String>,
    /// The text message rendered chunks go into, until something else comes between.
    current_text: Option<String>,
    texts: usize,
}

impl Renderer {
    pub fn new(thread_id: String, run_id: String) -> Renderer {
        Renderer {
            thread_id,
            run_id,
            started: false,
            ended: false,
            open_messages: BTreeSet::new(),
            open_tool_calls: BTreeSet::new(),
            current_text: None,
            texts: 0,
        }
    }

    /// The run's end (`RUN_FINISHED` or `RUN_ERROR`) has been rendered.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// One step as SSE `data:` lines; nothing once the run has ended.
    pub fn render(&mut self, step: RunStep) -> String {
        let mut events = Vec::new();
        if self.ended {
            return String::new();
        }
        let terminal = step.output.kind().is_terminal();
        if step.ag_ui.is_empty() {
            self.rendered(step.output, &mut events);
        } else {
            for event in step.ag_ui {
                self.passed(event, &mut events);
            }
            // An end decided here, after the agent's events (a failure that cut them short).
            if terminal && !self.ended {
                self.rendered(step.output, &mut events);
            }
        }
        let mut out = String::new();
        for event in events {
            out.push_str("data: ");
            out.push_str(&event.to_string());
            out.push_str("\n\n");
        }
        out
    }

    /// An event of the agent's, passed through as it is; what it opens and closes is noted.
    fn passed(&mut self, event: Value, out: &mut Vec<Value>) {
        if self.ended {
            return;
        }
        let id = |name: &str| event[name].as_str().unwrap_or_default().to_owned();
        match event["type"].as_str().unwrap_or_default() {
            "RUN_STARTED" => self.started = true,
            "RUN_FINISHED" | "RUN_ERROR" => self.ended = true,
            "TEXT_MESSAGE_START" => {
                self.open_messages.insert(id("messageId"));
            }
            "TEXT_MESSAGE_END" => {
                self.open_messages.remove(&id("messageId"));
            }
            "TOOL_CALL_START" => {
                self.open_tool_calls.insert(id("toolCallId"));
            }
            "TOOL_CALL_END" => {
                self.open_tool_calls.remove(&id("toolCallId"));
            }
            _ => {}
        }
        out.push(event);
    }

    fn start_if_needed(&mut self, out: &mut Vec<Value>) {
        if !self.started {
            self.started = true;
            out.push(json!({"type": "RUN_STARTED", "threadId": self.thread_id, "runId": self.run_id}));
        }
    }

    fn close_text(&mut self, out: &mut Vec<Value>) {
        if let Some(id) = self.current_text.take() {
            self.open_messages.remove(&id);
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id}));
        }
    }

    /// Closes what is open, so the run may end.
    fn close_all(&mut self, out: &mut Vec<Value>) {
        self.current_text = None;
        for id in std::mem::take(&mut self.open_messages) {
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id}));
        }
        for id in std::mem::take(&mut self.open_tool_calls) {
            out.push(json!({"type": "TOOL_CALL_END", "toolCallId": id}));
        }
    }

    fn rendered(&mut self, output: AgentOutput, out: &mut Vec<Value>) {
        self.start_if_needed(out);
        match output {
            AgentOutput::Started { .. } => {}
            AgentOutput::Thinking { text } => {
                self.close_text(out);
                out.push(json!({"type": "CUSTOM", "name": "agentwire.thinking", "value": {"text": text}}));
            }
            AgentOutput::ToolExecuting { tool_call_id, tool, args } => {
                self.close_text(out);
                let args = match args {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                out.push(
                    json!({"type": "TOOL_CALL_START", "toolCallId": tool_call_id, "toolCallName": tool}),
                );
                if !args.is_empty() {
                    out.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": tool_call_id, "delta": args}));
                }
                out.push(json!({"type": "TOOL_CALL_END", "toolCallId": tool_call_id}));
            }
            AgentOutput::ToolCompleted { tool_call_id, result, .. } => {
                self.close_text(out);
                let content = match result {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                out.push(json!({"type": "TOOL_CALL_RESULT", "messageId": format!("{tool_call_id}-result"),
                    "toolCallId": tool_call_id, "content": content, "role": "tool"}));
            }
            AgentOutput::MessageChunk { delta } => {
                if delta.is_empty() {
                    return;
                }
                let id = match &self.current_text {
                    Some(id) => id.clone(),
                    None => {
                        self.texts += 1;
                        let id = format!("{}-text-{}", self.run_id, self.texts);
                        out.push(json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": "assistant"}));
                        self.open_messages.insert(id.clone());
                        self.current_text = Some(id.clone());
                        id
                    }
                };
                out.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": id, "delta": delta}));
            }
            // An interrupted run's end is the agent's own RUN_FINISHED (with its outcome),
            // passed through; this is only an end decided here.
            AgentOutput::Completed { status: RunStatus::Ok | RunStatus::Interrupted, .. } => {
                self.close_all(out);
                self.ended = true;
                out.push(json!({"type": "RUN_FINISHED", "threadId": self.thread_id, "runId": self.run_id}));
            }
            AgentOutput::Completed { status: RunStatus::Cancelled, .. } => {
                self.close_all(out);
                self.ended = true;
                out.push(
                    json!({"type": "RUN_ERROR", "message": "the run was cancelled", "code": "cancelled"}),
                );
            }
            AgentOutput::Error { code, message } => {
                self.close_all(out);
                self.ended = true;
                out.push(json!({"type": "RUN_ERROR", "message": message, "code": code}));
            }
            AgentOutput::Passthrough { ag_ui } => {
                self.close_text(out);
                self.passed(ag_ui, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(sse: &str) -> Vec<String> {
        sse.split("\n\n")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let event: Value = serde_json::from_str(l.strip_prefix("data: ").unwrap()).unwrap();
                event["type"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    fn step(output: AgentOutput) -> RunStep {
        RunStep { output, ag_ui: Vec::new(), bytes: 0 }
    }

    #[test]
    fn a_demo_run_renders_in_ag_ui_order() {
        let mut r = Renderer::new("t".into(), "r".into());
        let mut all = Vec::new();
        for output in [
            AgentOutput::Started { agent: "demo".into(), message_id: "m".into() },
            AgentOutput::Thinking { text: "hmm".into() },
            AgentOutput::ToolExecuting {
                tool_call_id: "c".into(),
                tool: "calculator".into(),
                args: json!({"x": 1}),
            },
            AgentOutput::ToolCompleted {
                tool_call_id: "c".into(),
                tool: "calculator".into(),
                ok: true,
                result: json!({"value": "2"}),
                duration_ms: 1,
            },
            AgentOutput::MessageChunk { delta: "It is ".into() },
            AgentOutput::MessageChunk { delta: "2.".into() },
            AgentOutput::Completed { status: RunStatus::Ok, content: "It is 2.".into(), duration_ms: 3 },
        ] {
            all.extend(types(&r.render(step(output))));
        }
        assert_eq!(
            all,
            [
                "RUN_STARTED",
                "CUSTOM",
                "TOOL_CALL_START",
                "TOOL_CALL_ARGS",
                "TOOL_CALL_END",
                "TOOL_CALL_RESULT",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_FINISHED"
            ]
        );
        assert!(r.ended());
        assert_eq!(r.render(step(AgentOutput::MessageChunk { delta: "late".into() })), "");
    }

    #[test]
    fn agent_events_pass_through_and_a_rendered_end_closes_what_they_opened() {
        let mut r = Renderer::new("t".into(), "r".into());
        let opening = RunStep {
            output: AgentOutput::MessageChunk { delta: "Hi".into() },
            ag_ui: vec![
                json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r"}),
                json!({"type": "TEXT_MESSAGE_START", "messageId": "a", "role": "assistant"}),
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "Hi"}),
            ],
            bytes: 0,
        };
        assert_eq!(types(&r.render(opening)), ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT"]);
        let cancel =
            AgentOutput::Completed { status: RunStatus::Cancelled, content: "Hi".into(), duration_ms: 1 };
        assert_eq!(types(&r.render(step(cancel))), ["TEXT_MESSAGE_END", "RUN_ERROR"]);
    }

    #[test]
    fn an_end_before_any_start_still_starts_the_run() {
        let mut r = Renderer::new("t".into(), "r".into());
        let error = AgentOutput::Error { code: "agent_unavailable".into(), message: "down".into() };
        assert_eq!(types(&r.render(step(error))), ["RUN_STARTED", "RUN_ERROR"]);
    }
}
