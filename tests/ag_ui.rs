//! docs/agents.md end to end against a scripted AG-UI agent (a real HTTP server): the request agentwire
//! sends, the mapping table with its pass-through, every row of the failure table, cancel, the
//! concurrency cap, and `kind = "none"`. What is asserted is what a WebSocket client sees.

mod common;

use std::num::NonZero;
use std::time::Duration;

use agentwire::config::AgentKind;
use common::fake_agent::{pieces, sse, FakeAgent, Reply, Tail};
use common::*;
use serde_json::{json, Value};

fn user_of(input: &Value) -> &str {
    input["forwardedProps"]["agentwire"]["user_id"].as_str().unwrap_or_default()
}

fn started(input: &Value) -> Value {
    json!({"type": "RUN_STARTED", "threadId": input["threadId"], "runId": input["runId"]})
}

fn finished(input: &Value) -> Value {
    json!({"type": "RUN_FINISHED", "threadId": input["threadId"], "runId": input["runId"]})
}

/// A server in front of `agent`, with short timeouts so the timeout rows end quickly.
fn server_for(agent: &FakeAgent, adjust: impl FnOnce(&mut agentwire::config::Config)) -> TestServer {
    let url = agent.url.clone();
    TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
        c.agent.name = "scripted".into();
        c.agent.idle_timeout_secs = NonZero::new(1).unwrap();
        c.agent.headers.insert("authorization".into(), "Bearer agent-key".into());
        adjust(c);
    })
}

/// The events of one run as the client sees them, after its ack.
async fn run_of(client: &mut Client, thread: &str, content: &str) -> (Value, Vec<Value>) {
    let ack = client.say(thread, content, None).await;
    let run_id = ack["run_id"].as_str().expect("ack has a run_id").to_owned();
    let events = client.events_until_run_ends(&run_id).await;
    let of_run = events.into_iter().filter(|e| e["run_id"] == run_id).collect();
    (ack, of_run)
}

