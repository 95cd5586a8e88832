//! The load test's live progress bar and its final report (a table, and JSON with `--json`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::attack::Attack;
use super::session::Outcome;
use super::{LoadtestArgs, Scenario, Shared};

/// A live line: sessions ready/failed and events per second.
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(shared: Arc<Shared>, sessions: usize, quiet: bool) -> Progress {
        let bar = ProgressBar::new(sessions as u64);
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} ready {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix("connect");
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut last_events = 0;
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                interval.tick().await;
                let events = shared.events.load(Ordering::Relaxed);
                ticking.set_position(shared.ready.load(Ordering::Relaxed) as u64);
                ticking.set_message(format!(
                    "| failed {} | events/s {}",
                    shared.failed.load(Ordering::Relaxed),
                    (events - last_events) * 4
                ));
                last_events = events;
            }
        });
        Progress { bar, ticker: Some(ticker) }
    }

    pub fn phase(&self, name: &'static str) {
        self.bar.set_prefix(name);
    }

    pub fn finish(mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// The server's RSS sampled every half second through the scenario.
pub struct RssTimeline {
    task: tokio::task::JoinHandle<Vec<(f64, f64)>>,
    done: Arc<tokio::sync::Notify>,
}

impl RssTimeline {
    pub fn start(pid: i32) -> RssTimeline {
        let done = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::clone(&done);
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut samples = Vec::new();
            let mut interval = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    () = stop.notified() => break,
                }
                if let Some(sample) = ServerSample::take(pid) {
                    samples
                        .push((started.elapsed().as_secs_f64(), sample.rss_bytes as f64 / (1024.0 * 1024.0)));
                }
            }
            samples
        });
        RssTimeline { task, done }
    }

    /// (seconds since the scenario started, RSS in MB).
    pub async fn finish(self) -> Vec<(f64, f64)> {
        self.done.notify_one();
        self.task.await.unwrap_or_default()
    }
}

/// The server's resident memory and CPU time at one moment, from /proc.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ServerSample {
    pub rss_bytes: u64,
    pub cpu_secs: f64,
}

impl ServerSample {
    pub fn take(pid: i32) -> Option<ServerSample> {
        let process = procfs::process::Process::new(pid).ok()?;
        let stat = process.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let page = procfs::page_size();
        Some(ServerSample { rss_bytes: stat.rss * page, cpu_secs: (stat.utime + stat.stime) as f64 / ticks })
    }
}

/// p50/p95/p99/max of a latency, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(samples_us: impl Iterator<Item = u64>) -> Option<Latency> {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok()?;
        for sample in samples_us {
            let _ = histogram.record(sample.max(1));
        }
        if histogram.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p95_ms: ms(histogram.value_at_quantile(0.95)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Correctness {
    pub seq_gaps: u64,
    pub seq_duplicates: u64,
    pub foreign_events: u64,
    pub malformed_runs: u64,
    /// Sessions that did not finish their scenario (timed out or lost their connection).
    pub incomplete_sessions: u64,
}

impl Correctness {
    pub fn is_clean(&self) -> bool {
        self.seq_gaps
            + self.seq_duplicates
            + self.foreign_events
            + self.malformed_runs
            + self.incomplete_sessions
            == 0
    }
}

#[derive(Debug, Serialize)]
pub struct ServerUsage {
    pub rss_before_mb: f64,
    pub rss_ready_mb: f64,
    pub rss_after_mb: f64,
    /// (RSS with all sessions ready - RSS before) / ready sessions.
    pub rss_per_session_kb: f64,
    /// CPU seconds the server used during the connect phase and during the scenario.
    pub cpu_connect_secs: f64,
    pub cpu_scenario_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub sessions: usize,
    pub users: usize,
    pub ready: usize,
    pub failed: BTreeMap<String, usize>,
    pub connect_secs: f64,
    pub sessions_per_sec: f64,
    pub connect_to_ready: Option<Latency>,
    pub ack: Option<Latency>,
    pub pong: Option<Latency>,
    pub message_to_completed: Option<Latency>,
    pub delivery: Option<Latency>,
    pub scenario_secs: f64,
    pub events_received: u64,
    pub events_per_sec: f64,
    pub error_frames: u64,
    pub publish_errors: Vec<String>,
    pub correctness: Correctness,
    pub server: Option<ServerUsage>,
    /// hostile: attack -> how its attempts ended -> attempts.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attacks: BTreeMap<Attack, BTreeMap<String, u64>>,
    /// (seconds into the scenario, server RSS in MB), with --server-pid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rss_timeline: Vec<(f64, f64)>,
}

pub struct Inputs<'a> {
    pub args: &'a LoadtestArgs,
    pub outcomes: Vec<Outcome>,
    pub connect_elapsed: Duration,
    pub scenario_elapsed: Duration,
    pub events: u64,
    pub errors: u64,
    pub publish_errors: Vec<String>,
    pub server: [Option<ServerSample>; 3],
    pub attacks: BTreeMap<Attack, BTreeMap<String, u64>>,
    pub rss_timeline: Vec<(f64, f64)>,
}

