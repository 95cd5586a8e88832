//! Connection lifecycle (protocol sections 3 and 7): registering a session, taking it through
//! `accepted -> authenticated -> services_ready -> processing_ready` within its user's session
//! cap, failing a setup alone, and closing. Every step is a transition checked against
//! `state.rs`; a step asked out of order is contained as a setup failure of that connection.

use actix::prelude::*;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{
    Authenticate, Closing, Connection, ConnectionId, ConnectionView, Fail, ListConnections, Register,
    Registry, Shutdown, ToSession, Unregister,
};
use crate::auth::Identity;
use crate::broker::BrokerError;
use crate::broker::ResumeRequest;
use crate::protocol::{close, now_ms, ErrorCode};
use crate::state::ConnectionState;

impl Registry {
    /// Moves a connection in setup to `failed` and tells its session to close with `close_code`
    /// (after the error frame, if any); `reason` labels the failure metric.
    pub(super) fn fail_setup(
        &mut self,
        id: ConnectionId,
        reason: &'static str,
        close_code: u16,
        error: Option<(ErrorCode, String)>,
    ) {
        if self.mark_failed(id, reason) {
            self.tell(id, ToSession::Refused { error, close_code, reason });
        }
    }

    /// `failed`: counted, logged, and the user slot given back; false when the connection could
    /// not go there (gone, or already past setup).
    fn mark_failed(&mut self, id: ConnectionId, reason: &str) -> bool {
        if self.transition(id, ConnectionState::Failed).is_err() {
            return false;
        }
        self.metrics.fail(reason);
        warn!("{id}: setup failed: {reason}");
        self.release_user_slot(id);
        true
    }

