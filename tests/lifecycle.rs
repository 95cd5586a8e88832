//! Section 3: the four `connection_state` frames, in order, for each way to authenticate; the
//! HTTP routes that observe connections.

mod common;

use std::num::NonZero;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[actix_web::test]
async fn states_in_order_with_authorization_header() {
    let server = TestServer::start();
    let mut client = Client::connect_bearer(&server.ws_url(), &server.token("alice")).await.unwrap();
    let ready = client.expect_setup("alice").await;
    assert_eq!(ready["last_seq"], 0);
    assert!(ready["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(ready.get("resume").is_none(), "no resume was asked for: {ready}");
}

#[actix_web::test]
async fn states_in_order_with_query_token() {
    let server = TestServer::start();
    let url = format!("{}?access_token={}", server.ws_url(), server.token("bob"));
    let mut client = Client::connect(&url).await.unwrap();
    client.expect_setup("bob").await;
}

#[actix_web::test]
async fn states_in_order_with_auth_frame() {
    let server = TestServer::start();
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    client.send(json!({"type": "auth", "token": server.token("carol")})).await;
    client.expect_setup("carol").await;
    let pong = client.ping(json!("p1")).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], "p1");
    assert!(pong["server_time"].as_u64().unwrap() > 1_600_000_000_000);
}

#[actix_web::test]
async fn auth_frame_sent_before_accepted_is_not_lost() {
    // The client does not wait for `accepted`: auth and two pings leave in one burst.
    let server = TestServer::start();
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    client.send(json!({"type": "auth", "token": server.token("dave")})).await;
    client.send(json!({"type": "ping", "id": 1})).await;
    client.send(json!({"type": "ping", "id": 2})).await;
    client.expect_setup("dave").await;
    assert_eq!(client.recv().await["id"], 1);
    assert_eq!(client.recv().await["id"], 2);
}

#[actix_web::test]
async fn selects_the_agentwire_subprotocol_when_offered() {
    let server = TestServer::start();
    let mut request = server.ws_url().into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "agentwire.v1".parse().unwrap());
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {}", server.token("erin")).parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "agentwire.v1");
    use futures_util::StreamExt;
    let first = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"accepted\""));
}

#[actix_web::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start();
    assert_eq!(http_get(&server.http("/healthz"), None).await, (200, json!({"status": "ok"})));
    assert_eq!(http_get(&server.http("/readyz"), None).await.0, 200);

    let client = server.ready_client("frank").await;
    let (status, text) = http_get(&server.http("/metrics"), None).await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    for sample in [
        "agentwire_connections{state=\"processing_ready\"} 1",
        "agentwire_connections_opened_total 1",
        "agentwire_state_transitions_total{from=\"services_ready\",to=\"processing_ready\"} 1",
    ] {
        assert!(text.contains(sample), "missing {sample} in\n{text}");
    }
    client.close().await;
    server
        .eventually("the gauge to return to 0", |s| {
            s.metric("agentwire_connections{state=\"processing_ready\"}") == 0.0
                && s.metric("agentwire_state_transitions_total{from=\"closing\",to=\"closed\"}") == 1.0
        })
        .await;
}

#[actix_web::test]
async fn connections_api_lists_a_users_sessions_and_needs_a_key() {
    let server = TestServer::start();
    let url = server.http("/api/v1/users/gina/connections");
    assert_eq!(http_get(&url, None).await.0, 401);
    assert_eq!(http_get(&url, Some("wrong-key-0123456789")).await.0, 401);
    assert_eq!(http_get(&url, Some(API_KEY)).await, (200, json!({"user_id": "gina", "connections": []})));

    let a = server.ready_client("gina").await;
    let b = server.ready_client("gina").await;
    let _other = server.ready_client("hank").await;
    let (status, body) = http_get(&url, Some(API_KEY)).await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connection_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{body}");
    assert!(listed.contains(&a.connection_id.as_str()) && listed.contains(&b.connection_id.as_str()));
    for connection in body["connections"].as_array().unwrap() {
        assert_eq!(connection["state"], "processing_ready");
        assert!(connection["connected_at"].as_u64().unwrap() > 1_600_000_000_000);
    }
    a.close().await;
    b.close().await;
    server
        .eventually("gina's connections to be gone", |s| {
            s.metric("agentwire_connections{state=\"processing_ready\"}") == 1.0
        })
        .await;
    assert_eq!(http_get(&url, Some(API_KEY)).await.1["connections"], json!([]));
}

#[actix_web::test]
async fn dev_token_route_mints_tokens_only_when_enabled() {
    let server = TestServer::start();
    let (status, body) = http_post(&server.http("/dev/token"), None, r#"{"sub":"ivy"}"#).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    assert!(body["expires_at"].as_u64().unwrap() > agentwire::protocol::now_ms());
    let mut client = Client::connect_bearer(&server.ws_url(), token).await.unwrap();
    client.expect_setup("ivy").await;
    assert_eq!(http_post(&server.http("/dev/token"), None, r#"{"sub":"no spaces"}"#).await.0, 400);

    let locked = TestServer::with(|c| c.auth.dev_tokens = false);
    assert_eq!(http_post(&locked.http("/dev/token"), None, r#"{"sub":"ivy"}"#).await.0, 404);
}

#[actix_web::test]
async fn too_many_sessions_for_one_user_closes_with_4004() {
    let server = TestServer::with(|c| c.limits.max_sessions_per_user = NonZero::new(2).unwrap());
    let _a = server.ready_client("jack").await;
    let _b = server.ready_client("jack").await;
    let mut third = Client::connect_bearer(&server.ws_url(), &server.token("jack")).await.unwrap();
    third.expect_state("accepted").await;
    assert_eq!(third.expect_close_code().await, 4004);
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"too_many_sessions\"}"), 1.0);
    // Another user is not affected by jack's cap.
    server.ready_client("kate").await;
}
