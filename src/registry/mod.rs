//! The registry: the supervisor actor that knows every connection, owns every state transition
//! (protocol section 3) and every user's stream (sections 5 and 6), and fans events out.
//!
//! It processes one message at a time, so each user's "assign seq, append to history, deliver"
//! is atomic without locks. Nothing a single connection does can hurt the others here: every
//! message names a connection id that may already be gone, and every "no" is an answer to the
//! asking session, a metric and a log line, never a panic.

pub mod messages;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{debug, info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{close, now_ms, ErrorCode};
use crate::state::ConnectionState;
pub use messages::*;
use stream::UserStream;

/// The parts of the configuration the registry acts on.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub max_sessions_per_user: usize,
    pub events_per_user: usize,
    pub history_ttl: Duration,
    pub setup_delay: Duration,
    pub fail_setup_user_prefix: String,
}

impl RegistrySettings {
    pub fn from_config(config: &Config) -> RegistrySettings {
        RegistrySettings {
            max_sessions_per_user: config.limits.max_sessions_per_user,
            events_per_user: config.history.events_per_user,
            history_ttl: Duration::from_secs(config.history.ttl_secs),
            setup_delay: Duration::from_millis(config.faults.setup_delay_ms),
            fail_setup_user_prefix: config.faults.fail_setup_user_prefix.clone(),
        }
    }
}

struct Connection {
    state: ConnectionState,
    user_id: Option<String>,
    session: Recipient<ToSession>,
    connected_at: u64,
}

struct User {
    /// Connections holding one of the user's session slots (authenticated and later).
    sessions: Vec<ConnectionId>,
    stream: UserStream,
}

pub struct Registry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    connections: HashMap<ConnectionId, Connection>,
    users: HashMap<String, User>,
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The registry's mailbox is unbounded on purpose: sessions `do_send` a handful of setup
        // messages each, and HTTP routes wait for answers.
        let sweep = self
            .settings
            .history_ttl
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(100));
        ctx.run_interval(sweep, |registry, _| registry.forget_idle_streams());
    }
}

impl Registry {
    pub fn new(settings: RegistrySettings, metrics: Arc<Metrics>) -> Registry {
        Registry {
            settings,
            metrics,
            connections: HashMap::new(),
            users: HashMap::new(),
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
        self.metrics
            .state_transitions
            .with_label_values(&[from.as_str(), to.as_str()])
            .inc();
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

    /// Moves a connection in setup to `failed` and tells its session to close.
    fn fail_setup(
        &mut self,
        id: ConnectionId,
        reason: &'static str,
        close_code: u16,
        error: Option<(ErrorCode, String)>,
    ) {
        if self.transition(id, ConnectionState::Failed).is_ok() {
            self.metrics.fail(reason);
            warn!("{id}: setup failed: {reason}");
            self.release_user_slot(id);
            self.tell(
                id,
                ToSession::Refused {
                    error,
                    close_code,
                    reason,
                },
            );
        }
    }

    fn release_user_slot(&mut self, id: ConnectionId) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.as_deref()) else {
            return;
        };
        if let Some(user) = self.users.get_mut(user_id) {
            user.sessions.retain(|s| *s != id);
            if user.sessions.is_empty() {
                user.stream.idle_since = Some(std::time::Instant::now());
            }
        }
    }

    fn user_mut(&mut self, user_id: &str) -> &mut User {
        let capacity = self.settings.events_per_user;
        self.users
            .entry(user_id.to_owned())
            .or_insert_with(|| User {
                sessions: Vec::new(),
                stream: UserStream::new(capacity),
            })
    }

    /// Streams of users with no session for `history.ttl_secs` are forgotten (section 6).
    fn forget_idle_streams(&mut self) {
        let ttl = self.settings.history_ttl;
        let before = self.users.len();
        self.users.retain(|_, user| {
            !user.sessions.is_empty()
                || user
                    .stream
                    .idle_since
                    .is_none_or(|since| since.elapsed() < ttl)
        });
        let forgotten = before - self.users.len();
        if forgotten > 0 {
            debug!("forgot {forgotten} idle user streams");
        }
    }

    fn attach(&mut self, id: ConnectionId) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.clone()) else {
            debug!("{id}: vanished before services_ready");
            return;
        };
        let prefix = &self.settings.fail_setup_user_prefix;
        if !prefix.is_empty() && user_id.starts_with(prefix.as_str()) {
            let message = "the user's services could not be set up".to_owned();
            self.fail_setup(
                id,
                "setup_failed",
                close::SERVER_ERROR,
                Some((ErrorCode::SetupFailed, message)),
            );
            return;
        }
        self.user_mut(&user_id);
        if self.transition(id, ConnectionState::ServicesReady).is_ok() {
            self.tell(id, ToSession::ServicesReady);
        } else {
            self.refuse_out_of_order(id);
        }
    }

    /// A session asked for a step its connection is not in: contained as a setup failure.
    fn refuse_out_of_order(&mut self, id: ConnectionId) {
        let message = "connection setup went out of order".to_owned();
        self.fail_setup(
            id,
            "setup_failed",
            close::SERVER_ERROR,
            Some((ErrorCode::SetupFailed, message)),
        );
    }
}

