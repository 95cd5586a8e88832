//! The registry: the supervisor actor that knows every connection of this process, owns every
//! state transition (protocol section 3), and fans events out to sessions. Users' streams
//! (sections 5 and 6) live in the broker underneath (`crate::broker`), which the registry asks
//! and never waits for.
//!
//! It processes one message at a time. Nothing a single connection does can hurt the others
//! here: every message names a connection id that may already be gone, and every "no" is an
//! answer to the asking session, a metric and a log line, never a panic.

mod ag_ui_clients;
mod broker_calls;
mod fanout;
mod lifecycle;
pub mod messages;
mod remote;
mod runs;
mod shards;
mod threads;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, warn};
use rand::distr::{Alphanumeric, SampleString};

use crate::agent::AgentHandle;
use crate::base::{shrink_if_oversized, ConnectionId, Outbound};
use crate::broker::faulty::Faulty;
use crate::broker::memory::MemoryBroker;
use crate::broker::stream::HistoryLimits;
use crate::broker::users::UserLimits;
use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::state::ConnectionState;
use broker_calls::CallQueue;
pub use messages::*;
use runs::Run;
pub use shards::Registries;
use threads::RETENTION_SWEEP;

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
    /// `agent.forward_events`: the AG-UI events without a mapping that reach tabs.
    pub forward_events: Vec<String>,
    /// `limits.user_messages_per_second`.
    pub user_messages_per_second: u32,
    /// `faults.broker_delay_ms` and `faults.broker_fail_user_prefix`.
    pub broker_delay: Duration,
    pub broker_fail_user_prefix: String,
    /// `[broker] kind = "redis"`: where the streams live instead of this process.
    pub redis: Option<crate::broker::redis::RedisSettings>,
    /// This process's name (`broker.node_id`, or hostname-pid).
    pub node: String,
    /// `server.shutdown_grace_secs`.
    pub shutdown_grace: Duration,
    /// Which of the process's registry shards this is (`shards.rs`).
    pub shard: usize,
    /// Where conversations are kept (docs/conversations.md).
    pub store: crate::store::Store,
    /// `agent.history_messages`: how much of its thread an agent is sent.
    pub history_messages: usize,
    /// `store.retention_days` (0: keep forever); the first shard applies it.
    pub retention_days: u64,
    /// `agent.on_busy`: a message on a thread whose run is still going.
    pub on_busy: crate::config::OnBusy,
}

impl RegistrySettings {
    pub fn from_config(config: &Config, store: crate::store::Store) -> RegistrySettings {
        RegistrySettings {
            max_sessions_per_user: config.limits.max_sessions_per_user.get(),
            users: UserLimits {
                history: HistoryLimits {
                    events: config.history.events_per_user.get(),
                    bytes: config.history.max_bytes_per_user.get(),
                },
                max_history_bytes: config.history.max_bytes.get(),
                max_users: config.history.max_users.get(),
                dedupe_per_user: config.history.dedupe_per_user.get(),
                ttl: Duration::from_secs(config.history.ttl_secs),
            },
            setup_delay: Duration::from_millis(config.faults.setup_delay_ms),
            fail_setup_user_prefix: config.faults.fail_setup_user_prefix.clone(),
            max_outbound_bytes: config.limits.max_outbound_bytes.get(),
            max_runs_per_user: config.agent.max_runs_per_user.get(),
            run_timeout: Duration::from_secs(config.agent.run_timeout_secs.get()),
            max_response_bytes: config.agent.max_response_bytes.get(),
            forward_events: config.agent.forward_events.clone(),
            user_messages_per_second: config.limits.user_messages_per_second.get(),
            broker_delay: Duration::from_millis(config.faults.broker_delay_ms),
            broker_fail_user_prefix: config.faults.broker_fail_user_prefix.clone(),
            redis: (config.broker.kind == crate::config::BrokerKind::Redis)
                .then(|| crate::broker::redis::RedisSettings::from_config(config)),
            node: config.broker.node_name(),
            shutdown_grace: Duration::from_secs(config.server.shutdown_grace_secs.get()),
            shard: 0,
            store,
            history_messages: config.agent.history_messages.get(),
            retention_days: config.store.retention_days,
            on_busy: config.agent.on_busy,
        }
    }
}

