//! The Redis broker on a Redis Cluster (`broker.cluster = true`, docs/scale-out.md): the same
//! scripts, sent where their keys live. Every script touches the keys of one user (hash tag
//! `{user}`) or of the node registry (`{nodes}`), so each is one slot; the writer groups a batch
//! of calls by slot and sends each group as one pipeline to the slot's master (a user's calls
//! stay in order: they are one slot), the groups at once. Events go out by sharded Pub/Sub
//! (`SPUBLISH` in the scripts, `SSUBSCRIBE` here, Redis 7): each channel lives on its user's
//! shard. The cluster client follows slot moves and failovers by itself.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::StreamExt;
use log::warn;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};

use super::connection::{
    answers_of, batch_from, broker_error, first_key, keep_subscribed, refuse, Interest, Job, Message,
    PubSubLink, Pushed, PUBSUB_TIMEOUT,
};
use super::scripts;
use crate::broker::BrokerError;
use crate::metrics::Metrics;

/// The cluster client of `urls` (any of its nodes: the client learns the rest), with the
/// timeouts of the single-Redis connections.
pub fn client(urls: &[String], timeout: Duration) -> redis::RedisResult<ClusterClient> {
    ClusterClient::builder(urls.to_vec())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2)
        .build()
}

/// How the heartbeat reaches Redis: one server, or a Redis Cluster.
pub enum Connector {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl Connector {
    pub async fn connect(&self, timeout: Duration) -> redis::RedisResult<AnyConnection> {
        match self {
            Connector::Single(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_number_of_retries(1)
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout));
                Ok(AnyConnection::Single(client.get_connection_manager_with_config(config).await?))
            }
            Connector::Cluster(client) => Ok(AnyConnection::Cluster(client.get_async_connection().await?)),
        }
    }
}

