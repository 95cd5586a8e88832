//! docs/scale-out.md on a Redis Cluster (`broker.cluster = true`): three masters of the test's
//! own (`redis-server --cluster-enabled yes` on free ports, `common::own_redis`, their slots assigned and the nodes
//! met by the test, never the machine's Redis), two agentwire nodes on it. Every user's calls go
//! to the user's slot, every node-registry call to its own, and events go by sharded Pub/Sub.

mod common;

use std::time::Duration;

use agentwire::config::{BrokerKind, StoreKind};
use common::own_redis::OwnRedis;
use common::postgres::TestDatabase;
use common::*;

/// Three `redis-server --cluster-enabled yes`, slots 0-16383 split between them, stopped on drop.
struct Cluster {
    nodes: Vec<OwnRedis>,
}

/// A port free both for Redis and for its cluster bus (the port + 10000).
fn free_port_pair() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    async fn start() -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];
            nodes.push(OwnRedis::start_on(free_port_pair(), false, &options).await);
        }
        let cluster = Cluster { nodes };
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (port, (from, to)) in ports.iter().zip(ranges) {
            cluster.command(*port, &["CLUSTER", "ADDSLOTSRANGE", &from.to_string(), &to.to_string()]);
        }
        for port in &ports[1..] {
            cluster.command(ports[0], &["CLUSTER", "MEET", "127.0.0.1", &port.to_string()]);
        }
        // Every node sees every slot served before the test goes on.
        let deadline = tokio::time::Instant::now() + WAIT;
        for port in ports {
            while !cluster.command(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(tokio::time::Instant::now() < deadline, "the cluster never came up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cluster
    }

    fn command(&self, port: u16, args: &[&str]) -> String {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut connection = client.get_connection_with_timeout(WAIT).unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        match command.query::<redis::Value>(&mut connection).unwrap() {
            redis::Value::SimpleString(s) => s,
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        }
    }

    fn url(&self) -> String {
        self.nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",")
    }
}

fn nodes(cluster: &Cluster, db: &TestDatabase, step_delay_ms: u64) -> (TestServer, TestServer) {
    let node = |i: usize| {
        let (url, store_url) = (cluster.url(), db.url());
        TestServer::with(move |c| {
            c.broker.kind = BrokerKind::Redis;
            c.broker.cluster = true;
            c.broker.url = url;
            c.broker.prefix = "cluster".into();
            c.broker.node_id = format!("node-{i}");
            c.store.kind = StoreKind::Postgres;
            c.store.url = store_url;
            c.agent.step_delay_ms = step_delay_ms;
        })
    };
    (node(0), node(1))
}

#[actix_web::test]
async fn two_nodes_on_a_three_master_cluster_are_one_server() {
    let cluster = Cluster::start().await;
    let db = TestDatabase::create();
    let (a, b) = nodes(&cluster, &db, 0);
    // Users whose keys land on every master.
    for user in ["ada", "bob", "cyd", "dee", "eve", "fay"] {
        let mut on_a = Client::connect_bearer(&a.ws_url(), &a.token(user)).await.unwrap();
        let epoch = on_a.expect_setup(user).await["epoch"].as_str().unwrap().to_owned();
        let mut on_b = b.ready_client(user).await;

        // A run started on node a streams the same events to the tab on node b.
        let ack = on_a.say("t", "hello from a cluster", Some("m1")).await;
        let run_id = ack["run_id"].as_str().unwrap().to_owned();
        let seen_a = on_a.events_until_run_ends(&run_id).await;
        let seen_b = on_b.events_until_run_ends(&run_id).await;
        assert_eq!(seen_a, seen_b, "user {user}");
        assert_eq!(seen_a.last().unwrap()["type"], "agent_completed", "user {user}");
        assert_contiguous(&seen_a, 1);

        // A publish on node b reaches both; the same message again is one message.
        let (status, body) = publish(&b, user, vec![thinking("published")]).await;
        assert_eq!(status, 200, "{body}");
        let last = seen_a.last().unwrap()["seq"].as_u64().unwrap();
        assert_eq!(on_a.stream_events(1).await[0]["seq"].as_u64(), Some(last + 1));
        assert_eq!(on_b.stream_events(1).await[0]["seq"].as_u64(), Some(last + 1));
        let again = on_b.say("t", "hello from a cluster", Some("m1")).await;
        assert_eq!(again["run_id"], ack["run_id"]);

        // Node a's tab resumes on node b with nothing missed.
        drop(on_a);
        let url = format!("{}?last_seq={}&epoch={epoch}", b.ws_url(), last);
        let mut resumed = Client::connect_bearer(&url, &b.token(user)).await.unwrap();
        let ready = resumed.expect_setup(user).await;
        assert_eq!(ready["resume"]["complete"], true, "{ready}");
        assert_eq!(resumed.stream_events(1).await[0]["payload"]["text"], "published");
    }
    // The connections API of either node lists the user's sessions on both.
    let (status, body) = http_get(&a.http("/api/v1/users/fay/connections"), Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(&b.http("/readyz"), None).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn a_cancel_from_another_node_reaches_the_run_by_sharded_pubsub() {
    let cluster = Cluster::start().await;
    let db = TestDatabase::create();
    let (a, b) = nodes(&cluster, &db, 300);
    let mut on_a = a.ready_client("gus").await;
    let mut on_b = b.ready_client("gus").await;
    let ack = on_a.say("t", "a long question", None).await;
    let run_id = ack["run_id"].as_str().unwrap().to_owned();
    on_b.recv_where(|f| f["type"] == "agent_started" && f["run_id"] == run_id.as_str()).await;
    on_b.send(serde_json::json!({"type": "cancel_run", "run_id": run_id})).await;
    let end = on_b.recv_where(|f| f["run_id"] == run_id.as_str() && is_terminal(f)).await;
    assert_eq!(end["payload"]["status"], "cancelled", "{end}");
}
