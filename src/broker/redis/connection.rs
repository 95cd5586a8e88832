//! The Redis broker's two connections. Commands go through one writer task in the order the
//! broker's calls were made, as pipelines of whatever is waiting (one round trip carries many
//! calls under load); the connection manager reconnects by itself. Events from other nodes
//! arrive on a Pub/Sub connection subscribed to the channels of users with sessions here,
//! resubscribed after a reconnect.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use log::{info, warn};
use redis::aio::ConnectionManager;

use std::sync::Arc;

use crate::broker::BrokerError;
use crate::metrics::Metrics;

/// One command and where its answer goes.
pub struct Job {
    pub command: redis::Cmd,
    pub answer: oneshot::Sender<Result<redis::Value, BrokerError>>,
}

/// Most commands sent in one pipeline.
const MAX_PIPELINE: usize = 512;

/// A failed command: Redis away (the connection, a timeout, a node loading or failing over) is
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
    if away {
        BrokerError::Unavailable(format!("redis: {error}"))
    } else {
        BrokerError::Unexpected(format!("redis: {error}"))
    }
}

/// Sends the jobs in order, each batch of waiting jobs as one pipeline.
pub async fn writer(client: redis::Client, mut jobs: mpsc::UnboundedReceiver<Job>, metrics: Arc<Metrics>) {
    let mut connection: Option<ConnectionManager> = None;
    while let Some(first) = jobs.next().await {
        let mut batch = vec![first];
        while batch.len() < MAX_PIPELINE {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if connection.is_none() {
            // Short retries and timeouts: while Redis is away, calls fail fast (clients are told
            // `unavailable` and send again) instead of waiting with the registry's answers.
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500))
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5)));
            match client.get_connection_manager_with_config(config).await {
                Ok(manager) => connection = Some(manager),
                Err(e) => {
                    metrics.broker_connected.set(0);
                    let error = broker_error(&e);
                    for job in batch {
                        let _ = job.answer.send(Err(error.clone()));
                    }
                    continue;
                }
            }
        }
        let Some(manager) = connection.as_mut() else { continue };
        let mut pipe = redis::pipe();
        // A command that fails answers its own caller; the others in the pipeline still do.
        pipe.ignore_errors();
        for job in &batch {
            pipe.add_command(job.command.clone());
        }
        let sent = std::time::Instant::now();
        let answered = pipe.query_async::<Vec<redis::Value>>(manager).await;
        metrics.broker_round_trip_seconds.observe(sent.elapsed().as_secs_f64());
        metrics.broker_connected.set(i64::from(answered.is_ok()));
        match answered {
            Ok(values) if values.len() == batch.len() => {
                for (job, value) in batch.into_iter().zip(values) {
                    let answer = match value {
                        redis::Value::ServerError(e) => Err(broker_error(&e.into())),
                        value => Ok(value),
                    };
                    let _ = job.answer.send(answer);
                }
            }
            Ok(values) => {
                let error = BrokerError::Unexpected(format!(
                    "redis: {} answers to {} commands",
                    values.len(),
                    batch.len()
                ));
                for job in batch {
                    let _ = job.answer.send(Err(error.clone()));
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

/// What the subscriber is asked to do.
pub enum Interest {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

/// A message from a user's channel: `(channel, payload)`.
pub type Message = (String, Vec<u8>);

/// Keeps the Pub/Sub connection: subscribes and unsubscribes as asked, hands every message on,
/// and after a reconnect subscribes again to every channel and says so (`reconnected`), so the
/// registry fills what was missed meanwhile from the streams.
pub async fn subscriber(
    client: redis::Client,
    mut interest: mpsc::UnboundedReceiver<Interest>,
    messages: mpsc::UnboundedSender<Message>,
    reconnected: mpsc::UnboundedSender<()>,
) {
    let mut channels: BTreeSet<String> = BTreeSet::new();
    let mut first = true;
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(pubsub) => pubsub,
            Err(e) => {
                warn!("broker: Redis Pub/Sub connection failed: {e}; retrying");
                actix_web::rt::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let (mut sink, stream) = pubsub.split();
        let mut stream = stream.fuse();
        let mut ok = true;
        for channel in &channels {
            if sink.subscribe(channel).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        if !first {
            info!("broker: Redis Pub/Sub reconnected; {} channels subscribed again", channels.len());
            let _ = reconnected.unbounded_send(());
        }
        first = false;
        loop {
            futures_util::select! {
                asked = interest.next() => match asked {
                    Some(Interest::Subscribe(channel, done)) => {
                        if sink.subscribe(&channel).await.is_err() {
                            channels.insert(channel);
                            break;
                        }
                        channels.insert(channel);
                        let _ = done.send(());
                    }
                    Some(Interest::Unsubscribe(channel)) => {
                        channels.remove(&channel);
                        if sink.unsubscribe(&channel).await.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                message = stream.next() => match message {
                    Some(message) => {
                        let channel = message.get_channel_name().to_owned();
                        let _ = messages.unbounded_send((channel, message.get_payload_bytes().to_vec()));
                    }
                    None => {
                        warn!("broker: Redis Pub/Sub connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}
