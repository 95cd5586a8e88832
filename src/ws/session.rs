//! The WebSocket session actor: one per socket. It turns frames into typed requests to the
//! registry and the registry's answers into frames, and it decides nothing global: every state
//! change is asked of the registry (protocol section 3).
//!
//! This is the only module that touches `actix-web-actors` (deprecated upstream in favour of
//! `actix-ws`), so moving off it later changes this file alone.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, ProtocolError, WebsocketContext};
use bytes::BytesMut;
use bytestring::ByteString;
use log::{debug, info, warn};

use super::output::CountedOutput;
use super::read_gate::ReadGate;
use crate::admission::{ConnectionSlot, SetupBacklog, UnauthenticatedSlot};
use crate::auth::{AuthFailure, Check, Identity, Verifier};
use crate::base::{close_frame_len, encoded_len, ConnectionId, Delivery, Outbound};
use crate::broker::ResumeRequest;
use crate::metrics::{Failure, Metrics};
use crate::protocol::{
    close, now_ms, parse_auth_frame, parse_client_frame, peek_type, AuthFrame, ClientFrame, ErrorCode,
    FieldLimits, ServerFrame, SUBPROTOCOL,
};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::registry::{
    Authenticate, CancelRequest, Closing, Fail, Register, Registries, Registry, SubmitMessage, ToSession,
    Unregister,
};
use crate::state::ConnectionState;

/// How long the registry may take from `authenticated` to `processing_ready` before the setup
/// counts as failed (`setup_failed`, 1011).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages a session's mailbox may hold. Only a backstop: the registry's byte budget
/// (`limits.max_outbound_bytes`) is what bounds a slow session's backlog.
pub const MAILBOX_CAPACITY: usize = 65_536;

/// What `processing_ready` brings: the stream's position, the replay, the runs in progress.
struct Ready {
    epoch: String,
    last_seq: u64,
    resume: Option<crate::protocol::ResumeInfo>,
    replay: Vec<ByteString>,
    runs: Vec<serde_json::Value>,
}

/// The socket has taken enough of the session's output for more of its resume backlog.
#[derive(Message)]
#[rtype(result = "()")]
struct BacklogRoom;

/// `token_expiring` is sent this long before the token's `exp`.
pub const TOKEN_EXPIRY_NOTICE: Duration = Duration::from_secs(60);

/// Everything sessions share: built once per server.
pub struct SessionEnv {
    pub registries: Registries,
    pub verifier: Arc<Verifier>,
    pub metrics: Arc<Metrics>,
    /// Setups on their way to the registry (`limits.max_registry_backlog`).
    pub setup_backlog: Arc<SetupBacklog>,
    pub field_limits: FieldLimits,
    pub pending_messages: usize,
    pub pending_bytes: usize,
    pub unauthenticated_bytes: usize,
    pub max_message_bytes: usize,
    pub max_outbound_bytes: usize,
    pub auth_timeout: Duration,
    pub auth_leeway: Duration,
    pub heartbeat_interval: Duration,
    pub client_timeout: Duration,
    pub messages_per_second: u32,
    pub burst: u32,
}

/// Where the session is in its setup; the registry holds the authoritative state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the registry to record the connection as `accepted`.
    Registering,
    /// `accepted`, waiting for a token in an `auth` frame.
    AwaitingAuth,
    /// The `auth` frame's token waits for its provider's keys to be fetched again.
    Verifying,
    /// Token verified; the registry is taking it through `authenticated` and `services_ready`.
    SettingUp,
    ProcessingReady,
    Closing,
}

/// A frame handled in `processing_ready`: parsed, or what was wrong with it.
type Parsed = Result<ClientFrame, crate::protocol::FrameError>;

