//! Conversations that last (docs/conversations.md): the store behind a real server, read through
//! the threads API as a chat page or a backend would, across restarts and a SIGKILL of the real
//! binary; thread changes live on every tab.

mod common;

use agentwire::config::StoreKind;
use common::*;
use serde_json::{json, Value};

/// An HTTP request with a JSON answer, for the verbs `common` has no helper for.
async fn http(method: &str, url: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let client = awc::Client::builder().timeout(WAIT).finish();
    let method = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client.request(method, url);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let mut response = match body {
        Some(body) => {
            request.insert_header(("content-type", "application/json")).send_body(body.to_string()).await
        }
        None => request.send().await,
    }
    .expect("HTTP answer");
    let bytes = response.body().limit(16 << 20).await.expect("body");
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (response.status().as_u16(), value)
}

fn sqlite_at(path: &std::path::Path) -> impl FnOnce(&mut agentwire::config::Config) + '_ {
    move |c| {
        c.store.kind = StoreKind::Sqlite;
        c.store.path = path.to_owned();
        c.agent.step_delay_ms = 0;
    }
}

/// A tool-using run of the demo agent to its end; the ack and the run's events.
async fn chat(tab: &mut Client, thread: &str, content: &str) -> (Value, Vec<Value>) {
    let ack = tab.say(thread, content, None).await;
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let events = tab.events_until_run_ends(&run_id).await;
    (ack, events)
}

#[actix_web::test]
async fn a_conversation_survives_a_restart_and_reads_back_in_ag_ui_form() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("conversations.db");
    let (ack, run_id) = {
        let server = TestServer::with(sqlite_at(&db));
        let mut tab = server.ready_client("alice").await;
        let (ack, events) = chat(&mut tab, "t1", "what is  2 * 21\n please").await;
        assert_eq!(events.last().unwrap()["type"], "agent_completed");
        let run_id = ack["run_id"].as_str().unwrap().to_owned();
        (ack, run_id)
    };
    // A new server on the same file: nothing of the first one's memory is left.
    let server = TestServer::with(sqlite_at(&db));
    let token = server.token("alice");
    let (status, list) = http("GET", &server.http("/api/v1/threads"), Some(&token), None).await;
    assert_eq!(status, 200, "{list}");
    let threads = list["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 1, "{list}");
    assert_eq!(threads[0]["thread_id"], "t1");
    assert_eq!(threads[0]["title"], "what is 2 * 21 please", "white space collapsed");
    assert_eq!(threads[0]["running"], Value::Null);
    assert_eq!(list["next"], Value::Null);

    let (status, page) = http("GET", &server.http("/api/v1/threads/t1/messages"), Some(&token), None).await;
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"], "{page}");
    assert_eq!(messages[0]["id"], ack["message_id"]);
    assert_eq!(messages[0]["content"], "what is  2 * 21\n please");
    assert_eq!(messages[0]["seq"], ack["seq"], "the echo's seq");
    let call = &messages[1]["toolCalls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(messages[2]["toolCallId"], call["id"], "the result follows its call");
    assert!(messages[3]["content"].as_str().unwrap().contains("42"), "{page}");
    for produced in &messages[1..] {
        assert_eq!(produced["run_id"], run_id.as_str());
        assert_eq!(produced["run_status"], "ok");
    }
    assert_thread_has(&server, &token, "t1", 4).await;
}

async fn assert_thread_has(server: &TestServer, token: &str, thread: &str, count: u64) {
    let (status, one) =
        http("GET", &server.http(&format!("/api/v1/threads/{thread}")), Some(token), None).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["message_count"], count, "{one}");
    assert!(one.get("state").is_some(), "one thread carries its state: {one}");
}

