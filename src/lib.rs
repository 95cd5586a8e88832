//! agentwire: a real-time WebSocket server that authenticates each session with a JWT and
//! streams AI agents' progress to every open tab of the right user.
//!
//! The crate root builds the whole server from a [`Config`], so the binary and the tests start
//! exactly the same thing.

mod admission;
mod agent;
mod assets;
/// The exit code of a node whose broker cannot start after the start-up check passed
/// (registry/mod.rs): it refuses to start, as with a configuration it cannot use, rather than
/// keep users' streams to itself (docs/scale-out.md).
pub const EXIT_BROKER: i32 = 2;
/// The exit code of a node fenced by the others (registry/remote.rs): taken for dead while it
/// was paused, its runs ended elsewhere, it stops and is to be started again (docs/scale-out.md).
pub const EXIT_FENCED: i32 = 3;

pub mod auth;
mod base;
mod broker;
pub mod config;
mod http;
mod memory;
pub mod metrics;
pub mod protocol;
mod ratelimit;
mod registry;
pub mod state;
mod store;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use log::{info, warn};

pub use config::Config;

use crate::admission::{ConnectionSlots, UnauthenticatedSlots};
use crate::auth::{Minter, Verifier};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::protocol::FieldLimits;
use crate::registry::{Registries, RegistrySettings};
use crate::ws::SessionEnv;

/// What a client has sent and the server has not read yet waits in the kernel, in a queue of
/// this size (the kernel doubles it), not in actix-http's buffers, which take all the kernel
/// holds in one read. Clients send chat messages, not bulk data; set on the listening socket so
/// that accepted sockets start with it and the TCP window is sized for it from the first byte.
const RECEIVE_BUFFER_BYTES: usize = 16 * 1024;
/// The kernel's queue toward a client that stops reading: without a bound it grows to 4 MB per
/// socket (tcp_wmem), unseen by `limits.max_outbound_bytes`, and a slow reader is noticed only
/// once that is full too.
const SEND_BUFFER_BYTES: usize = 128 * 1024;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES)?;
    socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// A configuration problem, named by its key (exit code 2).
    Config(String),
    /// Binding the address failed.
    Io(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(message) => write!(f, "invalid configuration: {message}"),
            StartError::Io(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A started server: where it listens, the future that runs it, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub server: actix_web::dev::Server,
    pub metrics: Arc<Metrics>,
    pub control: Control,
}

/// Stops a running server gracefully (protocol section 7).
#[derive(Clone)]
pub struct Control {
    registries: Registries,
    draining: Arc<AtomicBool>,
    handle: actix_web::dev::ServerHandle,
}

impl Control {
    /// Refuses new upgrades, closes every session with 1012 after the events already handed to
    /// it, and stops the server; connections still open after `server.shutdown_grace_secs` are
    /// dropped.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        let asked = self.registries.all().iter().map(|shard| shard.send(registry::Shutdown));
        let mut sessions = 0;
        for answer in futures_util::future::join_all(asked).await {
            match answer {
                Ok(told) => sessions += told,
                Err(e) => warn!("shutdown: a registry shard did not answer: {e}"),
            }
        }
        info!("shutdown: {sessions} sessions told to close");
        self.handle.stop(true).await;
    }
}

/// Raises this process's open-files soft limit to the hard limit; returns the new soft limit.
/// Each WebSocket costs one descriptor, so this caps the connections one process can hold.
pub fn raise_open_files_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// Opens the conversation store (docs/conversations.md); a server does not start without it.
fn open_store(config: &config::StoreConfig) -> Result<store::Store, StartError> {
    let settings = store::StoreSettings {
        url: config.database_url(),
        max_threads_per_user: config.max_threads_per_user.get(),
        max_bytes_per_user: config.max_bytes_per_user.get(),
        retention_days: config.retention_days,
    };
    let (key, shown) = match config.kind {
        config::StoreKind::Sqlite => ("store.path", config.path.display().to_string()),
        // The URL may hold a password: only where it points is shown.
        config::StoreKind::Postgres => {
            ("store.url", config.url.rsplit('@').next().unwrap_or_default().to_owned())
        }
        config::StoreKind::Memory => ("store.kind", "memory".to_owned()),
    };
    let store =
        store::Store::open(settings).map_err(|e| StartError::Config(format!("{key} ({shown}): {e}")))?;
    info!("store: {:?} at {shown}", config.kind);
    Ok(store)
}

