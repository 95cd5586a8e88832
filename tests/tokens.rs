//! Tokens over time (protocol section 2): refresh in place, `token_expiring`, close 4003 at
//! expiry; and no log line ever holds a token.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn token_expiring_in(server_secret: &str, sub: &str, secs: u64) -> (String, u64) {
    let exp = agentwire::protocol::now_ms() / 1000 + secs;
    let key = EncodingKey::from_secret(server_secret.as_bytes()).unwrap();
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"sub": sub, "exp": exp}), &key).unwrap();
    (token, exp * 1000)
}

fn short_leeway() -> TestServer {
    TestServer::with(|c| c.auth.leeway_secs = 0)
}

#[actix_web::test]
async fn an_expiring_token_is_announced_then_closed_with_4003() {
    let server = short_leeway();
    // At least 2 s to expiry (`exp` is in whole seconds), so the upgrade always comes before it.
    let (token, expires_at) = token_expiring_in(&server.config.auth.secret, "brief", 3);
    let mut client = Client::connect_bearer(&server.ws_url(), &token).await.unwrap();
    client.expect_setup("brief").await;
    // Less than 60 s remain, so the notice comes at once.
    let notice = client.recv().await;
    assert_eq!(notice, json!({"type": "token_expiring", "expires_at": expires_at}));
    let (close, frames) = client.expect_close().await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(u16::from(close.unwrap().code), 4003);
    assert!(agentwire::protocol::now_ms() >= expires_at, "closed before exp");
}

#[actix_web::test]
async fn refresh_replaces_the_token_in_place() {
    let server = short_leeway();
    let secret = server.config.auth.secret.clone();
    // At least 2 s to expiry (`exp` is in whole seconds): room for what must come before it.
    let (short, _) = token_expiring_in(&secret, "renewer", 3);
    let mut client = Client::connect_bearer(&server.ws_url(), &short).await.unwrap();
    client.expect_setup("renewer").await;
    assert_eq!(client.recv().await["type"], "token_expiring");
    // A second tab keeps the short token: its 4003 says when the server acts on that expiry.
    let mut kept = Client::connect_bearer(&server.ws_url(), &short).await.unwrap();
    kept.expect_setup("renewer").await;

    let (long, long_exp) = token_expiring_in(&secret, "renewer", 3600);
    client.send(json!({"type": "auth", "token": long})).await;
    assert_eq!(client.recv().await, json!({"type": "auth_ok", "expires_at": long_exp}));

    // Another user's token is forbidden, a bad one invalid; the connection stays in both cases.
    let (other, _) = token_expiring_in(&secret, "someone-else", 3600);
    client.send(json!({"type": "auth", "token": other})).await;
    let forbidden = client.recv().await;
    assert_eq!((forbidden["code"].as_str(), forbidden["ref"].as_str()), (Some("forbidden"), Some("auth")));
    client.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(client.recv().await["code"], "invalid_token");

    // Past the first token's expiry the session is still open: the refresh took.
    let (close, frames) = kept.expect_close().await;
    assert_eq!(u16::from(close.expect("a close frame").code), 4003, "{frames:?}");
    assert_eq!(client.ping(json!("alive")).await["id"], "alive");
}

#[actix_web::test]
async fn no_log_line_contains_a_token_or_an_api_key() {
    let server = BinaryServer::spawn(&[("RUST_LOG", "trace")]);
    let token = server.token("logged");
    // Token in the header, in the query, in an auth frame, in a refresh, and a bad one in the query.
    let mut by_header = Client::connect_bearer(&server.ws_url(), &token).await.unwrap();
    by_header.expect_setup("logged").await;
    let mut by_query = Client::connect(&format!("{}?access_token={token}", server.ws_url())).await.unwrap();
    by_query.expect_setup("logged").await;
    let mut by_frame = Client::connect(&server.ws_url()).await.unwrap();
    by_frame.send(json!({"type": "auth", "token": token})).await;
    by_frame.expect_setup("logged").await;
    by_frame.send(json!({"type": "auth", "token": token})).await;
    assert_eq!(by_frame.recv().await["type"], "auth_ok");
    let forged = format!("{}x", &token[..token.len() - 1]);
    let url = format!("{}?access_token={forged}", server.ws_url());
    assert_eq!(refused_upgrade(Client::connect(&url).await).0, 401);
    let (status, _) = http_get(&server.http("/api/v1/users/logged/connections"), Some(API_KEY)).await;
    assert_eq!(status, 200);
    by_header.close().await;
    by_query.close().await;
    by_frame.close().await;

    // Wait for the closes to be logged, so the whole lifecycle is in the captured log.
    let deadline = std::time::Instant::now() + WAIT;
    while server.log_text().matches(": closed (user logged").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "closes not logged:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = server.log_text();
    assert!(log.contains("processing_ready for user logged"), "the log is captured:\n{log}");
    let signature = token.rsplit('.').next().unwrap();
    for secret in [token.as_str(), forged.as_str(), signature, API_KEY] {
        assert!(!log.contains(secret), "a secret reached the log:\n{log}");
    }
}