#[actix_web::test]
async fn the_threads_api_answers_401_404_400_as_the_contract_says() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 0);
    let mut tab = server.ready_client("alice").await;
    chat(&mut tab, "mine", "hello").await;
    let alice = server.token("alice");
    let bob = server.token("bob");
    let url = |path: &str| server.http(path);

    assert_eq!(http("GET", &url("/api/v1/threads"), None, None).await.0, 401);
    assert_eq!(http("GET", &url("/api/v1/threads"), Some("not-a-jwt"), None).await.0, 401);
    // Another user's thread does not exist for them: 404, never 403.
    assert_eq!(http("GET", &url("/api/v1/threads/mine"), Some(&bob), None).await.0, 404);
    assert_eq!(http("GET", &url("/api/v1/threads/mine/messages"), Some(&bob), None).await.0, 404);
    assert_eq!(
        http("PATCH", &url("/api/v1/threads/mine"), Some(&bob), Some(json!({"title": "x"}))).await.0,
        404
    );
    assert_eq!(http("DELETE", &url("/api/v1/threads/mine"), Some(&bob), None).await.0, 404);
    let (_, theirs) = http("GET", &url("/api/v1/threads"), Some(&bob), None).await;
    assert_eq!(theirs["threads"], json!([]));

    for (query, field) in [("?limit=0", "limit"), ("?limit=x", "limit"), ("?before=nope", "before")] {
        let (status, body) = http("GET", &url(&format!("/api/v1/threads{query}")), Some(&alice), None).await;
        assert_eq!((status, body["field"].as_str()), (400, Some(field)), "{query}: {body}");
    }
    for title in [json!(""), json!("x".repeat(201)), json!(5)] {
        let (status, body) =
            http("PATCH", &url("/api/v1/threads/mine"), Some(&alice), Some(json!({"title": title}))).await;
        assert_eq!((status, body["field"].as_str()), (400, Some("title")), "{body}");
    }
    // The backend's routes: an API key, the user in the path.
    let (status, listed) = http("GET", &url("/api/v1/users/alice/threads"), Some(API_KEY), None).await;
    assert_eq!((status, listed["threads"][0]["thread_id"].as_str()), (200, Some("mine")), "{listed}");
    assert_eq!(http("GET", &url("/api/v1/users/alice/threads"), Some(&alice), None).await.0, 401);
}

