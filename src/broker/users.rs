//! The in-memory broker's table of users: each user's admitted sessions, stream and dedupe
//! memory, with a cap on every part of it that a client or a publisher can grow.
//!
//! Everything here grows with input from outside (a new user id in a token or a publish, an
//! event, a `client_msg_id`), so each has a count or byte bound and a rule for what goes first
//! when it is reached: the oldest history event (per user, then server-wide), the oldest
//! remembered `client_msg_id`, the longest-idle offline stream.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use log::{debug, info};

use super::stream::{HistoryLimits, UserStream};
use super::SeenMessage;
use crate::base::ConnectionId;

/// The caps of the table (`[history]`).
#[derive(Clone, Copy, Debug)]
pub struct UserLimits {
    pub history: HistoryLimits,
    /// `history.max_bytes`: all streams' history together.
    pub max_history_bytes: usize,
    pub max_users: usize,
    pub dedupe_per_user: usize,
    pub ttl: Duration,
}

/// The `client_msg_id`s of one user, at most `history.dedupe_per_user`, oldest forgotten first.
struct Dedupe {
    seen: HashMap<String, SeenMessage>,
    order: VecDeque<String>,
    /// Publishes by key (`Broker::publish_once`): their seqs, under the same cap.
    published: HashMap<String, Vec<u64>>,
    published_order: VecDeque<String>,
}

pub struct User {
    /// Connections holding one of the user's session slots (authenticated, not yet closing).
    pub sessions: Vec<ConnectionId>,
    pub stream: UserStream,
    dedupe: Dedupe,
    /// Tells this stream from an earlier one of the same user id in the server-wide order.
    generation: u64,
}

impl User {
    pub fn seen(&self, client_msg_id: &str) -> Option<&SeenMessage> {
        self.dedupe.seen.get(client_msg_id)
    }

    pub fn published(&self, key: &str) -> Option<&Vec<u64>> {
        self.dedupe.published.get(key)
    }

    pub fn remember_published(&mut self, key: String, seqs: Vec<u64>, cap: usize) {
        while self.dedupe.published.len() >= cap {
            let Some(oldest) = self.dedupe.published_order.pop_front() else { break };
            self.dedupe.published.remove(&oldest);
        }
        self.dedupe.published_order.push_back(key.clone());
        self.dedupe.published.insert(key, seqs);
    }

    pub fn remember(&mut self, client_msg_id: String, seen: SeenMessage, cap: usize) {
        while self.dedupe.seen.len() >= cap {
            let Some(oldest) = self.dedupe.order.pop_front() else { break };
            self.dedupe.seen.remove(&oldest);
        }
        self.dedupe.order.push_back(client_msg_id.clone());
        self.dedupe.seen.insert(client_msg_id, seen);
    }
}

/// One history event in the server-wide order: user, stream generation, seq.
type Placed = (Rc<str>, u64, u64);

pub struct Users {
    map: HashMap<Rc<str>, User>,
    limits: UserLimits,
    next_generation: u64,
    /// Bytes of all streams' history.
    history_bytes: usize,
    /// Every kept event in the order it was appended, for dropping the server-wide oldest
    /// first. Entries of events already dropped by their own stream are skipped when reached
    /// and swept out when they outnumber the rest.
    order: VecDeque<Placed>,
    compact_at: usize,
}

impl Users {
    /// See [`crate::base::shrink_if_oversized`].
    pub fn shrink_if_oversized(&mut self) -> bool {
        let map = crate::base::shrink_if_oversized(&mut self.map);
        let order = self.order.capacity() > 4 * self.order.len().max(256);
        if order {
            self.order.shrink_to_fit();
        }
        map || order
    }

    pub fn new(limits: UserLimits) -> Users {
        Users {
            map: HashMap::new(),
            limits,
            next_generation: 0,
            history_bytes: 0,
            order: VecDeque::new(),
            compact_at: 1 << 16,
        }
    }

