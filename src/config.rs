//! Configuration: built-in defaults, then `config.toml` (or `--config PATH`), then environment
//! overrides `AGENTWIRE__SECTION__KEY`, then validation. Every failure names the key it is about,
//! so an operator reads one line and knows what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The development secret the server ships with; it is refused on a non-loopback bind.
pub const DEV_SECRET: &str = "agentwire-development-secret-do-not-deploy";

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "AGENTWIRE__";

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub history: HistoryConfig,
    pub agent: AgentConfig,
    pub api: ApiConfig,
    pub faults: FaultsConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// 0 means one worker per core.
    pub workers: usize,
    /// Empty accepts every Origin.
    pub allowed_origins: Vec<String>,
    pub shutdown_grace_secs: u64,
    /// Serve the frontend from this folder instead of the copy built into the binary (for
    /// editing it); empty uses the built-in copy.
    pub static_dir: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            allowed_origins: Vec::new(),
            shutdown_grace_secs: 10,
            static_dir: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Algorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub algorithm: Algorithm,
    /// HS256 shared secret.
    pub secret: String,
    /// RS256/ES256: PEM public key used to verify.
    pub public_key_file: String,
    /// RS256/ES256: PEM private key, only needed to mint tokens (`agentwire token`, `/dev/token`).
    pub private_key_file: String,
    /// Empty: `iss` is not checked.
    pub issuer: String,
    /// Empty: `aud` is not checked.
    pub audience: String,
    pub leeway_secs: u64,
    pub timeout_secs: u64,
    pub dev_tokens: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithm: Algorithm::HS256,
            secret: DEV_SECRET.to_owned(),
            public_key_file: String::new(),
            private_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
            timeout_secs: 10,
            dev_tokens: true,
        }
    }
}

// The secret must never reach a log line, so Debug leaves it out.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .field("public_key_file", &self.public_key_file)
            .field("private_key_file", &self.private_key_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("timeout_secs", &self.timeout_secs)
            .field("dev_tokens", &self.dev_tokens)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_sessions_per_user: usize,
    pub max_message_bytes: usize,
    pub max_content_chars: usize,
    pub messages_per_second: u32,
    pub burst: u32,
    pub pending_messages: usize,
    pub max_outbound_bytes: usize,
    pub heartbeat_interval_secs: u64,
    pub client_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_sessions_per_user: 16,
            max_message_bytes: 65_536,
            max_content_chars: 16_000,
            messages_per_second: 20,
            burst: 40,
            pending_messages: 32,
            max_outbound_bytes: 1 << 20,
            heartbeat_interval_secs: 5,
            client_timeout_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub events_per_user: usize,
    pub ttl_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { events_per_user: 1000, ttl_secs: 300 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    Demo,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub kind: AgentKind,
    pub step_delay_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { kind: AgentKind::Demo, step_delay_ms: 120 }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Server API keys for `/api/v1`; empty disables the API (every request gets 401).
    pub keys: Vec<String>,
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { keys: Vec::new(), max_body_bytes: 1 << 20 }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("keys", &format_args!("<{} redacted>", self.keys.len()))
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// The registry waits this long before `services_ready`.
    pub setup_delay_ms: u64,
    /// Setup fails for every user whose id starts with this; empty is off.
    pub fail_setup_user_prefix: String,
}

impl FaultsConfig {
    pub fn any_enabled(&self) -> bool {
        self.setup_delay_ms > 0 || !self.fail_setup_user_prefix.is_empty()
    }
}

/// A configuration that cannot be used; `Display` is the one line the operator sees.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), message: message.into() }
}

/// Where the configuration came from, for the start-up log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Defaults,
    File(PathBuf),
}

