//! A scripted AG-UI agent for the tests: a real HTTP server on 127.0.0.1:0 that answers each
//! run as its script says (an SSE body, a status, silence), records every `RunAgentInput` it
//! receives, and reports when agentwire closes a run's request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// How the fake agent answers one run.
#[derive(Clone)]
pub enum Reply {
    /// This HTTP status and no body.
    Status(u16),
    /// A body of this content type: these pieces, `gap` apart, then `tail`.
    Body { content_type: &'static str, pieces: Vec<String>, gap: Duration, tail: Tail },
    /// Accepts the request and never answers it.
    Silent,
}

#[derive(Clone)]
pub enum Tail {
    /// The body ends.
    End,
    /// The body stays open with nothing more than an SSE comment (a keep-alive, not an event)
    /// every 100 ms.
    Hang,
    /// The body stays open and nothing more comes, not even a keep-alive.
    Quiet,
    /// This piece again every `Duration`, forever.
    Repeat(Duration, String),
}

/// An SSE body of these AG-UI events, one `data:` line each.
pub fn sse(events: &[Value]) -> Reply {
    Reply::Body {
        content_type: "text/event-stream",
        pieces: pieces(events),
        gap: Duration::ZERO,
        tail: Tail::End,
    }
}

pub fn pieces(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

/// A run that streams one long answer: `before` (after `RUN_STARTED`), then `chunks` pieces of
/// text message `a1` (`delta(i)` each), `gap` apart, then the run's end.
pub fn long_answer(
    input: &Value,
    before: Vec<Value>,
    chunks: usize,
    delta: impl Fn(usize) -> String,
    gap: Duration,
) -> Reply {
    let mut events =
        vec![json!({"type": "RUN_STARTED", "threadId": input["threadId"], "runId": input["runId"]})];
    events.extend(before);
    events.push(json!({"type": "TEXT_MESSAGE_START", "messageId": "a1", "role": "assistant"}));
    events.extend(
        (0..chunks).map(|i| json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a1", "delta": delta(i)})),
    );
    events.push(json!({"type": "TEXT_MESSAGE_END", "messageId": "a1"}));
    events.push(json!({"type": "RUN_FINISHED", "threadId": input["threadId"], "runId": input["runId"]}));
    Reply::Body { content_type: "text/event-stream", pieces: pieces(&events), gap, tail: Tail::End }
}

type Script = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

pub struct FakeAgent {
    pub url: String,
    /// Every request received, in order: `{"body": RunAgentInput, "headers": {...}}`.
    pub requests: Arc<Mutex<Vec<Value>>>,
    /// The `runId` of each run whose request agentwire closed before its body ended.
    pub closed: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    handle: actix_web::dev::ServerHandle,
}

/// Tells the fake agent a body was dropped before its end (the request was closed).
struct ClosedGuard {
    run_id: String,
    done: bool,
    closed: mpsc::UnboundedSender<String>,
}

impl ClosedGuard {
    /// The body ended as scripted: not a close.
    fn disarm(&mut self) {
        self.done = true;
    }
}

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.closed.send(std::mem::take(&mut self.run_id));
        }
    }
}

impl FakeAgent {
    /// Starts the agent; `script` picks each run's reply from its request body.
    pub fn start(script: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> FakeAgent {
        let script: Script = Arc::new(script);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        let (tx, rx) = std::sync::mpsc::channel();
        let recorded = Arc::clone(&requests);
        std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let script = Arc::clone(&script);
                    let recorded = Arc::clone(&recorded);
                    let closed = closed_tx.clone();
                    App::new().default_service(web::to(move |request: HttpRequest, body: Bytes| {
                        let input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        // What the agent was sent beside the body, for the tests to see.
                        let header = |name: &str| {
                            request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
                        };
                        let seen = json!({"authorization": header("authorization"), "accept": header("accept"),
                            "content-type": header("content-type")});
                        recorded.lock().unwrap().push(json!({"body": input.clone(), "headers": seen}));
                        let reply = script(&input);
                        let run_id = input["runId"].as_str().unwrap_or_default().to_owned();
                        respond(reply, run_id, closed.clone())
                    }))
                })
                .workers(1)
                .bind("127.0.0.1:0")
                .expect("bind");
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            });
        });
        let (addr, handle) = rx.recv_timeout(super::WAIT).expect("fake agent started");
        FakeAgent {
            url: format!("http://{addr}/agent"),
            requests,
            closed: tokio::sync::Mutex::new(closed_rx),
            handle,
        }
    }

    /// The request bodies received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().iter().map(|r| r["body"].clone()).collect()
    }

    /// The headers of the requests received so far.
    pub fn headers(&self) -> Vec<Value> {
        self.requests.lock().unwrap().iter().map(|r| r["headers"].clone()).collect()
    }

    /// The run id of the next request agentwire closed early (bounded wait).
    pub async fn next_closed(&self) -> String {
        let mut closed = self.closed.lock().await;
        tokio::time::timeout(super::WAIT, closed.recv())
            .await
            .expect("a request closed in time")
            .expect("the fake agent is running")
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

async fn respond(reply: Reply, run_id: String, closed: mpsc::UnboundedSender<String>) -> HttpResponse {
    let (content_type, pieces, gap, tail) = match reply {
        Reply::Status(code) => {
            return HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap()).finish();
        }
        Reply::Silent => {
            // Holds the request open without a word; agentwire gives up on it.
            let _guard = ClosedGuard { run_id, done: false, closed };
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Body { content_type, pieces, gap, tail } => (content_type, pieces, gap, tail),
    };
    let guard = ClosedGuard { run_id, done: false, closed };
    let body = futures_util::stream::unfold(
        (pieces.into_iter(), guard, true),
        move |(mut pieces, mut guard, first)| {
            let tail = tail.clone();
            async move {
                if !first && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                if let Some(piece) = pieces.next() {
                    return Some((Ok::<_, actix_web::Error>(Bytes::from(piece)), (pieces, guard, false)));
                }
                let next = match tail {
                    Tail::End => {
                        guard.disarm();
                        return None;
                    }
                    Tail::Hang => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        ": keep-alive\n\n".to_owned()
                    }
                    Tail::Quiet => std::future::pending().await,
                    Tail::Repeat(every, piece) => {
                        tokio::time::sleep(every).await;
                        piece
                    }
                };
                Some((Ok(Bytes::from(next)), (pieces, guard, false)))
            }
        },
    );
    HttpResponse::Ok().content_type(content_type).streaming(body)
}
