//! Several agentwire nodes on one Redis (`[broker] kind = "redis"`, docs/scale-out.md): a user whose
//! tabs sit on different nodes sees one identical stream; publishes and runs on any node reach
//! all of them; resume on another node; `client_msg_id` dedupe and the session cap across nodes;
//! a node that cannot reach Redis does not start.
//!
//! Uses the Redis at `AGENTWIRE_TEST_REDIS_URL` (default redis://127.0.0.1:6379; `.ci/test`
//! starts one where none runs), each test under a key prefix of its own, never flushing; and,
//! since Redis nodes share one conversation store, a PostgreSQL database of each test's own
//! (`common::postgres`), shared by that test's nodes.

mod common;

use std::num::NonZero;

use agentwire::config::{BrokerKind, StoreKind};
use common::postgres::TestDatabase;
use common::*;
use serde_json::json;

fn redis_url() -> String {
    std::env::var("AGENTWIRE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique_prefix(test: &str) -> String {
    format!("aw-test-{test}-{}-{:x}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// `count` nodes on one Redis under one prefix and on one database, each with a fast demo agent.
fn nodes(
    test: &str,
    count: usize,
    db: &TestDatabase,
    adjust: impl Fn(&mut agentwire::config::Config),
) -> Vec<TestServer> {
    let prefix = unique_prefix(test);
    (0..count)
        .map(|i| {
            redis_node(&prefix, db, &format!("node-{i}"), |c| {
                c.agent.step_delay_ms = 0;
                adjust(c);
            })
        })
        .collect()
}

/// An in-process node on the machine's Redis under `prefix`, on `db`.
fn redis_node(
    prefix: &str,
    db: &TestDatabase,
    node_id: &str,
    adjust: impl FnOnce(&mut agentwire::config::Config),
) -> TestServer {
    TestServer::with(|c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = redis_url();
        c.broker.prefix = prefix.to_owned();
        c.broker.node_id = node_id.to_owned();
        c.store.kind = StoreKind::Postgres;
        c.store.url = db.url();
        c.history.ttl_secs = 60;
        adjust(c);
    })
}

#[actix_web::test]
async fn tabs_on_different_nodes_see_one_stream() {
    let db = TestDatabase::create();
    let cluster = nodes("one-stream", 3, &db, |_| {});
    let mut tabs = Vec::new();
    for node in &cluster {
        tabs.push(node.ready_client("alice").await);
    }
    // A publish through each node, and a run started on the second.
    for (i, node) in cluster.iter().enumerate() {
        let (status, body) = publish(node, "alice", vec![thinking(&format!("from node {i}"))]).await;
        assert_eq!(status, 200, "{body}");
    }
    let ack = tabs[1].say("t", "what is 2 + 3?", Some("c1")).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let mut streams = Vec::new();
    for tab in &mut tabs {
        let mut stream = tab.stream_events(3).await;
        stream.extend(tab.events_until_run_ends(&run_id).await);
        streams.push(stream);
    }
    assert_eq!(streams[0], streams[1], "node 0 and node 1 differ");
    assert_eq!(streams[1], streams[2], "node 1 and node 2 differ");
    assert_contiguous(&streams[0], 1);
    let texts: Vec<&str> = streams[0][..3].iter().map(|e| e["payload"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["from node 0", "from node 1", "from node 2"]);
    assert_eq!(streams[0].last().unwrap()["type"], "agent_completed");
    // Nobody else's tab hears any of it.
    let mut bob = cluster[2].ready_client("bob").await;
    assert_eq!(bob.ping(json!(1)).await["type"], "pong");
}

#[actix_web::test]
async fn a_client_resumes_on_another_node() {
    let db = TestDatabase::create();
    let cluster = nodes("resume", 2, &db, |_| {});
    let mut first = Client::connect_bearer(&cluster[0].ws_url(), &cluster[0].token("carol")).await.unwrap();
    let epoch = first.expect_setup("carol").await["epoch"].as_str().unwrap().to_owned();
    publish(&cluster[0], "carol", vec![thinking("1"), thinking("2")]).await;
    let seen = first.stream_events(2).await;
    drop(first);
    publish(&cluster[1], "carol", vec![thinking("3"), thinking("4")]).await;

    let url = format!("{}?last_seq={}&epoch={epoch}", cluster[1].ws_url(), seen[1]["seq"]);
    let mut again = Client::connect_bearer(&url, &cluster[1].token("carol")).await.unwrap();
    let ready = again.expect_setup("carol").await;
    assert_eq!(ready["epoch"], epoch.as_str());
    assert_eq!(ready["resume"], json!({"from_seq": 3, "replayed": 2, "complete": true}));
    let replayed = again.stream_events(2).await;
    assert_eq!(
        replayed.iter().map(|e| e["payload"]["text"].clone()).collect::<Vec<_>>(),
        [json!("3"), json!("4")]
    );
    // Live events go on right after the replay, from either node.
    publish(&cluster[0], "carol", vec![thinking("5")]).await;
    assert_eq!(again.stream_events(1).await[0]["seq"], 5);
}

#[actix_web::test]
async fn a_repeated_client_msg_id_is_one_message_across_nodes() {
    let db = TestDatabase::create();
    let cluster = nodes("dedupe", 2, &db, |_| {});
    let mut a = cluster[0].ready_client("dave").await;
    let mut b = cluster[1].ready_client("dave").await;
    let first = a.say("t", "once", Some("same-id")).await;
    let again = b.say("t", "once", Some("same-id")).await;
    assert_eq!(
        (&again["message_id"], &again["run_id"], &again["seq"]),
        (&first["message_id"], &first["run_id"], &first["seq"])
    );
    // One echo and one run on both tabs.
    let run_id = first["run_id"].as_str().unwrap();
    for tab in [&mut a, &mut b] {
        let stream = tab.events_until_run_ends(run_id).await;
        assert_eq!(stream.iter().filter(|e| e["type"] == "user_message").count(), 1);
        assert_eq!(stream.iter().filter(|e| e["type"] == "agent_started").count(), 1);
    }
}

#[actix_web::test]
async fn the_session_cap_holds_across_nodes() {
    let db = TestDatabase::create();
    let cluster = nodes("cap", 2, &db, |c| c.limits.max_sessions_per_user = NonZero::new(2).unwrap());
    let _one = cluster[0].ready_client("erin").await;
    let _two = cluster[1].ready_client("erin").await;
    let mut third = Client::connect_bearer(&cluster[0].ws_url(), &cluster[0].token("erin")).await.unwrap();
    third.expect_state("accepted").await;
    assert_eq!(third.expect_close_code().await, 4004);
    // A slot given back on one node is free on the other.
    drop(_two);
    cluster[1]
        .eventually("the slot given back", |s| {
            s.metric("agentwire_connections{state=\"processing_ready\"}") == 0.0
        })
        .await;
    let mut again = Client::connect_bearer(&cluster[0].ws_url(), &cluster[0].token("erin")).await.unwrap();
    again.expect_setup("erin").await;
}

#[actix_web::test]
async fn a_node_that_cannot_reach_redis_does_not_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db = TestDatabase::create();
    let mut config = test_config();
    config.broker.kind = BrokerKind::Redis;
    config.broker.url = format!("redis://127.0.0.1:{port}");
    config.store.kind = StoreKind::Postgres;
    config.store.url = db.url();
    config.validate().unwrap();
    let error = match agentwire::build(config) {
        Ok(_) => panic!("started without Redis"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("broker.url") && error.contains(&port.to_string()), "{error}");
}

#[actix_web::test]
async fn cancel_and_the_connections_api_work_from_any_node() {
    let db = TestDatabase::create();
    let cluster = nodes("cancel", 2, &db, |c| c.agent.step_delay_ms = 150);
    let mut on_a = cluster[0].ready_client("hank").await;
    let mut on_b = cluster[1].ready_client("hank").await;

    let (status, body) = http_get(&cluster[1].http("/api/v1/users/hank/connections"), Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let mut nodes: Vec<&str> =
        body["connections"].as_array().unwrap().iter().map(|c| c["node"].as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-0", "node-1"], "{body}");

    // A run on node 0, cancelled from a tab on node 1.
    let ack = on_a.say("t", "count these words slowly", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    on_b.recv_where(|f| f["run_id"] == run_id.as_str() && f["type"] == "agent_started").await;
    on_b.send(json!({"type": "cancel_run", "run_id": run_id})).await;
    for tab in [&mut on_a, &mut on_b] {
        let end = tab.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
        assert_eq!(
            (end["type"].as_str(), end["payload"]["status"].as_str()),
            (Some("agent_completed"), Some("cancelled"))
        );
    }
    // An unknown run is still not found, wherever it is asked for.
    on_b.send(json!({"type": "cancel_run", "run_id": "r_nobody"})).await;
    let refused = on_b.recv_where(|f| f["type"] == "error").await;
    assert_eq!(refused["code"], "not_found");
}

#[actix_web::test]
async fn a_killed_nodes_runs_end_with_node_lost_and_its_tabs_resume_elsewhere() {
    let prefix = unique_prefix("node-lost");
    let db = TestDatabase::create();
    let survivor = redis_node(&prefix, &db, "survivor", |c| c.broker.node_lease_secs = 2);
    let (url, store_url) = (redis_url(), db.url());
    let mut env = redis_node_env(&prefix, &store_url, "doomed");
    env.extend([
        ("AGENTWIRE__BROKER__URL", url.as_str()),
        ("AGENTWIRE__BROKER__NODE_LEASE_SECS", "2"),
        ("AGENTWIRE__AGENT__STEP_DELAY_MS", "1000"),
    ]);
    let mut doomed = BinaryServer::spawn(&env);
    let mut watcher = survivor.ready_client("ivy").await;
    let mut client = Client::connect_bearer(&doomed.ws_url(), &doomed.token("ivy")).await.unwrap();
    let epoch = client.expect_setup("ivy").await["epoch"].as_str().unwrap().to_owned();
    let ack = client.say("t", "a question for a node about to die", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let started = client.recv_where(|f| f["type"] == "agent_started").await;
    // A node registers before it serves (docs/scale-out.md): it is known to the others already,
    // though it may not have beaten yet. Killed without a word.
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut connection = redis.get_connection().unwrap();
    let members: Vec<String> =
        redis::cmd("SMEMBERS").arg(format!("{prefix}:{{nodes}}:members")).query(&mut connection).unwrap();
    assert!(members.iter().any(|m| m.starts_with("doomed@")), "{members:?}");
    doomed.child.kill().unwrap();
    let _ = doomed.child.wait();

    let end = watcher.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(
        (end["type"].as_str(), end["payload"]["code"].as_str()),
        (Some("agent_error"), Some("node_lost"))
    );
    // The dead node's tab resumes on the survivor with nothing missed.
    let url = format!("{}?last_seq={}&epoch={epoch}", survivor.ws_url(), started["seq"]);
    let mut again = Client::connect_bearer(&url, &survivor.token("ivy")).await.unwrap();
    let ready = again.expect_setup("ivy").await;
    assert_eq!(ready["resume"]["complete"], true);
    let replayed = again.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(replayed, end);
}

/// `agentwire loadtest --url A --url B`: sessions spread over the nodes, every check unchanged.
#[test]
fn the_load_generator_spreads_sessions_over_nodes() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: agentwire_loadtest::LoadtestArgs,
    }
    let db = TestDatabase::create();
    let cluster = nodes("loadtest", 2, &db, |_| {});
    let (a, b) = (cluster[0].ws_url(), cluster[1].ws_url());
    for scenario in [
        vec!["--scenario", "chat", "--sessions", "20", "--users", "5", "--messages", "2"],
        vec!["--scenario", "fanout", "--sessions", "20", "--users", "2", "--events", "50", "--batch", "10"],
    ] {
        let mut argv = vec!["loadtest", "--url", &a, "--url", &b, "--quiet", "--api-key", API_KEY];
        argv.extend(scenario);
        let cli = Cli::try_parse_from(argv).expect("valid arguments");
        let minter = agentwire::auth::Minter::new(&cluster[0].config.auth).unwrap();
        let tokens: agentwire_loadtest::TokenSource =
            std::sync::Arc::new(move |sub: &str| minter.mint(sub, None, 3600).map(|(token, _)| token));
        let report = agentwire_loadtest::run(cli.args, tokens, None).expect("load test runs");
        assert!(report.passed(), "{}", report.table());
        assert!(report.correctness.is_clean());
    }
    // Both nodes held sessions.
    for node in &cluster {
        assert!(node.metric("agentwire_connections_opened_total") >= 10.0);
    }
}

/// A tab that opens on another node in the middle of a long run (5,000 chunks, five times the
/// stream's history ring; a thought and a tool call before them) shows exactly what a tab open
/// from the start on the run's node shows: the snapshot in `processing_ready.runs`, kept in
/// Redis with the stream, then the live events after `last_seq` (docs/conversations.md,
/// "Joining a run in progress").
#[actix_web::test]
async fn a_tab_that_joins_a_long_run_on_another_node_shows_what_the_first_tab_shows() {
    use common::fake_agent::{long_answer, FakeAgent};
    const CHUNKS: usize = 5000;
    let agent = FakeAgent::start(|input| {
        let before = vec![
            json!({"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "let me count"}),
            json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "count"}),
            json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{\"to\":5000}"}),
            json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}),
            json!({"type": "TOOL_CALL_RESULT", "messageId": "t1", "toolCallId": "c1", "content": "ok"}),
        ];
        long_answer(input, before, CHUNKS, |i| format!("{i} "), std::time::Duration::from_micros(500))
    });
    let db = TestDatabase::create();
    let url = agent.url.clone();
    let cluster = nodes("join-run", 2, &db, move |c| {
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = url.clone();
        c.agent.run_timeout_secs = NonZero::new(60).unwrap();
    });
    let mut first = cluster[0].ready_client("mo").await;
    let ack = first.say("t", "count to 5000", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let mut chunks = 0;
    while chunks < CHUNKS / 3 {
        let frame = first.recv().await;
        if frame["type"] == "agent_message_chunk" {
            seen.push_str(frame["payload"]["delta"].as_str().unwrap());
            chunks += 1;
        }
    }
    let mut joined = Client::connect_bearer(&cluster[1].ws_url(), &cluster[1].token("mo")).await.unwrap();
    let ready = joined.expect_setup("mo").await;
    let last_seq = ready["last_seq"].as_u64().unwrap();
    let runs = ready["runs"].as_array().expect("processing_ready has runs");
    assert_eq!(runs.len(), 1, "{ready}");
    let run = &runs[0];
    assert_eq!((run["run_id"].as_str(), run["thread_id"].as_str()), (Some(run_id.as_str()), Some("t")));
    assert!(run["started_seq"].as_u64().unwrap() < last_seq);
    assert_eq!(run["thinking"], "let me count");
    assert_eq!(
        run["tool_calls"],
        json!([{"tool_call_id": "c1", "tool": "count", "args": {"to": 5000}, "result": "ok"}])
    );
    let mut shown = run["content"].as_str().unwrap().to_owned();
    assert!(shown.len() >= seen.len(), "the snapshot holds at least what the first tab had when it joined");
    let events = joined.events_until_run_ends(&run_id).await;
    assert!(events.iter().all(|e| e["seq"].as_u64().unwrap() > last_seq), "only what came after last_seq");
    for event in &events {
        if event["type"] == "agent_message_chunk" {
            shown.push_str(event["payload"]["delta"].as_str().unwrap());
        }
    }
    for event in first.events_until_run_ends(&run_id).await {
        if event["type"] == "agent_message_chunk" {
            seen.push_str(event["payload"]["delta"].as_str().unwrap());
        }
    }
    let whole: String = (0..CHUNKS).map(|i| format!("{i} ")).collect();
    assert_eq!(seen, whole, "the tab open from the start, on the run's node");
    assert_eq!(shown, whole, "the tab that joined in the middle, on the other node");
    // Once the run has ended, a tab opening on either node sees no run in progress.
    for node in &cluster {
        let mut later = Client::connect_bearer(&node.ws_url(), &node.token("mo")).await.unwrap();
        assert_eq!(later.expect_setup("mo").await["runs"], json!([]));
    }
}

/// Past `agent.max_response_bytes`, a tab joining on another node is shown the last bytes of the
/// run's text (`truncated`), on a character's boundary, and the live events follow on from them:
/// what it shows ends exactly as what the first tab shows.
#[actix_web::test]
async fn a_joining_tab_is_shown_the_tail_of_a_run_past_max_response_bytes() {
    use common::fake_agent::{long_answer, FakeAgent};
    const CHUNKS: usize = 600;
    let agent = FakeAgent::start(|input| {
        long_answer(input, Vec::new(), CHUNKS, |i| format!("é{i} "), std::time::Duration::from_millis(2))
    });
    let db = TestDatabase::create();
    let url = agent.url.clone();
    let cluster = nodes("join-tail", 2, &db, move |c| {
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = url.clone();
        c.agent.max_response_bytes = NonZero::new(101).unwrap();
    });
    let mut first = cluster[0].ready_client("ty").await;
    let ack = first.say("t", "go on", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let mut chunks = 0;
    while chunks < CHUNKS / 2 {
        let frame = first.recv().await;
        if frame["type"] == "agent_message_chunk" {
            seen.push_str(frame["payload"]["delta"].as_str().unwrap());
            chunks += 1;
        }
    }
    let mut joined = Client::connect_bearer(&cluster[1].ws_url(), &cluster[1].token("ty")).await.unwrap();
    let ready = joined.expect_setup("ty").await;
    let run = &ready["runs"][0];
    assert_eq!(run["truncated"], true, "{ready}");
    let mut shown = run["content"].as_str().unwrap().to_owned();
    assert!(shown.len() <= 101 && shown.len() > 90, "the last bytes, whole characters: {shown:?}");
    for event in joined.events_until_run_ends(&run_id).await {
        if event["type"] == "agent_message_chunk" {
            shown.push_str(event["payload"]["delta"].as_str().unwrap());
        }
    }
    for event in first.events_until_run_ends(&run_id).await {
        if event["type"] == "agent_message_chunk" {
            seen.push_str(event["payload"]["delta"].as_str().unwrap());
        }
    }
    assert!(seen.ends_with(&shown), "the joined tab shows the end of the answer: {shown:?}");
}

/// Two tabs of one user on two nodes send on one thread while its run goes on: the second run
/// waits for the first's end on the stream, whichever node runs either (`agent.on_busy`,
/// docs/conversations.md, "Two messages on one thread"); with `interrupt` the first ends
/// cancelled first.
async fn two_nodes_one_thread(
    on_busy: agentwire::config::OnBusy,
) -> (Vec<serde_json::Value>, String, String) {
    let db = TestDatabase::create();
    let cluster = nodes("one-thread", 2, &db, move |c| {
        c.agent.step_delay_ms = 100;
        c.agent.on_busy = on_busy;
    });
    let mut first = cluster[0].ready_client("lu").await;
    let mut second = cluster[1].ready_client("lu").await;
    let one = first.say("t", "what is 2 + 3?", None).await;
    let one = one["run_id"].as_str().unwrap().to_owned();
    first.recv_where(|f| f["type"] == "agent_started" && f["run_id"] == one.as_str()).await;
    let two = second.say("t", "and 4 + 5?", None).await;
    let two = two["run_id"].as_str().unwrap().to_owned();
    let mut events = Vec::new();
    loop {
        let frame = first.recv().await;
        if frame["seq"].is_u64() {
            events.push(frame.clone());
        }
        if frame["run_id"] == two.as_str()
            && matches!(frame["type"].as_str(), Some("agent_completed" | "agent_error"))
        {
            break;
        }
    }
    drop(db);
    (events, one, two)
}

/// Where each run's events begin and end in `events`.
fn span(events: &[serde_json::Value], run_id: &str) -> (usize, usize) {
    let at: Vec<usize> = (0..events.len()).filter(|&i| events[i]["run_id"] == run_id).collect();
    (*at.first().unwrap(), *at.last().unwrap())
}

#[actix_web::test]
async fn runs_of_one_thread_never_interleave_across_nodes() {
    let (events, one, two) = two_nodes_one_thread(agentwire::config::OnBusy::Enqueue).await;
    let (first, second) = (span(&events, &one), span(&events, &two));
    assert!(first.1 < second.0, "run {two} began before run {one} ended: {events:?}");
    assert_eq!(events[first.1]["type"], "agent_completed");
    assert_eq!(events[first.1]["payload"]["status"], "ok", "the first run ran to its end");
}

#[actix_web::test]
async fn on_busy_interrupt_cancels_another_nodes_run_first() {
    let (events, one, two) = two_nodes_one_thread(agentwire::config::OnBusy::Interrupt).await;
    let (first, second) = (span(&events, &one), span(&events, &two));
    assert!(first.1 < second.0, "run {two} began before run {one} ended: {events:?}");
    assert_eq!(events[first.1]["payload"]["status"], "cancelled", "{:?}", events[first.1]);
}

/// `kill -<signal> <pid>`.
fn signal(child: &std::process::Child, signal: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status();
    assert!(status.unwrap().success(), "kill -{signal}");
}

/// Waits (bounded) for `child` to exit; its exit code.
async fn exit_code(child: &mut std::process::Child) -> Option<i32> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "the process did not stop");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn redis_node_env<'a>(prefix: &'a str, store_url: &'a str, node_id: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AGENTWIRE__BROKER__KIND", "redis"),
        ("AGENTWIRE__STORE__KIND", "postgres"),
        ("AGENTWIRE__STORE__URL", store_url),
        ("AGENTWIRE__BROKER__PREFIX", prefix),
        ("AGENTWIRE__BROKER__NODE_ID", node_id),
        ("AGENTWIRE__HISTORY__TTL_SECS", "60"),
        ("AGENTWIRE__AGENT__STEP_DELAY_MS", "500"),
    ]
}

#[actix_web::test]
async fn a_node_paused_past_its_lease_is_fenced_and_emits_nothing_more() {
    let prefix = unique_prefix("fenced");
    let db = TestDatabase::create();
    let survivor = redis_node(&prefix, &db, "survivor", |c| c.broker.node_lease_secs = 2);
    let (url, store_url) = (redis_url(), db.url());
    let mut env = redis_node_env(&prefix, &store_url, "sleeper");
    env.extend([("AGENTWIRE__BROKER__URL", url.as_str()), ("AGENTWIRE__BROKER__NODE_LEASE_SECS", "2")]);
    let mut sleeper = BinaryServer::spawn(&env);
    let mut watcher = survivor.ready_client("uma").await;
    let mut client = Client::connect_bearer(&sleeper.ws_url(), &sleeper.token("uma")).await.unwrap();
    client.expect_setup("uma").await;
    let ack = client.say("t", "a question for a node about to doze off", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    watcher.recv_where(|f| f["run_id"] == run_id.as_str() && f["type"] == "agent_started").await;

    // Paused past its lease (as by a long GC pause), the node is taken for dead: the survivor
    // ends its run.
    signal(&sleeper.child, "STOP");
    let end = watcher.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(end["payload"]["code"], "node_lost");

    // Back, it learns it was fenced: its tab is sent to resume elsewhere and it stops, having
    // streamed nothing more of the run.
    signal(&sleeper.child, "CONT");
    assert_eq!(client.expect_close_code().await, 1012);
    assert_eq!(exit_code(&mut sleeper.child).await, Some(3));
    publish(&survivor, "uma", vec![thinking("marker")]).await;
    let mut after_end = Vec::new();
    loop {
        let event = watcher.stream_events(1).await.remove(0);
        if event["payload"]["text"] == "marker" {
            break;
        }
        if event["run_id"] == run_id.as_str() && event["seq"].as_u64() > end["seq"].as_u64() {
            after_end.push(event);
        }
    }
    assert!(after_end.is_empty(), "events of the run after its end: {after_end:?}");
}

#[actix_web::test]
async fn a_node_restarted_under_its_node_id_ends_its_previous_runs_and_frees_their_slots() {
    let prefix = unique_prefix("phoenix");
    let db = TestDatabase::create();
    let (url, store_url) = (redis_url(), db.url());
    // A lease far longer than the test: only the restart can reap the first life.
    let mut env = redis_node_env(&prefix, &store_url, "phoenix");
    env.extend([
        ("AGENTWIRE__BROKER__URL", url.as_str()),
        ("AGENTWIRE__BROKER__NODE_LEASE_SECS", "60"),
        ("AGENTWIRE__LIMITS__MAX_SESSIONS_PER_USER", "2"),
    ]);
    let mut first = BinaryServer::spawn(&env);
    let mut client = Client::connect_bearer(&first.ws_url(), &first.token("vera")).await.unwrap();
    let epoch = client.expect_setup("vera").await["epoch"].as_str().unwrap().to_owned();
    let ack = client.say("t", "a question for a node about to crash", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let started = client.recv_where(|f| f["type"] == "agent_started").await;
    first.child.kill().unwrap();
    let _ = first.child.wait();

    let second = BinaryServer::spawn(&env);
    let url = format!("{}?last_seq={}&epoch={epoch}", second.ws_url(), started["seq"]);
    let mut again = Client::connect_bearer(&url, &second.token("vera")).await.unwrap();
    again.expect_setup("vera").await;
    let end = again.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(end["payload"]["code"], "node_lost");
    // The first life's session slot is free: a second tab fits under the cap of 2.
    let mut other = Client::connect_bearer(&second.ws_url(), &second.token("vera")).await.unwrap();
    other.expect_setup("vera").await;
}