pub struct Session {
    id: ConnectionId,
    env: Arc<SessionEnv>,
    /// The registry shard the connection is registered on: its lifecycle messages (register,
    /// fail, closing, unregister) go there, in order, and are forwarded if it moved on.
    registry: Addr<Registry>,
    /// Its user's shard, where requests go once it is ready (the same as `registry` unless it
    /// authenticated with an `auth` frame on another shard).
    shard: Addr<Registry>,
    phase: Phase,
    /// The verified token's identity: given at upgrade, or from the `auth` frame.
    identity: Option<Identity>,
    resume: Option<ResumeRequest>,
    /// An `auth` frame that arrived before the registry answered `Register`.
    early_auth: Option<AuthFrame>,
    /// Early frames (section 3), unparsed, each in an allocation of its own exact size so that
    /// `pending_bytes` is what they really hold.
    pending: VecDeque<Box<str>>,
    pending_bytes: usize,
    /// The registry has answered `Register`: until then nothing may be written, since the
    /// client's first frame must be `accepted`. Frames the session had to send meanwhile wait in
    /// `held` (and a close in `held_close`).
    accepted: bool,
    held: Vec<String>,
    held_close: Option<Option<CloseReason>>,
    /// This connection's place under the unauthenticated caps, given back once it authenticates.
    unauthenticated: Option<UnauthenticatedSlot>,
    /// Frames still to write after a resume: the replay (shared with the stream's history, not
    /// counted yet) and the live events that came in behind it (counted by the registry when it
    /// handed them over). Written only while the unsent output is under
    /// `limits.max_outbound_bytes`, so a resume from seq 0 holds no more than live events may.
    backlog: VecDeque<(ByteString, bool)>,
    /// The backlog waits for its output to drain: a [`BacklogRoom`] is on its way then.
    backlog_waits: bool,
    /// A fragmented text message being reassembled.
    fragments: Option<BytesMut>,
    last_heard: Instant,
    /// Until when an `auth` frame's token may be waited for (`auth.timeout_secs` after the upgrade).
    auth_deadline: Instant,
    /// Token refreshes asked for so far: only the latest one's verdict is acted on.
    refreshes: u64,
    limiter: RateLimiter,
    expiry_timers: Vec<SpawnHandle>,
    /// Unsent output in wire bytes: the registry and this actor add, [`CountedOutput`] takes off.
    /// Also where the registry leaves deliveries for this session.
    outbound: Outbound,
    /// The deliveries taken from `outbound` (kept between wake-ups for its allocation).
    taken: Vec<Delivery>,
    /// How fast this client is read (and whether a frame header announced too much).
    gate: ReadGate,
    _slot: ConnectionSlot,
}

impl Session {
    pub fn new(
        env: Arc<SessionEnv>,
        identity: Option<Identity>,
        resume: Option<ResumeRequest>,
        slot: ConnectionSlot,
        unauthenticated: Option<UnauthenticatedSlot>,
    ) -> Session {
        let now = Instant::now();
        let auth_deadline = now + env.auth_timeout;
        let id = ConnectionId::next();
        let registry = match &identity {
            Some(identity) => env.registries.for_user(&identity.user_id),
            None => env.registries.for_connection(id),
        }
        .clone();
        Session {
            id,
            shard: registry.clone(),
            registry,
            limiter: RateLimiter::new(env.messages_per_second, env.burst, now),
            env,
            phase: Phase::Registering,
            identity,
            resume,
            early_auth: None,
            pending: VecDeque::new(),
            pending_bytes: 0,
            accepted: false,
            held: Vec::new(),
            held_close: None,
            unauthenticated,
            backlog: VecDeque::new(),
            backlog_waits: false,
            fragments: None,
            last_heard: now,
            auth_deadline,
            refreshes: 0,
            expiry_timers: Vec::new(),
            outbound: Outbound::new(),
            taken: Vec::new(),
            gate: ReadGate::default(),
            _slot: slot,
        }
    }

    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// Every frame the session writes itself goes through these, so `outbound` stays exact.
    fn send(&mut self, ctx: &mut WebsocketContext<Self>, frame: ServerFrame<'_>) {
        self.write_text(ctx, frame.to_text());
    }

