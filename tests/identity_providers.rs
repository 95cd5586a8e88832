//! Identity providers (docs/protocol.md section 2, "Identity providers"): tokens verified with the
//! rotating keys a provider publishes as a JSON Web Key Set, found directly or by OpenID Connect
//! discovery, for one provider or several. Each test runs a real provider over HTTP
//! (tests/common/identity_provider.rs) beside a real server, and asserts on what a client sees:
//! upgrades and their 401s, `auth` frames, `invalid_token` and 4001, and on what the provider saw
//! (how often its keys were fetched).

mod common;

use std::time::Duration;

use common::identity_provider::{claims, free_port, Provider, SigningKey};
use common::{http_get, http_post, refused_upgrade, Client, TestServer, WAIT};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

/// A server that verifies with `adjust`'s providers (no secret, no dev tokens), audience
/// `agentwire`, and a demo agent without pauses.
fn server(adjust: impl FnOnce(&mut agentwire::config::AuthConfig)) -> TestServer {
    TestServer::with(|c| {
        c.auth.dev_tokens = false;
        c.auth.audience = "agentwire".to_owned();
        c.agent.step_delay_ms = 0;
        adjust(&mut c.auth);
    })
}

fn server_of(provider: &Provider) -> TestServer {
    server(|auth| {
        auth.jwks_url = provider.jwks_url();
        auth.issuer = provider.base.clone();
    })
}

fn rs256() -> SigningKey {
    SigningKey::load("rs256-private.pem", Algorithm::RS256, "rsa-1")
}

fn rsa_2() -> SigningKey {
    SigningKey::load("rsa-2-private.pem", Algorithm::RS256, "rsa-2")
}

/// A session reached `processing_ready` as `sub` with `token` given at the upgrade.
async fn accepted(server: &TestServer, token: &str, sub: &str) -> Client {
    let mut client = Client::connect_bearer(&server.ws_url(), token).await.expect("upgrade accepted");
    client.expect_setup(sub).await;
    client
}

/// The upgrade was refused 401 `invalid_token`.
async fn refused(server: &TestServer, token: &str) {
    let (status, body) = refused_upgrade(Client::connect_bearer(&server.ws_url(), token).await);
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
}

fn refusals(server: &TestServer, reason: &str) -> f64 {
    server.metric(&format!("agentwire_auth_failures_total{{reason=\"{reason}\"}}"))
}

fn fetches(server: &TestServer, issuer: &str, outcome: &str) -> f64 {
    server.metric(&format!("agentwire_jwks_fetches_total{{issuer=\"{issuer}\",outcome=\"{outcome}\"}}"))
}

#[actix_web::test]
async fn each_algorithm_verifies_with_the_key_its_kid_names() {
    let keys = [
        rs256(),
        SigningKey::load("rsa-2-private.pem", Algorithm::PS256, "rsa-pss"),
        // No `alg` published: an RSA key verifies every RSA algorithm, RS512 among them.
        SigningKey::load("rsa-3-private.pem", Algorithm::RS512, "rsa-no-alg").without_alg(),
        SigningKey::load("es256-private.pem", Algorithm::ES256, "p-256"),
        SigningKey::load("es384-private.pem", Algorithm::ES384, "p-384"),
        SigningKey::load("ed25519-private.pem", Algorithm::EdDSA, "ed25519"),
    ];
    let provider = Provider::start(&keys.iter().collect::<Vec<_>>());
    let server = server_of(&provider);
    for key in &keys {
        let sub = format!("user-{}", key.kid);
        accepted(&server, &provider.token(key, &sub), &sub).await;
    }
    // The `auth` frame takes the same verifier.
    let mut client = Client::connect(&server.ws_url()).await.unwrap();
    client.expect_state("accepted").await;
    client.send(json!({"type": "auth", "token": provider.token(&keys[5], "by-frame")})).await;
    client.expect_state("authenticated").await;
    assert_eq!(provider.key_set_fetches(), 1, "fetched once, at start");
    assert_eq!(server.metric(&format!("agentwire_jwks_keys{{issuer=\"{}\"}}", provider.base)), 6.0);
}

