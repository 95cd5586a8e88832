//! Configuration: built-in defaults, then `config.toml` (or `--config PATH`), then environment
//! overrides `AGENTWIRE__SECTION__KEY`, then validation. Every failure names the key it is about,
//! so an operator reads one line and knows what to fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file, beside the configuration file, that keeps development mode's generated secret so
/// that `agentwire serve` and `agentwire token` agree across restarts.
pub const DEV_SECRET_FILE: &str = ".agentwire-dev-secret";

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
    pub broker: BrokerConfig,
    pub faults: FaultsConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// 0 means one worker per core.
    pub workers: usize,
    /// Registry shards, each on a thread of its own with a share of the users; 0 means one per
    /// four cores (at least one): a shard carries about a quarter of what the HTTP workers do
    /// per session (BENCHMARKS.md, section 9), and a shard per core on a small machine only
    /// adds threads that wake one another.
    pub registry_shards: usize,
    /// Empty accepts every Origin.
    pub allowed_origins: Vec<String>,
    pub shutdown_grace_secs: u64,
    /// Serve the frontend from this folder instead of the copy built into the binary (for
    /// editing it); empty uses the built-in copy.
    pub static_dir: String,
    /// Development mode: dev tokens on, a loopback bind required, and a random HS256 secret made
    /// on first start when `auth.secret` is empty. Off in the built-in defaults; the repository's
    /// `config.toml` turns it on.
    pub dev_mode: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            registry_shards: 0,
            allowed_origins: Vec::new(),
            shutdown_grace_secs: 10,
            static_dir: String::new(),
            dev_mode: false,
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
            // No built-in secret: a server must be given one (or be in development mode).
            secret: String::new(),
            public_key_file: String::new(),
            private_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 30,
            timeout_secs: 10,
            dev_tokens: false,
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
    /// Bytes of early frames queued before `processing_ready`.
    pub pending_bytes: usize,
    pub max_outbound_bytes: usize,
    pub heartbeat_interval_secs: u64,
    pub client_timeout_secs: u64,
    /// Bytes a connection may send before it is authenticated (its `auth` frame included);
    /// beyond, it is closed with 1008.
    pub unauthenticated_bytes: usize,
    /// Connections not authenticated yet, server-wide and from one IP address.
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    /// `user_message`s per second across all sessions of one user (burst: twice as many).
    pub user_messages_per_second: u32,
    /// Connection setups waiting for the registry; beyond, upgrades get 503 with Retry-After.
    pub max_registry_backlog: usize,
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
            pending_bytes: 65_536,
            max_outbound_bytes: 1 << 20,
            heartbeat_interval_secs: 5,
            client_timeout_secs: 30,
            unauthenticated_bytes: 32_768,
            max_unauthenticated: 1000,
            max_unauthenticated_per_ip: 100,
            user_messages_per_second: 10,
            max_registry_backlog: 10_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    pub events_per_user: usize,
    /// Bytes of history one user's stream keeps, and all streams together.
    pub max_bytes_per_user: usize,
    pub max_bytes: usize,
    pub ttl_secs: u64,
    /// User streams kept at once (online and offline); beyond, the longest-idle offline stream
    /// is forgotten first.
    pub max_users: usize,
    /// `client_msg_id`s remembered per user for dedupe; the oldest is forgotten first.
    pub dedupe_per_user: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            events_per_user: 1000,
            max_bytes_per_user: 1 << 20,
            max_bytes: 256 << 20,
            ttl_secs: 300,
            max_users: 100_000,
            dedupe_per_user: 1000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentKind {
    /// The built-in demo agent (`agent::demo`).
    Demo,
    /// Any AG-UI agent at `agent.url` (`agent::ag_ui`, docs/agents.md).
    AgUi,
    /// No agent: user messages are acked and echoed, and the app's backend publishes runs.
    None,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Demo => "demo",
            AgentKind::AgUi => "ag-ui",
            AgentKind::None => "none",
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub kind: AgentKind,
    pub step_delay_ms: u64,
    /// Runs of one user in progress at once; a message beyond gets `rate_limited`.
    pub max_runs_per_user: usize,
    /// A run that has not ended after this long is ended with `agent_error` `agent_timeout`.
    pub run_timeout_secs: u64,
    /// Bytes of a run's response kept for the `agent_completed` of a cancel.
    pub max_response_bytes: usize,
    /// Run requests waiting for the agent runtime; beyond, a run ends with `agent_unavailable`.
    pub max_queued_runs: usize,
    /// The name `agent_started` carries; empty is the kind's own name.
    pub name: String,
    /// `kind = "ag-ui"`: the agent's AG-UI endpoint, POSTed once per run.
    pub url: String,
    /// Sent on every request to the agent (an API key, say). Never logged.
    pub headers: BTreeMap<String, String>,
    pub connect_timeout_secs: u64,
    /// No event from the agent for this long ends the run with `agent_timeout`.
    pub idle_timeout_secs: u64,
    /// Runs in progress across all users with an upstream agent; beyond, `agent_busy`.
    pub max_concurrent_runs: usize,
    /// Messages of the thread's conversation sent with each run (and kept per thread).
    pub history_messages: usize,
    /// Threads whose conversation is kept per user; the least recently used one goes first.
    pub threads_per_user: usize,
    /// Bytes of conversation kept per user, all threads together.
    pub history_bytes_per_user: usize,
}

