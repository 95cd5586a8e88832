//! The configuration's shape: every section and key, its type and its built-in default, and what
//! it means. A count, size or duration that 0 would make meaningless is a `NonZero*`, so reading
//! the file rejects 0 under the key's name and no check needs to remember it. How the values are
//! read is `load.rs`; what types cannot say (ranges, formats, keys that must agree) is
//! `validate.rs`.
//!
//! The built-in defaults are the safe ones to deploy (no dev tokens, no secret); the repository's
//! `config.toml` is these defaults plus `server.dev_mode = true`, which a test holds it to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use serde::{Deserialize, Serialize};

/// A non-zero default, checked when compiling.
macro_rules! nz {
    ($n:expr) => {
        const { std::num::NonZero::new($n).unwrap() }
    };
}

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
    pub store: StoreConfig,
    pub faults: FaultsConfig,
}

/// `[server]`: where to listen, with how many threads, and how to stop.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on; off loopback, development mode and dev tokens are refused.
    pub bind: SocketAddr,
    /// HTTP worker threads; 0 means one worker per core.
    pub workers: usize,
    /// Registry shards, each on a thread of its own with a share of the users; 0 means one per
    /// four cores (at least one): a shard carries about a quarter of what the HTTP workers do
    /// per session (BENCHMARKS.md, section 9), and a shard per core on a small machine only
    /// adds threads that wake one another.
    pub registry_shards: usize,
    /// Origins allowed to open a WebSocket (`https://chat.example.com`); empty accepts every
    /// Origin.
    pub allowed_origins: Vec<String>,
    /// Seconds the server waits on SIGTERM/SIGINT for sessions to close before it exits.
    pub shutdown_grace_secs: NonZeroU64,
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
            shutdown_grace_secs: nz!(10),
            static_dir: String::new(),
            dev_mode: false,
        }
    }
}

/// The JWT signature algorithm (`auth.algorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Algorithm {
    /// A shared secret, `auth.secret`.
    HS256,
    /// An RSA key pair, `auth.public_key_file` (and `auth.private_key_file` to mint).
    RS256,
    /// An ECDSA P-256 key pair, as for RS256.
    ES256,
}

/// `[auth]`: how connections prove who they are.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The JWT algorithm tokens are signed with.
    pub algorithm: Algorithm,
    /// HS256 shared secret, at least 16 characters (32 or more recommended). No built-in one:
    /// required with HS256 unless development mode makes one. Never logged.
    pub secret: String,
    /// RS256/ES256: PEM public key used to verify.
    pub public_key_file: String,
    /// RS256/ES256: PEM private key, only needed to mint tokens (`agentwire token`, `/dev/token`).
    pub private_key_file: String,
    /// The `iss` a token must carry; empty: `iss` is not checked.
    pub issuer: String,
    /// The `aud` a token must carry; empty: `aud` is not checked.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Seconds a connection has after the upgrade to authenticate (else close 4002).
    pub timeout_secs: NonZeroU64,
    /// Serve `POST /dev/token`, which mints a token for any user name (loopback binds only).
    pub dev_tokens: bool,
    /// An identity provider's JSON Web Key Set: tokens are verified with the key their `kid`
    /// names (docs/protocol.md section 2). With it (or `oidc_issuer`), `algorithm` and `secret`
    /// are not used.
    pub jwks_url: String,
    /// An OpenID Connect issuer: its keys are found through
    /// `{oidc_issuer}/.well-known/openid-configuration` (`jwks_uri`), and it is the `iss` tokens
    /// must carry unless `issuer` says otherwise.
    pub oidc_issuer: String,
    /// Seconds between two fetches of a key set (sooner when the provider's `Cache-Control:
    /// max-age` says so).
    pub jwks_refresh_secs: NonZeroU64,
    /// More identity providers beside the one above (`[[auth.issuers]]`): a token's `iss` picks
    /// its entry, and its `kid` is looked up in that entry's keys only.
    pub issuers: Vec<IssuerConfig>,
}

/// One `[[auth.issuers]]` entry: a provider whose tokens are accepted.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` its tokens carry (may be left out with `oidc_issuer`, which implies it).
    pub issuer: String,
    /// Its JSON Web Key Set; or `oidc_issuer` instead.
    pub jwks_url: String,
    pub oidc_issuer: String,
    /// The `aud` its tokens must carry; empty: `aud` is not checked.
    pub audience: String,
}

/// Whether two issuers are the same: one trailing `/` is not told apart (providers differ on it;
/// Auth0's issuer ends with one), anything else is.
pub fn same_issuer(a: &str, b: &str) -> bool {
    a.strip_suffix('/').unwrap_or(a) == b.strip_suffix('/').unwrap_or(b)
}

