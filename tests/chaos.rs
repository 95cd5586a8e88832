//! The randomized fault run of docs/scale-out.md ("What must hold under faults"): three agentwire
//! node processes on a Redis of the test's own that keeps its data on disk, each node behind a
//! fault proxy of its own (`common::fault_proxy`). Users chat from two tabs each and a backend
//! publishes while faults are drawn at random: a node paused past its lease and resumed, a node
//! killed and started again, a node's link to Redis cut, blackholed or delayed, Redis restarted
//! with its data. Then a checker verifies, for every tab and every run, what the contract
//! promises: events in seq order, no duplicate, no event of a run after its end, no silent gap
//! (only a 1012 or a `complete: false` may skip seqs), and every acked message's run ended
//! exactly once. It prints the counts and fails on any violation.
//!
//! `AGENTWIRE_CHAOS_SECS` bounds the faults (20 s here; `benches/run.sh chaos` runs 600);
//! `AGENTWIRE_CHAOS_SEED` replays a run's draws.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use common::fault_proxy::{Fault, FaultProxy, Which};
use common::own_redis::OwnRedis;
use common::postgres::TestDatabase;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const USERS: usize = 4;
const TABS_PER_USER: usize = 2;

/// One node: its fault proxy to Redis, its process (none while it is down), and how to start it.
struct Node {
    proxy: FaultProxy,
    server: Option<BinaryServer>,
    env: Vec<(String, String)>,
    paused: bool,
}

impl Node {
    fn start(&mut self) {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.server = Some(BinaryServer::spawn(&env));
        self.paused = false;
    }

    fn signal(&self, signal: &str) {
        if let Some(server) = &self.server {
            let _ = std::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(server.child.id().to_string())
                .status();
        }
    }

    /// Started again if its process ended (killed, or fenced: exit 3).
    fn revive(&mut self) -> bool {
        let exited = match &mut self.server {
            Some(server) => server.child.try_wait().ok().flatten().is_some(),
            None => true,
        };
        if exited {
            self.start();
        }
        exited
    }
}

type Nodes = Rc<RefCell<Vec<Node>>>;

/// What one tab saw, in order.
#[derive(Debug)]
enum Seen {
    /// `processing_ready`: the epoch, and whether its resume was complete (`None`: no resume).
    Ready {
        epoch: String,
        complete: Option<bool>,
    },
    Event {
        seq: u64,
        kind: String,
        run_id: Option<String>,
    },
    /// The connection ended (a close frame or a dropped socket).
    Closed,
}

