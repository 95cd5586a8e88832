//! `POST /ag-ui` (docs/ag-ui.md): agentwire as an AG-UI server. The AG-UI project's own
//! TypeScript client (`@ag-ui/client`, run by Node; `.ci/test` installs it) holds a conversation
//! and aborts a run while a WebSocket tab of the same user watches; the pass-through of an AG-UI
//! agent's own events; bad input; limits.

mod common;

use std::num::NonZero;

use agentwire::config::AgentKind;
use common::fake_agent::{sse, FakeAgent};
use common::*;
use serde_json::{json, Value};

fn types(events: &Value) -> Vec<&str> {
    events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[actix_web::test]
async fn http_agent_holds_a_conversation_in_sync_with_a_websocket_tab() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 10);
    let mut tab = server.ready_client("alice").await;
    let token = server.token("alice");
    let client = node_client("conversation", &server, &token, "ag-thread");

    // The tab sees both messages and both runs while the AG-UI client reads them.
    let watch = async {
        let first = tab.recv_where(|f| f["type"] == "user_message").await;
        let first_end = tab.recv_where(|f| f["run_id"] == "run-one" && is_terminal(f)).await;
        let second = tab.recv_where(|f| f["type"] == "user_message").await;
        let second_end = tab.recv_where(|f| is_terminal(f) && f["run_id"] != "run-one").await;
        (first, first_end, second, second_end)
    };
    let (output, (first, first_end, second, second_end)) = tokio::join!(client, watch);

    assert_eq!(
        (first["thread_id"].as_str(), first["payload"]["content"].as_str()),
        (Some("ag-thread"), Some("what is 12 * (3 + 4)?"))
    );
    assert_eq!(second["payload"]["content"], "and how many words is this?");
    assert_eq!(first_end["type"], "agent_completed");
    assert_eq!(second_end["type"], "agent_completed");
    assert!(second_end["seq"].as_u64() > first_end["seq"].as_u64());

    let runs = output["runs"].as_array().unwrap();
    let first_types = types(&runs[0]["events"]);
    assert_eq!(first_types.first(), Some(&"RUN_STARTED"));
    assert_eq!(first_types.last(), Some(&"RUN_FINISHED"));
    assert_eq!(runs[0]["events"][0]["runId"], "run-one");
    for kind in
        ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT", "TEXT_MESSAGE_CONTENT"]
    {
        assert!(first_types.contains(&kind), "{kind} missing: {first_types:?}");
    }
    // The client's own view of the thread: the calculator call, its result, the answer the tab
    // saw, then the second turn.
    let messages = output["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles[..4], ["user", "assistant", "tool", "assistant"], "{messages:?}");
    assert_eq!(messages[1]["toolCalls"][0]["function"]["name"], "calculator");
    assert_eq!(messages[2]["content"], r#"{"value":"84"}"#);
    assert_eq!(messages[3]["content"], first_end["payload"]["response"]["content"]);
    assert_eq!(roles[4], "user");
    assert_eq!(messages.last().unwrap()["content"], second_end["payload"]["response"]["content"]);
    assert_eq!(server.metric("agentwire_ag_ui_requests_total{status=\"200\"}"), 2.0);
}

#[actix_web::test]
async fn aborting_the_request_cancels_the_run_for_every_tab() {
    let server = TestServer::with(|c| c.agent.step_delay_ms = 150);
    let mut tab = server.ready_client("bob").await;
    let output = node_client("cancel", &server, &server.token("bob"), "t").await;
    let seen: Vec<&str> = output["events"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(seen.first(), Some(&"RUN_STARTED"));
    assert!(seen.contains(&"TOOL_CALL_START"), "{seen:?}");
    let end = tab.recv_where(|f| f["run_id"] == "run-aborted" && is_terminal(f)).await;
    assert_eq!(end["type"], "agent_completed");
    assert_eq!(end["payload"]["status"], "cancelled");
    server
        .eventually("the run gone", |s| {
            s.metric("agentwire_agent_runs_total{code=\"\",outcome=\"cancelled\"}") == 1.0
        })
        .await;
    // Nothing is left behind: the user can run again at once, and nothing more of the aborted
    // run reaches the tab.
    let ack = tab.say("t", "again", None).await;
    let events = tab.events_until_run_ends(ack["run_id"].as_str().unwrap()).await;
    assert!(events.iter().all(|e| e["run_id"] != "run-aborted" || e["seq"].as_u64() <= end["seq"].as_u64()));
}

/// POSTs a body to `/ag-ui` and reads the whole answer: status and body text.
async fn post_ag_ui(server: &TestServer, bearer: Option<&str>, body: String) -> (u16, String) {
    let client = awc::Client::builder().timeout(WAIT).finish();
    let mut request = client.post(server.http("/ag-ui")).insert_header(("content-type", "application/json"));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let mut response = request.send_body(body).await.expect("HTTP answer");
    let body = response.body().limit(16 << 20).await.expect("body");
    (response.status().as_u16(), String::from_utf8_lossy(&body).into_owned())
}

fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|block| block.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("each event is JSON"))
        .collect()
}

