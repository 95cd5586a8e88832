//! JWT verification (docs/protocol.md section 2) and minting (`agentwire token`, `POST /dev/token`).
//!
//! One [`Verifier`] serves the upgrade, the `auth` frame (and its refreshes), `POST /ag-ui` and
//! the threads API. It verifies with the operator's key (`key_file.rs`) or with identity
//! providers' rotating key sets (`key_sets.rs`, kept fresh by `fetch.rs`); either way the claims
//! are judged by `claims.rs`, and each refusal is an [`AuthFailure`] whose `reason()` labels the
//! metric. Tokens are never logged: nothing here formats one.

mod claims;
mod fetch;
mod key_file;
mod key_sets;
mod mint;

use std::sync::Arc;

pub use key_file::KeyFile;
pub use key_sets::{Check, KeyRefresh, KeySets, UNKNOWN_KID_REFRESH_INTERVAL};
pub use mint::Minter;

use crate::config::AuthConfig;
use crate::metrics::Metrics;

/// The user id rule of section 2, as said to clients (a macro, so messages can embed it).
macro_rules! user_id_rule {
    () => {
        "^[A-Za-z0-9._:@-]{1,128}$"
    };
}
pub const USER_ID_RULE: &str = user_id_rule!();

/// Who a verified token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// The token's `exp`, in milliseconds since the epoch.
    pub expires_at_ms: u64,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    Malformed,
    BadSignature,
    WrongAlgorithm,
    Expired,
    NotYetValid,
    MissingClaim,
    InvalidSubject,
    WrongIssuer,
    WrongAudience,
    /// No token came within `auth.timeout_secs`.
    Timeout,
    /// Its `kid` names no key of its provider (or it names none).
    UnknownKey,
    /// Its provider's keys could not be fetched yet.
    KeysUnavailable,
}

impl AuthFailure {
    /// Label of `agentwire_auth_failures_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::WrongAlgorithm => "wrong_algorithm",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::InvalidSubject => "invalid_subject",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::Timeout => "timeout",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::KeysUnavailable => "keys_unavailable",
        }
    }

    /// The `message` a client sees.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "the token is not a well-formed JWT",
            AuthFailure::BadSignature => "the token's signature does not verify",
            AuthFailure::WrongAlgorithm => "the token is not signed with an algorithm its key allows",
            AuthFailure::Expired => "the token has expired",
            AuthFailure::NotYetValid => "the token is not valid yet (nbf)",
            AuthFailure::MissingClaim => {
                "the token lacks a required claim (exp, sub, and iss or aud when configured)"
            }
            AuthFailure::InvalidSubject => concat!("the token's sub must match ", user_id_rule!()),
            AuthFailure::WrongIssuer => "the token's issuer is not accepted",
            AuthFailure::WrongAudience => "the token's audience is not accepted",
            AuthFailure::Timeout => "no token came in time",
            AuthFailure::UnknownKey => "the token's kid names no key of its issuer",
            AuthFailure::KeysUnavailable => "the issuer's keys are not available yet; try again later",
        }
    }
}

/// The user id rule of section 2: [`USER_ID_RULE`].
pub fn is_valid_user_id(sub: &str) -> bool {
    (1..=128).contains(&sub.len())
        && sub.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Checks tokens: with the operator's key (the HS256 secret or a public key file), or with
/// identity providers' key sets.
pub enum Verifier {
    // Boxed: a key file's checks are large, and a verifier is built once per server.
    KeyFile(Box<KeyFile>),
    KeySets(KeySets),
}

impl Verifier {
    /// Errors name the configuration key that is wrong. With key sets, this starts their fetcher
    /// and waits for the first fetches (bounded; see `fetch.rs`).
    pub fn new(config: &AuthConfig, metrics: &Arc<Metrics>) -> Result<Verifier, String> {
        if config.uses_key_sets() {
            Ok(Verifier::KeySets(KeySets::start(config, metrics)?))
        } else {
            Ok(Verifier::KeyFile(Box::new(KeyFile::new(config)?)))
        }
    }

    /// The verdict on `token` now, or the wait for a fetch of its provider's keys (an unknown
    /// `kid`). Callers that must not wait in place (a session actor) spawn the latter.
    pub fn check(&self, token: &str) -> Check {
        match self {
            Verifier::KeyFile(key) => Check::Done(key.verify(token)),
            Verifier::KeySets(sets) => sets.check(token),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        match self.check(token) {
            Check::Done(verdict) => verdict,
            Check::AfterRefresh(refresh) => refresh.outcome().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rule() {
        for ok in ["alice", "a.b_c:d@e-f", &"x".repeat(128)] {
            assert!(is_valid_user_id(ok), "{ok}");
        }
        for bad in ["", "has space", "é", "a/b", &"x".repeat(129)] {
            assert!(!is_valid_user_id(bad), "{bad}");
        }
    }

    fn config() -> AuthConfig {
        AuthConfig { secret: "a-secret-of-the-unit-tests-0123".into(), ..AuthConfig::default() }
    }

    #[test]
    fn minted_tokens_verify() {
        let config = config();
        let (token, exp) = Minter::new(&config).unwrap().mint("alice", Some("Alice"), 60).unwrap();
        let identity = KeyFile::new(&config).unwrap().verify(&token).unwrap();
        assert_eq!(identity.user_id, "alice");
        assert_eq!(identity.expires_at_ms, exp);
    }

    #[test]
    fn unsupported_alg_header_is_named() {
        // {"alg":"none","typ":"JWT"}.{"sub":"a","exp":9999999999}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        let verifier = KeyFile::new(&config()).unwrap();
        assert_eq!(verifier.verify(none), Err(AuthFailure::WrongAlgorithm));
        assert_eq!(verifier.verify("not-a-jwt"), Err(AuthFailure::Malformed));
    }
}
