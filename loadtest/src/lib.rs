//! `agentwire loadtest`: opens many sessions against a server, runs a scenario (`idle`, `chat`,
//! `fanout`, `hostile`), and reports latencies, throughput and correctness counters. Any
//! non-zero correctness counter (seq gap or duplicate, an event of another user, a malformed
//! run) or an error frame to a real user makes the exit code non-zero.
//!
//! It speaks the protocol from the client side with its own small types, and knows nothing of
//! the server's: tokens come from the caller (the binary mints them with the configured key).

mod attack;
mod report;
mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tokio::sync::{watch, Notify};

pub use report::Report;
use session::{now_us, thread_of};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Hold the sessions open for --hold-secs.
    Idle,
    /// Each session sends --messages user messages, each after the previous run completed.
    Chat,
    /// Sessions listen while --events events per user are published through /api/v1/publish.
    Fanout,
    /// The sessions chat as in `chat` while other connections attack the server (--attack).
    Hostile,
}

#[derive(Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// WebSocket URL of the server; repeat it for several nodes of one deployment (session i
    /// goes to the (i mod n)-th; publishes go through the first).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    pub urls: Vec<String>,
    #[arg(long, value_enum, default_value_t = Scenario::Idle)]
    pub scenario: Scenario,
    /// Sessions to open.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Users the sessions are spread over (session i belongs to user i % users).
    #[arg(long, default_value_t = 25)]
    pub users: usize,
    /// New sessions per second; 0 opens them as fast as --connect-concurrency allows.
    #[arg(long, default_value_t = 0)]
    pub ramp: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// HS256 secret to mint tokens with (default: the configured auth key; read by the caller).
    #[arg(long, env = "AGENTWIRE_LOADTEST_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Source addresses to spread connections over, e.g. 127.0.0.1-127.0.0.50.
    #[arg(long)]
    pub src_ips: Option<String>,
    /// idle: seconds to hold the sessions once all are ready.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// chat: messages per session.
    #[arg(long, default_value_t = 1)]
    pub messages: usize,
    /// chat: pause between one session's messages, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub message_interval_ms: u64,
    /// chat: the message text.
    #[arg(long, default_value = "what is 6 * 7?")]
    pub message_text: String,
    /// fanout: events published per user.
    #[arg(long, default_value_t = 100)]
    pub events: usize,
    /// fanout: events per publish request.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// fanout: publish rate per user in events per second; 0 publishes as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub publish_rate: u64,
    /// fanout: API key for /api/v1/publish (default: the first of api.keys).
    #[arg(long, env = "AGENTWIRE_LOADTEST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// hostile: an attack and how many connections run it, e.g. unauth-senders=1000; repeatable.
    /// Kinds: unauth-senders, slow-readers, flooders, oversized, fragmented, garbage, half-open,
    /// resume-storm. Without any: a mix of all of them.
    #[arg(long = "attack", value_parser = attack::parse_attack, value_name = "KIND=COUNT")]
    pub attacks: Vec<(attack::Attack, usize)>,
    /// hostile: milliseconds the attacks run before the real users start chatting.
    #[arg(long, default_value_t = 2000)]
    pub attack_warmup_ms: u64,
    /// Seconds each session may take to reach processing_ready.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout_secs: u64,
    /// Seconds the scenario may take once every session is ready.
    #[arg(long, default_value_t = 300)]
    pub scenario_timeout_secs: u64,
    /// Server process to report RSS and CPU of.
    #[arg(long)]
    pub server_pid: Option<i32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Everything a session needs to know, fixed before the first connection.
pub struct Plan {
    scenario: Scenario,
    /// The nodes' URLs and addresses; session i uses node i mod n. The first is where
    /// publishes and attacks go.
    url: String,
    server_addr: SocketAddr,
    nodes: Vec<(String, SocketAddr)>,
    source_ips: Vec<IpAddr>,
    users: usize,
    sessions: usize,
    tokens: Vec<String>,
    run_tag: String,
    hold: Duration,
    messages: usize,
    message_interval: Duration,
    message_text: String,
    events: usize,
    connect_timeout: Duration,
    scenario_timeout: Duration,
    attack_warmup: Duration,
}

impl Plan {
    fn user_id(&self, user: usize) -> String {
        format!("lt{}-{user}", self.run_tag)
    }

    fn sessions_of_user(&self, user: usize) -> usize {
        sessions_of_user(self.sessions, self.users, user)
    }
}