    fn write_text(&mut self, ctx: &mut WebsocketContext<Self>, text: String) {
        self.outbound.add(encoded_len(text.len()));
        if self.accepted {
            ctx.text(text);
        } else {
            self.held.push(text);
        }
    }

    /// Writes a close frame and stops the actor (once `accepted` is out: see `held_close`).
    fn write_close_and_stop(&mut self, ctx: &mut WebsocketContext<Self>, reason: Option<CloseReason>) {
        if !self.accepted {
            self.held_close = Some(reason);
            return;
        }
        let description = reason.as_ref().and_then(|r| r.description.as_deref());
        self.outbound.add(close_frame_len(description, reason.is_some()));
        ctx.close(reason);
        ctx.stop();
    }

    fn send_error(
        &mut self,
        ctx: &mut WebsocketContext<Self>,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
    ) {
        self.send(ctx, ServerFrame::error(code, message, reference));
    }

    fn send_state(&mut self, ctx: &mut WebsocketContext<Self>, state: ConnectionState) {
        let id = self.id.to_string();
        let user_id = match state {
            ConnectionState::Authenticated => self.identity.as_ref().map(|i| i.user_id.as_str()),
            _ => None,
        };
        let text = ServerFrame::connection_state(state, &id, user_id).to_text();
        self.write_text(ctx, text);
    }

    /// From now on the registry delivers nothing to this session and its user slot is free.
    fn enter_closing(&mut self) {
        self.phase = Phase::Closing;
        self.pending.clear();
        self.pending_bytes = 0;
        self.registry.do_send(Closing { id: self.id });
    }

    /// Sends a close frame with `code` and stops; the registry hears `Closing` now and
    /// `Unregister` when the actor has stopped.
    fn close(&mut self, ctx: &mut WebsocketContext<Self>, code: u16, reason: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        self.enter_closing();
        debug!("{}: closing with {code} ({reason})", self.id);
        let reason = CloseReason { code: CloseCode::from(code), description: Some(reason.to_owned()) };
        self.write_close_and_stop(ctx, Some(reason));
    }

    // ----- setup ------------------------------------------------------------------------------

    fn on_accepted(&mut self, ctx: &mut WebsocketContext<Self>) {
        if self.accepted {
            return;
        }
        self.accepted = true;
        self.send_state(ctx, ConnectionState::Accepted);
        for text in std::mem::take(&mut self.held) {
            ctx.text(text);
        }
        if let Some(reason) = self.held_close.take() {
            return self.write_close_and_stop(ctx, reason);
        }
        if self.phase != Phase::Registering {
            return;
        }
        self.phase = Phase::AwaitingAuth;
        if self.identity.is_some() {
            // `Register` carried the token of the upgrade: the registry is already going on.
            self.begin_setup(ctx);
        } else if let Some(frame) = self.early_auth.take() {
            self.authenticate_with_frame(frame, ctx);
        }
    }

    fn authenticate_with_frame(&mut self, frame: AuthFrame, ctx: &mut WebsocketContext<Self>) {
        // The auth frame's resume values win over the query's (section 6).
        if frame.last_seq.is_some() || frame.epoch.is_some() {
            let query = self.resume.take().unwrap_or_default();
            self.resume = Some(ResumeRequest {
                last_seq: frame.last_seq.unwrap_or(query.last_seq),
                epoch: frame.epoch.or(query.epoch),
            });
        }
        match self.env.verifier.check(&frame.token) {
            Check::Done(verdict) => self.on_verified(verdict, ctx),
            // Its provider's keys are being fetched again (an unknown `kid`): frames that come
            // meanwhile are early messages, and the verdict comes by the auth deadline, on the
            // keys held then (`auth/key_sets.rs`).
            Check::AfterRefresh(refresh) => {
                self.phase = Phase::Verifying;
                let left = self.auth_deadline.saturating_duration_since(Instant::now());
                ctx.spawn(refresh.within(left).outcome().into_actor(self).map(|verdict, session, ctx| {
                    if session.phase == Phase::Verifying {
                        session.on_verified(verdict, ctx);
                    }
                }));
            }
        }
    }

