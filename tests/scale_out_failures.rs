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
use common::fault_proxy::{Fault, FaultProxy, Which};
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
    let url = redis.url();
    nodes_on(&[&url, &url], db, |_| {})
}

/// A node on each of `urls` (Redis, or a fault proxy in front of it), sharing `db`, each also
/// set as `tweak` says.
fn nodes_on(
    urls: &[&str],
    db: &TestDatabase,
    tweak: impl Fn(&mut agentwire::config::Config) + Clone + Send + 'static,
) -> (TestServer, TestServer) {
    let node = |i: usize| {
        let url = urls[i].to_owned();
        let store_url = db.url();
        let tweak = tweak.clone();
        TestServer::with(move |c| {
            c.broker.kind = BrokerKind::Redis;
            c.broker.url = url;
            c.broker.prefix = "failures".into();
            c.broker.node_id = format!("node-{i}");
            c.store.kind = StoreKind::Postgres;
            c.store.url = store_url;
            c.agent.step_delay_ms = 0;
            tweak(c);
        })
    };
    (node(0), node(1))
}

/// Waits (bounded) until `/readyz` of `server` answers `status`.
async fn readyz_becomes(server: &TestServer, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if http_get(&server.http("/readyz"), None).await.0 == status {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

#[actix_web::test]
async fn a_half_open_pubsub_link_is_noticed_and_what_it_dropped_is_filled() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    let direct = redis.url();
    let (a, b) = nodes_on(&[&proxy.url(), &direct], &db, |_| {});
    let mut on_a = a.ready_client("hana").await;
    publish(&b, "hana", vec![thinking("before")]).await;
    assert_eq!(on_a.stream_events(1).await[0]["seq"], 1);

    // Node a's Pub/Sub link goes half-open: no traffic, no close. Node a must notice (its
    // `/readyz` says so) rather than go on as if nothing were missed.
    proxy.set(Which::PubSub, Fault::Blackhole);
    for i in 0..3 {
        let (status, _) = publish(&b, "hana", vec![thinking(&format!("during {i}"))]).await;
        assert_eq!(status, 200);
    }
    readyz_becomes(&a, 503).await;

    // The link is back: the tab gets what was dropped, in order, without reconnecting.
    proxy.set(Which::PubSub, Fault::Pass);
    let missed = on_a.stream_events(3).await;
    assert_contiguous(&missed, 2);
    readyz_becomes(&a, 200).await;
    publish(&b, "hana", vec![thinking("after")]).await;
    assert_eq!(on_a.stream_events(1).await[0]["seq"], 5);
}

#[actix_web::test]
async fn events_lost_past_maxlen_send_the_tab_to_resume_never_a_silent_gap() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    let direct = redis.url();
    let (a, b) = nodes_on(&[&proxy.url(), &direct], &db, |c| {
        c.history.events_per_user = std::num::NonZeroUsize::new(5).unwrap();
    });
    let mut on_a = Client::connect_bearer(&a.ws_url(), &a.token("ines")).await.unwrap();
    let epoch = on_a.expect_setup("ines").await["epoch"].as_str().unwrap().to_owned();
    publish(&b, "ines", vec![thinking("1")]).await;
    on_a.stream_events(1).await;

    // Ten events while node a hears nothing; the stream keeps the last five (7 to 11).
    proxy.set(Which::PubSub, Fault::Blackhole);
    for i in 2..=11 {
        let (status, _) = publish(&b, "ines", vec![thinking(&i.to_string())]).await;
        assert_eq!(status, 200);
    }
    readyz_becomes(&a, 503).await;
    proxy.set(Which::PubSub, Fault::Pass);

    // Events 2 to 6 are gone: the tab is told to resume, not handed 7 to 11 after 1.
    assert_eq!(on_a.expect_close_code().await, 1012);
    let url = format!("{}?last_seq=1&epoch={epoch}", a.ws_url());
    let mut again = Client::connect_bearer(&url, &a.token("ines")).await.unwrap();
    let ready = again.expect_setup("ines").await;
    assert_eq!(
        (ready["resume"]["complete"].as_bool(), ready["epoch"].as_str()),
        (Some(false), Some(&*epoch))
    );
    assert_contiguous(&again.stream_events(5).await, 7);
}

