//! Hostile and careless clients (issue: memory bounded in bytes from the first byte, caps on all
//! that a client can grow, secure defaults, contract fixes). Each test fails without the rule it
//! names; every one talks to a real server over real sockets.

mod common;

use std::num::NonZero;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};

/// `limits.unauthenticated_bytes`: a connection that sends more than that before it has
/// authenticated is closed with 1008, judged from the header of the frame that would go past
/// it; nothing is written before `accepted`.
#[actix_web::test]
async fn a_connection_that_sends_too_much_before_authenticating_is_closed_with_1008() {
    let server = TestServer::with(|c| c.limits.unauthenticated_bytes = NonZero::new(16_384).unwrap());
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    let pad = "p".repeat(6_000);
    // 12 KB fit; the third frame's header announces more than the 4 KB left.
    for i in 0..3 {
        client.send(json!({"type": "ping", "id": i, "pad": pad})).await;
    }
    let (close, before) = client.expect_close().await;
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1008), "{before:?}");
    assert_eq!(before.first().map(|f| f["state"].clone()), Some(json!("accepted")), "{before:?}");

    // The same bytes after a token are fine: the allowance is for strangers only.
    let mut known = Client::connect_bearer(&server.ws_url(), &server.token("known")).await.unwrap();
    for i in 0..3 {
        known.send(json!({"type": "ping", "id": i, "pad": pad})).await;
    }
    known.expect_setup("known").await;
    for i in 0..3 {
        assert_eq!(known.recv_where(|f| f["type"] == "pong").await["id"], i);
    }
}

/// Section 3: early frames before authentication are queued by bytes as well as by count, and
/// the `not_ready` answer to the one over the byte cap never comes before `accepted`.
#[actix_web::test]
async fn early_frames_before_authentication_are_capped_in_bytes() {
    let server = TestServer::with(|c| {
        c.limits.max_message_bytes = 4096;
        c.limits.pending_bytes = NonZero::new(4096).unwrap();
        c.limits.max_outbound_bytes = NonZero::new(8192).unwrap();
    });
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    let pad = "p".repeat(1500);
    for i in 0..3 {
        client.send(json!({"type": "ping", "id": i, "pad": pad})).await;
    }
    // Three frames are far under the count cap (32), but the third is over 4096 bytes in all.
    client.expect_state("accepted").await;
    let refused = client.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("not_ready"), Some("ping")),
        "{refused}"
    );
    client.send(json!({"type": "auth", "token": server.token("early")})).await;
    client.expect_state("authenticated").await;
    client.expect_state("services_ready").await;
    client.expect_state("processing_ready").await;
    for i in 0..2 {
        let pong = client.recv().await;
        assert_eq!((pong["type"].as_str(), pong["id"].as_i64()), (Some("pong"), Some(i)), "{pong}");
    }
}

/// A `ping` id is echoed, so it is a short string or an integer; anything else is `bad_message`.
#[actix_web::test]
async fn a_ping_id_is_a_short_string_or_an_integer() {
    let server = TestServer::start();
    let mut client = server.ready_client("pinger").await;
    for bad in [json!([0, 0, 0]), json!("x".repeat(65)), json!({"a": 1}), json!(1.5), json!(true)] {
        let answer = client.ping(bad.clone()).await;
        assert_eq!(
            (answer["code"].as_str(), answer["ref"].as_str()),
            (Some("bad_message"), Some("ping")),
            "{bad}"
        );
    }
    for good in [json!(7), json!(-3), json!("x".repeat(64)), json!("")] {
        let answer = client.ping(good.clone()).await;
        assert_eq!(answer["type"], "pong");
        assert_eq!(answer["id"], good);
    }
    // Without an id the pong has none.
    client.send(json!({"type": "ping"})).await;
    assert!(client.recv().await.get("id").is_none());
}