impl Report {
    pub fn build(inputs: Inputs<'_>) -> Report {
        let outcomes = &inputs.outcomes;
        let mut failed = BTreeMap::new();
        let mut correctness = Correctness::default();
        for outcome in outcomes {
            if let Some(reason) = &outcome.failure {
                *failed.entry(reason.clone()).or_insert(0) += 1;
            }
            correctness.seq_gaps += outcome.seq_gaps;
            correctness.seq_duplicates += outcome.seq_duplicates;
            correctness.foreign_events += outcome.foreign_events;
            correctness.malformed_runs += outcome.malformed_runs;
            correctness.incomplete_sessions += u64::from(outcome.incomplete);
        }
        let ready = outcomes.iter().filter(|o| o.failure.is_none()).count();
        let connect_secs = inputs.connect_elapsed.as_secs_f64();
        let scenario_secs = inputs.scenario_elapsed.as_secs_f64();
        let server = match inputs.server {
            [Some(before), Some(ready_sample), Some(after)] => {
                let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
                Some(ServerUsage {
                    rss_before_mb: mb(before.rss_bytes),
                    rss_ready_mb: mb(ready_sample.rss_bytes),
                    rss_after_mb: mb(after.rss_bytes),
                    rss_per_session_kb: ready_sample.rss_bytes.saturating_sub(before.rss_bytes) as f64
                        / 1024.0
                        / ready.max(1) as f64,
                    cpu_connect_secs: ready_sample.cpu_secs - before.cpu_secs,
                    cpu_scenario_secs: after.cpu_secs - ready_sample.cpu_secs,
                })
            }
            _ => None,
        };
        Report {
            scenario: inputs.args.scenario,
            sessions: inputs.args.sessions,
            users: inputs.args.users,
            ready,
            failed,
            connect_secs,
            sessions_per_sec: ready as f64 / connect_secs.max(1e-9),
            connect_to_ready: Latency::of(outcomes.iter().filter_map(|o| o.connect_us)),
            ack: Latency::of(outcomes.iter().flat_map(|o| o.ack_us.iter().copied())),
            pong: Latency::of(outcomes.iter().flat_map(|o| o.pong_us.iter().copied())),
            message_to_completed: Latency::of(outcomes.iter().flat_map(|o| o.completed_us.iter().copied())),
            delivery: Latency::of(outcomes.iter().flat_map(|o| o.delivery_us.iter().copied())),
            scenario_secs,
            events_received: inputs.events,
            events_per_sec: inputs.events as f64 / scenario_secs.max(1e-9),
            error_frames: inputs.errors,
            publish_errors: inputs.publish_errors,
            correctness,
            server,
            attacks: inputs.attacks,
            rss_timeline: inputs.rss_timeline,
        }
    }

    /// Every session ready, every scenario finished, every correctness counter zero, and no
    /// error frame to a real session.
    pub fn passed(&self) -> bool {
        self.failed.is_empty()
            && self.correctness.is_clean()
            && self.publish_errors.is_empty()
            && self.error_frames == 0
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| out.push_str(&format!("  {key:<26} {value}\n"));
        line(
            "scenario",
            format!("{:?} ({} sessions over {} users)", self.scenario, self.sessions, self.users),
        );
        line("ready", format!("{} of {}", self.ready, self.sessions));
        for (reason, count) in &self.failed {
            line("failed", format!("{count} x {reason}"));
        }
        line(
            "connect phase",
            format!(
                "{:.2} s, {:.0} sessions/s to processing_ready",
                self.connect_secs, self.sessions_per_sec
            ),
        );
        let latency = |l: &Option<Latency>| match l {
            Some(l) => format!(
                "p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
                l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.count
            ),
            None => "-".to_owned(),
        };
        line("connect to ready", latency(&self.connect_to_ready));
        if self.ack.is_some() {
            line("ack", latency(&self.ack));
            line("ping to pong", latency(&self.pong));
            line("message to completed", latency(&self.message_to_completed));
        }
        if self.delivery.is_some() {
            line("publish to delivery", latency(&self.delivery));
        }
        line(
            "events received",
            format!(
                "{} in {:.2} s = {:.0} events/s",
                self.events_received, self.scenario_secs, self.events_per_sec
            ),
        );
        if self.error_frames > 0 {
            line("error frames", self.error_frames.to_string());
        }
        for error in &self.publish_errors {
            line("publish error", error.clone());
        }
        let c = &self.correctness;
        line(
            "correctness",
            format!(
                "seq gaps {}, duplicates {}, foreign events {}, malformed runs {}, incomplete sessions {}",
                c.seq_gaps, c.seq_duplicates, c.foreign_events, c.malformed_runs, c.incomplete_sessions
            ),
        );
        if let Some(s) = &self.server {
            line(
                "server RSS",
                format!(
                    "{:.1} MB before, {:.1} MB ready, {:.1} MB after; {:.1} KB per ready session",
                    s.rss_before_mb, s.rss_ready_mb, s.rss_after_mb, s.rss_per_session_kb
                ),
            );
            line(
                "server CPU",
                format!(
                    "{:.2} s connecting, {:.2} s in the scenario",
                    s.cpu_connect_secs, s.cpu_scenario_secs
                ),
            );
        }
        for (attack, endings) in &self.attacks {
            let endings: Vec<String> = endings.iter().map(|(how, n)| format!("{n} x {how}")).collect();
            line(
                &format!(
                    "attack {}",
                    serde_json::to_value(attack).unwrap_or_default().as_str().unwrap_or("?")
                ),
                endings.join(", "),
            );
        }
        if let Some(peak) = self.rss_timeline.iter().map(|(_, mb)| *mb).reduce(f64::max) {
            // About a dozen points: enough to see a climb, a plateau and the way back.
            let step = self.rss_timeline.len().div_ceil(12).max(1);
            let points: Vec<String> =
                self.rss_timeline.iter().step_by(step).map(|(t, mb)| format!("{t:.0}s {mb:.0}")).collect();
            line("server RSS over time (MB)", format!("peak {peak:.1}; {}", points.join(", ")));
        }
        line("result", if self.passed() { "PASS".to_owned() } else { "FAIL".to_owned() });
        out
    }
}
