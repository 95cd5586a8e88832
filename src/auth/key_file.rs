//! The verifier of a key the operator holds: the HS256 shared secret (`auth.secret`) or a public
//! key file (`auth.public_key_file`, RS256 or ES256). Exactly the configured algorithm is
//! accepted (docs/protocol.md section 2).

use jsonwebtoken::{DecodingKey, Validation};

use super::claims::{self, Expected};
use super::{AuthFailure, Identity};
use crate::config::{Algorithm, AuthConfig};

pub fn algorithm(config: &AuthConfig) -> jsonwebtoken::Algorithm {
    match config.algorithm {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
    }
}

pub fn read_key(key: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {path}: {e}"))
}

pub struct KeyFile {
    key: DecodingKey,
    validation: Validation,
}

impl KeyFile {
    /// Errors name the configuration key that is wrong.
    pub fn new(config: &AuthConfig) -> Result<KeyFile, String> {
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
        let expected =
            Expected { issuer: &config.issuer, audience: &config.audience, leeway_secs: config.leeway_secs };
        Ok(KeyFile { key, validation: claims::validation(alg, &expected) })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        claims::decode(token, &self.key, &self.validation)
    }
}