/// Section 2: an `auth` frame that cannot be read is a failed authentication, answered at once
/// with `invalid_token` and 4001, not left to the auth timeout (4002).
#[actix_web::test]
async fn a_malformed_auth_frame_gets_invalid_token_and_4001_at_once() {
    let server = TestServer::with(|c| c.auth.timeout_secs = NonZero::new(60).unwrap());
    for frame in
        [json!({"type": "auth"}), json!({"type": "auth", "token": 42}), json!({"type": "auth", "token": ""})]
    {
        let mut client = Client::connect(&server.ws_url()).await.unwrap();
        client.send(frame.clone()).await;
        client.expect_state("accepted").await;
        let (close, before) = client.expect_close().await;
        assert_eq!(before.len(), 1, "{frame}: {before:?}");
        assert_eq!(
            (before[0]["code"].as_str(), before[0]["ref"].as_str()),
            (Some("invalid_token"), Some("auth"))
        );
        assert_eq!(u16::from(close.expect("a close frame").code), 4001, "{frame}");
    }
}

/// Upgrades without a token hold a place under `limits.max_unauthenticated` and
/// `limits.max_unauthenticated_per_ip` until they authenticate; beyond either: HTTP 503.
#[actix_web::test]
async fn unauthenticated_connections_are_capped_overall_and_per_ip() {
    let server = TestServer::with(|c| {
        c.limits.max_unauthenticated = NonZero::new(3).unwrap();
        c.limits.max_unauthenticated_per_ip = NonZero::new(2).unwrap();
    });
    let url = server.ws_url();
    let mut first = Client::connect_from(&url, "127.0.0.1").await.unwrap();
    first.expect_state("accepted").await;
    let mut second = Client::connect_from(&url, "127.0.0.1").await.unwrap();
    second.expect_state("accepted").await;
    let (status, body) = refused_upgrade(Client::connect_from(&url, "127.0.0.1").await);
    assert_eq!((status, body["error"].as_str()), (503, Some("over_capacity")), "per IP");
    let mut other = Client::connect_from(&url, "127.0.0.2").await.unwrap();
    other.expect_state("accepted").await;
    assert_eq!(refused_upgrade(Client::connect_from(&url, "127.0.0.3").await).0, 503, "server-wide");
    // A token at the upgrade is no unauthenticated connection.
    let mut bearer = Client::connect_bearer(&url, &server.token("vouched")).await.unwrap();
    bearer.expect_setup("vouched").await;
    // Authenticating gives the place back.
    first.send(json!({"type": "auth", "token": server.token("late")})).await;
    for state in ["authenticated", "services_ready", "processing_ready"] {
        first.expect_state(state).await;
    }
    let mut again = Client::connect_from(&url, "127.0.0.1").await.unwrap();
    again.expect_state("accepted").await;
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"unauthenticated_ip_cap\"}"), 1.0);
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"unauthenticated_cap\"}"), 1.0);
}

/// A session the registry gives up on (over its outbound budget, its peer not reading) frees
/// its place under the user's session cap at once, not when its frozen actor finally stops.
#[actix_web::test]
async fn a_session_given_up_as_slow_frees_its_user_slot_at_once() {
    let server = TestServer::with(|c| {
        c.limits.max_sessions_per_user = NonZero::new(1).unwrap();
        c.limits.max_outbound_bytes = NonZero::new(131_072).unwrap();
    });
    let _stuck = server.ready_client("crowd").await; // never read from here on
    let text = "z".repeat(10_000);
    let connections = server.http("/api/v1/users/crowd/connections");
    let mut batches = 0;
    loop {
        let (_, listed) = http_get(&connections, Some(API_KEY)).await;
        if listed["connections"].as_array().is_some_and(|c| c.is_empty()) {
            break;
        }
        assert!(batches < 100, "20 MB published and the session is still counted: {listed}");
        let (status, _) = publish(&server, "crowd", (0..20).map(|_| thinking(&text)).collect()).await;
        assert_eq!(status, 200);
        batches += 1;
    }
    // The stuck tab has not stopped (its peer reads nothing), yet a new tab fits under the cap.
    let mut fresh = Client::connect_bearer(&server.ws_url(), &server.token("crowd")).await.unwrap();
    fresh.expect_setup("crowd").await;
}