#[derive(Default)]
struct Counts {
    faults: BTreeMap<&'static str, usize>,
    acked: Vec<(String, String)>,
    published: usize,
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A live, running node's WebSocket address, at random.
fn pick(nodes: &Nodes, rng: &mut impl Rng) -> Option<(String, String)> {
    let nodes = nodes.borrow();
    let live: Vec<&BinaryServer> =
        nodes.iter().filter(|n| !n.paused).filter_map(|n| n.server.as_ref()).collect();
    if live.is_empty() {
        return None;
    }
    let server = live[rng.random_range(0..live.len())];
    Some((server.ws_url(), server.http("/api/v1/publish")))
}

/// A tab of `user`: connects to a live node (resuming where it was), sends a message on its own
/// thread whenever its previous run has ended, sends an unacked message again (same
/// `client_msg_id`) after `unavailable` or a reconnect, and records what it sees until `until`,
/// then until its last acked run has ended (bounded).
async fn tab(
    user: String,
    tab: usize,
    nodes: Nodes,
    until: Instant,
    seen: Rc<RefCell<Vec<Seen>>>,
    counts: Rc<RefCell<Counts>>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let token = agentwire::auth::Minter::new(&test_auth()).unwrap().mint(&user, None, 36_000).unwrap().0;
    let thread = format!("t{tab}");
    let (mut epoch, mut last_seq): (Option<String>, u64) = (None, 0);
    let mut sent = 0usize;
    // The message waiting for its ack, and the run waiting for its end.
    let mut unacked: Option<Value> = None;
    let mut running: Option<String> = None;
    let quiet_until = until + Duration::from_secs(30);
    while Instant::now() < quiet_until && (Instant::now() < until || running.is_some() || unacked.is_some()) {
        let Some((url, _)) = pick(&nodes, &mut rng) else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let url = match &epoch {
            Some(epoch) => format!("{url}?last_seq={last_seq}&epoch={epoch}"),
            None => url,
        };
        let Some(mut ws) = connect(url, &token).await else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut ready = false;
        let mut resend = unacked.is_some();
        loop {
            if Instant::now() >= quiet_until
                || (Instant::now() >= until && running.is_none() && unacked.is_none())
            {
                let _ = ws.close(None).await;
                break;
            }
            if ready && (resend || (unacked.is_none() && running.is_none() && Instant::now() < until)) {
                let message = match (&unacked, resend) {
                    (Some(message), true) => message.clone(),
                    _ => {
                        sent += 1;
                        json!({"type": "user_message", "thread_id": thread, "content": "what is 2 + 3?",
                               "client_msg_id": format!("{user}-{tab}-{sent}")})
                    }
                };
                unacked = Some(message.clone());
                resend = false;
                if ws.send(Message::text(message.to_string())).await.is_err() {
                    seen.borrow_mut().push(Seen::Closed);
                    break;
                }
            }
            let frame = match timeout(Duration::from_millis(rng.random_range(200..600)), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<Value>(&text) {
                    Ok(frame) => frame,
                    Err(_) => continue,
                },
                Ok(Some(Ok(Message::Close(_)))) => {
                    seen.borrow_mut().push(Seen::Closed);
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => {
                    seen.borrow_mut().push(Seen::Closed);
                    break;
                }
            };
            match frame["type"].as_str() {
                Some("connection_state") if frame["state"] == "processing_ready" => {
                    let now = frame["epoch"].as_str().unwrap_or_default().to_owned();
                    if epoch.as_deref() != Some(now.as_str()) {
                        last_seq = 0;
                    }
                    epoch = Some(now.clone());
                    let complete = frame["resume"]["complete"].as_bool();
                    seen.borrow_mut().push(Seen::Ready { epoch: now, complete });
                    ready = true;
                }
                Some("ack") => {
                    let run = frame["run_id"].as_str().unwrap_or_default().to_owned();
                    if unacked.take().is_some() {
                        counts.borrow_mut().acked.push((user.clone(), run.clone()));
                        running = Some(run);
                    }
                }
                Some("error") if frame["code"] == "unavailable" => resend = true,
                Some("error") => {
                    // Anything else refused the message: it is not retried.
                    unacked = None;
                }
                _ => {}
            }
            if let Some(seq) = frame["seq"].as_u64().filter(|_| frame["type"] != "ack") {
                last_seq = seq;
                let kind = frame["type"].as_str().unwrap_or_default().to_owned();
                let run_id = frame["run_id"].as_str().map(str::to_owned);
                if matches!(kind.as_str(), "agent_completed" | "agent_error") && run_id == running {
                    running = None;
                }
                seen.borrow_mut().push(Seen::Event { seq, kind, run_id });
            }
        }
    }
}

/// A publish with its `Idempotency-Key`; `None` when no answer came (a node down or paused).
async fn try_post(url: &str, body: &str, key: &str) -> Option<u16> {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    let request = client
        .post(url)
        .insert_header(("content-type", "application/json"))
        .insert_header(("Idempotency-Key", key))
        .bearer_auth(API_KEY);
    request.send_body(body.to_owned()).await.ok().map(|r| r.status().as_u16())
}

/// A backend publishing `agent_thinking` to users at random, each publish with an
/// `Idempotency-Key` sent again while the outcome is unknown or the broker is away.
async fn backend(nodes: Nodes, until: Instant, counts: Rc<RefCell<Counts>>, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let user = format!("chaos{}", rng.random_range(0..USERS));
        let body = json!({"user_id": user, "events": [{"type": "agent_thinking", "thread_id": "news",
                          "run_id": "backend", "payload": {"text": format!("news {n}")}}]})
        .to_string();
        let key = format!("news-{n}");
        for _ in 0..20 {
            let Some((_, url)) = pick(&nodes, &mut rng) else { break };
            match try_post(&url, &body, &key).await {
                Some(200) => {
                    counts.borrow_mut().published += 1;
                    break;
                }
                _ => sleep(Duration::from_millis(100)).await,
            }
        }
        sleep(Duration::from_millis(rng.random_range(100..300))).await;
    }
}

/// Draws a fault every one to three seconds until `until`, and undoes it.
async fn faults(
    nodes: Nodes,
    mut redis: OwnRedis,
    until: Instant,
    counts: Rc<RefCell<Counts>>,
    seed: u64,
) -> OwnRedis {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while Instant::now() < until {
        sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let i = rng.random_range(0..3);
        let fault: &'static str = match rng.random_range(0..7) {
            0 => {
                // Past the lease (2 s): the others reap it; back, it is fenced and stops.
                nodes.borrow_mut()[i].paused = true;
                nodes.borrow()[i].signal("STOP");
                sleep(Duration::from_millis(rng.random_range(2500..4000))).await;
                nodes.borrow()[i].signal("CONT");
                nodes.borrow_mut()[i].paused = false;
                "pause past the lease"
            }
            1 => {
                nodes.borrow()[i].signal("STOP");
                sleep(Duration::from_millis(rng.random_range(200..800))).await;
                nodes.borrow()[i].signal("CONT");
                "short pause"
            }
            2 => {
                nodes.borrow()[i].signal("KILL");
                sleep(Duration::from_millis(300)).await;
                "kill"
            }
            3 | 4 => {
                let which = [Fault::Cut, Fault::Blackhole, Fault::Delay(Duration::from_millis(1500))]
                    [rng.random_range(0..3)];
                let class = [Which::All, Which::PubSub, Which::Commands][rng.random_range(0..3)];
                nodes.borrow()[i].proxy.set(class, which);
                sleep(Duration::from_millis(rng.random_range(500..2500))).await;
                nodes.borrow()[i].proxy.set(Which::All, Fault::Pass);
                match which {
                    Fault::Cut => "link cut",
                    Fault::Blackhole => "link blackholed",
                    _ => "link delayed past the timeout",
                }
            }
            5 => {
                redis.terminate();
                sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                redis.restart().await;
                "Redis restarted with its data"
            }
            _ => continue,
        };
        *counts.borrow_mut().faults.entry(fault).or_default() += 1;
        for node in nodes.borrow_mut().iter_mut() {
            node.revive();
        }
    }
    redis
}