impl AgentConfig {
    /// `agent.headers` as HTTP headers; the error names the header that is not valid (never its
    /// value, which may be a key).
    pub fn header_map(&self) -> Result<reqwest::header::HeaderMap, String> {
        use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a header name"))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| format!("the value of {name:?} is not a header value"))?;
            value.set_sensitive(true);
            map.insert(header, value);
        }
        Ok(map)
    }

    /// The name clients see in `agent_started`.
    pub fn display_name(&self) -> String {
        if self.name.is_empty() {
            self.kind.as_str().to_owned()
        } else {
            self.name.clone()
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kind: AgentKind::Demo,
            step_delay_ms: 120,
            max_runs_per_user: 16,
            run_timeout_secs: 300,
            max_response_bytes: 1 << 20,
            max_queued_runs: 10_000,
            name: String::new(),
            url: String::new(),
            headers: BTreeMap::new(),
            connect_timeout_secs: 5,
            idle_timeout_secs: 60,
            max_concurrent_runs: 1000,
            history_messages: 50,
            threads_per_user: 32,
            history_bytes_per_user: 1 << 20,
        }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// Users' streams in this process's memory: one process (`broker/memory.rs`).
    Memory,
    /// Users' streams in Redis, shared by every process on it (`broker/redis/`, docs/scale-out.md).
    Redis,
}

/// `[broker]`: where users' streams live.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    /// `redis://host:port` (`rediss://` and a password in the URL work too). Never logged whole.
    pub url: String,
    /// Every key and channel starts with it: several deployments on one Redis.
    pub prefix: String,
    /// This process's name in logs and the connections API; empty is hostname-pid.
    pub node_id: String,
    /// A node silent this long is gone: another ends its runs with `agent_error` `node_lost`.
    pub node_lease_secs: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            prefix: "agentwire".into(),
            node_id: String::new(),
            node_lease_secs: 5,
        }
    }
}

impl BrokerConfig {
    /// `node_id`, or hostname-pid.
    pub fn node_name(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// The registry waits this long before `services_ready`.
    pub setup_delay_ms: u64,
    /// Setup fails for every user whose id starts with this; empty is off.
    pub fail_setup_user_prefix: String,
    /// The demo agent's tool step blocks its thread this long for users whose id starts with
    /// `slow_agent_user_prefix` (an expensive agent step); 0 is off.
    pub slow_agent_step_ms: u64,
    pub slow_agent_user_prefix: String,
    /// Every broker call is answered up to this late, at random, so answers overtake one
    /// another (a broker across a slow network); 0 is off.
    pub broker_delay_ms: u64,
    /// Broker calls for users whose id starts with this fail (a broken broker); empty is off.
    pub broker_fail_user_prefix: String,
}

impl FaultsConfig {
    pub fn any_enabled(&self) -> bool {
        self.setup_delay_ms > 0
            || !self.fail_setup_user_prefix.is_empty()
            || self.slow_agent_step_ms > 0
            || self.broker_delay_ms > 0
            || !self.broker_fail_user_prefix.is_empty()
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
        let mut config = Config::from_sources(&text, &env)?;
        if config.server.dev_mode
            && config.auth.algorithm == Algorithm::HS256
            && config.auth.secret.is_empty()
        {
            let folder = match &source {
                Source::File(path) => path.parent().map(Path::to_owned).unwrap_or_default(),
                Source::Defaults => PathBuf::new(),
            };
            config.auth.secret = dev_secret(&folder.join(DEV_SECRET_FILE))?;
        }
        Ok((config, source))
    }

