//! Graceful shutdown on the real binary (protocol section 7): on SIGTERM the server stops
//! accepting, every session gets the events already published to it and then 1012, and the
//! process exits 0 within `server.shutdown_grace_secs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{self, StreamExt};
use serde_json::json;

const SESSIONS: usize = 500;
const USERS: usize = 50;

#[actix_web::test]
async fn sigterm_closes_every_session_with_1012_and_exits_0() {
    let server =
        BinaryServer::spawn(&[("AGENTWIRE__SERVER__SHUTDOWN_GRACE_SECS", "5"), ("RUST_LOG", "warn")]);
    let url = server.ws_url();
    let tokens: Vec<String> = (0..USERS).map(|u| server.token(&format!("down-{u}"))).collect();
    let clients: Vec<Client> = stream::iter((0..SESSIONS).map(|i| {
        let (url, token, user) = (url.clone(), tokens[i % USERS].clone(), format!("down-{}", i % USERS));
        async move {
            let mut client = Client::connect_bearer(&url, &token).await.unwrap();
            client.expect_setup(&user).await;
            client
        }
    }))
    .buffer_unordered(100)
    .collect()
    .await;

    // Published just before the signal: every session must get these before its 1012.
    for u in 0..USERS {
        let body = json!({"user_id": format!("down-{u}"), "events": [
            {"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": "last words 1"}},
            {"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": "last words 2"}}
        ]});
        assert_eq!(http_post(&server.http("/api/v1/publish"), Some(API_KEY), &body.to_string()).await.0, 200);
    }
    let signalled = Instant::now();
    server.signal("TERM");

    let closes: Vec<(u16, usize)> = stream::iter(clients.into_iter().map(|mut client| async move {
        let (close, frames) = client.expect_close().await;
        let code = u16::from(close.expect("a close frame").code);
        (code, frames.iter().filter(|f| f["type"] == "agent_thinking").count())
    }))
    .buffer_unordered(SESSIONS)
    .collect()
    .await;
    assert_eq!(closes.len(), SESSIONS);
    assert!(closes.iter().all(|(code, _)| *code == 1012), "{:?}", closes.iter().find(|(c, _)| *c != 1012));
    assert!(closes.iter().all(|(_, events)| *events == 2), "an event published before the signal was lost");

    // New upgrades are refused while it drains.
    assert!(Client::connect_bearer(&url, &tokens[0]).await.is_err());

    let mut server = server;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(5), "still running after the grace period");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
}

/// docs/scale-out.md's SIGTERM row: a run in progress gets part of the grace period, then ends with
/// `agent_error` `node_shutdown` before its session's 1012.
#[actix_web::test]
async fn sigterm_ends_unfinished_runs_with_node_shutdown_before_the_1012() {
    let server = BinaryServer::spawn(&[
        ("AGENTWIRE__SERVER__SHUTDOWN_GRACE_SECS", "2"),
        ("AGENTWIRE__AGENT__STEP_DELAY_MS", "3000"),
    ]);
    let mut client = Client::connect_bearer(&server.ws_url(), &server.token("late")).await.unwrap();
    client.expect_setup("late").await;
    let run_id = client.say("t", "a long question", None).await["run_id"].as_str().unwrap().to_owned();
    server.signal("TERM");
    let (close, frames) = client.expect_close().await;
    assert_eq!(u16::from(close.expect("a close frame").code), 1012);
    let end = frames
        .iter()
        .find(|f| f["run_id"] == run_id.as_str() && is_terminal(f))
        .unwrap_or_else(|| panic!("the run's end before 1012: {frames:?}\n{}", server.log_text()));
    assert_eq!(
        (end["type"].as_str(), end["payload"]["code"].as_str()),
        (Some("agent_error"), Some("node_shutdown"))
    );
}
