//! JWT verification (protocol section 2) and minting (`agentwire token`, `POST /dev/token`).
//!
//! Verification accepts exactly the configured algorithm, requires `exp` and a well-formed `sub`,
//! and reports each refusal as an [`AuthFailure`] whose `reason()` labels the metric. Tokens are
//! never logged: nothing here formats one.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, AuthConfig};

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
        }
    }

    /// The `message` a client sees.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Malformed => "the token is not a well-formed JWT",
            AuthFailure::BadSignature => "the token's signature does not verify",
            AuthFailure::WrongAlgorithm => "the token is not signed with the configured algorithm",
            AuthFailure::Expired => "the token has expired",
            AuthFailure::NotYetValid => "the token is not valid yet (nbf)",
            AuthFailure::MissingClaim => {
                "the token lacks a required claim (exp, sub, and iss or aud when configured)"
            }
            AuthFailure::InvalidSubject => concat!("the token's sub must match ", user_id_rule!()),
            AuthFailure::WrongIssuer => "the token's issuer is not accepted",
            AuthFailure::WrongAudience => "the token's audience is not accepted",
            AuthFailure::Timeout => "no token came in time",
        }
    }
}

/// The user id rule of section 2: [`USER_ID_RULE`].
pub fn is_valid_user_id(sub: &str) -> bool {
    (1..=128).contains(&sub.len())
        && sub.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

#[derive(Deserialize)]
struct VerifiedClaims {
    // Kept loose so a non-string `sub` is reported as an invalid subject, not a malformed token.
    sub: serde_json::Value,
    exp: u64,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

fn algorithm(config: &AuthConfig) -> jsonwebtoken::Algorithm {
    match config.algorithm {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
    }
}

fn read_key(key: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {path}: {e}"))
}

/// Checks tokens against the configured key and claims.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// Errors name the configuration key that is wrong.
    pub fn new(config: &AuthConfig) -> Result<Verifier, String> {
        let alg = algorithm(config);
        let key = match config.algorithm {
            Algorithm::HS256 => DecodingKey::from_secret(config.secret.as_bytes()),
            Algorithm::RS256 => {
                DecodingKey::from_rsa_pem(&read_key("auth.public_key_file", &config.public_key_file)?)
            }
            Algorithm::ES256 => {
                DecodingKey::from_ec_pem(&read_key("auth.public_key_file", &config.public_key_file)?)
            }
        }
        .map_err(|e| format!("auth.public_key_file: not a usable {alg:?} key: {e}"))?;
        let mut validation = Validation::new(alg);
        // jsonwebtoken checks `iss` and `aud` only when a token carries them unless they are
        // required: a configured issuer or audience must be present, not merely not wrong.
        let mut required = vec!["exp", "sub"];
        if !config.issuer.is_empty() {
            required.push("iss");
        }
        if !config.audience.is_empty() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.leeway = config.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = !config.audience.is_empty();
        if !config.audience.is_empty() {
            validation.set_audience(&[&config.audience]);
        }
        if !config.issuer.is_empty() {
            validation.set_issuer(&[&config.issuer]);
        }
        Ok(Verifier { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let data =
            jsonwebtoken::decode::<VerifiedClaims>(token, &self.key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::UnsupportedAlgorithm => AuthFailure::WrongAlgorithm,
                    ErrorKind::ExpiredSignature => AuthFailure::Expired,
                    ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                    ErrorKind::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
                    ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
                    ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
                    ErrorKind::InvalidSubject => AuthFailure::InvalidSubject,
                    // An `alg` the library has no name for ("none" among them) fails header parsing.
                    ErrorKind::Json(_) if header_alg_is_unsupported(token) => AuthFailure::WrongAlgorithm,
                    _ => AuthFailure::Malformed,
                }
            })?;
        let claims = data.claims;
        let user_id = match claims.sub {
            serde_json::Value::String(sub) if is_valid_user_id(&sub) => sub,
            _ => return Err(AuthFailure::InvalidSubject),
        };
        Ok(Identity { user_id, expires_at_ms: claims.exp.saturating_mul(1000) })
    }
}

fn header_alg_is_unsupported(token: &str) -> bool {
    use base64::Engine;
    let Some(encoded) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('='))
    else {
        return false;
    };
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    header.get("alg").and_then(|a| a.as_str()).is_some_and(|alg| !matches!(alg, "HS256" | "RS256" | "ES256"))
}

/// Signs tokens with the configured key.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    pub fn new(config: &AuthConfig) -> Result<Minter, String> {
        let key = match config.algorithm {
            Algorithm::HS256 => EncodingKey::from_secret(config.secret.as_bytes()),
            Algorithm::RS256 | Algorithm::ES256 if config.private_key_file.is_empty() => {
                return Err("auth.private_key_file: required to mint RS256/ES256 tokens".to_owned())
            }
            Algorithm::RS256 => {
                EncodingKey::from_rsa_pem(&read_key("auth.private_key_file", &config.private_key_file)?)
            }
            Algorithm::ES256 => {
                EncodingKey::from_ec_pem(&read_key("auth.private_key_file", &config.private_key_file)?)
            }
        }
        .map_err(|e| format!("auth.private_key_file: not a usable key: {e}"))?;
        let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
        Ok(Minter {
            key,
            header: Header::new(algorithm(config)),
            issuer: non_empty(&config.issuer),
            audience: non_empty(&config.audience),
        })
    }

    /// A token for `sub` valid for `ttl_secs`; returns the token and its `exp` in milliseconds.
    pub fn mint(&self, sub: &str, name: Option<&str>, ttl_secs: u64) -> Result<(String, u64), String> {
        if !is_valid_user_id(sub) {
            return Err(format!("sub must match {USER_ID_RULE}"));
        }
        let now = crate::protocol::now_ms() / 1000;
        let exp = now + ttl_secs;
        let claims = MintedClaims {
            sub,
            exp,
            iat: now,
            name,
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|e| e.to_string())?;
        Ok((token, exp * 1000))
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
        let identity = Verifier::new(&config).unwrap().verify(&token).unwrap();
        assert_eq!(identity.user_id, "alice");
        assert_eq!(identity.expires_at_ms, exp);
    }

    #[test]
    fn unsupported_alg_header_is_named() {
        // {"alg":"none","typ":"JWT"}.{"sub":"a","exp":9999999999}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        let verifier = Verifier::new(&config()).unwrap();
        assert_eq!(verifier.verify(none), Err(AuthFailure::WrongAlgorithm));
        assert_eq!(verifier.verify("not-a-jwt"), Err(AuthFailure::Malformed));
    }
}
