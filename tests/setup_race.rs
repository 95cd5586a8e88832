//! Section 3's reason to exist: frames sent before `processing_ready` are kept and processed in
//! order, the queue is bounded, and a failed setup fails alone.

mod common;

use common::*;
use serde_json::json;

#[actix_web::test]
async fn early_pings_are_answered_in_order_after_processing_ready() {
    let server = TestServer::with(|c| c.faults.setup_delay_ms = 300);
    let mut client = Client::connect_bearer(&server.ws_url(), &server.token("racer")).await.unwrap();
    for i in 0..10 {
        client.send(json!({"type": "ping", "id": i})).await;
    }
    client.expect_setup("racer").await;
    for i in 0..10 {
        let pong = client.recv().await;
        assert_eq!((pong["type"].as_str(), pong["id"].as_i64()), (Some("pong"), Some(i)), "{pong}");
    }
}

#[actix_web::test]
async fn early_frames_with_auth_frame_keep_their_order_including_errors() {
    let server = TestServer::with(|c| c.faults.setup_delay_ms = 200);
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    client.send(json!({"type": "auth", "token": server.token("queued")})).await;
    client.send(json!({"type": "ping", "id": "a"})).await;
    client.send_text("{not json".to_owned()).await;
    client.send(json!({"type": "teleport"})).await;
    client.send(json!({"type": "ping", "id": "b"})).await;
    client.expect_setup("queued").await;
    assert_eq!(client.recv().await["id"], "a");
    let bad = client.recv().await;
    assert_eq!((bad["type"].as_str(), bad["code"].as_str()), (Some("error"), Some("bad_message")));
    let unknown = client.recv().await;
    assert_eq!((unknown["code"].as_str(), unknown["ref"].as_str()), (Some("unknown_type"), Some("teleport")));
    assert_eq!(client.recv().await["id"], "b");
}

#[actix_web::test]
async fn frames_beyond_the_pending_queue_get_not_ready() {
    let server = TestServer::with(|c| {
        c.faults.setup_delay_ms = 300;
        c.limits.pending_messages = 4;
    });
    let mut client = Client::connect_bearer(&server.ws_url(), &server.token("eager")).await.unwrap();
    for i in 0..10 {
        client.send(json!({"type": "ping", "id": i})).await;
    }
    // The excess is refused at once, while the connection is still setting up...
    let mut not_ready = 0;
    let mut states = Vec::new();
    while states.last().map(String::as_str) != Some("processing_ready") {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("error") => {
                assert_eq!(
                    (frame["code"].as_str(), frame["ref"].as_str()),
                    (Some("not_ready"), Some("ping"))
                );
                not_ready += 1;
            }
            Some("connection_state") => states.push(frame["state"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(not_ready, 6);
    assert_eq!(states, ["accepted", "authenticated", "services_ready", "processing_ready"]);
    // ...and the four queued ones are answered, in order, after processing_ready.
    for i in 0..4 {
        assert_eq!(client.recv().await["id"], i);
    }
    assert_eq!(client.ping(json!("live")).await["id"], "live");
}

#[actix_web::test]
async fn failed_setup_fails_alone() {
    let server = TestServer::with(|c| {
        c.faults.fail_setup_user_prefix = "doomed-".into();
        c.faults.setup_delay_ms = 50;
    });
    let url = server.ws_url();
    let doomed = (0..5).map(|i| {
        let (url, token) = (url.clone(), server.token(&format!("doomed-{i}")));
        async move {
            let mut client = Client::connect_bearer(&url, &token).await.unwrap();
            client.send(json!({"type": "ping", "id": 1})).await;
            client.expect_state("accepted").await;
            client.expect_state("authenticated").await;
            let (close, frames) = client.expect_close().await;
            assert_eq!(frames.len(), 1, "{frames:?}");
            assert_eq!(
                (frames[0]["type"].as_str(), frames[0]["code"].as_str()),
                (Some("error"), Some("setup_failed"))
            );
            assert_eq!(u16::from(close.unwrap().code), 1011);
        }
    });
    let healthy = (0..20).map(|i| {
        let (url, token, user) = (url.clone(), server.token(&format!("fine-{i}")), format!("fine-{i}"));
        async move {
            let mut client = Client::connect_bearer(&url, &token).await.unwrap();
            client.expect_setup(&user).await;
            assert_eq!(client.ping(json!(i)).await["id"], i);
            client
        }
    });
    let (_, clients) =
        tokio::join!(futures_util::future::join_all(doomed), futures_util::future::join_all(healthy));
    assert_eq!(clients.len(), 20);
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"setup_failed\"}"), 5.0);
    assert_eq!(server.metric("agentwire_state_transitions_total{from=\"authenticated\",to=\"failed\"}"), 5.0);
    assert_eq!(server.metric("agentwire_connections{state=\"processing_ready\"}"), 20.0);
    server
        .eventually("failed connections to be closed", |s| {
            s.metric("agentwire_state_transitions_total{from=\"failed\",to=\"closed\"}") == 5.0
                && s.metric("agentwire_connections{state=\"failed\"}") == 0.0
        })
        .await;
}

#[actix_web::test]
async fn a_session_that_vanishes_mid_setup_leaves_nothing_behind() {
    let server = TestServer::with(|c| c.faults.setup_delay_ms = 300);
    for _ in 0..5 {
        let mut client = Client::connect_bearer(&server.ws_url(), &server.token("ghost")).await.unwrap();
        client.expect_state("accepted").await;
        client.expect_state("authenticated").await;
        drop(client); // gone without a close frame while the registry is still setting it up
    }
    server
        .eventually("vanished sessions to be unregistered", |s| {
            s.metric("agentwire_state_transitions_total{from=\"closing\",to=\"closed\"}") == 5.0
        })
        .await;
    // A later connection's delayed setup step fires after the ghosts' ones did: once it is
    // ready, the registry has found each ghost gone. No refused transition, nothing listed.
    let witness = server.ready_client("witness").await;
    assert_eq!(server.metric("agentwire_state_transitions_refused_total"), 0.0);
    let (_, body) = http_get(&server.http("/api/v1/users/ghost/connections"), Some(API_KEY)).await;
    assert_eq!(body["connections"], json!([]));
    for state in ["accepted", "authenticated", "services_ready", "closing", "failed"] {
        assert_eq!(server.metric(&format!("agentwire_connections{{state=\"{state}\"}}")), 0.0, "{state}");
    }
    assert_eq!(server.metric("agentwire_connections{state=\"processing_ready\"}"), 1.0);
    witness.close().await;
}
