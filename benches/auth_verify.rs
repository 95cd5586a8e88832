//! The identity-provider figures of `benches/run.sh` (`ONLY=auth`): what verifying a token costs
//! with a provider's key set against the HS256 secret and a key file, per algorithm, in one run;
//! and what a flood of made-up `kid`s costs the provider. The provider is a real HTTP server on
//! 127.0.0.1 publishing the test fixtures' keys (tests/fixtures, `openssl genpkey`); JWKs and
//! tokens are made by jsonwebtoken. Prints one JSON object.
//!
//!     cargo run --release --example auth_verify -- [tokens per round, default 2000]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use agentwire::auth::{Check, Verifier};
use agentwire::config::AuthConfig;
use agentwire::metrics::Metrics;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ROUNDS: usize = 5;

struct Key {
    name: &'static str,
    kid: &'static str,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn key(name: &'static str, file: &str, alg: Algorithm, kid: &'static str) -> Key {
    let pem = std::fs::read(format!("tests/fixtures/{file}")).expect("run from the repository's root");
    let encoding = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .expect("a usable key");
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).expect("a JWK")).unwrap();
    jwk["kid"] = json!(kid);
    Key { name, kid, alg, encoding, jwk }
}

fn tokens(encoding: &EncodingKey, alg: Algorithm, kid: Option<&str>, iss: &str, count: usize) -> Vec<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    (0..count)
        .map(|i| {
            let claims =
                json!({"iss": iss, "sub": format!("user-{i}"), "aud": "agentwire", "exp": now + 3600});
            jsonwebtoken::encode(&header, &claims, encoding).unwrap()
        })
        .collect()
}

/// Median microseconds per verified token over [`ROUNDS`] rounds.
fn per_token_us(verifier: &Verifier, tokens: &[String]) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for token in tokens {
                match verifier.check(token) {
                    Check::Done(Ok(_)) => {}
                    Check::Done(Err(e)) => panic!("refused: {e:?}"),
                    Check::AfterRefresh(_) => panic!("a known kid waited for a fetch"),
                }
            }
            started.elapsed().as_secs_f64() * 1e6 / tokens.len() as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let count: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2000);
    let keys = [
        key("RS256", "rs256-private.pem", Algorithm::RS256, "rsa"),
        key("PS256", "rsa-2-private.pem", Algorithm::PS256, "pss"),
        key("ES256", "es256-private.pem", Algorithm::ES256, "p256"),
        key("ES384", "es384-private.pem", Algorithm::ES384, "p384"),
        key("EdDSA", "ed25519-private.pem", Algorithm::EdDSA, "ed"),
    ];
    let published = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&fetches);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                let (published, counted) = (published.clone(), Arc::clone(&counted));
                App::new().route(
                    "/keys",
                    web::get().to(move || {
                        counted.fetch_add(1, Ordering::Relaxed);
                        let body = published.clone();
                        async move { HttpResponse::Ok().json(body) }
                    }),
                )
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .expect("bind");
            tx.send(server.addrs()[0]).unwrap();
            let _ = server.run().await;
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).expect("provider started");
    let issuer = format!("http://{addr}");
    let metrics = Arc::new(Metrics::new());
    let provider = AuthConfig {
        jwks_url: format!("http://{addr}/keys"),
        issuer: issuer.clone(),
        audience: "agentwire".into(),
        ..AuthConfig::default()
    };
    let key_sets = Verifier::new(&provider, &metrics).expect("key sets");

    let mut results = serde_json::Map::new();
    let secret = AuthConfig {
        secret: "bench-secret-of-the-benchmarks-0123456789".into(),
        issuer: issuer.clone(),
        audience: "agentwire".into(),
        ..AuthConfig::default()
    };
    let hs = EncodingKey::from_secret(secret.secret.as_bytes()).unwrap();
    let hs_tokens = tokens(&hs, Algorithm::HS256, None, &issuer, count);
    results.insert(
        "HS256 secret".into(),
        json!(per_token_us(&Verifier::new(&secret, &metrics).unwrap(), &hs_tokens)),
    );
    let key_file = AuthConfig {
        algorithm: agentwire::config::Algorithm::RS256,
        public_key_file: "tests/fixtures/rs256-public.pem".into(),
        ..secret.clone()
    };
    let rs_file = tokens(&keys[0].encoding, Algorithm::RS256, None, &issuer, count);
    results.insert(
        "RS256 key file".into(),
        json!(per_token_us(&Verifier::new(&key_file, &metrics).unwrap(), &rs_file)),
    );
    for key in &keys {
        let signed = tokens(&key.encoding, key.alg, Some(key.kid), &issuer, count);
        results.insert(format!("{} key set", key.name), json!(per_token_us(&key_sets, &signed)));
    }

    // A flood of made-up kids (1,000 distinct ones, signed beforehand: a real attacker's tokens
    // come signed) for three seconds: all refused, and the provider fetched from once for them.
    let before = fetches.load(Ordering::Relaxed);
    let flood: Vec<String> = (0..1000)
        .map(|i| {
            let kid = format!("made-up-{i}");
            tokens(&keys[0].encoding, Algorithm::RS256, Some(&kid), &issuer, 1).remove(0)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let started = Instant::now();
    let mut refused = 0usize;
    for token in flood.iter().cycle() {
        if started.elapsed() >= Duration::from_secs(3) {
            break;
        }
        let verdict = match key_sets.check(token) {
            Check::Done(verdict) => verdict,
            Check::AfterRefresh(refresh) => runtime.block_on(refresh.outcome()),
        };
        refused += usize::from(verdict.is_err());
    }
    let elapsed = started.elapsed().as_secs_f64();
    results.insert("flood tokens".into(), json!(refused));
    results.insert("flood refused per s".into(), json!(refused as f64 / elapsed));
    results.insert("flood fetches".into(), json!(fetches.load(Ordering::Relaxed) - before));
    results.insert("tokens per round".into(), json!(count));
    println!("{}", Value::Object(results));
}