/// Section 7: an upgrade that races SIGTERM still gets 1012, never a socket left open.
#[actix_web::test]
async fn upgrades_racing_shutdown_still_get_1012() {
    let server = TestServer::start();
    let url = server.ws_url();
    let tokens: Vec<String> = (0..120).map(|i| server.token(&format!("racer-{i}"))).collect();
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let connects = join_all(tokens.iter().enumerate().map(|(i, token)| {
        let (url, started) = (url.clone(), started.clone());
        async move {
            if i == 20 {
                started.notify_one();
            }
            match Client::connect_bearer(&url, token).await {
                Ok(mut client) => {
                    let (close, _) = client.expect_close().await;
                    Some(u16::from(close.expect("a close frame, not a dropped socket").code))
                }
                Err(Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 503);
                    None
                }
                // The listener closed, or the server dropped a request it had not answered:
                // the client knows it is not connected, which is what a reconnect needs.
                Err(
                    Error::Io(_)
                    | Error::Protocol(ProtocolError::HandshakeIncomplete)
                    | Error::ConnectionClosed,
                ) => None,
                Err(e) => panic!("upgrade failed: {e}"),
            }
        }
    }));
    let stop = async {
        tokio::time::timeout(WAIT, started.notified()).await.expect("connects began");
        server.shutdown().await;
    };
    let (codes, ()) = tokio::join!(connects, stop);
    let upgraded: Vec<u16> = codes.into_iter().flatten().collect();
    assert!(upgraded.iter().all(|&code| code == 1012), "{upgraded:?}");
}

/// Section 5 and 6 input rules at the HTTP edge.
#[actix_web::test]
async fn a_published_user_message_with_run_id_and_an_epoch_without_last_seq_are_400() {
    let server = TestServer::start();
    let echo =
        json!({"type": "user_message", "thread_id": "t", "run_id": "r_1", "payload": {"content": "hi"}});
    let (status, body) = publish(&server, "alice", vec![echo]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("run_id"), "{body}");
    let url = format!("{}?epoch=abc", server.ws_url());
    let (status, body) = refused_upgrade(Client::connect_bearer(&url, &server.token("alice")).await);
    assert_eq!(status, 400, "{body}");
}

/// Section 6: an offline user's stream is kept `history.ttl_secs` after its last event. The
/// test lets real time pass, since time is what it is about, but it never bets on a margin of
/// the clock: a second user, published to once at the start, is the control. Its stream going
/// (seen on the streams gauge) shows a sweep has passed the TTL counted from the start; the
/// ghost, made before it but published to again half a TTL later, must still be there.
#[actix_web::test]
async fn an_offline_stream_lives_its_ttl_after_its_last_event() {
    const TTL: Duration = Duration::from_secs(6);
    // One registry: one sweep (every TTL / 4, 1.5 s) sees both streams, so the gauge goes
    // 2 -> 1 exactly when the control's stream is forgotten.
    let server = TestServer::with(|c| {
        c.history.ttl_secs = TTL.as_secs();
        c.server.registry_shards = 1;
    });
    let streams = |s: &TestServer| s.metric("agentwire_user_streams");
    // The ghost's stream is made first, so the control's TTL ends after the ghost's would, had
    // it counted from the stream's first event.
    assert_eq!(publish(&server, "ghost", vec![thinking("one")]).await.0, 200);
    let control_made = tokio::time::Instant::now();
    assert_eq!(publish(&server, "control", vec![thinking("only")]).await.0, 200);
    server.eventually("both streams to be counted", |s| streams(s) == 2.0).await;
    // Half a TTL on: 3 s before the ghost's first event would expire.
    tokio::time::sleep_until(control_made + TTL / 2).await;
    assert_eq!(publish(&server, "ghost", vec![thinking("two")]).await.0, 200);
    // The control's stream goes at the first sweep past its TTL (at most 7.5 s after it was
    // made); the ghost's, half a TTL later, no sooner than two sweeps (3 s) after that.
    server.eventually("the control's stream to be forgotten", |s| streams(s) < 2.0).await;
    assert_eq!(streams(&server), 1.0, "the ghost's stream went with the control's");
    let url = format!("{}?last_seq=0", server.ws_url());
    let mut ghost = Client::connect_bearer(&url, &server.token("ghost")).await.unwrap();
    let ready = ghost.expect_setup("ghost").await;
    assert_eq!(ready["last_seq"], 2, "{ready}");
    assert_eq!(ready["resume"]["complete"], true);
    assert_eq!(ghost.recv().await["payload"]["text"], "one");
    assert_eq!(ghost.recv().await["payload"]["text"], "two");
    // And the control's stream is gone for its user too.
    let mut control = Client::connect_bearer(&url, &server.token("control")).await.unwrap();
    assert_eq!(control.expect_setup("control").await["last_seq"], 0, "the control outlived its TTL");
}

