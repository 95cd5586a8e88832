//! Verifying with identity providers' rotating keys (docs/protocol.md section 2, "Identity
//! providers"): each configured provider is an [`Issuer`] holding the keys of its JSON Web Key
//! Set, which `fetch.rs` keeps fresh on a thread of its own. A session's path only reads the
//! keys held (a lock and a map lookup).
//!
//! What must not go wrong (a CVE of 2026 in another server kept one cache keyed by `kid` alone,
//! so one provider's key validated tokens claiming another): a token's `iss` picks its
//! provider, its `kid` is looked up in that provider's keys only, and that one key decides. The
//! key's own `alg` (or, without one, its `kty` and curve) says which algorithms it verifies; a
//! header that names another one (`none`, HS256 over a public key's bytes) is refused.
//!
//! An unknown `kid` may mean the provider rotated its keys: the keys are fetched again, at most
//! once per [`UNKNOWN_KID_REFRESH_INTERVAL`] per provider, so made-up kids cannot make agentwire
//! hammer the provider. The token that asked for that fetch, and any that come while it runs,
//! wait for it (within `auth.timeout_secs`) and are judged on the new keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_channel::{mpsc, oneshot};
use futures_util::future::{FutureExt, Shared};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::claims::{self, Expected};
use super::{AuthFailure, Identity};
use crate::config::{same_issuer, AuthConfig, IssuerConfig};
use crate::metrics::Metrics;

/// A provider's keys are fetched again for an unknown `kid` at most this often.
pub const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Where a provider's keys are published.
#[derive(Clone, Debug)]
pub enum Source {
    /// `jwks_url`: the key set itself.
    KeySet(String),
    /// `oidc_issuer`: the key set named by `jwks_uri` in its discovery document.
    Discovery(String),
}

impl Source {
    fn of(entry: &IssuerConfig) -> Source {
        if entry.jwks_url.is_empty() {
            Source::Discovery(entry.oidc_issuer.clone())
        } else {
            Source::KeySet(entry.jwks_url.clone())
        }
    }
}

/// One key of a set that can verify signatures here.
pub struct Key {
    decoding: DecodingKey,
    /// What it verifies: its `alg`, or every algorithm of its kind when it names none.
    algorithms: &'static [Algorithm],
}

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const P256: &[Algorithm] = &[Algorithm::ES256];
const P384: &[Algorithm] = &[Algorithm::ES384];
const ED25519: &[Algorithm] = &[Algorithm::EdDSA];

impl Key {
    /// The key, or why it is left out of the set.
    pub fn from_jwk(jwk: &Jwk) -> Result<Key, String> {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return Err("it is for encryption (use: enc)".to_owned());
        }
        let kind: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => P256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => P384,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => ED25519,
            // A shared secret has no place in a published set; taking one would let anyone who
            // read the set sign tokens.
            AlgorithmParameters::OctetKey(_) => return Err("it is a shared secret (kty: oct)".to_owned()),
            _ => return Err("its key type or curve is not supported".to_owned()),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => kind,
            Some(alg) => {
                let named = alg.to_string().parse::<Algorithm>().ok();
                match kind.iter().position(|a| Some(*a) == named) {
                    Some(at) => &kind[at..=at],
                    None => return Err(format!("its alg {alg} does not fit its key type")),
                }
            }
        };
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| format!("it does not parse: {e}"))?;
        Ok(Key { decoding, algorithms })
    }
}

/// The keys of one provider, by `kid`.
#[derive(Default)]
pub struct KeySet {
    pub by_kid: HashMap<String, Arc<Key>>,
    /// A fetch has succeeded: until then every token of the provider is refused as
    /// `keys_unavailable`.
    pub fetched: bool,
}

/// A fetch for an unknown `kid`: the last one's time, and its completion while it runs.
#[derive(Default)]
struct Forced {
    last: Option<Instant>,
    done: Option<Shared<oneshot::Receiver<()>>>,
}