impl IssuerConfig {
    /// The `iss` its tokens must carry.
    pub fn expected_issuer(&self) -> &str {
        if self.issuer.is_empty() {
            &self.oidc_issuer
        } else {
            &self.issuer
        }
    }
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
            timeout_secs: nz!(10),
            dev_tokens: false,
            jwks_url: String::new(),
            oidc_issuer: String::new(),
            jwks_refresh_secs: nz!(600),
            issuers: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// The identity providers whose key sets verify tokens: `[auth]`'s own (when it has a
    /// `jwks_url` or `oidc_issuer`) first, then `[[auth.issuers]]`. Empty: the secret or key file
    /// of `algorithm` verifies them.
    pub fn key_set_issuers(&self) -> Vec<IssuerConfig> {
        let mut all = Vec::with_capacity(self.issuers.len() + 1);
        if !self.jwks_url.is_empty() || !self.oidc_issuer.is_empty() {
            all.push(IssuerConfig {
                issuer: self.issuer.clone(),
                jwks_url: self.jwks_url.clone(),
                oidc_issuer: self.oidc_issuer.clone(),
                audience: self.audience.clone(),
            });
        }
        all.extend(self.issuers.iter().cloned());
        all
    }

    /// Tokens are verified with providers' key sets (not a secret or a key file).
    pub fn uses_key_sets(&self) -> bool {
        !self.jwks_url.is_empty() || !self.oidc_issuer.is_empty() || !self.issuers.is_empty()
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
            .field("jwks_url", &self.jwks_url)
            .field("oidc_issuer", &self.oidc_issuer)
            .field("jwks_refresh_secs", &self.jwks_refresh_secs)
            .field("issuers", &self.issuers)
            .finish()
    }
}

/// `[limits]`: what one connection, one user and the whole server may hold or send.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open WebSocket connections; attempts beyond get HTTP 503 before the upgrade.
    pub max_connections: NonZeroUsize,
    /// Sessions of one user; the next one is closed with 4004.
    pub max_sessions_per_user: NonZeroUsize,
    /// Largest text message (after reassembling fragments), in bytes; larger closes with 1009.
    /// At least 1024 (`validate.rs`).
    pub max_message_bytes: usize,
    /// Longest `content` of a `user_message`, in Unicode characters.
    pub max_content_chars: NonZeroUsize,
    /// Per-connection rate limit: sustained messages per second.
    pub messages_per_second: NonZeroU32,
    /// Per-connection rate limit: the burst above `messages_per_second` (at least as many).
    pub burst: NonZeroU32,
    /// Frames queued, by count, while a connection is still being set up; each one beyond gets
    /// `not_ready`.
    pub pending_messages: usize,
    /// Bytes of early frames queued before `processing_ready`.
    pub pending_bytes: NonZeroUsize,
    /// Unsent output a session may accumulate before it is closed with 4008 (slow reader); and
    /// what a `POST /ag-ui` client may leave untaken before it stops following its run.
    pub max_outbound_bytes: NonZeroUsize,
    /// Seconds between server pings.
    pub heartbeat_interval_secs: NonZeroU64,
    /// Seconds without any frame from the client (pongs included) before it is dropped; longer
    /// than `heartbeat_interval_secs`.
    pub client_timeout_secs: u64,
    /// Bytes a connection may send before it is authenticated (its `auth` frame included);
    /// beyond, it is closed with 1008.
    pub unauthenticated_bytes: NonZeroUsize,
    /// Connections not authenticated yet, server-wide; upgrades beyond get HTTP 503.
    pub max_unauthenticated: NonZeroUsize,
    /// Connections not authenticated yet from one IP address; upgrades beyond get HTTP 503.
    pub max_unauthenticated_per_ip: NonZeroUsize,
    /// `user_message`s per second across all sessions of one user (burst: twice as many).
    pub user_messages_per_second: NonZeroU32,
    /// Connection setups waiting for the registry; beyond, upgrades get 503 with Retry-After.
    pub max_registry_backlog: NonZeroUsize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: nz!(10_000),
            max_sessions_per_user: nz!(16),
            max_message_bytes: 65_536,
            max_content_chars: nz!(16_000),
            messages_per_second: nz!(20),
            burst: nz!(40),
            pending_messages: 32,
            pending_bytes: nz!(65_536),
            max_outbound_bytes: nz!(1 << 20),
            heartbeat_interval_secs: nz!(5),
            client_timeout_secs: 30,
            unauthenticated_bytes: nz!(32_768),
            max_unauthenticated: nz!(1000),
            max_unauthenticated_per_ip: nz!(100),
            user_messages_per_second: nz!(10),
            max_registry_backlog: nz!(10_000),
        }
    }
}

