//! Sections 4 to 6 end to end: user messages start demo runs whose events reach every session of
//! the user, in order, and nobody else; cancel; duplicates; the publish API; resume.

mod common;

use std::collections::HashSet;
use std::num::NonZero;

use common::*;
use serde_json::{json, Value};

fn run_events<'a>(events: &'a [Value], run_id: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["run_id"] == run_id).collect()
}

#[actix_web::test]
async fn three_tabs_see_the_same_run() {
    let server = fast_agent_server();
    let mut tabs = vec![
        server.ready_client("alice").await,
        server.ready_client("alice").await,
        server.ready_client("alice").await,
    ];
    let ack = tabs[0].say("t1", "what is 12 * (3 + 4)?", Some("c1")).await;
    assert_eq!(ack["client_msg_id"], "c1");
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    assert!(run_id.starts_with("r_") && ack["message_id"].as_str().unwrap().starts_with("m_"));

    let mut seen = Vec::new();
    for tab in &mut tabs {
        seen.push(tab.events_until_run_ends(&run_id).await);
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[1], seen[2]);
    let events = &seen[0];
    assert_contiguous(events, 1);
    // The first message on a new thread makes it, announced before the echo.
    let made = &events[0];
    assert_eq!(made["type"], "thread_updated");
    assert!(made.get("run_id").is_none());
    assert_eq!(made["payload"]["thread_id"], "t1");
    assert_eq!(made["payload"]["title"], "what is 12 * (3 + 4)?");
    assert!(made["payload"]["updated_at"].as_u64().unwrap() > 1_600_000_000_000);
    let echo = &events[1];
    assert_eq!(echo["type"], "user_message");
    assert_eq!(echo["seq"], ack["seq"]);
    assert!(echo.get("run_id").is_none());
    assert_eq!(
        echo["payload"],
        json!({"message_id": ack["message_id"], "content": "what is 12 * (3 + 4)?", "client_msg_id": "c1"})
    );

    let run = run_events(events, &run_id);
    assert_well_formed_run(&run);
    assert_eq!(run[0]["payload"], json!({"agent": "demo", "message_id": ack["message_id"]}));
    let tool = run.iter().find(|e| e["type"] == "tool_completed").unwrap();
    assert_eq!(tool["payload"]["tool"], "calculator");
    assert_eq!(tool["payload"]["result"], json!({"value": "84"}));
    let chunks: String = run
        .iter()
        .filter(|e| e["type"] == "agent_message_chunk")
        .map(|e| e["payload"]["delta"].as_str().unwrap())
        .collect();
    assert!(run.iter().filter(|e| e["type"] == "agent_message_chunk").count() >= 3);
    let done = run.last().unwrap();
    assert_eq!(done["payload"]["status"], "ok");
    assert_eq!(done["payload"]["response"]["content"], chunks.as_str());
    assert!(chunks.contains("84"), "{chunks}");
    for event in events {
        assert_eq!(event["thread_id"], "t1");
        assert!(event["ts"].as_u64().unwrap() > 1_600_000_000_000);
    }
    // Everything was written: each session's unsent count, kept in wire bytes, is back to zero.
    let url = server.http("/api/v1/users/alice/connections");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(&url, Some(API_KEY)).await;
        let unsent: Vec<i64> = body["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["unsent_bytes"].as_i64().unwrap())
            .collect();
        if unsent == [0, 0, 0] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "unsent bytes stay at {unsent:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // 11 events (thread_updated, the echo, 9 of the run) handed to 3 sessions, plus the ack to
    // the sender.
    assert_eq!(server.metric("agentwire_events_published_total"), 11.0);
    assert_eq!(server.metric("agentwire_frames_sent_total"), 34.0);
    assert_eq!(server.metric("agentwire_messages_received_total"), 1.0);
    assert_eq!(server.metric("agentwire_event_delivery_seconds_count"), 33.0);
}

#[actix_web::test]
async fn fifty_users_three_tabs_five_messages_stay_isolated() {
    const USERS: usize = 50;
    const TABS: usize = 3;
    const MESSAGES: usize = 5;
    let server = fast_agent_server();
    let mut sessions = Vec::new();
    for u in 0..USERS {
        for tab in 0..TABS {
            sessions.push((u, tab, server.ready_client(&format!("iso-{u}")).await));
        }
    }
    // Each tab writes on a thread of its own: 15 messages on one thread would pass the 8 runs that
    // may wait behind a running one (`agent.on_busy = "enqueue"`, docs/protocol.md section 9).
    let checks = sessions.into_iter().map(|(u, tab, mut client)| async move {
        let thread = format!("thread-of-{u}-{tab}");
        let users_threads = format!("thread-of-{u}-");
        for m in 0..MESSAGES {
            client
                .send(json!({"type": "user_message", "thread_id": thread, "content": format!("user {u} message {m}")}))
                .await;
        }
        // Every session of the user sees every run of the user: TABS * MESSAGES completions.
        let mut events = Vec::new();
        let mut completed = 0;
        while completed < TABS * MESSAGES {
            let frame = client.recv().await;
            match frame["type"].as_str() {
                Some("ack") => continue,
                Some("error") => panic!("unexpected {frame}"),
                _ => {}
            }
            let on = frame["thread_id"].as_str().unwrap_or_default();
            assert!(on.starts_with(&users_threads), "another user's event reached user {u}: {frame}");
            completed += usize::from(is_terminal(&frame));
            events.push(frame);
        }
        assert_contiguous(&events, 1);
        let echoed: HashSet<&Value> = events.iter().filter(|e| e["type"] == "user_message").map(|e| &e["payload"]["message_id"]).collect();
        assert_eq!(echoed.len(), TABS * MESSAGES);
        let runs: HashSet<&str> = events.iter().filter_map(|e| e["run_id"].as_str()).collect();
        assert_eq!(runs.len(), TABS * MESSAGES);
        for run_id in runs {
            let run = run_events(&events, run_id);
            assert_well_formed_run(&run);
            assert!(echoed.contains(&run[0]["payload"]["message_id"]), "run of a message not on this stream");
        }
        client
    });
    let clients = futures_util::future::join_all(checks).await;
    assert_eq!(clients.len(), USERS * TABS);
}

#[actix_web::test]
async fn cancel_stops_a_run_and_foreign_or_unknown_runs_are_not_found() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 100);
    let mut alice = server.ready_client("alice").await;
    let mut mallory = server.ready_client("mallory").await;
    let run_id =
        alice.say("t", "please count these words", None).await["run_id"].as_str().unwrap().to_owned();
    alice.recv_where(|f| f["type"] == "agent_started").await;

    mallory.send(json!({"type": "cancel_run", "run_id": run_id})).await;
    let refused = mallory.recv().await;
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("not_found"), Some("cancel_run")));

    alice.send(json!({"type": "cancel_run", "run_id": run_id})).await;
    let rest = alice.events_until_run_ends(&run_id).await;
    let done = rest.last().unwrap();
    assert_eq!(done["type"], "agent_completed");
    assert_eq!(done["payload"]["status"], "cancelled");
    assert!(done["payload"]["response"]["content"].is_string());

    // Nothing of the cancelled run comes after its end: a whole later run passes without any.
    let next = alice.say("t", "and now something else", None).await["run_id"].as_str().unwrap().to_owned();
    let later = alice.events_until_run_ends(&next).await;
    assert!(later.iter().all(|e| e["run_id"] != run_id.as_str()), "{later:?}");

    for stale in [run_id.as_str(), next.as_str(), "r_unknown"] {
        alice.send(json!({"type": "cancel_run", "run_id": stale})).await;
        assert_eq!(alice.recv().await["code"], "not_found", "{stale}");
    }
}

