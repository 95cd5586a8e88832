//! One simulated client session of the load generator: connect, authenticate, wait for
//! `processing_ready`, then play its part of the scenario while checking everything it receives
//! (seq continuity, the user it belongs to, the shape of each run).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::{Plan, Scenario, Shared};

/// The frame fields the load generator looks at, borrowed from the text where possible.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    thread_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    run_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    state: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default)]
    payload: Option<Payload>,
}

#[derive(Deserialize)]
struct Payload {
    /// Set by the fan-out publisher: when the event was published, in µs since the epoch.
    #[serde(default)]
    t_us: Option<u64>,
}

/// What one session measured and counted.
#[derive(Default)]
pub struct Outcome {
    /// `None` when it reached `processing_ready`, else why not (`http_401`, `close_4004`, ...).
    pub failure: Option<String>,
    pub connect_us: Option<u64>,
    pub ack_us: Vec<u64>,
    /// chat: round trips of a `ping` sent with each message.
    pub pong_us: Vec<u64>,
    pub completed_us: Vec<u64>,
    pub delivery_us: Vec<u64>,
    pub events: u64,
    pub seq_gaps: u64,
    pub seq_duplicates: u64,
    pub foreign_events: u64,
    pub malformed_runs: u64,
    pub incomplete: bool,
}

type Socket = WebSocketStream<TcpStream>;

pub fn thread_of(user: &str) -> String {
    format!("lt-thread-{user}")
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

async fn connect(plan: &Plan, index: usize, token: &str) -> Result<Socket, String> {
    let (url, addr) = &plan.nodes[index % plan.nodes.len()];
    let addr: SocketAddr = *addr;
    let socket = match addr.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if !plan.source_ips.is_empty() {
        let ip = plan.source_ips[index % plan.source_ips.len()];
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = socket.connect(addr).await.map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    let mut request = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}").parse().map_err(|_| "token is not a header value".to_owned())?;
    request.headers_mut().insert("Authorization", bearer);
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => Err(format!("http_{}", response.status().as_u16())),
        Err(e) => Err(format!("handshake: {e}")),
    }
}

/// Per-session bookkeeping of what arrived.
struct Checker {
    thread: String,
    /// Demo runs are checked for their shape; fan-out events are not runs.
    check_runs: bool,
    /// Events counted here and not yet added to the shared counter.
    unreported: u64,
    last_seq: u64,
    /// run id -> has its terminal event arrived
    runs: HashMap<String, bool>,
}

impl Checker {
    fn event(&mut self, frame: &Frame<'_>, outcome: &mut Outcome, shared: &Shared) {
        let Some(seq) = frame.seq else { return };
        outcome.events += 1;
        // The shared counter (for the progress line) is bumped in steps: one atomic per event
        // from every session would make the load generator its own bottleneck.
        self.unreported += 1;
        if self.unreported == 64 {
            shared.events.fetch_add(self.unreported, Ordering::Relaxed);
            self.unreported = 0;
        }
        if seq <= self.last_seq {
            outcome.seq_duplicates += 1;
        } else {
            outcome.seq_gaps += seq - self.last_seq - 1;
            self.last_seq = seq;
        }
        if frame.thread_id.as_deref() != Some(self.thread.as_str()) {
            outcome.foreign_events += 1;
        }
        if let Some(t_us) = frame.payload.as_ref().and_then(|p| p.t_us) {
            outcome.delivery_us.push(now_us().saturating_sub(t_us));
        }
        let (true, Some(run_id)) = (self.check_runs, frame.run_id.as_deref()) else { return };
        let terminal = matches!(&*frame.kind, "agent_completed" | "agent_error");
        match self.runs.get_mut(run_id) {
            // A run starts with agent_started...
            None => {
                if frame.kind != "agent_started" {
                    outcome.malformed_runs += 1;
                }
                self.runs.insert(run_id.to_owned(), terminal);
            }
            // ...and nothing follows its one terminal event.
            Some(ended) if *ended => outcome.malformed_runs += 1,
            Some(ended) => *ended = terminal,
        }
    }

    fn finished_runs(&self) -> usize {
        self.runs.values().filter(|ended| **ended).count()
    }
}

