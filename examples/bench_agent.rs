//! An AG-UI agent for benchmarks (`benches/run.sh`): answers a run at once, as the demo agent
//! does at full speed (a tool call, a few text chunks), unless the user's latest message says
//! "slow": then it holds the run open for `--slow-secs` before answering. `GET /stats` tells how
//! many slow runs are open, so the benchmark can start its measured load while they all are.
//! A message that says "verbose" is answered with `--verbose-events` text events of
//! `--verbose-bytes` each, as fast as they are read (what a run's memory is measured with).
//!
//!     cargo run --release --example bench_agent -- --port 18090 --slow-secs 10

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Options {
    #[arg(long, default_value_t = 18090)]
    port: u16,
    /// How long a "slow" run stays open before its answer.
    #[arg(long, default_value_t = 10)]
    slow_secs: u64,
    /// Text events of a "verbose" run.
    #[arg(long, default_value_t = 3000)]
    verbose_events: usize,
    /// Bytes of each of them.
    #[arg(long, default_value_t = 30_000)]
    verbose_bytes: usize,
}

struct Agent {
    slow: Duration,
    verbose_events: usize,
    verbose_bytes: usize,
    open_slow_runs: AtomicUsize,
}

/// Decrements the open count when the run's body ends or is dropped (a cancel).
struct OpenRun(Arc<Agent>);

impl Drop for OpenRun {
    fn drop(&mut self) {
        self.0.open_slow_runs.fetch_sub(1, Ordering::Relaxed);
    }
}

fn data(event: Value) -> Bytes {
    Bytes::from(format!("data: {event}\n\n"))
}

fn answer(input: &Value) -> Vec<Bytes> {
    let ids = |kind: &str| json!({"type": kind, "threadId": input["threadId"], "runId": input["runId"]});
    let mut events = vec![
        ids("RUN_STARTED"),
        json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "calculator", "parentMessageId": "a"}),
        json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{\"expression\": \"6 * 7\"}"}),
        json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}),
        json!({"type": "TOOL_CALL_RESULT", "messageId": "t", "toolCallId": "c1", "content": "42"}),
    ];
    for delta in ["The answer ", "is 42, ", "as the calculator says."] {
        events.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": delta}));
    }
    events.push(ids("RUN_FINISHED"));
    events.into_iter().map(data).collect()
}

async fn run(agent: web::Data<Agent>, body: web::Bytes) -> HttpResponse {
    let input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let latest = input["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str());
    let slow = latest.is_some_and(|text| text.contains("slow"));
    if latest.is_some_and(|text| text.contains("verbose")) {
        return verbose(&agent, &input);
    }
    let mut pieces = answer(&input);
    if !slow {
        let body = futures_util::stream::iter(pieces.into_iter().map(Ok::<_, actix_web::Error>));
        return HttpResponse::Ok().content_type("text/event-stream").streaming(body);
    }
    agent.open_slow_runs.fetch_add(1, Ordering::Relaxed);
    let open = OpenRun(agent.into_inner());
    let first = pieces.remove(0);
    let wait = open.0.slow;
    // RUN_STARTED at once, the rest after the wait.
    let body = futures_util::stream::unfold((0, Some(open), pieces), move |(step, open, rest)| {
        let first = first.clone();
        async move {
            match step {
                0 => Some((Ok::<_, actix_web::Error>(first), (1, open, rest))),
                1 => {
                    tokio::time::sleep(wait).await;
                    drop(open);
                    Some((Ok(Bytes::from(rest.concat())), (2, None, Vec::new())))
                }
                _ => None,
            }
        }
    });
    HttpResponse::Ok().content_type("text/event-stream").streaming(body)
}

/// A run of many large text events, each made as the response is read.
fn verbose(agent: &Agent, input: &Value) -> HttpResponse {
    let ids = |kind: &str| json!({"type": kind, "threadId": input["threadId"], "runId": input["runId"]});
    let (first, last) = (data(ids("RUN_STARTED")), data(ids("RUN_FINISHED")));
    let (count, size) = (agent.verbose_events, agent.verbose_bytes);
    let chunk = "v".repeat(size);
    let events = (0..count)
        .map(move |_| data(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": chunk})));
    let body =
        std::iter::once(first).chain(events).chain(std::iter::once(last)).map(Ok::<_, actix_web::Error>);
    HttpResponse::Ok().content_type("text/event-stream").streaming(futures_util::stream::iter(body))
}

async fn stats(agent: web::Data<Agent>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"open_slow_runs": agent.open_slow_runs.load(Ordering::Relaxed)}))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let options = Options::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let agent = web::Data::new(Agent {
        slow: Duration::from_secs(options.slow_secs),
        verbose_events: options.verbose_events,
        verbose_bytes: options.verbose_bytes,
        open_slow_runs: AtomicUsize::new(0),
    });
    println!("bench agent on http://127.0.0.1:{}/ (slow runs: {} s)", options.port, options.slow_secs);
    HttpServer::new(move || {
        App::new()
            .app_data(agent.clone())
            .route("/stats", web::get().to(stats))
            .default_service(web::post().to(run))
    })
    .workers(1)
    .backlog(4096)
    .max_connections(50_000)
    .bind(("127.0.0.1", options.port))?
    .run()
    .await
}
