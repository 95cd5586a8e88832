//! The broker of several processes: users' streams in Redis (`[broker] kind = "redis"`,
//! docs/scale-out.md), shaped like Centrifugo's Redis engine. Each call is one Lua script (one round
//! trip): a publish assigns seqs, keeps the events in the user's Redis Stream (capped at
//! `history.events_per_user`), refreshes the TTL and publishes them on the user's channel. A
//! node subscribes to the channels of its users only, and hands what it hears to the registry's
//! one delivery entry point, which puts events in seq order once and fills gaps from the stream
//! (`registry/fanout.rs`).
//!
//! Keys: `{prefix}:{<user>}:meta|stream|dedupe|dedupe:order|sessions`,
//! channel `{prefix}:{<user>}:events`: one hash tag per user.

mod cluster;
mod connection;
mod scripts;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytestring::ByteString;
use futures_channel::{mpsc, oneshot};
use log::warn;
use rand::distr::{Alphanumeric, SampleString};
use redis::Value as RedisValue;
use serde_json::Value;

use super::stream::{verdict, ResumeRequest};
use super::{
    Attached, Broker, BrokerError, Call, NewEvent, Published, RemoteBatch, SeenMessage, Stored, SubmitIds,
    Submitted,
};
use crate::base::ConnectionId;
use crate::config::Config;
use crate::protocol::{now_ms, Event, EventKind};
use connection::{Interest, Job};
use scripts::Lua;

/// What the Redis broker is told at start.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub node: String,
    pub events_per_user: usize,
    pub ttl: Duration,
    pub dedupe_per_user: usize,
    /// A node whose heartbeat is older than this is gone: its runs end with `node_lost`.
    pub node_lease: Duration,
    /// `agent.max_response_bytes`: the text (and thinking) a run's snapshot keeps.
    pub max_run_text: usize,
    /// `broker.max_queued_bytes`: the writer's queue, bounded.
    pub max_queued_bytes: usize,
    /// `broker.cluster`: `url` lists nodes of a Redis Cluster (`cluster.rs`).
    pub cluster: bool,
    /// This process in the node registry: `node_id@generation`, a generation made anew by each
    /// process (so a restart under the same `node_id` is told from its previous life, and
    /// fenced runs are told from live ones).
    pub member: String,
}

/// Batches heard on Pub/Sub and not yet taken by the registry, at most.
const PUBSUB_BACKLOG: usize = 4096;

/// This process's generation (every registry shard of it shares one).
static GENERATION: std::sync::LazyLock<String> = std::sync::LazyLock::new(random_epoch);

/// How long a command to Redis may take: under the node lease, so that a node whose writer is
/// merely slow is never taken for dead while its commands are still on their way
/// (docs/scale-out.md, fencing).
pub fn command_timeout(lease: Duration) -> Duration {
    (lease / 2).min(Duration::from_secs(5))
}

impl RedisSettings {
    /// The nodes `url` names: one, or a Redis Cluster's (comma-separated).
    pub fn urls(&self) -> Vec<String> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect()
    }

    pub fn from_config(config: &Config) -> RedisSettings {
        RedisSettings {
            url: config.broker.url.clone(),
            prefix: config.broker.prefix.clone(),
            node: config.broker.node_name(),
            events_per_user: config.history.events_per_user.get(),
            ttl: Duration::from_secs(config.history.ttl_secs),
            dedupe_per_user: config.history.dedupe_per_user.get(),
            node_lease: Duration::from_secs(config.broker.node_lease_secs),
            max_run_text: config.agent.max_response_bytes.get(),
            max_queued_bytes: config.broker.max_queued_bytes,
            cluster: config.broker.cluster,
            member: format!("{}@{}", config.broker.node_name(), *GENERATION),
        }
    }
}

/// `url` without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Connects once, at start: a server that cannot reach its Redis does not start. Then registers
/// this process as a node before it serves (`REGISTER`): one killed before its first heartbeat
/// is reaped all the same.
pub fn check(settings: &RedisSettings) -> Result<(), String> {
    if settings.cluster {
        return check_cluster(settings);
    }
    let url = settings.url.as_str();
    let client = redis::Client::open(url).map_err(|e| format!("broker.url {}: {e}", redacted(url)))?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(3))
        .map_err(|e| format!("broker.url {}: cannot reach Redis: {e}", redacted(url)))?;
    ping_and_register(&mut connection, settings, &redacted(url))
}

/// Redis answers, and this node is registered (`REGISTER`), on one Redis or a Cluster.
fn ping_and_register(
    connection: &mut dyn redis::ConnectionLike,
    settings: &RedisSettings,
    shown: &str,
) -> Result<(), String> {
    redis::cmd("PING")
        .query::<String>(connection)
        .map_err(|e| format!("broker.url {shown}: Redis does not answer: {e}"))?;
    redis::Script::new(&scripts::REGISTER.code)
        .key(nodes_key(&settings.prefix))
        .arg(&settings.prefix)
        .arg(&settings.member)
        .arg(settings.node_lease.as_millis().max(1) as u64)
        .invoke::<i64>(connection)
        .map(|_| ())
        .map_err(|e| format!("broker.url {shown}: the node could not register: {e}"))
}

/// [`check`] on a Redis Cluster: any of its nodes answers, and the node registers.
fn check_cluster(settings: &RedisSettings) -> Result<(), String> {
    let shown = settings.urls().iter().map(|u| redacted(u)).collect::<Vec<_>>().join(",");
    let client = cluster::client(&settings.urls(), Duration::from_secs(3))
        .map_err(|e| format!("broker.url {shown}: {e}"))?;
    let mut connection = client
        .get_connection()
        .map_err(|e| format!("broker.url {shown}: cannot reach the Redis Cluster: {e}"))?;
    ping_and_register(&mut connection, settings, &shown)
}