    /// The verdict on the `auth` frame's token.
    fn on_verified(&mut self, verdict: Result<Identity, AuthFailure>, ctx: &mut WebsocketContext<Self>) {
        match verdict {
            Ok(identity) => {
                self.identity = Some(identity.clone());
                self.unauthenticated = None;
                let resume = self.resume.take();
                self.shard = self.env.registries.for_user(&identity.user_id).clone();
                let waiting = self.env.setup_backlog.enter();
                self.registry.do_send(Authenticate { id: self.id, identity, resume, waiting });
                self.begin_setup(ctx);
            }
            Err(failure) => {
                self.env.metrics.auth_failed(failure.reason());
                self.env.metrics.fail(Failure::InvalidToken);
                info!("{}: auth frame refused: {}", self.id, failure.reason());
                self.send_error(ctx, ErrorCode::InvalidToken, failure.message(), Some("auth"));
                self.close(ctx, close::TOKEN_INVALID, "token invalid");
            }
        }
    }

    /// The registry is taking the connection through setup; it has `SETUP_TIMEOUT` to finish.
    fn begin_setup(&mut self, ctx: &mut WebsocketContext<Self>) {
        self.phase = Phase::SettingUp;
        self.gate.authenticated();
        ctx.run_later(SETUP_TIMEOUT, |session, ctx| {
            if session.phase == Phase::SettingUp {
                session.registry.do_send(Fail { id: session.id, failure: Failure::SetupTimeout });
                session.send_error(ctx, ErrorCode::SetupFailed, "connection setup timed out", None);
                session.close(ctx, close::SERVER_ERROR, "setup failed");
            }
        });
    }

    fn on_processing_ready(&mut self, ctx: &mut WebsocketContext<Self>, ready: Ready) {
        let Ready { epoch, last_seq, resume, replay, runs } = ready;
        if self.phase != Phase::SettingUp {
            return;
        }
        self.phase = Phase::ProcessingReady;
        let id = self.id.to_string();
        let user_id = self.identity.as_ref().map(|i| i.user_id.as_str());
        let ready = ServerFrame::ConnectionState {
            state: ConnectionState::ProcessingReady,
            connection_id: &id,
            user_id,
            epoch: Some(&epoch),
            last_seq: Some(last_seq),
            resume,
            runs: Some(&runs),
        }
        .to_text();
        self.write_text(ctx, ready);
        self.backlog.extend(replay.into_iter().map(|frame| (frame, false)));
        self.pump_backlog(ctx);
        self.schedule_token_expiry(ctx);
        // Early messages, in arrival order, right after the ready frame (section 3); parsed only
        // now, when the connection has an owner.
        while self.phase == Phase::ProcessingReady {
            let Some(early) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= early.len();
            let parsed = parse_client_frame(&early, self.env.field_limits);
            self.process(parsed, ctx);
        }
    }

    /// Writes the resume backlog while the session is within its outbound budget; what is left
    /// waits until the socket has taken enough of the output ([`Outbound::when_below`]).
    fn pump_backlog(&mut self, ctx: &mut WebsocketContext<Self>) {
        let budget = self.env.max_outbound_bytes as i64;
        while self.outbound.pending() < budget {
            let Some((frame, counted)) = self.backlog.pop_front() else { break };
            if !counted {
                self.outbound.add(encoded_len(frame.len()));
            }
            ctx.text(frame);
        }
        if self.backlog.is_empty() || self.backlog_waits || self.phase != Phase::ProcessingReady {
            return;
        }
        self.backlog_waits = true;
        let session = ctx.address();
        self.outbound.when_below(budget, move || session.do_send(BacklogRoom));
    }

