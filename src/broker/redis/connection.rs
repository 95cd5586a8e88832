//! The Redis broker's two connections. Commands go through one writer task in the order the
//! broker's calls were made, as pipelines of whatever is waiting (one round trip carries many
//! calls under load); the connection manager reconnects by itself. Events from other nodes
//! arrive on a Pub/Sub connection subscribed to the channels of users with sessions here,
//! resubscribed after a reconnect.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::stream::LocalBoxStream;
use futures_util::StreamExt;
use log::{info, warn};
use redis::aio::ConnectionManager;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::scripts::Lua;
use crate::broker::BrokerError;
use crate::metrics::Metrics;

/// One command and where its answer goes.
pub struct Job {
    pub command: redis::Cmd,
    /// The script an `EVALSHA` calls: loaded again when Redis no longer has it.
    pub script: Option<&'static Lua>,
    pub answer: oneshot::Sender<Result<redis::Value, BrokerError>>,
    /// Its size, counted against `broker.max_queued_bytes` until it is answered (dropped).
    pub _permit: Permit,
}

/// A job's bytes in the writer's queue, given back when the job is done with.
pub struct Permit {
    pub bytes: usize,
    pub queued: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Most commands sent in one pipeline.
pub(super) const MAX_PIPELINE: usize = 512;

/// A failed command: one sent whose answer never came in time may have run, `Unknown`; Redis away (not reached, a node loading or failing over) is
/// `Unavailable`; anything else Redis says is an answer this code did not expect.
pub fn broker_error(error: &redis::RedisError) -> BrokerError {
    let away = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
            )
        );
    // A command that timed out was sent and may have run. (A connection found dropped is taken
    // as not reached: the command was refused by a dead socket, as after Redis stopped.)
    if error.is_timeout() {
        // Sent, perhaps run: only an idempotent retry can tell (docs/scale-out.md).
        BrokerError::Unknown(format!("redis: {error}"))
    } else if away {
        BrokerError::Unavailable(format!("redis: {error}"))
    } else {
        BrokerError::Unexpected(format!("redis: {error}"))
    }
}

