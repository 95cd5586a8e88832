//! What a broker shared by several processes hears from the others (`[broker] kind = "redis"`).
//! A batch of events is acted on in its user's call order, after the answers this process was
//! already waiting for, so a session's replay and the live events after it meet without a gap or a
//! repeat (`fanout.rs::live_from`); a batch of another epoch means the stream was made anew
//! (Redis restarted empty, or the stream expired), and the user's sessions here are sent to
//! resume, which tells their clients to reload. A cancel is acted on at once: it asks about a
//! run of this process, not about the order of a stream; "reconnected" asks every local user's
//! stream for what was missed, each read queued in its user's call order like any call.

use std::time::Instant;

use actix::prelude::*;
use log::{error, info, warn};

use super::{Registry, ToSession};
use crate::broker::{Call, RemoteBatch};

impl StreamHandler<RemoteBatch> for Registry {
    fn handle(&mut self, batch: RemoteBatch, ctx: &mut Self::Context) {
        match batch {
            RemoteBatch::Events { user, epoch, events } => {
                self.metrics.remote_batches.inc();
                let now: Call<()> = Box::pin(std::future::ready(Ok(())));
                let user_id = user.clone();
                self.when(ctx, &user_id, now, move |registry, _, ctx| {
                    let Some(local) = registry.local.get(user.as_str()) else { return };
                    if local.epoch.as_deref().is_some_and(|known| known != epoch) {
                        return registry.stream_renewed(&user, &epoch);
                    }
                    registry.deliver_events(ctx, &user, &events, Instant::now(), true);
                });
            }
            RemoteBatch::Cancel { user, run_id } => {
                if self.cancel_run(ctx, &user, &run_id) {
                    info!("run {run_id}: cancelled from another node");
                }
            }
            RemoteBatch::Fenced => self.fenced(ctx),
            RemoteBatch::Reconnected => {
                self.metrics.broker_reconnects.inc();
                let behind: Vec<(String, u64)> = self
                    .local
                    .iter()
                    .filter(|(_, u)| !u.sessions.is_empty())
                    .filter_map(|(user, u)| Some((user.to_string(), u.delivered? + 1)))
                    .collect();
                info!("broker: back; filling what {} users here may have missed", behind.len());
                for (user, from) in behind {
                    self.fill(ctx, &user, from);
                }
            }
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        warn!("broker: the stream of events from other processes ended");
    }
}

impl Registry {
    /// The user's stream was made anew under another epoch: the sessions here hold seqs of the
    /// old one, so they are closed with 1012 to resume (their clients learn `complete: false`).
    fn stream_renewed(&mut self, user_id: &str, epoch: &str) {
        warn!("user {user_id}: the stream has a new epoch {epoch}; sessions here resume");
        self.resume_elsewhere(user_id);
    }

    /// This node was fenced: its runs were ended elsewhere (`node_lost`) and Redis refuses
    /// their events. Every session here is closed with 1012, to resume on another node, and the
    /// process stops a moment later, to be started again as a new generation.
    fn fenced(&mut self, ctx: &mut Context<Self>) {
        // A session registered after this is told to close at once, as in a shutdown.
        if std::mem::replace(&mut self.shutting_down, true) {
            return;
        }
        error!(
            "this node was fenced: {} sessions closed with 1012; the process stops",
            self.connections.len()
        );
        let ids: Vec<_> = self.connections.keys().copied().collect();
        for id in ids {
            self.tell(id, ToSession::Shutdown);
        }
        ctx.run_later(std::time::Duration::from_millis(500), |_, _| std::process::exit(crate::EXIT_FENCED));
    }

    /// The user's sessions here can no longer be brought up to date in place: each is closed
    /// with 1012, to resume from its last seq and be told what it missed.
    pub(super) fn resume_elsewhere(&mut self, user_id: &str) {
        let Some(local) = self.local.get_mut(user_id) else { return };
        local.epoch = None;
        local.delivered = None;
        let sessions = local.sessions.clone();
        for id in sessions {
            self.tell(id, ToSession::Shutdown);
        }
    }
}