    /// `token_expiring` 60 s before `exp`, close 4003 at `exp` + leeway (section 2).
    fn schedule_token_expiry(&mut self, ctx: &mut WebsocketContext<Self>) {
        for handle in self.expiry_timers.drain(..) {
            ctx.cancel_future(handle);
        }
        let Some(expires_at) = self.identity.as_ref().map(|i| i.expires_at_ms) else {
            return;
        };
        let until = |at_ms: u64| Duration::from_millis(at_ms.saturating_sub(now_ms()));
        let notice_at = expires_at.saturating_sub(TOKEN_EXPIRY_NOTICE.as_millis() as u64);
        let notice = ctx.run_later(until(notice_at), move |session, ctx| {
            session.send(ctx, ServerFrame::TokenExpiring { expires_at });
        });
        let deadline = expires_at.saturating_add(self.env.auth_leeway.as_millis() as u64);
        let expiry = ctx.run_later(until(deadline), |session, ctx| {
            session.env.metrics.auth_failed(AuthFailure::Expired.reason());
            session.env.metrics.fail(Failure::TokenExpired);
            info!("{}: token expired without refresh", session.id);
            session.close(ctx, close::TOKEN_EXPIRED, "token expired");
        });
        self.expiry_timers = vec![notice, expiry];
    }

    // ----- client frames ----------------------------------------------------------------------

    fn on_text(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        self.env.metrics.messages_received.inc();
        match self.limiter.check(Instant::now()) {
            Verdict::Allow => {}
            Verdict::Limited => {
                self.send_error(ctx, ErrorCode::RateLimited, "too many messages; slow down", None);
                return;
            }
            Verdict::Abuse => {
                // Section 4: the 100th `rate_limited` answer is the last; the close follows it.
                self.send_error(ctx, ErrorCode::RateLimited, "too many messages; slow down", None);
                self.env.metrics.fail(Failure::RateAbuse);
                warn!("{}: closed for sustained rate-limit abuse", self.id);
                self.close(ctx, close::POLICY_VIOLATION, "rate limit abuse");
                return;
            }
        }
        match self.phase {
            Phase::ProcessingReady => {
                let parsed = parse_client_frame(text, self.env.field_limits);
                self.process(parsed, ctx);
            }
            Phase::Closing => {}
            _ if self.identity.is_none() => self.before_authentication(text, ctx),
            _ => self.queue_early(text, ctx),
        }
    }

    /// A frame from a connection nobody has vouched for yet: only its `type` is read, unless it
    /// is the `auth` frame, which is read into its fields (section 2, way 3).
    fn before_authentication(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        if peek_type(text).as_deref() != Some("auth") {
            return self.queue_early(text, ctx);
        }
        let frame = match parse_auth_frame(text) {
            Ok(frame) => frame,
            Err(error) => {
                // A broken `auth` frame is a failed authentication, answered at once.
                self.env.metrics.auth_failed(AuthFailure::Malformed.reason());
                self.env.metrics.fail(Failure::InvalidToken);
                info!("{}: malformed auth frame", self.id);
                self.send_error(ctx, ErrorCode::InvalidToken, &error.message, Some("auth"));
                return self.close(ctx, close::TOKEN_INVALID, "token invalid");
            }
        };
        match self.phase {
            Phase::AwaitingAuth => self.authenticate_with_frame(frame, ctx),
            Phase::Registering if self.early_auth.is_none() => self.early_auth = Some(frame),
            // A second `auth` while the first waits is an early message: a refresh once ready.
            _ => self.queue_early(text, ctx),
        }
    }

    /// Section 3: kept, unparsed, within `limits.pending_messages` and `limits.pending_bytes`;
    /// beyond either, the frame is answered `not_ready` and dropped.
    fn queue_early(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        let fits = self.pending.len() < self.env.pending_messages
            && self.pending_bytes + text.len() <= self.env.pending_bytes;
        if fits {
            self.pending_bytes += text.len();
            self.pending.push_back(Box::from(text));
            return;
        }
        let reference = peek_type(text);
        self.send_error(
            ctx,
            ErrorCode::NotReady,
            "the connection is not ready and its queue is full",
            reference.as_deref(),
        );
    }

