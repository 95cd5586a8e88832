//! `agentwire loadtest` against an in-process server with a few dozen sessions: every scenario
//! finishes with all sessions ready and every correctness counter at zero. No timing is asserted.

mod common;

use std::num::NonZero;

use clap::Parser;
use common::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: agentwire_loadtest::LoadtestArgs,
}

fn loadtest(server: &TestServer, extra: &[&str]) -> agentwire_loadtest::Report {
    let url = server.ws_url();
    let mut argv = vec!["loadtest", "--url", &url, "--quiet", "--api-key", API_KEY];
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(argv).expect("valid arguments");
    let minter = agentwire::auth::Minter::new(&server.config.auth).expect("the test key mints");
    let tokens: agentwire_loadtest::TokenSource =
        std::sync::Arc::new(move |sub: &str| minter.mint(sub, None, 3600).map(|(token, _)| token));
    agentwire_loadtest::run(cli.args, tokens, None).expect("load test runs")
}

fn assert_clean(report: &agentwire_loadtest::Report) {
    assert!(report.passed(), "{}", report.table());
    assert_eq!(report.ready, report.sessions);
    assert!(report.correctness.is_clean());
}

#[test]
fn idle_scenario() {
    let server = TestServer::start();
    let report =
        loadtest(&server, &["--scenario", "idle", "--sessions", "40", "--users", "10", "--hold-secs", "0"]);
    assert_clean(&report);
    assert!(report.connect_to_ready.is_some());
}

#[test]
fn chat_scenario() {
    let server = fast_agent_server();
    let report =
        loadtest(&server, &["--scenario", "chat", "--sessions", "30", "--users", "10", "--messages", "2"]);
    assert_clean(&report);
    let completed = report.message_to_completed.as_ref().expect("runs completed");
    assert_eq!(completed.count, 60);
    // Each user has 3 sessions x 2 messages = 6 runs, seen by each of its 3 sessions.
    assert!(report.events_received >= 30 * 6 * 5);
}

#[test]
fn fanout_scenario() {
    let server = TestServer::start();
    let report = loadtest(
        &server,
        &["--scenario", "fanout", "--sessions", "24", "--users", "4", "--events", "60", "--batch", "25"],
    );
    assert_clean(&report);
    assert_eq!(report.events_received, 24 * 60);
    assert_eq!(report.delivery.as_ref().map(|d| d.count), Some(24 * 60));
}

#[test]
fn refused_sessions_are_reported_by_reason() {
    let server = TestServer::with(|c| c.limits.max_sessions_per_user = NonZero::new(2).unwrap());
    let report =
        loadtest(&server, &["--scenario", "idle", "--sessions", "6", "--users", "2", "--hold-secs", "0"]);
    assert!(!report.passed());
    assert_eq!(report.ready, 4);
    assert_eq!(report.failed.get("close_4004"), Some(&2));
}