/// A turn of a small calculator agent: a tool call, its result, then streamed text that names
/// how many messages of the thread it was sent (so the test sees the history arrive).
fn calculator_turn(input: &Value) -> Reply {
    let count = input["messages"].as_array().map_or(0, Vec::len);
    let text = format!("I was sent {count} messages.");
    let (first, second) = text.split_at(6);
    let mut snapshot = input["messages"].as_array().cloned().unwrap_or_default();
    snapshot.push(json!({"id": "a1", "role": "assistant", "toolCalls": [{"id": "call_1", "type": "function",
        "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}));
    snapshot.push(json!({"id": "tr1", "role": "tool", "content": "5", "toolCallId": "call_1"}));
    sse(&[
        started(input),
        json!({"type": "STEP_STARTED", "stepName": "think"}),
        json!({"type": "TOOL_CALL_START", "toolCallId": "call_1", "toolCallName": "add", "parentMessageId": "a1"}),
        json!({"type": "TOOL_CALL_ARGS", "toolCallId": "call_1", "delta": "{\"a\": 2, "}),
        json!({"type": "TOOL_CALL_ARGS", "toolCallId": "call_1", "delta": "\"b\": 3}"}),
        json!({"type": "TOOL_CALL_END", "toolCallId": "call_1"}),
        json!({"type": "TOOL_CALL_RESULT", "messageId": "tr1", "toolCallId": "call_1", "content": "5", "role": "tool"}),
        json!({"type": "STATE_SNAPSHOT", "snapshot": {"turns": count}}),
        // Not for tabs by default (`agent.forward_events`): the whole thread, the framework's own.
        json!({"type": "RAW", "event": {"thread": "x".repeat(100)}}),
        // The thread as the agent knows it now (docs/agents.md, v2: it becomes the thread).
        json!({"type": "MESSAGES_SNAPSHOT", "messages": snapshot}),
        json!({"type": "TEXT_MESSAGE_START", "messageId": "a2", "role": "assistant"}),
        json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a2", "delta": first}),
        json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a2", "delta": second}),
        json!({"type": "TEXT_MESSAGE_END", "messageId": "a2"}),
        json!({"type": "STEP_FINISHED", "stepName": "think"}),
        finished(input),
    ])
}

#[actix_web::test]
async fn a_conversation_maps_every_event_and_sends_the_thread_history() {
    let agent = FakeAgent::start(calculator_turn);
    let server = server_for(&agent, |_| {});
    let mut tab = server.ready_client("alice").await;

    let (ack, events) = run_of(&mut tab, "t1", "what is 2 + 3?").await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "agent_started",
            "agent_event",
            "tool_executing",
            "tool_completed",
            "agent_event",
            "agent_message_chunk",
            "agent_message_chunk",
            "agent_event",
            "agent_completed"
        ]
    );
    assert_eq!(events[0]["payload"], json!({"agent": "scripted", "message_id": ack["message_id"]}));
    assert_eq!(events[1]["payload"]["ag_ui"], json!({"type": "STEP_STARTED", "stepName": "think"}));
    assert_eq!(
        events[2]["payload"],
        json!({"tool_call_id": "call_1", "tool": "add", "args": {"a": 2, "b": 3}})
    );
    assert_eq!(events[3]["payload"]["result"], "5");
    assert_eq!(events[3]["payload"]["ok"], true);
    assert_eq!(events[4]["payload"]["ag_ui"]["type"], "STATE_SNAPSHOT");
    assert_eq!(events[8]["payload"]["status"], "ok");
    assert_eq!(events[8]["payload"]["response"]["content"], "I was sent 1 messages.");
    assert_contiguous(&events, ack["seq"].as_u64().unwrap() + 1);

    // The request: RunAgentInput with the user's identity, the configured headers' effect, and
    // the thread's conversation so far.
    assert_eq!(
        agent.headers()[0],
        json!({"authorization": "Bearer agent-key", "accept": "text/event-stream", "content-type": "application/json"})
    );
    let first = &agent.requests()[0];
    assert_eq!(first["threadId"], "t1");
    assert_eq!(first["runId"], ack["run_id"]);
    assert_eq!(first["state"], json!({}));
    assert_eq!(first["tools"], json!([]));
    assert_eq!(
        first["forwardedProps"]["agentwire"],
        json!({"user_id": "alice", "message_id": ack["message_id"], "client_msg_id": null})
    );
    assert_eq!(
        first["messages"],
        json!([{"id": ack["message_id"], "role": "user", "content": "what is 2 + 3?"}])
    );

    // The second message of the thread is sent with the first turn and the state it left.
    let (ack2, events) = run_of(&mut tab, "t1", "and again?").await;
    assert_eq!(events.last().unwrap()["payload"]["response"]["content"], "I was sent 5 messages.");
    let second = &agent.requests()[1];
    assert_eq!(second["state"], json!({"turns": 1}));
    let roles: Vec<&str> =
        second["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant", "user"]);
    let messages = &second["messages"];
    assert_eq!(
        messages[1]["toolCalls"][0]["function"],
        json!({"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"})
    );
    assert_eq!(messages[2], json!({"id": "tr1", "role": "tool", "content": "5", "toolCallId": "call_1"}));
    assert_eq!(messages[3]["content"], "I was sent 1 messages.");
    assert_eq!(messages[4]["id"], ack2["message_id"]);

    // Another thread starts with its own conversation.
    run_of(&mut tab, "t2", "new topic").await;
    assert_eq!(agent.requests()[2]["messages"].as_array().unwrap().len(), 1);

    assert_eq!(server.metric("agentwire_agent_runs_total{code=\"\",outcome=\"ok\"}"), 3.0);
    assert_eq!(server.metric("agentwire_agent_first_event_seconds_count"), 3.0);
}

/// Every failure row of docs/agents.md ("When the agent misbehaves"), each for its own user of one server, all at once: each run
/// ends with exactly one `agent_error` of its code, and a well-behaved user alongside is not
/// touched.
#[actix_web::test]
async fn every_failure_row_ends_its_run_with_its_code_and_nothing_after() {
    let agent = FakeAgent::start(|input| {
        let events = |list: &[Value]| pieces(list);
        let body = |pieces: Vec<String>, tail: Tail| Reply::Body {
            content_type: "text/event-stream",
            pieces,
            gap: Duration::ZERO,
            tail,
        };
        match user_of(input) {
            "http500" => Reply::Status(500),
            "json" => Reply::Body {
                content_type: "application/json",
                pieces: vec!["{}".into()],
                gap: Duration::ZERO,
                tail: Tail::End,
            },
            "garbage" => {
                body(vec![events(&[started(input)]).concat(), "data: {not json\n\n".into()], Tail::End)
            }
            "no-start" => sse(&[json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "hi"})]),
            "cut-short" => sse(&[
                started(input),
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "hi"}),
            ]),
            "huge" => sse(&[
                started(input),
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "x".repeat(20_000)}),
            ]),
            "endless-event" => body(
                events(&[started(input)]),
                Tail::Repeat(Duration::from_millis(5), format!("data: {}", "y".repeat(4000))),
            ),
            "idle" => body(events(&[started(input)]), Tail::Quiet),
            "silent" => Reply::Silent,
            "overdue" => body(
                events(&[started(input)]),
                Tail::Repeat(
                    Duration::from_millis(200),
                    format!("data: {}\n\n", json!({"type": "STEP_STARTED", "stepName": "again"})),
                ),
            ),
            "run-error" => {
                sse(&[started(input), json!({"type": "RUN_ERROR", "message": "model overloaded"})])
            }
            _ => sse(&[
                started(input),
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "fine"}),
                finished(input),
            ]),
        }
    });
    let server = server_for(&agent, |c| {
        c.agent.run_timeout_secs = NonZero::new(2).unwrap();
        c.agent.max_event_bytes = NonZero::new(8192).unwrap();
    });
    let rows = [
        ("http500", "agent_http_error", "500"),
        ("json", "agent_protocol", "text/event-stream"),
        ("garbage", "agent_protocol", "not JSON"),
        ("no-start", "agent_protocol", "RUN_STARTED"),
        ("cut-short", "agent_protocol", "without RUN_FINISHED"),
        ("huge", "agent_protocol", "max_event_bytes"),
        ("endless-event", "agent_protocol", "max_event_bytes"),
        ("idle", "agent_timeout", "no event"),
        ("silent", "agent_timeout", "did not answer"),
        ("overdue", "agent_timeout", "did not finish"),
        ("run-error", "agent_error", "model overloaded"),
    ];
    let mut tabs = Vec::new();
    for (user, _, _) in rows {
        let mut tab = server.ready_client(user).await;
        let ack = tab.say("t", "hello", None).await;
        tabs.push((tab, ack["run_id"].as_str().unwrap().to_owned()));
    }
    let mut bystander = server.ready_client("bystander").await;
    let (_, calm) = run_of(&mut bystander, "t", "hi").await;
    assert_eq!(calm.last().unwrap()["payload"]["response"]["content"], "fine");

    for ((user, code, says), (tab, run_id)) in rows.iter().zip(tabs.iter_mut()) {
        let events = tab.events_until_run_ends(run_id).await;
        let run: Vec<&Value> = events.iter().filter(|e| e["run_id"] == **run_id).collect();
        assert_eq!(run[0]["type"], "agent_started", "{user}: {run:?}");
        let end = run.last().unwrap();
        assert_eq!(end["type"], "agent_error", "{user}: {end}");
        assert_eq!(end["payload"]["code"], *code, "{user}: {end}");
        let message = end["payload"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{user}: {message:?} does not say {says:?}");
        assert_eq!(run.iter().filter(|e| is_terminal(e)).count(), 1, "{user}");
        // Nothing of the run after its end: the next frame is the answer to this ping.
        let pong = tab.ping(json!(user)).await;
        assert_eq!((&pong["type"], &pong["id"]), (&json!("pong"), &json!(user)), "{user}: {pong}");
    }
    // The bystander's session was not touched by any of it.
    let (_, calm) = run_of(&mut bystander, "t", "still there?").await;
    assert_eq!(calm.last().unwrap()["type"], "agent_completed");
    assert_eq!(server.metric("agentwire_agent_runs_total{code=\"agent_protocol\",outcome=\"error\"}"), 6.0);
    assert_eq!(server.metric("agentwire_agent_runs_total{code=\"agent_timeout\",outcome=\"error\"}"), 3.0);
}

