//! The broker seam under the registry, rehearsed with `[faults]`: a broker that answers late
//! must neither reorder nor lose a user's events, nor block anyone; a broker that fails is an
//! error to whoever asked (a 503, `setup_failed`), never a silent loss, and touches no one else.

mod common;

use common::*;
use futures_util::future::join_all;
use serde_json::{json, Value};

/// Reads stream events (frames with a seq, acks aside) until both the run's end and the event
/// with text `last` have arrived; returns them in order.
async fn stream_until(client: &mut Client, last: &str) -> Vec<(u64, Value)> {
    let mut events = Vec::new();
    let (mut run_ended, mut last_seen) = (false, false);
    while !(run_ended && last_seen) {
        let frame = client.recv_where(|f| f.get("seq").is_some() && f["type"] != "ack").await;
        let seq = frame["seq"].as_u64().expect("seq is a number");
        run_ended |= frame["type"] == "agent_completed";
        last_seen |= frame["payload"]["text"] == last;
        events.push((seq, frame));
    }
    events
}

#[actix_web::test]
async fn a_slow_broker_neither_reorders_nor_loses_a_users_events() {
    let server = TestServer::with(|c| {
        c.faults.broker_delay_ms = 30;
        c.agent.step_delay_ms = 0;
    });
    let mut a = server.ready_client("slow-broker").await;
    let mut b = server.ready_client("slow-broker").await;
    // Publishes and a run interleave, every append answered 30 ms late.
    a.send(json!({"type": "user_message", "thread_id": "t", "content": "what is 6 * 7?"})).await;
    let batches = join_all((0..5).map(|batch| {
        let events = (0..10).map(|i| thinking(&format!("b{batch}-{i}"))).collect();
        publish(&server, "slow-broker", events)
    }))
    .await;
    assert!(batches.iter().all(|(status, _)| *status == 200), "{batches:?}");
    assert_eq!(publish(&server, "slow-broker", vec![thinking("end")]).await.0, 200);

    // Both tabs: the same events, seqs 1, 2, 3, ... without a gap or a repeat.
    let on_a = stream_until(&mut a, "end").await;
    let on_b = stream_until(&mut b, "end").await;
    let seqs: Vec<u64> = on_a.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(on_a, on_b);
    // 50 published events, the echo and the run's events, and the end marker.
    assert!(seqs.len() > 52, "{}", seqs.len());

    // A tab resuming from the middle gets the rest, complete, then live events.
    let url = format!("{}?last_seq=10", server.ws_url());
    let mut c = Client::connect_bearer(&url, &server.token("slow-broker")).await.unwrap();
    let ready = c.expect_setup("slow-broker").await;
    assert_eq!(ready["resume"]["complete"], true, "{ready}");
    let last = *seqs.last().unwrap();
    for seq in 11..=last {
        assert_eq!(c.recv().await["seq"], seq);
    }
    assert_eq!(publish(&server, "slow-broker", vec![thinking("live")]).await.0, 200);
    assert_eq!(c.recv().await["seq"], last + 1);
}

#[actix_web::test]
async fn a_failing_broker_is_an_error_to_the_caller_and_to_no_one_else() {
    let server = TestServer::with(|c| c.faults.broker_fail_user_prefix = "broken-".into());
    let mut fine = server.ready_client("fine").await;

    // A publish the broker refused published nothing: 503, and the caller knows it.
    let (status, body) = publish(&server, "broken-1", vec![thinking("lost?")]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("broker_unavailable")), "{body}");

    // A session whose stream cannot be reached fails its setup alone.
    let mut broken = Client::connect_bearer(&server.ws_url(), &server.token("broken-1")).await.unwrap();
    let (close, before) = broken.expect_close().await;
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1011), "{before:?}");
    assert_eq!(before.first().map(|f| f["state"].clone()), Some(json!("accepted")));
    let error = before.iter().find(|f| f["type"] == "error").expect("an error frame before the close");
    assert_eq!(error["code"], "setup_failed");

    // Everyone else goes on.
    assert_eq!(publish(&server, "fine", vec![thinking("still here")]).await.0, 200);
    assert_eq!(fine.recv().await["payload"]["text"], "still here");
}
