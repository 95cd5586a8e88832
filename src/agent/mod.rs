//! The seam between the registry and agent runtimes.
//!
//! The registry starts and stops runs through an [`AgentHandle`] (two typed messages) and hears
//! back [`AgentEvent`]s; it never knows which runtime it talks to. The built-in `demo` runtime is
//! one implementation; an HTTP/webhook agent or remote agent workers would be others, added
//! beside it without touching sessions or fan-out.

pub mod demo;

use actix::prelude::*;

use crate::config::{AgentConfig, AgentKind, FaultsConfig};
use crate::protocol::AgentOutput;

/// What a run is about: enough for any runtime to answer the message.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub run_id: String,
    pub user_id: String,
    pub message_id: String,
    pub content: String,
}

/// Start a run; the runtime reports each step to `sink`, ending with one terminal output.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartRun {
    pub run: RunRequest,
    pub sink: Recipient<AgentEvent>,
}

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
}

/// How the registry reaches the configured runtime.
#[derive(Clone)]
pub struct AgentHandle {
    pub name: &'static str,
    pub start: Recipient<StartRun>,
    pub stop: Recipient<StopRun>,
}

/// Starts the runtime `agent.kind` names on an arbiter (thread) of its own: agent work never
/// runs on the registry's thread, so a slow agent cannot hold up setups and fan-out.
pub fn start_runtime(config: &AgentConfig, faults: &FaultsConfig) -> AgentHandle {
    let arbiter = Arbiter::new();
    match config.kind {
        AgentKind::Demo => {
            let agent = demo::DemoAgent::new(
                std::time::Duration::from_millis(config.step_delay_ms),
                config.max_queued_runs,
                demo::SlowStep::from_faults(faults),
            );
            let addr = demo::DemoAgent::start_in_arbiter(&arbiter.handle(), move |_| agent);
            AgentHandle { name: "demo", start: addr.clone().recipient(), stop: addr.recipient() }
        }
    }
}
