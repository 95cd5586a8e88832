//! Fan-out (protocol section 5): appending events to a user's stream and handing them to the
//! user's ready sessions within each session's outbound budget; the publish API's entry point.

use std::time::Instant;

use actix::prelude::*;
use bytestring::ByteString;
use log::{debug, warn};
use serde_json::Value;

use super::{Connection, ConnectionId, Delivery, Publish, Registry, ToSession};
use crate::metrics::Metrics;
use crate::outbound::encoded_len;
use crate::protocol::{now_ms, Event, EventKind, PublishResponse, ServerFrame};
use crate::state::ConnectionState;

/// Hands frames to one session within its outbound budget, as one mailbox message however many
/// they are. A session is slow when what it had not yet sent was already over the budget before
/// these frames (or its mailbox is full): it is flagged, told to close with 4008, and sent
/// nothing more. Judging the backlog before the frames, not after, is what lets a reading
/// session take a publish batch of up to `api.max_body_bytes` whole, which is about as large as
/// the budget itself; what a session can hold is then bounded by the budget plus one batch.
pub(super) fn deliver(
    connection: &mut Connection,
    id: ConnectionId,
    frames: &[ByteString],
    created: Option<Instant>,
    max_outbound_bytes: usize,
    metrics: &Metrics,
) -> bool {
    let Some((first, rest)) = frames.split_first() else { return true };
    if connection.slow {
        return false;
    }
    let cost: usize = frames.iter().map(|f| encoded_len(f.len())).sum();
    let before = connection.outbound.add(cost) - cost as i64;
    let sent = before <= max_outbound_bytes as i64 && {
        let delivery = Delivery { first: first.clone(), rest: rest.to_vec(), created };
        connection.session.try_send(ToSession::Deliver(delivery)).is_ok()
    };
    if sent {
        metrics.frames_sent.inc_by(frames.len() as u64);
        return true;
    }
    connection.outbound.release(cost);
    connection.slow = true;
    warn!("{id}: slow consumer: unsent output over {max_outbound_bytes} bytes; closing with 4008");
    // One control message, so it may bypass the bound (a full mailbox would refuse it).
    connection.session.do_send(ToSession::SlowConsumer);
    false
}

/// An event to append to a user's stream.
pub(super) struct NewEvent<'a> {
    pub(super) kind: EventKind,
    pub(super) thread_id: &'a str,
    pub(super) run_id: Option<&'a str>,
    pub(super) payload: &'a Value,
}

impl Registry {
    /// Appends events to a user's stream and fans them out to the user's ready sessions: each
    /// serialised once and shared by all, all of them in one message per session. Returns their
    /// seqs and how many sessions they reached.
    pub(super) fn publish(&mut self, user_id: &str, events: &[NewEvent<'_>]) -> (Vec<u64>, usize) {
        let created = Instant::now();
        let mut scratch = std::mem::take(&mut self.scratch);
        let user = self.users.entry(user_id);
        let mut seqs = Vec::with_capacity(events.len());
        let mut frames = Vec::with_capacity(events.len());
        for event in events {
            let seq = user.stream.next_seq();
            let wire = Event {
                kind: event.kind,
                seq,
                ts: now_ms(),
                thread_id: event.thread_id,
                run_id: event.run_id,
                payload: event.payload,
            };
            seqs.push(seq);
            frames.push(wire.to_frame(&mut scratch));
        }
        // Section 6: an offline user's stream is kept for the TTL after its last event.
        if user.sessions.is_empty() {
            user.stream.idle_since = Some(created);
        }
        for (seq, frame) in seqs.iter().zip(&frames) {
            self.users.keep(user_id, *seq, frame.clone());
        }
        self.scratch = scratch;
        self.metrics.events_published.inc_by(events.len() as u64);
        let Some(user) = self.users.get(user_id) else { return (seqs, 0) };
        let max = self.settings.max_outbound_bytes;
        let mut reached = 0;
        let mut slow = Vec::new();
        for id in &user.sessions {
            if let Some(connection) = self.connections.get_mut(id) {
                if connection.state != ConnectionState::ProcessingReady {
                    continue;
                }
                if deliver(connection, *id, &frames, Some(created), max, &self.metrics) {
                    reached += 1;
                } else {
                    slow.push(*id);
                }
            }
        }
        for id in slow {
            self.abandon(id);
        }
        (seqs, reached)
    }

    /// Appends one event; returns its seq.
    pub(super) fn publish_one(&mut self, user_id: &str, event: NewEvent<'_>) -> u64 {
        self.publish(user_id, std::slice::from_ref(&event)).0[0]
    }

    /// A frame for one session alone (ack, error), under the same budget as events.
    pub(super) fn send_to(&mut self, id: ConnectionId, frame: ServerFrame<'_>) {
        let max = self.settings.max_outbound_bytes;
        if let Some(connection) = self.connections.get_mut(&id) {
            let frame = ByteString::from(frame.to_text());
            if !deliver(connection, id, std::slice::from_ref(&frame), None, max, &self.metrics) {
                self.abandon(id);
            }
        }
    }
}

impl Handler<Publish> for Registry {
    type Result = MessageResult<Publish>;

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        if !msg.ticket.take() {
            debug!("publish to user {} abandoned by its caller before it was taken", msg.user_id);
            return MessageResult(None);
        }
        let events: Vec<NewEvent<'_>> = msg
            .events
            .iter()
            .map(|e| NewEvent {
                kind: e.kind,
                thread_id: &e.thread_id,
                run_id: e.run_id.as_deref(),
                payload: &e.payload,
            })
            .collect();
        let (seqs, sessions) = self.publish(&msg.user_id, &events);
        MessageResult(Some(PublishResponse { seqs, sessions }))
    }
}
