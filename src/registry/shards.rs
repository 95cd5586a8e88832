//! The registry across cores: one registry actor per shard, each on a thread (Arbiter) of its
//! own, each user always on the same shard. Everything of one user (its sessions, stream, runs
//! and their order) lives on one shard, so per-user order holds as it did with one registry,
//! while setups, messages and fan-out of different users run on different cores.
//!
//! A connection is registered where it will live when its token came with the upgrade (its
//! user's shard). One that authenticates later with an `auth` frame is registered on a shard
//! chosen by its id, and moves to its user's shard when it authenticates (see
//! [`super::Adopt`]): the shard it leaves forwards the session's lifecycle messages after it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use actix::prelude::*;

use super::{Registry, RegistrySettings};
use crate::agent::AgentHandle;
use crate::base::ConnectionId;
use crate::metrics::Metrics;

/// Names the calling thread (at most 15 bytes), so that `top -H`, `perf` and
/// `/proc/<pid>/task/*/comm` tell the registry shards from the HTTP workers.
fn name_thread(name: &str) {
    #[cfg(target_os = "linux")]
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of which it keeps at most 16 bytes;
        // `name` lives across the call.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
        }
    }
}

/// The registry shards of this process; cloned into every session and HTTP handler.
#[derive(Clone)]
pub struct Registries {
    shards: Arc<[Addr<Registry>]>,
}

impl Registries {
    /// Starts `count` shards, each on a new Arbiter. The users' global history limits are
    /// shared out: each shard keeps its part of the users within `1/count` of them.
    pub fn start(
        settings: RegistrySettings,
        metrics: Arc<Metrics>,
        agent: Option<AgentHandle>,
        count: usize,
    ) -> Registries {
        let count = count.max(1);
        let shards: Vec<Addr<Registry>> = (0..count)
            .map(|index| {
                let mut settings = settings.clone();
                settings.shard = index;
                let users = &mut settings.users;
                users.max_history_bytes = users.max_history_bytes.div_ceil(count);
                users.max_users = users.max_users.div_ceil(count);
                let (metrics, agent) = (Arc::clone(&metrics), agent.clone());
                let arbiter = Arbiter::new();
                arbiter.spawn_fn(move || name_thread(&format!("aw-registry-{index}")));
                Registry::start_in_arbiter(&arbiter.handle(), move |_| {
                    Registry::new(settings, metrics, agent)
                })
            })
            .collect();
        let registries = Registries { shards: shards.into() };
        for shard in registries.shards.iter() {
            shard.do_send(super::Shards(registries.clone()));
        }
        registries
    }

    /// The shard of a user: the same for the life of the process.
    pub fn for_user(&self, user_id: &str) -> &Addr<Registry> {
        &self.shards[self.index_of_user(user_id)]
    }

    pub fn index_of_user(&self, user_id: &str) -> usize {
        // SipHash with fixed keys: stable for the process; a client can aim many users at one
        // shard only by knowing this function, and then shares that shard, not more.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user_id.hash(&mut hasher);
        (hasher.finish() % self.shards.len() as u64) as usize
    }

    /// Where a connection that has no user yet is registered.
    pub fn for_connection(&self, id: ConnectionId) -> &Addr<Registry> {
        &self.shards[(id.value() % self.shards.len() as u64) as usize]
    }

    pub fn all(&self) -> &[Addr<Registry>] {
        &self.shards
    }
}