/// The node registry's set of members (hash tag `{nodes}`: the registry is one slot).
fn nodes_key(prefix: &str) -> String {
    format!("{prefix}:{{nodes}}:members")
}

pub struct RedisBroker {
    settings: RedisSettings,
    jobs: Queue,
    interest: mpsc::UnboundedSender<Interest>,
    /// Users this node is subscribed to, with the subscription's confirmation while it is on
    /// its way (an attach waits for it: subscribe first, then read the stream).
    subscribed:
        std::collections::HashMap<String, Option<futures_util::future::Shared<oneshot::Receiver<()>>>>,
    remote: Option<mpsc::Receiver<RemoteBatch>>,
    /// Where this broker says it was fenced (`RemoteBatch::Fenced`).
    to_registry: mpsc::Sender<RemoteBatch>,
    /// The runs this process runs, with their threads: their events are appended only while
    /// Redis still has this process as their owner (fencing).
    mine: std::collections::HashMap<String, String>,
    /// Whether the Pub/Sub connection works (checked by `PING`): `/readyz` needs both.
    pubsub_up: Arc<AtomicBool>,
    /// When the streams of users here were last kept from expiring (`upkeep`).
    kept: Instant,
    scratch: Vec<u8>,
}

/// A command for the writer, with the script it calls, if any (`EVALSHA`: loaded again when
/// Redis has lost it).
struct Request {
    command: redis::Cmd,
    script: Option<&'static Lua>,
}

impl From<redis::Cmd> for Request {
    fn from(command: redis::Cmd) -> Request {
        Request { command, script: None }
    }
}

/// The writer's queue: jobs in call order, and the bytes of those not answered yet, bounded by
/// `broker.max_queued_bytes` (a slow Redis refuses calls at once instead of growing memory).
#[derive(Clone)]
struct Queue {
    jobs: mpsc::UnboundedSender<Job>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// A script's answer, when the writer has it.
type Answer = oneshot::Receiver<Result<RedisValue, BrokerError>>;

fn random_epoch() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 8).to_ascii_lowercase()
}