#[actix_web::test]
async fn new_renamed_and_deleted_threads_reach_every_tab_and_the_sidebar_pages() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 0);
    let mut writer = server.ready_client("carol").await;
    let mut other_tab = server.ready_client("carol").await;
    let token = server.token("carol");
    writer.say("first", "the first thread", None).await;
    let made = other_tab.recv_where(|f| f["type"] == "thread_updated").await;
    assert_eq!(
        (made["thread_id"].as_str(), made["payload"]["title"].as_str()),
        (Some("first"), Some("the first thread"))
    );
    for thread in ["second", "third"] {
        chat(&mut writer, thread, &format!("about {thread}")).await;
    }
    // Most recently updated first, two a page.
    let (_, page) = http("GET", &server.http("/api/v1/threads?limit=2"), Some(&token), None).await;
    let ids: Vec<&str> =
        page["threads"].as_array().unwrap().iter().map(|t| t["thread_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["third", "second"], "{page}");
    let next = page["next"].as_str().expect("a next page");
    let (_, rest) =
        http("GET", &server.http(&format!("/api/v1/threads?limit=2&before={next}")), Some(&token), None)
            .await;
    assert_eq!(rest["threads"][0]["thread_id"], "first", "{rest}");
    assert_eq!(rest["next"], Value::Null);

    let (status, renamed) = http(
        "PATCH",
        &server.http("/api/v1/threads/second"),
        Some(&token),
        Some(json!({"title": "Renamed"})),
    )
    .await;
    assert_eq!((status, renamed["title"].as_str()), (200, Some("Renamed")), "{renamed}");
    let made = other_tab.recv_where(|f| f["type"] == "thread_updated" && f["thread_id"] == "second").await;
    assert_eq!(made["payload"]["title"], "about second", "made with its first message");
    let event = other_tab.recv_where(|f| f["type"] == "thread_updated" && f["thread_id"] == "second").await;
    assert_eq!(event["payload"]["title"], "Renamed");

    let (status, _) = http("DELETE", &server.http("/api/v1/threads/second"), Some(&token), None).await;
    assert_eq!(status, 204);
    let event = other_tab.recv_where(|f| f["type"] == "thread_deleted").await;
    assert_eq!(event["payload"]["thread_id"], "second");
    assert_eq!(http("GET", &server.http("/api/v1/threads/second/messages"), Some(&token), None).await.0, 404);
}

#[actix_web::test]
async fn a_repeated_client_msg_id_is_recognised_after_the_stream_forgot_it() {
    let server = TestServer::with(|c| {
        c.agent.step_delay_ms = 0;
        c.history.dedupe_per_user = std::num::NonZero::new(1).unwrap();
    });
    let mut tab = server.ready_client("dora").await;
    let first = tab.say("t", "once", Some("c-1")).await;
    tab.events_until_run_ends(first["run_id"].as_str().unwrap()).await;
    // The broker remembers one id: this one pushes c-1 out of it.
    let second = tab.say("t", "twice", Some("c-2")).await;
    tab.events_until_run_ends(second["run_id"].as_str().unwrap()).await;
    let again = tab.say("t", "once", Some("c-1")).await;
    for field in ["message_id", "run_id", "seq"] {
        assert_eq!(again[field], first[field], "{field}: {again} vs {first}");
    }
    let token = server.token("dora");
    let (_, page) = http("GET", &server.http("/api/v1/threads/t/messages"), Some(&token), None).await;
    let users = page["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user").count();
    assert_eq!(users, 2, "the repeat stored nothing: {page}");
}

#[actix_web::test]
async fn over_the_byte_quota_a_message_gets_quota_exceeded_and_nothing_is_stored() {
    let server = TestServer::with(|c| {
        c.agent.kind = agentwire::config::AgentKind::None;
        c.store.max_bytes_per_user = std::num::NonZero::new(300).unwrap();
    });
    let mut tab = server.ready_client("erin").await;
    tab.say("t", &"a".repeat(100), None).await;
    tab.send(json!({"type": "user_message", "thread_id": "t", "content": "b".repeat(200)})).await;
    let refused = tab.recv_where(|f| f["type"] == "error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("quota_exceeded"), Some("user_message"))
    );
    let token = server.token("erin");
    let (_, page) = http("GET", &server.http("/api/v1/threads/t/messages"), Some(&token), None).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
}

#[actix_web::test]
async fn past_max_threads_per_user_the_least_recently_updated_thread_goes() {
    let server = TestServer::with(|c| {
        c.agent.kind = agentwire::config::AgentKind::None;
        c.store.max_threads_per_user = std::num::NonZero::new(2).unwrap();
    });
    let mut tab = server.ready_client("fay").await;
    for thread in ["a", "b", "c"] {
        tab.say(thread, thread, None).await;
    }
    let gone = tab.recv_where(|f| f["type"] == "thread_deleted").await;
    assert_eq!(gone["payload"]["thread_id"], "a");
    let token = server.token("fay");
    let (_, list) = http("GET", &server.http("/api/v1/threads"), Some(&token), None).await;
    let ids: Vec<&str> =
        list["threads"].as_array().unwrap().iter().map(|t| t["thread_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c", "b"]);
}

/// The durability order on the real binary: SIGKILL right after the ack finds the message
/// after a restart; SIGKILL right after `agent_completed` finds the answer.
#[actix_web::test]
async fn acked_messages_and_completed_answers_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kill.db");
    let db = db.to_str().unwrap();
    let env = [("AGENTWIRE__STORE__PATH", db), ("AGENTWIRE__AGENT__STEP_DELAY_MS", "200")];

    let server = BinaryServer::spawn(&env);
    let mut tab = Client::connect_bearer(&server.ws_url(), &server.token("gil")).await.unwrap();
    tab.expect_setup("gil").await;
    let ack = tab.say("t", "keep me", Some("k-1")).await;
    server.signal("KILL");
    drop(server);

    let server = BinaryServer::spawn(&env);
    let token = server.token("gil");
    let (status, page) = http("GET", &server.http("/api/v1/threads/t/messages"), Some(&token), None).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["id"], ack["message_id"], "{page}");

    let mut tab = Client::connect_bearer(&server.ws_url(), &token).await.unwrap();
    tab.expect_setup("gil").await;
    let ack = tab.say("t", "what is 6 * 7", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = tab.events_until_run_ends(&run_id).await;
    assert_eq!(events.last().unwrap()["type"], "agent_completed");
    server.signal("KILL");
    drop(server);

    let server = BinaryServer::spawn(&env);
    let (_, page) =
        http("GET", &server.http("/api/v1/threads/t/messages"), Some(&server.token("gil")), None).await;
    let last = page["messages"].as_array().unwrap().last().cloned().unwrap_or_default();
    assert_eq!(
        (last["role"].as_str(), last["run_id"].as_str()),
        (Some("assistant"), Some(run_id.as_str())),
        "{page}"
    );
    assert!(last["content"].as_str().unwrap_or_default().contains("42"), "{page}");
}