/// Builds and binds the server. Must be called inside an actix `System` (the registry shards
/// start on arbiters of their own); the returned server runs when awaited or spawned.
pub fn build(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let dev_minter = if config.dev_tokens_enabled() {
        Some(Minter::new(&config.auth).map_err(StartError::Config)?)
    } else {
        None
    };

    let open_files = raise_open_files_limit();
    let usable = open_files.saturating_sub(100) as usize;
    info!("open-files limit {open_files}: room for about {usable} connections");
    if config.limits.max_connections.get() > usable {
        warn!(
            "limits.max_connections = {} is above what the open-files limit allows (~{usable})",
            config.limits.max_connections
        );
    }
    if config.faults.any_enabled() {
        let f = &config.faults;
        warn!(
            "fault injection is ON: setup_delay_ms = {}, fail_setup_user_prefix = {:?}, slow_agent_step_ms = {}, \
             broker_delay_ms = {}, broker_fail_user_prefix = {:?}",
            f.setup_delay_ms, f.fail_setup_user_prefix, f.slow_agent_step_ms, f.broker_delay_ms, f.broker_fail_user_prefix
        );
    }

    if config.broker.kind == config::BrokerKind::Redis {
        // docs/scale-out.md: a node that cannot reach its Redis does not start.
        broker::redis::check(&broker::redis::RedisSettings::from_config(&config))
            .map_err(StartError::Config)?;
        info!(
            "broker: Redis at {} (prefix {:?}), node {}",
            broker::redis::redacted(&config.broker.url),
            config.broker.prefix,
            config.broker.node_name()
        );
    }
    let store = open_store(&config.store)?;
    let metrics = Arc::new(Metrics::new());
    let verifier = Verifier::new(&config.auth, &metrics).map_err(StartError::Config)?;
    let agent = agent::start_runtime(&config, &metrics);
    let shards = config.registry_shard_count();
    let registries = Registries::start(
        RegistrySettings::from_config(&config, store.clone()),
        Arc::clone(&metrics),
        agent,
        shards,
    );
    info!("registry: {shards} shards");
    let limits = &config.limits;
    let env = Arc::new(SessionEnv {
        registries,
        verifier: Arc::new(verifier),
        metrics: Arc::clone(&metrics),
        setup_backlog: admission::SetupBacklog::new(metrics.registry_backlog.clone()),
        field_limits: FieldLimits { max_content_chars: limits.max_content_chars.get() },
        pending_messages: limits.pending_messages,
        pending_bytes: limits.pending_bytes.get(),
        unauthenticated_bytes: limits.unauthenticated_bytes.get(),
        max_outbound_bytes: limits.max_outbound_bytes.get(),
        max_message_bytes: limits.max_message_bytes,
        auth_timeout: Duration::from_secs(config.auth.timeout_secs.get()),
        auth_leeway: Duration::from_secs(config.auth.leeway_secs),
        heartbeat_interval: Duration::from_secs(limits.heartbeat_interval_secs.get()),
        client_timeout: Duration::from_secs(limits.client_timeout_secs),
        messages_per_second: limits.messages_per_second.get(),
        burst: limits.burst.get(),
    });
    let draining = Arc::new(AtomicBool::new(false));
    let state = web::Data::new(AppState {
        config: Arc::clone(&config),
        env,
        slots: ConnectionSlots::new(limits.max_connections.get()),
        unauthenticated: UnauthenticatedSlots::new(
            limits.max_unauthenticated.get(),
            limits.max_unauthenticated_per_ip.get(),
        ),
        dev_minter,
        draining: Arc::clone(&draining),
        assets: assets::Assets::new(&config.server.static_dir),
        store: store.clone(),
    });
    let registries = state.env.registries.clone();
    // A peer that stops reading freezes its session (actix-web #2441); the kernel's user timeout
    // is what still tears such a connection down (docs/architecture.md).
    let user_timeout = Duration::from_secs(config.limits.client_timeout_secs);

    let listener = listen(config.server.bind).map_err(StartError::Io)?;
    let server = HttpServer::new(move || {
        App::new().app_data(state.clone()).configure(|cfg| http::routes(cfg, &state.config))
    })
    .on_connect(move |connection, _| {
        if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(user_timeout)) {
                warn!("cannot set TCP_USER_TIMEOUT: {e}");
            }
        }
    })
    // Small frames must leave at once: Nagle's algorithm would hold them back behind
    // unacknowledged ones (actix leaves it on unless told).
    .tcp_nodelay(true)
    // Signals are handled by the binary, which closes sessions with 1012 first.
    .disable_signals()
    .workers(config.worker_count())
    .max_connections(config.limits.max_connections.get().saturating_add(1024))
    .shutdown_timeout(config.server.shutdown_grace_secs.get())
    .listen(listener)
    .map_err(StartError::Io)?;
    let addr = server.addrs().first().copied().ok_or_else(|| {
        StartError::Io(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address bound"))
    })?;
    let server = server.run();
    let control = Control { registries, draining, handle: server.handle() };
    Ok(Running { addr, server, metrics, control })
}