    /// Out of its user's fan-out here and of the user's session cap in the broker; once only.
    pub(super) fn release_user_slot(&mut self, id: ConnectionId) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.clone()) else {
            return;
        };
        let Some(user) = self.local.get_mut(user_id.as_str()) else { return };
        let Some(at) = user.sessions.iter().position(|s| *s == id) else { return };
        user.sessions.remove(at);
        if user.sessions.is_empty() {
            self.broker.interest(&user_id, false);
        }
        self.leave_broker(&user_id, id);
    }

    /// The broker's slot of a session given back. Its effect is decided now; only a failure
    /// answers, so nobody waits for it.
    fn leave_broker(&mut self, user_id: &str, id: ConnectionId) {
        let call = self.broker.leave(user_id, id);
        actix::spawn(async move {
            if let Err(e) = call.await {
                warn!("{id}: the broker did not take back the session slot: {e}");
            }
        });
    }

    /// A connection the registry gave up on (slow): out of the fan-out and of its user's
    /// session cap at once, while its actor may take a while to stop.
    pub(super) fn abandon(&mut self, id: ConnectionId) {
        if self.connections.get(&id).is_some_and(|c| c.state.can_transition_to(ConnectionState::Closing)) {
            let _ = self.transition(id, ConnectionState::Closing);
        }
        self.release_user_slot(id);
    }

    /// `authenticated`: binds the connection to its user, within the user's session cap. Then
    /// goes on to `services_ready`, after the `[faults]` delay if one is set.
    pub(super) fn authenticate(
        &mut self,
        id: ConnectionId,
        identity: Identity,
        resume: Option<ResumeRequest>,
        ctx: &mut Context<Self>,
    ) {
        let Some(connection) = self.connections.get(&id) else {
            debug!("{id}: vanished before authentication");
            return;
        };
        let home = self.shards.as_ref().map_or(self.settings.shard, |s| s.index_of_user(&identity.user_id));
        if connection.state == ConnectionState::Accepted && home != self.settings.shard {
            return self.move_to(home, id, identity, resume);
        }
        if connection.state != ConnectionState::Accepted {
            let _ = self.transition(id, ConnectionState::Authenticated); // counts the refusal
            self.refuse_out_of_order(id);
            return;
        }
        let user_id = identity.user_id;
        let cap = self.settings.max_sessions_per_user;
        let call = self.broker.admit(&user_id, id, cap);
        self.when(ctx, &user_id.clone(), call, move |registry, answer, ctx| {
            registry.admitted(ctx, id, user_id, resume, answer);
        });
    }

    /// Hands an `accepted` connection to its user's shard, which authenticates it there; what
    /// its session still sends here is forwarded after it (`Adopt` goes first, in order).
    fn move_to(&mut self, home: usize, id: ConnectionId, identity: Identity, resume: Option<ResumeRequest>) {
        let (Some(shards), Some(connection)) = (&self.shards, self.connections.remove(&id)) else {
            return;
        };
        let to = shards.all()[home].clone();
        debug!("{id}: authenticated; moves to registry shard {home} of user {}", identity.user_id);
        to.do_send(Adopt { id, connection, identity, resume });
        self.moved.insert(id, to);
        self.trimmer.observe(self.connections.len());
    }

    /// The broker's answer on the user's session cap.
    fn admitted(
        &mut self,
        ctx: &mut Context<Self>,
        id: ConnectionId,
        user_id: String,
        resume: Option<ResumeRequest>,
        answer: Result<bool, BrokerError>,
    ) {
        match answer {
            Ok(true) => {}
            Ok(false) => return self.fail_setup(id, "too_many_sessions", close::TOO_MANY_SESSIONS, None),
            Err(e) => return self.broker_failed_setup(id, &e),
        }
        if self.connections.get(&id).is_none_or(|c| c.state != ConnectionState::Accepted) {
            // Gone (or failed) while the broker answered: its slot goes back at once.
            return self.leave_broker(&user_id, id);
        }
        let sessions = &mut self.local_user(&user_id).sessions;
        sessions.push(id);
        if sessions.len() == 1 {
            self.broker.interest(&user_id, true);
        }
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.user_id = Some(user_id);
        }
        if self.transition(id, ConnectionState::Authenticated).is_err() {
            return;
        }
        self.tell(id, ToSession::Authenticated);
        let delay = self.settings.setup_delay;
        if delay.is_zero() {
            self.attach(ctx, id, resume);
        } else {
            // A timer, not a sleep: the registry keeps serving everyone else meanwhile.
            ctx.run_later(delay, move |registry, ctx| registry.attach(ctx, id, resume));
        }
    }

    fn broker_failed_setup(&mut self, id: ConnectionId, error: &BrokerError) {
        warn!("{id}: setup failed in the broker: {error}");
        let message = "the user's stream could not be reached".to_owned();
        self.fail_setup(id, "broker_error", close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
    }

    /// `services_ready`: the user's stream is attached. This is where a setup can fail.
    pub(super) fn attach(
        &mut self,
        ctx: &mut Context<Self>,
        id: ConnectionId,
        resume: Option<ResumeRequest>,
    ) {
        let Some(user_id) = self.connections.get(&id).and_then(|c| c.user_id.clone()) else {
            debug!("{id}: vanished before services_ready");
            return;
        };
        let prefix = &self.settings.fail_setup_user_prefix;
        if !prefix.is_empty() && user_id.starts_with(prefix.as_str()) {
            let message = "the user's services could not be set up".to_owned();
            self.fail_setup(id, "setup_failed", close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
            return;
        }
        if self.transition(id, ConnectionState::ServicesReady).is_err() {
            self.refuse_out_of_order(id);
            return;
        }
        self.tell(id, ToSession::ServicesReady);
        self.activate(ctx, id, &user_id, resume);
    }

    /// `processing_ready`: from now on the connection is in the fan-out. It gets there when the
    /// broker's replay is acted on, which is after every event appended before the replay was
    /// asked for (those are in it) and before every one appended after (those come live), so
    /// no event falls between the two and none comes twice.
    pub(super) fn activate(
        &mut self,
        ctx: &mut Context<Self>,
        id: ConnectionId,
        user_id: &str,
        resume: Option<ResumeRequest>,
    ) {
        let call = self.broker.attach(user_id, resume.as_ref());
        let user_id = user_id.to_owned();
        self.when(ctx, &user_id.clone(), call, move |registry, answer, _| {
            let attached = match answer {
                Ok(attached) => attached,
                Err(e) => return registry.broker_failed_setup(id, &e),
            };
            registry.live_from(id, &user_id, &attached.epoch, attached.last_seq);
            if registry.transition(id, ConnectionState::ProcessingReady).is_err() {
                registry.refuse_out_of_order(id);
                return;
            }
            info!("{id}: processing_ready for user {user_id}");
            let answer = ToSession::ProcessingReady {
                epoch: attached.epoch,
                last_seq: attached.last_seq,
                resume: attached.info,
                replay: attached.frames,
            };
            registry.tell(id, answer);
        });
    }

    /// A session asked for a step its connection is not in: contained as a setup failure.
    pub(super) fn refuse_out_of_order(&mut self, id: ConnectionId) {
        let message = "connection setup went out of order".to_owned();
        self.fail_setup(id, "setup_failed", close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
    }
}

impl Handler<Register> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Register, ctx: &mut Self::Context) {
        self.metrics.registry_backlog.dec();
        let id = msg.id;
        let connection = Connection {
            state: ConnectionState::Accepted,
            user_id: None,
            session: msg.session,
            outbound: msg.outbound,
            slow: false,
            connected_at: now_ms(),
            after: 0,
        };
        if self.connections.insert(id, connection).is_some() {
            // Ids are unique by construction; a duplicate would be a bug, never silently merged.
            warn!("{id}: registered twice");
        }
        self.trimmer.observe(self.connections.len());
        self.metrics.connections_opened.inc();
        self.metrics.move_gauge(None, Some(ConnectionState::Accepted));
        debug!("{id}: accepted");
        self.answering_at_once(id, |registry| {
            registry.tell(id, ToSession::Accepted);
            if registry.shutting_down {
                // The upgrade raced the shutdown: it gets the same 1012 as every other session.
                registry.tell(id, ToSession::Shutdown);
                return;
            }
            if let Some(identity) = msg.identity {
                registry.authenticate(id, identity, msg.resume, ctx);
            }
        });
    }
}

/// An `accepted` connection moving to the shard of the user its token names.
pub(super) struct Adopt {
    id: ConnectionId,
    connection: Connection,
    identity: Identity,
    resume: Option<ResumeRequest>,
}

