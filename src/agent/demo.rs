//! The built-in `demo` agent: a complete, realistic run for every message, with a real little
//! tool. A message with arithmetic in it ("what is 12 * (3 + 4)?") gets the `calculator`; any
//! other gets `word_count`. Its pace is `agent.step_delay_ms`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};

use super::{AgentEvent, RunRequest, StartRun, StopRun};
use crate::protocol::{AgentOutput, RunStatus};

pub struct DemoAgent {
    /// The `agent` of `agent_started` (`agent.name`).
    name: String,
    step_delay: Duration,
    /// `agent.max_queued_runs`: the bound of this actor's mailbox.
    mailbox: usize,
    slow: SlowStep,
    runs: HashMap<String, SpawnHandle>,
}

/// `[faults] slow_agent_*`: the tool step of these users' runs blocks for this long, as an
/// expensive tool would.
#[derive(Clone, Debug, Default)]
pub struct SlowStep {
    pub user_prefix: String,
    pub block: Duration,
}

impl SlowStep {
    pub fn from_faults(faults: &crate::config::FaultsConfig) -> SlowStep {
        SlowStep {
            user_prefix: faults.slow_agent_user_prefix.clone(),
            block: Duration::from_millis(faults.slow_agent_step_ms),
        }
    }

    fn applies_to(&self, user_id: &str) -> bool {
        !self.block.is_zero() && user_id.starts_with(&self.user_prefix)
    }
}

impl DemoAgent {
    pub fn new(name: String, step_delay: Duration, mailbox: usize, slow: SlowStep) -> DemoAgent {
        DemoAgent { name, step_delay, mailbox, slow, runs: HashMap::new() }
    }
}

impl Actor for DemoAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox);
    }
}

/// The tool call the demo makes for a message, with its result.
struct ToolCall {
    tool: &'static str,
    args: Value,
    ok: bool,
    result: Value,
    answer: String,
}

fn choose_tool(content: &str) -> ToolCall {
    match find_arithmetic(content) {
        Some(expression) => calculate(expression),
        None => count_words(content),
    }
}

fn calculate(expression: String) -> ToolCall {
    let (ok, result, answer) = match evalexpr::eval(&expression) {
        Ok(value) if value.is_number() => {
            let answer = format!("I worked it out with the calculator: {expression} = {value}.");
            (true, json!({"value": value.to_string()}), answer)
        }
        outcome => {
            let error = match outcome {
                Ok(other) => format!("not a number: {other}"),
                Err(e) => e.to_string(),
            };
            let answer = format!("The calculator could not evaluate {expression}: {error}.");
            (false, json!({"error": error}), answer)
        }
    };
    ToolCall { tool: "calculator", args: json!({"expression": expression}), ok, result, answer }
}

fn count_words(content: &str) -> ToolCall {
    let words = content.split_whitespace().count();
    let characters = content.chars().count();
    ToolCall {
        tool: "word_count",
        args: json!({"text": content}),
        ok: true,
        result: json!({"words": words, "characters": characters}),
        answer: format!(
            "Your message has {words} word{} and {characters} character{}. \
             Ask me some arithmetic, like 12 * (3 + 4), and I will use my calculator.",
            if words == 1 { "" } else { "s" },
            if characters == 1 { "" } else { "s" },
        ),
    }
}

/// The longest run of arithmetic characters that holds a digit and an operator between digits.
fn find_arithmetic(content: &str) -> Option<String> {
    let is_arith = |c: char| c.is_ascii_digit() || " .+-*/%^()".contains(c);
    content
        .split(|c: char| !is_arith(c))
        .map(str::trim)
        .filter(|s| {
            let digits = s.chars().filter(char::is_ascii_digit).count();
            let has_operator = s.trim_start_matches(['-', '(']).contains(['+', '-', '*', '/', '%', '^']);
            digits >= 2 && has_operator
        })
        .max_by_key(|s| s.len())
        .map(|s| s.trim_end_matches(['+', '-', '*', '/', '%', '^', '.', ' ']).to_owned())
}

/// Splits the answer into a few chunks of whole words, as a streaming model would.
fn chunks(answer: &str) -> Vec<String> {
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    words.chunks(4).map(|c| c.concat()).collect()
}

/// The run's outputs, in order. Durations are stamped as the steps are emitted.
fn plan(run: &RunRequest, agent: &str) -> Vec<AgentOutput> {
    let tool = choose_tool(&run.content);
    let tool_call_id = format!("call_{}", &run.run_id[run.run_id.len().saturating_sub(8)..]);
    let mut outputs = vec![
        AgentOutput::Started { agent: agent.to_owned(), message_id: run.message_id.clone() },
        AgentOutput::Thinking { text: format!("Reading your message and picking a tool: {}.", tool.tool) },
        AgentOutput::ToolExecuting {
            tool_call_id: tool_call_id.clone(),
            tool: tool.tool.into(),
            args: tool.args,
        },
        AgentOutput::ToolCompleted {
            tool_call_id,
            tool: tool.tool.into(),
            ok: tool.ok,
            result: tool.result,
            duration_ms: 0,
        },
    ];
    outputs.extend(chunks(&tool.answer).into_iter().map(|delta| AgentOutput::MessageChunk { delta }));
    outputs.push(AgentOutput::Completed { status: RunStatus::Ok, content: tool.answer, duration_ms: 0 });
    outputs
}