fn text(value: &RedisValue) -> Option<String> {
    match value {
        RedisValue::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        RedisValue::SimpleString(s) => Some(s.clone()),
        RedisValue::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn items(value: RedisValue) -> Result<Vec<RedisValue>, BrokerError> {
    match value {
        RedisValue::Array(items) => Ok(items),
        other => Err(BrokerError::Unexpected(format!("redis: {other:?}"))),
    }
}

fn unexpected(what: &str) -> BrokerError {
    BrokerError::Unexpected(format!("redis: the answer to {what}"))
}

/// A frame with a placeholder seq, split around it: the script puts the real seq between.
fn split_frame(event: &NewEvent<'_>, scratch: &mut Vec<u8>) -> (String, String) {
    const PLACEHOLDER: &str = "18446744073709551615";
    let wire = Event {
        kind: event.kind,
        seq: u64::MAX,
        ts: now_ms(),
        thread_id: event.thread_id,
        run_id: event.run_id,
        payload: event.payload,
    };
    let frame = wire.to_frame(scratch);
    // `type` comes first and is one of a fixed set of names: the first match is the seq.
    match frame.find(PLACEHOLDER) {
        Some(at) => (frame[..at].to_owned(), frame[at + PLACEHOLDER.len()..].to_owned()),
        None => (frame.to_string(), String::new()),
    }
}

impl RedisBroker {
    /// Starts the broker's connections on the current arbiter (the registry's).
    pub fn start(
        settings: RedisSettings,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let (sender, queued) = mpsc::unbounded();
        let jobs = Queue { jobs: sender, queued: Default::default(), max: settings.max_queued_bytes };
        let (interest, asked) = mpsc::unbounded();
        // Bounded: a registry that falls behind holds the subscriber back, and Redis, past its
        // `client-output-buffer-limit pubsub`, drops the connection: the reconnect fills what was
        // missed from the streams. Memory stays bounded either way (docs/scale-out.md).
        let (messages_tx, messages) = mpsc::channel(PUBSUB_BACKLOG);
        let (reconnected_tx, reconnected) = mpsc::unbounded();
        let (remote_tx, remote) = mpsc::channel(PUBSUB_BACKLOG);
        let timeout = command_timeout(settings.node_lease);
        let pubsub_up = Arc::new(AtomicBool::new(false));
        let up = Arc::clone(&pubsub_up);
        let urls = settings.urls();
        let connector = if settings.cluster {
            let client = cluster::client(&urls, timeout).map_err(|e| connection::broker_error(&e))?;
            actix_web::rt::spawn(cluster::writer(client.clone(), queued, metrics));
            actix_web::rt::spawn(cluster::subscriber(urls, asked, messages_tx, reconnected_tx, up));
            cluster::Connector::Cluster(Box::new(client))
        } else {
            let client =
                redis::Client::open(settings.url.as_str()).map_err(|e| connection::broker_error(&e))?;
            actix_web::rt::spawn(connection::writer(client.clone(), queued, metrics, timeout));
            actix_web::rt::spawn(connection::subscriber(
                client.clone(),
                asked,
                messages_tx,
                reconnected_tx,
                up,
            ));
            cluster::Connector::Single(client)
        };
        actix_web::rt::spawn(heartbeat(connector, settings.clone(), jobs.clone(), remote_tx.clone()));
        let control = format!("{}:node:{}:control", settings.prefix, settings.member);
        let (subscribed, _) = oneshot::channel();
        let _ = interest.unbounded_send(Interest::Subscribe(control.clone(), subscribed));
        let to_registry = remote_tx.clone();
        actix_web::rt::spawn(forward(settings.prefix.clone(), control, messages, reconnected, remote_tx));
        Ok(RedisBroker {
            settings,
            jobs,
            interest,
            subscribed: Default::default(),
            remote: Some(remote),
            to_registry,
            mine: Default::default(),
            pubsub_up,
            kept: Instant::now(),
            scratch: Vec::new(),
        })
    }

    fn key(&self, user: &str, what: &str) -> String {
        format!("{}:{{{user}}}:{what}", self.settings.prefix)
    }

    fn channel(&self, user: &str) -> String {
        self.key(user, "events")
    }

    fn ttl_ms(&self) -> u64 {
        self.settings.ttl.as_millis().max(1) as u64
    }

    /// Queues a script now (its effect is decided in call order) and answers later.
    fn eval(&mut self, script: &'static Lua, keys: &[String], args: Vec<Vec<u8>>) -> Answer {
        queue(&self.jobs, script_command(script, keys, args))
    }

    fn appended(&mut self, user: &str, events: &[NewEvent<'_>]) -> (Answer, Vec<(String, String)>) {
        // Events of this process's own runs are fenced (checked against the run's owner);
        // those a backend publishes belong to no node.
        let own = events.iter().any(|e| e.run_id.is_some_and(|run| self.mine.contains_key(run)));
        let owner = if own { self.settings.member.as_str() } else { "" };
        let (command, parts) = append_command(&self.settings, user, owner, events, &mut self.scratch);
        (queue(&self.jobs, command), parts)
    }

    /// A script whose answer nobody waits for; a failure is logged.
    fn eval_quietly(
        &mut self,
        what: &'static str,
        script: &'static Lua,
        keys: &[String],
        args: Vec<Vec<u8>>,
    ) {
        let answered = self.eval(script, keys, args);
        actix_web::rt::spawn(async move {
            if let Err(e) = answer(answered).await {
                warn!("broker: {what} not recorded: {e}");
            }
        });
    }

    fn node_key(&self, what: &str) -> String {
        node_key(&self.settings.prefix, &self.settings.member, what)
    }

    /// `SADD`/`SREM` of `member` in this node's set `what` (`runs`, `sessions`): what the
    /// reaper takes over if this node goes away. Nobody waits for it.
    fn node_set(&mut self, verb: &str, what: &str, member: &str) {
        let mut command = redis::cmd(verb);
        command.arg(self.node_key(what)).arg(member);
        drop(queue(&self.jobs, command));
    }
}

/// A key of a member of the node registry.
fn node_key(prefix: &str, member: &str, what: &str) -> String {
    format!("{prefix}:{{nodes}}:{member}:{what}")
}

/// The append script for `events` of `user` (fenced by `owner` unless it is empty), and each
/// frame's parts around its seq.
fn append_command(
    settings: &RedisSettings,
    user: &str,
    owner: &str,
    events: &[NewEvent<'_>],
    scratch: &mut Vec<u8>,
) -> (Request, Vec<(String, String)>) {
    let script = scripts::Publishing::new(settings.cluster).append_events;
    append_like(script, settings, user, owner, &[], events, scratch)
}

/// A script built on the append script, with its extra arguments after the owner:
/// `APPEND_EVENTS` (none), `REAP_RUN` (the run and its dead owner), `PUBLISH_ONCE` (the key and
/// the dedupe cap; it also takes the dedupe keys).
fn append_like(
    script: &'static Lua,
    settings: &RedisSettings,
    user: &str,
    owner: &str,
    extra: &[&str],
    events: &[NewEvent<'_>],
    scratch: &mut Vec<u8>,
) -> (Request, Vec<(String, String)>) {
    let parts: Vec<(String, String)> = events.iter().map(|e| split_frame(e, scratch)).collect();
    let key = |what: &str| format!("{}:{{{user}}}:{what}", settings.prefix);
    let mut keys = vec!["meta", "stream", "live", "holders", "runs", "reaped"];
    if script.sha == scripts::PUBLISH_ONCE.sha || script.sha == scripts::PUBLISH_ONCE_SHARDED.sha {
        keys.extend(["dedupe", "dedupe:order"]);
    }
    let mut command = redis::cmd("EVALSHA");
    command.arg(&script.sha).arg(keys.len());
    for what in keys {
        command.arg(key(what));
    }
    command
        .arg(key("events"))
        .arg(random_epoch())
        .arg(settings.events_per_user)
        .arg(settings.ttl.as_millis().max(1) as u64)
        .arg(settings.max_run_text)
        .arg(events.len())
        .arg(owner);
    for arg in extra {
        command.arg(*arg);
    }
    for ((head, tail), event) in parts.iter().zip(events) {
        let (op, data) = follow_op(event);
        command.arg(head).arg(tail).arg(op).arg(event.run_id.unwrap_or_default()).arg(data);
    }
    (Request { command, script: Some(script) }, parts)
}

/// What an event changes in its run's snapshot (the `follow` of the append script): the same
/// reading of a run's events as `store::Transcript`, kept in Redis so that a tab joining on
/// any node gets it with the stream's last seq, atomically.
fn follow_op(event: &NewEvent<'_>) -> (&'static str, String) {
    let Some(_) = event.run_id else { return ("", String::new()) };
    let text = |field: &str| event.payload.get(field).and_then(Value::as_str).unwrap_or_default().to_owned();
    match event.kind {
        EventKind::AgentStarted => ("s", event.thread_id.to_owned()),
        EventKind::AgentMessageChunk => ("c", text("delta")),
        EventKind::AgentThinking => ("k", text("text")),
        EventKind::ToolExecuting => ("x", event.payload.to_string()),
        EventKind::ToolCompleted => ("r", event.payload.to_string()),
        EventKind::AgentCompleted | EventKind::AgentError => ("e", event.thread_id.to_owned()),
        _ => ("", String::new()),
    }
}

/// The last `max` bytes of `text` (on a character's boundary), and whether that is not all.
fn last_bytes(text: &str, max: usize) -> (&str, bool) {
    let mut from = text.len().saturating_sub(max);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    (&text[from..], from > 0)
}

/// The runs of the `ATTACH` script's answer as `processing_ready.runs` shows them, oldest first:
/// the last `max` bytes of each run's text and thinking (`agent.max_response_bytes`).
fn snapshots(runs: &RedisValue, max: usize) -> Vec<Value> {
    let RedisValue::Array(runs) = runs else { return Vec::new() };
    let mut snapshots: Vec<(u64, Value)> = runs
        .iter()
        .filter_map(|run| {
            let RedisValue::Array(fields) = run else { return None };
            let field = |i: usize| fields.get(i).and_then(text).unwrap_or_default();
            let started_seq: u64 = field(2).parse().ok()?;
            let mut calls: Vec<Value> = Vec::new();
            let mut results: Vec<Value> = Vec::new();
            if let Some(RedisValue::Array(tools)) = fields.get(6) {
                for tool in tools.iter().filter_map(text) {
                    let (op, json) = tool.split_at(tool.len().min(1));
                    let Ok(value) = serde_json::from_str::<Value>(json) else { continue };
                    match op {
                        "x" => calls.push(serde_json::json!({
                            "tool_call_id": value["tool_call_id"], "tool": value["tool"], "args": value["args"]
                        })),
                        _ => results.push(value),
                    }
                }
            }
            for call in &mut calls {
                let result = results.iter().find(|r| r["tool_call_id"] == call["tool_call_id"]);
                if let Some(result) = result {
                    call["result"] = result["result"].clone();
                }
            }
            let (content, thinking) = (field(4), field(5));
            let (content, content_cut) = last_bytes(&content, max);
            let (thinking, thinking_cut) = last_bytes(&thinking, max);
            let mut snapshot = serde_json::json!({
                "run_id": field(0), "thread_id": field(1), "started_seq": started_seq,
                "content": content, "thinking": thinking, "tool_calls": calls,
            });
            if field(3) == "1" || content_cut || thinking_cut {
                snapshot["truncated"] = Value::Bool(true);
            }
            Some((started_seq, snapshot))
        })
        .collect();
    snapshots.sort_by_key(|(seq, _)| *seq);
    snapshots.into_iter().map(|(_, snapshot)| snapshot).collect()
}

/// `EVALSHA script` with its keys and arguments.
fn script_command(script: &'static Lua, keys: &[String], args: Vec<Vec<u8>>) -> Request {
    let mut command = redis::cmd("EVALSHA");
    command.arg(&script.sha).arg(keys.len());
    for key in keys {
        command.arg(key);
    }
    for arg in args {
        command.arg(arg);
    }
    Request { command, script: Some(script) }
}

/// Hands a command to the writer, in call order; its answer comes later.
fn queue(queue: &Queue, request: impl Into<Request>) -> Answer {
    use std::sync::atomic::Ordering::Relaxed;
    let Request { command, script } = request.into();
    let (answer, answered) = oneshot::channel();
    let bytes: usize =
        command.args_iter().map(|arg| if let redis::Arg::Simple(a) = arg { a.len() } else { 0 }).sum();
    if queue.queued.load(Relaxed).saturating_add(bytes) > queue.max {
        let _ = answer.send(Err(BrokerError::Unavailable(format!(
            "redis: {} bytes of commands wait for Redis already (broker.max_queued_bytes)",
            queue.queued.load(Relaxed)
        ))));
        return answered;
    }
    queue.queued.fetch_add(bytes, Relaxed);
    let permit = connection::Permit { bytes, queued: Arc::clone(&queue.queued) };
    let job = Job { command, script, answer, _permit: permit };
    if queue.jobs.unbounded_send(job).is_err() {
        warn!("broker: the Redis writer is gone");
    }
    answered
}

/// The `RANGE` script's answer: `{seq, frame, seq, frame...}`.
fn ranged(reply: Vec<RedisValue>) -> Vec<Stored> {
    reply
        .chunks(2)
        .filter_map(|pair| {
            let seq = pair.first().and_then(text)?.parse().ok()?;
            Some(Stored { seq, frame: ByteString::from(pair.get(1).and_then(text)?) })
        })
        .collect()
}

async fn answer(answered: Answer) -> Result<RedisValue, BrokerError> {
    answered.await.map_err(|_| BrokerError::Unavailable("redis: the writer went away".into()))?
}

fn stored(parts: Vec<(String, String)>, first: u64) -> Vec<Stored> {
    parts
        .into_iter()
        .enumerate()
        .map(|(i, (head, tail))| {
            let seq = first + i as u64;
            Stored { seq, frame: ByteString::from(format!("{head}{seq}{tail}")) }
        })
        .collect()
}

/// Turns channel messages into batches for the registry, and reconnects into a "fill every
/// user" batch (`RemoteBatch::Reconnected`).
async fn forward(
    prefix: String,
    control: String,
    mut messages: mpsc::Receiver<connection::Message>,
    mut reconnected: mpsc::UnboundedReceiver<()>,
    mut remote: mpsc::Sender<RemoteBatch>,
) {
    use futures_util::{SinkExt, StreamExt};
    let start = format!("{prefix}:{{");
    loop {
        futures_util::select! {
            message = messages.next() => {
                let Some((channel, payload)) = message else { return };
                if channel == control {
                    let text = String::from_utf8_lossy(&payload);
                    let mut parts = text.split('\n');
                    if let (Some("cancel"), Some(user), Some(run_id)) = (parts.next(), parts.next(), parts.next()) {
                        let _ = remote.send(RemoteBatch::Cancel { user: user.to_owned(), run_id: run_id.to_owned() }).await;
                    }
                    continue;
                }
                let user = channel.strip_prefix(&start).and_then(|rest| rest.strip_suffix("}:events"));
                let Some(user) = user else { continue };
                match parse_batch(&payload) {
                    Some((epoch, events)) => {
                        let _ = remote.send(RemoteBatch::Events { user: user.to_owned(), epoch, events }).await;
                    }
                    None => warn!("broker: a message on {channel} that is not an event batch"),
                }
            }
            again = reconnected.next() => {
                if again.is_none() { return }
                let _ = remote.send(RemoteBatch::Reconnected).await;
            }
        }
    }
}

/// `epoch \n first_seq \n frame \n frame...`
fn parse_batch(payload: &[u8]) -> Option<(String, Vec<Stored>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut lines = text.split('\n');
    let epoch = lines.next()?.to_owned();
    let first: u64 = lines.next()?.parse().ok()?;
    let events = lines
        .enumerate()
        .map(|(i, frame)| Stored { seq: first + i as u64, frame: ByteString::from(frame) })
        .collect();
    Some((epoch, events))
}

/// Every second, on a connection of its own (never behind the writer's queue): this node is
/// alive (`HEARTBEAT`), what dead nodes left is taken over (each run ended `node_lost` in one
/// step with its record, `REAP_RUN`; their session slots freed), and a node that finds itself
/// reaped while it was away is fenced: the registry closes its sessions and the process stops
/// (docs/scale-out.md).
async fn heartbeat(
    connector: cluster::Connector,
    settings: RedisSettings,
    jobs: Queue,
    mut to_registry: mpsc::Sender<RemoteBatch>,
) {
    let beat = redis::Script::new(&scripts::HEARTBEAT.code);
    let lease = settings.node_lease.as_millis().max(1) as u64;
    let node_id = settings.member.rsplit_once('@').map_or(settings.member.as_str(), |(id, _)| id);
    let mut connection = None;
    let mut every = actix_web::rt::time::interval(Duration::from_secs(1));
    let mut scratch = Vec::new();
    loop {
        every.tick().await;
        if connection.is_none() {
            match connector.connect(command_timeout(settings.node_lease)).await {
                Ok(made) => connection = Some(made),
                Err(e) => {
                    warn!("broker: heartbeat: {e}");
                    continue;
                }
            }
        }
        let Some(manager) = connection.as_mut() else { continue };
        let reply = beat
            .key(nodes_key(&settings.prefix))
            .arg(&settings.prefix)
            .arg(&settings.member)
            .arg(lease)
            .arg(node_id)
            .invoke_async::<RedisValue>(manager)
            .await;
        let reply = match reply.map_err(|e| connection::broker_error(&e)).and_then(items) {
            Ok(reply) => reply,
            Err(e) => {
                warn!("broker: heartbeat: {e}");
                continue;
            }
        };
        if reply.first().and_then(text).as_deref() == Some("fenced") {
            log::error!(
                "broker: node {} was taken for dead while it was away (its lease lapsed) and its runs were ended elsewhere; it stops",
                settings.member
            );
            let _ = to_registry.try_send(RemoteBatch::Fenced);
            return;
        }
        let mut reaped = reply.into_iter().skip(1).map(|list| items(list).unwrap_or_default());
        let (runs, sessions) = (reaped.next().unwrap_or_default(), reaped.next().unwrap_or_default());
        for left in runs.chunks(2) {
            let (Some(member), Some(dead)) = (text(&left[0]), left.get(1).and_then(text)) else { continue };
            let mut parts = member.splitn(3, '\n');
            let (Some(user), Some(run_id), Some(thread)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let payload =
                serde_json::json!({"code": "node_lost", "message": "the server running this run went away"});
            let event = NewEvent {
                kind: EventKind::AgentError,
                thread_id: thread,
                run_id: Some(run_id),
                payload: &payload,
            };
            let (command, _) = append_like(
                scripts::Publishing::new(settings.cluster).reap_run,
                &settings,
                user,
                "",
                &[run_id, dead.as_str()],
                std::slice::from_ref(&event),
                &mut scratch,
            );
            let reaped = queue(&jobs, command);
            let done = node_key(&settings.prefix, &dead, "runs");
            let (jobs, what) = (jobs.clone(), format!("run {run_id} of user {user}"));
            actix_web::rt::spawn(taken_over(reaped, jobs, done, member, what));
        }
        for left in sessions.chunks(2) {
            let (Some(member), Some(dead)) = (text(&left[0]), left.get(1).and_then(text)) else { continue };
            let Some((user, session)) = member.split_once('\n') else { continue };
            let mut command = redis::cmd("HDEL");
            command.arg(format!("{}:{{{user}}}:sessions", settings.prefix)).arg(session);
            let freed = queue(&jobs, command);
            let done = node_key(&settings.prefix, &dead, "sessions");
            let what = format!("session {session} of user {user}");
            actix_web::rt::spawn(taken_over(freed, jobs.clone(), done, member, what));
        }
    }
}

/// What a dead node left, once taken over (`answered`), leaves its set `done`: until then the
/// heartbeat hands it out again.
async fn taken_over(answered: Answer, jobs: Queue, done: String, member: String, what: String) {
    match answer(answered).await {
        Ok(RedisValue::Array(ended)) if !ended.is_empty() => {
            warn!("{what}: its node is gone; ended with agent_error node_lost");
        }
        Ok(_) => {}
        Err(e) => return log::debug!("broker: {what}: not taken over yet ({e})"),
    }
    let mut command = redis::cmd("SREM");
    command.arg(done).arg(member);
    drop(queue(&jobs, command));
}

impl Broker for RedisBroker {
    fn append(&mut self, user: &str, events: &[NewEvent<'_>]) -> Call<Vec<Stored>> {
        let (answered, parts) = self.appended(user, events);
        let mut to_registry = self.to_registry.clone();
        Box::pin(async move {
            let reply = items(answer(answered).await?)?;
            if reply.first().and_then(text).as_deref() == Some("fenced") {
                let run = reply.get(1).and_then(text).unwrap_or_default();
                log::error!(
                    "broker: run {run} is no longer this node's (it was taken over while this node was away)"
                );
                let _ = to_registry.try_send(RemoteBatch::Fenced);
                return Err(BrokerError::Unavailable("redis: this node was fenced".into()));
            }
            let first = reply
                .get(1)
                .and_then(text)
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| unexpected("append"))?;
            Ok(stored(parts, first))
        })
    }

    fn publish_once(&mut self, user: &str, key: &str, events: &[NewEvent<'_>]) -> Call<Published> {
        let own = events.iter().any(|e| e.run_id.is_some_and(|run| self.mine.contains_key(run)));
        let owner = if own { self.settings.member.clone() } else { String::new() };
        let cap = self.settings.dedupe_per_user.to_string();
        let (command, parts) = append_like(
            scripts::Publishing::new(self.settings.cluster).publish_once,
            &self.settings,
            user,
            &owner,
            &[key, &cap],
            events,
            &mut self.scratch,
        );
        let answered = queue(&self.jobs, command);
        let mut to_registry = self.to_registry.clone();
        Box::pin(async move {
            let reply = items(answer(answered).await?)?;
            match reply.first().and_then(text).as_deref() {
                Some("again") => {
                    let seen = reply.get(1).and_then(text).unwrap_or_default();
                    let (first, count) = seen.split_once(' ').ok_or_else(|| unexpected("publish"))?;
                    let first: u64 = first.parse().map_err(|_| unexpected("publish"))?;
                    let count: u64 = count.parse().map_err(|_| unexpected("publish"))?;
                    Ok(Published::Again((first..first + count).collect()))
                }
                Some("fenced") => {
                    let _ = to_registry.try_send(RemoteBatch::Fenced);
                    Err(BrokerError::Unavailable("redis: this node was fenced".into()))
                }
                _ => {
                    let first = reply
                        .get(1)
                        .and_then(text)
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| unexpected("publish"))?;
                    Ok(Published::New(stored(parts, first)))
                }
            }
        })
    }

    fn submit(
        &mut self,
        user: &str,
        client_msg_id: Option<&str>,
        SubmitIds { message_id, run_id, attempt, starts_run }: SubmitIds<'_>,
        echo: &NewEvent<'_>,
    ) -> Call<Submitted> {
        let (head, tail) = split_frame(echo, &mut self.scratch);
        // A run is this process's from its message on: recorded with the message (its node's
        // set first), so a reaper ends it if this process goes away before it starts.
        let owner = if starts_run {
            self.node_set("SADD", "runs", &format!("{user}\n{run_id}\n{}", echo.thread_id));
            self.mine.insert(run_id.to_owned(), echo.thread_id.to_owned());
            self.settings.member.clone()
        } else {
            String::new()
        };
        let keys = [
            self.key(user, "meta"),
            self.key(user, "stream"),
            self.key(user, "dedupe"),
            self.key(user, "dedupe:order"),
            self.key(user, "live"),
            self.key(user, "holders"),
            self.key(user, "runs"),
        ];
        let args: Vec<Vec<u8>> = vec![
            self.channel(user).into_bytes(),
            random_epoch().into_bytes(),
            self.settings.events_per_user.to_string().into_bytes(),
            self.ttl_ms().to_string().into_bytes(),
            client_msg_id.unwrap_or_default().as_bytes().to_vec(),
            message_id.as_bytes().to_vec(),
            run_id.as_bytes().to_vec(),
            self.settings.dedupe_per_user.to_string().into_bytes(),
            head.clone().into_bytes(),
            tail.clone().into_bytes(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            attempt.as_bytes().to_vec(),
            owner.into_bytes(),
            echo.thread_id.as_bytes().to_vec(),
        ];
        let answered = self.eval(scripts::Publishing::new(self.settings.cluster).submit, &keys, args);
        Box::pin(async move {
            let reply = items(answer(answered).await?)?;
            match reply.first().and_then(text).as_deref() {
                Some("seen") => {
                    let seen = reply.get(1).and_then(text).ok_or_else(|| unexpected("submit"))?;
                    parse_seen(&seen).map(Submitted::Seen).ok_or_else(|| unexpected("submit"))
                }
                Some("appended") => {
                    let seq = reply
                        .get(2)
                        .and_then(text)
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| unexpected("submit"))?;
                    let claim =
                        starts_run.then(|| reply.get(3).and_then(text).filter(|holder| !holder.is_empty()));
                    let frame = ByteString::from(format!("{head}{seq}{tail}"));
                    Ok(Submitted::Appended(Stored { seq, frame }, claim))
                }
                _ => Err(unexpected("submit")),
            }
        })
    }

    fn seen(&mut self, user: &str, client_msg_id: &str) -> Call<Option<SeenMessage>> {
        let mut command = redis::cmd("HGET");
        command.arg(self.key(user, "dedupe")).arg(client_msg_id);
        let answered = queue(&self.jobs, command);
        Box::pin(async move {
            match answer(answered).await? {
                RedisValue::Nil => Ok(None),
                value => Ok(text(&value).as_deref().and_then(parse_seen)),
            }
        })
    }

    fn attach(&mut self, user: &str, resume: Option<&ResumeRequest>) -> Call<Attached> {
        let keys = [self.key(user, "meta"), self.key(user, "stream"), self.key(user, "live")];
        let resume = resume.cloned();
        let after = resume.as_ref().map_or(u64::MAX, |r| r.last_seq);
        let args: Vec<Vec<u8>> = vec![
            random_epoch().into_bytes(),
            self.ttl_ms().to_string().into_bytes(),
            // No resume asked: nothing to replay (an `after` past any seq).
            after.to_string().into_bytes(),
        ];
        let subscribed = self.subscribed.get(user).cloned().flatten();
        let jobs = self.jobs.clone();
        let max_run_text = self.settings.max_run_text;
        Box::pin(async move {
            // Subscribe first, then read the stream: nothing published in between is missed.
            if let Some(subscribed) = subscribed {
                let _ = subscribed.await;
            }
            let reply = items(answer(queue(&jobs, script_command(&scripts::ATTACH, &keys, args))).await?)?;
            let runs = Some(reply.get(3).map(|runs| snapshots(runs, max_run_text)).unwrap_or_default());
            let mut fields = reply.iter().map(text);
            let epoch = fields.next().flatten().ok_or_else(|| unexpected("attach"))?;
            let last_seq: u64 =
                fields.next().flatten().and_then(|s| s.parse().ok()).ok_or_else(|| unexpected("attach"))?;
            let oldest = fields.next().flatten().and_then(|s| s.parse::<u64>().ok()).unwrap_or(last_seq + 1);
            let kept: Vec<ByteString> = fields.skip(1).flatten().map(ByteString::from).collect();
            let Some(request) = resume else {
                return Ok(Attached { epoch, last_seq, info: None, frames: Vec::new(), runs });
            };
            let resumed = verdict(&request, &epoch, last_seq, oldest);
            // The script read what follows the request's `last_seq`; a resume that is not
            // complete replays every kept event instead, one more read.
            let frames = if resumed.complete {
                kept
            } else {
                // Up to `last_seq` only: what follows comes live (`Registry::live_from`), and a
                // frame read here too would arrive twice.
                let bounds = vec![oldest.to_string().into_bytes(), last_seq.to_string().into_bytes()];
                let read = script_command(&scripts::RANGE, &keys[1..2], bounds);
                ranged(items(answer(queue(&jobs, read)).await?)?).into_iter().map(|e| e.frame).collect()
            };
            let info = crate::protocol::ResumeInfo {
                from_seq: resumed.from_seq,
                replayed: frames.len() as u64,
                complete: resumed.complete,
            };
            Ok(Attached { epoch, last_seq, info: Some(info), frames, runs })
        })
    }

    fn range(&mut self, user: &str, from_seq: u64) -> Call<Vec<Stored>> {
        let keys = [self.key(user, "stream")];
        let answered = self.eval(&scripts::RANGE, &keys, vec![from_seq.to_string().into_bytes(), Vec::new()]);
        Box::pin(async move { Ok(ranged(items(answer(answered).await?)?)) })
    }

    fn admit(&mut self, user: &str, connection: ConnectionId, cap: usize) -> Call<bool> {
        let session = format!("{}/{connection}", self.settings.node);
        // The node's set first (its own slot in a Redis Cluster): the reaper must know every
        // slot this node may hold; one not taken leaves a member the reaper frees as nothing.
        self.node_set("SADD", "sessions", &format!("{user}\n{session}"));
        let record = serde_json::json!({"node": self.settings.node, "connected_at": now_ms()});
        let keys = [self.key(user, "sessions")];
        let args = vec![
            session.into_bytes(),
            record.to_string().into_bytes(),
            cap.to_string().into_bytes(),
            self.ttl_ms().to_string().into_bytes(),
        ];
        let answered = self.eval(&scripts::ADMIT, &keys, args);
        Box::pin(async move { Ok(matches!(answer(answered).await?, RedisValue::Int(1))) })
    }

    fn leave(&mut self, user: &str, connection: ConnectionId) -> Call<()> {
        let session = format!("{}/{connection}", self.settings.node);
        let keys = ["sessions", "meta", "stream", "dedupe", "dedupe:order"].map(|what| self.key(user, what));
        let args = vec![session.clone().into_bytes(), self.ttl_ms().to_string().into_bytes()];
        let answered = self.eval(&scripts::LEAVE, &keys, args);
        self.node_set("SREM", "sessions", &format!("{user}\n{session}"));
        Box::pin(async move { answer(answered).await.map(|_| ()) })
    }

    fn run_started(&mut self, user: &str, run_id: &str, thread_id: &str) {
        self.node_set("SADD", "runs", &format!("{user}\n{run_id}\n{thread_id}"));
        let keys = [self.key(user, "runs")];
        let args = vec![
            run_id.as_bytes().to_vec(),
            self.settings.member.clone().into_bytes(),
            thread_id.as_bytes().to_vec(),
            self.ttl_ms().to_string().into_bytes(),
        ];
        self.mine.insert(run_id.to_owned(), thread_id.to_owned());
        self.eval_quietly("a run's owner", &scripts::RUN_STARTED, &keys, args);
    }

    fn run_ended(&mut self, user: &str, run_id: &str) {
        let thread = self.mine.remove(run_id).unwrap_or_default();
        let keys = [self.key(user, "runs")];
        self.eval_quietly("a run's end", &scripts::RUN_ENDED, &keys, vec![run_id.as_bytes().to_vec()]);
        self.node_set("SREM", "runs", &format!("{user}\n{run_id}\n{thread}"));
    }

    fn claim_thread(&mut self, user: &str, thread_id: &str, run_id: &str) -> Call<Option<String>> {
        self.node_set("SADD", "runs", &format!("{user}\n{run_id}\n{thread_id}"));
        let keys = [self.key(user, "holders"), self.key(user, "runs")];
        let args = vec![
            thread_id.as_bytes().to_vec(),
            run_id.as_bytes().to_vec(),
            self.ttl_ms().to_string().into_bytes(),
            self.settings.member.as_bytes().to_vec(),
        ];
        // The run is this process's from here on (its events are fenced), whether it starts now
        // or waits for the holder.
        self.mine.insert(run_id.to_owned(), thread_id.to_owned());
        let answered = self.eval(&scripts::CLAIM, &keys, args);
        Box::pin(async move {
            let holder = answer(answered).await?;
            Ok(text(&holder).filter(|holder| !holder.is_empty()))
        })
    }

    fn cancel_elsewhere(&mut self, user: &str, run_id: &str) -> Call<bool> {
        let keys = [self.key(user, "runs")];
        let answered = self.eval(&scripts::CANCEL_ELSEWHERE, &keys, vec![run_id.as_bytes().to_vec()]);
        let (jobs, prefix, user, run_id) =
            (self.jobs.clone(), self.settings.prefix.clone(), user.to_owned(), run_id.to_owned());
        let publish = if self.settings.cluster { "SPUBLISH" } else { "PUBLISH" };
        // On its own task: the cancel goes out even when nobody waits for the answer.
        let (sent, told) = oneshot::channel();
        actix_web::rt::spawn(async move {
            let told_owner = async {
                let Some(owner) = text(&answer(answered).await?).filter(|owner| !owner.is_empty()) else {
                    return Ok(false);
                };
                let mut command = redis::cmd(publish);
                command
                    .arg(format!("{prefix}:node:{owner}:control"))
                    .arg(format!("cancel\n{user}\n{run_id}"));
                answer(queue(&jobs, command)).await?;
                Ok(true)
            };
            let _ = sent.send(told_owner.await);
        });
        Box::pin(async move {
            told.await.map_err(|_| BrokerError::Unavailable("redis: the broker went away".into()))?
        })
    }

    fn interest(&mut self, user: &str, present: bool) {
        let channel = self.channel(user);
        if present {
            let (done, subscribed) = oneshot::channel();
            let _ = self.interest.unbounded_send(Interest::Subscribe(channel, done));
            use futures_util::FutureExt;
            self.subscribed.insert(user.to_owned(), Some(subscribed.shared()));
        } else if self.subscribed.remove(user).is_some() {
            let _ = self.interest.unbounded_send(Interest::Unsubscribe(channel));
        }
    }

    fn remote_events(&mut self) -> Option<mpsc::Receiver<RemoteBatch>> {
        self.remote.take()
    }

    fn sessions(&mut self, user: &str) -> Call<Vec<super::SessionRecord>> {
        let mut command = redis::cmd("HGETALL");
        command.arg(self.key(user, "sessions"));
        let answered = queue(&self.jobs, command);
        Box::pin(async move {
            let reply = items(answer(answered).await?)?;
            Ok(reply
                .chunks(2)
                .filter_map(|pair| {
                    let field = pair.first().and_then(text)?;
                    let record: serde_json::Value =
                        serde_json::from_str(&pair.get(1).and_then(text)?).ok()?;
                    let (_, connection_id) = field.split_once('/')?;
                    Some(super::SessionRecord {
                        connection_id: connection_id.to_owned(),
                        node: record["node"].as_str()?.to_owned(),
                        connected_at: record["connected_at"].as_u64().unwrap_or(0),
                    })
                })
                .collect())
        })
    }

    fn ping(&mut self) -> Call<()> {
        let answered = queue(&self.jobs, redis::cmd("PING"));
        let pubsub_up = self.pubsub_up.load(Ordering::Relaxed);
        Box::pin(async move {
            answer(answered).await?;
            if pubsub_up {
                Ok(())
            } else {
                Err(BrokerError::Unavailable("redis: the Pub/Sub connection is down".into()))
            }
        })
    }

    fn upkeep(&mut self) -> bool {
        // The streams and session slots of users with sessions here outlive the TTL while they
        // are used: an open tab's stream never expires under it (docs/scale-out.md). Every
        // quarter TTL, one script per user.
        if self.kept.elapsed() < self.settings.ttl / 4 {
            return false;
        }
        self.kept = Instant::now();
        let ttl = self.ttl_ms().to_string().into_bytes();
        let users: Vec<String> = self.subscribed.keys().cloned().collect();
        for user in users {
            let keys =
                ["sessions", "meta", "stream", "dedupe", "dedupe:order"].map(|what| self.key(&user, what));
            drop(self.eval(&scripts::KEEP, &keys, vec![ttl.clone()])); // a refresh; nobody waits for it
        }
        false
    }

    fn gauges(&self) -> (usize, usize) {
        (self.subscribed.len(), 0)
    }
}

fn parse_seen(text: &str) -> Option<SeenMessage> {
    let mut parts = text.split(' ');
    let message_id = parts.next()?.to_owned();
    let run_id = parts.next()?.to_owned();
    let seq = parts.next()?.parse().ok()?;
    let attempt = parts.next().unwrap_or_default().to_owned();
    Some(SeenMessage { message_id, run_id, seq, at: Instant::now(), attempt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_message_round_trips() {
        let (epoch, events) = parse_batch(b"ab12cd34\n7\n{\"seq\":7}\n{\"seq\":8}").unwrap();
        assert_eq!(epoch, "ab12cd34");
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [7, 8]);
        assert_eq!(&*events[1].frame, "{\"seq\":8}");
        assert!(parse_batch(b"only-epoch").is_none());
    }

    #[test]
    fn the_frame_is_split_around_its_seq() {
        let payload = serde_json::json!({"text": "18446744073709551615"});
        let event = NewEvent {
            kind: crate::protocol::EventKind::AgentThinking,
            thread_id: "t",
            run_id: Some("r"),
            payload: &payload,
        };
        let (head, tail) = split_frame(&event, &mut Vec::new());
        assert_eq!(head, r#"{"type":"agent_thinking","seq":"#);
        assert!(
            tail.starts_with(r#","ts":"#) && tail.ends_with(r#""payload":{"text":"18446744073709551615"}}"#)
        );
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redacted("redis://:secret@db:6379/0"), "redis://…@db:6379/0");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