    pub fn limits(&self) -> &UserLimits {
        &self.limits
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    pub fn get(&self, user_id: &str) -> Option<&User> {
        self.map.get(user_id)
    }

    pub fn get_mut(&mut self, user_id: &str) -> Option<&mut User> {
        self.map.get_mut(user_id)
    }

    /// The user's entry, made (with a new stream) when there is none. At `history.max_users`
    /// the longest-idle offline streams make room first.
    pub fn entry(&mut self, user_id: &str) -> &mut User {
        if !self.map.contains_key(user_id) {
            if self.map.len() >= self.limits.max_users {
                self.evict_idle();
            }
            self.next_generation += 1;
            let mut stream = UserStream::new(self.limits.history);
            // A stream made by a publish, before any session, starts its TTL at once.
            stream.idle_since = Some(Instant::now());
            let user = User {
                sessions: Vec::new(),
                stream,
                dedupe: Dedupe {
                    seen: HashMap::new(),
                    order: VecDeque::new(),
                    published: HashMap::new(),
                    published_order: VecDeque::new(),
                },
                generation: self.next_generation,
            };
            self.map.insert(Rc::from(user_id), user);
        }
        // Inserted just above when it was missing.
        self.map.get_mut(user_id).expect("the entry exists")
    }

    /// Keeps an event in the user's history, within the user's and the server-wide byte caps.
    pub fn keep(&mut self, user_id: &str, seq: u64, frame: ByteString) {
        let Some(key) = self.map.get_key_value(user_id).map(|(key, _)| Rc::clone(key)) else { return };
        let Some(user) = self.map.get_mut(user_id) else { return };
        let grown = user.stream.push(seq, frame);
        self.history_bytes = self.history_bytes.saturating_add_signed(grown);
        if user.stream.oldest_seq().is_some_and(|oldest| oldest <= seq) {
            self.order.push_back((key, user.generation, seq));
        }
        while self.history_bytes > self.limits.max_history_bytes {
            let Some((user_id, generation, seq)) = self.order.pop_front() else { break };
            if let Some(user) = self.map.get_mut(&user_id) {
                if user.generation == generation && user.stream.oldest_seq() == Some(seq) {
                    self.history_bytes -= user.stream.drop_oldest();
                }
            }
        }
        if self.order.len() > self.compact_at {
            let map = &self.map;
            self.order.retain(|(user_id, generation, seq)| {
                map.get(user_id).is_some_and(|u| {
                    u.generation == *generation && u.stream.oldest_seq().is_some_and(|o| o <= *seq)
                })
            });
            self.compact_at = (self.order.len() * 2).max(1 << 16);
        }
    }

    /// Section 6: streams of users with no session for `history.ttl_secs` since their last
    /// session closed or their last event are forgotten, and so are `client_msg_id`s older than
    /// that.
    pub fn forget_idle(&mut self) {
        let ttl = self.limits.ttl;
        let before = self.map.len();
        let mut freed = 0;
        self.map.retain(|_, user| {
            let dedupe = &mut user.dedupe;
            dedupe.seen.retain(|_, seen| seen.at.elapsed() < ttl);
            dedupe.order.retain(|id| dedupe.seen.contains_key(id));
            let keep =
                !user.sessions.is_empty() || user.stream.idle_since.is_none_or(|since| since.elapsed() < ttl);
            if !keep {
                freed += user.stream.bytes();
            }
            keep
        });
        self.history_bytes -= freed;
        let forgotten = before - self.map.len();
        if forgotten > 0 {
            debug!("forgot {forgotten} idle user streams");
        }
    }

    /// Makes room under `history.max_users`: forgets the longest-idle offline streams, a
    /// hundredth of the table at a time so a flood of new ids does not rescan it per id.
    fn evict_idle(&mut self) {
        let mut idle: Vec<(Instant, Rc<str>)> = self
            .map
            .iter()
            .filter(|(_, u)| u.sessions.is_empty())
            .filter_map(|(id, u)| u.stream.idle_since.map(|since| (since, Rc::clone(id))))
            .collect();
        let count = (self.map.len() / 100).max(1).min(idle.len());
        if count == 0 {
            return;
        }
        idle.select_nth_unstable_by_key(count - 1, |(since, _)| *since);
        for (_, user_id) in idle.drain(..count) {
            if let Some(user) = self.map.remove(&user_id) {
                self.history_bytes -= user.stream.bytes();
            }
        }
        info!(
            "history.max_users ({}) reached: forgot the {count} longest-idle offline streams",
            self.limits.max_users
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_history_bytes: usize, max_users: usize) -> UserLimits {
        UserLimits {
            history: HistoryLimits { events: 100, bytes: 1000 },
            max_history_bytes,
            max_users,
            dedupe_per_user: 2,
            ttl: Duration::from_secs(60),
        }
    }

    fn append(users: &mut Users, user_id: &str, frame: &str) {
        let seq = users.entry(user_id).stream.next_seq();
        users.keep(user_id, seq, ByteString::from(frame));
    }

    #[test]
    fn server_wide_history_drops_the_oldest_event_of_any_user() {
        let mut users = Users::new(limits(10, 100));
        append(&mut users, "a", "aaaa");
        append(&mut users, "b", "bbbb");
        append(&mut users, "a", "cccc");
        assert_eq!(users.history_bytes(), 8);
        assert_eq!(users.get("a").unwrap().stream.oldest_seq(), Some(2), "a's first event went first");
        assert_eq!(users.get("b").unwrap().stream.oldest_seq(), Some(1));
        append(&mut users, "a", "dddd");
        assert_eq!(users.get("b").unwrap().stream.oldest_seq(), None, "then b's, the next oldest");
        assert_eq!(users.history_bytes(), 8);
    }

    #[test]
    fn the_longest_idle_offline_stream_makes_room() {
        let mut users = Users::new(limits(1000, 2));
        append(&mut users, "old", "x");
        users.entry("online").sessions.push(ConnectionId::next());
        users.entry("new");
        assert_eq!(users.len(), 2);
        assert!(users.get("old").is_none() && users.get("online").is_some());
        assert_eq!(users.history_bytes(), 0);
    }

    #[test]
    fn dedupe_forgets_the_oldest_id_first() {
        let mut users = Users::new(limits(1000, 10));
        let user = users.entry("u");
        for id in ["c1", "c2", "c3"] {
            let seen = SeenMessage {
                message_id: id.into(),
                run_id: id.into(),
                seq: 1,
                at: Instant::now(),
                attempt: String::new(),
            };
            user.remember(id.into(), seen, 2);
        }
        assert!(user.seen("c1").is_none());
        assert!(user.seen("c2").is_some() && user.seen("c3").is_some());
    }
}
