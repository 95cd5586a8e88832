//! Prometheus metrics (protocol section 8). Each server owns its own registry of metrics, so
//! several servers in one process (the tests) never mix their counts.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::state::ConnectionState;

/// Why a connection was refused or failed: the `reason` label of
/// `agentwire_connection_failures_total` (protocol section 8) is the variant's [`Failure::label`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    OriginRefused,
    RegistryBehind,
    OverCapacity,
    UnauthenticatedCap,
    UnauthenticatedIpCap,
    DevTokenRefused,
    InvalidToken,
    AuthTimeout,
    TokenExpired,
    HeartbeatTimeout,
    UnauthenticatedOverflow,
    RateAbuse,
    TooManySessions,
    SetupFailed,
    SetupTimeout,
    BrokerUnavailable,
    BrokerUnexpected,
    BrokerInjected,
    AgentTimeout,
    AgentUnavailable,
    StoreUnavailable,
    StoreFailed,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::OriginRefused => "origin_refused",
            Failure::RegistryBehind => "registry_behind",
            Failure::OverCapacity => "over_capacity",
            Failure::UnauthenticatedCap => "unauthenticated_cap",
            Failure::UnauthenticatedIpCap => "unauthenticated_ip_cap",
            Failure::DevTokenRefused => "dev_token_refused",
            Failure::InvalidToken => "invalid_token",
            Failure::AuthTimeout => "auth_timeout",
            Failure::TokenExpired => "token_expired",
            Failure::HeartbeatTimeout => "heartbeat_timeout",
            Failure::UnauthenticatedOverflow => "unauthenticated_overflow",
            Failure::RateAbuse => "rate_abuse",
            Failure::TooManySessions => "too_many_sessions",
            Failure::SetupFailed => "setup_failed",
            Failure::SetupTimeout => "setup_timeout",
            Failure::BrokerUnavailable => "broker_unavailable",
            Failure::BrokerUnexpected => "broker_unexpected",
            Failure::BrokerInjected => "broker_injected",
            Failure::AgentTimeout => "agent_timeout",
            Failure::AgentUnavailable => "agent_unavailable",
            Failure::StoreUnavailable => "store_unavailable",
            Failure::StoreFailed => "store_failed",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub connections_opened: IntCounter,
    pub connection_failures: IntCounterVec,
    pub state_transitions: IntCounterVec,
    pub state_transitions_refused: IntCounter,
    pub auth_failures: IntCounterVec,
    /// Fetches of identity providers' key sets, by issuer and outcome (`ok`, `error`).
    pub jwks_fetches: IntCounterVec,
    /// Keys held per identity provider.
    pub jwks_keys: IntGaugeVec,
    pub messages_received: IntCounter,
    pub events_published: IntCounter,
    pub frames_sent: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub event_delivery_seconds: Histogram,
    /// Connection setups sent to the registry and not yet handled by it.
    pub registry_backlog: IntGauge,
    pub user_streams: IntGauge,
    pub history_bytes: IntGauge,
    pub runs_in_progress: IntGauge,
    /// Runs ended, by `outcome` (ok, cancelled, error, refused) and error `code`.
    pub agent_runs: IntCounterVec,
    /// Tokens the agents reported in `RUN_FINISHED.usage`, by kind (input, output).
    pub agent_tokens: IntCounterVec,
    pub agent_run_duration_seconds: Histogram,
    /// From a run's request to the agent to its first event (`kind = "ag-ui"`).
    pub agent_first_event_seconds: Histogram,
    /// `POST /ag-ui` requests by the status of their answer.
    pub ag_ui_requests: IntCounterVec,
    /// A shared broker: event batches heard from it, its reconnects, gaps filled from streams.
    pub remote_batches: IntCounter,
    pub broker_reconnects: IntCounter,
    pub gap_fills: IntCounter,
    /// 1 while the shared broker answers, 0 after a command failed to reach it.
    pub broker_connected: IntGauge,
    pub broker_round_trip_seconds: Histogram,
}

