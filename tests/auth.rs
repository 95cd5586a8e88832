//! Section 2: every kind of bad token is refused, with HTTP 401 at the upgrade and with
//! `invalid_token` + 4001 in an `auth` frame; no token in time closes with 4002.

mod common;

use std::num::NonZero;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now() -> u64 {
    agentwire::protocol::now_ms() / 1000
}

fn sign(header: &Header, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
}

fn b64(json: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

/// Each bad token, named, for a server with `iss` and `aud` configured.
fn bad_tokens(secret: &str) -> Vec<(&'static str, String)> {
    let hs256 = Header::new(Algorithm::HS256);
    let good = |extra: Value| {
        let mut claims = json!({"sub": "alice", "exp": now() + 600, "iss": "agentwire-test", "aud": "chat"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    };
    vec![
        ("forged signature", sign(&hs256, &good(json!({})), "some-other-secret")),
        ("expired beyond leeway", sign(&hs256, &good(json!({"exp": now() - 120})), secret)),
        ("not yet valid", sign(&hs256, &good(json!({"nbf": now() + 600})), secret)),
        ("alg none", format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&good(json!({}))))),
        ("wrong algorithm HS512", sign(&Header::new(Algorithm::HS512), &good(json!({})), secret)),
        ("missing sub", sign(&hs256, &good(json!({"sub": null})), secret)),
        ("malformed sub", sign(&hs256, &good(json!({"sub": "has spaces/slash"})), secret)),
        ("numeric sub", sign(&hs256, &good(json!({"sub": 42})), secret)),
        ("missing exp", sign(&hs256, &good(json!({"exp": null})), secret)),
        ("wrong issuer", sign(&hs256, &good(json!({"iss": "someone-else"})), secret)),
        ("wrong audience", sign(&hs256, &good(json!({"aud": "other"})), secret)),
        // Configured claims are required, not only checked when a token happens to carry them.
        ("missing issuer", sign(&hs256, &good(json!({"iss": null})), secret)),
        ("missing audience", sign(&hs256, &good(json!({"aud": null})), secret)),
        ("not a JWT", "definitely.not.ajwt".to_owned()),
    ]
}

fn strict_server() -> TestServer {
    TestServer::with(|c| {
        c.auth.issuer = "agentwire-test".into();
        c.auth.audience = "chat".into();
    })
}

#[actix_web::test]
async fn bad_tokens_at_upgrade_get_401() {
    let server = strict_server();
    for (name, token) in bad_tokens(&server.config.auth.secret) {
        let (status, body) = refused_upgrade(Client::connect_bearer(&server.ws_url(), &token).await);
        assert_eq!(status, 401, "{name}");
        assert_eq!(body["error"], "invalid_token", "{name}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
        // The query-string way is refused the same.
        let url = format!("{}?access_token={token}", server.ws_url());
        assert_eq!(refused_upgrade(Client::connect(&url).await).0, 401, "{name} (query)");
    }
    let count = bad_tokens("x").len() as f64 * 2.0;
    let failures: f64 = [
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_algorithm",
        "missing_claim",
        "invalid_subject",
        "wrong_issuer",
        "wrong_audience",
        "malformed",
    ]
    .iter()
    .map(|r| server.metric(&format!("agentwire_auth_failures_total{{reason=\"{r}\"}}")))
    .sum();
    assert_eq!(failures, count);
    assert_eq!(server.metric("agentwire_auth_failures_total{reason=\"wrong_algorithm\"}"), 4.0);
    // A valid token with the right claims still gets in.
    let good = sign(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": now() + 600, "iss": "agentwire-test", "aud": "chat"}),
        &server.config.auth.secret,
    );
    Client::connect_bearer(&server.ws_url(), &good).await.unwrap().expect_setup("alice").await;
}

#[actix_web::test]
async fn bad_tokens_in_auth_frame_get_invalid_token_then_4001() {
    let server = strict_server();
    for (name, token) in bad_tokens(&server.config.auth.secret) {
        let mut client = Client::connect(&server.ws_url()).await.unwrap();
        client.send(json!({"type": "auth", "token": token})).await;
        client.send(json!({"type": "ping", "id": "queued and dropped"})).await;
        client.expect_state("accepted").await;
        let (close, frames) = client.expect_close().await;
        assert_eq!(frames.len(), 1, "{name}: {frames:?}");
        assert_eq!(frames[0]["type"], "error", "{name}");
        assert_eq!(frames[0]["code"], "invalid_token", "{name}");
        assert_eq!(u16::from(close.expect("close frame").code), 4001, "{name}");
    }
}

#[actix_web::test]
async fn token_within_leeway_is_accepted() {
    let server = TestServer::start();
    let token = sign(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "late", "exp": now() - 5}),
        &server.config.auth.secret,
    );
    Client::connect_bearer(&server.ws_url(), &token).await.unwrap().expect_setup("late").await;
}

#[actix_web::test]
async fn no_token_in_time_closes_with_4002() {
    let server = TestServer::with(|c| c.auth.timeout_secs = NonZero::new(1).unwrap());
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    client.send(json!({"type": "ping", "id": 1})).await;
    client.expect_state("accepted").await;
    let (close, frames) = client.expect_close().await;
    assert!(frames.is_empty(), "queued frames are dropped with the connection: {frames:?}");
    assert_eq!(u16::from(close.unwrap().code), 4002);
    assert_eq!(server.metric("agentwire_auth_failures_total{reason=\"timeout\"}"), 1.0);
    server
        .eventually("the timed-out connection to be gone", |s| {
            s.metric("agentwire_connections{state=\"accepted\"}") == 0.0
        })
        .await;
}

#[actix_web::test]
async fn rs256_and_es256_keys_verify() {
    // Keys made with openssl at test time would need the tool; these PEMs are test-only fixtures.
    for (alg, private, public) in [
        ("RS256", "tests/fixtures/rs256-private.pem", "tests/fixtures/rs256-public.pem"),
        ("ES256", "tests/fixtures/es256-private.pem", "tests/fixtures/es256-public.pem"),
    ] {
        let server = TestServer::with(|c| {
            c.auth.algorithm = if alg == "RS256" {
                agentwire::config::Algorithm::RS256
            } else {
                agentwire::config::Algorithm::ES256
            };
            c.auth.public_key_file = public.into();
            c.auth.private_key_file = private.into();
        });
        let mut client = Client::connect_bearer(&server.ws_url(), &server.token("pki")).await.unwrap();
        client.expect_setup("pki").await;
        // An HS256 token signed with the (public) key material as a secret is the classic
        // algorithm-confusion attack; it must be refused.
        let pem = std::fs::read_to_string(public).unwrap();
        let confused = sign(&Header::new(Algorithm::HS256), &json!({"sub": "pki", "exp": now() + 60}), &pem);
        assert_eq!(
            refused_upgrade(Client::connect_bearer(&server.ws_url(), &confused).await).0,
            401,
            "{alg}"
        );
    }
}