/// Session `i` belongs to user `i % users`, so the first `sessions % users` users get one more.
fn sessions_of_user(sessions: usize, users: usize, user: usize) -> usize {
    sessions / users + usize::from(user < sessions % users)
}

/// Counters shared by all sessions, read by the progress bar and the orchestrator.
pub struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    incomplete: AtomicUsize,
    errors: AtomicU64,
    events: AtomicU64,
    settled: Notify,
    go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

/// A usage problem found before any connection: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, UsageError> {
    let bad = || UsageError(format!("--src-ips {spec:?}: expected A.B.C.D or A.B.C.D-A.B.C.E"));
    let (first, last) = spec.split_once('-').unwrap_or((spec, spec));
    let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
    let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
    let (a, b) = (u32::from(first), u32::from(last));
    if b < a || b - a > 65_535 {
        return Err(bad());
    }
    Ok((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))).collect())
}

fn resolve(url: &str) -> Result<SocketAddr, UsageError> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| UsageError(format!("--url {url:?}: only ws:// URLs are supported")))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| UsageError(format!("--url {url:?}: cannot resolve {authority}")))
}

fn http_base(url: &str) -> String {
    let rest = url.trim_start_matches("ws://");
    format!("http://{}", rest.split('/').next().unwrap_or(rest))
}

/// Mints a token for a user id: the caller's key, the caller's claims.
pub type TokenSource = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

