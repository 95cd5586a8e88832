//! Fan-out (protocol section 5): appending events to a user's stream (through the broker) and
//! handing them to the user's ready sessions here within each session's outbound budget; the
//! publish API's entry point.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;
use log::{debug, warn};

use super::{Connection, Publish, PublishError, Registry, ToSession};
use crate::base::{encoded_len, ConnectionId, Delivery};
use crate::broker::{BrokerError, NewEvent, Published, Stored};
use crate::metrics::Metrics;
use crate::protocol::{EventKind, PublishResponse, PublishedEvent, ServerFrame};
use crate::state::ConnectionState;
use crate::store::{Confirmed, PublishedAnswer};
use serde_json::Value;

/// What handing frames to a session came to.
pub(super) enum Handed {
    /// In its inbox, with a wake-up already on its way (or nothing to hand).
    Queued,
    /// In its inbox, which was empty: the session needs a wake-up ([`wake`]).
    NeedsWake,
    /// Too slow: flagged, told to close with 4008, nothing handed.
    Slow,
}

/// Hands frames to one session within its outbound budget, into its inbox (`outbound.rs`). A
/// session is slow when what it had not yet sent was already over the budget before these
/// frames: it is flagged, told to close with 4008, and sent nothing more. Judging the backlog
/// before the frames, not after, is what lets a reading session take a publish batch of up to
/// `api.max_body_bytes` whole, which is about as large as the budget itself; what a session can
/// hold is then bounded by the budget plus one batch.
pub(super) fn hand_over(
    connection: &mut Connection,
    id: ConnectionId,
    batch: &Batch,
    from: usize,
    created: Option<Instant>,
    max_outbound_bytes: usize,
    metrics: &Metrics,
) -> Handed {
    let frames = &batch.frames[from.min(batch.frames.len())..];
    if frames.is_empty() {
        return Handed::Queued;
    }
    if connection.slow {
        return Handed::Slow;
    }
    let cost = batch.cost_from(from);
    let before = connection.outbound.add(cost) - cost as i64;
    if before > max_outbound_bytes as i64 {
        connection.outbound.release(cost);
        too_slow(connection, id, max_outbound_bytes);
        return Handed::Slow;
    }
    metrics.frames_sent.inc_by(frames.len() as u64);
    match connection.outbound.hand_over(Delivery::new(Arc::clone(&batch.frames), from, created)) {
        true => Handed::NeedsWake,
        false => Handed::Queued,
    }
}

/// Wakes a session whose inbox has frames, with `try_send`, so that a full mailbox still counts
/// as too slow; false when it was (what waits in its inbox is then taken back, never written).
pub(super) fn wake(connection: &mut Connection, id: ConnectionId, max_outbound_bytes: usize) -> bool {
    if connection.slow || connection.session.try_send(ToSession::Deliveries).is_ok() {
        return !connection.slow;
    }
    let mut taken = Vec::new();
    connection.outbound.take_deliveries(&mut taken);
    let waiting: usize = taken.iter().flat_map(Delivery::frames).map(|f| encoded_len(f.len())).sum();
    connection.outbound.release(waiting);
    too_slow(connection, id, max_outbound_bytes);
    false
}

fn too_slow(connection: &mut Connection, id: ConnectionId, max_outbound_bytes: usize) {
    connection.slow = true;
    warn!("{id}: slow consumer: unsent output over {max_outbound_bytes} bytes; closing with 4008");
    // One control message, so it may bypass the bound (a full mailbox would refuse it).
    connection.session.do_send(ToSession::SlowConsumer);
}

/// Frames serialised once for every session of a user, with the wire bytes from each frame to
/// the end (a session's budget is charged without walking the batch again per session).
pub(super) struct Batch {
    frames: Arc<[ByteString]>,
    cost_to_end: Vec<usize>,
}

impl Batch {
    pub(super) fn new(frames: Vec<ByteString>) -> Batch {
        let mut cost_to_end = vec![0; frames.len() + 1];
        for (i, frame) in frames.iter().enumerate().rev() {
            cost_to_end[i] = cost_to_end[i + 1] + encoded_len(frame.len());
        }
        Batch { frames: frames.into(), cost_to_end }
    }

    fn cost_from(&self, from: usize) -> usize {
        self.cost_to_end.get(from).copied().unwrap_or(0)
    }
}

