//! Configuration: what the operator can set, and the one line they read when a setting is wrong.
//!
//! A configuration is built in layers: the built-in defaults, then `config.toml` (or
//! `--config PATH`), then environment overrides `AGENTWIRE__SECTION__KEY`, then validation.
//! Every failure is a [`ConfigError`] that names the key it is about, so an operator reads one
//! line and knows what to fix.
//!
//! - `schema.rs`: the sections and keys, their types, defaults and meaning. Counts and durations
//!   that must not be 0 are `NonZero*`, so 0 is refused while reading, under the key's name.
//! - `load.rs`: reading the layers, development mode's generated secret (`.agentwire-dev-secret`)
//!   and where the configuration and the secret came from, for the start-up lines.
//! - `validate.rs`: what types cannot say: ranges, formats, and keys that must agree.

mod load;
mod schema;
mod validate;

pub use load::{Loaded, SecretSource, Source, DEV_SECRET_FILE, ENV_PREFIX};
pub use schema::{
    forwards, same_issuer, AgentConfig, AgentKind, Algorithm, ApiConfig, AuthConfig, BrokerConfig,
    BrokerKind, Config, FaultsConfig, HistoryConfig, IssuerConfig, LimitsConfig, OnBusy, ServerConfig,
    StoreConfig, StoreKind, MAX_WAITING_PER_THREAD,
};

/// A configuration that cannot be used; `Display` is the one line the operator sees.
#[derive(Debug)]
pub struct ConfigError {
    /// The key (`limits.burst`), environment variable or file the problem is about.
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

/// What the configuration's tests build their sources from.
#[cfg(test)]
mod test_support {
    /// Environment variables as `from_sources` takes them.
    pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub const SECRET: (&str, &str) = ("AGENTWIRE__AUTH__SECRET", "a-secret-of-the-test-0123456789");
}