    /// Handles one client frame in `processing_ready`.
    fn process(&mut self, frame: Parsed, ctx: &mut WebsocketContext<Self>) {
        match frame {
            Err(error) => self.send(ctx, error.to_frame()),
            Ok(ClientFrame::Ping { id }) => {
                self.send(ctx, ServerFrame::Pong { id: id.as_ref(), server_time: now_ms() });
            }
            Ok(ClientFrame::Auth(frame)) => self.refresh_token(frame, ctx),
            Ok(ClientFrame::UserMessage(message)) => {
                self.shard.do_send(SubmitMessage { id: self.id, message: *message });
            }
            Ok(ClientFrame::CancelRun { run_id }) => {
                self.shard.do_send(CancelRequest { id: self.id, run_id });
            }
        }
    }

    /// Section 2: a new token of the same `sub` replaces the old one in place.
    fn refresh_token(&mut self, frame: AuthFrame, ctx: &mut WebsocketContext<Self>) {
        match self.env.verifier.check(&frame.token) {
            Check::Done(verdict) => {
                self.refreshes += 1;
                self.on_refresh_verified(verdict, ctx);
            }
            Check::AfterRefresh(refresh) => {
                self.refreshes += 1;
                let this = self.refreshes;
                ctx.spawn(refresh.outcome().into_actor(self).map(move |verdict, session, ctx| {
                    // A later refresh was answered meanwhile: this older token's verdict is moot.
                    if session.phase == Phase::ProcessingReady && session.refreshes == this {
                        session.on_refresh_verified(verdict, ctx);
                    }
                }));
            }
        }
    }

    fn on_refresh_verified(
        &mut self,
        verdict: Result<Identity, AuthFailure>,
        ctx: &mut WebsocketContext<Self>,
    ) {
        match verdict {
            Err(failure) => {
                self.env.metrics.auth_failed(failure.reason());
                info!("{}: token refresh refused: {}", self.id, failure.reason());
                self.send_error(ctx, ErrorCode::InvalidToken, failure.message(), Some("auth"));
            }
            Ok(identity) if Some(&identity.user_id) != self.identity.as_ref().map(|i| &i.user_id) => {
                info!("{}: token refresh for another user refused", self.id);
                self.send_error(ctx, ErrorCode::Forbidden, "the new token is for another user", Some("auth"));
            }
            Ok(identity) => {
                let expires_at = identity.expires_at_ms;
                self.identity = Some(identity);
                self.schedule_token_expiry(ctx);
                debug!("{}: token refreshed", self.id);
                self.send(ctx, ServerFrame::AuthOk { expires_at });
            }
        }
    }

    fn on_delivery(&mut self, delivery: Delivery, ctx: &mut WebsocketContext<Self>) {
        let frames = delivery.frames();
        if self.phase != Phase::ProcessingReady {
            // Counted by the registry when it was handed over, and never to be written.
            self.outbound.release(frames.iter().map(|f| encoded_len(f.len())).sum());
            return;
        }
        if let Some(created) = delivery.created {
            self.env.metrics.observe_delivery(created.elapsed(), frames.len());
        }
        if !self.backlog.is_empty() {
            // Behind a resume that is still being written: in seq order, after it.
            self.backlog.extend(frames.iter().map(|frame| (frame.clone(), true)));
            return;
        }
        // Written into the context's buffer together: the dispatcher sends them in one write.
        for frame in frames {
            ctx.text(frame.clone());
        }
    }