#[actix_web::test]
async fn the_threads_api_and_post_ag_ui_take_provider_tokens() {
    let key = rs256();
    let provider = Provider::start(&[&key]);
    let server = server_of(&provider);
    let token = provider.token(&key, "alice");
    let (status, body) = http_get(&server.http("/api/v1/threads"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let forged = rsa_2().sign_with(Algorithm::RS256, Some("rsa-1"), &claims(&provider.base, "alice"));
    let (status, body) = http_get(&server.http("/api/v1/threads"), Some(&forged)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    let input = json!({"threadId": "t-1", "runId": "r-1", "state": {}, "tools": [], "context": [],
        "forwardedProps": {}, "messages": [{"id": "m-1", "role": "user", "content": "hello"}]});
    let (status, body) = http_post(&server.http("/ag-ui"), Some(&token), &input.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.as_str().is_some_and(|text| text.contains("RUN_FINISHED")), "{body}");
    let (status, _) = http_post(&server.http("/ag-ui"), Some(&forged), &input.to_string()).await;
    assert_eq!(status, 401);
}

#[actix_web::test]
async fn what_the_key_does_not_allow_is_invalid_token() {
    let key = rs256();
    let provider = Provider::start(&[&key]);
    let server = server_of(&provider);
    let iss = provider.base.clone();
    let b64 = |value: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    // `alg: none` naming the provider's key.
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "rsa-1"})), b64(&claims(&iss, "mallory")));
    // HS256 "signed" with the public key's bytes (its PEM, as the old attack has it).
    let public_pem = std::fs::read("tests/fixtures/rs256-public.pem").unwrap();
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let hs_with_public_key = jsonwebtoken::encode(
        &header,
        &claims(&iss, "mallory"),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem).unwrap(),
    )
    .unwrap();
    // A real signature of the right key under another algorithm than the key's `alg`.
    let other_alg = key.sign_with(Algorithm::RS384, Some("rsa-1"), &claims(&iss, "mallory"));
    let no_kid = key.sign_with(Algorithm::RS256, None, &claims(&iss, "mallory"));
    let mut wrong_audience = claims(&iss, "mallory");
    wrong_audience["aud"] = json!("another-api");
    let mut expired = claims(&iss, "mallory");
    expired["exp"] = json!(1_000_000_000);
    let cases = [
        ("wrong_algorithm", none),
        ("wrong_algorithm", hs_with_public_key),
        ("wrong_algorithm", other_alg),
        ("unknown_key", no_kid),
        ("wrong_audience", key.sign(&wrong_audience)),
        ("expired", key.sign(&expired)),
    ];
    for (reason, token) in &cases {
        let before = refusals(&server, reason);
        refused(&server, token).await;
        assert_eq!(refusals(&server, reason), before + 1.0, "{reason}");
        // In an `auth` frame: `invalid_token`, then 4001.
        let mut client = Client::connect(&server.ws_url()).await.unwrap();
        client.expect_state("accepted").await;
        client.send(json!({"type": "auth", "token": token})).await;
        let error = client.recv().await;
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("invalid_token")));
        assert_eq!(client.expect_close_code().await, 4001);
    }
    // None of them cost a fetch: the `kid` was known (or absent).
    assert_eq!(provider.key_set_fetches(), 1);
}

#[actix_web::test]
async fn a_rotation_reaches_new_tokens_at_once_and_leaves_open_sessions_open() {
    let (old, new) = (rs256(), rsa_2());
    let provider = Provider::start(&[&old]);
    let server = server_of(&provider);
    let mut tabs = Vec::new();
    for _ in 0..2 {
        tabs.push(accepted(&server, &provider.token(&old, "alice"), "alice").await);
    }
    provider.publish(&[&new]);
    // A token of the new key: its unknown `kid` has the keys fetched again, and it waits for them.
    let mut third = accepted(&server, &provider.token(&new, "alice"), "alice").await;
    assert_eq!(provider.key_set_fetches(), 2);
    for tab in &mut tabs {
        assert_eq!(tab.ping(json!(1)).await["type"], "pong", "sessions verified before stay open");
    }
    // The old key is gone from the set: a refresh with it is refused, the session stays open.
    tabs[0].send(json!({"type": "auth", "token": provider.token(&old, "alice")})).await;
    let error = tabs[0].recv_where(|f| f["type"] == "error").await;
    assert_eq!(error["code"], "invalid_token");
    assert_eq!(tabs[0].ping(json!(2)).await["type"], "pong");
    tabs[1].send(json!({"type": "auth", "token": provider.token(&new, "alice")})).await;
    tabs[1].recv_where(|f| f["type"] == "auth_ok").await;
    assert_eq!(third.ping(json!(3)).await["type"], "pong");
    refused(&server, &provider.token(&old, "bob")).await;
}

/// Where a token of a key the server has not fetched yet can come in; each waits for the fetch.
#[derive(Clone, Copy, Debug)]
enum Path {
    AuthFrame,
    Refresh,
    ThreadsApi,
}

