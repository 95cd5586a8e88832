//! A connection's id: what every log line, metric-worthy failure and registry message names.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `ws_` + a tag chosen at start + a counter: unique within the server's lifetime, and ids of two
/// runs of the server are told apart in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(u64);

impl ConnectionId {
    pub fn next() -> ConnectionId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The counter alone: what picks the registry shard of a connection whose user is not
    /// known yet (`registry/shards.rs`).
    pub fn value(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        static BOOT: OnceLock<u16> = OnceLock::new();
        let boot = BOOT.get_or_init(rand::random::<u16>);
        write!(f, "ws_{boot:04x}{:x}", self.0)
    }
}
