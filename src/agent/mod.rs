//! The seam between the registry and agent runtimes.
//!
//! The registry starts and stops runs through an [`AgentHandle`] (two typed messages) and hears
//! back [`AgentEvent`]s; it never knows which runtime it talks to. Runtimes: the built-in `demo`,
//! and `ag_ui`, which puts any AG-UI agent behind agentwire (docs/agents.md). `agent.kind = "none"`
//! has no runtime at all: the registry starts no runs.

pub mod ag_ui;
pub mod demo;

use std::sync::Arc;

use actix::prelude::*;

use crate::config::{AgentConfig, AgentKind, Config};
use crate::metrics::Metrics;
use crate::protocol::AgentOutput;
use crate::store::Conversation;

/// What a run is about: enough for any runtime to answer the message.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub run_id: String,
    pub user_id: String,
    pub thread_id: String,
    pub message_id: String,
    pub client_msg_id: Option<String>,
    pub content: String,
    /// What the client gave for the agent: tools, context, state (docs/agents.md, v2).
    pub client: crate::protocol::ClientInput,
    /// What the message answers: an interrupt's answer goes to the agent as `resume`.
    pub answers: crate::protocol::Answers,
    /// The thread's conversation, ending with this message, and its state; empty unless the
    /// runtime asked for it ([`AgentHandle::conversation`]).
    pub conversation: Conversation,
    /// An AG-UI client follows the run (`POST /ag-ui`): the runtime hands over the original
    /// AG-UI events with each step, so they pass through to that client unchanged.
    pub forward_ag_ui: bool,
}

/// Start a run; the runtime reports each step to `sink`, ending with one terminal output.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartRun {
    pub run: RunRequest,
    pub sink: Recipient<AgentEvent>,
    /// Answered once every step sent before it is handled: a runtime's backpressure.
    pub checkpoints: Recipient<Checkpoint>,
}

/// A no-op the registry answers in mailbox order (see [`StartRun::checkpoints`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Checkpoint;

/// Stop a run. The registry has already ended it on the stream; the runtime only stops working.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopRun {
    pub run_id: String,
}

/// One step of a run, from a runtime to the registry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct AgentEvent {
    pub run_id: String,
    pub output: AgentOutput,
    /// With a run's successful end: what the run adds to the thread's conversation (the agent's
    /// messages, the thread's new state), for the registry to store (docs/conversations.md).
    pub turn: Option<Conversation>,
    /// With [`RunRequest::forward_ag_ui`]: the AG-UI events, as received, that this step stands
    /// for (with those before it that mapped to nothing, such as `TEXT_MESSAGE_START`).
    pub ag_ui: Vec<serde_json::Value>,
    /// With a run's end: what the agent said of it beyond the mapping, added to the terminal
    /// event's payload (`agent_code` of `RUN_ERROR`, `result` and `usage` of `RUN_FINISHED`;
    /// docs/agents.md).
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How the registry reaches the configured runtime.
#[derive(Clone)]
pub struct AgentHandle {
    /// The `agent` of `agent_started`.
    pub name: String,
    pub start: Recipient<StartRun>,
    pub stop: Recipient<StopRun>,
    /// The runtime is sent the thread's conversation with each run (and keeps it up to date).
    pub conversation: bool,
    /// `agent.max_concurrent_runs`, for runtimes whose runs hold upstream resources.
    pub max_concurrent_runs: Option<usize>,
}

/// Starts the runtime `agent.kind` names on an arbiter (thread) of its own: agent work never
/// runs on the registry's thread, so a slow agent cannot hold up setups and fan-out. `None` for
/// `kind = "none"`.
pub fn start_runtime(config: &Config, metrics: &Arc<Metrics>) -> Option<AgentHandle> {
    let agent: &AgentConfig = &config.agent;
    let arbiter = Arbiter::new();
    let name = agent.display_name();
    match agent.kind {
        AgentKind::Demo => {
            let demo = demo::DemoAgent::new(
                name.clone(),
                std::time::Duration::from_millis(agent.step_delay_ms),
                agent.max_queued_runs.get(),
                demo::SlowStep::from_faults(&config.faults),
            );
            let addr = demo::DemoAgent::start_in_arbiter(&arbiter.handle(), move |_| demo);
            Some(AgentHandle {
                name,
                start: addr.clone().recipient(),
                stop: addr.recipient(),
                conversation: false,
                max_concurrent_runs: None,
            })
        }
        AgentKind::AgUi => {
            let upstream = ag_ui::Upstream::new(config, Arc::clone(metrics));
            let mailbox = agent.max_queued_runs.get();
            let addr = ag_ui::AgUiAgent::start_in_arbiter(&arbiter.handle(), move |_| {
                ag_ui::AgUiAgent::new(upstream, mailbox)
            });
            Some(AgentHandle {
                name,
                start: addr.clone().recipient(),
                stop: addr.recipient(),
                conversation: true,
                max_concurrent_runs: Some(agent.max_concurrent_runs.get()),
            })
        }
        AgentKind::None => None,
    }
}