/// `[history]`: what each user's event stream keeps for resume, and for how long.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Events kept per user stream for resume; the oldest go first.
    pub events_per_user: NonZeroUsize,
    /// Bytes of history one user's stream keeps.
    pub max_bytes_per_user: NonZeroUsize,
    /// Bytes of history all streams together keep.
    pub max_bytes: NonZeroUsize,
    /// Seconds an offline user's stream is kept after its last event (or last session closing).
    pub ttl_secs: u64,
    /// User streams kept at once (online and offline); beyond, the longest-idle offline stream
    /// is forgotten first.
    pub max_users: NonZeroUsize,
    /// `client_msg_id`s remembered per user for dedupe; the oldest is forgotten first.
    pub dedupe_per_user: NonZeroUsize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            events_per_user: nz!(1000),
            max_bytes_per_user: nz!(1 << 20),
            max_bytes: nz!(256 << 20),
            ttl_secs: 300,
            max_users: nz!(100_000),
            dedupe_per_user: nz!(1000),
        }
    }
}

/// `agent.kind`: the agent runtime that answers user messages.
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

/// `agent.on_busy`: what a `user_message` does on a thread whose run is still going
/// (docs/conversations.md, "Two messages on one thread").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBusy {
    /// Acked and echoed; its run starts when the thread's current one has ended (at most
    /// `MAX_WAITING_PER_THREAD` waiting; beyond, `thread_busy`).
    Enqueue,
    /// `thread_busy`: not echoed, nothing stored.
    Reject,
    /// The current run ends `cancelled`, then the new one starts.
    Interrupt,
}

/// Runs waiting behind a thread's current run with `agent.on_busy = "enqueue"`.
pub const MAX_WAITING_PER_THREAD: usize = 8;

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Demo => "demo",
            AgentKind::AgUi => "ag-ui",
            AgentKind::None => "none",
        }
    }
}

/// `[agent]`: the agent that answers, and what its runs may take.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent runtime.
    pub kind: AgentKind,
    /// A message on a thread whose run is still going: wait, be refused, or interrupt it.
    pub on_busy: OnBusy,
    /// Pause between the demo agent's steps, in milliseconds (0 for load tests).
    pub step_delay_ms: u64,
    /// Runs of one user in progress at once; a message beyond gets `rate_limited`.
    pub max_runs_per_user: NonZeroUsize,
    /// A run that has not ended after this many seconds is ended with `agent_error`
    /// `agent_timeout`.
    pub run_timeout_secs: NonZeroU64,
    /// Bytes of a run's response kept for the `agent_completed` of a cancel.
    pub max_response_bytes: NonZeroUsize,
    /// Run requests waiting for the agent runtime; beyond, a run ends with `agent_unavailable`.
    pub max_queued_runs: NonZeroUsize,
    /// The name `agent_started` carries; empty is the kind's own name.
    pub name: String,
    /// `kind = "ag-ui"`: the agent's AG-UI endpoint, POSTed once per run.
    pub url: String,
    /// Sent on every request to the agent (an API key, say). Never logged.
    pub headers: BTreeMap<String, String>,
    /// Seconds to wait for a connection to the agent (`kind = "ag-ui"`).
    pub connect_timeout_secs: NonZeroU64,
    /// No event from the agent for this many seconds ends the run with `agent_timeout`.
    pub idle_timeout_secs: NonZeroU64,
    /// Runs in progress across all users with an upstream agent; beyond, `agent_busy`.
    pub max_concurrent_runs: NonZeroUsize,
    /// The newest messages of the thread (from the store) sent with each run.
    pub history_messages: NonZeroUsize,
    /// The largest event accepted from an AG-UI agent (docs/agents.md): LangGraph's
    /// `STATE_SNAPSHOT`, `MESSAGES_SNAPSHOT` and `RAW` carry the whole thread, so this is not
    /// the client-frame limit.
    pub max_event_bytes: NonZeroUsize,
    /// The AG-UI events without a native mapping that reach WebSocket tabs as `agent_event`: a
    /// name, or a prefix ending in `*`. `POST /ag-ui` clients get every event whatever this says.
    pub forward_events: Vec<String>,
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