    /// Where development mode keeps its generated secret for this configuration source.
    pub fn dev_secret_path(source: &Source) -> PathBuf {
        match source {
            Source::File(path) => path.parent().map(Path::to_owned).unwrap_or_default().join(DEV_SECRET_FILE),
            Source::Defaults => PathBuf::from(DEV_SECRET_FILE),
        }
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
                // In development mode an empty secret is made on first start (`Config::load`).
                if a.secret.is_empty() && !s.dev_mode {
                    return Err(error(
                        "auth.secret",
                        "is required with HS256: set auth.secret (or AGENTWIRE__AUTH__SECRET) to a secret \
                         of at least 32 characters, or server.dev_mode = true for local development",
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
        if a.timeout_secs == 0 {
            return Err(error("auth.timeout_secs", "must be at least 1"));
        }

        let l = &self.limits;
        let h = &self.history;
        let g = &self.agent;
        let positive = [
            ("limits.pending_bytes", l.pending_bytes as u64),
            ("limits.max_unauthenticated", l.max_unauthenticated as u64),
            ("limits.unauthenticated_bytes", l.unauthenticated_bytes as u64),
            ("limits.max_unauthenticated_per_ip", l.max_unauthenticated_per_ip as u64),
            ("limits.user_messages_per_second", l.user_messages_per_second as u64),
            ("limits.max_registry_backlog", l.max_registry_backlog as u64),
            ("history.max_bytes_per_user", h.max_bytes_per_user as u64),
            ("history.max_bytes", h.max_bytes as u64),
            ("history.max_users", h.max_users as u64),
            ("history.dedupe_per_user", h.dedupe_per_user as u64),
            ("agent.max_runs_per_user", g.max_runs_per_user as u64),
            ("agent.run_timeout_secs", g.run_timeout_secs),
            ("agent.max_response_bytes", g.max_response_bytes as u64),
            ("agent.max_queued_runs", g.max_queued_runs as u64),
            ("agent.connect_timeout_secs", g.connect_timeout_secs),
            ("agent.idle_timeout_secs", g.idle_timeout_secs),
            ("agent.max_concurrent_runs", g.max_concurrent_runs as u64),
            ("agent.history_messages", g.history_messages as u64),
            ("agent.threads_per_user", g.threads_per_user as u64),
            ("agent.history_bytes_per_user", g.history_bytes_per_user as u64),
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
        self.check_relations()?;
        let b = &self.broker;
        if b.kind == BrokerKind::Redis {
            if !(b.url.starts_with("redis://") || b.url.starts_with("rediss://")) {
                return Err(error("broker.url", "must be a redis:// or rediss:// URL"));
            }
            if b.prefix.is_empty() || b.prefix.contains(['{', '}', ' ', ':']) {
                return Err(error(
                    "broker.prefix",
                    "must be a non-empty name without braces, colons or spaces",
                ));
            }
            if b.node_id.contains(['/', '\n', ' ', '{', '}']) {
                return Err(error("broker.node_id", "must not contain '/', braces or white space"));
            }
            if b.node_lease_secs < 2 {
                return Err(error("broker.node_lease_secs", "must be at least 2 (nodes beat every second)"));
            }
        }
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
        if self.api.keys.iter().any(|k| k.len() < 16) {
            return Err(error("api.keys", "every key must be at least 16 characters"));
        }

        if !s.bind.ip().is_loopback() {
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

    /// Limits that only make sense together; the first broken relation is the one line reported.
    fn check_relations(&self) -> Result<(), ConfigError> {
        let (l, h) = (&self.limits, &self.history);
        let relations: [(bool, &str, String); 6] = [
            (
                l.unauthenticated_bytes >= crate::protocol::MAX_AUTH_FRAME_BYTES,
                "limits.unauthenticated_bytes",
                format!("must be at least {}: the largest auth frame must fit", crate::protocol::MAX_AUTH_FRAME_BYTES),
            ),
            (
                l.pending_bytes >= l.max_message_bytes,
                "limits.pending_bytes",
                format!("must be at least limits.max_message_bytes ({}): one early frame of the largest size must fit", l.max_message_bytes),
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
                l.max_outbound_bytes >= 2 * l.max_message_bytes,
                "limits.max_outbound_bytes",
                format!("must be at least twice limits.max_message_bytes ({})", l.max_message_bytes),
            ),
        ];
        for (holds, key, message) in relations {
            if !holds {
                return Err(error(key, message));
            }
        }
        Ok(())
    }

    /// `POST /dev/token` is served: asked for with `auth.dev_tokens`, or implied by development mode.
    pub fn dev_tokens_enabled(&self) -> bool {
        self.auth.dev_tokens || self.server.dev_mode
    }

    /// Worker threads to start: `server.workers`, or one per core for 0.
    pub fn worker_count(&self) -> usize {
        match self.server.workers {
            0 => cores(),
            n => n,
        }
    }

    pub fn registry_shard_count(&self) -> usize {
        match self.server.registry_shards {
            0 => (cores() / 4).max(1),
            n => n,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Development mode's secret: read from `path`, or made (32 random bytes, hex) and written there
/// on first start, readable by its owner only.
fn dev_secret(path: &Path) -> Result<String, ConfigError> {
    let failed = |e: std::io::Error| {
        error("server.dev_mode", format!("cannot keep the secret in {}: {e}", path.display()))
    };
    match std::fs::read_to_string(path) {
        Ok(secret) if secret.trim().len() >= 32 => return Ok(secret.trim().to_owned()),
        Ok(_) => {
            return Err(error(
                "server.dev_mode",
                format!("{} holds no usable secret; delete it", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(failed)?;
    file.write_all(secret.as_bytes()).map_err(failed)?;
    Ok(secret)
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
        let config =
            Config::from_sources("", &env(&[("AGENTWIRE__AUTH__SECRET", "0123456789abcdef")])).unwrap();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.limits.max_message_bytes, 65_536);
        assert_eq!(config.limits.pending_messages, 32);
        assert_eq!(config.history.events_per_user, 1000);
        assert_eq!(config.auth.leeway_secs, 30);
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults_plus_development_mode() {
        let shipped = include_str!("../config.toml");
        let from_file = Config::from_sources(shipped, &[]).unwrap();
        assert!(from_file.server.dev_mode, "the repository's config.toml turns development mode on");
        let mut shipped_table = toml::Table::try_from(&from_file).unwrap();
        shipped_table["server"]["dev_mode"] = toml::Value::Boolean(false);
        assert_eq!(shipped_table, defaults_table(), "config.toml and Config::default() disagree");
    }

    #[test]
    fn built_in_defaults_are_safe_to_deploy() {
        let defaults = Config::default();
        assert!(!defaults.auth.dev_tokens && !defaults.server.dev_mode);
        assert!(defaults.auth.secret.is_empty());
        let err = Config::from_sources("", &[]).unwrap_err();
        assert_eq!(err.key, "auth.secret");
    }

    #[test]
    fn relations_between_limits_are_checked() {
        let secret = ("AGENTWIRE__AUTH__SECRET", "a-secret-of-the-test-0123456789");
        let cases: &[(&str, &str)] = &[
            ("AGENTWIRE__LIMITS__PENDING_BYTES", "limits.pending_bytes"),
            ("AGENTWIRE__LIMITS__UNAUTHENTICATED_BYTES", "limits.unauthenticated_bytes"),
            ("AGENTWIRE__LIMITS__MAX_UNAUTHENTICATED", "limits.max_unauthenticated"),
            ("AGENTWIRE__HISTORY__MAX_BYTES", "history.max_bytes_per_user"),
            ("AGENTWIRE__HISTORY__MAX_USERS", "history.max_users"),
            ("AGENTWIRE__LIMITS__MAX_OUTBOUND_BYTES", "limits.max_outbound_bytes"),
        ];
        for (var, key) in cases {
            let err = Config::from_sources("", &env(&[secret, (var, "10")])).unwrap_err();
            assert_eq!(&err.key, key, "{var}: {err}");
        }
    }

    #[test]
    fn file_then_env_overrides() {
        let config = Config::from_sources(
            "[limits]\nburst = 80\n[auth]\nsecret = \"from-file-0123456789\"",
            &env(&[
                ("AGENTWIRE__SERVER__BIND", "127.0.0.1:9000"),
                ("AGENTWIRE__AUTH__SECRET", "1234567890123456"),
                ("AGENTWIRE__API__KEYS", "key-one-0123456789, key-two-0123456789"),
                ("AGENTWIRE__AUTH__DEV_TOKENS", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.bind.port(), 9000);
        assert_eq!(config.auth.secret, "1234567890123456");
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
            let mut vars = env(vars);
            vars.push(("AGENTWIRE__AUTH__SECRET".into(), "a-secret-of-the-test-0123456789".into()));
            let err = Config::from_sources(text, &vars).unwrap_err();
            assert!(err.key.starts_with(key), "{text} {vars:?}: got {err}");
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
