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
use crate::metrics::Failure;
use crate::protocol::{close, now_ms, ErrorCode};
use crate::state::ConnectionState;

impl Registry {
    /// Moves a connection in setup to `failed` and tells its session to close with `close_code`
    /// (after the error frame, if any); `reason` labels the failure metric.
    pub(super) fn fail_setup(
        &mut self,
        id: ConnectionId,
        failure: Failure,
        close_code: u16,
        error: Option<(ErrorCode, String)>,
    ) {
        if self.mark_failed(id, failure) {
            self.tell(id, ToSession::Refused { error, close_code, reason: failure.label() });
        }
    }

    /// `failed`: counted, logged, and the user slot given back; false when the connection could
    /// not go there (gone, or already past setup).
    fn mark_failed(&mut self, id: ConnectionId, failure: Failure) -> bool {
        if self.transition(id, ConnectionState::Failed).is_err() {
            return false;
        }
        self.metrics.fail(failure);
        warn!("{id}: setup failed: {failure}");
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
            Ok(false) => {
                return self.fail_setup(id, Failure::TooManySessions, close::TOO_MANY_SESSIONS, None)
            }
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
        self.fail_setup(id, error.failure(), close::SERVER_ERROR, Some((ErrorCode::SetupFailed, message)));
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
            self.fail_setup(
                id,
                Failure::SetupFailed,
                close::SERVER_ERROR,
                Some((ErrorCode::SetupFailed, message)),
            );
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
                runs: attached.runs.unwrap_or_else(|| registry.runs_snapshot(&user_id)),
            };
            registry.tell(id, answer);
        });
    }

    /// A session asked for a step its connection is not in: contained as a setup failure.
    pub(super) fn refuse_out_of_order(&mut self, id: ConnectionId) {
        let message = "connection setup went out of order".to_owned();
        self.fail_setup(
            id,
            Failure::SetupFailed,
            close::SERVER_ERROR,
            Some((ErrorCode::SetupFailed, message)),
        );
    }
}

impl Handler<Register> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Register, ctx: &mut Self::Context) {
        drop(msg.waiting);
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
        drop(msg.waiting);
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
        self.mark_failed(msg.id, msg.failure);
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
        let runs_grace = self.settings.shutdown_grace / 2;
        if !self.runs.is_empty() {
            info!("shutdown: {} runs in progress get until {runs_grace:?} to end", self.runs.len());
        }
        self.draining = Some(Draining {
            told: Some(told),
            runs_deadline: Instant::now() + runs_grace,
            settle_deadline: None,
            timer: None,
            advancing: false,
        });
        self.advance_shutdown(ctx);
        Box::pin(async move { answered.await.unwrap_or(0) })
    }
}

/// Where a graceful shutdown is: waiting for runs to end, then for their last events to reach
/// the sessions, then done. Advanced by the events it waits for (a run ends, the broker's
/// last answers are acted on) and by one timer at the deadline of the stage it is in.
pub(super) struct Draining {
    told: Option<futures_channel::oneshot::Sender<usize>>,
    runs_deadline: Instant,
    /// Set once the runs are over: the time their last events have to reach the sessions.
    settle_deadline: Option<Instant>,
    timer: Option<SpawnHandle>,
    /// Ending the runs left re-enters through `on_run_stored`: only the outer call acts.
    advancing: bool,
}

impl Registry {
    /// Moves a shutdown on as far as it can go now; a no-op when none is under way.
    pub(super) fn advance_shutdown(&mut self, ctx: &mut Context<Self>) {
        match &mut self.draining {
            Some(draining) if !draining.advancing && draining.told.is_some() => draining.advancing = true,
            _ => return,
        }
        let wait_until = self.shutdown_step(ctx);
        let Some(draining) = &mut self.draining else { return };
        draining.advancing = false;
        if let Some(timer) = draining.timer.take() {
            ctx.cancel_future(timer);
        }
        if let Some(deadline) = wait_until {
            let wait = deadline.saturating_duration_since(Instant::now());
            draining.timer = Some(ctx.run_later(wait, |registry, ctx| registry.advance_shutdown(ctx)));
        }
    }

    /// One look at the shutdown: the deadline to wait for, or `None` once sessions were told.
    fn shutdown_step(&mut self, ctx: &mut Context<Self>) -> Option<Instant> {
        let now = Instant::now();
        let draining = self.draining.as_ref()?;
        if draining.settle_deadline.is_none() {
            if !self.runs.is_empty() && now < draining.runs_deadline {
                return Some(draining.runs_deadline);
            }
            self.end_runs_for_shutdown(ctx);
        }
        let draining = self.draining.as_mut()?;
        let settle = *draining.settle_deadline.get_or_insert(now + Duration::from_secs(1));
        // The runs' last events are on their way to the sessions (through the broker): they go
        // first, then the 1012.
        if !(self.calls.is_empty() && self.store_calls.is_empty()) && now < settle {
            return Some(settle);
        }
        let told = draining.told.take()?;
        // Deliveries handed over in this very step (a run's end, inside a broker or store
        // continuation) are woken first; the 1012 then queues behind every one of them.
        self.wake_sessions();
        for connection in self.connections.values() {
            connection.session.do_send(ToSession::Shutdown);
        }
        info!("shutdown: telling {} sessions to close with 1012", self.connections.len());
        let _ = told.send(self.connections.len());
        None
    }

    fn end_runs_for_shutdown(&mut self, ctx: &mut Context<Self>) {
        let left: Vec<String> = self.runs.keys().cloned().collect();
        for run_id in left {
            warn!("run {run_id}: not ended within the shutdown grace; ended with agent_error node_shutdown");
            if let Some(agent) = &self.agent {
                agent.stop.do_send(crate::agent::StopRun { run_id: run_id.clone() });
            }
            let output = crate::protocol::AgentOutput::Error {
                code: "node_shutdown".into(),
                message: "the server running this run is shutting down; send the message again".into(),
            };
            self.end_run(ctx, &run_id, output);
        }
    }
}
