//! Acting on the broker's answers: never waiting for them, and never out of order for a user.
//!
//! Each call's continuation waits in its user's queue until every earlier call of that user has
//! been acted on, so a user's events reach sessions in seq order and a session's replay is
//! acted on after every append made before it, however late a remote broker answers. An answer
//! that is already there when the queue is empty (the in-memory broker's, always) is acted on
//! at once, in the same registry step, as if the broker were part of the registry.

use std::collections::VecDeque;

use actix::prelude::*;
use futures_util::FutureExt;

use super::Registry;
use crate::broker::{BrokerError, Call};

type Continuation = Box<dyn FnOnce(&mut Registry, &mut Context<Registry>)>;

/// One user's calls, oldest first; a slot is filled when its answer arrives.
#[derive(Default)]
pub(super) struct CallQueue {
    next_ticket: u64,
    waiting: VecDeque<(u64, Option<Continuation>)>,
}

impl Registry {
    /// Runs `then` with the answer to `call`, after the answers to the user's earlier calls.
    pub(super) fn when<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        mut call: Call<T>,
        then: impl FnOnce(&mut Registry, Result<T, BrokerError>, &mut Context<Registry>) + 'static,
    ) {
        let queue_empty = self.calls.get(user_id).is_none_or(|q| q.waiting.is_empty());
        if queue_empty {
            if let Some(answer) = (&mut call).now_or_never() {
                then(self, answer, ctx);
                // After the continuation, so a publisher hears before the sessions' socket
                // writes stand between its answer and its next publish on a worker thread.
                self.wake_sessions();
                return;
            }
        }
        let queue = self.calls.entry(user_id.to_owned()).or_default();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push_back((ticket, None));
        let user_id = user_id.to_owned();
        ctx.spawn(call.into_actor(self).map(move |answer, registry, ctx| {
            if let Some(slot) = registry
                .calls
                .get_mut(&user_id)
                .and_then(|q| q.waiting.iter_mut().find(|(t, _)| *t == ticket))
            {
                slot.1 = Some(Box::new(move |registry, ctx| then(registry, answer, ctx)));
            }
            registry.run_answered(&user_id, ctx);
            registry.wake_sessions();
        }));
    }

    /// Acts on the user's answered calls from the oldest, stopping at the first still unanswered.
    fn run_answered(&mut self, user_id: &str, ctx: &mut Context<Self>) {
        loop {
            let Some(queue) = self.calls.get_mut(user_id) else { return };
            let next = match queue.waiting.front_mut() {
                Some((_, continuation)) if continuation.is_some() => continuation.take(),
                Some(_) => return,
                None => {
                    self.calls.remove(user_id);
                    return;
                }
            };
            queue.waiting.pop_front();
            if let Some(continuation) = next {
                continuation(self, ctx);
            }
        }
    }
}
