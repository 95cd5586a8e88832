//! What every verifier checks once a key is chosen: the claims of docs/protocol.md section 2
//! (`exp`, `nbf`, `sub`, and `iss`/`aud` when configured), with each refusal told apart as an
//! [`AuthFailure`]. Shared by the key-file verifier and the key sets, so that a token is judged
//! the same whichever key verifies it.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{is_valid_user_id, AuthFailure, Identity};

/// What a verified token must say besides its signature.
pub struct Expected<'a> {
    /// Empty: `iss` is not checked.
    pub issuer: &'a str,
    /// Empty: `aud` is not checked.
    pub audience: &'a str,
    pub leeway_secs: u64,
}

/// The checks for a token signed with `alg`, the only algorithm accepted.
pub fn validation(alg: Algorithm, expected: &Expected<'_>) -> Validation {
    let mut validation = Validation::new(alg);
    // jsonwebtoken checks `iss` and `aud` only when a token carries them unless they are
    // required: a configured issuer or audience must be present, not merely not wrong.
    let mut required = vec!["exp", "sub"];
    if !expected.issuer.is_empty() {
        required.push("iss");
        validation.set_issuer(&[expected.issuer]);
    }
    if !expected.audience.is_empty() {
        required.push("aud");
        validation.set_audience(&[expected.audience]);
    }
    validation.set_required_spec_claims(&required);
    validation.leeway = expected.leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = !expected.audience.is_empty();
    validation
}

#[derive(Deserialize)]
struct VerifiedClaims {
    // Kept loose so a non-string `sub` is reported as an invalid subject, not a malformed token.
    sub: serde_json::Value,
    exp: u64,
}

/// Verifies the signature with `key` and the claims with `validation`.
pub fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Identity, AuthFailure> {
    let data =
        jsonwebtoken::decode::<VerifiedClaims>(token, key, validation).map_err(|e| match e.kind() {
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
            _ => header_failure(token),
        })?;
    let claims = data.claims;
    let user_id = match claims.sub {
        serde_json::Value::String(sub) if is_valid_user_id(&sub) => sub,
        _ => return Err(AuthFailure::InvalidSubject),
    };
    Ok(Identity { user_id, expires_at_ms: claims.exp.saturating_mul(1000) })
}

/// The header of a token, or why it is refused: an `alg` jsonwebtoken has no name for (`none`
/// among them) fails header parsing, and is a wrong algorithm rather than a malformed token.
pub fn header(token: &str) -> Result<jsonwebtoken::Header, AuthFailure> {
    jsonwebtoken::decode_header(token).map_err(|_| header_failure(token))
}

fn header_failure(token: &str) -> AuthFailure {
    if header_alg_is_unsupported(token) {
        AuthFailure::WrongAlgorithm
    } else {
        AuthFailure::Malformed
    }
}

fn header_alg_is_unsupported(token: &str) -> bool {
    let Some(header) = token.split('.').next().and_then(json_part) else {
        return false;
    };
    header.get("alg").and_then(|a| a.as_str()).is_some_and(|alg| alg.parse::<Algorithm>().is_err())
}

/// The `iss` a token claims, before anything is verified: it only picks which provider's keys
/// may verify the token, and the chosen verification checks it again.
pub fn claimed_issuer(token: &str) -> Option<String> {
    let payload = json_part(token.split('.').nth(1)?)?;
    payload.get("iss")?.as_str().map(str::to_owned)
}

/// One base64url-encoded JSON part of a compact JWT.
fn json_part(encoded: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}
