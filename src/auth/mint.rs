//! Minting tokens for development and tests (`agentwire token`, `POST /dev/token`) with the
//! operator's own key. A server verifying with an identity provider's keys mints nothing: those
//! tokens are the provider's to sign.

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use super::key_file::{algorithm, read_key};
use super::{is_valid_user_id, USER_ID_RULE};
use crate::config::{Algorithm, AuthConfig};

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

/// Signs tokens with the configured key.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    pub fn new(config: &AuthConfig) -> Result<Minter, String> {
        if config.uses_key_sets() {
            return Err(
                "auth.jwks_url: tokens an identity provider's keys verify are minted by that provider"
                    .to_owned(),
            );
        }
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