/// What this process knows of a user it has sessions of: node-local, never in the broker.
struct LocalUser {
    /// This process's connections of the user that hold a session slot (authenticated, not
    /// yet closing): the fan-out list.
    sessions: Vec<ConnectionId>,
    /// Runs of the user that have started here and not ended (`agent.max_runs_per_user`).
    runs_in_progress: usize,
    /// `limits.user_messages_per_second` across all of the user's sessions.
    limiter: RateLimiter,
    /// The newest seq handed to the user's sessions here, and the stream's epoch: events reach
    /// them in seq order, once, however the broker brings them (`fanout.rs`).
    delivered: Option<u64>,
    epoch: Option<String>,
    /// A gap fill of the user's stream is on its way: gaps seen meanwhile wait for it rather than
    /// each read the stream again (`fanout.rs::fill`), and the newest seq they brought is kept,
    /// to be read in turn if the fill ends before it.
    filling: bool,
    heard: u64,
    /// The user's threads with a run going here, and the runs waiting behind it
    /// (`agent.on_busy`): runs of one thread never interleave (`runs.rs`).
    busy: HashMap<std::rc::Rc<str>, runs::Busy>,
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
    /// Events up to this seq came in the connection's replay: live delivery starts after it.
    after: u64,
}

pub struct Registry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    /// `None` for `agent.kind = "none"`: messages are acked and echoed, no run starts.
    agent: Option<AgentHandle>,
    connections: HashMap<ConnectionId, Connection>,
    /// Users' streams, history, dedupe and session counts.
    broker: Box<dyn Broker>,
    /// Users with sessions or runs in this process.
    local: HashMap<std::rc::Rc<str>, LocalUser>,
    /// Broker calls still to be answered, per user, in the order they were made.
    calls: HashMap<String, CallQueue>,
    /// Store calls still to be answered, per user, in the order they were made.
    store_calls: HashMap<String, CallQueue>,
    runs: HashMap<String, Run>,
    /// Bytes of ended runs' messages not stored yet (`runs.rs`, `Ending`): bounded by
    /// `runs::MAX_UNSTORED_BYTES` while the store is away.
    unstored_bytes: usize,
    /// Runs an AG-UI client follows (`POST /ag-ui`): where their steps go besides the stream.
    observers: HashMap<String, Follower>,
    /// Set by [`Shutdown`]: a session registered after it is told to close at once.
    shutting_down: bool,
    /// The shutdown under way, if one is (`lifecycle.rs`).
    draining: Option<lifecycle::Draining>,
    trimmer: crate::memory::Trimmer,
    /// Every shard of the process, told once they have all started; `None` until then.
    shards: Option<Registries>,
    /// Connections that authenticated here and moved to their user's shard: what their
    /// sessions still send here is forwarded there, in order.
    moved: HashMap<ConnectionId, Addr<Registry>>,
    /// This shard's last share of the process-wide gauges (streams, history bytes, runs).
    reported: [i64; 3],
    /// Sessions to wake once the frames of a publish are in their inboxes (`fanout.rs`).
    wakes: Vec<ConnectionId>,
    /// How deep in broker-call continuations this step is (`broker_calls.rs`): the outermost
    /// sends the wake-ups.
    acting: u32,
    /// The connection whose setup step is running and what it has told it so far.
    setup_answers: Option<(ConnectionId, Vec<ToSession>)>,
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
        // The mailbox keeps actix's default capacity. What sessions and agents `do_send` is not
        // held to it (a bounded handful of setup messages per connection, capped overall at the
        // upgrade by `limits.max_registry_backlog`; a run's steps, held back every 64 by a
        // `Checkpoint`), while HTTP routes `send` and wait for room, within their own timeouts.
        // A quarter of the TTL, so a stream outlives its TTL by at most that much.
        let sweep = (self.settings.users.ttl / 4).min(Duration::from_secs(5)).max(Duration::from_millis(100));
        ctx.run_interval(sweep, |registry, _| {
            // Users with neither sessions nor runs here are forgotten at a sweep, not at once, so
            // closing the last tab and reconnecting does not buy a fresh burst of messages.
            registry.local.retain(|_, u| !u.sessions.is_empty() || u.runs_in_progress > 0);
            let shrunk = registry.broker.upkeep();
            let (streams, history_bytes) = registry.broker.gauges();
            registry.report_gauges([streams as i64, history_bytes as i64, registry.runs.len() as i64]);
            if shrunk {
                registry.trimmer.tick(registry.connections.len(), true, false);
            }
        });
        ctx.run_interval(Duration::from_secs(5), |registry, _| {
            // A table sized for a crowd that has left keeps the crowd's memory.
            let shrunk = shrink_if_oversized(&mut registry.connections)
                | shrink_if_oversized(&mut registry.runs)
                | shrink_if_oversized(&mut registry.local)
                | shrink_if_oversized(&mut registry.moved);
            registry.trimmer.tick(registry.connections.len(), shrunk, registry.runs.is_empty())
        });
        if let Some(remote) = self.broker.remote_events() {
            ctx.add_stream(remote);
        }
        if self.settings.shard == 0 && self.settings.retention_days > 0 {
            ctx.run_later(Duration::from_secs(1), |registry, ctx| registry.expire_threads(ctx));
            ctx.run_interval(RETENTION_SWEEP, |registry, ctx| registry.expire_threads(ctx));
        }
        let overdue =
            (self.settings.run_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ctx.run_interval(overdue, |registry, ctx| registry.end_overdue_runs(ctx));
    }
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Arc<Metrics>, agent: Option<AgentHandle>) -> Registry {
        let mut broker: Box<dyn Broker> = match &settings.redis {
            // `build` checked at start that Redis answers; the broker reconnects from here on.
            Some(redis) => {
                match crate::broker::redis::RedisBroker::start(redis.clone(), Arc::clone(&metrics)) {
                    Ok(redis) => Box::new(redis),
                    Err(e) => {
                        // Never streams in this process instead: a node that keeps them for itself
                        // splits the cluster (docs/scale-out.md). `build` took this same URL, so
                        // this is not reached but by a bug; the node stops rather than split.
                        log::error!("broker: {e}; this node stops rather than keep users' streams to itself");
                        std::process::exit(crate::EXIT_BROKER);
                    }
                }
            }
            None => Box::new(MemoryBroker::new(settings.users)),
        };
        // `build` has logged the faults at start.
        if !settings.broker_delay.is_zero() || !settings.broker_fail_user_prefix.is_empty() {
            broker = Box::new(Faulty::new(
                broker,
                settings.broker_delay,
                settings.broker_fail_user_prefix.clone(),
            ));
        }
        Registry {
            settings,
            metrics,
            agent,
            connections: HashMap::new(),
            broker,
            local: HashMap::new(),
            calls: HashMap::new(),
            store_calls: HashMap::new(),
            runs: HashMap::new(),
            observers: HashMap::new(),
            shutting_down: false,
            unstored_bytes: 0,
            draining: None,
            trimmer: crate::memory::Trimmer::new(),
            shards: None,
            moved: HashMap::new(),
            reported: [0; 3],
            wakes: Vec::new(),
            acting: 0,
            setup_answers: None,
        }
    }

    /// The gauges are the sum over the shards: each adds the change in its own share.
    fn report_gauges(&mut self, now: [i64; 3]) {
        let gauges =
            [&self.metrics.user_streams, &self.metrics.history_bytes, &self.metrics.runs_in_progress];
        for ((gauge, now), before) in gauges.into_iter().zip(now).zip(&mut self.reported) {
            gauge.add(now - *before);
            *before = now;
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

    fn tell(&mut self, id: ConnectionId, message: ToSession) {
        if let Some((batched, told)) = &mut self.setup_answers {
            if *batched == id {
                return told.push(message);
            }
        }
        if let Some(connection) = self.connections.get(&id) {
            // Setup answers are a bounded handful per connection, so they may bypass the mailbox
            // capacity; events never do (see `deliver`).
            connection.session.do_send(message);
        }
    }

    /// Runs one step of a connection's setup, sending what it tells the session at the end as
    /// one message ([`ToSession::Several`]): with the in-memory broker a whole setup is decided
    /// in one step, and four answers would be four wake-ups of the session's thread.
    fn answering_at_once(&mut self, id: ConnectionId, step: impl FnOnce(&mut Registry)) {
        self.setup_answers = Some((id, Vec::new()));
        step(self);
        let Some((_, mut told)) = self.setup_answers.take() else { return };
        let message = match told.len() {
            0 => return,
            1 => told.pop().expect("one answer"),
            _ => ToSession::Several(told),
        };
        self.tell(id, message);
    }

    /// This process's record of a user, made when missing.
    fn local_user(&mut self, user_id: &str) -> &mut LocalUser {
        if !self.local.contains_key(user_id) {
            let rate = self.settings.user_messages_per_second;
            let user = LocalUser {
                sessions: Vec::new(),
                runs_in_progress: 0,
                delivered: None,
                filling: false,
                heard: 0,
                epoch: None,
                busy: HashMap::new(),
                limiter: RateLimiter::new(rate, rate.saturating_mul(2), std::time::Instant::now()),
            };
            self.local.insert(std::rc::Rc::from(user_id), user);
        }
        // Inserted just above when it was missing.
        self.local.get_mut(user_id).expect("the entry exists")
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

impl Handler<Shards> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Shards, _: &mut Self::Context) {
        self.shards = Some(msg.0);
    }
}

impl Handler<Probe> for Registry {
    type Result = ();

    fn handle(&mut self, _: Probe, _: &mut Self::Context) {}
}

impl Handler<ProbeBroker> for Registry {
    type Result = ResponseFuture<Result<(), crate::broker::BrokerError>>;

    fn handle(&mut self, _: ProbeBroker, _: &mut Self::Context) -> Self::Result {
        self.broker.ping()
    }
}