/// A `RunAgentInput` with one new user message (each with an id of its own: an id the thread
/// has is a message taken before).
fn input(thread: &str, content: &str) -> String {
    static IDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!("u{}", IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    json!({"threadId": thread, "runId": null, "messages": [{"id": id, "role": "user", "content": content}],
        "state": {}, "tools": [], "context": [], "forwardedProps": {}})
    .to_string()
}

/// A run's own event (`RUN_STARTED`, `RUN_FINISHED`) for `input`'s thread and run.
fn run_event(input: &Value, kind: &str) -> Value {
    json!({"type": kind, "threadId": input["threadId"], "runId": input["runId"]})
}

#[actix_web::test]
async fn an_ag_ui_agents_own_events_pass_through() {
    let agent = FakeAgent::start(|input| {
        let with = |kind: &str| run_event(input, kind);
        sse(&[
            with("RUN_STARTED"),
            json!({"type": "STEP_STARTED", "stepName": "answer"}),
            json!({"type": "TEXT_MESSAGE_START", "messageId": "agent-msg-1", "role": "assistant"}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "agent-msg-1", "delta": "Hello"}),
            json!({"type": "TEXT_MESSAGE_END", "messageId": "agent-msg-1"}),
            json!({"type": "STEP_FINISHED", "stepName": "answer"}),
            with("RUN_FINISHED"),
        ])
    });
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
    });
    let mut tab = server.ready_client("carol").await;
    let (status, body) = post_ag_ui(&server, Some(&server.token("carol")), input("t", "hi")).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    let sent = agent.requests();
    let run_id = sent[0]["runId"].as_str().unwrap();
    let expected = [
        json!({"type": "RUN_STARTED", "threadId": "t", "runId": run_id}),
        json!({"type": "STEP_STARTED", "stepName": "answer"}),
        json!({"type": "TEXT_MESSAGE_START", "messageId": "agent-msg-1", "role": "assistant"}),
        json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "agent-msg-1", "delta": "Hello"}),
        json!({"type": "TEXT_MESSAGE_END", "messageId": "agent-msg-1"}),
        json!({"type": "STEP_FINISHED", "stepName": "answer"}),
        json!({"type": "RUN_FINISHED", "threadId": "t", "runId": run_id}),
    ];
    assert_eq!(events, expected);
    // The tab saw the new thread, then the same run, mapped: the pass-through steps, the chunk,
    // the end.
    let kinds: Vec<String> = tab
        .events_until_run_ends(run_id)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "thread_updated",
            "user_message",
            "agent_started",
            "agent_event",
            "agent_message_chunk",
            "agent_event",
            "agent_completed"
        ]
    );
}

