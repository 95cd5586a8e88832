//! AG-UI clients (`POST /ag-ui`, docs/ag-ui.md): a user message that arrives over HTTP
//! instead of a session. It goes onto the user's stream like any other (every tab sees it and
//! its run), and the run's steps also go to the one client that asked, as long as it reads.

use actix::prelude::*;
use log::{info, warn};
use serde_json::Value;

use super::runs::{Origin, Pending};
use super::{weight, CancelRunOf, Registry, RunStep, StartHttpRun};
use crate::protocol::{AgentOutput, UserMessage};

impl Handler<StartHttpRun> for Registry {
    type Result = ();

    fn handle(&mut self, msg: StartHttpRun, ctx: &mut Self::Context) {
        let message = UserMessage {
            thread_id: msg.thread_id,
            content: msg.content,
            client_msg_id: None,
            client: msg.client,
            answers: msg.answers,
            id: msg.message_id,
        };
        let origin = Origin::Http { answer: msg.answer, steps: msg.steps, run_id: msg.run_id };
        self.submit(ctx, Pending { origin, user_id: msg.user_id, message });
    }
}

impl Handler<CancelRunOf> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CancelRunOf, ctx: &mut Self::Context) {
        if self.cancel_run(ctx, &msg.user_id, &msg.run_id) {
            info!("run {}: cancelled, its AG-UI client went away", msg.run_id);
        }
    }
}

impl Registry {
    /// Hands a run's step to the AG-UI client following it, if any. A client that has not
    /// taken the steps already given (their bytes past `limits.max_outbound_bytes`, or its
    /// channel full) no longer follows the run: its response ends, and the run goes on for the
    /// user's sessions.
    pub(super) fn observe(&mut self, run_id: &str, output: AgentOutput, ag_ui: Vec<Value>) {
        let Some(follower) = self.observers.get_mut(run_id) else { return };
        let bytes = weight(&output, &ag_ui);
        if !follower.hand(RunStep { output, ag_ui, bytes }, self.settings.max_outbound_bytes) {
            warn!("run {run_id}: its AG-UI client does not keep up; it no longer follows the run");
            self.observers.remove(run_id);
        }
    }
}