#[actix_web::test]
async fn a_repeated_client_msg_id_is_acked_again_and_starts_nothing() {
    let server = fast_agent_server();
    let mut client = server.ready_client("repeat").await;
    let first = client.say("t", "hello", Some("once")).await;
    let run_id = first["run_id"].as_str().unwrap().to_owned();
    let events = client.events_until_run_ends(&run_id).await;
    let again = client.say("t", "hello", Some("once")).await;
    assert_eq!(again, first);
    // The next message's echo follows the first run directly: the repeat published nothing.
    let third = client.say("t", "different", Some("twice")).await;
    assert_eq!(third["seq"].as_u64().unwrap(), events.last().unwrap()["seq"].as_u64().unwrap() + 1);
}

#[actix_web::test]
async fn bad_user_messages_get_errors_and_the_session_keeps_working() {
    let server = TestServer::with(|c| {
        c.agent.step_delay_ms = 0;
        c.limits.max_content_chars = NonZero::new(10).unwrap();
    });
    let mut client = server.ready_client("sloppy").await;
    for (frame, code) in [
        (json!({"type": "user_message", "thread_id": "t"}), "bad_message"),
        (json!({"type": "user_message", "thread_id": "t", "content": "x".repeat(11)}), "bad_message"),
        (json!({"type": "user_message", "thread_id": "", "content": "x"}), "bad_message"),
        (json!({"type": "user_message", "thread_id": "t", "content": 5}), "bad_message"),
        (json!({"type": "cancel_run"}), "bad_message"),
        (json!({"type": "jump"}), "unknown_type"),
    ] {
        client.send(frame.clone()).await;
        let error = client.recv().await;
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some(code)), "{frame}");
    }
    let ack = client.say("t", "ok now", None).await;
    // Nothing was published (or stored) for the bad frames: this message makes thread t (seq 1)
    // and is echoed after it (seq 2).
    let made = client.recv().await;
    assert_eq!((made["type"].as_str(), made["seq"].as_u64()), (Some("thread_updated"), Some(1)), "{made}");
    assert_eq!(made["payload"]["title"], "ok now", "{made}");
    assert_eq!(ack["seq"], 2, "nothing was published for the bad frames");
}