#[actix_web::test]
async fn a_token_of_a_new_key_waits_for_its_fetch_on_every_path() {
    for path in [Path::AuthFrame, Path::Refresh, Path::ThreadsApi] {
        let (old, new) = (rs256(), rsa_2());
        let provider = Provider::start(&[&old]);
        let server = server_of(&provider);
        let mut tab = accepted(&server, &provider.token(&old, "alice"), "alice").await;
        provider.publish(&[&old, &new]);
        let token = provider.token(&new, "alice");
        match path {
            Path::AuthFrame => {
                let mut client = Client::connect(&server.ws_url()).await.unwrap();
                client.expect_state("accepted").await;
                client.send(json!({"type": "auth", "token": token})).await;
                // Sent while the token waits: an early message, kept and answered once ready.
                client.send(json!({"type": "ping", "id": "early"})).await;
                let ready = client.expect_setup_after_accepted("alice").await;
                assert_eq!(ready["user_id"], "alice");
                assert_eq!(client.recv_where(|f| f["type"] == "pong").await["id"], "early");
            }
            Path::Refresh => {
                tab.send(json!({"type": "auth", "token": token})).await;
                tab.recv_where(|f| f["type"] == "auth_ok").await;
            }
            Path::ThreadsApi => {
                let (status, body) = http_get(&server.http("/api/v1/threads"), Some(&token)).await;
                assert_eq!(status, 200, "{body}");
            }
        }
        assert_eq!(provider.key_set_fetches(), 2, "{path:?}");
        assert_eq!(tab.ping(json!(1)).await["type"], "pong");
    }
}

#[actix_web::test]
async fn a_kid_of_one_issuer_never_verifies_a_token_of_another() {
    // Both providers publish a key named "shared", each its own.
    let a_shared = SigningKey::load("rs256-private.pem", Algorithm::RS256, "shared");
    let a_only = SigningKey::load("es256-private.pem", Algorithm::ES256, "a-only");
    let b_shared = SigningKey::load("rsa-2-private.pem", Algorithm::RS256, "shared");
    let a = Provider::start(&[&a_shared, &a_only]);
    let b = Provider::start(&[&b_shared]);
    let server = server(|auth| {
        auth.jwks_url = a.jwks_url();
        auth.issuer = a.base.clone();
        auth.issuers = vec![agentwire::config::IssuerConfig {
            issuer: b.base.clone(),
            jwks_url: b.jwks_url(),
            audience: "b-api".to_owned(),
            ..Default::default()
        }];
    });
    accepted(&server, &a.token(&a_shared, "alice"), "alice").await;
    let mut for_b = claims(&b.base, "bob");
    for_b["aud"] = json!("b-api");
    accepted(&server, &b_shared.sign(&for_b), "bob").await;
    // Claiming B, signed by A's "shared": B's "shared" is the one key tried, and it fails.
    let before = refusals(&server, "bad_signature");
    refused(&server, &a_shared.sign(&for_b)).await;
    assert_eq!(refusals(&server, "bad_signature"), before + 1.0);
    // Claiming B with a kid only A has: unknown to B, whose keys (not A's) are fetched again.
    let (a_fetches, b_fetches) = (a.key_set_fetches(), b.key_set_fetches());
    refused(&server, &a_only.sign(&for_b)).await;
    assert_eq!((a.key_set_fetches(), b.key_set_fetches()), (a_fetches, b_fetches + 1));
    // Each entry has its own audience.
    refused(&server, &b_shared.token(&b.base, "bob")).await;
    // An issuer nobody configured.
    let before = refusals(&server, "wrong_issuer");
    refused(&server, &a_shared.token("https://elsewhere.example", "eve")).await;
    assert_eq!(refusals(&server, "wrong_issuer"), before + 1.0);
}

#[actix_web::test]
async fn discovery_finds_the_key_set_of_an_oidc_issuer() {
    let key = SigningKey::load("es384-private.pem", Algorithm::ES384, "p-384");
    let provider = Provider::start(&[&key]);
    let server = server(|auth| auth.oidc_issuer = format!("{}/", provider.base));
    // The issuer's trailing slash is not told apart (Auth0's ends with one).
    accepted(&server, &key.token(&format!("{}/", provider.base), "alice"), "alice").await;
    accepted(&server, &provider.token(&key, "bob"), "bob").await;
    assert_eq!((provider.discovery_fetches(), provider.key_set_fetches()), (1, 1));
    refused(&server, &key.token("https://elsewhere.example", "eve")).await;
}

