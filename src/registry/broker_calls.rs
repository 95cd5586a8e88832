//! Acting on the broker's and the store's answers: never waiting for them, and never out of
//! order for a user (each in a queue of its own per user).
//!
//! Each call's continuation waits in its user's queue until every earlier call of that user has
//! been acted on, so a user's events reach sessions in seq order and a session's replay is
//! acted on after every append made before it, however late a remote broker answers. An answer
//! that is already there when the queue is empty (the in-memory broker's, always) is acted on
//! at once, in the same registry step, as if the broker were part of the registry.
//!
//! A continuation is a named step of the registry (`runs.rs`: `on_seen`, `on_stored`,
//! `on_submitted`, `on_conversation`, `on_run_stored`), which may itself make a call: the sessions that step handed frames to are
//! woken once the outermost continuation has returned (`acting`), never in the middle of one.

use std::collections::{HashMap, VecDeque};

use actix::prelude::*;
use futures_util::FutureExt;

use super::Registry;
use std::future::Future;
use std::pin::Pin;

type Continuation = Box<dyn FnOnce(&mut Registry, &mut Context<Registry>)>;

/// Which of a user's queues a call waits in: the broker's or the store's.
#[derive(Clone, Copy)]
enum Queue {
    Broker,
    Store,
}

/// One user's calls, oldest first; a slot is filled when its answer arrives. Tickets count up
/// from the front's, so an answer finds its slot by subtraction.
pub(super) struct CallQueue<C = Continuation> {
    /// The ticket of `waiting[0]`.
    front: u64,
    waiting: VecDeque<Option<C>>,
}

impl<C> Default for CallQueue<C> {
    fn default() -> Self {
        CallQueue { front: 0, waiting: VecDeque::new() }
    }
}

impl<C> CallQueue<C> {
    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A slot for a call just made: its ticket.
    fn reserve(&mut self) -> u64 {
        self.waiting.push_back(None);
        self.front + self.waiting.len() as u64 - 1
    }

    /// The answer to `ticket` arrived.
    fn fill(&mut self, ticket: u64, continuation: C) {
        let slot = ticket.checked_sub(self.front).and_then(|i| self.waiting.get_mut(i as usize));
        if let Some(slot) = slot {
            *slot = Some(continuation);
        }
    }

    /// The oldest call's continuation, once it is answered; `None` while it is not (or nothing
    /// waits), so later answers wait behind it.
    fn next_ready(&mut self) -> Option<C> {
        if !matches!(self.waiting.front(), Some(Some(_))) {
            return None;
        }
        self.front += 1;
        self.waiting.pop_front().flatten()
    }
}

impl Registry {
    /// Runs `then` with the broker's answer to `call`, after its answers to the user's earlier
    /// calls.
    pub(super) fn when<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        call: Pin<Box<dyn Future<Output = R>>>,
        then: impl FnOnce(&mut Registry, R, &mut Context<Registry>) + 'static,
    ) {
        self.when_in(Queue::Broker, ctx, user_id, call, then)
    }

    /// Runs `then` with the store's answer to `call` (`crate::store`), after its answers to the
    /// user's earlier store calls: a user's messages are stored, then echoed and acked, in the
    /// order they came. The store's calls wait in a queue of their own, so a slow or absent
    /// database never holds up the user's stream (a run goes on streaming meanwhile).
    pub(super) fn when_stored<R: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        call: Pin<Box<dyn Future<Output = R>>>,
        then: impl FnOnce(&mut Registry, R, &mut Context<Registry>) + 'static,
    ) {
        self.when_in(Queue::Store, ctx, user_id, call, then)
    }

    fn queues(&mut self, queue: Queue) -> &mut HashMap<String, CallQueue> {
        match queue {
            Queue::Broker => &mut self.calls,
            Queue::Store => &mut self.store_calls,
        }
    }

    fn when_in<R: 'static>(
        &mut self,
        queue: Queue,
        ctx: &mut Context<Self>,
        user_id: &str,
        mut call: Pin<Box<dyn Future<Output = R>>>,
        then: impl FnOnce(&mut Registry, R, &mut Context<Registry>) + 'static,
    ) {
        let queue_empty = self.queues(queue).get(user_id).is_none_or(CallQueue::is_empty);
        if queue_empty {
            if let Some(answer) = (&mut call).now_or_never() {
                return self.acting(ctx, |registry, ctx| then(registry, answer, ctx));
            }
        }
        let ticket = self.queues(queue).entry(user_id.to_owned()).or_default().reserve();
        let user_id = user_id.to_owned();
        ctx.spawn(call.into_actor(self).map(move |answer, registry, ctx| {
            if let Some(waiting) = registry.queues(queue).get_mut(&user_id) {
                waiting.fill(ticket, Box::new(move |registry, ctx| then(registry, answer, ctx)));
            }
            registry.acting(ctx, |registry, ctx| registry.run_answered(queue, &user_id, ctx));
        }));
    }

    /// Runs a continuation; the outermost one wakes the sessions its steps handed frames to
    /// once it has returned, so a publisher hears before the sessions' socket writes stand
    /// between its answer and its next publish on a worker thread.
    fn acting(&mut self, ctx: &mut Context<Self>, step: impl FnOnce(&mut Registry, &mut Context<Registry>)) {
        self.acting += 1;
        step(self, ctx);
        self.acting -= 1;
        if self.acting == 0 {
            self.wake_sessions();
        }
    }

    /// Acts on the user's answered calls from the oldest, stopping at the first still unanswered.
    fn run_answered(&mut self, which: Queue, user_id: &str, ctx: &mut Context<Self>) {
        loop {
            let Some(queue) = self.queues(which).get_mut(user_id) else { return };
            let Some(continuation) = queue.next_ready() else {
                if queue.is_empty() {
                    self.queues(which).remove(user_id);
                    if self.calls.is_empty() && self.store_calls.is_empty() {
                        // A shutdown may be waiting for the broker's last answers.
                        self.advance_shutdown(ctx);
                    }
                }
                return;
            };
            continuation(self, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CallQueue;

    fn drain(queue: &mut CallQueue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| queue.next_ready()).collect()
    }

    #[test]
    fn answers_out_of_order_are_acted_on_in_call_order() {
        let mut queue = CallQueue::default();
        let (a, b, c) = (queue.reserve(), queue.reserve(), queue.reserve());
        queue.fill(c, "c");
        assert!(drain(&mut queue).is_empty(), "c waits for a and b");
        queue.fill(b, "b");
        assert!(drain(&mut queue).is_empty(), "b and c wait for a");
        queue.fill(a, "a");
        assert_eq!(drain(&mut queue), ["a", "b", "c"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn tickets_go_on_counting_after_the_front_has_been_taken() {
        let mut queue = CallQueue::default();
        let a = queue.reserve();
        queue.fill(a, "a");
        assert_eq!(drain(&mut queue), ["a"]);
        let (b, c) = (queue.reserve(), queue.reserve());
        assert_eq!((b, c), (1, 2));
        queue.fill(c, "c");
        queue.fill(b, "b");
        assert_eq!(drain(&mut queue), ["b", "c"]);
    }

    #[test]
    fn a_ticket_that_is_not_waiting_fills_nothing() {
        let mut queue = CallQueue::default();
        let a = queue.reserve();
        queue.fill(a + 5, "stray");
        assert!(drain(&mut queue).is_empty());
        queue.fill(a, "a");
        assert_eq!(drain(&mut queue), ["a"]);
    }
}