#[actix_web::test]
async fn an_agent_that_cannot_be_reached_is_agent_unavailable() {
    // A port with nothing listening: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = format!("http://127.0.0.1:{port}/");
    });
    let mut tab = server.ready_client("alice").await;
    let (_, events) = run_of(&mut tab, "t", "anyone there?").await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["payload"]["agent"], "ag-ui");
    assert_eq!(events[1]["payload"]["code"], "agent_unavailable");
}

#[actix_web::test]
async fn cancel_closes_the_upstream_request_and_the_cap_refuses_with_agent_busy() {
    let agent = FakeAgent::start(|input| {
        if user_of(input) == "waiter" {
            let opening = [
                started(input),
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "Let me"}),
            ];
            return Reply::Body {
                content_type: "text/event-stream",
                pieces: pieces(&opening),
                gap: Duration::ZERO,
                tail: Tail::Hang,
            };
        }
        sse(&[started(input), finished(input)])
    });
    let server = server_for(&agent, |c| {
        c.agent.max_concurrent_runs = NonZero::new(1).unwrap();
        c.agent.idle_timeout_secs = NonZero::new(30).unwrap();
    });
    let mut waiter = server.ready_client("waiter").await;
    let mut other_tab = server.ready_client("waiter").await;
    let ack = waiter.say("t", "take your time", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    waiter.recv_where(|f| f["type"] == "agent_message_chunk").await;

    // The one run slot is taken: another user's message is refused, not queued.
    let mut other = server.ready_client("other").await;
    other.send(json!({"type": "user_message", "thread_id": "t", "content": "me too"})).await;
    let refused = other.recv().await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "agent_busy");
    assert_eq!(refused["ref"], "user_message");
    assert_eq!(server.metric("agentwire_agent_runs_total{code=\"agent_busy\",outcome=\"refused\"}"), 1.0);

    waiter.send(json!({"type": "cancel_run", "run_id": run_id})).await;
    assert_eq!(agent.next_closed().await, run_id);
    for tab in [&mut waiter, &mut other_tab] {
        let end = tab.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
        assert_eq!(end["type"], "agent_completed");
        assert_eq!(end["payload"]["status"], "cancelled");
        assert_eq!(end["payload"]["response"]["content"], "Let me");
    }
    // The slot is free again.
    let (_, events) = run_of(&mut other, "t", "now?").await;
    assert_eq!(events.last().unwrap()["payload"]["status"], "ok");
}

