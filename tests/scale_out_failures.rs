//! docs/scale-out.md's failure table ("When something goes away") against a real Redis of the test's own
//! (`redis-server` on a free port, never the machine's): connections to Redis lost and back (nodes
//! resubscribe and fill what they missed, tabs stay open), Redis gone (503s, `unavailable`, `/readyz`, tabs
//! stay open), and Redis restarted empty (new epoch: tabs are sent to resume and learn `complete: false`).
//! The nodes share a PostgreSQL database of the test's own (`common::postgres`).

mod common;

use std::time::Duration;

use agentwire::config::{BrokerKind, StoreKind};
use common::fault_proxy::{Fault, FaultProxy, Which};
use common::own_redis::OwnRedis;
use common::postgres::TestDatabase;
use common::*;
use serde_json::json;

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

/// One node on `url` (Redis, or a fault proxy in front of it), on `db`, set as `tweak` says.
fn node_on(url: &str, db: &TestDatabase, tweak: impl FnOnce(&mut agentwire::config::Config)) -> TestServer {
    TestServer::with(|c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = url.to_owned();
        c.broker.prefix = "failures".into();
        c.store.kind = StoreKind::Postgres;
        c.store.url = db.url();
        c.agent.step_delay_ms = 0;
        tweak(c);
    })
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
    // Both nodes join the empty registry again (not reaped, so not fenced) and go on serving.
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.command(&["SCARD", "failures:{nodes}:members"]).await.as_deref() != Ok("2") {
        assert!(tokio::time::Instant::now() < deadline, "the nodes never registered again");
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

#[actix_web::test]
async fn a_retry_after_an_ambiguous_timeout_is_acked_with_a_run_that_exists() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    // Commands to Redis time out after half the lease: 1 s.
    let node = node_on(&proxy.url(), &db, |c| c.broker.node_lease_secs = 2);
    let mut tab = node.ready_client("lara").await;

    // The network delays the message's script past the timeout; Redis runs it when it comes.
    proxy.set(Which::Commands, Fault::Delay(Duration::from_millis(1500)));
    let message =
        json!({"type": "user_message", "thread_id": "t", "content": "hello?", "client_msg_id": "m1"});
    tab.send(message.clone()).await;
    let refused = tab.recv_where(|f| f["type"] == "error").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.command(&["HEXISTS", "failures:{lara}:dedupe", "m1"]).await.as_deref() != Ok("1") {
        assert!(tokio::time::Instant::now() < deadline, "the delayed script never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set(Which::Commands, Fault::Pass);

    // The retry, as docs/protocol.md says: the same client_msg_id, again while it is answered
    // `unavailable` (the delayed answers drain first). Acked, and its run exists.
    let ack = loop {
        tab.send(message.clone()).await;
        let answer = tab.recv_where(|f| f["type"] == "ack" || f["type"] == "error").await;
        if answer["type"] == "ack" {
            break answer;
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
    };
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    tab.recv_where(|f| f["type"] == "agent_started" && f["run_id"] == run_id.as_str()).await;
    let end = tab.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(end["type"], "agent_completed", "{end}");
}

#[actix_web::test]
async fn a_run_whose_events_redis_did_not_take_still_ends_once_redis_is_back() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    let node = node_on(&proxy.url(), &db, |c| c.agent.step_delay_ms = 200);
    let mut tab = node.ready_client("mona").await;
    let ack = tab.say("t", "a question while Redis is about to go away", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    tab.recv_where(|f| f["type"] == "agent_started" && f["run_id"] == run_id.as_str()).await;

    // Redis unreachable (it keeps its data) until the run has ended on the node's side.
    proxy.set(Which::All, Fault::Cut);
    readyz_becomes(&node, 503).await;
    node.eventually("the run to end on the node", |s| {
        s.metrics.render().lines().any(|l| l.starts_with("agentwire_agent_runs_total{") && !l.ends_with(" 0"))
    })
    .await;
    proxy.set(Which::All, Fault::Pass);

    // Back: the tab sees the run end, once, and says why.
    let events = tab.events_until_run_ends(&run_id).await;
    let ends: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["run_id"] == run_id.as_str() && is_terminal(e)).collect();
    assert_eq!(ends.len(), 1, "{events:?}");
    assert_eq!(
        (ends[0]["type"].as_str(), ends[0]["payload"]["code"].as_str()),
        (Some("agent_error"), Some("broker_unavailable"))
    );
}

#[actix_web::test]
async fn a_slow_redis_gets_calls_refused_past_the_queue_bound_not_held_in_memory() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    let node = node_on(&proxy.url(), &db, |c| {
        c.broker.node_lease_secs = 10; // commands time out after 5 s: the delay below is not a timeout
        c.broker.max_queued_bytes = 65536;
    });
    // Every registry shard's writer connected first (its connection is made on its first call).
    for i in 0..30 {
        assert_eq!(publish(&node, &format!("nina{i}"), vec![thinking("before")]).await.0, 200);
    }
    proxy.set(Which::Commands, Fault::Delay(Duration::from_secs(1)));
    // 30 publishes of 8 KB at once: about 240 KB for a queue of 64 KB.
    let url = node.http("/api/v1/publish");
    let publishes: Vec<_> = (0..30)
        .map(|i| {
            let url = url.clone();
            let body =
                json!({"user_id": format!("nina{i}"), "events": [thinking(&"x".repeat(8000))]}).to_string();
            tokio::task::spawn_local(async move { http_post(&url, Some(API_KEY), &body).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for publish in publishes {
        let (status, body) = publish.await.unwrap();
        // Refused at the bound (at once), or timed out behind the delay.
        statuses.push((status, body["error"].as_str().unwrap_or_default().to_owned()));
    }
    let refused = statuses.iter().filter(|(s, e)| *s == 503 && e == "broker_unavailable").count();
    assert!(refused > 0, "nothing was refused at the bound: {statuses:?}");
    let statuses: Vec<u16> = statuses.into_iter().map(|(s, _)| s).collect();
    assert!(statuses.contains(&200), "nothing went through: {statuses:?}");
    proxy.set(Which::Commands, Fault::Pass);
    let (status, _) = publish(&node, "nina0", vec![thinking("after")]).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn a_publish_that_timed_out_is_outcome_unknown_and_its_retry_publishes_once() {
    let redis = OwnRedis::start().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let db = TestDatabase::create();
    let node = node_on(&proxy.url(), &db, |c| c.broker.node_lease_secs = 2); // commands time out after 1 s
    let mut tab = node.ready_client("olga").await;
    let body = json!({"user_id": "olga", "events": [thinking("once")]}).to_string();
    let url = node.http("/api/v1/publish");
    let publish_with_key = || http_post_with(&url, Some(API_KEY), &body, &[("Idempotency-Key", "k-1")]);

    // The network delays the publish past the timeout; Redis runs it when it comes: not
    // "nothing published".
    proxy.set(Which::Commands, Fault::Delay(Duration::from_millis(1500)));
    let (status, answer) = publish_with_key().await;
    assert_eq!((status, answer["error"].as_str()), (503, Some("outcome_unknown")), "{answer}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while redis.command(&["HEXISTS", "failures:{olga}:dedupe", "publish:api:k-1"]).await.as_deref() != Ok("1")
    {
        assert!(tokio::time::Instant::now() < deadline, "the delayed publish never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set(Which::Commands, Fault::Pass);

    // The retry with the same key (again while the answer is unknown: the delayed answers drain
    // first) answers the seqs of the publish that ran, and adds nothing.
    let (status, answer) = loop {
        let (status, answer) = publish_with_key().await;
        if answer["error"] != "outcome_unknown" {
            break (status, answer);
        }
    };
    assert_eq!((status, &answer["seqs"]), (200, &json!([1])), "{answer}");
    publish(&node, "olga", vec![thinking("marker")]).await;
    let events = tab.stream_events(2).await;
    assert_eq!(
        events.iter().map(|e| (e["seq"].as_u64(), e["payload"]["text"].as_str())).collect::<Vec<_>>(),
        [(Some(1), Some("once")), (Some(2), Some("marker"))]
    );
}