#[actix_web::test]
async fn bad_input_is_refused_naming_the_field() {
    let server = TestServer::with(|c| c.api.max_body_bytes = NonZero::new(4096).unwrap());
    let token = server.token("dave");
    let refused = |(status, body): (u16, String)| (status, serde_json::from_str::<Value>(&body).unwrap());

    let (status, body) = refused(post_ag_ui(&server, None, input("t", "hi")).await);
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
    let (status, _) = refused(post_ag_ui(&server, Some("not-a-jwt"), input("t", "hi")).await);
    assert_eq!(status, 401);

    for (body, field) in [
        ("{not json".to_owned(), "body"),
        (json!({"messages": [{"id": "1", "role": "user", "content": "x"}]}).to_string(), "threadId"),
        (
            json!({"threadId": "t", "messages": [{"id": "1", "role": "assistant", "content": "x"}]})
                .to_string(),
            "messages",
        ),
        (json!({"threadId": "t", "messages": []}).to_string(), "messages"),
        (input("t", &"x".repeat(5000)), "body"),
    ] {
        let (status, answer) = refused(post_ag_ui(&server, Some(&token), body).await);
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["field"], field, "{answer}");
        assert_eq!(answer["error"], "bad_request");
    }
    assert_eq!(server.metric("agentwire_ag_ui_requests_total{status=\"400\"}"), 5.0);
}

/// docs/ag-ui.md: the messages an input names that the thread has (by id) were taken before:
/// a frontend tool's result posted after the history starts the follow-up run without echoing
/// the old user message again, an input with nothing new is a 400 naming `messages`, and the
/// client's `forwardedProps` and `resume` reach the agent (agentwire's own keys under
/// `forwardedProps.agentwire`).
#[actix_web::test]
async fn new_messages_are_taken_by_id_and_the_clients_props_reach_the_agent() {
    let agent = FakeAgent::start(|input| {
        let with = |kind: &str| run_event(input, kind);
        // After a tool's result the agent stops to ask (an AG-UI 1.0 interrupt).
        let last_role = input["messages"].as_array().and_then(|m| m.last()).map(|m| m["role"].clone());
        let mut finished = with("RUN_FINISHED");
        if last_role == Some(json!("tool")) {
            finished["outcome"] =
                json!({"type": "interrupt", "interrupts": [{"id": "i-1", "reason": "approval"}]});
        }
        sse(&[
            with("RUN_STARTED"),
            json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": format!("a-{}", input["runId"].as_str().unwrap()), "delta": "ok"}),
            finished,
        ])
    });
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
    });
    let token = server.token("frank");
    let mut tab = server.ready_client("frank").await;
    let user = json!({"id": "u-1", "role": "user", "content": "what time is it?"});
    let first = json!({"threadId": "t", "messages": [user], "forwardedProps": {"mode": "fast"}});
    assert_eq!(post_ag_ui(&server, Some(&token), first.to_string()).await.0, 200);
    let call = json!({"id": "a-1", "role": "assistant", "toolCalls": [{"id": "call-1", "type": "function",
        "function": {"name": "get_time", "arguments": "{}"}}]});
    let result = json!({"id": "tool-1", "role": "tool", "toolCallId": "call-1", "content": "14:05"});
    let second = json!({"threadId": "t", "messages": [user, call, result]});
    assert_eq!(post_ag_ui(&server, Some(&token), second.to_string()).await.0, 200);
    // The same input again has nothing new.
    let (status, body) = post_ag_ui(&server, Some(&token), second.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["field"], "messages");
    // An interrupt's answer needs no new message; it must name an interrupt the thread has.
    let stray = json!({"threadId": "t", "messages": [user, call, result],
        "resume": [{"interruptId": "i-404", "status": "resolved", "payload": true}]});
    let (status, body) = post_ag_ui(&server, Some(&token), stray.to_string()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["field"], "resume[0].interruptId");
    let resume = json!({"threadId": "t", "messages": [user, call, result],
        "resume": [{"interruptId": "i-1", "status": "resolved", "payload": {"approved": true}}]});
    assert_eq!(post_ag_ui(&server, Some(&token), resume.to_string()).await.0, 200);

    let sent = agent.requests();
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0]["forwardedProps"]["mode"], "fast");
    assert_eq!(sent[0]["forwardedProps"]["agentwire"]["user_id"], "frank");
    assert_eq!(sent[0]["messages"], json!([user]), "the client's id is the stored message's");
    let last = sent[1]["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last, result, "the tool result is the thread's, once");
    assert!(!sent[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == &json!(user) && m != &sent[1]["messages"][0]));
    assert_eq!(sent[2]["resume"][0]["interruptId"], "i-1");
    assert_eq!(sent[2]["resume"][0]["payload"], json!({"approved": true}));
    assert_eq!(sent[2]["forwardedProps"]["command"]["resume"], json!({"approved": true}));

    // The tabs saw the user's message and the interrupt's answer; an AG-UI client's tool result
    // is not echoed (docs/ag-ui.md): the run that goes on from it is what they see.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let echo = tab.recv_where(|f| f["type"] == "user_message").await;
        seen.push((echo["payload"]["message_id"].clone(), echo["payload"]["interrupt_id"].clone()));
    }
    assert_eq!(seen[0], (json!("u-1"), Value::Null));
    assert_eq!(seen[1].1, json!("i-1"), "the answer to the interrupt: {seen:?}");
}

