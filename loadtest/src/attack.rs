//! The `hostile` scenario's attackers: connections that misbehave while the scenario's real users
//! chat. Each attacker repeats its attack until the scenario stops and records how the server
//! ended each attempt (a close code, an HTTP status, a dropped socket), so the report shows both
//! that every attack met the rule written against it and that the real users saw nothing of it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::TokenSource;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Upgrade, never authenticate, send 60 KB text frames as fast as the server reads them.
    UnauthSenders,
    /// Authenticate, then stop reading while events are published to their user.
    SlowReaders,
    /// Authenticate, then send pings as fast as the socket takes them.
    Flooders,
    /// Send one text frame of 1 MiB.
    Oversized,
    /// Authenticate, then send a text message in 4 KB fragments that never ends below 1 MiB.
    Fragmented,
    /// Write random bytes instead of an HTTP request.
    Garbage,
    /// Send half of an upgrade request and wait.
    HalfOpen,
    /// Authenticate with `?last_seq=0` on a full history, read nothing, hang up after a second.
    ResumeStorm,
}

/// `--attack kind=count`.
pub fn parse_attack(spec: &str) -> Result<(Attack, usize), String> {
    let (kind, count) = spec.split_once('=').ok_or_else(|| format!("{spec:?}: expected kind=count"))?;
    let kind = Attack::from_str(kind, true).map_err(|_| {
        let names: Vec<String> = Attack::value_variants()
            .iter()
            .filter_map(|a| a.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        format!("{kind:?}: not an attack (one of {})", names.join(", "))
    })?;
    let count = count.parse().map_err(|_| format!("{count:?}: not a count"))?;
    Ok((kind, count))
}

/// The mix used when `--scenario hostile` is given no `--attack`.
pub fn default_mix() -> Vec<(Attack, usize)> {
    vec![
        (Attack::UnauthSenders, 200),
        (Attack::SlowReaders, 16),
        (Attack::Flooders, 16),
        (Attack::Oversized, 16),
        (Attack::Fragmented, 16),
        (Attack::Garbage, 16),
        (Attack::HalfOpen, 16),
        (Attack::ResumeStorm, 16),
    ]
}

/// Attackers of one kind share a user per this many connections (under the per-user cap).
const PER_ATTACK_USER: usize = 8;
/// Pause after an attempt the server ended, so a refused attacker does not spin the load
/// generator's CPU (which the server shares on one machine).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
const BIG_FRAME: usize = 60_000;
const OVERSIZED: usize = 1 << 20;
const FRAGMENT: usize = 4096;

/// What every attacker shares.
pub struct Arena {
    pub server_addr: SocketAddr,
    pub url: String,
    pub source_ips: Vec<IpAddr>,
    pub tokens: TokenSource,
    pub run_tag: String,
    /// (attack, how the attempt ended) -> attempts
    outcomes: Mutex<BTreeMap<(Attack, String), u64>>,
}

impl Arena {
    pub fn new(
        server_addr: SocketAddr,
        url: String,
        source_ips: Vec<IpAddr>,
        tokens: TokenSource,
        run_tag: String,
    ) -> Arena {
        Arena { server_addr, url, source_ips, tokens, run_tag, outcomes: Mutex::new(BTreeMap::new()) }
    }

    /// The user whose sessions attackers `index` of `attack` use.
    pub fn user(&self, attack: Attack, index: usize) -> String {
        let kind = attack.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
        format!("lt{}-{kind}-{}", self.run_tag, index / PER_ATTACK_USER)
    }

    pub fn users(&self, attack: Attack, count: usize) -> Vec<String> {
        (0..count.div_ceil(PER_ATTACK_USER)).map(|k| self.user(attack, k * PER_ATTACK_USER)).collect()
    }

    fn record(&self, attack: Attack, outcome: String) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            *outcomes.entry((attack, outcome)).or_insert(0) += 1;
        }
    }

    /// attack -> outcome -> attempts.
    pub fn outcomes(&self) -> BTreeMap<Attack, BTreeMap<String, u64>> {
        let mut by_attack: BTreeMap<Attack, BTreeMap<String, u64>> = BTreeMap::new();
        if let Ok(outcomes) = self.outcomes.lock() {
            for ((attack, outcome), count) in outcomes.iter() {
                by_attack.entry(*attack).or_default().insert(outcome.clone(), *count);
            }
        }
        by_attack
    }

    async fn tcp(&self, index: usize, recv_buffer: Option<u32>) -> Result<TcpStream, String> {
        let socket = match self.server_addr.ip() {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| format!("socket_{:?}", e.kind()))?;
        if let Some(bytes) = recv_buffer {
            let _ = socket.set_recv_buffer_size(bytes);
        }
        if !self.source_ips.is_empty() {
            let ip = self.source_ips[index % self.source_ips.len()];
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind_{:?}", e.kind()))?;
        }
        socket.connect(self.server_addr).await.map_err(|e| format!("connect_{:?}", e.kind()))
    }

    async fn websocket(
        &self,
        index: usize,
        user: Option<&str>,
        query: &str,
        recv_buffer: Option<u32>,
    ) -> Result<WebSocketStream<TcpStream>, String> {
        let stream = self.tcp(index, recv_buffer).await?;
        let mut request = format!("{}{query}", self.url).into_client_request().map_err(|e| e.to_string())?;
        if let Some(user) = user {
            let token = (self.tokens)(user)?;
            let bearer =
                format!("Bearer {token}").parse().map_err(|_| "token is not a header value".to_owned())?;
            request.headers_mut().insert("Authorization", bearer);
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(response)) => Err(format!("http_{}", response.status().as_u16())),
            Err(e) => Err(format!("handshake_failed: {}", short(&e))),
        }
    }
}

