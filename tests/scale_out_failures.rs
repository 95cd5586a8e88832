//! docs/scale-out.md's failure table ("When something goes away") against a real Redis of the test's own
//! (`redis-server` on a free port, never the machine's): connections to Redis lost and back (nodes
//! resubscribe and fill what they missed, tabs stay open), Redis gone (503s, `unavailable`, `/readyz`, tabs
//! stay open), and Redis restarted empty (new epoch: tabs are sent to resume and learn `complete: false`).
//! The nodes share a PostgreSQL database of the test's own (`common::postgres`).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentwire::config::{BrokerKind, StoreKind};
use common::postgres::TestDatabase;
use common::*;
use serde_json::json;

/// A `redis-server` on a free port, stopped on drop.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = OwnRedis { child: None, port, dir: tempfile::tempdir().unwrap() };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again: empty, as Redis without persistence comes back) and waits until it logs
    /// that it accepts connections.
    async fn restart(&mut self) {
        let mut child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server; .ci/test does)");
        // Its log (on stdout) is read to the end, so that Redis never waits on a full pipe.
        let log = child.stdout.take().expect("stdout is piped");
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut ready = Some(ready);
            for line in BufReader::new(log).lines().map_while(Result::ok) {
                if let Some(ready) = ready.take_if(|_| line.contains("Ready to accept connections")) {
                    let _ = ready.send(());
                }
            }
        });
        self.child = Some(child);
        tokio::time::timeout(WAIT, is_ready)
            .await
            .expect("redis-server ready in time")
            .expect("redis-server exited before it was ready");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn command(&self, args: &[&str]) -> Result<String, String> {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .map_err(|_| "redis-cli did not answer in time".to_owned())?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if output.status.success() && !text.starts_with("Could not connect") && !text.is_empty() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two nodes on `redis`, sharing `db` (Redis nodes share one conversation store).
fn two_nodes(redis: &OwnRedis, db: &TestDatabase) -> (TestServer, TestServer) {
    let node = |i: usize| {
        let url = redis.url();
        let store_url = db.url();
        TestServer::with(move |c| {
            c.broker.kind = BrokerKind::Redis;
            c.broker.url = url;
            c.broker.prefix = "failures".into();
            c.broker.node_id = format!("node-{i}");
            c.store.kind = StoreKind::Postgres;
            c.store.url = store_url;
            c.agent.step_delay_ms = 0;
        })
    };
    (node(0), node(1))
}

#[actix_web::test]
async fn lost_connections_are_resubscribed_and_missed_events_filled() {
    let redis = OwnRedis::start().await;
    let db = TestDatabase::create();
    let (a, b) = two_nodes(&redis, &db);
    let mut on_a = a.ready_client("frank").await;
    let mut on_b = b.ready_client("frank").await;
    publish(&a, "frank", vec![thinking("before")]).await;
    on_b.stream_events(1).await;

    // Every connection to Redis is cut; events published meanwhile reach node b's tab anyway,
    // in order, without the tab reconnecting.
    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await.unwrap();
    for i in 0..5 {
        let (status, _) = publish(&a, "frank", vec![thinking(&format!("during {i}"))]).await;
        assert_eq!(status, 200);
    }
    let on_b_events = on_b.stream_events(5).await;
    assert_contiguous(&on_b_events, 2);
    assert_eq!(on_a.stream_events(6).await[1..], on_b_events[..]);
    b.eventually("node b to count its reconnect", |s| s.metric("agentwire_broker_reconnects_total") >= 1.0)
        .await;
}

#[actix_web::test]
async fn redis_gone_then_back_empty() {
    let mut redis = OwnRedis::start().await;
    let db = TestDatabase::create();
    let (a, b) = two_nodes(&redis, &db);
    let mut on_a = Client::connect_bearer(&a.ws_url(), &a.token("gina")).await.unwrap();
    let epoch = on_a.expect_setup("gina").await["epoch"].as_str().unwrap().to_owned();
    let mut on_b = b.ready_client("gina").await;
    publish(&a, "gina", vec![thinking("1"), thinking("2")]).await;
    on_a.stream_events(2).await;
    on_b.stream_events(2).await;

    redis.stop();
    // Not ready, nothing published, nothing acked; the tabs stay open.
    let (status, body) = http_get(&a.http("/readyz"), None).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("broker_unavailable")));
    let (status, body) = publish(&a, "gina", vec![thinking("lost?")]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("broker_unavailable")));
    on_b.send(json!({"type": "user_message", "thread_id": "t", "content": "hello?", "client_msg_id": "m1"}))
        .await;
    let refused = on_b.recv().await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("unavailable")));
    assert_eq!(on_a.ping(json!("still here")).await["type"], "pong");

    // Redis comes back empty: the streams start over under new epochs, so the tabs are sent
    // to resume, and resuming says what was lost.
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _) = http_get(&a.http("/readyz"), None).await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = publish(&b, "gina", vec![thinking("new 1")]).await;
    assert_eq!(status, 200);
    for tab in [&mut on_a, &mut on_b] {
        assert_eq!(tab.expect_close_code().await, 1012);
    }
    let url = format!("{}?last_seq=2&epoch={epoch}", a.ws_url());
    let mut again = Client::connect_bearer(&url, &a.token("gina")).await.unwrap();
    let ready = again.expect_setup("gina").await;
    assert_ne!(ready["epoch"], epoch.as_str());
    assert_eq!(ready["resume"]["complete"], false);
    assert_eq!(again.stream_events(1).await[0]["payload"]["text"], "new 1");
}