fn raise_open_files_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// Runs the load test and returns its report. `api_key` is for the publish API (fan-out, and the
/// hostile scenario's slow readers and resume storms) when `--api-key` is not given.
pub fn run(args: LoadtestArgs, tokens: TokenSource, api_key: Option<String>) -> Result<Report, UsageError> {
    if args.urls.is_empty() {
        return Err(UsageError("need at least one --url".into()));
    }
    if args.sessions == 0 || args.users == 0 || args.users > args.sessions {
        return Err(UsageError("need --sessions >= --users >= 1".into()));
    }
    let open_files = raise_open_files_limit();
    let room = open_files.saturating_sub(64) as usize;
    eprintln!("open-files limit {open_files}: this process can hold about {room} connections");
    if args.sessions > room {
        return Err(UsageError(format!(
            "--sessions {} needs {} open files but this process may open only {open_files} (the hard \
             limit); run several load generators, each with fewer sessions",
            args.sessions,
            args.sessions + 64
        )));
    }
    let run_tag = format!("{:x}", now_us() % 0xffff_ffff);
    let mut plan = Plan {
        scenario: args.scenario,
        url: args.urls[0].clone(),
        server_addr: resolve(&args.urls[0])?,
        nodes: args
            .urls
            .iter()
            .map(|url| Ok((url.clone(), resolve(url)?)))
            .collect::<Result<_, UsageError>>()?,
        source_ips: match &args.src_ips {
            Some(spec) => parse_source_ips(spec)?,
            None => Vec::new(),
        },
        users: args.users,
        sessions: args.sessions,
        tokens: Vec::with_capacity(args.users),
        run_tag,
        hold: Duration::from_secs(args.hold_secs),
        messages: args.messages,
        message_interval: Duration::from_millis(args.message_interval_ms),
        message_text: args.message_text.clone(),
        events: args.events,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        scenario_timeout: Duration::from_secs(args.scenario_timeout_secs),
        attack_warmup: Duration::from_millis(args.attack_warmup_ms),
    };
    for user in 0..args.users {
        plan.tokens.push(tokens(&plan.user_id(user)).map_err(UsageError)?);
    }
    let mut args = args;
    if args.scenario == Scenario::Hostile && args.attacks.is_empty() {
        args.attacks = attack::default_mix();
    }
    let needs_api = match args.scenario {
        Scenario::Fanout => true,
        Scenario::Hostile => args.attacks.iter().any(|(kind, count)| {
            *count > 0 && matches!(kind, attack::Attack::SlowReaders | attack::Attack::ResumeStorm)
        }),
        _ => false,
    };
    let api_key = match (needs_api, &args.api_key, &api_key) {
        (true, Some(key), _) | (true, None, Some(key)) => Some(key.clone()),
        (true, None, None) => {
            return Err(UsageError(
                "fanout, slow-readers and resume-storm need --api-key (or api.keys in the configuration)"
                    .into(),
            ))
        }
        _ => None,
    };
    let arena = (args.scenario == Scenario::Hostile).then(|| {
        attack::Arena::new(
            plan.server_addr,
            plan.url.clone(),
            plan.source_ips.clone(),
            tokens,
            plan.run_tag.clone(),
        )
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| UsageError(format!("tokio runtime: {e}")))?;
    Ok(runtime.block_on(orchestrate(Arc::new(plan), args, api_key, arena)))
}

async fn orchestrate(
    plan: Arc<Plan>,
    args: LoadtestArgs,
    api_key: Option<String>,
    arena: Option<attack::Arena>,
) -> Report {
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        incomplete: AtomicUsize::new(0),
        errors: AtomicU64::new(0),
        events: AtomicU64::new(0),
        settled: Notify::new(),
        go,
        stop: stop.clone(),
    });
    let server_before = args.server_pid.and_then(report::ServerSample::take);
    let progress = report::Progress::start(Arc::clone(&shared), plan.sessions, args.quiet);

    // Connect phase: at most `connect_concurrency` attempts in flight, paced by --ramp.
    let started = Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..plan.sessions {
        if args.ramp > 0 {
            let due = started + Duration::from_secs_f64(index as f64 / args.ramp as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { break };
        let (plan, shared) = (Arc::clone(&plan), Arc::clone(&shared));
        tasks.spawn(session::run(plan, shared, index, permit));
    }
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < plan.sessions {
        shared.settled.notified().await;
    }
    let connect_elapsed = started.elapsed();
    let server_ready = args.server_pid.and_then(report::ServerSample::take);
    progress.phase("scenario");

    let scenario_started = Instant::now();
    let events_before = shared.events.load(Ordering::Relaxed);
    let _ = go_tx.send(true);
    let publisher = match (plan.scenario, api_key.clone()) {
        (Scenario::Fanout, Some(key)) => {
            let plan = Arc::clone(&plan);
            let base = http_base(&plan.url);
            let (batch, rate) = (args.batch.max(1), args.publish_rate);
            Some(tokio::task::spawn_blocking(move || publish_all(&plan, &base, &key, batch, rate)))
        }
        _ => None,
    };
    let siege = arena.map(|arena| Siege::start(arena, &args, &plan, api_key, stop.clone()));
    let sampler = args.server_pid.map(report::RssTimeline::start);
    if plan.scenario == Scenario::Idle {
        tokio::time::sleep(plan.hold).await;
        let _ = stop_tx.send(true);
    }
    let mut outcomes = Vec::with_capacity(plan.sessions);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(outcome) = joined {
            outcomes.push(outcome);
        }
    }
    let mut publish_errors = match publisher {
        Some(handle) => handle.await.unwrap_or_else(|e| vec![format!("publisher panicked: {e}")]),
        None => Vec::new(),
    };
    let scenario_elapsed = scenario_started.elapsed();
    let _ = stop_tx.send(true);
    let attacks = match siege {
        Some(siege) => {
            progress.phase("draining");
            let (outcomes, errors) = siege.finish().await;
            publish_errors.extend(errors);
            outcomes
        }
        None => Default::default(),
    };
    let rss_timeline = match sampler {
        Some(sampler) => sampler.finish().await,
        None => Vec::new(),
    };
    let events = shared.events.load(Ordering::Relaxed) - events_before;
    progress.finish();
    let server_after = args.server_pid.and_then(report::ServerSample::take);
    Report::build(report::Inputs {
        args: &args,
        outcomes,
        connect_elapsed,
        scenario_elapsed,
        events,
        errors: shared.errors.load(Ordering::Relaxed),
        publish_errors,
        server: [server_before, server_ready, server_after],
        attacks,
        rss_timeline,
    })
}

/// The hostile scenario's attackers and the feeder that gives slow readers and resume storms
/// something to hold.
struct Siege {
    arena: Arc<attack::Arena>,
    attackers: tokio::task::JoinSet<()>,
    fed: Arc<std::sync::atomic::AtomicBool>,
    feeder: Option<tokio::task::JoinHandle<Vec<String>>>,
}