#[actix_web::test]
async fn the_users_limits_apply() {
    let server = TestServer::with(|c| {
        c.agent.step_delay_ms = 300;
        c.agent.max_runs_per_user = NonZero::new(1).unwrap();
    });
    let token = server.token("erin");
    let mut tab = server.ready_client("erin").await;
    // The first run holds the user's one run slot while its response streams.
    let client = awc::Client::builder().timeout(WAIT).finish();
    let streaming = client
        .post(server.http("/ag-ui"))
        .bearer_auth(&token)
        .send_body(input("t", "first"))
        .await
        .expect("HTTP answer");
    assert_eq!(streaming.status().as_u16(), 200);
    tab.recv_where(|f| f["type"] == "agent_started").await;
    let (status, body) = post_ag_ui(&server, Some(&token), input("t", "second")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "rate_limited");
    drop(streaming);
}

/// What a following AG-UI client has not taken is bounded in bytes (`limits.max_outbound_bytes`),
/// not only in steps: a client that does not read while an agent streams 150 events of 100 KB
/// (far fewer steps than the channel holds) stops following, and its response ends without
/// `RUN_FINISHED`, while the run goes on to its end for the user's tabs.
#[actix_web::test]
async fn a_client_that_does_not_read_stops_following_past_its_byte_budget() {
    let agent = FakeAgent::start(|input| {
        let text = "x".repeat(100_000);
        let mut events = vec![run_event(input, "RUN_STARTED")];
        events
            .extend((0..150).map(|_| json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": "a", "delta": text})));
        events.push(run_event(input, "RUN_FINISHED"));
        sse(&events)
    });
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
        c.limits.max_outbound_bytes = NonZero::new(4 << 20).unwrap();
    });
    // 15 MB in all: more than the client's 4 MiB and what the kernel holds for a socket that
    // is not read; the tab reads as it comes.
    let token = server.token("gina");
    let mut tab = server.ready_client("gina").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let body = input("t", "stream a lot");
    let request = format!(
        "POST /ag-ui HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let end = tab.recv_where(|f| f["type"] == "agent_completed").await;
    assert_eq!(end["payload"]["status"], "ok", "{end}");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.expect("the response ends").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..200.min(answer.len())]);
    assert!(
        answer.contains("RUN_STARTED") && !answer.contains("RUN_FINISHED"),
        "the client followed to the end"
    );
}