/// Runs one session from connect to the end of the scenario.
/// `permit` is one of the connect phase's slots; it is given back once the session is set up.
pub async fn run(
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    index: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Outcome {
    let mut outcome = Outcome::default();
    let user_index = index % plan.users;
    let user = plan.user_id(user_index);
    let started = Instant::now();
    let connected =
        tokio::time::timeout(plan.connect_timeout, connect(&plan, index, &plan.tokens[user_index])).await;
    let mut ws = match connected {
        Ok(Ok(ws)) => ws,
        Ok(Err(reason)) => return outcome.failed(reason, &shared),
        Err(_) => return outcome.failed("connect_timeout".into(), &shared),
    };
    let check_runs = matches!(plan.scenario, Scenario::Chat | Scenario::Hostile);
    let mut checker =
        Checker { thread: thread_of(&user), check_runs, unreported: 0, last_seq: 0, runs: HashMap::new() };

    // Setup: read until processing_ready.
    let deadline = tokio::time::Instant::now() + plan.connect_timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return outcome.failed("setup_timeout".into(), &shared),
            Ok(None) => return outcome.failed("closed_in_setup".into(), &shared),
            Ok(Some(Err(e))) => return outcome.failed(format!("error_in_setup: {e}"), &shared),
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                return outcome.failed(format!("close_{code}"), &shared);
            }
            Ok(Some(Ok(Message::Text(text)))) => {
                let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else { continue };
                if frame.state.as_deref() == Some("processing_ready") {
                    break;
                }
                if frame.kind == "error" {
                    return outcome.failed(format!("error_in_setup: {text}"), &shared);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    drop(permit);
    outcome.connect_us = Some(started.elapsed().as_micros() as u64);
    shared.ready.fetch_add(1, Ordering::Relaxed);
    shared.settled.notify_one();

    let mut go = shared.go.clone();
    let _ = go.wait_for(|go| *go).await;
    let result = match plan.scenario {
        Scenario::Idle => idle(&plan, &shared, &mut ws).await,
        Scenario::Chat => chat(&plan, &shared, &mut ws, &mut checker, &mut outcome, index).await,
        Scenario::Hostile => {
            // The attacks are in full swing before the first real message.
            tokio::time::sleep(plan.attack_warmup).await;
            chat(&plan, &shared, &mut ws, &mut checker, &mut outcome, index).await
        }
        Scenario::Fanout => fanout(&plan, &shared, &mut ws, &mut checker, &mut outcome).await,
    };
    shared.events.fetch_add(checker.unreported, Ordering::Relaxed);
    if let Err(reason) = result {
        outcome.incomplete = true;
        shared.incomplete.fetch_add(1, Ordering::Relaxed);
        log::debug!("session {index}: {reason}");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    outcome
}

impl Outcome {
    fn failed(mut self, reason: String, shared: &Shared) -> Outcome {
        self.failure = Some(reason);
        shared.failed.fetch_add(1, Ordering::Relaxed);
        shared.settled.notify_one();
        self
    }
}

/// Holds the session open, answering pings, until the scenario ends.
async fn idle(plan: &Plan, shared: &Shared, ws: &mut Socket) -> Result<(), String> {
    let mut stop = shared.stop.clone();
    let hold = plan.hold;
    let until_stop = async {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::pin!(until_stop);
    let deadline = tokio::time::sleep(hold + plan.connect_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut until_stop => return Ok(()),
            _ = &mut deadline => return Err("idle hold overran".into()),
            next = ws.next() => match next {
                Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
                None | Some(Err(_)) => return Err("connection lost".into()),
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Sends `messages` user messages, each after the previous run completed, and reads until every
/// run of its user (all of the user's sessions' runs) has ended.
async fn chat(
    plan: &Plan,
    shared: &Shared,
    ws: &mut Socket,
    checker: &mut Checker,
    outcome: &mut Outcome,
    index: usize,
) -> Result<(), String> {
    let expected_runs = plan.sessions_of_user(index % plan.users) * plan.messages;
    let mut sent = 0;
    // client_msg_id -> (sent at, acked run id)
    let mut mine: HashMap<String, (Instant, Option<String>)> = HashMap::new();
    let mut waiting_for: Option<String> = None;
    let mut pinged_at: Option<Instant> = None;
    let mut next_send = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + plan.scenario_timeout;
    loop {
        if waiting_for.is_none() && sent < plan.messages && tokio::time::Instant::now() >= next_send {
            let id = format!("s{index}-m{sent}");
            let frame = serde_json::json!({
                "type": "user_message", "thread_id": checker.thread, "content": plan.message_text, "client_msg_id": id,
            });
            // A ping beside each message: its round trip is the session's responsiveness while
            // runs are going on.
            let ping = serde_json::json!({"type": "ping", "id": sent});
            ws.send(Message::text(ping.to_string())).await.map_err(|e| e.to_string())?;
            pinged_at = Some(Instant::now());
            ws.send(Message::text(frame.to_string())).await.map_err(|e| e.to_string())?;
            mine.insert(id.clone(), (Instant::now(), None));
            waiting_for = Some(id);
            sent += 1;
            next_send = tokio::time::Instant::now() + plan.message_interval;
        }
        if sent == plan.messages && waiting_for.is_none() && checker.finished_runs() >= expected_runs {
            return Ok(());
        }
        let wake = if waiting_for.is_none() && sent < plan.messages { next_send } else { deadline };
        let next = match tokio::time::timeout_at(wake.min(deadline), ws.next()).await {
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "chat timed out with {} of {expected_runs} runs ended",
                    checker.finished_runs()
                ));
            }
            Err(_) => continue,
            Ok(next) => next,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            None | Some(Err(_)) => return Err("connection lost".into()),
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else { continue };
        match &*frame.kind {
            "ack" => {
                let Some((at, run)) = frame.client_msg_id.as_deref().and_then(|id| mine.get_mut(id)) else {
                    continue;
                };
                outcome.ack_us.push(at.elapsed().as_micros() as u64);
                *run = frame.run_id.map(Cow::into_owned);
            }
            "error" => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            "pong" => {
                if let Some(at) = pinged_at.take() {
                    outcome.pong_us.push(at.elapsed().as_micros() as u64);
                }
            }
            _ => {
                checker.event(&frame, outcome, shared);
                let terminal = matches!(&*frame.kind, "agent_completed" | "agent_error");
                if let (true, Some(waiting)) = (terminal, waiting_for.as_ref()) {
                    let (at, run) = &mine[waiting];
                    if run.as_deref().is_some() && run.as_deref() == frame.run_id.as_deref() {
                        outcome.completed_us.push(at.elapsed().as_micros() as u64);
                        waiting_for = None;
                    }
                }
            }
        }
    }
}

/// Listens until every event published to its user has arrived.
async fn fanout(
    plan: &Plan,
    shared: &Shared,
    ws: &mut Socket,
    checker: &mut Checker,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + plan.scenario_timeout;
    while outcome.events < plan.events as u64 {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| format!("fan-out timed out after {} of {} events", outcome.events, plan.events))?;
        match next {
            Some(Ok(Message::Text(text))) => {
                if let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) {
                    checker.event(&frame, outcome, shared);
                }
            }
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            None | Some(Err(_)) => return Err("connection lost".into()),
            Some(Ok(_)) => {}
        }
    }
    Ok(())
}