#[actix_web::test]
async fn kind_none_acks_and_echoes_and_starts_no_run() {
    let server = TestServer::with(|c| c.agent.kind = AgentKind::None);
    let mut tab = server.ready_client("alice").await;
    let ack = tab.say("t", "for the backend", Some("c1")).await;
    assert_eq!(ack["client_msg_id"], "c1");
    // The message made thread t (announced first), then its echo.
    let made = tab.recv().await;
    assert_eq!(made["type"], "thread_updated", "{made}");
    assert_eq!(made["payload"]["title"], "for the backend");
    let echo = tab.recv().await;
    assert_eq!(echo["type"], "user_message", "{echo}");
    assert_eq!(echo["payload"]["content"], "for the backend");
    assert_eq!(echo["seq"], ack["seq"]);
    assert_eq!(tab.ping(json!(1)).await["type"], "pong", "no run events before the pong");
    // The backend publishes the run itself, and an AG-UI event can be passed through too.
    let event = json!({"type": "agent_event", "thread_id": "t", "run_id": "r1",
        "payload": {"ag_ui": {"type": "CUSTOM", "name": "x", "value": 1}}});
    let (status, _) = publish(&server, "alice", vec![event]).await;
    assert_eq!(status, 200);
    let passed = tab.recv_where(|f| f["type"] == "agent_event").await;
    assert_eq!(passed["payload"]["ag_ui"]["name"], "x");
}

#[actix_web::test]
async fn ag_ui_needs_a_url_and_valid_headers() {
    let mut config = test_config();
    config.agent.kind = AgentKind::AgUi;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("agent.url"), "{error}");
    config.agent.url = "http://127.0.0.1:9000/".into();
    config.agent.headers.insert("bad header".into(), "x".into());
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("agent.headers") && error.contains("bad header"), "{error}");
}

/// An agent that sends only SSE keep-alives for longer than `agent.idle_timeout_secs` (a tool
/// running for a while) is not timed out; `agent.forward_events` decides which unmapped events
/// reach tabs (docs/agents.md, v2).
#[actix_web::test]
async fn keep_alives_hold_off_the_idle_timeout_and_forward_events_picks_what_tabs_get() {
    let agent = FakeAgent::start(|input| {
        let mut pieces = pieces(&[started(input)]);
        // 1.5 s of keep-alives, idle_timeout_secs being 1.
        pieces.extend((0..15).map(|_| ": keep-alive\n\n".to_owned()));
        pieces.extend(super_pieces(input));
        Reply::Body {
            content_type: "text/event-stream",
            pieces,
            gap: Duration::from_millis(100),
            tail: Tail::End,
        }
    });
    fn super_pieces(input: &Value) -> Vec<String> {
        pieces(&[
            json!({"type": "RAW", "event": {"n": 1}}),
            json!({"type": "CUSTOM", "name": "progress", "value": 1}),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "done"}),
            finished(input),
        ])
    }
    let server = server_for(&agent, |c| c.agent.forward_events = vec!["RAW".into()]);
    let mut tab = server.ready_client("kai").await;
    let (_, events) = run_of(&mut tab, "t", "take your time").await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["agent_started", "agent_event", "agent_message_chunk", "agent_completed"],
        "{events:?}"
    );
    assert_eq!(events[1]["payload"]["ag_ui"]["type"], "RAW", "only what forward_events names");
    assert_eq!(events[3]["payload"]["status"], "ok");
}