/// `limits.user_messages_per_second` holds across the user's tabs.
#[actix_web::test]
async fn one_user_has_one_message_rate_across_tabs() {
    let server = TestServer::with(|c| {
        c.limits.user_messages_per_second = NonZero::new(1).unwrap();
        c.agent.step_delay_ms = 0;
    });
    let mut a = server.ready_client("busy").await;
    let mut b = server.ready_client("busy").await;
    // The burst is 2 for the user: a's two pass, b's two are refused, though b alone is far
    // under its per-connection limit.
    for i in 0..2 {
        a.send(json!({"type": "user_message", "thread_id": "t", "content": format!("a{i}")})).await;
    }
    for _ in 0..2 {
        a.recv_where(|f| f["type"] == "ack").await;
    }
    for i in 0..2 {
        b.send(json!({"type": "user_message", "thread_id": "t", "content": format!("b{i}")})).await;
    }
    for _ in 0..2 {
        let refused = b.recv_where(|f| f["type"] == "error").await;
        assert_eq!(
            (refused["code"].as_str(), refused["ref"].as_str()),
            (Some("rate_limited"), Some("user_message"))
        );
    }
}

/// `history.max_bytes_per_user`: the oldest events go first, and a resume from before them
/// says `complete: false` (section 6).
#[actix_web::test]
async fn history_is_capped_in_bytes_oldest_first() {
    let server = TestServer::with(|c| c.history.max_bytes_per_user = NonZero::new(65_536).unwrap());
    let text = "h".repeat(10_000);
    assert_eq!(publish(&server, "hoarder", (0..10).map(|_| thinking(&text)).collect()).await.0, 200);
    let url = format!("{}?last_seq=0", server.ws_url());
    let mut client = Client::connect_bearer(&url, &server.token("hoarder")).await.unwrap();
    let ready = client.expect_setup("hoarder").await;
    let resume = &ready["resume"];
    assert_eq!(resume["complete"], false, "{ready}");
    let replayed = resume["replayed"].as_u64().unwrap();
    assert!((1..=6).contains(&replayed), "{ready}");
    assert_eq!(resume["from_seq"].as_u64().unwrap() + replayed - 1, 10);
    let mut seqs = Vec::new();
    for _ in 0..replayed {
        seqs.push(client.recv().await["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs.last(), Some(&10));
}

/// `history.dedupe_per_user` caps the `client_msg_id`s the broker remembers (the oldest is
/// forgotten first), but a repeated `client_msg_id` is recognised for as long as its message is
/// stored (docs/conversations.md): one past the broker's cap is acked again by the store, with
/// the same message, run and seq, and starts nothing.
#[actix_web::test]
async fn remembered_client_msg_ids_are_capped() {
    let server = TestServer::with(|c| {
        c.history.dedupe_per_user = NonZero::new(2).unwrap();
        c.agent.step_delay_ms = 0;
    });
    let mut client = server.ready_client("retrier").await;
    let mut acks = Vec::new();
    for id in ["c1", "c2", "c3"] {
        let ack = client.say("t", "hello", Some(id)).await;
        client.events_until_run_ends(ack["run_id"].as_str().unwrap()).await;
        acks.push(ack);
    }
    assert_eq!(client.say("t", "hello", Some("c3")).await, acks[2], "c3 is remembered");
    assert_eq!(
        client.say("t", "hello", Some("c1")).await,
        acks[0],
        "c1, past the broker's cap, is still stored: acked again the same"
    );
    // Neither repeat was echoed or started a run: the next frame answers the ping.
    assert_eq!(client.ping(json!(1)).await["type"], "pong");
}

/// `history.max_users`: a flood of user ids (here through the publish API) forgets the
/// longest-idle offline streams first.
#[actix_web::test]
async fn user_streams_are_capped_longest_idle_first() {
    let server = TestServer::with(|c| {
        c.limits.max_connections = NonZero::new(3).unwrap();
        c.limits.max_unauthenticated = NonZero::new(3).unwrap();
        c.limits.max_unauthenticated_per_ip = NonZero::new(3).unwrap();
        c.history.max_users = NonZero::new(4).unwrap();
    });
    for i in 0..10 {
        assert_eq!(publish(&server, &format!("u{i}"), vec![thinking("x")]).await.0, 200);
    }
    let oldest = server.ready_client("u0").await;
    drop(oldest);
    let mut newest = Client::connect_bearer(&server.ws_url(), &server.token("u9")).await.unwrap();
    assert_eq!(newest.expect_setup("u9").await["last_seq"], 1, "the newest stream is kept");
    let mut forgotten = Client::connect_bearer(&server.ws_url(), &server.token("u1")).await.unwrap();
    assert_eq!(forgotten.expect_setup("u1").await["last_seq"], 0, "an old idle stream is gone");
}

/// `agent.max_runs_per_user` and `agent.run_timeout_secs`: a user cannot pile up runs, and a
/// run whose agent never ends it ends with `agent_error` `agent_timeout`, started and ended
/// like any run.
#[actix_web::test]
async fn runs_are_capped_per_user_and_a_run_past_its_deadline_ends_with_agent_timeout() {
    let server = TestServer::with(|c| {
        c.agent.max_runs_per_user = NonZero::new(1).unwrap();
        c.agent.run_timeout_secs = NonZero::new(1).unwrap();
        c.faults.slow_agent_step_ms = 3000;
        c.faults.slow_agent_user_prefix = "stuck".into();
    });
    let mut client = server.ready_client("stuck-1").await;
    let ack = client.say("t", "what is 1 + 1", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    client.send(json!({"type": "user_message", "thread_id": "t", "content": "and another"})).await;
    let refused = client.recv_where(|f| f["type"] == "error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("rate_limited"), Some("user_message"))
    );
    let events = client.events_until_run_ends(&run_id).await;
    let run: Vec<&Value> = events.iter().filter(|e| e["run_id"] == run_id.as_str()).collect();
    assert_well_formed_run(&run);
    let end = run.last().unwrap();
    assert_eq!(
        (end["type"].as_str(), end["payload"]["code"].as_str()),
        (Some("agent_error"), Some("agent_timeout"))
    );
    // The run has ended, so the user may start another.
    let next = client.say("t", "again", None).await;
    assert!(next["run_id"].is_string(), "{next}");
}

/// Agents never run on the registry's thread: an agent step that blocks for seconds delays its
/// own run, while another user connects and finishes a whole run meanwhile.
#[actix_web::test]
async fn a_slow_agent_step_delays_its_own_run_only() {
    let server = TestServer::with(|c| {
        c.agent.step_delay_ms = 0;
        c.faults.slow_agent_step_ms = 3000;
        c.faults.slow_agent_user_prefix = "heavy".into();
    });
    let mut heavy = server.ready_client("heavy-1").await;
    let heavy_run = heavy.say("t", "what is 2 * 21", None).await["run_id"].as_str().unwrap().to_owned();
    // While the heavy step blocks: a new user sets up and runs to completion.
    let mut light = server.ready_client("light").await;
    let light_run = light.say("t", "hello", None).await["run_id"].as_str().unwrap().to_owned();
    light.events_until_run_ends(&light_run).await;
    // Only now does the heavy run begin to show anything.
    let first_of_heavy = heavy.recv_where(|f| f["run_id"] == heavy_run.as_str()).await;
    assert_eq!(first_of_heavy["type"], "agent_started");
    let events = heavy.events_until_run_ends(&heavy_run).await;
    assert_eq!(events.last().unwrap()["type"], "agent_completed");
}

/// A publish batch that fits `api.max_body_bytes` reaches a session that reads, whole, even
/// though it is about as large as the session's outbound budget.
#[actix_web::test]
async fn a_batch_near_the_body_limit_reaches_a_reading_session() {
    let server = TestServer::start();
    let mut reader = server.ready_client("reader").await;
    let text = "b".repeat(10_000);
    let events: Vec<Value> = (0..100).map(|_| thinking(&text)).collect();
    let body = json!({"user_id": "reader", "events": events}).to_string();
    assert!(body.len() > 1_000_000 && body.len() <= server.config.api.max_body_bytes.get(), "{}", body.len());
    let (status, answer) = http_post(&server.http("/api/v1/publish"), Some(API_KEY), &body).await;
    assert_eq!((status, answer["sessions"].as_u64()), (200, Some(1)), "{answer}");
    for seq in 1..=100 {
        assert_eq!(reader.recv().await["seq"], seq);
    }
}

/// A resume replays through the outbound budget: tabs resuming from seq 0 that do not read
/// hold at most their budget of unsent output each, and a tab that reads gets every event.
#[actix_web::test]
async fn a_resume_is_paced_by_the_outbound_budget() {
    const BUDGET: usize = 131_072;
    let server = TestServer::with(|c| {
        c.limits.max_outbound_bytes = NonZero::new(BUDGET).unwrap();
        c.history.max_bytes_per_user = NonZero::new(4 << 20).unwrap();
    });
    let text = "r".repeat(2_000);
    for _ in 0..10 {
        assert_eq!(publish(&server, "resumer", (0..100).map(|_| thinking(&text)).collect()).await.0, 200);
    }
    let url = format!("{}?last_seq=0", server.ws_url());
    let mut tabs = Vec::new();
    for _ in 0..8 {
        // A small receive window, so the kernel does not soak up what the server holds back.
        let mut tab =
            Client::connect_tuned(&url, None, Some(4096), Some(&server.token("resumer"))).await.unwrap();
        tab.expect_setup("resumer").await;
        tabs.push(tab);
    }
    // None of them reads; each holds no more than its budget plus the frame that crossed it.
    let (_, listed) = http_get(&server.http("/api/v1/users/resumer/connections"), Some(API_KEY)).await;
    let rows = listed["connections"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for row in rows {
        let unsent = row["unsent_bytes"].as_i64().unwrap();
        assert!(unsent <= (BUDGET + 2_200) as i64, "a resuming tab holds {unsent} bytes: {row}");
    }
    // A tab that reads gets all 1,000 in order, then live events after them.
    assert_eq!(publish(&server, "resumer", vec![thinking("live")]).await.0, 200);
    let reader = &mut tabs[0];
    for seq in 1..=1001u64 {
        let event = reader.recv().await;
        assert_eq!(event["seq"], seq);
    }
}

/// Memory comes back: once sessions have left, the server gives the freed heap back to the
/// operating system (the figure itself is measured in benches/run.sh, not asserted here).
#[actix_web::test]
async fn the_heap_of_sessions_that_left_is_given_back() {
    let server = BinaryServer::spawn(&[]);
    let tabs = join_all((0..150).map(|i| {
        let (url, user) = (server.ws_url(), format!("crowd-{}", i % 10));
        let token = server.token(&user);
        async move {
            let mut tab = Client::connect_bearer(&url, &token).await.unwrap();
            tab.expect_setup(&user).await;
            tab
        }
    }))
    .await;
    join_all(tabs.into_iter().map(Client::close)).await;
    // The registry looks every 5 s; allow three looks.
    let deadline = std::time::Instant::now() + Duration::from_secs(16);
    loop {
        let log = server.log.lock().unwrap().clone();
        if log.contains("returned free heap to the OS") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no trim after the sessions left; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
