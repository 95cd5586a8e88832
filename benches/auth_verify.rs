//! The identity-provider figures of `benches/run.sh` (`ONLY=auth`): what verifying a token costs
//! with a provider's key set against the HS256 secret and a key file, per algorithm, in one run;
//! and what a flood of made-up `kid`s costs the provider. The provider is the tests' own
//! (tests/common/identity_provider.rs: a real HTTP server on 127.0.0.1 publishing the fixtures'
//! keys, JWKs and tokens made by jsonwebtoken). Prints one JSON object.
//!
//!     cargo run --release --example auth_verify -- [tokens per round, default 2000]

#[path = "../tests/common/identity_provider.rs"]
mod identity_provider;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentwire::auth::{Check, Verifier};
use agentwire::config::AuthConfig;
use agentwire::metrics::Metrics;
use identity_provider::{Provider, SigningKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const ROUNDS: usize = 5;

/// `count` tokens of distinct users of `iss`, each made by `sign`.
fn tokens(count: usize, iss: &str, sign: impl Fn(&Value) -> String) -> Vec<String> {
    (0..count).map(|i| sign(&identity_provider::claims(iss, &format!("user-{i}")))).collect()
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
        ("RS256", SigningKey::load("rs256-private.pem", Algorithm::RS256, "rsa")),
        ("PS256", SigningKey::load("rsa-2-private.pem", Algorithm::PS256, "pss")),
        ("ES256", SigningKey::load("es256-private.pem", Algorithm::ES256, "p256")),
        ("ES384", SigningKey::load("es384-private.pem", Algorithm::ES384, "p384")),
        ("EdDSA", SigningKey::load("ed25519-private.pem", Algorithm::EdDSA, "ed")),
    ];
    let provider = Provider::start(&keys.iter().map(|(_, key)| key).collect::<Vec<_>>());
    let issuer = provider.base.clone();
    let metrics = Arc::new(Metrics::new());
    let with_provider = AuthConfig {
        jwks_url: provider.jwks_url(),
        issuer: issuer.clone(),
        audience: "agentwire".into(),
        ..AuthConfig::default()
    };
    let key_sets = Verifier::new(&with_provider, &metrics).expect("key sets");

    let mut results = serde_json::Map::new();
    let secret = AuthConfig {
        secret: "bench-secret-of-the-benchmarks-0123456789".into(),
        issuer: issuer.clone(),
        audience: "agentwire".into(),
        ..AuthConfig::default()
    };
    let hs = EncodingKey::from_secret(secret.secret.as_bytes()).unwrap();
    let hs_tokens = tokens(count, &issuer, |claims| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &hs).unwrap()
    });
    results.insert(
        "HS256 secret".into(),
        json!(per_token_us(&Verifier::new(&secret, &metrics).unwrap(), &hs_tokens)),
    );
    let key_file = AuthConfig {
        algorithm: agentwire::config::Algorithm::RS256,
        public_key_file: "tests/fixtures/rs256-public.pem".into(),
        ..secret.clone()
    };
    let rs_file = tokens(count, &issuer, |claims| keys[0].1.sign_with(Algorithm::RS256, None, claims));
    results.insert(
        "RS256 key file".into(),
        json!(per_token_us(&Verifier::new(&key_file, &metrics).unwrap(), &rs_file)),
    );
    for (name, key) in &keys {
        let signed = tokens(count, &issuer, |claims| key.sign(claims));
        results.insert(format!("{name} key set"), json!(per_token_us(&key_sets, &signed)));
    }

    // A flood of made-up kids (1,000 distinct ones, signed beforehand: a real attacker's tokens
    // come signed) for three seconds: all refused, and the provider fetched from once for them.
    let before = provider.key_set_fetches();
    let flood: Vec<String> = (0..1000)
        .map(|i| {
            keys[0].1.sign_with(
                Algorithm::RS256,
                Some(&format!("made-up-{i}")),
                &identity_provider::claims(&issuer, "eve"),
            )
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
    results.insert("flood fetches".into(), json!(provider.key_set_fetches() - before));
    results.insert("tokens per round".into(), json!(count));
    println!("{}", Value::Object(results));
}