#[actix_web::test]
async fn publish_api_delivers_batches_all_or_nothing() {
    let server = fast_agent_server();
    let url = server.http("/api/v1/publish");
    let mut a = server.ready_client("pub").await;
    let mut b = server.ready_client("pub").await;
    let batch = json!({"user_id": "pub", "events": [
        {"type": "agent_started", "thread_id": "t", "run_id": "r_ext", "payload": {"agent": "backend", "message_id": "m_x"}},
        {"type": "agent_thinking", "thread_id": "t", "run_id": "r_ext", "payload": {"text": "hmm"}},
        {"type": "agent_completed", "thread_id": "t", "run_id": "r_ext", "payload": {"status": "ok", "response": {"content": "done"}, "duration_ms": 1}}
    ]});
    let (status, body) = http_post(&url, Some(API_KEY), &batch.to_string()).await;
    // The publisher's answer is stored first and makes thread t: its `thread_updated` is seq 1
    // (docs/conversations.md, "What is stored, and when").
    assert_eq!((status, body.clone()), (200, json!({"seqs": [2, 3, 4], "sessions": 2})));
    for client in [&mut a, &mut b] {
        let events = client.events_until_run_ends("r_ext").await;
        assert_contiguous(&events, 1);
        assert_eq!(
            (events[0]["type"].as_str(), events[0]["payload"]["title"].as_str()),
            (Some("thread_updated"), Some("done"))
        );
        assert_eq!(events[2]["payload"], json!({"text": "hmm"}));
    }

    assert_eq!(http_post(&url, None, &batch.to_string()).await.0, 401);
    let (status, body) = http_post(&url, Some("not-the-key-0123456789"), &batch.to_string()).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    for bad in [
        json!({"user_id": "pub", "events": [{"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {}}, {"type": "agent_dreaming", "thread_id": "t", "run_id": "r", "payload": {}}]}),
        json!({"user_id": "pub", "events": [{"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {}}, {"type": "agent_thinking", "run_id": "r", "payload": {}}]}),
        json!({"user_id": "pub", "events": [{"type": "agent_thinking", "thread_id": "t", "payload": {}}]}),
        json!({"user_id": "pub", "events": [{"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": "text"}]}),
        json!({"user_id": "not valid", "events": [{"type": "user_message", "thread_id": "t", "payload": {}}]}),
        json!({"events": []}),
    ] {
        let (status, body) = http_post(&url, Some(API_KEY), &bad.to_string()).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{bad}");
    }
    assert_eq!(http_post(&url, Some(API_KEY), "{not json").await.0, 400);
    let huge = json!({"user_id": "pub", "events": [{"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": "x".repeat(1 << 20)}}]});
    assert_eq!(http_post(&url, Some(API_KEY), &huge.to_string()).await.0, 413);

    // Nothing of the rejected batches was published: the next event is seq 5 on both tabs.
    let one = json!({"user_id": "pub", "events": [{"type": "user_message", "thread_id": "t", "payload": {"message_id": "m_y", "content": "hi", "client_msg_id": null}}]});
    assert_eq!(http_post(&url, Some(API_KEY), &one.to_string()).await.1["seqs"], json!([5]));
    for client in [&mut a, &mut b] {
        let next = client.recv().await;
        assert_eq!((next["type"].as_str(), next["seq"].as_u64()), (Some("user_message"), Some(5)));
    }
}

#[actix_web::test]
async fn published_events_wait_in_history_for_a_user_with_no_session() {
    let server = fast_agent_server();
    let batch = json!({"user_id": "offline", "events": [
        {"type": "agent_thinking", "thread_id": "t", "run_id": "r_1", "payload": {"text": "one"}},
        {"type": "agent_thinking", "thread_id": "t", "run_id": "r_1", "payload": {"text": "two"}}
    ]});
    let (status, body) = http_post(&server.http("/api/v1/publish"), Some(API_KEY), &batch.to_string()).await;
    assert_eq!((status, body), (200, json!({"seqs": [1, 2], "sessions": 0})));
    let url = format!("{}?last_seq=0", server.ws_url());
    let mut client = Client::connect_bearer(&url, &server.token("offline")).await.unwrap();
    let ready = client.expect_setup("offline").await;
    assert_eq!(ready["last_seq"], 2);
    assert_eq!(ready["resume"], json!({"from_seq": 1, "replayed": 2, "complete": true}));
    assert_eq!(client.recv().await["payload"]["text"], "one");
    assert_eq!(client.recv().await["payload"]["text"], "two");
}

#[actix_web::test]
async fn resume_after_a_disconnect_mid_run_gets_the_rest_exactly_once() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 30);
    let mut watcher = server.ready_client("resumer").await;
    let mut client = Client::connect_bearer(&server.ws_url(), &server.token("resumer")).await.unwrap();
    let epoch = client.expect_setup("resumer").await["epoch"].as_str().unwrap().to_owned();
    let run_id = client.say("t", "count my words please", None).await["run_id"].as_str().unwrap().to_owned();
    let seen = client.recv_where(|f| f["type"] == "agent_thinking").await;
    let last_seq = seen["seq"].as_u64().unwrap();
    drop(client); // the network drops mid-run

    let everything = watcher.events_until_run_ends(&run_id).await;
    let url = format!("{}?last_seq={last_seq}&epoch={epoch}", server.ws_url());
    let mut again = Client::connect_bearer(&url, &server.token("resumer")).await.unwrap();
    let ready = again.expect_setup("resumer").await;
    assert_eq!(ready["epoch"], epoch.as_str());
    assert_eq!(ready["resume"]["complete"], true);
    assert_eq!(ready["resume"]["from_seq"], last_seq + 1);
    let rest = again.events_until_run_ends(&run_id).await;
    let missed: Vec<Value> =
        everything.into_iter().filter(|e| e["seq"].as_u64().unwrap() > last_seq).collect();
    assert_eq!(rest, missed, "exactly the missed events, once, in order");
    assert_contiguous(&rest, last_seq + 1);
    // Live events continue right after the replay.
    let ack = again.say("t", "still there?", None).await;
    assert_eq!(ack["seq"].as_u64().unwrap(), rest.last().unwrap()["seq"].as_u64().unwrap() + 1);
}

async fn publish_thinking(server: &TestServer, user: &str, count: usize) {
    let events: Vec<Value> = (1..=count)
        .map(|i| json!({"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": i.to_string()}}))
        .collect();
    let body = json!({"user_id": user, "events": events}).to_string();
    assert_eq!(http_post(&server.http("/api/v1/publish"), Some(API_KEY), &body).await.0, 200);
}

#[actix_web::test]
async fn resume_beyond_the_history_is_incomplete_and_replays_the_tail() {
    let server = TestServer::with(|c| c.history.events_per_user = NonZero::new(3).unwrap());
    publish_thinking(&server, "gappy", 10).await;
    let url = format!("{}?last_seq=2", server.ws_url());
    let mut client = Client::connect_bearer(&url, &server.token("gappy")).await.unwrap();
    let ready = client.expect_setup("gappy").await;
    assert_eq!(ready["resume"], json!({"from_seq": 8, "replayed": 3, "complete": false}));
    for seq in 8..=10 {
        assert_eq!(client.recv().await["seq"], seq);
    }
}

#[actix_web::test]
async fn resume_with_a_stale_epoch_is_incomplete() {
    let server = TestServer::start();
    publish_thinking(&server, "restarted", 4).await;
    // The auth frame's values win over the query's.
    let url = format!("{}?last_seq=3", server.ws_url());
    let mut client = Client::connect(&url).await.unwrap();
    client.send(json!({"type": "auth", "token": server.token("restarted"), "last_seq": 2, "epoch": "from-before-a-restart"})).await;
    let ready = client.expect_setup("restarted").await;
    assert_eq!(ready["resume"], json!({"from_seq": 1, "replayed": 4, "complete": false}));
    assert_ne!(ready["epoch"], "from-before-a-restart");
    for seq in 1..=4 {
        assert_eq!(client.recv().await["seq"], seq);
    }
}

#[actix_web::test]
async fn a_session_closing_during_fan_out_costs_the_others_nothing() {
    let server = fast_agent_server();
    let mut steady = server.ready_client("busy").await;
    let leaving = server.ready_client("busy").await;
    publish_thinking(&server, "busy", 200).await;
    leaving.close().await;
    publish_thinking(&server, "busy", 200).await;
    for seq in 1..=400u64 {
        assert_eq!(steady.recv().await["seq"], seq);
    }
    server
        .eventually("the closed session to leave the registry", |s| {
            s.metric("agentwire_connections{state=\"processing_ready\"}") == 1.0
                && s.metric("agentwire_connections{state=\"closing\"}") == 0.0
        })
        .await;
    let (_, body) = http_get(&server.http("/api/v1/users/busy/connections"), Some(API_KEY)).await;
    assert_eq!(body["connections"].as_array().unwrap().len(), 1);
    assert_eq!(server.metric("agentwire_events_published_total"), 400.0);
}