impl Siege {
    fn start(
        arena: attack::Arena,
        args: &LoadtestArgs,
        plan: &Plan,
        api_key: Option<String>,
        stop: watch::Receiver<bool>,
    ) -> Siege {
        let arena = Arc::new(arena);
        let fed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count_of = |kind| args.attacks.iter().filter(|(k, _)| *k == kind).map(|(_, n)| n).sum::<usize>();
        let feeder = api_key.map(|key| {
            let slow = arena.users(attack::Attack::SlowReaders, count_of(attack::Attack::SlowReaders));
            let storm = arena.users(attack::Attack::ResumeStorm, count_of(attack::Attack::ResumeStorm));
            let (base, done) = (http_base(&plan.url), Arc::clone(&fed));
            tokio::task::spawn_blocking(move || attack::feed(&base, &key, &slow, &storm, &done))
        });
        let mut attackers = tokio::task::JoinSet::new();
        // Attackers take source addresses after the real sessions' ones, so a per-address cap
        // meets them rather than the real users.
        let mut next_index = plan.sessions;
        for (kind, count) in &args.attacks {
            for i in 0..*count {
                attackers.spawn(attack::attacker(Arc::clone(&arena), stop.clone(), *kind, i, next_index + i));
            }
            next_index += count;
        }
        Siege { arena, attackers, fed, feeder }
    }

    async fn finish(
        mut self,
    ) -> (std::collections::BTreeMap<attack::Attack, std::collections::BTreeMap<String, u64>>, Vec<String>)
    {
        while self.attackers.join_next().await.is_some() {}
        self.fed.store(true, Ordering::Relaxed);
        let errors = match self.feeder {
            Some(handle) => handle.await.unwrap_or_else(|e| vec![format!("feeder panicked: {e}")]),
            None => Vec::new(),
        };
        (self.arena.outcomes(), errors)
    }
}

/// A client of `POST /api/v1/publish` that keeps its connection between requests.
pub(crate) struct Publisher {
    agent: ureq::Agent,
    url: String,
    auth: String,
}

impl Publisher {
    pub(crate) fn new(base: &str, key: &str) -> Publisher {
        Publisher {
            agent: ureq::Agent::new_with_defaults(),
            url: format!("{base}/api/v1/publish"),
            auth: format!("Bearer {key}"),
        }
    }

    /// Publishes `events` to `user`; the error names the user.
    pub(crate) fn publish(&self, user: &str, events: Vec<serde_json::Value>) -> Result<(), String> {
        let body = serde_json::json!({"user_id": user, "events": events}).to_string();
        self.agent
            .post(&self.url)
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .send(&body)
            // Reading the answer to its end lets the connection be reused for the next request.
            .and_then(|mut response| response.body_mut().read_to_string())
            .map(|_| ())
            .map_err(|e| format!("publish to {user}: {e}"))
    }
}

/// Publishes `plan.events` events to every user through the HTTP API, in batches.
fn publish_all(plan: &Plan, base: &str, key: &str, batch: usize, rate_per_user: u64) -> Vec<String> {
    let publisher = Publisher::new(base, key);
    let mut errors = Vec::new();
    let started = Instant::now();
    let mut published = 0;
    while published < plan.events {
        let count = batch.min(plan.events - published);
        if rate_per_user > 0 {
            let due = started + Duration::from_secs_f64(published as f64 / rate_per_user as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        for user in 0..plan.users {
            let user_id = plan.user_id(user);
            let thread = thread_of(&user_id);
            let t_us = now_us();
            let events: Vec<serde_json::Value> = (0..count)
                .map(|i| {
                    serde_json::json!({"type": "agent_thinking", "thread_id": thread, "run_id": "lt-fanout",
                        "payload": {"text": format!("event {}", published + i), "t_us": t_us}})
                })
                .collect();
            if let Err(e) = publisher.publish(&user_id, events) {
                errors.push(e);
                if errors.len() > 10 {
                    return errors;
                }
            }
        }
        published += count;
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_ranges() {
        assert_eq!(parse_source_ips("127.0.0.1-127.0.0.3").unwrap().len(), 3);
        assert_eq!(parse_source_ips("127.0.0.9").unwrap(), vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]);
        assert!(parse_source_ips("127.0.0.3-127.0.0.1").is_err());
        assert!(parse_source_ips("localhost").is_err());
    }

    #[test]
    fn sessions_spread_over_users() {
        let total = |sessions, users| (0..users).map(|u| sessions_of_user(sessions, users, u)).sum::<usize>();
        assert_eq!(total(10, 3), 10);
        assert_eq!(total(1000, 250), 1000);
        assert_eq!(sessions_of_user(10, 3, 0), 4);
        assert_eq!(http_base("ws://127.0.0.1:8080/ws"), "http://127.0.0.1:8080");
    }
}
