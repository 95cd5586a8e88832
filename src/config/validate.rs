//! The checks a configuration's types cannot express: ranges (`limits.max_message_bytes` of at
//! least 1024), formats (origins, URLs, Redis names), keys that must agree with one another
//! (`limits.burst` and `limits.messages_per_second`), and what is unsafe off loopback. Plain
//! "not 0" is no check here: those keys are `NonZero*` in `schema.rs`, and reading refuses 0.
//!
//! Every refusal names one key, the first that is wrong, so the operator fixes one line at a time.

use std::path::Path;

use super::{error, same_issuer, AgentKind, Algorithm, BrokerKind, Config, ConfigError, StoreKind};

impl Config {
    /// Checks what the types cannot; the error names the first key that is wrong. `from_sources`
    /// calls it, and so should code that builds a `Config` by hand (the tests do).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_server()?;
        self.check_auth()?;
        self.check_limits()?;
        self.check_relations()?;
        self.check_broker()?;
        self.check_store()?;
        self.check_agent()?;
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return Err(error("api.keys", "every key must be at least 16 characters"));
        }
        self.check_loopback_only()
    }

    fn check_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for origin in &s.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                return Err(error(
                    "server.allowed_origins",
                    format!("{origin:?} is not an origin like \"https://chat.example.com\""),
                ));
            }
        }
        if !s.static_dir.is_empty() && !Path::new(&s.static_dir).is_dir() {
            return Err(error("server.static_dir", format!("{:?} is not a folder", s.static_dir)));
        }
        Ok(())
    }

    fn check_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.uses_key_sets() {
            return self.check_key_sets();
        }
        match a.algorithm {
            Algorithm::HS256 => {
                // In development mode an empty secret is made on first start (`Config::load`).
                if a.secret.is_empty() && !self.server.dev_mode {
                    return Err(error(
                        "auth.secret",
                        "is required with HS256: set auth.secret (or AGENTWIRE__AUTH__SECRET) to a secret \
                         of at least 16 characters, or server.dev_mode = true for local development",
                    ));
                }
                if !a.secret.is_empty() && a.secret.len() < 16 {
                    return Err(error("auth.secret", "must be at least 16 characters"));
                }
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                if a.public_key_file.is_empty() {
                    return Err(error("auth.public_key_file", "is required with RS256 and ES256"));
                }
            }
        }
        Ok(())
    }

    /// `[auth]` with identity providers (docs/protocol.md section 2): each entry names where its
    /// keys are, once, and which `iss` it answers for; no two entries answer for the same one.
    fn check_key_sets(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.dev_tokens {
            return Err(error(
                "auth.dev_tokens",
                "tokens an identity provider's keys verify cannot be minted here: set auth.dev_tokens = false",
            ));
        }
        let http = |url: &str| url.starts_with("http://") || url.starts_with("https://");
        let own_keys = !a.jwks_url.is_empty() || !a.oidc_issuer.is_empty();
        // `[auth]`'s issuer and audience are its own provider's: without one they would apply to
        // nothing, silently leaving `aud` unchecked where the operator meant it checked.
        for (key, value) in [("auth.issuer", &a.issuer), ("auth.audience", &a.audience)] {
            if !own_keys && !value.is_empty() {
                return Err(error(
                    key,
                    "applies to auth.jwks_url or auth.oidc_issuer, which are empty: give each [[auth.issuers]] \
                     entry its own issuer and audience",
                ));
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        let own = usize::from(own_keys);
        let entries = a.key_set_issuers();
        for (i, entry) in entries.iter().enumerate() {
            let at = |field: &str| {
                if i < own {
                    format!("auth.{field}")
                } else {
                    format!("auth.issuers[{}].{field}", i - own)
                }
            };
            match (entry.jwks_url.is_empty(), entry.oidc_issuer.is_empty()) {
                (false, false) => {
                    return Err(error(at("oidc_issuer"), "give either jwks_url or oidc_issuer, not both"))
                }
                (true, true) => return Err(error(at("jwks_url"), "is required (or oidc_issuer)")),
                (false, true) if !http(&entry.jwks_url) => {
                    return Err(error(at("jwks_url"), format!("{:?} is not an http(s) URL", entry.jwks_url)))
                }
                (true, false) if !http(&entry.oidc_issuer) => {
                    return Err(error(
                        at("oidc_issuer"),
                        format!("{:?} is not an http(s) URL", entry.oidc_issuer),
                    ))
                }
                _ => {}
            }
            let issuer = entry.expected_issuer();
            // Only a lone provider may leave `iss` unchecked: with several, `iss` picks the keys.
            if issuer.is_empty() && entries.len() > 1 {
                return Err(error(
                    at("issuer"),
                    "is required when several identity providers are configured",
                ));
            }
            if !issuer.is_empty() && seen.iter().any(|other| same_issuer(other, issuer)) {
                return Err(error(at("issuer"), format!("{issuer:?} is configured twice")));
            }
            seen.push(issuer);
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_message_bytes < 1024 {
            return Err(error("limits.max_message_bytes", "must be at least 1024"));
        }
        if l.burst < l.messages_per_second {
            return Err(error("limits.burst", "must be at least limits.messages_per_second"));
        }
        if l.client_timeout_secs <= l.heartbeat_interval_secs.get() {
            return Err(error(
                "limits.client_timeout_secs",
                "must be longer than limits.heartbeat_interval_secs",
            ));
        }
        Ok(())
    }

    /// Limits that only make sense together; the first broken relation is the one line reported.
    fn check_relations(&self) -> Result<(), ConfigError> {
        let (l, h) = (&self.limits, &self.history);
        let max_message_bytes = l.max_message_bytes;
        let relations: [(bool, &str, String); 6] = [
            (
                l.unauthenticated_bytes.get() >= crate::protocol::MAX_AUTH_FRAME_BYTES,
                "limits.unauthenticated_bytes",
                format!("must be at least {}: the largest auth frame must fit", crate::protocol::MAX_AUTH_FRAME_BYTES),
            ),
            (
                l.pending_bytes.get() >= max_message_bytes,
                "limits.pending_bytes",
                format!("must be at least limits.max_message_bytes ({max_message_bytes}): one early frame of the largest size must fit"),
            ),
            (
                l.max_unauthenticated_per_ip <= l.max_unauthenticated,
                "limits.max_unauthenticated",
                format!("must be at least limits.max_unauthenticated_per_ip ({})", l.max_unauthenticated_per_ip),
            ),
            (
                h.max_bytes_per_user <= h.max_bytes,
                "history.max_bytes_per_user",
                format!("must be at most history.max_bytes ({})", h.max_bytes),
            ),
            (
                h.max_users > l.max_connections,
                "history.max_users",
                format!("must be more than limits.max_connections ({}): every online user has a stream", l.max_connections),
            ),
            (
                // The echo of a largest message and the frames around it must fit a session.
                l.max_outbound_bytes.get() >= 2 * max_message_bytes,
                "limits.max_outbound_bytes",
                format!("must be at least twice limits.max_message_bytes ({max_message_bytes})"),
            ),
        ];
        for (holds, key, message) in relations {
            if !holds {
                return Err(error(key, message));
            }
        }
        Ok(())
    }

    fn check_broker(&self) -> Result<(), ConfigError> {
        let b = &self.broker;
        if b.kind != BrokerKind::Redis {
            return Ok(());
        }
        if !(b.url.starts_with("redis://") || b.url.starts_with("rediss://")) {
            return Err(error("broker.url", "must be a redis:// or rediss:// URL"));
        }
        if b.prefix.is_empty() || b.prefix.contains(['{', '}', ' ', ':']) {
            return Err(error("broker.prefix", "must be a non-empty name without braces, colons or spaces"));
        }
        if b.node_id.contains(['/', '\n', ' ', '{', '}']) {
            return Err(error("broker.node_id", "must not contain '/', braces or white space"));
        }
        if b.max_queued_bytes < 64 * 1024 {
            return Err(error("broker.max_queued_bytes", "must be at least 65536"));
        }
        if b.node_lease_secs < 2 {
            return Err(error("broker.node_lease_secs", "must be at least 2 (nodes beat every second)"));
        }
        Ok(())
    }

    /// Several nodes share one database: docs/conversations.md.
    fn check_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        if self.broker.kind == BrokerKind::Redis && s.kind != StoreKind::Postgres {
            return Err(error(
                "store.kind",
                "must be \"postgres\" with broker.kind = \"redis\": every node needs the same conversations",
            ));
        }
        if s.kind == StoreKind::Postgres
            && !(s.url.starts_with("postgres://") || s.url.starts_with("postgresql://"))
        {
            return Err(error("store.url", "must be a postgres:// URL"));
        }
        if s.kind == StoreKind::Sqlite && s.path.as_os_str().is_empty() {
            return Err(error("store.path", "must name the SQLite file"));
        }
        Ok(())
    }

    fn check_agent(&self) -> Result<(), ConfigError> {
        let g = &self.agent;
        if let Err(why) = g.header_map() {
            return Err(error("agent.headers", why));
        }
        if g.kind == AgentKind::AgUi && !(g.url.starts_with("http://") || g.url.starts_with("https://")) {
            return Err(error(
                "agent.url",
                format!(
                    "{:?} is not an http(s) URL; kind = \"ag-ui\" needs the agent's AG-UI endpoint",
                    g.url
                ),
            ));
        }
        Ok(())
    }

    /// Development mode and dev tokens let anyone in: loopback binds only.
    fn check_loopback_only(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.bind.ip().is_loopback() {
            return Ok(());
        }
        if s.dev_mode {
            return Err(error(
                "server.dev_mode",
                format!(
                    "development mode is for loopback only, not the bind {}: set server.dev_mode = \
                     false and give auth.secret",
                    s.bind
                ),
            ));
        }
        if self.auth.dev_tokens {
            return Err(error(
                "auth.dev_tokens",
                format!(
                    "anyone could mint tokens through /dev/token on the non-loopback bind {}: \
                     set auth.dev_tokens = false",
                    s.bind
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{env, SECRET};
    use crate::config::Config;

    #[test]
    fn built_in_defaults_are_safe_to_deploy() {
        let defaults = Config::default();
        assert!(!defaults.auth.dev_tokens && !defaults.server.dev_mode);
        assert!(defaults.auth.secret.is_empty());
        let err = Config::from_sources("", &[]).unwrap_err();
        assert_eq!(err.key, "auth.secret");
    }

    #[test]
    fn the_secret_is_at_least_16_characters() {
        let short = Config::from_sources("", &env(&[("AGENTWIRE__AUTH__SECRET", "0123456789abcde")]));
        assert_eq!(short.unwrap_err().key, "auth.secret");
        assert!(Config::from_sources("", &env(&[("AGENTWIRE__AUTH__SECRET", "0123456789abcdef")])).is_ok());
        let missing = Config::from_sources("", &[]).unwrap_err();
        assert!(missing.message.contains("at least 16 characters"), "{missing}");
    }

    #[test]
    fn identity_providers_need_no_secret_and_each_names_its_keys_and_issuer() {
        let jwks = ("AGENTWIRE__AUTH__JWKS_URL", "https://idp.example/.well-known/jwks.json");
        let config = Config::from_sources("", &env(&[jwks])).unwrap();
        assert!(config.auth.uses_key_sets() && !config.dev_tokens_enabled());
        let two = r#"
            [auth]
            oidc_issuer = "https://a.example/"
            [[auth.issuers]]
            issuer = "https://b.example"
            jwks_url = "https://b.example/jwks.json"
            audience = "agentwire"
        "#;
        assert!(super::same_issuer("https://a.example/", "https://a.example"));
        assert!(!super::same_issuer("https://a.example//", "https://a.example"));
        let config = Config::from_sources(two, &[]).unwrap();
        let issuers = config.auth.key_set_issuers();
        assert_eq!(issuers.len(), 2);
        assert_eq!(issuers[0].expected_issuer(), "https://a.example/");
        let cases: &[(&str, &str)] = &[
            ("[auth]\njwks_url = \"https://a/k\"\noidc_issuer = \"https://a\"", "auth.oidc_issuer"),
            ("[auth]\njwks_url = \"idp.example/keys\"", "auth.jwks_url"),
            ("[[auth.issuers]]\nissuer = \"https://b\"", "auth.issuers[0].jwks_url"),
            ("[auth]\njwks_url = \"https://a/k\"\n[[auth.issuers]]\noidc_issuer = \"https://b\"", "auth.issuer"),
            (
                "[[auth.issuers]]\noidc_issuer = \"https://b\"\n[[auth.issuers]]\nissuer = \"https://b/\"\njwks_url = \"https://b/k\"",
                "auth.issuers[1].issuer",
            ),
            ("[auth]\ndev_tokens = true\njwks_url = \"https://a/k\"", "auth.dev_tokens"),
            ("[auth]\naudience = \"api\"\n[[auth.issuers]]\noidc_issuer = \"https://b\"", "auth.audience"),
        ];
        for (toml, key) in cases {
            let err = Config::from_sources(toml, &[]).unwrap_err();
            assert_eq!(&err.key, key, "{toml}: {err}");
        }
    }

    #[test]
    fn relations_between_limits_are_checked() {
        let cases: &[(&str, &str)] = &[
            ("AGENTWIRE__LIMITS__PENDING_BYTES", "limits.pending_bytes"),
            ("AGENTWIRE__LIMITS__UNAUTHENTICATED_BYTES", "limits.unauthenticated_bytes"),
            ("AGENTWIRE__LIMITS__MAX_UNAUTHENTICATED", "limits.max_unauthenticated"),
            ("AGENTWIRE__HISTORY__MAX_BYTES", "history.max_bytes_per_user"),
            ("AGENTWIRE__HISTORY__MAX_USERS", "history.max_users"),
            ("AGENTWIRE__LIMITS__MAX_OUTBOUND_BYTES", "limits.max_outbound_bytes"),
            ("AGENTWIRE__LIMITS__BURST", "limits.burst"),
            ("AGENTWIRE__LIMITS__CLIENT_TIMEOUT_SECS", "limits.client_timeout_secs"),
            ("AGENTWIRE__LIMITS__MAX_MESSAGE_BYTES", "limits.max_message_bytes"),
        ];
        for (var, key) in cases {
            let err = Config::from_sources("", &env(&[SECRET, (var, "5")])).unwrap_err();
            assert_eq!(&err.key, key, "{var}: {err}");
        }
    }

    #[test]
    fn refuses_development_auth_on_a_public_bind() {
        let public = ("AGENTWIRE__SERVER__BIND", "0.0.0.0:8080");
        let err = Config::from_sources("", &env(&[public])).unwrap_err();
        assert_eq!(err.key, "auth.secret");
        let err =
            Config::from_sources("", &env(&[public, ("AGENTWIRE__SERVER__DEV_MODE", "true")])).unwrap_err();
        assert_eq!(err.key, "server.dev_mode");
        let secret = ("AGENTWIRE__AUTH__SECRET", "s3cret-s3cret-s3cret");
        let err = Config::from_sources("", &env(&[public, secret, ("AGENTWIRE__AUTH__DEV_TOKENS", "true")]))
            .unwrap_err();
        assert_eq!(err.key, "auth.dev_tokens");
        let ok = Config::from_sources(
            "",
            &env(&[
                public,
                ("AGENTWIRE__AUTH__SECRET", "s3cret-s3cret-s3cret"),
                ("AGENTWIRE__AUTH__DEV_TOKENS", "false"),
            ]),
        );
        assert!(ok.is_ok());
    }
}
