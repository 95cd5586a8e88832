//! agentwire in front of LangGraph, the most used agent framework: the example agent of
//! `examples/langgraph-agent` (`ag-ui-langgraph` with a `MemorySaver` checkpointer, a calculator
//! tool, `interrupt()`, and a scripted model that streams tool calls as OpenAI does) as its own
//! process. What docs/agents.md ("AG-UI 1.0 with real frameworks") promises it: turns whose
//! model input is exactly the conversation, with each tool result once (the thread is the
//! agent's `MESSAGES_SNAPSHOT`), a thread past 1 MB, an interrupt that ends a run `interrupted`
//! and is answered from another tab, and frontend tools from a tab and from `@ag-ui/client`. `.ci/test` installs the agent's packages into its `.venv`.

mod common;

use agentwire::config::AgentKind;
use common::python_agent::PythonAgent;
use common::*;
use serde_json::{json, Value};

fn of_run(events: Vec<Value>, run_id: &str) -> Vec<Value> {
    events.into_iter().filter(|e| e["run_id"] == run_id).collect()
}

fn langgraph_server(agent: &PythonAgent) -> TestServer {
    let url = agent.url.clone();
    TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
    })
}

/// One turn: the run's events as the tab saw them.
async fn turn(tab: &mut Client, thread: &str, content: &str) -> Vec<Value> {
    let ack = tab.say(thread, content, None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    of_run(tab.events_until_run_ends(&run_id).await, &run_id)
}

/// The model's inputs, one per call, as the agent logged them (`MODEL_INPUT_LOG`).
fn model_inputs(log: &std::path::Path) -> Vec<Vec<Value>> {
    let text = std::fs::read_to_string(log).expect("the model input log");
    text.lines().map(|line| serde_json::from_str(line).expect("a logged model input")).collect()
}

#[actix_web::test]
async fn three_turns_with_tool_calls_give_the_model_each_message_once() {
    let log = std::env::temp_dir().join(format!("agentwire-langgraph-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let agent = PythonAgent::start("langgraph-agent", &[("MODEL_INPUT_LOG", log.to_str().unwrap())]);
    let server = langgraph_server(&agent);
    let mut tab = server.ready_client("alice").await;

    for (question, result) in [("what is 12 * (3 + 4)?", "84"), ("and 2 + 3?", "5")] {
        let all = turn(&mut tab, "t1", question).await;
        // LangGraph's RAW and MESSAGES_SNAPSHOT are consumed, not forwarded to tabs (its steps
        // and state are, as `agent_event`s).
        let forwarded =
            |e: &&Value| matches!(e["payload"]["ag_ui"]["type"].as_str(), Some("RAW" | "MESSAGES_SNAPSHOT"));
        assert!(!all.iter().any(|e| forwarded(&e)), "{all:?}");
        let events: Vec<&Value> = all.iter().filter(|e| e["type"] != "agent_event").collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds[..3], ["agent_started", "tool_executing", "tool_completed"], "{kinds:?}");
        assert_eq!(events[1]["payload"]["tool"], "calculate");
        assert_eq!(events[2]["payload"]["result"], result);
        let end = events.last().unwrap();
        assert_eq!(
            (end["type"].as_str(), end["payload"]["status"].as_str()),
            (Some("agent_completed"), Some("ok"))
        );
    }
    let events = turn(&mut tab, "t1", "thanks").await;
    assert_eq!(events.last().unwrap()["payload"]["status"], "ok");

    // The third turn's model input: the whole conversation, in order, each tool result once.
    let inputs = model_inputs(&log);
    let last = inputs.last().expect("the model was called");
    let shape: Vec<(&str, &str)> = last
        .iter()
        .filter(|m| m["type"] != "system")
        .map(|m| (m["type"].as_str().unwrap(), m["content"].as_str().unwrap_or("")))
        .collect();
    let kinds: Vec<&str> = shape.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        kinds,
        ["human", "ai", "tool", "ai", "human", "ai", "tool", "ai", "human"],
        "the third turn's model input: {last:#?}"
    );
    let humans: Vec<&str> = shape.iter().filter(|(k, _)| *k == "human").map(|(_, c)| *c).collect();
    assert_eq!(humans, ["what is 12 * (3 + 4)?", "and 2 + 3?", "thanks"]);
    let tools: Vec<&str> = shape.iter().filter(|(k, _)| *k == "tool").map(|(_, c)| *c).collect();
    assert_eq!(tools, ["84", "5"]);

    // The thread as the threads API gives it: the agent's snapshot, the tool results once.
    let token = server.token("alice");
    let (status, page) = http_get(&server.http("/api/v1/threads/t1/messages?limit=100"), Some(&token)).await;
    assert_eq!(status, 200, "{page}");
    let roles: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter_map(|m| m["message"]["role"].as_str().or(m["role"].as_str()))
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == "tool").count(), 2, "{page}");
    let _ = std::fs::remove_file(&log);
}

#[actix_web::test]
async fn a_thread_past_one_megabyte_keeps_going() {
    let agent = PythonAgent::start("langgraph-agent", &[]);
    let server = langgraph_server(&agent);
    let mut tab = server.ready_client("bob").await;
    // Each "long" answer is about 200 KB; LangGraph's snapshots carry the whole thread.
    for n in 0..6 {
        let events = turn(&mut tab, "long", &format!("a long answer please ({n})")).await;
        let end = events.last().unwrap();
        assert_eq!(end["type"], "agent_completed", "turn {n}: {end}");
        assert_eq!(end["payload"]["status"], "ok");
    }
    let token = server.token("bob");
    let (status, thread) = http_get(&server.http("/api/v1/threads/long"), Some(&token)).await;
    assert_eq!(status, 200, "{thread}");
    assert_eq!(thread["message_count"], 12, "{thread}");
}