/// Whether an AG-UI event of this type reaches WebSocket tabs (`agent.forward_events`: names,
/// or prefixes ending in `*`).
pub fn forwards(patterns: &[String], kind: &str) -> bool {
    patterns.iter().any(|pattern| match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => kind == pattern,
    })
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            kind: AgentKind::Demo,
            step_delay_ms: 120,
            on_busy: OnBusy::Enqueue,
            max_runs_per_user: nz!(16),
            run_timeout_secs: nz!(300),
            max_response_bytes: nz!(1 << 20),
            max_queued_runs: nz!(10_000),
            name: String::new(),
            url: String::new(),
            headers: BTreeMap::new(),
            connect_timeout_secs: nz!(5),
            idle_timeout_secs: nz!(60),
            max_concurrent_runs: nz!(1000),
            history_messages: nz!(50),
            max_event_bytes: nz!(16 << 20),
            forward_events: [
                "STATE_SNAPSHOT",
                "STATE_DELTA",
                "ACTIVITY_*",
                "STEP_*",
                "CUSTOM",
                "REASONING_ENCRYPTED_VALUE",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// `[api]`: the server API (`/api/v1`) for the app's backend.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Server API keys for `/api/v1`, at least 16 characters each; empty disables the API
    /// (every request gets 401). Never logged.
    pub keys: Vec<String>,
    /// Largest request body accepted by `/api/v1/publish` (and `POST /ag-ui`); larger gets 413.
    pub max_body_bytes: NonZeroUsize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { keys: Vec::new(), max_body_bytes: nz!(1 << 20) }
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

/// `broker.kind`: where users' streams live.
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
    /// Memory (one process) or Redis (several).
    pub kind: BrokerKind,
    /// `redis://host:port` (`rediss://` and a password in the URL work too). Never logged whole.
    pub url: String,
    /// Every key and channel starts with it: several deployments on one Redis.
    pub prefix: String,
    /// This process's name in logs and the connections API; empty is hostname-pid.
    pub node_id: String,
    /// A node silent this long is gone: another ends its runs with `agent_error` `node_lost`.
    /// With Redis, at least 2 (`validate.rs`).
    pub node_lease_secs: u64,
    /// `url` lists nodes of a Redis Cluster (comma-separated; any of them will do): the broker
    /// routes each call to its slot and uses sharded Pub/Sub (Redis 7, docs/scale-out.md).
    pub cluster: bool,
    /// Most bytes of commands waiting for Redis (a slow Redis): past it, calls are refused at once
    /// (`unavailable`, 503) rather than held in memory without bound (docs/scale-out.md).
    pub max_queued_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            url: "redis://127.0.0.1:6379".into(),
            prefix: "agentwire".into(),
            node_id: String::new(),
            node_lease_secs: 5,
            max_queued_bytes: 64 * 1024 * 1024,
            cluster: false,
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

/// `store.kind`: where conversations are kept (docs/conversations.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// One SQLite file, embedded: nothing to install.
    Sqlite,
    /// One PostgreSQL database for every node (required with `broker.kind = "redis"`).
    Postgres,
    /// SQLite in memory: conversations are lost at exit.
    Memory,
}

/// `[store]`: conversations that last (`store/`, docs/conversations.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The SQLite file; relative to the configuration file's folder (the working folder without
    /// one).
    pub path: std::path::PathBuf,
    /// The PostgreSQL database (`postgres://user@host:port/database`). Never logged whole.
    pub url: String,
    /// Threads untouched this many days are deleted; 0 keeps them forever.
    pub retention_days: u64,
    /// Beyond this many threads, a user's least recently updated thread is deleted.
    pub max_threads_per_user: NonZeroUsize,
    /// Bytes of stored messages per user; beyond, a `user_message` gets `quota_exceeded`.
    pub max_bytes_per_user: NonZeroUsize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: "agentwire.db".into(),
            url: "postgres://127.0.0.1:5432/agentwire".into(),
            retention_days: 0,
            max_threads_per_user: nz!(1000),
            max_bytes_per_user: nz!(64 << 20),
        }
    }
}

impl StoreConfig {
    /// The sqlx URL of the configured database.
    pub fn database_url(&self) -> String {
        match self.kind {
            StoreKind::Sqlite => format!("sqlite://{}?mode=rwc", self.path.display()),
            StoreKind::Postgres => self.url.clone(),
            StoreKind::Memory => "sqlite::memory:".into(),
        }
    }
}

/// `[faults]`: failures to rehearse on purpose; all off by default.
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
    /// Whose agent steps `slow_agent_step_ms` slows down.
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

impl Config {
    /// `POST /dev/token` is served: asked for with `auth.dev_tokens`, or implied by development mode.
    pub fn dev_tokens_enabled(&self) -> bool {
        // Tokens a provider's keys verify cannot be minted here.
        (self.auth.dev_tokens || self.server.dev_mode) && !self.auth.uses_key_sets()
    }

    /// Worker threads to start: `server.workers`, or one per core for 0.
    pub fn worker_count(&self) -> usize {
        match self.server.workers {
            0 => cores(),
            n => n,
        }
    }

    /// Registry shards to start: `server.registry_shards`, or one per four cores (at least one)
    /// for 0.
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