/// One identity provider: whose tokens it vouches for, and its keys.
pub struct Issuer {
    /// The `iss` its tokens carry; empty only for a lone provider whose `iss` is not checked.
    pub issuer: String,
    pub audience: String,
    pub source: Source,
    /// Its name in metrics and logs: the issuer, or where its keys are.
    pub label: String,
    keys: RwLock<Arc<KeySet>>,
    forced: Mutex<Forced>,
    /// To the fetcher: fetch now, and say when done.
    requests: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl Issuer {
    fn new(entry: &IssuerConfig) -> (Arc<Issuer>, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        let (requests, received) = mpsc::unbounded();
        let source = Source::of(entry);
        let issuer = entry.expected_issuer().to_owned();
        let label = match (&source, issuer.is_empty()) {
            (Source::KeySet(url), true) => url.clone(),
            _ => issuer.clone(),
        };
        let issuer = Issuer {
            issuer,
            audience: entry.audience.clone(),
            source,
            label,
            keys: RwLock::default(),
            forced: Mutex::default(),
            requests,
        };
        (Arc::new(issuer), received)
    }

    pub fn keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The fetcher's: the set just fetched replaces the one held.
    pub fn replace_keys(&self, by_kid: HashMap<String, Arc<Key>>) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(KeySet { by_kid, fetched: true });
    }

    /// Whether `claimed` (a token's `iss`) names this provider ([`same_issuer`]).
    fn answers_for(&self, claimed: &str) -> bool {
        !self.issuer.is_empty() && same_issuer(claimed, &self.issuer)
    }

    /// A fetch for an unknown `kid` to wait for: the one running, or a new one when the last
    /// started [`UNKNOWN_KID_REFRESH_INTERVAL`] ago or more. `None`: too soon, refuse at once.
    fn refresh_for_unknown_kid(&self) -> Option<Shared<oneshot::Receiver<()>>> {
        let mut forced = self.forced.lock().unwrap_or_else(PoisonError::into_inner);
        if forced.last.is_some_and(|last| last.elapsed() < UNKNOWN_KID_REFRESH_INTERVAL) {
            // Only a fetch still running is waited for; one that ended has been judged on.
            return forced.done.as_ref().filter(|done| done.peek().is_none()).cloned();
        }
        let (tell, done) = oneshot::channel();
        self.requests.unbounded_send(tell).ok()?;
        let done = done.shared();
        *forced = Forced { last: Some(Instant::now()), done: Some(done.clone()) };
        Some(done)
    }

    /// Judges `token` on the keys held now.
    fn judge(&self, token: &Token, leeway_secs: u64) -> Result<Identity, AuthFailure> {
        let keys = self.keys();
        match keys.by_kid.get(&token.kid) {
            Some(key) => self.verify(key, token, leeway_secs),
            None if keys.fetched => Err(AuthFailure::UnknownKey),
            None => Err(AuthFailure::KeysUnavailable),
        }
    }

    /// Verifies `token` with `key`, the one its `kid` names.
    fn verify(&self, key: &Key, token: &Token, leeway_secs: u64) -> Result<Identity, AuthFailure> {
        // The key decides: a header naming another algorithm is refused before any check, so
        // neither `none` nor an HMAC over the public key's bytes is ever tried.
        if !key.algorithms.contains(&token.alg) {
            return Err(AuthFailure::WrongAlgorithm);
        }
        // `iss` was matched to this provider already; the check makes its presence required.
        let issuer =
            if self.issuer.is_empty() { "" } else { token.issuer.as_deref().unwrap_or(&self.issuer) };
        let expected = Expected { issuer, audience: &self.audience, leeway_secs };
        claims::decode(&token.text, &key.decoding, &claims::validation(token.alg, &expected))
    }
}

/// What a token says of itself before it is verified: enough to find its key.
struct Token {
    text: String,
    alg: Algorithm,
    kid: String,
    issuer: Option<String>,
}

/// Every configured provider, and how long a token may wait for a fetch.
pub struct KeySets {
    issuers: Vec<Arc<Issuer>>,
    leeway_secs: u64,
    wait: Duration,
}

/// A token whose `kid` its provider did not have: judged once the keys are fetched again.
pub struct KeyRefresh {
    issuer: Arc<Issuer>,
    token: Token,
    done: Shared<oneshot::Receiver<()>>,
    wait: Duration,
    leeway_secs: u64,
}

impl KeyRefresh {
    /// Waits no longer than `limit` (a connection's time left to authenticate).
    pub fn within(mut self, limit: Duration) -> KeyRefresh {
        self.wait = self.wait.min(limit);
        self
    }

    /// The verdict once the fetch ended, or after `auth.timeout_secs` (on the keys held then).
    pub async fn outcome(self) -> Result<Identity, AuthFailure> {
        let _ = tokio::time::timeout(self.wait, self.done).await;
        self.issuer.judge(&self.token, self.leeway_secs)
    }
}

/// A verdict now, or after a fetch of the provider's keys.
pub enum Check {
    Done(Result<Identity, AuthFailure>),
    AfterRefresh(KeyRefresh),
}

