//! An identity provider as agentwire meets one: an HTTP server (actix-web, on its own thread)
//! that publishes a JSON Web Key Set and an OpenID Connect discovery document, counts how often
//! each is fetched, and can be told to fail. Keys are the PEM fixtures in tests/fixtures (made
//! with `openssl genpkey`); their JWKs and every token are made by jsonwebtoken, a standard JOSE
//! library, never by hand. Also the provider of `benches/auth_verify.rs`, which includes this file.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A private key of a provider and the public JWK it publishes for it.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    /// `file` in tests/fixtures, published under `kid` with its `alg`.
    pub fn load(file: &str, alg: Algorithm, kid: &str) -> SigningKey {
        let pem = std::fs::read(format!("tests/fixtures/{file}")).expect("fixture key");
        let encoding = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("a usable key");
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).expect("a JWK")).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        SigningKey { kid: kid.to_owned(), alg, encoding, jwk }
    }

    /// Published without `alg`: its key type alone says what it verifies.
    pub fn without_alg(mut self) -> SigningKey {
        self.jwk.as_object_mut().unwrap().remove("alg");
        self
    }

    /// Signs `claims` with this key, its `alg` and `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(self.alg, Some(&self.kid), claims)
    }

    /// Signs with this key under another `alg` or `kid` (or none), as an attacker or a
    /// misconfigured client would.
    pub fn sign_with(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        self.sign_header(&header, claims)
    }

    /// Signs with this key under any header.
    pub fn sign_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding).expect("signed")
    }

    /// A token of `iss` for `sub`, audience `agentwire`, valid for an hour.
    pub fn token(&self, iss: &str, sub: &str) -> String {
        self.sign(&claims(iss, sub))
    }
}

/// The claims of a token of `iss` for `sub`, audience `agentwire`, valid for an hour.
pub fn claims(iss: &str, sub: &str) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    json!({"iss": iss, "sub": sub, "aud": "agentwire", "iat": now, "exp": now + 3600})
}

#[derive(Default)]
struct State {
    base: String,
    keys: Vec<Value>,
    key_set_fetches: usize,
    discovery_fetches: usize,
    cache_control: Option<String>,
    /// Answer 503 to everything, as a provider having an outage.
    failing: bool,
}

/// The provider's HTTP server; stopped when dropped.
pub struct Provider {
    /// `http://127.0.0.1:port`: also its issuer (`iss`) and its `oidc_issuer`.
    pub base: String,
    state: Arc<Mutex<State>>,
    handle: actix_web::dev::ServerHandle,
}

impl Provider {
    pub fn start(keys: &[&SigningKey]) -> Provider {
        Provider::start_on(0, keys)
    }

    /// On `port` (0: any free one).
    pub fn start_on(port: u16, keys: &[&SigningKey]) -> Provider {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let server = HttpServer::new(move || {
                    let state = Arc::clone(&shared);
                    App::new().default_service(web::to(move |request: actix_web::HttpRequest| {
                        let state = Arc::clone(&state);
                        async move { answer(&state, request.path()) }
                    }))
                })
                .workers(1)
                .bind(("127.0.0.1", port))
                .expect("bind");
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            });
        });
        let (addr, handle) = rx.recv_timeout(Duration::from_secs(10)).expect("provider started");
        let base = format!("http://{addr}");
        state.lock().unwrap().base = base.clone();
        let provider = Provider { base, state, handle };
        provider.publish(keys);
        provider
    }

    /// The address of its key set.
    pub fn jwks_url(&self) -> String {
        format!("{}/keys", self.base)
    }

    /// Replaces the published keys (a rotation).
    pub fn publish(&self, keys: &[&SigningKey]) {
        self.state.lock().unwrap().keys = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    pub fn set_cache_control(&self, value: &str) {
        self.state.lock().unwrap().cache_control = Some(value.to_owned());
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.lock().unwrap().failing = failing;
    }

    /// Requests for the key set so far.
    pub fn key_set_fetches(&self) -> usize {
        self.state.lock().unwrap().key_set_fetches
    }

    pub fn discovery_fetches(&self) -> usize {
        self.state.lock().unwrap().discovery_fetches
    }

    /// A token of this provider (`iss` its base) for `sub`.
    pub fn token(&self, key: &SigningKey, sub: &str) -> String {
        key.token(&self.base, sub)
    }
}

fn answer(state: &Mutex<State>, path: &str) -> HttpResponse {
    let mut state = state.lock().unwrap();
    if state.failing {
        return HttpResponse::ServiceUnavailable().finish();
    }
    match path {
        "/keys" => {
            state.key_set_fetches += 1;
            let mut response = HttpResponse::Ok();
            if let Some(value) = &state.cache_control {
                response.insert_header(("cache-control", value.as_str()));
            }
            response.json(json!({"keys": state.keys}))
        }
        // Discovery under any path: the document names the provider's base as its issuer.
        path if path.ends_with("/.well-known/openid-configuration") => {
            state.discovery_fetches += 1;
            HttpResponse::Ok().json(json!({
                "issuer": state.base,
                "jwks_uri": format!("{}/keys", state.base),
                "id_token_signing_alg_values_supported": ["RS256"],
            }))
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

/// A port nothing listens on (yet): taken from the system, then let go.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