impl Config {
    /// Loads `explicit`, else `./config.toml` when it exists, else the defaults; then applies the
    /// process environment's overrides and validates.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Source), ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let (text, source) = match explicit {
            Some(path) => (read(path)?, Source::File(path.to_owned())),
            None => {
                let default = Path::new("config.toml");
                if default.is_file() {
                    (read(default)?, Source::File(default.to_owned()))
                } else {
                    (String::new(), Source::Defaults)
                }
            }
        };
        let config = Config::from_sources(&text, &env)?;
        Ok((config, source))
    }

    /// Builds a validated configuration from TOML text and `(name, value)` environment pairs.
    pub fn from_sources(toml_text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut table = defaults_table();
        let file: toml::Table =
            toml_text.parse().map_err(|e: toml::de::Error| error("config file", e.message().to_owned()))?;
        merge(&mut table, file)?;
        apply_env(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            error(key, e.into_inner().message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.shutdown_grace_secs == 0 {
            return Err(error("server.shutdown_grace_secs", "must be at least 1"));
        }
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

        let a = &self.auth;
        match a.algorithm {
            Algorithm::HS256 => {
                if a.secret.is_empty() {
                    return Err(error("auth.secret", "must not be empty with HS256"));
                }
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                if a.public_key_file.is_empty() {
                    return Err(error("auth.public_key_file", "is required with RS256 and ES256"));
                }
            }
        }
        if a.timeout_secs == 0 {
            return Err(error("auth.timeout_secs", "must be at least 1"));
        }

        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_sessions_per_user", l.max_sessions_per_user as u64),
            ("limits.max_content_chars", l.max_content_chars as u64),
            ("limits.messages_per_second", l.messages_per_second as u64),
            ("limits.max_outbound_bytes", l.max_outbound_bytes as u64),
            ("limits.heartbeat_interval_secs", l.heartbeat_interval_secs),
            ("history.events_per_user", self.history.events_per_user as u64),
            ("api.max_body_bytes", self.api.max_body_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(error(key, "must be at least 1"));
            }
        }
        if l.max_message_bytes < 1024 {
            return Err(error("limits.max_message_bytes", "must be at least 1024"));
        }
        if l.burst < l.messages_per_second {
            return Err(error("limits.burst", "must be at least limits.messages_per_second"));
        }
        if l.client_timeout_secs <= l.heartbeat_interval_secs {
            return Err(error(
                "limits.client_timeout_secs",
                "must be longer than limits.heartbeat_interval_secs",
            ));
        }
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return Err(error("api.keys", "every key must be at least 16 characters"));
        }

        if !s.bind.ip().is_loopback() {
            if a.algorithm == Algorithm::HS256 && a.secret == DEV_SECRET {
                return Err(error(
                    "auth.secret",
                    format!(
                        "the built-in development secret is refused on the non-loopback bind {}: \
                         set auth.secret (or AGENTWIRE__AUTH__SECRET) to your own secret",
                        s.bind
                    ),
                ));
            }
            if a.dev_tokens {
                return Err(error(
                    "auth.dev_tokens",
                    format!(
                        "anyone could mint tokens through /dev/token on the non-loopback bind {}: \
                         set auth.dev_tokens = false",
                        s.bind
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Worker threads to start: `server.workers`, or one per core for 0.
    pub fn worker_count(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| error("--config", format!("cannot read {}: {e}", path.display())))
}

fn defaults_table() -> toml::Table {
    match toml::Table::try_from(Config::default()) {
        Ok(table) => table,
        // The defaults are plain data; failing to express them in TOML is a bug caught by tests.
        Err(e) => panic!("default configuration is not representable in TOML: {e}"),
    }
}

/// Overlays a file's sections onto the defaults, section by section.
fn merge(base: &mut toml::Table, overlay: toml::Table) -> Result<(), ConfigError> {
    for (section, value) in overlay {
        match (base.get_mut(&section), value) {
            (Some(toml::Value::Table(target)), toml::Value::Table(keys)) => target.extend(keys),
            (Some(_), _) => return Err(error(section, "must be a table like [section]")),
            (None, _) => return Err(error(section, "unknown section")),
        }
    }
    Ok(())
}

/// Applies `AGENTWIRE__SECTION__KEY=value`. The default's type says how to read the text, so a
/// numeric-looking secret stays a string and `a,b` fills a list.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(2, "__");
        let (Some(section), Some(key)) = (parts.next(), parts.next()) else {
            return Err(error(name.as_str(), "expected AGENTWIRE__SECTION__KEY"));
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        let dotted = format!("{section}.{key}");
        let current = table
            .get(&section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(&key))
            .ok_or_else(|| error(name.as_str(), format!("unknown key {dotted}")))?;
        let bad = |what: &str| error(dotted.clone(), format!("{name}={raw:?} is not {what}"));
        let value = match current {
            toml::Value::String(_) => toml::Value::String(raw.clone()),
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?)
            }
            toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad("true or false")),
            }),
            toml::Value::Array(_) => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
            _ => return Err(bad("supported in the environment")),
        };
        if let Some(toml::Value::Table(section_table)) = table.get_mut(&section) {
            section_table.insert(key, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_protocol() {
        let config = Config::from_sources("", &[]).unwrap();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.limits.max_message_bytes, 65_536);
        assert_eq!(config.limits.pending_messages, 32);
        assert_eq!(config.history.events_per_user, 1000);
        assert_eq!(config.auth.leeway_secs, 30);
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults() {
        let shipped = include_str!("../config.toml");
        let from_file = Config::from_sources(shipped, &[]).unwrap();
        let shipped_table = toml::Table::try_from(&from_file).unwrap();
        assert_eq!(shipped_table, defaults_table(), "config.toml and Config::default() disagree");
    }

    #[test]
    fn file_then_env_overrides() {
        let config = Config::from_sources(
            "[limits]\nburst = 80\n[auth]\nsecret = \"from-file\"",
            &env(&[
                ("AGENTWIRE__SERVER__BIND", "127.0.0.1:9000"),
                ("AGENTWIRE__AUTH__SECRET", "12345"),
                ("AGENTWIRE__API__KEYS", "key-one-0123456789, key-two-0123456789"),
                ("AGENTWIRE__AUTH__DEV_TOKENS", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.bind.port(), 9000);
        assert_eq!(config.auth.secret, "12345");
        assert_eq!(config.limits.burst, 80);
        assert_eq!(config.api.keys, vec!["key-one-0123456789", "key-two-0123456789"]);
        assert!(!config.auth.dev_tokens);
    }

    #[test]
    fn errors_name_the_key() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("[limits]\nburst = \"many\"", &[], "limits.burst"),
            ("[limits]\nbursts = 3", &[], "limits"),
            ("[nope]\nx = 1", &[], "nope"),
            ("", &[("AGENTWIRE__LIMITS__BURST", "lots")], "limits.burst"),
            ("", &[("AGENTWIRE__LIMITS__NOPE", "1")], "AGENTWIRE__LIMITS__NOPE"),
            ("", &[("AGENTWIRE__SERVER__BIND", "localhost")], "server.bind"),
            ("", &[("AGENTWIRE__AUTH__ALGORITHM", "HS512")], "auth.algorithm"),
            ("", &[("AGENTWIRE__LIMITS__CLIENT_TIMEOUT_SECS", "2")], "limits.client_timeout_secs"),
        ];
        for (text, vars, key) in cases {
            let err = Config::from_sources(text, &env(vars)).unwrap_err();
            assert!(err.key.starts_with(key), "{text} {vars:?}: got {err}");
        }
    }

    #[test]
    fn refuses_development_auth_on_a_public_bind() {
        let public = ("AGENTWIRE__SERVER__BIND", "0.0.0.0:8080");
        let err = Config::from_sources("", &env(&[public])).unwrap_err();
        assert_eq!(err.key, "auth.secret");
        let err = Config::from_sources("", &env(&[public, ("AGENTWIRE__AUTH__SECRET", "s3cret-s3cret")]))
            .unwrap_err();
        assert_eq!(err.key, "auth.dev_tokens");
        let ok = Config::from_sources(
            "",
            &env(&[
                public,
                ("AGENTWIRE__AUTH__SECRET", "s3cret-s3cret"),
                ("AGENTWIRE__AUTH__DEV_TOKENS", "false"),
            ]),
        );
        assert!(ok.is_ok());
    }
}