impl KeySets {
    /// The providers of `config` and the fetcher of their keys; returns once each provider's
    /// first fetch ended or timed out, so that a server that could reach its providers starts
    /// with their keys. One that could not starts anyway and refuses their tokens until the
    /// keys arrive.
    pub fn start(config: &AuthConfig, metrics: &Arc<Metrics>) -> Result<KeySets, String> {
        let (issuers, requests): (Vec<_>, Vec<_>) = config.key_set_issuers().iter().map(Issuer::new).unzip();
        for issuer in &issuers {
            match (&issuer.source, issuer.issuer.is_empty()) {
                (_, true) => log::warn!(
                    "auth: keys from {} for tokens of any issuer (auth.issuer is empty: iss is not checked)",
                    issuer.label
                ),
                (Source::KeySet(url), false) => {
                    log::info!("auth: tokens of {} verified with keys from {url}", issuer.label)
                }
                (Source::Discovery(url), false) => {
                    log::info!(
                        "auth: tokens of {} verified with keys found by discovery at {url}",
                        issuer.label
                    )
                }
            }
        }
        let refresh = Duration::from_secs(config.jwks_refresh_secs.get());
        let fetches = issuers.iter().cloned().zip(requests).collect();
        super::fetch::start(fetches, refresh, Arc::clone(metrics))?;
        for issuer in issuers.iter().filter(|i| !i.keys().fetched) {
            log::warn!(
                "auth: starting without the keys of {}: its tokens are refused until they arrive",
                issuer.label
            );
        }
        Ok(KeySets {
            issuers,
            leeway_secs: config.leeway_secs,
            wait: Duration::from_secs(config.timeout_secs.get()),
        })
    }

    pub fn check(&self, text: &str) -> Check {
        let header = match claims::header(text) {
            Ok(header) => header,
            Err(failure) => return Check::Done(Err(failure)),
        };
        let claimed = claims::claimed_issuer(text);
        let issuer = match &claimed {
            Some(claimed) => self.issuers.iter().find(|i| i.answers_for(claimed)),
            None => None,
        }
        // A lone provider with no issuer configured takes tokens of any (or no) `iss`.
        .or_else(|| self.issuers.iter().find(|i| i.issuer.is_empty()));
        let Some(issuer) = issuer else {
            let failure =
                if claimed.is_some() { AuthFailure::WrongIssuer } else { AuthFailure::MissingClaim };
            return Check::Done(Err(failure));
        };
        // The `kid` names the one key to try: a token without one names none.
        let Some(kid) = header.kid else {
            return Check::Done(Err(AuthFailure::UnknownKey));
        };
        let token = Token { text: text.to_owned(), alg: header.alg, kid, issuer: claimed };
        if let Some(key) = issuer.keys().by_kid.get(&token.kid) {
            return Check::Done(issuer.verify(key, &token, self.leeway_secs));
        }
        match issuer.refresh_for_unknown_kid() {
            Some(done) => Check::AfterRefresh(KeyRefresh {
                issuer: Arc::clone(issuer),
                token,
                done,
                wait: self.wait,
                leeway_secs: self.leeway_secs,
            }),
            None => Check::Done(issuer.judge(&token, self.leeway_secs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(json: serde_json::Value) -> Jwk {
        serde_json::from_value(json).unwrap()
    }

    const N: &str = "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw";

    #[test]
    fn a_keys_alg_or_kind_decides_what_it_verifies() {
        let rsa =
            Key::from_jwk(&jwk(serde_json::json!({"kty": "RSA", "kid": "a", "n": N, "e": "AQAB"}))).unwrap();
        assert!(rsa.algorithms.contains(&Algorithm::PS256) && !rsa.algorithms.contains(&Algorithm::HS256));
        let named = jwk(serde_json::json!({"kty": "RSA", "kid": "a", "alg": "RS384", "n": N, "e": "AQAB"}));
        assert_eq!(Key::from_jwk(&named).unwrap().algorithms, &[Algorithm::RS384]);
        let mismatched =
            jwk(serde_json::json!({"kty": "RSA", "kid": "a", "alg": "ES256", "n": N, "e": "AQAB"}));
        assert!(Key::from_jwk(&mismatched).is_err());
        let secret = jwk(serde_json::json!({"kty": "oct", "kid": "s", "k": "c2VjcmV0"}));
        assert!(Key::from_jwk(&secret).is_err());
        let enc = jwk(serde_json::json!({"kty": "RSA", "kid": "a", "use": "enc", "n": N, "e": "AQAB"}));
        assert!(Key::from_jwk(&enc).is_err());
    }
}
