//! agentwire in front of a real AG-UI framework: the example agent of `examples/ag-ui-agent`
//! (Pydantic AI's AG-UI adapter) as its own process, and a conversation through agentwire: a
//! tool call, streamed text, a second message the agent answers from the thread's history, and a
//! cancel. `.ci/test` installs the agent's packages into `examples/ag-ui-agent/.venv`.

mod common;

use agentwire::config::AgentKind;
use common::python_agent::PythonAgent;
use common::*;
use serde_json::{json, Value};

fn of_run(events: Vec<Value>, run_id: &str) -> Vec<Value> {
    events.into_iter().filter(|e| e["run_id"] == run_id).collect()
}

#[actix_web::test]
async fn a_conversation_with_a_pydantic_ai_agent() {
    let agent = PythonAgent::start("ag-ui-agent", &[]);
    let url = agent.url.clone();
    let server = TestServer::with(move |c| {
        c.agent.kind = AgentKind::AgUi;
        c.agent.url = url;
    });
    let mut tab = server.ready_client("alice").await;
    let mut second_tab = server.ready_client("alice").await;

    // A tool call with its arguments and result, then streamed text.
    let ack = tab.say("t1", "what is 12 * (3 + 4)?", Some("c1")).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = of_run(tab.events_until_run_ends(&run_id).await, &run_id);
    assert_eq!(events, of_run(second_tab.events_until_run_ends(&run_id).await, &run_id));
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..3], ["agent_started", "tool_executing", "tool_completed"], "{kinds:?}");
    assert_eq!(events[1]["payload"]["tool"], "calculate");
    assert_eq!(events[1]["payload"]["args"], json!({"expression": "12 * (3 + 4)"}));
    assert_eq!(events[2]["payload"]["result"], "84");
    assert!(kinds[3..kinds.len() - 1].iter().all(|k| *k == "agent_message_chunk"), "{kinds:?}");
    assert!(kinds.len() > 5, "the text is streamed in chunks: {kinds:?}");
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "agent_completed");
    let first_answer = completed["payload"]["response"]["content"].as_str().unwrap();
    assert_eq!(first_answer, "The calculator says 84. This is the first message of the thread.");
    assert_contiguous(&events, ack["seq"].as_u64().unwrap() + 1);

    // The second message: the agent answers from the history agentwire sent it.
    let ack = tab.say("t1", "thanks!", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let events = of_run(tab.events_until_run_ends(&run_id).await, &run_id);
    let answer = events.last().unwrap()["payload"]["response"]["content"].as_str().unwrap().to_owned();
    assert_eq!(
        answer,
        "You said: thanks!. This thread has 2 messages from you; the first was: what is 12 * (3 + 4)?"
    );

    // A cancel mid-stream: the run ends cancelled with what was streamed, and nothing after.
    let ack = tab.say("t1", "count slowly to ten", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    let chunk =
        tab.recv_where(|f| f["run_id"] == run_id.as_str() && f["type"] == "agent_message_chunk").await;
    tab.send(json!({"type": "cancel_run", "run_id": run_id})).await;
    let end = tab.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(end["type"], "agent_completed");
    assert_eq!(end["payload"]["status"], "cancelled");
    assert!(end["payload"]["response"]["content"]
        .as_str()
        .unwrap()
        .starts_with(chunk["payload"]["delta"].as_str().unwrap()));
    // The agent keeps serving: the next message of another thread runs to completion, and no
    // event of the cancelled run arrived in between.
    let ack = tab.say("t2", "hello", None).await;
    let next_run = ack["run_id"].as_str().unwrap().to_owned();
    let events = tab.events_until_run_ends(&next_run).await;
    let end_seq = end["seq"].as_u64().unwrap();
    let after_end: Vec<&Value> = events
        .iter()
        .filter(|e| e["run_id"] == run_id.as_str() && e["seq"].as_u64() > Some(end_seq))
        .collect();
    assert!(after_end.is_empty(), "{after_end:?}");
    assert_eq!(events.last().unwrap()["payload"]["status"], "ok");
    assert_eq!(server.metric("agentwire_agent_runs_total{code=\"\",outcome=\"cancelled\"}"), 1.0);
}