impl Registry {
    /// Appends events to a user's stream through the broker. Once it answers, they go to the
    /// user's sessions here ([`Registry::deliver_events`]) and `done` learns their seqs and how
    /// many sessions they reached, or why nothing was published.
    pub(super) fn publish(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        events: &[NewEvent<'_>],
        done: impl FnOnce(&mut Registry, Result<(Vec<u64>, usize), BrokerError>, &mut Context<Self>) + 'static,
    ) {
        let created = Instant::now();
        let call = self.broker.append(user_id, events);
        let user = user_id.to_owned();
        self.when(ctx, user_id, call, move |registry, answer, ctx| {
            registry.published(ctx, &user, created, answer.map(Published::New), done)
        });
    }

    /// [`Registry::publish`] once per `key` of the user (`Broker::publish_once`): a key used
    /// before answers the seqs it was given then, and nothing is delivered again.
    pub(super) fn publish_keyed(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        key: &str,
        events: &[NewEvent<'_>],
        done: impl FnOnce(&mut Registry, Result<(Vec<u64>, usize), BrokerError>, &mut Context<Self>) + 'static,
    ) {
        let created = Instant::now();
        let call = self.broker.publish_once(user_id, key, events);
        let user = user_id.to_owned();
        self.when(ctx, user_id, call, move |registry, answer, ctx| {
            registry.published(ctx, &user, created, answer, done)
        });
    }

    /// The broker's answer to a publish: new events delivered here, or why nothing was.
    fn published(
        &mut self,
        ctx: &mut Context<Self>,
        user: &str,
        created: Instant,
        answer: Result<Published, BrokerError>,
        done: impl FnOnce(&mut Registry, Result<(Vec<u64>, usize), BrokerError>, &mut Context<Self>),
    ) {
        match answer {
            Ok(Published::New(stored)) => {
                self.metrics.events_published.inc_by(stored.len() as u64);
                let reached = self.deliver_events(ctx, user, &stored, created, true);
                done(self, Ok((stored.iter().map(|e| e.seq).collect(), reached)), ctx);
            }
            Ok(Published::Again(seqs)) => done(self, Ok((seqs, 0)), ctx),
            Err(e) => {
                warn!("broker: events for user {user} not published: {e}");
                self.metrics.fail(e.failure());
                done(self, Err(e), ctx);
            }
        }
    }

    /// Appends one event; a failure is logged and counted (its run's caller is the agent).
    pub(super) fn publish_one(&mut self, ctx: &mut Context<Self>, user_id: &str, event: NewEvent<'_>) {
        self.publish(ctx, user_id, std::slice::from_ref(&event), |_, _, _| {});
    }

    /// The one way events reach this process's sessions, whoever appended them (this process
    /// or, through a shared broker, another): in seq order and once (a shared broker brings
    /// this process's own events twice, and may skip some: Pub/Sub is at most once, so a gap is
    /// filled from the stream when `fill_gaps`), each frame serialised once and shared by all,
    /// all of them in the inbox of each `processing_ready` session of the user. Returns how many
    /// sessions they reached. The wake-ups wait in `self.wakes` until the broker call's
    /// continuation has returned (`broker_calls.rs::when`), so whoever asked hears first.
    pub(super) fn deliver_events(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        stored: &[Stored],
        created: Instant,
        fill_gaps: bool,
    ) -> usize {
        let Some(user) = self.local.get_mut(user_id) else { return 0 };
        // `None`: no session here has a place in the stream yet, so there is nothing to be in
        // order with.
        let delivered = user.delivered;
        let fresh = &stored[stored.partition_point(|e| delivered.is_some_and(|d| e.seq <= d))..];
        let (Some(first), Some(last)) = (fresh.first(), fresh.last()) else { return 0 };
        if let Some(delivered) = delivered.filter(|d| first.seq > d + 1) {
            if fill_gaps {
                if user.filling {
                    // One fill at a time per user: what this batch brought is read after it,
                    // unless the fill already reached it.
                    user.heard = user.heard.max(last.seq);
                    return 0;
                }
                debug!(
                    "user {user_id}: events {}..{} missed; filled from the stream",
                    delivered + 1,
                    first.seq
                );
                self.fill(ctx, user_id, delivered + 1);
                return 0;
            }
            // What was missed is no longer kept (the stream's MAXLEN trimmed it): never a silent
            // gap; the sessions resume and learn `complete: false` (docs/scale-out.md, as
            // Centrifugo disconnects).
            warn!(
                "user {user_id}: events {}..{} were missed and are no longer kept; sessions here resume",
                delivered + 1,
                first.seq - 1
            );
            self.resume_elsewhere(user_id);
            return 0;
        }
        user.delivered = Some(last.seq);
        self.trimmer.relayed(fresh.iter().map(|e| e.frame.len()).sum());
        let user = &self.local[user_id];
        let batch = Batch::new(fresh.iter().map(|e| e.frame.clone()).collect());
        let max = self.settings.max_outbound_bytes;
        let mut reached = 0;
        let mut slow = Vec::new();
        for id in &user.sessions {
            if let Some(connection) = self.connections.get_mut(id) {
                if connection.state != ConnectionState::ProcessingReady {
                    continue;
                }
                // What the connection's replay already had is not sent again.
                let from = fresh.partition_point(|e| e.seq <= connection.after);
                match hand_over(connection, *id, &batch, from, Some(created), max, &self.metrics) {
                    Handed::Queued => reached += 1,
                    Handed::NeedsWake => {
                        reached += 1;
                        self.wakes.push(*id);
                    }
                    Handed::Slow => slow.push(*id),
                }
            }
        }
        for id in slow {
            self.abandon(id);
        }
        self.remote_runs_ended(ctx, user_id, fresh);
        reached
    }

    /// Sends the wake-ups [`Registry::deliver_events`] left in `self.wakes`.
    pub(super) fn wake_sessions(&mut self) {
        let max = self.settings.max_outbound_bytes;
        let mut wakes = std::mem::take(&mut self.wakes);
        for id in wakes.drain(..) {
            if let Some(connection) = self.connections.get_mut(&id) {
                if !wake(connection, id, max) {
                    self.abandon(id);
                }
            }
        }
        self.wakes = wakes;
    }

    /// Reads the user's kept events from `from_seq` on and delivers them: a gap filled. What
    /// the stream no longer keeps is not asked for again.
    pub(super) fn fill(&mut self, ctx: &mut Context<Self>, user_id: &str, from_seq: u64) {
        self.metrics.gap_fills.inc();
        if let Some(local) = self.local.get_mut(user_id) {
            local.filling = true;
        }
        let call = self.broker.range(user_id, from_seq);
        let user = user_id.to_owned();
        self.when(ctx, user_id, call, move |registry, answer, ctx| {
            if let Some(local) = registry.local.get_mut(user.as_str()) {
                local.filling = false;
            }
            match answer {
                Ok(events) => {
                    registry.deliver_events(ctx, &user, &events, Instant::now(), false);
                    // Events heard while it was on its way and past what it read: once more.
                    let behind = registry.local.get_mut(user.as_str()).and_then(|local| {
                        let heard = std::mem::take(&mut local.heard);
                        local.delivered.filter(|d| heard > *d).map(|d| d + 1)
                    });
                    if let Some(from) = behind {
                        registry.fill(ctx, &user, from);
                    }
                }
                Err(e) => warn!("user {user}: missed events not read from the stream: broker: {e}"),
            }
        });
    }

    /// A connection's replay is in hand (it had events up to `last_seq` of stream `epoch`):
    /// live events reach it from `last_seq + 1` on. The first ready session of the user here
    /// sets where this process's delivery stands.
    pub(super) fn live_from(&mut self, id: ConnectionId, user_id: &str, epoch: &str, last_seq: u64) {
        let ready = ConnectionState::ProcessingReady;
        let Some(user) = self.local.get(user_id) else { return };
        let others_ready = user
            .sessions
            .iter()
            .any(|s| *s != id && self.connections.get(s).is_some_and(|c| c.state == ready));
        if let Some(connection) = self.connections.get_mut(&id) {
            connection.after = last_seq;
        }
        if let Some(user) = self.local.get_mut(user_id) {
            if !others_ready || user.epoch.as_deref() != Some(epoch) {
                user.delivered = Some(last_seq);
                user.epoch = Some(epoch.to_owned());
            }
        }
    }

    /// A frame for one session alone (ack, error), under the same budget as events.
    pub(super) fn send_to(&mut self, id: ConnectionId, frame: ServerFrame<'_>) {
        let max = self.settings.max_outbound_bytes;
        if let Some(connection) = self.connections.get_mut(&id) {
            let batch = Batch::new(vec![ByteString::from(frame.to_text())]);
            let woken = match hand_over(connection, id, &batch, 0, None, max, &self.metrics) {
                Handed::Queued => true,
                Handed::NeedsWake => wake(connection, id, max),
                Handed::Slow => false,
            };
            if !woken {
                self.abandon(id);
            }
        }
    }
}

impl Handler<Publish> for Registry {
    type Result = ResponseFuture<Option<Result<PublishResponse, PublishError>>>;

    fn handle(&mut self, msg: Publish, ctx: &mut Self::Context) -> Self::Result {
        if !msg.ticket.take() {
            debug!("publish to user {} abandoned by its caller before it was taken", msg.user_id);
            return Box::pin(std::future::ready(None));
        }
        let (answer, answered) = futures_channel::oneshot::channel();
        let Publish { user_id, events, idempotency_key, .. } = msg;
        let answers: Vec<PublishedAnswer> =
            events.iter().filter_map(|event| published_answer(&user_id, event)).collect();
        let key = idempotency_key;
        if answers.is_empty() {
            self.publish_batch(ctx, &user_id, &events, key.as_deref(), answer);
        } else {
            // A publisher's answer is stored before its `agent_completed` reaches anyone, as a
            // run's messages are (docs/conversations.md, "What is stored, and when").
            let call = self.settings.store.add_answers(answers);
            let user = user_id.clone();
            self.when_stored(ctx, &user, call, move |registry, stored, ctx| match stored {
                Ok(made) => {
                    for (thread_id, title) in made {
                        registry.thread_changed(ctx, &user_id, &thread_id, Some(&title));
                    }
                    registry.publish_batch(ctx, &user_id, &events, key.as_deref(), answer);
                }
                Err(e) => {
                    warn!("publish to user {user_id}: the answer was not stored: {e}");
                    registry.metrics.fail(e.failure());
                    let _ = answer.send(Err(PublishError::Store(e)));
                }
            });
        }
        Box::pin(async move { answered.await.ok() })
    }
}

impl Registry {
    /// A publish's events onto the stream, all or nothing; the seqs of what a publisher's answer
    /// completed are given to the store (`seq` in the threads API).
    fn publish_batch(
        &mut self,
        ctx: &mut Context<Self>,
        user_id: &str,
        events: &[PublishedEvent],
        key: Option<&str>,
        answer: futures_channel::oneshot::Sender<Result<PublishResponse, PublishError>>,
    ) {
        let batch: Vec<NewEvent<'_>> = events
            .iter()
            .map(|e| NewEvent {
                kind: e.kind,
                thread_id: &e.thread_id,
                run_id: e.run_id.as_deref(),
                payload: &e.payload,
            })
            .collect();
        let completed: Vec<(usize, String)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == EventKind::AgentCompleted)
            .filter_map(|(i, e)| Some((i, e.run_id.clone()?)))
            .collect();
        let user = user_id.to_owned();
        let done = move |registry: &mut Registry,
                         published: Result<(Vec<u64>, usize), BrokerError>,
                         _: &mut Context<Self>| {
            if let (Ok((seqs, _)), Some(epoch)) =
                (&published, registry.local.get(user.as_str()).and_then(|u| u.epoch.clone()))
            {
                for (i, run_id) in completed {
                    if let Some(seq) = seqs.get(i) {
                        registry.settings.store.confirm(&user, Confirmed::Run(run_id), &epoch, *seq);
                    }
                }
            }
            let published = published.map(|(seqs, sessions)| PublishResponse { seqs, sessions });
            let _ = answer.send(published.map_err(PublishError::Broker));
        };
        match key {
            Some(key) => self.publish_keyed(ctx, user_id, &format!("api:{key}"), &batch, done),
            None => self.publish(ctx, user_id, &batch, done),
        }
    }
}

/// The answer a published `agent_completed` carries in `response.content`, to be stored.
fn published_answer(user_id: &str, event: &PublishedEvent) -> Option<PublishedAnswer> {
    if event.kind != EventKind::AgentCompleted {
        return None;
    }
    let content = event.payload.get("response")?.get("content")?.as_str().filter(|c| !c.is_empty())?;
    let status = match event.payload.get("status").and_then(Value::as_str) {
        Some("cancelled") => "cancelled",
        _ => "ok",
    };
    Some(PublishedAnswer {
        user_id: user_id.to_owned(),
        thread_id: event.thread_id.clone(),
        run_id: event.run_id.clone()?,
        content: content.to_owned(),
        status,
        created_at: crate::protocol::now_ms(),
    })
}