/// A connection to one Redis or to a Redis Cluster, for what runs the same on both (scripts
/// route by their keys on a cluster).
pub enum AnyConnection {
    Single(redis::aio::ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConnection::Single(c) => c.req_packed_command(cmd),
            AnyConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            AnyConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConnection::Single(c) => c.get_db(),
            AnyConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Where a command goes: the slot of its first key, or any node.
fn route(command: &redis::Cmd) -> Option<Route> {
    first_key(command).map(|key| Route::with_key(key, SlotAddr::Master))
}

/// Every script loaded on every master, so a call's first `EVALSHA` finds its script.
async fn load_scripts(connection: &mut ClusterConnection) -> redis::RedisResult<()> {
    for script in scripts::all() {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(&script.code);
        let all =
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
        connection.route_command(load, all).await?;
    }
    Ok(())
}

/// The jobs at `at` as one pipeline to their slot's master (any node without a slot); Redis
/// without a script (a restarted master) gets the scripts again and the refused calls once more.
async fn send_group(
    mut connection: ClusterConnection,
    batch: &[Job],
    at: &[usize],
    slot: Option<Route>,
) -> Vec<Result<redis::Value, BrokerError>> {
    let route = match slot {
        Some(route) => SingleNodeRoutingInfo::SpecificNode(route),
        None => SingleNodeRoutingInfo::Random,
    };
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for &i in at {
        pipe.add_command(batch[i].command.clone());
    }
    let values = match connection.route_pipeline(pipe, 0, at.len(), route.clone()).await {
        Ok(values) if values.len() == at.len() => values,
        Ok(values) => {
            let what = format!("redis: {} answers to {} commands", values.len(), at.len());
            return at.iter().map(|_| Err(BrokerError::Unexpected(what.clone()))).collect();
        }
        Err(e) => return at.iter().map(|_| Err(broker_error(&e))).collect(),
    };
    let commands: Vec<&redis::Cmd> = at.iter().map(|&i| &batch[i].command).collect();
    let (mut answers, again) = answers_of(&commands, values);
    if !again.is_empty() {
        let mut load = redis::pipe();
        let mut resend = redis::pipe();
        resend.ignore_errors();
        for &i in &again {
            if let Some(script) = batch[at[i]].script {
                load.cmd("SCRIPT").arg("LOAD").arg(&script.code).ignore();
            }
            resend.add_command(batch[at[i]].command.clone());
        }
        let loaded = connection.route_pipeline(load, 0, 0, route.clone()).await;
        let sent = match loaded {
            Ok(_) => connection.route_pipeline(resend, 0, again.len(), route).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(values) => {
                again.iter().zip(values).for_each(|(&i, v)| answers[i] = super::connection::answer(v))
            }
            Err(e) => again.iter().for_each(|&i| answers[i] = Err(broker_error(&e))),
        }
    }
    answers
}

/// The cluster's writer: as `connection::writer`, each batch split by slot.
pub async fn writer(client: ClusterClient, mut jobs: mpsc::UnboundedReceiver<Job>, metrics: Arc<Metrics>) {
    let mut connection: Option<ClusterConnection> = None;
    while let Some(first) = jobs.next().await {
        let batch = batch_from(first, &mut jobs);
        if connection.is_none() {
            match client.get_async_connection().await {
                Ok(mut made) => {
                    if let Err(e) = load_scripts(&mut made).await {
                        warn!("broker: the scripts could not be loaded ({e}); they are loaded as Redis asks");
                    }
                    connection = Some(made);
                }
                Err(e) => {
                    refuse(batch, &e, &metrics);
                    continue;
                }
            }
        }
        let Some(made) = connection.as_ref() else { continue };
        // By slot, in call order within each (few groups: a linear search).
        let mut groups: Vec<(Option<Route>, Vec<usize>)> = Vec::new();
        for (i, job) in batch.iter().enumerate() {
            let to = route(&job.command);
            match groups.iter_mut().find(|(r, _)| *r == to) {
                Some((_, at)) => at.push(i),
                None => groups.push((to, vec![i])),
            }
        }
        let sent = std::time::Instant::now();
        let answered = futures_util::future::join_all(
            groups.iter().map(|(to, at)| send_group(made.clone(), &batch, at, *to)),
        )
        .await;
        metrics.broker_round_trip_seconds.observe(sent.elapsed().as_secs_f64());
        let mut answers: Vec<Option<Result<redis::Value, BrokerError>>> =
            (0..batch.len()).map(|_| None).collect();
        let mut ok = true;
        for ((_, at), group) in groups.iter().zip(answered) {
            for (&i, answer) in at.iter().zip(group) {
                ok &= !matches!(answer, Err(BrokerError::Unavailable(_)));
                answers[i] = Some(answer);
            }
        }
        metrics.broker_connected.set(i64::from(ok));
        for (job, answer) in batch.into_iter().zip(answers) {
            let answer = answer.unwrap_or_else(|| Err(BrokerError::Unexpected("redis: no answer".into())));
            let _ = job.answer.send(answer);
        }
    }
}

impl PubSubLink for ClusterConnection {
    const NAME: &'static str = "Redis Cluster Pub/Sub";

    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        self.ssubscribe(channel).await
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        self.sunsubscribe(channel).await
    }

    /// Every master answers: a shard's link that went half-open is found too.
    async fn check(&mut self) -> redis::RedisResult<()> {
        let all =
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
        self.route_command(redis::cmd("PING"), all).await.map(drop)
    }
}

/// The cluster's Pub/Sub ([`keep_subscribed`]): sharded subscriptions (`SSUBSCRIBE`) over RESP3,
/// their messages pushed. The client subscribes again by itself after a reconnect or a slot
/// move; a lost connection (a `Disconnection` push) is taken as missed messages, so every local
/// user is filled.
pub async fn subscriber(
    urls: Vec<String>,
    interest: mpsc::UnboundedReceiver<Interest>,
    messages: mpsc::Sender<Message>,
    reconnected: mpsc::UnboundedSender<()>,
    up: Arc<AtomicBool>,
) {
    let connect = || {
        let urls = urls.clone();
        async move {
            let (push_tx, pushed) = mpsc::unbounded::<redis::PushInfo>();
            let client = ClusterClient::builder(urls)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push_tx)
                .connection_timeout(PUBSUB_TIMEOUT)
                .response_timeout(PUBSUB_TIMEOUT)
                .build();
            let connection = match client {
                Ok(client) => {
                    actix_web::rt::time::timeout(PUBSUB_TIMEOUT, client.get_async_connection()).await
                }
                Err(e) => {
                    warn!("broker: Redis Cluster Pub/Sub client: {e}");
                    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
                    return None;
                }
            };
            let Ok(Ok(connection)) = connection else {
                warn!("broker: Redis Cluster Pub/Sub connection not made; retrying");
                actix_web::rt::time::sleep(Duration::from_millis(500)).await;
                return None;
            };
            let pushed = pushed.filter_map(|push| futures_util::future::ready(pushed_of(push)));
            Some((connection, pushed.boxed_local()))
        }
    };
    keep_subscribed(connect, interest, messages, reconnected, up).await;
}

/// A sharded message, or a lost connection (the client subscribes again by itself).
fn pushed_of(push: redis::PushInfo) -> Option<Pushed> {
    match push.kind {
        redis::PushKind::SMessage => {
            let mut data = push.data.into_iter();
            let (channel, payload) = (data.next()?, data.next()?);
            let channel = redis::from_redis_value::<String>(channel).ok()?;
            let payload = redis::from_redis_value::<Vec<u8>>(payload).ok()?;
            Some(Pushed::Message((channel, payload)))
        }
        redis::PushKind::Disconnection => Some(Pushed::Lost),
        _ => None,
    }
}