/// An AG-UI agent is sent its thread from the store: after a restart, the second turn arrives
/// with the first (docs/conversations.md, "What the agent is sent").
#[actix_web::test]
async fn an_agent_is_sent_its_thread_after_a_restart() {
    use common::fake_agent::{sse, FakeAgent};
    let agent = FakeAgent::start(|input| {
        let count = input["messages"].as_array().map_or(0, Vec::len);
        sse(&[
            json!({"type": "RUN_STARTED", "threadId": input["threadId"], "runId": input["runId"]}),
            json!({"type": "TEXT_MESSAGE_START", "messageId": format!("a{count}"), "role": "assistant"}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": format!("a{count}"), "delta": format!("sent {count}")}),
            json!({"type": "TEXT_MESSAGE_END", "messageId": format!("a{count}")}),
            json!({"type": "RUN_FINISHED", "threadId": input["threadId"], "runId": input["runId"]}),
        ])
    });
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agent.db");
    let with_agent = |c: &mut agentwire::config::Config| {
        sqlite_at(&db)(c);
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = agent.url.clone();
    };
    {
        let server = TestServer::with(with_agent);
        let mut tab = server.ready_client("hal").await;
        chat(&mut tab, "t", "first turn").await;
    }
    let server = TestServer::with(with_agent);
    let mut tab = server.ready_client("hal").await;
    let (_, events) = chat(&mut tab, "t", "second turn").await;
    assert_eq!(events.last().unwrap()["payload"]["response"]["content"], "sent 3");
    let second = &agent.requests()[1];
    let sent: Vec<(&str, &str)> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(sent, [("user", "first turn"), ("assistant", "sent 1"), ("user", "second turn")]);
}

fn busy_server(on_busy: agentwire::config::OnBusy) -> TestServer {
    TestServer::with(move |c| {
        c.agent.step_delay_ms = 100;
        c.agent.on_busy = on_busy;
    })
}

/// The events of the user's stream until both runs have ended.
async fn until_both_end(tab: &mut Client, first: &str, second: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut ended = 0;
    while ended < 2 {
        let frame = tab.recv().await;
        if frame.get("seq").is_none() || frame["type"] == "ack" {
            continue;
        }
        if is_terminal(&frame) && (frame["run_id"] == first || frame["run_id"] == second) {
            ended += 1;
        }
        events.push(frame);
    }
    events
}

#[actix_web::test]
async fn a_second_message_on_a_busy_thread_waits_and_the_runs_never_interleave() {
    let server = busy_server(agentwire::config::OnBusy::Enqueue);
    let mut tab = server.ready_client("ivy").await;
    let one = tab.say("t", "what is 1 + 1", None).await;
    let two = tab.say("t", "what is 2 + 2", None).await;
    let (one, two) = (one["run_id"].as_str().unwrap().to_owned(), two["run_id"].as_str().unwrap().to_owned());
    let events = until_both_end(&mut tab, &one, &two).await;
    let of = |run: &str| {
        events.iter().filter(|e| e["run_id"] == run).map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let (first, second) = (of(&one), of(&two));
    assert!(first.len() > 2 && second.len() > 2, "{events:?}");
    assert!(
        first.iter().max() < second.iter().min(),
        "run two began before run one ended: {first:?} {second:?}"
    );
    assert!(events.iter().filter(|e| is_terminal(e)).all(|e| e["payload"]["status"] == "ok"), "{events:?}");
    // Stored in the order of the turns: each answer after its own question.
    let token = server.token("ivy");
    let (_, page) = http("GET", &server.http("/api/v1/threads/t/messages"), Some(&token), None).await;
    let runs: Vec<&str> =
        page["messages"].as_array().unwrap().iter().filter_map(|m| m["run_id"].as_str()).collect();
    let last_of_one = runs.iter().rposition(|r| *r == one).unwrap();
    let first_of_two = runs.iter().position(|r| *r == two).unwrap();
    assert!(last_of_one < first_of_two, "{page}");
}

#[actix_web::test]
async fn on_busy_reject_answers_thread_busy_and_stores_nothing() {
    let server = busy_server(agentwire::config::OnBusy::Reject);
    let mut tab = server.ready_client("jo").await;
    let one = tab.say("t", "what is 1 + 1", None).await;
    tab.send(json!({"type": "user_message", "thread_id": "t", "content": "me too"})).await;
    let refused = tab.recv_where(|f| f["type"] == "error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("thread_busy"), Some("user_message"))
    );
    let events = tab.events_until_run_ends(one["run_id"].as_str().unwrap()).await;
    assert!(events.iter().all(|e| e["payload"]["content"] != "me too"), "not echoed: {events:?}");
    // Another thread is not busy.
    let other = tab.say("u", "hello", None).await;
    assert!(other["run_id"].is_string());
    let token = server.token("jo");
    let (_, page) = http("GET", &server.http("/api/v1/threads/t/messages"), Some(&token), None).await;
    assert_eq!(page["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user").count(), 1);
}

#[actix_web::test]
async fn on_busy_interrupt_cancels_the_current_run_then_starts_the_new_one() {
    let server = busy_server(agentwire::config::OnBusy::Interrupt);
    let mut tab = server.ready_client("kim").await;
    let one = tab.say("t", "what is 1 + 1", None).await;
    let two = tab.say("t", "never mind", None).await;
    let (one, two) = (one["run_id"].as_str().unwrap().to_owned(), two["run_id"].as_str().unwrap().to_owned());
    let events = until_both_end(&mut tab, &one, &two).await;
    let end = |run: &str| events.iter().find(|e| e["run_id"] == run && is_terminal(e)).cloned().unwrap();
    assert_eq!(end(&one)["payload"]["status"], "cancelled");
    assert_eq!(end(&two)["payload"]["status"], "ok");
    assert!(
        end(&one)["seq"].as_u64()
            < events.iter().find(|e| e["run_id"] == two.as_str()).unwrap()["seq"].as_u64()
    );
}

#[actix_web::test]
async fn a_waiting_run_can_be_cancelled_before_it_starts() {
    let server = busy_server(agentwire::config::OnBusy::Enqueue);
    let mut tab = server.ready_client("lee").await;
    let one = tab.say("t", "what is 1 + 1", None).await;
    let two = tab.say("t", "and then?", None).await;
    let (one, two) = (one["run_id"].as_str().unwrap().to_owned(), two["run_id"].as_str().unwrap().to_owned());
    tab.send(json!({"type": "cancel_run", "run_id": two})).await;
    let events = until_both_end(&mut tab, &one, &two).await;
    let kinds: Vec<&str> =
        events.iter().filter(|e| e["run_id"] == two.as_str()).map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["agent_started", "agent_completed"], "{events:?}");
    let end = events.iter().find(|e| e["run_id"] == one.as_str() && is_terminal(e)).unwrap();
    assert_eq!(end["payload"]["status"], "ok");
}

/// A tab that opens during a long answer (5,000 chunks, five times the stream's history ring)
/// shows exactly what a tab open from the start shows: the snapshot in `processing_ready.runs`,
/// then every live event after `last_seq` (docs/conversations.md, "Joining a run in progress").
#[actix_web::test]
async fn a_tab_that_joins_a_long_run_shows_what_a_tab_open_from_the_start_shows() {
    use common::fake_agent::{long_answer, FakeAgent};
    const CHUNKS: usize = 5000;
    let agent = FakeAgent::start(|input| {
        long_answer(input, Vec::new(), CHUNKS, |i| format!("{i} "), std::time::Duration::from_micros(500))
    });
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = agentwire::config::AgentKind::AgUi;
        c.agent.url = url;
        c.agent.run_timeout_secs = std::num::NonZero::new(60).unwrap();
    });
    let mut first = server.ready_client("mo").await;
    let ack = first.say("t", "tell me a long story", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    // The first tab follows from the start; a second one opens once a third of it has streamed.
    let mut seen = String::new();
    let mut chunks = 0;
    while chunks < CHUNKS / 3 {
        let frame = first.recv().await;
        if frame["type"] == "agent_message_chunk" {
            seen.push_str(frame["payload"]["delta"].as_str().unwrap());
            chunks += 1;
        }
    }
    let mut joined = Client::connect_bearer(&server.ws_url(), &server.token("mo")).await.unwrap();
    let ready = joined.expect_setup("mo").await;
    let last_seq = ready["last_seq"].as_u64().unwrap();
    let runs = ready["runs"].as_array().expect("processing_ready has runs");
    assert_eq!(runs.len(), 1, "{ready}");
    assert_eq!(
        (runs[0]["run_id"].as_str(), runs[0]["thread_id"].as_str()),
        (Some(run_id.as_str()), Some("t"))
    );
    assert!(runs[0]["started_seq"].as_u64().unwrap() < last_seq);
    let mut shown = runs[0]["content"].as_str().unwrap().to_owned();
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
    assert_eq!(seen, whole, "the tab open from the start");
    assert_eq!(shown, whole, "the tab that joined in the middle");
    // A tab opening now sees no run in progress.
    let mut later = Client::connect_bearer(&server.ws_url(), &server.token("mo")).await.unwrap();
    assert_eq!(later.expect_setup("mo").await["runs"], json!([]));
}