    fn on_fragment(&mut self, item: Item, ctx: &mut WebsocketContext<Self>) {
        let (chunk, last) = match item {
            Item::FirstBinary(_) => {
                return self.close(ctx, close::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Item::FirstText(chunk) => {
                if self.fragments.is_some() {
                    return self.close(ctx, close::PROTOCOL_ERROR, "new message inside a fragmented one");
                }
                self.fragments = Some(BytesMut::new());
                (chunk, false)
            }
            Item::Continue(chunk) => (chunk, false),
            Item::Last(chunk) => (chunk, true),
        };
        let Some(buffer) = self.fragments.as_mut() else {
            return self.close(ctx, close::PROTOCOL_ERROR, "continuation without a first frame");
        };
        if buffer.len() + chunk.len() > self.env.max_message_bytes {
            return self.close(ctx, close::MESSAGE_TOO_BIG, "message too big");
        }
        buffer.extend_from_slice(&chunk);
        if last {
            let bytes = self.fragments.take().unwrap_or_default();
            match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                Err(_) => self.close(ctx, close::INVALID_PAYLOAD, "text is not valid UTF-8"),
            }
        }
    }
}

impl Actor for Session {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        // With a token from the upgrade, the whole setup is asked for at once.
        let resume = if self.identity.is_some() { self.resume.take() } else { None };
        self.registry.do_send(Register {
            waiting: self.env.setup_backlog.enter(),
            id: self.id,
            session: ctx.address().recipient(),
            outbound: self.outbound.clone(),
            identity: self.identity.clone(),
            resume,
        });
        ctx.run_later(self.env.auth_timeout, |session, ctx| {
            if matches!(session.phase, Phase::Registering | Phase::AwaitingAuth) {
                session.env.metrics.auth_failed(AuthFailure::Timeout.reason());
                session.env.metrics.fail(Failure::AuthTimeout);
                info!("{}: no token within the auth timeout", session.id);
                session.close(ctx, close::AUTH_TIMEOUT, "no token in time");
            }
        });
        ctx.run_interval(self.env.heartbeat_interval, |session, ctx| {
            if session.last_heard.elapsed() > session.env.client_timeout {
                session.env.metrics.fail(Failure::HeartbeatTimeout);
                info!("{}: nothing heard for {:?}; dropping", session.id, session.env.client_timeout);
                session.close(ctx, close::GOING_AWAY, "client timeout");
            } else {
                session.outbound.add(encoded_len(0));
                ctx.ping(b"");
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.registry.do_send(Unregister { id: self.id });
    }
}

impl Handler<ToSession> for Session {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        match msg {
            ToSession::Several(messages) => {
                for message in messages {
                    Handler::<ToSession>::handle(self, message, ctx);
                }
            }
            ToSession::Accepted => self.on_accepted(ctx),
            ToSession::Authenticated if self.phase == Phase::SettingUp => {
                self.send_state(ctx, ConnectionState::Authenticated);
            }
            ToSession::ServicesReady if self.phase == Phase::SettingUp => {
                self.send_state(ctx, ConnectionState::ServicesReady);
            }
            ToSession::ProcessingReady { epoch, last_seq, resume, replay, runs } => {
                self.on_processing_ready(ctx, Ready { epoch, last_seq, resume, replay, runs })
            }
            ToSession::Refused { error, close_code, reason } => {
                if let Some((code, message)) = error {
                    self.send_error(ctx, code, &message, None);
                }
                self.close(ctx, close_code, reason);
            }
            ToSession::Deliveries => {
                let mut taken = std::mem::take(&mut self.taken);
                self.outbound.take_deliveries(&mut taken);
                for delivery in taken.drain(..) {
                    self.on_delivery(delivery, ctx);
                }
                self.taken = taken;
            }
            ToSession::Shutdown => self.close(ctx, close::SERVICE_RESTART, "server restarting"),
            ToSession::SlowConsumer => {
                self.env.metrics.slow_consumer_closes.inc();
                self.close(ctx, close::SLOW_CONSUMER, "too slow to read");
            }
            other => debug!("{}: ignored {other:?} in phase {:?}", self.id, self.phase),
        }
    }
}

impl Handler<BacklogRoom> for Session {
    type Result = ();