#[actix_web::test]
async fn an_interrupt_raised_in_one_tab_is_answered_from_another() {
    let agent = PythonAgent::start("langgraph-agent", &[]);
    let server = langgraph_server(&agent);
    let mut tab = server.ready_client("carol").await;
    let mut other_tab = server.ready_client("carol").await;
    let events = turn(&mut tab, "t", "please confirm the order").await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "agent_completed", "{end}");
    assert_eq!(end["payload"]["status"], "interrupted", "{end}");
    let interrupts = end["payload"]["interrupts"].as_array().expect("interrupts");
    assert_eq!(interrupts.len(), 1, "{end}");
    let interrupt_id = interrupts[0]["id"].as_str().expect("an interrupt id").to_owned();
    assert_eq!(interrupts[0]["value"]["options"], json!(["yes", "no"]), "{end}");
    let token = server.token("carol");
    let (status, thread) = http_get(&server.http("/api/v1/threads/t"), Some(&token)).await;
    assert_eq!((status, &thread["interrupted"]), (200, &json!(true)), "{thread}");

    // The other tab saw the same end; a plain message there waits for the answer.
    let seen = other_tab.recv_where(|f| f["type"] == "agent_completed").await;
    assert_eq!(seen["payload"]["interrupts"], end["payload"]["interrupts"]);
    other_tab.send(json!({"type": "user_message", "thread_id": "t", "content": "hello?"})).await;
    let refused = other_tab.recv_where(|f| f["type"] == "error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("thread_interrupted"), Some("user_message"))
    );

    // The answer, from the other tab: acked, and the run that continues the graph says it.
    other_tab
        .send(json!({"type": "resume_run", "thread_id": "t", "interrupt_id": interrupt_id, "value": "yes"}))
        .await;
    let ack = other_tab.recv_where(|f| f["type"] == "ack").await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = of_run(tab.events_until_run_ends(&run_id).await, &run_id);
    let end = events.last().unwrap();
    assert_eq!(end["payload"]["status"], "ok", "{end}");
    assert_eq!(end["payload"]["response"]["content"], "You said: yes.", "{end}");
    let (_, thread) = http_get(&server.http("/api/v1/threads/t"), Some(&token)).await;
    assert_eq!(thread["interrupted"], false, "{thread}");
}

/// A frontend tool over the WebSocket: declared in `tools`, its call reaches the tab as a
/// `tool_executing` with `client_tool: true`; the tab's `tool_result` starts the run that uses it.
#[actix_web::test]
async fn a_frontend_tool_round_trip_over_the_websocket() {
    let agent = PythonAgent::start("langgraph-agent", &[]);
    let server = langgraph_server(&agent);
    let mut tab = server.ready_client("dave").await;
    let tools = json!([{"name": "get_local_time", "description": "The user's local time",
        "parameters": {"type": "object", "properties": {}}}]);
    tab.send(json!({"type": "user_message", "thread_id": "t", "content": "what is my local time?", "tools": tools}))
        .await;
    let ack = tab.recv_where(|f| f["type"] == "ack").await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = of_run(tab.events_until_run_ends(&run_id).await, &run_id);
    let call = events.iter().find(|e| e["type"] == "tool_executing").expect("the tool call");
    assert_eq!(
        (call["payload"]["tool"].as_str(), &call["payload"]["client_tool"]),
        (Some("get_local_time"), &json!(true))
    );
    assert_eq!(events.last().unwrap()["payload"]["status"], "ok");

    let tool_call_id = call["payload"]["tool_call_id"].as_str().unwrap();
    tab.send(
        json!({"type": "tool_result", "thread_id": "t", "tool_call_id": tool_call_id, "content": "14:05"}),
    )
    .await;
    let echo = tab.recv_where(|f| f["type"] == "user_message").await;
    assert_eq!(
        (echo["payload"]["role"].as_str(), echo["payload"]["tool_call_id"].as_str()),
        (Some("tool"), Some(tool_call_id))
    );
    let ack = tab.recv_where(|f| f["type"] == "ack").await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = of_run(tab.events_until_run_ends(&run_id).await, &run_id);
    assert_eq!(events.last().unwrap()["payload"]["response"]["content"], "Your local time is 14:05.");
}

/// The same round trip from the AG-UI project's own client (`@ag-ui/client`'s `HttpAgent`, as
/// CopilotKit drives it): it declares the tool, sees the agent call it, and posts its history with
/// the tool message added; that message, new to the thread, starts the run that uses it.
#[actix_web::test]
async fn a_frontend_tool_round_trip_from_ag_ui_client() {
    let agent = PythonAgent::start("langgraph-agent", &[]);
    let server = langgraph_server(&agent);
    let mut tab = server.ready_client("erin").await;
    let output = node_client("frontend-tool", &server, &server.token("erin"), "t").await;
    let first: Vec<&str> = output["first"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(first.contains(&"TOOL_CALL_START") && first.last() == Some(&"RUN_FINISHED"), "{output}");
    assert_eq!(output["text"], "Your local time is 14:05.", "{output}");
    // The tab saw the user's message once, and no echo of the tool's result (docs/ag-ui.md):
    // the two runs, each to its end.
    let events = tab.stream_events(2).await;
    assert_eq!(
        (events[0]["type"].as_str(), events[1]["type"].as_str()),
        (Some("thread_updated"), Some("user_message"))
    );
    assert_eq!(events[1]["payload"]["message_id"], "u1");
    let mut ends = 0;
    while ends < 2 {
        let frame = tab.recv().await;
        assert_ne!(frame["type"], "user_message", "{frame}");
        ends += usize::from(is_terminal(&frame));
    }
}
