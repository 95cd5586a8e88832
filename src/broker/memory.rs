//! The broker of a single process: users' streams in this process's memory, every call
//! answered at once. The first implementation of [`Broker`], and the default.

use std::time::Instant;

use super::users::{UserLimits, Users};
use super::{Attached, Broker, Call, NewEvent, Published, ResumeRequest, SeenMessage, Stored, Submitted};
use crate::base::ConnectionId;
use crate::protocol::{now_ms, Event};

pub struct MemoryBroker {
    users: Users,
    /// Reused to serialise events, so each costs one exact-size allocation.
    scratch: Vec<u8>,
}

fn ready<T: 'static>(value: T) -> Call<T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl MemoryBroker {
    pub fn new(limits: UserLimits) -> MemoryBroker {
        MemoryBroker { users: Users::new(limits), scratch: Vec::new() }
    }

    fn append_now(&mut self, user_id: &str, events: &[NewEvent<'_>]) -> Vec<Stored> {
        let now = Instant::now();
        let user = self.users.entry(user_id);
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            let seq = user.stream.next_seq();
            let wire = Event {
                kind: event.kind,
                seq,
                ts: now_ms(),
                thread_id: event.thread_id,
                run_id: event.run_id,
                payload: event.payload,
            };
            stored.push(Stored { seq, frame: wire.to_frame(&mut self.scratch) });
        }
        // Section 6: an offline user's stream is kept for the TTL after its last event.
        if user.sessions.is_empty() {
            user.stream.idle_since = Some(now);
        }
        for event in &stored {
            self.users.keep(user_id, event.seq, event.frame.clone());
        }
        stored
    }
}

impl Broker for MemoryBroker {
    fn append(&mut self, user: &str, events: &[NewEvent<'_>]) -> Call<Vec<Stored>> {
        ready(self.append_now(user, events))
    }

    fn publish_once(&mut self, user: &str, key: &str, events: &[NewEvent<'_>]) -> Call<Published> {
        if let Some(seqs) = self.users.entry(user).published(key) {
            return ready(Published::Again(seqs.clone()));
        }
        let stored = self.append_now(user, events);
        let cap = self.users.limits().dedupe_per_user;
        self.users.entry(user).remember_published(
            key.to_owned(),
            stored.iter().map(|e| e.seq).collect(),
            cap,
        );
        ready(Published::New(stored))
    }

    fn submit(
        &mut self,
        user: &str,
        client_msg_id: Option<&str>,
        super::SubmitIds { message_id, run_id, attempt, .. }: super::SubmitIds<'_>,
        echo: &NewEvent<'_>,
    ) -> Call<Submitted> {
        if let Some(seen) = client_msg_id.and_then(|c| self.users.entry(user).seen(c)) {
            return ready(Submitted::Seen(seen.clone()));
        }
        let Some(stored) = self.append_now(user, std::slice::from_ref(echo)).pop() else {
            return Box::pin(std::future::ready(Err(super::BrokerError::Unexpected(
                "nothing was appended".into(),
            ))));
        };
        if let Some(client_msg_id) = client_msg_id {
            let seen = SeenMessage {
                message_id: message_id.to_owned(),
                run_id: run_id.to_owned(),
                attempt: attempt.to_owned(),
                seq: stored.seq,
                at: Instant::now(),
            };
            let cap = self.users.limits().dedupe_per_user;
            self.users.entry(user).remember(client_msg_id.to_owned(), seen, cap);
        }
        ready(Submitted::Appended(stored, None))
    }

    fn seen(&mut self, user: &str, client_msg_id: &str) -> Call<Option<SeenMessage>> {
        ready(self.users.get(user).and_then(|u| u.seen(client_msg_id)).cloned())
    }

    fn attach(&mut self, user: &str, resume: Option<&ResumeRequest>) -> Call<Attached> {
        let stream = &self.users.entry(user).stream;
        let replay = stream.replay(resume);
        ready(Attached {
            epoch: stream.epoch().to_owned(),
            last_seq: stream.last_seq(),
            info: replay.info,
            frames: replay.frames,
            runs: None,
        })
    }

    fn range(&mut self, user: &str, from_seq: u64) -> Call<Vec<Stored>> {
        let kept = self.users.get(user).map(|u| u.stream.from(from_seq)).unwrap_or_default();
        ready(kept.into_iter().map(|(seq, frame)| Stored { seq, frame }).collect())
    }

    fn admit(&mut self, user: &str, connection: ConnectionId, cap: usize) -> Call<bool> {
        let user = self.users.entry(user);
        if user.sessions.len() >= cap {
            return ready(false);
        }
        user.sessions.push(connection);
        user.stream.idle_since = None;
        ready(true)
    }

    fn leave(&mut self, user: &str, connection: ConnectionId) -> Call<()> {
        if let Some(user) = self.users.get_mut(user) {
            user.sessions.retain(|s| *s != connection);
            if user.sessions.is_empty() {
                user.stream.idle_since = Some(Instant::now());
            }
        }
        ready(())
    }

    fn interest(&mut self, _user: &str, _present: bool) {
        // One process: every event is appended here and delivered here; nothing comes from
        // elsewhere to subscribe to.
    }

    fn upkeep(&mut self) -> bool {
        self.users.forget_idle();
        self.users.shrink_if_oversized()
    }

    fn gauges(&self) -> (usize, usize) {
        (self.users.len(), self.users.history_bytes())
    }
}