/// `RUN_FINISHED`'s `result` and `usage` reach the tabs on `agent_completed` (the tokens are
/// counted in `agentwire_agent_tokens_total`); `RUN_ERROR`'s own `code` is `agent_code` beside
/// agentwire's `agent_error` (docs/agents.md, v2).
#[actix_web::test]
async fn a_runs_result_usage_and_the_agents_own_error_code_are_kept() {
    let agent = FakeAgent::start(|input| match user_of(input) {
        "failing" => sse(&[
            started(input),
            json!({"type": "RUN_ERROR", "message": "rate limited upstream", "code": "rate_limit"}),
        ]),
        _ => sse(&[
            started(input),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "42"}),
            json!({"type": "RUN_FINISHED", "threadId": input["threadId"], "runId": input["runId"],
                "result": {"answer": 42}, "usage": {"input_tokens": 120, "output_tokens": 7}}),
        ]),
    });
    let server = server_for(&agent, |_| {});
    let mut tab = server.ready_client("rita").await;
    let (_, events) = run_of(&mut tab, "t", "the answer?").await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "agent_completed", "{end}");
    assert_eq!(end["payload"]["result"], json!({"answer": 42}));
    assert_eq!(end["payload"]["usage"], json!({"input_tokens": 120, "output_tokens": 7}));
    assert_eq!(end["payload"]["response"]["content"], "42");
    assert_eq!(server.metric("agentwire_agent_tokens_total{kind=\"input\"}"), 120.0);
    assert_eq!(server.metric("agentwire_agent_tokens_total{kind=\"output\"}"), 7.0);
    let mut other = server.ready_client("failing").await;
    let (_, events) = run_of(&mut other, "t", "the answer?").await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "agent_error", "{end}");
    assert_eq!(
        (end["payload"]["code"].as_str(), end["payload"]["agent_code"].as_str()),
        (Some("agent_error"), Some("rate_limit"))
    );
}

/// A WebSocket `user_message`'s `tools`, `context` and `state` reach the agent in its
/// `RunAgentInput` as given (the state instead of the thread's); `tools` that are not an array
/// of named objects get `bad_message` and start nothing (docs/agents.md, v2).
#[actix_web::test]
async fn a_messages_tools_context_and_state_reach_the_agent() {
    let agent = FakeAgent::start(|input| {
        sse(&[
            started(input),
            json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "a", "delta": "ok"}),
            finished(input),
        ])
    });
    let server = server_for(&agent, |_| {});
    let mut tab = server.ready_client("tess").await;
    let tools = json!([{"name": "local_time", "description": "the user's local time", "parameters": {"type": "object"}}]);
    let context = json!([{"description": "the page", "value": "settings"}]);
    tab.send(json!({"type": "user_message", "thread_id": "t", "content": "what time is it?",
        "tools": tools, "context": context, "state": {"theme": "dark"}}))
        .await;
    let ack = tab.recv_where(|f| f["type"] == "ack").await;
    tab.events_until_run_ends(ack["run_id"].as_str().unwrap()).await;
    let sent = agent.requests.lock().unwrap().last().cloned().expect("a request");
    assert_eq!(sent["body"]["tools"], tools);
    assert_eq!(sent["body"]["context"], context);
    assert_eq!(sent["body"]["state"], json!({"theme": "dark"}));
    // Without them: empty lists, and the thread's state.
    let (_, _) = run_of(&mut tab, "t", "and now?").await;
    let sent = agent.requests.lock().unwrap().last().cloned().expect("a request");
    assert_eq!((sent["body"]["tools"].clone(), sent["body"]["context"].clone()), (json!([]), json!([])));
    tab.send(json!({"type": "user_message", "thread_id": "t", "content": "x", "tools": [{"description": "no name"}]}))
        .await;
    let refused = tab.recv_where(|f| f["type"] == "error").await;
    assert_eq!(refused["code"], "bad_message", "{refused}");
}