fn short(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Io(e) => format!("{:?}", e.kind()),
        other => other.to_string(),
    }
}

/// Runs attacker `nth` of its kind until the scenario stops; `index` picks its source address.
pub async fn attacker(
    arena: Arc<Arena>,
    mut stop: watch::Receiver<bool>,
    attack: Attack,
    nth: usize,
    index: usize,
) {
    while !*stop.borrow() {
        let a = Attempt { arena: &arena, nth, index };
        let watcher = stop.clone();
        let attempt = async move {
            match attack {
                Attack::UnauthSenders => unauth_sender(a).await,
                Attack::SlowReaders => slow_reader(a, watcher).await,
                Attack::Flooders => flooder(a).await,
                Attack::Oversized => oversized(a).await,
                Attack::Fragmented => fragmented(a).await,
                Attack::Garbage => garbage(a).await,
                Attack::HalfOpen => half_open(a).await,
                Attack::ResumeStorm => resume_storm(a).await,
            }
        };
        let outcome = match attack {
            // A slow reader learns how it ended only when it reads again, after the scenario.
            Attack::SlowReaders => attempt.await,
            _ => tokio::select! {
                outcome = attempt => outcome,
                _ = stop.wait_for(|stop| *stop) => "open_at_end".to_owned(),
            },
        };
        arena.record(attack, outcome);
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// One attempt of attacker `nth` of its kind, connecting from source address `index`.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    arena: &'a Arena,
    nth: usize,
    index: usize,
}

/// How a connection ended, seen from its reading half.
async fn ending<S>(stream: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match stream.next().await {
            Some(Ok(Message::Close(frame))) => {
                return format!("close_{}", frame.map_or(1005, |f| u16::from(f.code)))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return format!("dropped: {}", short(&e)),
            None => return "dropped".to_owned(),
        }
    }
}

/// Writes `frames` until the server stops taking them, while reading for its close frame.
async fn send_until_closed(
    ws: WebSocketStream<TcpStream>,
    mut frames: impl Iterator<Item = Message>,
) -> String {
    let (mut sink, mut stream) = ws.split();
    let reader = ending(&mut stream);
    tokio::pin!(reader);
    let writer = async {
        for frame in frames.by_ref() {
            if sink.send(frame).await.is_err() {
                return;
            }
        }
        // Everything was sent: now only the server can end it.
        std::future::pending::<()>().await
    };
    tokio::select! {
        outcome = &mut reader => outcome,
        () = writer => tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap_or_else(|_| "write_failed_no_close".to_owned()),
    }
}

async fn unauth_sender(a: Attempt<'_>) -> String {
    let ws = match a.arena.websocket(a.index, None, "", None).await {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    let filler = ",0".repeat((BIG_FRAME - 32) / 2);
    let frame = Message::text(format!("{{\"type\":\"ping\",\"id\":[0{filler}]}}"));
    send_until_closed(ws, std::iter::repeat(frame)).await
}

async fn flooder(a: Attempt<'_>) -> String {
    let user = a.arena.user(Attack::Flooders, a.nth);
    let ws = match a.arena.websocket(a.index, Some(&user), "", None).await {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    send_until_closed(ws, (0u64..).map(|id| Message::text(format!("{{\"type\":\"ping\",\"id\":{id}}}"))))
        .await
}

async fn oversized(a: Attempt<'_>) -> String {
    let ws = match a.arena.websocket(a.index, None, "", None).await {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    let frame = Message::text(format!("{{\"type\":\"ping\",\"id\":\"{}\"}}", "x".repeat(OVERSIZED)));
    send_until_closed(ws, std::iter::once(frame)).await
}

async fn fragmented(a: Attempt<'_>) -> String {
    let user = a.arena.user(Attack::Fragmented, a.nth);
    let ws = match a.arena.websocket(a.index, Some(&user), "", None).await {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    let piece = vec![b'x'; FRAGMENT];
    let fragments = OVERSIZED / FRAGMENT;
    let frames = (0..=fragments).map(move |i| {
        let opcode = OpCode::Data(if i == 0 { Data::Text } else { Data::Continue });
        Message::Frame(Frame::message(piece.clone(), opcode, i == fragments))
    });
    send_until_closed(ws, frames).await
}

/// Reads a raw socket to its end and names how it ended: the HTTP status the server answered
/// with, or a silent close.
async fn raw_ending(mut stream: TcpStream) -> String {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(n) if head.len() < 64 => head.extend_from_slice(&buffer[..n]),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let status = String::from_utf8_lossy(&head)
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .map(|code| format!("http_{code}"));
    match (ended, status) {
        (Err(_), _) => "still_open_after_60s".to_owned(),
        (_, Some(status)) => status,
        (Ok(Ok(())), None) => "closed".to_owned(),
        (Ok(Err(e)), None) => format!("dropped: {:?}", e.kind()),
    }
}

async fn garbage(a: Attempt<'_>) -> String {
    let mut stream = match a.arena.tcp(a.index, None).await {
        Ok(stream) => stream,
        Err(outcome) => return outcome,
    };
    let mut noise = vec![0u8; 4096];
    rand::rng().fill_bytes(&mut noise);
    // The server may hang up before it has read everything: that is an answer too.
    let _ = stream.write_all(&noise).await;
    raw_ending(stream).await
}

async fn half_open(a: Attempt<'_>) -> String {
    let mut stream = match a.arena.tcp(a.index, None).await {
        Ok(stream) => stream,
        Err(outcome) => return outcome,
    };
    let partial = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        a.arena.server_addr
    );
    if stream.write_all(partial.as_bytes()).await.is_err() {
        return "write_failed".to_owned();
    }
    raw_ending(stream).await
}

async fn slow_reader(a: Attempt<'_>, mut stop: watch::Receiver<bool>) -> String {
    let user = a.arena.user(Attack::SlowReaders, a.nth);
    // A small receive window, so the server (not this kernel) holds what is not read.
    let mut ws = match a.arena.websocket(a.index, Some(&user), "", Some(4096)).await {
        Ok(ws) => ws,
        Err(outcome) => return outcome,
    };
    let _ = stop.wait_for(|stop| *stop).await;
    // Now read what was held back, to learn whether the server gave up on this reader.
    tokio::time::timeout(Duration::from_secs(10), ending(&mut ws))
        .await
        .unwrap_or_else(|_| "open_at_end".to_owned())
}

async fn resume_storm(a: Attempt<'_>) -> String {
    let user = a.arena.user(Attack::ResumeStorm, a.nth);
    match a.arena.websocket(a.index, Some(&user), "?last_seq=0", Some(4096)).await {
        Ok(ws) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Hang up without a close handshake, with the replay unread.
            drop(ws);
            "resumed_then_hung_up".to_owned()
        }
        Err(outcome) => outcome,
    }
}

/// Publishes large events to the slow readers' users without pause and fills the resume
/// stormers' histories once, through the HTTP API. Runs on a blocking thread until `done`.
pub fn feed(
    base: &str,
    key: &str,
    slow_users: &[String],
    storm_users: &[String],
    done: &AtomicBool,
) -> Vec<String> {
    let publisher = crate::Publisher::new(base, key);
    let text = "s".repeat(2000);
    let mut errors = Vec::new();
    let mut publish = |user: &str, count: usize| {
        let events = (0..count)
            .map(|_| serde_json::json!({"type": "agent_thinking", "thread_id": "attack", "run_id": "attack", "payload": {"text": text}}))
            .collect();
        if let Err(e) = publisher.publish(user, events) {
            if errors.len() < 10 {
                errors.push(e);
            }
        }
    };
    for user in storm_users {
        for _ in 0..5 {
            publish(user, 100);
        }
    }
    while !done.load(Ordering::Relaxed) && !slow_users.is_empty() {
        for user in slow_users {
            publish(user, 50);
        }
        // About 1 MB/s per user: enough to fill any budget within seconds, without making
        // the server's JSON parsing the attack.
        std::thread::sleep(Duration::from_millis(100));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_specs() {
        assert_eq!(parse_attack("unauth-senders=1000"), Ok((Attack::UnauthSenders, 1000)));
        assert!(parse_attack("unauth-senders").is_err());
        assert!(parse_attack("nonsense=3").is_err());
        assert!(parse_attack("garbage=x").is_err());
    }
}
