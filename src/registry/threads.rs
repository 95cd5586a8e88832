//! Threads changing under the threads API or the store's caps (docs/conversations.md): every tab
//! of the user hears of it on the stream (`thread_updated`, `thread_deleted`), and a thread
//! deleted with a run in progress has that run cancelled.

use actix::prelude::*;
use log::{info, warn};
use serde_json::json;

use super::{Registry, ThreadChanged};
use crate::broker::NewEvent;
use crate::protocol::{now_ms, EventKind};

/// How often `store.retention_days` is applied.
pub(super) const RETENTION_SWEEP: std::time::Duration = std::time::Duration::from_secs(3600);

impl Registry {
    /// `store.retention_days`: threads untouched that long are deleted, and their users' tabs
    /// told (each on its user's shard). One shard of each process does it; with several nodes on
    /// one database each one's sweep finds what the others left.
    pub(super) fn expire_threads(&mut self, ctx: &mut Context<Self>) {
        let cutoff = now_ms().saturating_sub(self.settings.retention_days.saturating_mul(86_400_000));
        let expired = self.settings.store.expire(cutoff);
        ctx.spawn(actix::fut::wrap_future(expired).map(|answer, registry: &mut Registry, _| match answer {
            Ok(gone) => {
                for (user_id, thread_id) in gone {
                    let changed = ThreadChanged { user_id, thread_id, title: None, cancel: None };
                    match &registry.shards {
                        Some(shards) => shards.for_user(&changed.user_id).do_send(changed),
                        None => {
                            warn!("store.retention_days: shards not known yet; {} not told", changed.user_id)
                        }
                    }
                }
            }
            Err(e) => warn!("store.retention_days: expired threads not deleted: {e}"),
        }));
    }

    /// Publishes `thread_updated` (a title: the thread was made or renamed) or `thread_deleted`.
    pub(super) fn thread_changed(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        thread_id: &str,
        title: Option<&str>,
    ) {
        let (kind, payload) = match title {
            Some(title) => (
                EventKind::ThreadUpdated,
                json!({"thread_id": thread_id, "title": title, "updated_at": now_ms()}),
            ),
            None => (EventKind::ThreadDeleted, json!({"thread_id": thread_id})),
        };
        let event = NewEvent { kind, thread_id, run_id: None, payload: &payload };
        self.publish_one(ctx, user_id, event);
    }
}

impl Handler<ThreadChanged> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ThreadChanged, ctx: &mut Self::Context) {
        let ThreadChanged { user_id, thread_id, title, cancel } = msg;
        if let Some(run_id) = cancel {
            if self.cancel_run(ctx, &user_id, &run_id) {
                info!("run {run_id}: cancelled, its thread was deleted");
            } else {
                // Run by another node sharing the broker, if by any.
                drop(self.broker.cancel_elsewhere(&user_id, &run_id));
            }
        }
        self.thread_changed(ctx, &user_id, &thread_id, title.as_deref());
    }
}