/// A WebSocket to `url` with `token` at the upgrade, or `None` when a node under faults did not
/// take it within 3 s.
async fn connect(
    url: String,
    token: &str,
) -> Option<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(request)).await {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

/// `user`'s whole stream as it is kept, read by a resume from 0 on a live node, and its epoch.
async fn read_stream(nodes: &Nodes, user: &str, seed: u64) -> (String, Vec<Value>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let token = agentwire::auth::Minter::new(&test_auth()).unwrap().mint(user, None, 3600).unwrap().0;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let Some((ws_url, _)) = pick(nodes, &mut rng) else { continue };
        let Some(mut ws) = connect(format!("{ws_url}?last_seq=0"), &token).await else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (mut epoch, mut expected, mut events) = (String::new(), None, Vec::new());
        while let Ok(Some(Ok(Message::Text(text)))) = timeout(Duration::from_secs(3), ws.next()).await {
            let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
            if frame["state"] == "processing_ready" {
                assert_eq!(frame["resume"]["from_seq"], 1, "{user}'s stream is not kept whole: {frame}");
                epoch = frame["epoch"].as_str().unwrap_or_default().to_owned();
                expected = frame["resume"]["replayed"].as_u64();
            } else if frame["seq"].is_u64() && frame["type"] != "ack" {
                events.push(frame);
            }
            if expected.is_some_and(|n| events.len() as u64 >= n) {
                return (epoch, events);
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
    panic!("{user}'s stream could not be read from any node");
}

/// The violations of docs/scale-out.md's invariants in what one tab saw.
fn check_tab(name: &str, seen: &[Seen], violations: &mut Vec<String>) -> usize {
    let mut events = 0;
    let mut last: Option<u64> = None;
    let mut epoch = String::new();
    let mut ended: HashMap<String, (u64, String)> = HashMap::new();
    // After a break, the next events may skip only if the resume said so.
    let mut may_skip = true;
    for item in seen {
        match item {
            Seen::Ready { epoch: now, complete } => {
                if *now != epoch {
                    epoch = now.clone();
                    last = None;
                    ended.clear();
                    may_skip = true;
                } else {
                    may_skip = *complete == Some(false);
                }
            }
            Seen::Closed => {}
            Seen::Event { seq, kind, run_id } => {
                events += 1;
                if let Some(last) = last {
                    if *seq <= last {
                        violations
                            .push(format!("{name}: seq {seq} after {last} (a duplicate or out of order)"));
                    } else if *seq != last + 1 && !may_skip {
                        violations.push(format!("{name}: seqs {}..{} missed silently", last + 1, seq - 1));
                    }
                }
                if let Some(run) = run_id {
                    if let Some((at, end)) = ended.get(run).filter(|_| run != "backend") {
                        violations.push(format!(
                            "{name}: {kind} of run {run} (seq {seq}) after its end ({end}, seq {at})"
                        ));
                    } else if kind == "agent_completed" || kind == "agent_error" {
                        ended.insert(run.clone(), (*seq, kind.clone()));
                    }
                }
                last = Some(last.map_or(*seq, |l| l.max(*seq)));
                may_skip = false;
            }
        }
    }
    events
}

#[actix_web::test]
async fn under_random_faults_every_tab_and_every_run_keeps_the_invariants() {
    let secs = env_secs("AGENTWIRE_CHAOS_SECS", 20);
    let seed = env_secs("AGENTWIRE_CHAOS_SEED", rand::random::<u32>() as u64);
    println!("chaos: {secs} s of faults, seed {seed} (AGENTWIRE_CHAOS_SEED={seed} replays the draws)");
    let redis = OwnRedis::start_with(true).await;
    let db = TestDatabase::create();
    let redis_addr: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let mut made = Vec::new();
    for i in 0..3 {
        let proxy = FaultProxy::start(redis_addr).await;
        let env = [
            ("AGENTWIRE__BROKER__KIND", "redis".to_owned()),
            ("AGENTWIRE__BROKER__URL", proxy.url()),
            ("AGENTWIRE__BROKER__PREFIX", "chaos".to_owned()),
            ("AGENTWIRE__BROKER__NODE_ID", format!("chaos-{i}")),
            ("AGENTWIRE__BROKER__NODE_LEASE_SECS", "2".to_owned()),
            ("AGENTWIRE__STORE__KIND", "postgres".to_owned()),
            ("AGENTWIRE__STORE__URL", db.url()),
            ("AGENTWIRE__HISTORY__TTL_SECS", "3600".to_owned()),
            ("AGENTWIRE__HISTORY__EVENTS_PER_USER", "100000".to_owned()),
            ("AGENTWIRE__AGENT__STEP_DELAY_MS", "100".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut node = Node { proxy, server: None, env, paused: false };
        node.start();
        made.push(node);
    }
    let nodes: Nodes = Rc::new(RefCell::new(made));
    let counts = Rc::new(RefCell::new(Counts::default()));
    let until = Instant::now() + Duration::from_secs(secs);

    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        for t in 0..TABS_PER_USER {
            let seen = Rc::new(RefCell::new(Vec::new()));
            logs.push((format!("chaos{u} tab {t}"), Rc::clone(&seen)));
            let task = tab(
                format!("chaos{u}"),
                t,
                Rc::clone(&nodes),
                until,
                seen,
                Rc::clone(&counts),
                seed + 1 + (u * 10 + t) as u64,
            );
            tasks.push(tokio::task::spawn_local(task));
        }
    }
    tasks.push(tokio::task::spawn_local(backend(Rc::clone(&nodes), until, Rc::clone(&counts), seed + 100)));
    let _redis = faults(Rc::clone(&nodes), redis, until, Rc::clone(&counts), seed).await;
    // Everything back: each paused node resumed, each stopped one started, every link whole.
    for node in nodes.borrow_mut().iter_mut() {
        node.signal("CONT");
        node.paused = false;
        node.proxy.set(Which::All, Fault::Pass);
        node.revive();
    }
    for task in tasks {
        task.await.unwrap();
    }

    let mut violations = Vec::new();
    let mut events = 0;
    for (name, seen) in &logs {
        events += check_tab(name, &seen.borrow(), &mut violations);
    }
    // The streams as they are kept: each acked message's run ended exactly once.
    let mut ends: HashMap<String, usize> = HashMap::new();
    for u in 0..USERS {
        let user = format!("chaos{u}");
        // A resume from 0 (no epoch: any) replays the whole kept stream; a node still settling
        // (a fenced one stopping) may send the reader away: it tries another.
        let (epoch, stream) = read_stream(&nodes, &user, seed).await;
        let name = format!("{user}'s stream");
        let mut replay = vec![Seen::Ready { epoch: epoch.clone(), complete: Some(true) }];
        replay.extend(stream.iter().map(|e| Seen::Event {
            seq: e["seq"].as_u64().unwrap_or(0),
            kind: e["type"].as_str().unwrap_or_default().to_owned(),
            run_id: e["run_id"].as_str().map(str::to_owned),
        }));
        check_tab(&name, &replay, &mut violations);
        for event in stream.iter().filter(|e| is_terminal(e)) {
            *ends.entry(event["run_id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        }
    }
    let counts = counts.borrow();
    for (user, run) in &counts.acked {
        match ends.get(run).copied().unwrap_or(0) {
            1 => {}
            n => violations.push(format!("{user}: acked run {run} ended {n} times")),
        }
    }
    let injected: usize = counts.faults.values().sum();
    println!(
        "chaos: {injected} faults injected {:?}; {} messages acked, {} backend publishes; {events} events checked over {} tabs; {} violations",
        counts.faults,
        counts.acked.len(),
        counts.published,
        logs.len(),
        violations.len()
    );
    for violation in violations.iter().take(50) {
        println!("  violation: {violation}");
    }
    if !violations.is_empty() {
        for (i, node) in nodes.borrow().iter().enumerate() {
            let Some(server) = &node.server else { continue };
            let log = server.log.lock().unwrap();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            println!(
                "node {i}'s log, last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    assert!(violations.is_empty(), "{} violations (seed {seed})", violations.len());
    assert!(injected > 0 && !counts.acked.is_empty(), "the run did nothing");
}
