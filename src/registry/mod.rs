//! The registry: the supervisor actor that knows every connection, owns every state transition
//! (protocol section 3) and every user's stream (sections 5 and 6), and fans events out.
//!
//! It processes one message at a time, so each user's "assign seq, append to history, deliver"
//! is atomic without locks. Nothing a single connection does can hurt the others here: every
//! message names a connection id that may already be gone, and every "no" is an answer to the
//! asking session, a metric and a log line, never a panic.

mod fanout;
mod lifecycle;
pub mod messages;
mod runs;
pub mod stream;
pub mod users;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, warn};
use rand::distr::{Alphanumeric, SampleString};

use crate::agent::AgentHandle;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::state::ConnectionState;
pub use messages::*;
use runs::Run;
use stream::HistoryLimits;
use users::{UserLimits, Users};

/// The parts of the configuration the registry acts on.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub max_sessions_per_user: usize,
    pub users: UserLimits,
    pub setup_delay: Duration,
    pub fail_setup_user_prefix: String,
    pub max_outbound_bytes: usize,
    pub max_runs_per_user: usize,
    pub run_timeout: Duration,
    pub max_response_bytes: usize,
}

impl RegistrySettings {
    pub fn from_config(config: &Config) -> RegistrySettings {
        RegistrySettings {
            max_sessions_per_user: config.limits.max_sessions_per_user,
            users: UserLimits {
                history: HistoryLimits {
                    events: config.history.events_per_user,
                    bytes: config.history.max_bytes_per_user,
                },
                max_history_bytes: config.history.max_bytes,
                max_users: config.history.max_users,
                dedupe_per_user: config.history.dedupe_per_user,
                ttl: Duration::from_secs(config.history.ttl_secs),
                messages_per_second: config.limits.user_messages_per_second,
            },
            setup_delay: Duration::from_millis(config.faults.setup_delay_ms),
            fail_setup_user_prefix: config.faults.fail_setup_user_prefix.clone(),
            max_outbound_bytes: config.limits.max_outbound_bytes,
            max_runs_per_user: config.agent.max_runs_per_user,
            run_timeout: Duration::from_secs(config.agent.run_timeout_secs),
            max_response_bytes: config.agent.max_response_bytes,
        }
    }
}

struct Connection {
    state: ConnectionState,
    user_id: Option<String>,
    /// The one handle the registry sends through: `try_send` on it respects the mailbox bound.
    session: Recipient<ToSession>,
    outbound: Outbound,
    /// Over its outbound budget: no more deliveries, a 4008 close is on its way.
    slow: bool,
    connected_at: u64,
}

pub struct Registry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    agent: AgentHandle,
    connections: HashMap<ConnectionId, Connection>,
    users: Users,
    runs: HashMap<String, Run>,
    /// Reused to serialise events, so each costs one exact-size allocation.
    scratch: Vec<u8>,
    /// Set by [`Shutdown`]: a session registered after it is told to close at once.
    shutting_down: bool,
    trimmer: crate::memory::Trimmer,
}

/// Gives back a map's table once it is four times larger than what it holds.
pub(crate) fn shrink_if_oversized<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) -> bool {
    let oversized = map.capacity() > 4 * map.len().max(256);
    if oversized {
        map.shrink_to_fit();
    }
    oversized
}

/// `prefix` + 16 random characters: message and run ids.
fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 16);
    id
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The registry's mailbox is unbounded on purpose: sessions `do_send` a handful of setup
        // messages each, and HTTP routes wait for answers.
        // A quarter of the TTL, so a stream outlives its TTL by at most that much.
        let sweep = (self.settings.users.ttl / 4).min(Duration::from_secs(5)).max(Duration::from_millis(100));
        ctx.run_interval(sweep, |registry, _| {
            registry.users.forget_idle();
            registry.metrics.user_streams.set(registry.users.len() as i64);
            registry.metrics.history_bytes.set(registry.users.history_bytes() as i64);
            registry.metrics.runs_in_progress.set(registry.runs.len() as i64);
        });
        ctx.run_interval(Duration::from_secs(5), |registry, _| {
            // A table sized for a crowd that has left keeps the crowd's memory.
            let shrunk = shrink_if_oversized(&mut registry.connections)
                | shrink_if_oversized(&mut registry.runs)
                | registry.users.shrink_if_oversized();
            registry.trimmer.tick(registry.connections.len(), shrunk)
        });
        let overdue =
            (self.settings.run_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ctx.run_interval(overdue, |registry, _| registry.end_overdue_runs());
    }
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Arc<Metrics>, agent: AgentHandle) -> Registry {
        let users = Users::new(settings.users);
        Registry {
            settings,
            metrics,
            agent,
            connections: HashMap::new(),
            users,
            runs: HashMap::new(),
            scratch: Vec::with_capacity(4096),
            shutting_down: false,
            trimmer: crate::memory::Trimmer::new(),
        }
    }

    /// The one place a connection changes state: checks the table, records, counts.
    fn transition(&mut self, id: ConnectionId, to: ConnectionState) -> Result<ConnectionState, ()> {
        let Some(connection) = self.connections.get_mut(&id) else {
            debug!("{id}: transition to {to} for a connection that is gone");
            return Err(());
        };
        let from = connection.state;
        if !from.can_transition_to(to) {
            self.metrics.state_transitions_refused.inc();
            warn!("{id}: refused transition {from} -> {to}");
            return Err(());
        }
        connection.state = to;
        self.metrics.state_transitions.with_label_values(&[from.as_str(), to.as_str()]).inc();
        let gauge_to = (to != ConnectionState::Closed).then_some(to);
        self.metrics.move_gauge(Some(from), gauge_to);
        debug!("{id}: {from} -> {to}");
        Ok(from)
    }

    fn tell(&self, id: ConnectionId, message: ToSession) {
        if let Some(connection) = self.connections.get(&id) {
            // Setup answers are a bounded handful per connection, so they may bypass the mailbox
            // capacity; events never do (see `deliver`).
            connection.session.do_send(message);
        }
    }

    /// The user of a `processing_ready` connection; requests from any other state are ignored.
    fn ready_user(&self, id: ConnectionId) -> Option<String> {
        let connection = self.connections.get(&id)?;
        if connection.state != ConnectionState::ProcessingReady {
            debug!("{id}: request in state {} ignored", connection.state);
            return None;
        }
        connection.user_id.clone()
    }
}

impl Handler<Probe> for Registry {
    type Result = ();

    fn handle(&mut self, _: Probe, _: &mut Self::Context) {}
}