    fn handle(&mut self, _: BacklogRoom, ctx: &mut Self::Context) {
        self.backlog_waits = false;
        self.pump_backlog(ctx);
    }
}

impl StreamHandler<Result<ws::Message, ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<ws::Message, ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        self.gate.frame_handled();
        match msg {
            Ok(ws::Message::Text(text)) => {
                if self.fragments.is_some() {
                    return self.close(ctx, close::PROTOCOL_ERROR, "new message inside a fragmented one");
                }
                self.on_text(&text, ctx)
            }
            Ok(ws::Message::Binary(_)) => {
                self.close(ctx, close::UNSUPPORTED_DATA, "binary frames are not supported")
            }
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Ping(payload)) => {
                self.outbound.add(encoded_len(payload.len()));
                ctx.pong(&payload);
            }
            Ok(ws::Message::Pong(_) | ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                debug!("{}: client closed ({:?})", self.id, reason.as_ref().map(|r| r.code));
                let answer = self.phase != Phase::Closing && self.accepted;
                if self.phase != Phase::Closing {
                    self.enter_closing();
                }
                if answer {
                    self.write_close_and_stop(ctx, reason);
                } else {
                    // Already closing, or not accepted yet (nothing may be written): the answer
                    // is the end of the stream.
                    ctx.stop();
                }
            }
            Err(ProtocolError::Overflow) => self.close(ctx, close::MESSAGE_TOO_BIG, "message too big"),
            Err(ProtocolError::Io(_)) if self.gate.tripped_on_allowance() => {
                self.env.metrics.fail(Failure::UnauthenticatedOverflow);
                info!("{}: sent more than it may before authenticating", self.id);
                self.close(ctx, close::POLICY_VIOLATION, "too much sent before authenticating")
            }
            Err(ProtocolError::Io(_)) if self.gate.tripped_on_oversized() => {
                info!("{}: frame header announced more than {} bytes", self.id, self.env.max_message_bytes);
                self.close(ctx, close::MESSAGE_TOO_BIG, "message too big")
            }
            Err(ProtocolError::Io(e)) if self.gate.payload_failed() => {
                info!("{}: connection failed: {e}", self.id);
                self.close(ctx, close::PROTOCOL_ERROR, "protocol error");
            }
            // Every other I/O error actix-web-actors 4.3.1 (pinned in Cargo.toml) reports is a
            // text frame that is not UTF-8: the gate accounts for the rest.
            Err(ProtocolError::Io(_)) => self.close(ctx, close::INVALID_PAYLOAD, "text is not valid UTF-8"),
            Err(e) => {
                info!("{}: protocol error: {e}", self.id);
                self.close(ctx, close::PROTOCOL_ERROR, "protocol error");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // A close decided before `accepted` could be written (the read gate ends the stream right
        // after the frame that decided it) waits in `held_close`: `on_accepted` writes
        // `accepted`, then the close, then stops. The registry answers `Register` first thing;
        // the timer is only a backstop.
        if self.held_close.is_some() {
            ctx.run_later(SETUP_TIMEOUT, |_, ctx| ctx.stop());
            return;
        }
        // The peer's stream ended (disconnect without a close frame).
        ctx.stop();
    }
}

/// Upgrades the request and starts the session actor on it.
pub fn start(session: Session, req: &HttpRequest, payload: web::Payload) -> actix_web::Result<HttpResponse> {
    let mut response = ws::handshake_with_protocols(req, &[SUBPROTOCOL])?;
    if session.identity.is_some() {
        // The upgrade carried a valid token: no allowance applies from the first byte.
        session.gate.authenticated();
    }
    let (max_message_bytes, unauthenticated_bytes) =
        (session.env.max_message_bytes, session.env.unauthenticated_bytes);
    let guarded = session.gate.guard(payload, max_message_bytes, unauthenticated_bytes);
    let outbound = session.outbound.clone();
    let codec = actix_http::ws::Codec::new().max_size(max_message_bytes);
    let output = WebsocketContext::with_codec(session, guarded, codec);
    Ok(response.streaming(CountedOutput { inner: Box::pin(output), outbound }))
}