impl Handler<Register> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Register, _: &mut Self::Context) {
        let connection = Connection {
            state: ConnectionState::Accepted,
            user_id: None,
            session: msg.session,
            connected_at: now_ms(),
        };
        if self.connections.insert(msg.id, connection).is_some() {
            // Ids are unique by construction; a duplicate would be a bug, never silently merged.
            warn!("{}: registered twice", msg.id);
        }
        self.metrics.connections_opened.inc();
        self.metrics
            .move_gauge(None, Some(ConnectionState::Accepted));
        debug!("{}: accepted", msg.id);
        self.tell(msg.id, ToSession::Accepted);
    }
}

impl Handler<Authenticate> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Authenticate, _: &mut Self::Context) {
        let id = msg.id;
        let Some(connection) = self.connections.get(&id) else {
            debug!("{id}: vanished before authentication");
            return;
        };
        if connection.state != ConnectionState::Accepted {
            let _ = self.transition(id, ConnectionState::Authenticated); // counts the refusal
            self.refuse_out_of_order(id);
            return;
        }
        let user_id = msg.identity.user_id;
        let cap = self.settings.max_sessions_per_user;
        let user = self.user_mut(&user_id);
        if user.sessions.len() >= cap {
            if self.transition(id, ConnectionState::Failed).is_ok() {
                self.metrics.fail("too_many_sessions");
                info!("{id}: user {user_id} already has {cap} sessions; closing with 4004");
                self.tell(
                    id,
                    ToSession::Refused {
                        error: None,
                        close_code: close::TOO_MANY_SESSIONS,
                        reason: "too many sessions for this user",
                    },
                );
            }
            return;
        }
        user.sessions.push(id);
        user.stream.idle_since = None;
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.user_id = Some(user_id);
        }
        if self.transition(id, ConnectionState::Authenticated).is_ok() {
            self.tell(id, ToSession::Authenticated);
        }
    }
}

impl Handler<Attach> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Attach, ctx: &mut Self::Context) {
        let delay = self.settings.setup_delay;
        if delay.is_zero() {
            self.attach(msg.id);
        } else {
            // The delay is a timer, not a sleep: the registry keeps serving everyone else.
            ctx.run_later(delay, move |registry, _| registry.attach(msg.id));
        }
    }
}

impl Handler<Activate> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Activate, _: &mut Self::Context) {
        let id = msg.id;
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.clone()) else {
            debug!("{id}: vanished before processing_ready");
            return;
        };
        if self
            .transition(id, ConnectionState::ProcessingReady)
            .is_err()
        {
            self.refuse_out_of_order(id);
            return;
        }
        let stream = &self.user_mut(&user_id).stream;
        let replay = stream.replay(msg.resume.as_ref());
        let answer = ToSession::ProcessingReady {
            epoch: stream.epoch().to_owned(),
            last_seq: stream.last_seq(),
            resume: replay.info,
            replay: replay.frames,
        };
        info!("{id}: processing_ready for user {user_id}");
        self.tell(id, answer);
    }
}

impl Handler<Fail> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Fail, _: &mut Self::Context) {
        if self.transition(msg.id, ConnectionState::Failed).is_ok() {
            self.metrics.fail(msg.reason);
            warn!("{}: setup failed: {}", msg.id, msg.reason);
            self.release_user_slot(msg.id);
        }
    }
}

impl Handler<Closing> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Closing, _: &mut Self::Context) {
        let state = self.connections.get(&msg.id).map(|c| c.state);
        if state.is_some_and(|s| s.can_transition_to(ConnectionState::Closing)) {
            let _ = self.transition(msg.id, ConnectionState::Closing);
        }
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        let id = msg.id;
        let Some(state) = self.connections.get(&id).map(|c| c.state) else {
            return;
        };
        if state.can_transition_to(ConnectionState::Closing) {
            let _ = self.transition(id, ConnectionState::Closing);
        }
        let _ = self.transition(id, ConnectionState::Closed);
        self.release_user_slot(id);
        if let Some(connection) = self.connections.remove(&id) {
            let user = connection.user_id.as_deref().unwrap_or("-");
            info!("{id}: closed (user {user}, was {state})");
        }
    }
}

impl Handler<ListConnections> for Registry {
    type Result = MessageResult<ListConnections>;

    fn handle(&mut self, msg: ListConnections, _: &mut Self::Context) -> Self::Result {
        let Some(user) = self.users.get(&msg.user_id) else {
            return MessageResult(Vec::new());
        };
        let views = user
            .sessions
            .iter()
            .filter_map(|id| {
                self.connections.get(id).map(|c| ConnectionView {
                    connection_id: id.to_string(),
                    state: c.state,
                    connected_at: c.connected_at,
                })
            })
            .collect();
        MessageResult(views)
    }
}

impl Handler<Probe> for Registry {
    type Result = ();

    fn handle(&mut self, _: Probe, _: &mut Self::Context) {}
}