impl Message for Adopt {
    type Result = ();
}

impl Handler<Adopt> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Adopt, ctx: &mut Self::Context) {
        let id = msg.id;
        self.connections.insert(id, msg.connection);
        self.trimmer.observe(self.connections.len());
        if self.shutting_down {
            self.tell(id, ToSession::Shutdown);
            return;
        }
        self.answering_at_once(id, |registry| registry.authenticate(id, msg.identity, msg.resume, ctx));
    }
}

impl Handler<Authenticate> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Authenticate, ctx: &mut Self::Context) {
        self.metrics.registry_backlog.dec();
        let id = msg.id;
        self.answering_at_once(id, |registry| registry.authenticate(id, msg.identity, msg.resume, ctx));
    }
}

impl Handler<Fail> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Fail, _: &mut Self::Context) {
        if let Some(home) = self.moved.get(&msg.id) {
            return home.do_send(msg);
        }
        // The session has answered its client itself (`setup_failed`, 1011).
        self.mark_failed(msg.id, msg.reason);
    }
}

impl Handler<Closing> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Closing, _: &mut Self::Context) {
        if let Some(home) = self.moved.get(&msg.id) {
            return home.do_send(msg);
        }
        let state = self.connections.get(&msg.id).map(|c| c.state);
        if state.is_some_and(|s| s.can_transition_to(ConnectionState::Closing)) {
            let _ = self.transition(msg.id, ConnectionState::Closing);
        }
        // A closing session may take a while to stop (its peer may not be reading its close
        // frame); its place under the user's session cap is free from now on.
        self.release_user_slot(msg.id);
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        let id = msg.id;
        if let Some(home) = self.moved.remove(&id) {
            return home.do_send(msg);
        }
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
        self.trimmer.observe(self.connections.len());
    }
}

impl Handler<ListConnections> for Registry {
    type Result = ResponseFuture<Result<Vec<ConnectionView>, BrokerError>>;

    /// This node's sessions of the user, then those the broker knows on other nodes.
    fn handle(&mut self, msg: ListConnections, _: &mut Self::Context) -> Self::Result {
        let node = self.settings.node.clone();
        let mut views: Vec<ConnectionView> =
            self.local.get(msg.user_id.as_str()).map_or_else(Vec::new, |user| {
                user.sessions
                    .iter()
                    .filter_map(|id| {
                        self.connections.get(id).map(|c| ConnectionView {
                            connection_id: id.to_string(),
                            node: node.clone(),
                            state: Some(c.state),
                            connected_at: c.connected_at,
                            unsent_bytes: Some(c.outbound.pending()),
                        })
                    })
                    .collect()
            });
        let elsewhere = self.broker.sessions(&msg.user_id);
        Box::pin(async move {
            for session in elsewhere.await? {
                if session.node != node {
                    views.push(ConnectionView {
                        connection_id: session.connection_id,
                        node: session.node,
                        state: None,
                        connected_at: session.connected_at,
                        unsent_bytes: None,
                    });
                }
            }
            Ok(views)
        })
    }
}

impl Handler<Shutdown> for Registry {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        let (told, answered) = futures_channel::oneshot::channel();
        let runs_deadline = Instant::now() + self.settings.shutdown_grace / 2;
        if !self.runs.is_empty() {
            info!(
                "shutdown: {} runs in progress get until {:?} to end",
                self.runs.len(),
                self.settings.shutdown_grace / 2
            );
        }
        let mut told = Some(told);
        let mut ended_runs = false;
        let mut settle_deadline = None;
        ctx.run_interval(Duration::from_millis(20), move |registry, ctx| {
            if !registry.runs.is_empty() && Instant::now() < runs_deadline {
                return;
            }
            if !ended_runs {
                ended_runs = true;
                let left: Vec<String> = registry.runs.keys().cloned().collect();
                for run_id in left {
                    warn!("run {run_id}: not ended within the shutdown grace; ended with agent_error node_shutdown");
                    if let Some(agent) = &registry.agent {
                        agent.stop.do_send(crate::agent::StopRun { run_id: run_id.clone() });
                    }
                    let output = crate::protocol::AgentOutput::Error {
                        code: "node_shutdown".into(),
                        message: "the server running this run is shutting down; send the message again".into(),
                    };
                    registry.end_run(ctx, &run_id, output);
                }
                settle_deadline = Some(Instant::now() + Duration::from_secs(1));
            }
            // The runs' last events are on their way to the sessions (through the broker):
            // they go first, then the 1012.
            if !registry.calls.is_empty() && settle_deadline.is_some_and(|d| Instant::now() < d) {
                return;
            }
            let Some(told) = told.take() else { return };
            // Queued behind every delivery already handed to each session, so those go out first.
            for connection in registry.connections.values() {
                connection.session.do_send(ToSession::Shutdown);
            }
            info!("shutdown: telling {} sessions to close with 1012", registry.connections.len());
            let _ = told.send(registry.connections.len());
        });
        Box::pin(async move { answered.await.unwrap_or(0) })
    }
}