/// Fills in how long the tool call and the whole run took.
fn stamp(output: &mut AgentOutput, run_started: Instant, tool_started: &mut Instant) {
    match output {
        AgentOutput::ToolExecuting { .. } => *tool_started = Instant::now(),
        AgentOutput::ToolCompleted { duration_ms, .. } => {
            *duration_ms = tool_started.elapsed().as_millis() as u64
        }
        AgentOutput::Completed { duration_ms, .. } => *duration_ms = run_started.elapsed().as_millis() as u64,
        _ => {}
    }
}

impl Handler<StartRun> for DemoAgent {
    type Result = ();

    fn handle(&mut self, msg: StartRun, ctx: &mut Self::Context) {
        let StartRun { run, sink, .. } = msg;
        let delay = self.step_delay;
        let run_id = run.run_id.clone();
        let slow = self.slow.applies_to(&run.user_id).then_some(self.slow.block);
        let finished = run_id.clone();
        let agent = self.name.clone();
        let key = run_id.clone();
        let work = async move {
            let started = Instant::now();
            // The tool runs on the blocking pool: an expensive step (a big expression, or the
            // rehearsed slow step) holds up its own run only, never this actor's other runs.
            let planned = actix_web::rt::task::spawn_blocking(move || {
                if let Some(block) = slow {
                    std::thread::sleep(block);
                }
                plan(&run, &agent)
            });
            let Ok(outputs) = planned.await else {
                let output = AgentOutput::Error {
                    code: "agent_failed".into(),
                    message: "the demo agent's tool failed".into(),
                };
                sink.do_send(AgentEvent { run_id, output, turn: None, ag_ui: Vec::new(), details: None });
                return;
            };
            let mut tool_started = started;
            for mut output in outputs {
                if !delay.is_zero() {
                    actix_web::rt::time::sleep(delay).await;
                }
                stamp(&mut output, started, &mut tool_started);
                sink.do_send(AgentEvent {
                    run_id: run_id.clone(),
                    output,
                    turn: None,
                    ag_ui: Vec::new(),
                    details: None,
                });
            }
        };
        let handle = ctx.spawn(work.into_actor(self).map(move |_, agent, _| {
            agent.runs.remove(&finished);
        }));
        self.runs.insert(key, handle);
    }
}

impl Handler<StopRun> for DemoAgent {
    type Result = ();

    fn handle(&mut self, msg: StopRun, ctx: &mut Self::Context) {
        if let Some(handle) = self.runs.remove(&msg.run_id) {
            ctx.cancel_future(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_arithmetic_in_prose() {
        assert_eq!(find_arithmetic("what is 12 * (3 + 4)?").as_deref(), Some("12 * (3 + 4)"));
        assert_eq!(find_arithmetic("2+2").as_deref(), Some("2+2"));
        assert_eq!(find_arithmetic("hello there"), None);
        assert_eq!(find_arithmetic("call me at 555-1234"), Some("555-1234".into()));
        assert_eq!(find_arithmetic("chapter 7 is good"), None);
    }

    #[test]
    fn calculator_and_word_count() {
        let calc = choose_tool("what is 12 * (3 + 4)?");
        assert_eq!((calc.tool, calc.ok), ("calculator", true));
        assert_eq!(calc.result, json!({"value": "84"}));
        let count = choose_tool("three little words");
        assert_eq!(count.tool, "word_count");
        assert_eq!(count.result, json!({"words": 3, "characters": 18}));
        let broken = choose_tool("what is 1 / 0 ?");
        assert_eq!((broken.tool, broken.ok), ("calculator", false));
    }

    #[test]
    fn a_run_is_well_formed() {
        let run = RunRequest {
            run_id: "r_0123456789".into(),
            user_id: "u".into(),
            thread_id: "t".into(),
            message_id: "m_1".into(),
            client_msg_id: None,
            content: "how are you".into(),
            client: Default::default(),
            answers: Default::default(),
            conversation: Default::default(),
            forward_ag_ui: false,
        };
        let outputs = plan(&run, "demo");
        assert!(matches!(outputs[0], AgentOutput::Started { .. }));
        assert!(matches!(outputs[1], AgentOutput::Thinking { .. }));
        assert!(matches!(outputs[2], AgentOutput::ToolExecuting { .. }));
        assert!(matches!(outputs[3], AgentOutput::ToolCompleted { ok: true, .. }));
        let chunks: String = outputs
            .iter()
            .filter_map(|o| match o {
                AgentOutput::MessageChunk { delta } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert!(outputs.iter().filter(|o| matches!(o, AgentOutput::MessageChunk { .. })).count() >= 3);
        match outputs.last().unwrap() {
            AgentOutput::Completed { status: RunStatus::Ok, content, .. } => assert_eq!(content, &chunks),
            other => panic!("last output {other:?}"),
        }
        assert_eq!(outputs.iter().filter(|o| o.kind().is_terminal()).count(), 1);
    }
}