/// A backend that answers through `POST /api/v1/publish` (here behind `agent.kind = "none"`,
/// answering the run its user's message was acked with) has its `agent_completed` `response`
/// stored as the run's assistant message, in the turn of the message it answers, before the
/// event reaches any tab; one for a thread the user never wrote to makes the thread and every
/// tab hears `thread_updated` (docs/conversations.md, "What is stored, and when").
#[actix_web::test]
async fn a_publishers_answer_is_stored_as_the_runs_message() {
    let server = TestServer::with(|c| c.agent.kind = agentwire::config::AgentKind::None);
    let mut tab = server.ready_client("pia").await;
    let ack = tab.say("t", "are you there?", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let started = json!({"type": "agent_started", "thread_id": "t", "run_id": run_id,
        "payload": {"agent": "backend", "message_id": "m"}});
    let completed = json!({"type": "agent_completed", "thread_id": "t", "run_id": run_id,
        "payload": {"status": "ok", "response": {"content": "yes, here"}, "duration_ms": 5}});
    let (status, body) = publish(&server, "pia", vec![started, completed.clone()]).await;
    assert_eq!(status, 200, "{body}");
    let end_seq = body["seqs"][1].as_u64().unwrap();
    let events = tab.events_until_run_ends(&run_id).await;
    assert_eq!(events.last().unwrap()["seq"], end_seq);
    let token = server.token("pia");
    let url = server.http("/api/v1/threads/t/messages");
    let (_, page) = http("GET", &url, Some(&token), None).await;
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{page}");
    assert_eq!(
        (messages[0]["role"].as_str(), messages[0]["content"].as_str()),
        (Some("user"), Some("are you there?"))
    );
    let answer = &messages[1];
    assert_eq!((answer["role"].as_str(), answer["content"].as_str()), (Some("assistant"), Some("yes, here")));
    assert_eq!(
        (answer["run_id"].as_str(), answer["run_status"].as_str()),
        (Some(run_id.as_str()), Some("ok"))
    );
    // The same publish again (a retry) stores the answer once.
    let (status, _) = publish(&server, "pia", vec![completed]).await;
    assert_eq!(status, 200);
    let (_, page) = http("GET", &url, Some(&token), None).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    // An answer on a thread of its own makes the thread.
    let news = json!({"type": "agent_completed", "thread_id": "news", "run_id": "r_backend_report",
        "payload": {"status": "ok", "response": {"content": "Your report is ready"}, "duration_ms": 0}});
    let (status, body) = publish(&server, "pia", vec![news]).await;
    assert_eq!(status, 200, "{body}");
    let updated = tab.recv_where(|f| f["type"] == "thread_updated" && f["thread_id"] == "news").await;
    assert_eq!(
        (updated["thread_id"].as_str(), updated["payload"]["title"].as_str()),
        (Some("news"), Some("Your report is ready"))
    );
    let (_, page) = http("GET", &server.http("/api/v1/threads/news/messages"), Some(&token), None).await;
    assert_eq!(page["messages"][0]["content"], "Your report is ready", "{page}");
}

/// A browser app on another origin calls the threads API and `POST /ag-ui` with the user's
/// token: the preflight is answered for the origins of `server.allowed_origins` (every origin
/// when it is empty) with `Authorization` and `Content-Type` allowed, and the answers carry
/// `Access-Control-Allow-Origin`; another origin is refused (docs/ag-ui.md).
#[actix_web::test]
async fn browsers_on_allowed_origins_may_call_the_threads_api_and_ag_ui() {
    async fn preflight(url: &str, origin: &str, method: &str) -> (u16, Option<String>, String) {
        let client = awc::Client::builder().timeout(WAIT).finish();
        let response = client
            .request(actix_web::http::Method::OPTIONS, url)
            .insert_header(("origin", origin))
            .insert_header(("access-control-request-method", method))
            .insert_header(("access-control-request-headers", "authorization, content-type"))
            .send()
            .await
            .expect("an answer");
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let allowed_headers = header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
        (response.status().as_u16(), header("access-control-allow-origin"), allowed_headers)
    }
    let server = TestServer::with(|c| c.server.allowed_origins = vec!["http://app.example".into()]);
    let app = "http://app.example";
    for (path, method) in
        [("/api/v1/threads", "GET"), ("/api/v1/threads/t/messages", "GET"), ("/ag-ui", "POST")]
    {
        let (status, origin, headers) = preflight(&server.http(path), app, method).await;
        assert_eq!((status, origin.as_deref()), (200, Some(app)), "{path}");
        assert!(headers.contains("authorization") && headers.contains("content-type"), "{path}: {headers}");
        let (_, origin, _) = preflight(&server.http(path), "http://elsewhere.example", method).await;
        assert_eq!(origin, None, "{path}: another origin is not allowed");
    }
    // The call itself carries the header for the browser.
    let client = awc::Client::builder().timeout(WAIT).finish();
    let response = client
        .get(server.http("/api/v1/threads"))
        .insert_header(("origin", app))
        .bearer_auth(server.token("cora"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 200);
    let origin = response.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok());
    assert_eq!(origin, Some(app));
}
