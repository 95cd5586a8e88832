//! Thread conversations (docs/agents.md, "What the agent receives"): what an AG-UI agent is sent as
//! `messages` and `state`. AG-UI agents are stateless per request, so the conversation lives
//! beside the user's stream, behind the broker seam, and follows the stream wherever it is kept.
//!
//! Everything here grows with user messages and with what the agent answers, so it is bounded
//! three ways: `agent.history_messages` per thread (oldest first out), `agent.threads_per_user`
//! (least recently used thread first out), and `agent.history_bytes_per_user` across the user's
//! threads (oldest messages of the least recently used thread first out).

use std::collections::VecDeque;

use serde_json::value::RawValue;

/// The caps of one user's conversations.
#[derive(Clone, Copy, Debug)]
pub struct ThreadLimits {
    pub messages_per_thread: usize,
    pub threads_per_user: usize,
    pub bytes_per_user: usize,
}

/// A thread's conversation: AG-UI messages (`{"id","role","content",...}`) oldest first, and the
/// thread's last state (`None` until an agent set one).
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    pub messages: Vec<Box<RawValue>>,
    pub state: Option<Box<RawValue>>,
}

struct Thread {
    id: String,
    messages: VecDeque<Box<RawValue>>,
    state: Option<Box<RawValue>>,
    bytes: usize,
}

/// One user's threads, most recently used last.
#[derive(Default)]
pub struct Threads {
    threads: Vec<Thread>,
    bytes: usize,
}

impl Threads {
    /// Adds a turn to `thread` (its messages; its state when it has one) and answers the thread's
    /// conversation afterwards, within the caps.
    pub fn converse(&mut self, thread_id: &str, turn: Conversation, limits: ThreadLimits) -> Conversation {
        let mut thread = match self.threads.iter().position(|t| t.id == thread_id) {
            Some(at) => self.threads.remove(at),
            None => Thread { id: thread_id.to_owned(), messages: VecDeque::new(), state: None, bytes: 0 },
        };
        self.bytes -= thread.bytes;
        for message in turn.messages {
            thread.bytes += message.get().len();
            thread.messages.push_back(message);
        }
        if let Some(state) = turn.state {
            thread.bytes -= thread.state.as_ref().map_or(0, |s| s.get().len());
            thread.bytes += state.get().len();
            thread.state = Some(state);
        }
        while thread.messages.len() > limits.messages_per_thread {
            pop_oldest(&mut thread);
        }
        self.bytes += thread.bytes;
        self.threads.push(thread);
        while self.threads.len() > limits.threads_per_user {
            let gone = self.threads.remove(0);
            self.bytes -= gone.bytes;
        }
        // Over the byte cap: the least recently used threads give up their oldest messages
        // first; the thread just used keeps at least its newest message.
        let mut at = 0;
        while self.bytes > limits.bytes_per_user && at < self.threads.len() {
            let last = at + 1 == self.threads.len();
            let thread = &mut self.threads[at];
            if thread.messages.len() > usize::from(last) {
                let before = thread.bytes;
                pop_oldest(thread);
                self.bytes -= before - thread.bytes;
            } else if !last {
                let gone = self.threads.remove(at);
                self.bytes -= gone.bytes;
            } else {
                at += 1;
            }
        }
        let Some(thread) = self.threads.iter().find(|t| t.id == thread_id) else {
            return Conversation::default();
        };
        Conversation { messages: thread.messages.iter().cloned().collect(), state: thread.state.clone() }
    }

    /// Bytes of all conversations kept for the user.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

fn pop_oldest(thread: &mut Thread) {
    if let Some(oldest) = thread.messages.pop_front() {
        thread.bytes -= oldest.get().len();
    }
}

impl Conversation {
    /// A conversation of one message, `{"id","role","content"}`.
    pub fn message(id: &str, role: &str, content: &str) -> Conversation {
        let value = serde_json::json!({"id": id, "role": role, "content": content});
        Conversation { messages: vec![raw(&value)], state: None }
    }

    /// Bytes of the conversation's JSON.
    #[cfg(test)]
    pub fn len_bytes(&self) -> usize {
        self.messages.iter().map(|m| m.get().len()).sum::<usize>()
            + self.state.as_ref().map_or(0, |s| s.get().len())
    }
}

/// A JSON value as raw JSON (serialising a `Value` cannot fail).
pub fn raw(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ThreadLimits =
        ThreadLimits { messages_per_thread: 3, threads_per_user: 2, bytes_per_user: 10_000 };

    fn ids(conversation: &Conversation) -> Vec<String> {
        conversation
            .messages
            .iter()
            .map(|m| {
                serde_json::from_str::<serde_json::Value>(m.get()).unwrap()["id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_messages_of_a_thread() {
        let mut threads = Threads::default();
        for i in 0..5 {
            threads.converse("t", Conversation::message(&format!("m{i}"), "user", "hi"), LIMITS);
        }
        let now = threads.converse("t", Conversation::default(), LIMITS);
        assert_eq!(ids(&now), ["m2", "m3", "m4"]);
        assert_eq!(threads.bytes(), now.len_bytes());
    }

    #[test]
    fn forgets_the_least_recently_used_thread() {
        let mut threads = Threads::default();
        threads.converse("a", Conversation::message("a1", "user", "x"), LIMITS);
        threads.converse("b", Conversation::message("b1", "user", "x"), LIMITS);
        threads.converse("a", Conversation::message("a2", "user", "x"), LIMITS);
        threads.converse("c", Conversation::message("c1", "user", "x"), LIMITS);
        assert_eq!(ids(&threads.converse("a", Conversation::default(), LIMITS)), ["a1", "a2"]);
        assert!(threads.converse("b", Conversation::default(), LIMITS).messages.is_empty());
    }

    #[test]
    fn the_byte_cap_takes_old_messages_of_old_threads_first() {
        let limits = ThreadLimits { messages_per_thread: 100, threads_per_user: 10, bytes_per_user: 300 };
        let mut threads = Threads::default();
        let long = "x".repeat(100);
        threads.converse("old", Conversation::message("o1", "user", &long), limits);
        threads.converse("new", Conversation::message("n1", "user", &long), limits);
        threads.converse("new", Conversation::message("n2", "user", &long), limits);
        assert!(threads.bytes() <= 300);
        assert_eq!(ids(&threads.converse("new", Conversation::default(), limits)), ["n1", "n2"]);
        // One message larger than the cap on its own is still the thread's newest.
        let huge = "y".repeat(1000);
        let now = threads.converse("new", Conversation::message("n3", "user", &huge), limits);
        assert_eq!(ids(&now), ["n3"]);
    }

    #[test]
    fn state_is_replaced_and_counted() {
        let mut threads = Threads::default();
        let turn = Conversation { messages: vec![], state: Some(raw(&serde_json::json!({"n": 1}))) };
        threads.converse("t", turn, LIMITS);
        let turn = Conversation { messages: vec![], state: Some(raw(&serde_json::json!({"n": 22}))) };
        let now = threads.converse("t", turn, LIMITS);
        assert_eq!(now.state.unwrap().get(), r#"{"n":22}"#);
        assert_eq!(threads.bytes(), 8);
    }
}
