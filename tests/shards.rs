//! The registry across cores (issue 14): with several registry shards, a user's tabs that
//! authenticate with an `auth` frame on a shard other than their user's are moved there, and
//! then behave exactly like tabs that came with the token in the upgrade: one stream, in order,
//! to every tab of the user and to no one else; cancel, the connections API and closing all
//! reach the right shard; nothing is left behind.

mod common;

use common::*;
use serde_json::json;

const USERS: usize = 12;

#[actix_web::test]
async fn users_spread_over_shards_each_see_only_their_own_stream() {
    let server = TestServer::with(|c| {
        c.server.registry_shards = 4;
        c.agent.step_delay_ms = 0;
    });
    let users: Vec<String> = (0..USERS).map(|i| format!("shard-user-{i}")).collect();
    // Each user: one tab with the token in the upgrade, two with an `auth` frame (registered on
    // a shard chosen by their connection id, most of them not their user's).
    let mut tabs = Vec::new();
    for user in &users {
        tabs.push((user.clone(), server.ready_client(user).await));
        for _ in 0..2 {
            let mut tab = Client::connect(&server.ws_url()).await.expect("upgrade");
            tab.expect_state("accepted").await;
            tab.send(json!({"type": "auth", "token": server.token(user)})).await;
            let authenticated = tab.expect_state("authenticated").await;
            assert_eq!(authenticated["user_id"], user.as_str());
            tab.expect_state("services_ready").await;
            tab.expect_state("processing_ready").await;
            tabs.push((user.clone(), tab));
        }
    }
    assert_eq!(server.metric("agentwire_connections{state=\"processing_ready\"}"), (USERS * 3) as f64);

    for (round, user) in users.iter().enumerate() {
        let events = (0..3).map(|i| thinking(&format!("{user} {round}.{i}"))).collect();
        let (status, body) = publish(&server, user, events).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["sessions"], 3, "{body}");
    }
    for (user, tab) in &mut tabs {
        let events = tab.stream_events(3).await;
        assert_contiguous(&events, 1);
        for event in &events {
            let text = event["payload"]["text"].as_str().unwrap();
            assert!(text.starts_with(&format!("{user} ")), "{user}'s tab got {event}");
        }
        // Nothing of anyone else follows: the next frame is the answer to this ping.
        assert_eq!(tab.ping(json!(user.clone())).await["type"], "pong");
    }

    // A moved tab's requests reach its user's shard: a run started from it, seen by the others.
    let (user, mut first) = tabs.remove(1);
    let ack = first.say("t1", "hello", Some("c1")).await;
    let run_id = ack["run_id"].as_str().expect("a run").to_owned();
    let run = first.events_until_run_ends(&run_id).await;
    assert_eq!(run.last().unwrap()["type"], "agent_completed");
    let (status, listed) =
        http_get(&server.http(&format!("/api/v1/users/{user}/connections")), Some(common::API_KEY)).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["connections"].as_array().unwrap().len(), 3, "{listed}");

    tabs.push((user, first));
    futures_util::future::join_all(tabs.into_iter().map(|(_, tab)| tab.close())).await;
    server
        .eventually("every connection closed and forgotten", |s| {
            ["accepted", "authenticated", "services_ready", "processing_ready", "closing"]
                .iter()
                .all(|state| s.metric(&format!("agentwire_connections{{state=\"{state}\"}}")) == 0.0)
        })
        .await;
}
