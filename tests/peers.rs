//! Slow and dead peers (protocol section 7): a reader that stops reading costs bounded memory and
//! gets 4008; a peer that vanishes is dropped by the heartbeat; a client that disconnects in any
//! state leaves nothing behind.

mod common;

use std::num::NonZero;

use common::*;
use serde_json::{json, Value};

const EVENT_TEXT_BYTES: usize = 10_000;
const EVENTS: usize = 2_000; // 2,000 x 10 KB = 20 MB
const BATCH: usize = 20; // 200 KB per request keeps the publishing side's own memory small

fn big_batch(user: &str, first: usize) -> String {
    let text = "z".repeat(EVENT_TEXT_BYTES);
    let events: Vec<Value> = (first..first + BATCH.min(EVENTS - first))
        .map(|i| json!({"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": text, "i": i}}))
        .collect();
    json!({"user_id": user, "events": events}).to_string()
}

#[actix_web::test]
async fn a_reader_that_stops_reading_is_bounded_and_closed_with_4008() {
    // History is kept small so that what is measured is the slow session's backlog.
    let server = BinaryServer::spawn(&[("AGENTWIRE__HISTORY__EVENTS_PER_USER", "10")]);
    let token = server.token("slowpoke");
    let mut fast = Client::connect_bearer(&server.ws_url(), &token).await.unwrap();
    fast.expect_setup("slowpoke").await;
    let mut slow = Client::connect_bearer(&server.ws_url(), &token).await.unwrap();
    slow.expect_setup("slowpoke").await;
    // From here on `slow` is not read until every event has been published.

    let rss_before = server.rss_kb();
    let publish = async {
        let mut peak = rss_before;
        let mut first = 0;
        while first < EVENTS {
            let (status, _) =
                http_post(&server.http("/api/v1/publish"), Some(API_KEY), &big_batch("slowpoke", first))
                    .await;
            assert_eq!(status, 200);
            peak = peak.max(server.rss_kb());
            first += BATCH;
        }
        peak
    };
    let read_all = async {
        for seq in 1..=EVENTS as u64 {
            let event = fast.recv().await;
            assert_eq!(event["seq"], seq);
        }
    };
    let (peak, ()) = tokio::join!(publish, read_all);
    let growth_mb = (peak.saturating_sub(rss_before)) as f64 / 1024.0;
    eprintln!(
        "server RSS {rss_before} KB before, peak {peak} KB while publishing 20 MB ({growth_mb:.1} MB growth)"
    );
    assert!(growth_mb < 8.0, "the server's memory grew by {growth_mb:.1} MB for one slow reader");

    // The slow reader finally reads: what was buffered for it, in order, then 4008.
    let (close, frames) = slow.expect_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 4008);
    assert!(!frames.is_empty() && frames.len() < EVENTS, "got {} of {EVENTS}", frames.len());
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(frame["seq"].as_u64(), Some(i as u64 + 1));
    }
    let (_, metrics) = http_get(&server.http("/metrics"), None).await;
    assert!(metrics.as_str().unwrap().contains("agentwire_slow_consumer_closes_total 1"));
    // The fast session carries on.
    assert_eq!(fast.ping(json!("ok")).await["id"], "ok");
}

#[actix_web::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let server = TestServer::with(|c| {
        c.limits.heartbeat_interval_secs = NonZero::new(1).unwrap();
        c.limits.client_timeout_secs = 2;
    });
    let client = server.ready_client("ghost").await;
    // The client neither reads nor writes any more: no pong goes back.
    server
        .eventually("the silent peer to be dropped", |s| {
            s.metric("agentwire_connection_failures_total{reason=\"heartbeat_timeout\"}") == 1.0
                && s.metric("agentwire_connections{state=\"processing_ready\"}") == 0.0
                && s.metric("agentwire_connections{state=\"closing\"}") == 0.0
        })
        .await;
    let (_, body) = http_get(&server.http("/api/v1/users/ghost/connections"), Some(API_KEY)).await;
    assert_eq!(body["connections"], json!([]));
    drop(client);
}

#[actix_web::test]
async fn a_peer_that_answers_pings_stays() {
    let server = TestServer::with(|c| {
        c.limits.heartbeat_interval_secs = NonZero::new(1).unwrap();
        c.limits.client_timeout_secs = 2;
    });
    let mut client = server.ready_client("alive").await;
    // The client only reads, which answers the server's pings (the client library pongs by
    // itself). A silent peer has sent nothing for 3 s at the third heartbeat, so it is closed
    // there instead of pinged: a third ping means the pongs kept this one.
    client.expect_pings(3).await;
    assert_eq!(client.ping(json!("still")).await["id"], "still");
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"heartbeat_timeout\"}"), 0.0);
}

fn registry_empty(s: &TestServer) -> bool {
    ["accepted", "authenticated", "services_ready", "processing_ready", "closing", "failed"]
        .iter()
        .all(|state| s.metric(&format!("agentwire_connections{{state=\"{state}\"}}")) == 0.0)
}

#[actix_web::test]
async fn disconnects_in_any_state_leave_nothing_behind() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::with(|c| c.agent.step_delay_ms = 20);

    // Mid-upgrade: half a request, then gone.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n").await.unwrap();
    drop(tcp);

    // Before auth.
    let mut early = Client::connect(&server.ws_url()).await.unwrap();
    early.expect_state("accepted").await;
    drop(early);

    // Mid-run.
    let mut busy = server.ready_client("leaver").await;
    let run_id = busy.say("t", "count these words", None).await["run_id"].as_str().unwrap().to_owned();
    busy.recv_where(|f| f["type"] == "agent_started").await;
    drop(busy);

    server.eventually("every connection to be gone", registry_empty).await;
    assert_eq!(
        server.metric("agentwire_connections_opened_total"),
        2.0,
        "the half upgrade registered nothing"
    );
    let (_, body) = http_get(&server.http("/api/v1/users/leaver/connections"), Some(API_KEY)).await;
    assert_eq!(body["connections"], json!([]));

    // The run went on without its session and ended; its events wait in the history.
    let url = format!("{}?last_seq=0", server.ws_url());
    let mut back = Client::connect_bearer(&url, &server.token("leaver")).await.unwrap();
    back.expect_setup("leaver").await;
    let events = back.events_until_run_ends(&run_id).await;
    assert_eq!(events.last().unwrap()["payload"]["status"], "ok");
}