impl Metrics {
    /// `frames` events handed to one session `waited` after they were created. A batch's frames
    /// are counted in a local histogram first and added with one set of atomic operations:
    /// observing each frame alone made this shared histogram a contended line between the
    /// threads that run sessions.
    pub fn observe_delivery(&self, waited: std::time::Duration, frames: usize) {
        let waited = waited.as_secs_f64();
        if frames == 1 {
            self.event_delivery_seconds.observe(waited);
            return;
        }
        let local = self.event_delivery_seconds.local();
        for _ in 0..frames {
            local.observe(waited);
        }
        local.flush();
    }

    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Metric definitions are constants; a failure here is a programming error caught by tests.
        fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
            registry.register(Box::new(metric.clone())).expect("metric names are unique and valid");
            metric
        }
        let connections = register(
            &registry,
            IntGaugeVec::new(Opts::new("agentwire_connections", "Open connections by state"), &["state"])
                .expect("valid"),
        );
        for state in ConnectionState::ALL {
            if state != ConnectionState::Closed {
                connections.with_label_values(&[state.as_str()]).set(0);
            }
        }
        let counter =
            |name: &str, help: &str| register(&registry, IntCounter::new(name, help).expect("valid"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid"))
        };
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help).expect("valid"));
        Metrics {
            registry_backlog: gauge(
                "agentwire_registry_backlog",
                "Connection setups waiting for the registry (limits.max_registry_backlog)",
            ),
            user_streams: gauge("agentwire_user_streams", "User streams kept (history.max_users)"),
            history_bytes: gauge(
                "agentwire_history_bytes",
                "Bytes of history kept, all streams (history.max_bytes)",
            ),
            runs_in_progress: gauge("agentwire_runs_in_progress", "Runs started and not ended"),
            connections_opened: counter(
                "agentwire_connections_opened_total",
                "WebSocket sessions registered",
            ),
            connection_failures: counter_vec(
                "agentwire_connection_failures_total",
                "Connections that failed or were refused, by reason",
                &["reason"],
            ),
            state_transitions: counter_vec(
                "agentwire_state_transitions_total",
                "Connection state transitions",
                &["from", "to"],
            ),
            state_transitions_refused: counter(
                "agentwire_state_transitions_refused_total",
                "Transitions refused by the state table",
            ),
            auth_failures: counter_vec(
                "agentwire_auth_failures_total",
                "Refused tokens, by reason",
                &["reason"],
            ),
            jwks_fetches: counter_vec(
                "agentwire_jwks_fetches_total",
                "Fetches of identity providers' key sets, by issuer and outcome",
                &["issuer", "outcome"],
            ),
            jwks_keys: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("agentwire_jwks_keys", "Keys held, by identity provider"),
                    &["issuer"],
                )
                .expect("valid"),
            ),
            messages_received: counter("agentwire_messages_received_total", "Client frames received"),
            events_published: counter("agentwire_events_published_total", "Events appended to user streams"),
            frames_sent: counter("agentwire_frames_sent_total", "Event frames handed to sessions"),
            slow_consumer_closes: counter(
                "agentwire_slow_consumer_closes_total",
                "Sessions closed with 4008 for not reading",
            ),
            event_delivery_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "agentwire_event_delivery_seconds",
                        "From an event's creation to its hand-off to each session",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ]),
                )
                .expect("valid"),
            ),
            agent_runs: counter_vec(
                "agentwire_agent_runs_total",
                "Runs ended, by outcome (ok, cancelled, error, refused) and agent_error code",
                &["outcome", "code"],
            ),
            agent_tokens: counter_vec(
                "agentwire_agent_tokens_total",
                "Tokens the agents reported in RUN_FINISHED.usage, by kind (input, output)",
                &["kind"],
            ),
            agent_run_duration_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "agentwire_agent_run_duration_seconds",
                        "From a run's start to its end",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
                )
                .expect("valid"),
            ),
            agent_first_event_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "agentwire_agent_first_event_seconds",
                        "From a run's request to the upstream agent to its first event",
                    )
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                )
                .expect("valid"),
            ),
            ag_ui_requests: counter_vec(
                "agentwire_ag_ui_requests_total",
                "POST /ag-ui requests (runs for AG-UI clients), by the HTTP status of the answer",
                &["status"],
            ),
            remote_batches: counter(
                "agentwire_broker_remote_batches_total",
                "Event batches heard from the shared broker (broker.kind = \"redis\")",
            ),
            broker_reconnects: counter(
                "agentwire_broker_reconnects_total",
                "Times the shared broker's subscriptions came back after a lost connection",
            ),
            gap_fills: counter(
                "agentwire_broker_gap_fills_total",
                "Missed events read back from a user's stream",
            ),
            broker_connected: gauge(
                "agentwire_broker_connected",
                "1 while the shared broker (Redis) answers, 0 after a command failed to reach it",
            ),
            broker_round_trip_seconds: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "agentwire_broker_round_trip_seconds",
                        "One pipeline of commands to the shared broker and its answers",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                    ]),
                )
                .expect("valid"),
            ),
            connections,
            registry,
        }
    }

    /// A run's end, by outcome and code.
    pub fn run_ended(&self, outcome: &str, code: &str, duration: std::time::Duration) {
        self.agent_runs.with_label_values(&[outcome, code]).inc();
        self.agent_run_duration_seconds.observe(duration.as_secs_f64());
    }

    /// Moves one connection from one state's gauge to another's (`None` = not counted).
    pub fn move_gauge(&self, from: Option<ConnectionState>, to: Option<ConnectionState>) {
        if let Some(from) = from {
            self.connections.with_label_values(&[from.as_str()]).dec();
        }
        if let Some(to) = to {
            self.connections.with_label_values(&[to.as_str()]).inc();
        }
    }

    /// A connection refused or failed, counted by why.
    pub fn fail(&self, failure: Failure) {
        self.connection_failures.with_label_values(&[failure.label()]).inc();
    }

    /// A token refused, wherever it was given (the upgrade, an `auth` frame, `POST /ag-ui`), or
    /// none given in time: `agentwire_auth_failures_total{reason}`. The one place token
    /// refusals are counted; a connection that ends for it is also counted by [`Metrics::fail`].
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// The figures the dashboard charts (`GET /dashboard/stats.json`): gauges, counters summed
    /// over their labels, and the delivery histogram's cumulative buckets.
    pub fn dashboard_stats(&self) -> serde_json::Value {
        let families = self.registry.gather();
        let family = |name: &str| families.iter().find(|f| f.name() == name);
        let total = |name: &str| -> f64 {
            family(name).map_or(0.0, |f| f.get_metric().iter().map(|m| m.get_counter().get_value()).sum())
        };
        let mut connections = serde_json::Map::new();
        for state in ConnectionState::ALL {
            if state != ConnectionState::Closed {
                let value = self.connections.with_label_values(&[state.as_str()]).get();
                connections.insert(state.as_str().to_owned(), value.into());
            }
        }
        let histogram = family("agentwire_event_delivery_seconds")
            .and_then(|f| f.get_metric().first())
            .map(|m| m.get_histogram().clone());
        let (buckets, count, sum) = match &histogram {
            Some(h) => {
                let mut buckets: Vec<serde_json::Value> = h
                    .get_bucket()
                    .iter()
                    .map(|b| serde_json::json!({"le": b.upper_bound(), "count": b.cumulative_count()}))
                    .collect();
                // The +Inf bucket is implicit in the model; JSON has no Infinity, so it is null.
                buckets.push(serde_json::json!({"le": null, "count": h.get_sample_count()}));
                (buckets, h.get_sample_count(), h.get_sample_sum())
            }
            None => (Vec::new(), 0, 0.0),
        };
        serde_json::json!({
            "time_ms": crate::protocol::now_ms(),
            "connections": connections,
            "connections_opened_total": total("agentwire_connections_opened_total"),
            "connection_failures_total": total("agentwire_connection_failures_total"),
            "state_transitions_total": total("agentwire_state_transitions_total"),
            "events_published_total": total("agentwire_events_published_total"),
            "frames_sent_total": total("agentwire_frames_sent_total"),
            "slow_consumer_closes_total": total("agentwire_slow_consumer_closes_total"),
            "delivery": {"buckets": buckets, "count": count, "sum": sum},
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_protocol_names() {
        let metrics = Metrics::new();
        metrics.fail(Failure::SetupFailed);
        metrics.auth_failures.with_label_values(&["expired"]).inc();
        metrics.state_transitions.with_label_values(&["accepted", "authenticated"]).inc();
        let text = metrics.render();
        for name in [
            "agentwire_connections{state=\"processing_ready\"} 0",
            "agentwire_connection_failures_total{reason=\"setup_failed\"} 1",
            "agentwire_auth_failures_total{reason=\"expired\"} 1",
            "agentwire_state_transitions_total{from=\"accepted\",to=\"authenticated\"} 1",
            "agentwire_state_transitions_refused_total 0",
            "agentwire_connections_opened_total 0",
            "agentwire_event_delivery_seconds_bucket",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