/// The calls waiting now, `first` first, at most [`MAX_PIPELINE`]: one pipeline's worth.
pub(super) fn batch_from(first: Job, jobs: &mut mpsc::UnboundedReceiver<Job>) -> Vec<Job> {
    let mut batch = vec![first];
    while batch.len() < MAX_PIPELINE {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch
}

/// Answers every call of a batch that could not be sent: no connection to Redis.
pub(super) fn refuse(batch: Vec<Job>, e: &redis::RedisError, metrics: &Metrics) {
    metrics.broker_connected.set(0);
    let error = broker_error(e);
    for job in batch {
        let _ = job.answer.send(Err(error.clone()));
    }
}

/// Sends the jobs in order, each batch of waiting jobs as one pipeline.
pub async fn writer(
    client: redis::Client,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    metrics: Arc<Metrics>,
    timeout: Duration,
) {
    let mut connection: Option<ConnectionManager> = None;
    while let Some(first) = jobs.next().await {
        let batch = batch_from(first, &mut jobs);
        if connection.is_none() {
            // Short retries and timeouts: while Redis is away, calls fail fast (clients are told
            // `unavailable` and send again) instead of waiting with the registry's answers.
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500))
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(timeout));
            match client.get_connection_manager_with_config(config).await {
                Ok(mut manager) => {
                    let mut load = redis::pipe();
                    for script in super::scripts::all() {
                        load.cmd("SCRIPT").arg("LOAD").arg(&script.code);
                    }
                    if let Err(e) = load.query_async::<Vec<String>>(&mut manager).await {
                        warn!("broker: the scripts could not be loaded ({e}); they are loaded as Redis asks");
                    }
                    connection = Some(manager);
                }
                Err(e) => {
                    refuse(batch, &e, &metrics);
                    continue;
                }
            }
        }
        let Some(manager) = connection.as_mut() else { continue };
        let sent = std::time::Instant::now();
        let answered = send(manager, &batch).await;
        metrics.broker_round_trip_seconds.observe(sent.elapsed().as_secs_f64());
        metrics.broker_connected.set(i64::from(answered.is_ok()));
        match answered {
            Ok(values) => {
                // Redis without the scripts (restarted, or `SCRIPT FLUSH`): every `EVALSHA` it
                // refused had no effect; they are loaded and those calls sent again, in order.
                let commands: Vec<&redis::Cmd> = batch.iter().map(|job| &job.command).collect();
                let (mut answers, refused) = answers_of(&commands, values);
                if !refused.is_empty() {
                    match load_and_send_again(manager, &batch, &refused).await {
                        Ok(again) => {
                            refused.into_iter().zip(again).for_each(|(i, value)| answers[i] = answer(value))
                        }
                        Err(e) => refused.into_iter().for_each(|i| answers[i] = Err(broker_error(&e))),
                    }
                }
                for (job, answer) in batch.into_iter().zip(answers) {
                    let _ = job.answer.send(answer);
                }
            }
            Err(e) => {
                let error = broker_error(&e);
                for job in batch {
                    let _ = job.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// A pipeline's answers to `commands` (each its own caller's), and the calls Redis refused
/// `NOSCRIPT` that may be sent again once the scripts are loaded. One may not when a later call
/// of the same user (the same first key) ran, because another node loaded the script between the
/// two (a pipeline is not atomic): sent again, it would land after that call and break its
/// user's order (an event after its run's end). It fails instead.
pub(super) fn answers_of(
    commands: &[&redis::Cmd],
    values: Vec<redis::Value>,
) -> (Vec<Result<redis::Value, BrokerError>>, Vec<usize>) {
    let refused: Vec<usize> = (0..values.len())
        .filter(|&i| {
            matches!(&values[i], redis::Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
        })
        .collect();
    let mut answers: Vec<Result<redis::Value, BrokerError>> = values.into_iter().map(answer).collect();
    let (again, overtaken): (Vec<usize>, Vec<usize>) = refused.into_iter().partition(|&i| {
        let key = first_key(commands[i]);
        !(i + 1..answers.len()).any(|j| answers[j].is_ok() && first_key(commands[j]) == key)
    });
    for i in overtaken {
        answers[i] = Err(BrokerError::Unavailable(
            "redis: the script was not loaded, and a later call of the same user ran meanwhile".into(),
        ));
    }
    (answers, again)
}

/// A command's first key (after `numkeys` for a script): what orders calls of one user, and
/// routes them on a Redis Cluster.
pub(super) fn first_key(command: &redis::Cmd) -> Option<&[u8]> {
    let mut args =
        command.args_iter().filter_map(|arg| if let redis::Arg::Simple(a) = arg { Some(a) } else { None });
    let name = args.next()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let _sha = args.next()?;
        let keys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
        if keys == 0 {
            return None;
        }
    }
    args.next()
}

/// One command's answer in a pipeline: an error is its own caller's.
pub(super) fn answer(value: redis::Value) -> Result<redis::Value, BrokerError> {
    match value {
        redis::Value::ServerError(e) => Err(broker_error(&e.into())),
        value => Ok(value),
    }
}

/// The jobs' commands as one pipeline: one answer per command, a failed command answering its
/// own caller while the others in the pipeline still do.
async fn send(manager: &mut ConnectionManager, batch: &[Job]) -> redis::RedisResult<Vec<redis::Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for job in batch {
        pipe.add_command(job.command.clone());
    }
    let values = pipe.query_async::<Vec<redis::Value>>(manager).await?;
    if values.len() != batch.len() {
        let what = format!("{} answers to {} commands", values.len(), batch.len());
        return Err(redis::RedisError::from((redis::ErrorKind::Client, "pipeline", what)));
    }
    Ok(values)
}

/// `SCRIPT LOAD` of the scripts the jobs at `again` call, and those jobs sent again.
async fn load_and_send_again(
    manager: &mut ConnectionManager,
    batch: &[Job],
    again: &[usize],
) -> redis::RedisResult<Vec<redis::Value>> {
    let mut load = redis::pipe();
    let mut loaded: Vec<&str> = Vec::new();
    for script in again.iter().filter_map(|&i| batch[i].script) {
        if !loaded.contains(&script.sha.as_str()) {
            loaded.push(&script.sha);
            load.cmd("SCRIPT").arg("LOAD").arg(&script.code);
        }
    }
    load.query_async::<Vec<String>>(manager).await?;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for &i in again {
        pipe.add_command(batch[i].command.clone());
    }
    pipe.query_async::<Vec<redis::Value>>(manager).await
}

/// What the subscriber is asked to do.
pub enum Interest {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// A message from a user's channel: `(channel, payload)`.
pub type Message = (String, Vec<u8>);

/// How often the Pub/Sub connection is checked, and how long any of its commands may take: a
/// link that went half-open (no traffic, no close) is found within a few seconds, never left to
/// drop events silently (docs/scale-out.md, "When something goes away").
pub(super) const PUBSUB_CHECK: Duration = Duration::from_secs(1);
pub(super) const PUBSUB_TIMEOUT: Duration = Duration::from_secs(3);

/// What a Pub/Sub connection delivers besides answers.
pub(super) enum Pushed {
    Message(Message),
    /// The connection went away and came back by itself (a Cluster's client does): what was
    /// published meanwhile was missed.
    Lost,
}

/// The commands of one Pub/Sub connection, to one Redis (here) or to a Cluster (`cluster.rs`);
/// its messages come apart, as a stream of [`Pushed`]. [`keep_subscribed`] is the rest.
pub(super) trait PubSubLink {
    /// Its name in log lines.
    const NAME: &'static str;
    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()>;
    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()>;
    /// Proves the link (a `PING`).
    async fn check(&mut self) -> redis::RedisResult<()>;
}

/// A Pub/Sub command that answered well within [`PUBSUB_TIMEOUT`].
async fn in_time(command: impl std::future::Future<Output = redis::RedisResult<()>>) -> bool {
    matches!(actix_web::rt::time::timeout(PUBSUB_TIMEOUT, command).await, Ok(Ok(())))
}

/// Keeps a Pub/Sub connection made by `connect` (which says why it could not, and waits before
/// it says `None`): subscribes and unsubscribes as asked, hands every message on, and after a
/// reconnect subscribes again to every channel and says so (`reconnected`), so the registry
/// fills what was missed meanwhile from the streams. A `PING` every second proves the link; one
/// not answered in time, or a subscribe that is not, ends the connection for a new one. `up`
/// says whether it works now, for `/readyz`.
pub(super) async fn keep_subscribed<L, F>(
    mut connect: impl FnMut() -> F,
    mut interest: mpsc::UnboundedReceiver<Interest>,
    mut messages: mpsc::Sender<Message>,
    reconnected: mpsc::UnboundedSender<()>,
    up: Arc<AtomicBool>,
) where
    L: PubSubLink,
    F: std::future::Future<Output = Option<(L, LocalBoxStream<'static, Pushed>)>>,
{
    let mut channels: BTreeSet<String> = BTreeSet::new();
    let mut first = true;
    loop {
        up.store(false, Ordering::Relaxed);
        let Some((mut link, pushed)) = connect().await else {
            continue;
        };
        let mut pushed = pushed.fuse();
        let mut ok = true;
        for channel in &channels {
            if !in_time(link.subscribe(channel)).await {
                ok = false;
                break;
            }
        }
        if !ok {
            warn!("broker: {} subscriptions not made again in time; reconnecting", L::NAME);
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !first {
            info!("broker: {} reconnected; {} channels subscribed again", L::NAME, channels.len());
            let _ = reconnected.unbounded_send(());
        }
        first = false;
        up.store(true, Ordering::Relaxed);
        let mut check = actix_web::rt::time::interval(PUBSUB_CHECK);
        loop {
            futures_util::select! {
                asked = interest.next() => match asked {
                    Some(Interest::Subscribe(channel, done)) => {
                        let subscribed = in_time(link.subscribe(&channel)).await;
                        channels.insert(channel);
                        if !subscribed {
                            // `done` goes unanswered: the attach reads the stream anyway, and
                            // the reconnect fills what it may have missed.
                            warn!("broker: a {} subscribe failed or took too long; reconnecting", L::NAME);
                            break;
                        }
                        let _ = done.send(());
                    }
                    Some(Interest::Unsubscribe(channel)) => {
                        channels.remove(&channel);
                        if !in_time(link.unsubscribe(&channel)).await {
                            break;
                        }
                    }
                    None => return,
                },
                push = pushed.next() => match push {
                    Some(Pushed::Message(message)) => {
                        let _ = futures_util::SinkExt::send(&mut messages, message).await;
                    }
                    Some(Pushed::Lost) => {
                        warn!("broker: a {} connection was lost; filling from the streams", L::NAME);
                        let _ = reconnected.unbounded_send(());
                    }
                    None => {
                        warn!("broker: {} connection lost; reconnecting", L::NAME);
                        break;
                    }
                },
                _ = futures_util::FutureExt::fuse(check.tick()) => {
                    if !in_time(link.check()).await {
                        warn!("broker: {} connection does not answer PING; reconnecting", L::NAME);
                        break;
                    }
                }
            }
        }
        up.store(false, Ordering::Relaxed);
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

impl PubSubLink for redis::aio::PubSubSink {
    const NAME: &'static str = "Redis Pub/Sub";

    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        redis::aio::PubSubSink::subscribe(self, channel).await
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        redis::aio::PubSubSink::unsubscribe(self, channel).await
    }

    async fn check(&mut self) -> redis::RedisResult<()> {
        self.ping::<redis::Value>().await.map(drop)
    }
}

/// The Pub/Sub connection to one Redis ([`keep_subscribed`]).
pub async fn subscriber(
    client: redis::Client,
    interest: mpsc::UnboundedReceiver<Interest>,
    messages: mpsc::Sender<Message>,
    reconnected: mpsc::UnboundedSender<()>,
    up: Arc<AtomicBool>,
) {
    let connect = || {
        let client = client.clone();
        async move {
            match actix_web::rt::time::timeout(PUBSUB_TIMEOUT, client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => {
                    let (sink, stream) = pubsub.split();
                    let pushed = stream.map(|message| {
                        let channel = message.get_channel_name().to_owned();
                        Pushed::Message((channel, message.get_payload_bytes().to_vec()))
                    });
                    Some((sink, pushed.boxed_local()))
                }
                Ok(Err(e)) => {
                    warn!("broker: Redis Pub/Sub connection failed: {e}; retrying");
                    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
                    None
                }
                Err(_) => {
                    warn!("broker: Redis Pub/Sub connection not made in time; retrying");
                    None
                }
            }
        }
    };
    keep_subscribed(connect, interest, messages, reconnected, up).await;
}