#[actix_web::test]
async fn a_discovery_document_naming_another_issuer_is_not_trusted() {
    let key = rs256();
    let provider = Provider::start(&[&key]);
    // Its document says its issuer is the base, not this realm.
    let realm = format!("{}/realms/chat", provider.base);
    let server = server(|auth| auth.oidc_issuer = realm.clone());
    assert!(provider.discovery_fetches() >= 1 && fetches(&server, &realm, "error") >= 1.0);
    let before = refusals(&server, "keys_unavailable");
    refused(&server, &key.token(&realm, "alice")).await;
    assert_eq!(refusals(&server, "keys_unavailable"), before + 1.0);
    assert_eq!(provider.key_set_fetches(), 0, "the key set it names is never fetched");
}

#[actix_web::test]
async fn keys_a_token_carries_or_points_to_are_never_used() {
    let key = rs256();
    let provider = Provider::start(&[&key]);
    let attacker_key = rsa_2();
    let attacker = Provider::start(&[&attacker_key]);
    let server = server_of(&provider);
    let claims = claims(&provider.base, "mallory");
    // `jku`: the attacker's key set, with a kid only it has.
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some(attacker_key.kid.clone());
    header.jku = Some(attacker.jwks_url());
    refused(&server, &attacker_key.sign_header(&header, &claims)).await;
    // `jwk`: the attacker's public key itself, under the provider's kid.
    let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    header.jwk = Some(serde_json::from_value(attacker_key.jwk.clone()).unwrap());
    let before = refusals(&server, "bad_signature");
    refused(&server, &attacker_key.sign_header(&header, &claims)).await;
    assert_eq!(refusals(&server, "bad_signature"), before + 1.0);
    assert_eq!(attacker.key_set_fetches(), 0, "the attacker's key set is never fetched");
}

#[actix_web::test]
async fn a_provider_down_at_start_is_waited_for_and_one_down_later_keeps_its_keys() {
    let key = rs256();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = server(|auth| {
        auth.jwks_url = format!("{base}/keys");
        auth.issuer = base.clone();
        auth.jwks_refresh_secs = std::num::NonZeroU64::new(2).unwrap();
    });
    assert!(fetches(&server, &base, "error") >= 1.0, "the server started without its keys");
    let token = key.token(&base, "alice");
    let before = refusals(&server, "keys_unavailable");
    refused(&server, &token).await;
    assert_eq!(refusals(&server, "keys_unavailable"), before + 1.0);

    let provider = Provider::start_on(port, &[&key]);
    // Retried while down, at most jwks_refresh_secs (here 2 s) apart.
    until(|| fetches(&server, &base, "ok") >= 1.0, "the keys arrive").await;
    accepted(&server, &token, "alice").await;

    // Down again: a refresh fails, and the keys held keep working.
    provider.set_failing(true);
    let errors = fetches(&server, &base, "error");
    until(|| fetches(&server, &base, "error") > errors, "a refresh fails").await;
    accepted(&server, &token, "alice").await;
    refused(&server, &rsa_2().token(&base, "mallory")).await;
}

/// Waits until `check` holds, polling, bounded by `WAIT`.
async fn until(check: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn a_flood_of_made_up_kids_costs_one_fetch() {
    let key = rs256();
    let provider = Provider::start(&[&key]);
    let server = server_of(&provider);
    let floods = (0..40).map(|i| {
        let token =
            key.sign_with(Algorithm::RS256, Some(&format!("made-up-{i}")), &claims(&provider.base, "eve"));
        let url = server.ws_url();
        async move { refused_upgrade(Client::connect_bearer(&url, &token).await) }
    });
    for (status, body) in futures_util::future::join_all(floods).await {
        assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
    }
    assert_eq!(provider.key_set_fetches(), 2, "one at start, one for the first unknown kid");
    assert_eq!(refusals(&server, "unknown_key"), 40.0);
    // Known keys are not held up meanwhile.
    accepted(&server, &provider.token(&key, "alice"), "alice").await;
}

#[actix_web::test]
async fn max_age_schedules_the_refresh_and_a_removed_key_stops_verifying() {
    let (old, new) = (rs256(), rsa_2());
    let provider = Provider::start(&[&old, &new]);
    provider.set_cache_control("public, max-age=1");
    let server = server_of(&provider);
    accepted(&server, &provider.token(&old, "alice"), "alice").await;
    provider.publish(&[&new]);
    // The provider's max-age (followed down to 5 s) brings the refresh before jwks_refresh_secs.
    // Counted by the server once the fetched set replaced the keys held.
    let fetched = fetches(&server, &provider.base, "ok");
    until(|| fetches(&server, &provider.base, "ok") > fetched, "a refresh within max-age").await;
    refused(&server, &provider.token(&old, "alice")).await;
    accepted(&server, &provider.token(&new, "alice"), "alice").await;
}