#[actix_web::test]
async fn an_open_tabs_stream_does_not_expire_under_it() {
    let redis = OwnRedis::start().await;
    let db = TestDatabase::create();
    let url = redis.url();
    let (a, b) = nodes_on(&[&url, &url], &db, |c| c.history.ttl_secs = 1);
    let mut on_a = Client::connect_bearer(&a.ws_url(), &a.token("jade")).await.unwrap();
    let epoch = on_a.expect_setup("jade").await["epoch"].as_str().unwrap().to_owned();
    publish(&b, "jade", vec![thinking("1")]).await;
    on_a.stream_events(1).await;

    // Three TTLs with the tab open and nothing published: the time passing is what is tested.
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish(&b, "jade", vec![thinking("2")]).await;
    let next = on_a.stream_events(1).await;
    assert_eq!(next[0]["seq"], 2, "the stream started over under the open tab: {next:?}");
    let (status, body) = http_get(&a.http("/readyz"), None).await;
    assert_eq!(status, 200, "{body}");
    drop(on_a);
    let _ = epoch;
}

#[actix_web::test]
async fn a_resume_told_complete_false_replays_nothing_twice() {
    let redis = OwnRedis::start().await;
    let db = TestDatabase::create();
    let url = redis.url();
    let (a, b) = nodes_on(&[&url, &url], &db, |c| {
        c.limits.max_sessions_per_user = std::num::NonZeroUsize::new(32).unwrap();
    });
    publish(&b, "kate", vec![thinking("0")]).await;
    // Events keep coming from node b while 25 tabs resume on node a with an epoch the stream no
    // longer has (so each is answered `complete: false` and replayed everything kept).
    let publisher = {
        let b_publish = b.http("/api/v1/publish");
        tokio::task::spawn_local(async move {
            for i in 1..=200 {
                let body = json!({"user_id": "kate", "events": [thinking(&i.to_string())]}).to_string();
                let (status, _) = http_post(&b_publish, Some(API_KEY), &body).await;
                assert_eq!(status, 200);
            }
        })
    };
    let mut tabs = Vec::new();
    for _ in 0..25 {
        let url = format!("{}?last_seq=1&epoch=gone1234", a.ws_url());
        tabs.push(Client::connect_bearer(&url, &a.token("kate")).await.unwrap());
    }
    publisher.await.unwrap();
    for mut tab in tabs {
        let ready = tab.expect_setup("kate").await;
        assert_eq!(ready["resume"]["complete"], false);
        let mut seqs = Vec::new();
        while seqs.last() != Some(&201) {
            seqs.push(tab.stream_events(1).await[0]["seq"].as_u64().unwrap());
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a duplicate or a gap: {seqs:?}");
    }
}

#[actix_web::test]
async fn scripts_redis_no_longer_has_are_loaded_again() {
    let redis = OwnRedis::start().await;
    let db = TestDatabase::create();
    let (a, b) = two_nodes(&redis, &db);
    let mut on_b = b.ready_client("lena").await;
    publish(&a, "lena", vec![thinking("1")]).await;
    on_b.stream_events(1).await;
    // Scripts are called by their SHA1 (`EVALSHA`); Redis forgets them on a restart or a flush.
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).await.as_deref(), Ok("OK"));
    let (status, body) = publish(&a, "lena", vec![thinking("2"), thinking("3")]).await;
    assert_eq!(status, 200, "{body}");
    assert_contiguous(&on_b.stream_events(2).await, 2);
    let ack = on_b.say("t", "still one round trip away", Some("m1")).await;
    assert!(ack["seq"].as_u64() > Some(3), "{ack}");
}
