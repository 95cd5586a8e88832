//! Many sessions at once: 2,000 connections of 200 users all reach `processing_ready`, the
//! connections API lists exactly each user's, and closing them leaves the registry empty.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use futures_util::stream::{self, StreamExt};

const USERS: usize = 200;
const PER_USER: usize = 10;

#[actix_web::test]
async fn two_thousand_connections_of_two_hundred_users() {
    let server = TestServer::start();
    let url = server.ws_url();
    let tokens: Vec<(String, String)> =
        (0..USERS).map(|u| (format!("user-{u}"), server.token(&format!("user-{u}")))).collect();
    let attempts = (0..USERS * PER_USER).map(|i| {
        let (user, token) = tokens[i % USERS].clone();
        let url = url.clone();
        async move {
            let mut client = Client::connect_bearer(&url, &token).await.expect("upgrade");
            client.expect_setup(&user).await;
            (user, client)
        }
    });
    let clients: Vec<(String, Client)> = stream::iter(attempts).buffer_unordered(500).collect().await;
    assert_eq!(clients.len(), USERS * PER_USER);
    assert_eq!(server.metric("agentwire_connections{state=\"processing_ready\"}"), (USERS * PER_USER) as f64);
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"setup_failed\"}"), 0.0);

    let mut expected: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (user, client) in &clients {
        expected.entry(user.as_str()).or_default().insert(client.connection_id.as_str());
    }
    for (user, ids) in &expected {
        let (status, body) =
            http_get(&server.http(&format!("/api/v1/users/{user}/connections")), Some(API_KEY)).await;
        assert_eq!(status, 200);
        let listed: HashSet<&str> = body["connections"]
            .as_array()
            .unwrap()
            .iter()
            .inspect(|c| assert_eq!(c["state"], "processing_ready"))
            .map(|c| c["connection_id"].as_str().unwrap())
            .collect();
        assert_eq!(&listed, ids, "{user}");
    }

    stream::iter(clients.into_iter().map(|(_, client)| client.close()))
        .buffer_unordered(500)
        .collect::<Vec<()>>()
        .await;
    server
        .eventually("every connection to be gone from the registry", |s| {
            ["accepted", "authenticated", "services_ready", "processing_ready", "closing", "failed"]
                .iter()
                .all(|state| s.metric(&format!("agentwire_connections{{state=\"{state}\"}}")) == 0.0)
        })
        .await;
    assert_eq!(
        server.metric("agentwire_state_transitions_total{from=\"closing\",to=\"closed\"}"),
        (USERS * PER_USER) as f64
    );
    let (_, body) = http_get(&server.http("/api/v1/users/user-7/connections"), Some(API_KEY)).await;
    assert_eq!(body["connections"], serde_json::json!([]));
}
