//! Test harness: a real agentwire server on 127.0.0.1:0 in its own thread, and a real WebSocket
//! client (tokio-tungstenite) that asserts on what a client sees. Every wait is bounded.
#![allow(dead_code)]

pub mod fake_agent;
pub mod fault_proxy;
pub mod identity_provider;
pub mod own_redis;
pub mod postgres;
pub mod python_agent;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentwire::config::Config;
use agentwire::metrics::Metrics;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound of every single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub const API_KEY: &str = "test-api-key-0123456789";

/// The HS256 secret of every test server (the built-in defaults have none).
pub const TEST_SECRET: &str = "agentwire-test-secret-0123456789";

pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    handle: actix_web::dev::ServerHandle,
    control: agentwire::Control,
}

/// A configuration for tests: ephemeral port, one API key, two registry shards (so that every
/// test also runs users on different shards and tabs that move between them), otherwise the
/// defaults.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.server.workers = 2;
    config.server.registry_shards = 2;
    config.api.keys = vec![API_KEY.to_owned()];
    config.auth.secret = TEST_SECRET.to_owned();
    config.auth.dev_tokens = true;
    // Conversations in memory unless a test asks for a file or a database (tests/store.rs).
    config.store.kind = agentwire::config::StoreKind::Memory;
    config
}

/// The auth configuration of every test server and binary, for minting tokens.
pub fn test_auth() -> agentwire::config::AuthConfig {
    test_config().auth
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let _ = env_logger::builder().is_test(true).try_init();
        let mut config = test_config();
        adjust(&mut config);
        config.validate().expect("test config is valid");
        let (tx, rx) = std::sync::mpsc::channel();
        let server_config = config.clone();
        std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let running = agentwire::build(server_config).expect("server starts");
                tx.send((running.addr, running.server.handle(), running.metrics, running.control.clone()))
                    .unwrap();
                let _ = running.server.await;
            });
        });
        let (addr, handle, metrics, control) = rx.recv_timeout(WAIT).expect("server started in time");
        TestServer { addr, config, metrics, handle, control }
    }

    /// A graceful shutdown, as on SIGTERM: sessions get 1012, then the server stops.
    pub async fn shutdown(self) {
        self.control.shutdown().await;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, sub: &str) -> String {
        let minter = agentwire::auth::Minter::new(&self.config.auth).unwrap();
        minter.mint(sub, None, 3600).unwrap().0
    }

    /// A session that has reached `processing_ready` (token in the Authorization header).
    pub async fn ready_client(&self, sub: &str) -> Client {
        let mut client = Client::connect_bearer(&self.ws_url(), &self.token(sub)).await.expect("upgrade");
        client.expect_setup(sub).await;
        client
    }

    /// The value of one sample of the Prometheus text, 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|line| {
                line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')).map(str::to_owned)
            })
            .map_or(0.0, |v| v.parse().unwrap())
    }

    /// Waits (bounded) until `check` holds on the metrics; for effects that happen after a close.
    pub async fn eventually(&self, what: &str, check: impl Fn(&TestServer) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Sends the stop command at once; the returned future only reports completion.
        drop(self.handle.stop(false));
    }
}

/// A WebSocket client as a frontend would use it.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub connection_id: String,
    /// Frames read past by `recv_where`, returned first by `recv`, in arrival order.
    backlog: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let request = url.into_client_request()?;
        Client::connect_request(request).await
    }

    pub async fn connect_bearer(
        url: &str,
        token: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        Client::connect_request(request).await
    }

    /// Connects from `source` (an address of 127.0.0.0/8), as another machine would.
    pub async fn connect_from(
        url: &str,
        source: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        Client::connect_tuned(url, Some(source), None, None).await
    }

    /// Connects with a chosen source address, receive buffer and bearer token.
    pub async fn connect_tuned(
        url: &str,
        source: Option<&str>,
        recv_buffer: Option<u32>,
        bearer: Option<&str>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(token) = bearer {
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let host = request.uri().authority().expect("host and port").as_str().to_owned();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        if let Some(source) = source {
            socket.bind(format!("{source}:0").parse().unwrap()).expect("bind the source address");
        }
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("receive buffer");
        }
        let tcp = tokio::time::timeout(WAIT, socket.connect(host.parse().unwrap()))
            .await
            .expect("connect in time")
            .expect("connect");
        let (ws, _) =
            tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)))
                .await
                .expect("upgrade answered in time")?;
        Ok(Client { ws, connection_id: String::new(), backlog: Default::default() })
    }

    pub async fn connect_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("upgrade answered in time")?;
        Ok(Client { ws, connection_id: String::new(), backlog: Default::default() })
    }

    pub async fn send(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next JSON text frame; panics on close, timeout or anything else.
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        self.recv_socket().await
    }

    async fn recv_socket(&mut self) -> Value {
        // One deadline for the whole wait: the server's heartbeat pings must not extend it.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("frame in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("server sent JSON")
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close frame and the text frames before it.
    pub async fn expect_close(&mut self) -> (Option<CloseFrame>, Vec<Value>) {
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("close in time");
            match next {
                Some(Ok(Message::Text(text))) => before.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(frame))) => return (frame, before),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection error instead of a close frame: {e}"),
                None => return (None, before),
            }
        }
    }

    /// Reads until the server has sent `count` WebSocket pings, each answered by the client
    /// library as it reads; text frames read meanwhile stay for `recv`. Panics on a close.
    pub async fn expect_pings(&mut self, count: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut pings = 0;
        while pings < count {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("pings in time");
            match next {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(Message::Text(text))) => {
                    self.backlog.push_back(serde_json::from_str(&text).expect("server sent JSON"))
                }
                other => panic!("expected the server's pings, got {other:?} after {pings}"),
            }
        }
    }

    pub async fn expect_close_code(&mut self) -> u16 {
        let (frame, _) = self.expect_close().await;
        u16::from(frame.expect("a close frame").code)
    }

    pub async fn expect_state(&mut self, state: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "connection_state", "{frame}");
        assert_eq!(frame["state"], state, "{frame}");
        let id = frame["connection_id"].as_str().expect("connection_id").to_owned();
        assert!(id.starts_with("ws_"), "{id}");
        if self.connection_id.is_empty() {
            self.connection_id = id;
        } else {
            assert_eq!(self.connection_id, id);
        }
        frame
    }

    /// The four `connection_state` frames of section 3, in order; returns `processing_ready`.
    pub async fn expect_setup(&mut self, user: &str) -> Value {
        self.expect_state("accepted").await;
        let authenticated = self.expect_state("authenticated").await;
        assert_eq!(authenticated["user_id"], user);
        self.expect_state("services_ready").await;
        let ready = self.expect_state("processing_ready").await;
        assert_eq!(ready["user_id"], user);
        ready
    }

    /// The three `connection_state` frames after `accepted`; returns `processing_ready`.
    pub async fn expect_setup_after_accepted(&mut self, user: &str) -> Value {
        let authenticated = self.expect_state("authenticated").await;
        assert_eq!(authenticated["user_id"], user);
        self.expect_state("services_ready").await;
        self.expect_state("processing_ready").await
    }

    pub async fn ping(&mut self, id: Value) -> Value {
        self.send(json!({"type": "ping", "id": id})).await;
        self.recv().await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain to the end so the server sees a clean close handshake.
        let _ = tokio::time::timeout(WAIT, async { while self.ws.next().await.is_some() {} }).await;
    }
}

/// GET with an optional bearer, returning status and JSON (or text as a JSON string).
pub async fn http_get(url: &str, bearer: Option<&str>) -> (u16, Value) {
    let client = awc::Client::builder().timeout(WAIT).finish();
    let mut request = client.get(url);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let mut response = request.send().await.expect("HTTP answer");
    let body = response.body().limit(16 << 20).await.expect("body");
    let status = response.status().as_u16();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, value)
}

pub async fn http_post(url: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    http_post_with(url, bearer, body, &[]).await
}

/// [`http_post`] with more headers.
pub async fn http_post_with(
    url: &str,
    bearer: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let client = awc::Client::builder().timeout(WAIT).finish();
    let mut request = client.post(url).insert_header(("content-type", "application/json"));
    for (name, value) in headers {
        request = request.insert_header((*name, *value));
    }
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let mut response = request.send_body(body.to_owned()).await.expect("HTTP answer");
    let body = response.body().limit(16 << 20).await.expect("body");
    let status = response.status().as_u16();
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, value)
}

/// The HTTP status (and JSON body) of a refused upgrade.
pub fn refused_upgrade(result: Result<Client, tokio_tungstenite::tungstenite::Error>) -> (u16, Value) {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            (response.status().as_u16(), serde_json::from_slice(body).unwrap_or(Value::Null))
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

/// Publishes a batch through the API; returns the status and body.
pub async fn publish(server: &TestServer, user: &str, events: Vec<Value>) -> (u16, Value) {
    let body = json!({"user_id": user, "events": events}).to_string();
    http_post(&server.http("/api/v1/publish"), Some(API_KEY), &body).await
}

/// One `agent_thinking` event of run `r` on thread `t`, carrying `text`.
pub fn thinking(text: &str) -> Value {
    json!({"type": "agent_thinking", "thread_id": "t", "run_id": "r", "payload": {"text": text}})
}

/// A test server whose demo agent runs without pauses.
pub fn fast_agent_server() -> TestServer {
    TestServer::with(|c| c.agent.step_delay_ms = 0)
}

impl Client {
    /// Sends a `user_message` and returns the ack.
    pub async fn say(&mut self, thread_id: &str, content: &str, client_msg_id: Option<&str>) -> Value {
        let mut frame = json!({"type": "user_message", "thread_id": thread_id, "content": content});
        if let Some(id) = client_msg_id {
            frame["client_msg_id"] = json!(id);
        }
        self.send(frame).await;
        self.recv_where(|f| f["type"] == "ack").await
    }

    /// The first frame matching `want`; the frames before it stay for `recv`, in order.
    pub async fn recv_where(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.backlog.iter().position(&want) {
            return self.backlog.remove(at).expect("position is in range");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = self.recv_socket().await;
            if want(&frame) {
                return frame;
            }
            self.backlog.push_back(frame);
            assert!(
                tokio::time::Instant::now() < deadline,
                "no wanted frame in time; skipped: {:?}",
                self.backlog
            );
        }
    }

    /// The next `count` stream events (acks and other frames skipped).
    pub async fn stream_events(&mut self, count: usize) -> Vec<Value> {
        let mut seen = Vec::new();
        while seen.len() < count {
            let frame = self.recv().await;
            if frame.get("seq").is_some() && frame["type"] != "ack" {
                seen.push(frame);
            }
        }
        seen
    }

    /// Every stream event up to and including the terminal event of `run_id`.
    pub async fn events_until_run_ends(&mut self, run_id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame.get("seq").is_none() || frame["type"] == "ack" {
                continue;
            }
            let done = frame["run_id"] == run_id && is_terminal(&frame);
            events.push(frame);
            if done {
                return events;
            }
        }
    }
}

pub fn is_terminal(event: &Value) -> bool {
    event["type"] == "agent_completed" || event["type"] == "agent_error"
}

/// Asserts a run's events are well-formed: `agent_started` first, exactly one terminal event,
/// last, everything in between of the run's own kinds.
pub fn assert_well_formed_run(events: &[&Value]) {
    assert!(!events.is_empty());
    assert_eq!(events[0]["type"], "agent_started", "{events:?}");
    assert_eq!(events.iter().filter(|e| is_terminal(e)).count(), 1, "{events:?}");
    assert!(is_terminal(events.last().unwrap()), "{events:?}");
    for event in &events[1..events.len() - 1] {
        let kind = event["type"].as_str().unwrap();
        assert!(
            ["agent_thinking", "tool_executing", "tool_completed", "agent_message_chunk"].contains(&kind),
            "{kind} inside a run"
        );
    }
}

/// Asserts seqs are contiguous, starting at `first`.
pub fn assert_contiguous(events: &[Value], first: u64) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["seq"].as_u64(), Some(first + i as u64), "gap or duplicate at {event}");
    }
}

impl Client {
    /// Writes bytes straight to the socket, bypassing the WebSocket framing.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(tcp) => tcp.write_all(bytes).await.expect("raw write"),
            _ => panic!("tests use plain TCP"),
        }
    }
}

/// A masked client frame header with `opcode` announcing `len` payload bytes, mask key 0.
pub fn raw_frame_header(opcode: u8, fin: bool, len: u64) -> Vec<u8> {
    let mut header = vec![if fin { 0x80 | opcode } else { opcode }];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=65535 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&len.to_be_bytes());
        }
    }
    header.extend_from_slice(&[0, 0, 0, 0]); // a zero mask leaves the payload as it is
    header
}

/// A whole masked client frame.
pub fn raw_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = raw_frame_header(opcode, fin, payload.len() as u64);
    frame.extend_from_slice(payload);
    frame
}

/// The real `agentwire` binary as an operator starts it, on 127.0.0.1:0, for what only a
/// separate process shows: its memory, its log output, its exit on a signal.
pub struct BinaryServer {
    pub child: std::process::Child,
    pub addr: String,
    /// Everything the process wrote to stderr (its log), collected as it goes.
    pub log: Arc<std::sync::Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl BinaryServer {
    pub fn spawn(env: &[(&str, &str)]) -> BinaryServer {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agentwire"));
        command.current_dir(dir.path()).env("AGENTWIRE__SERVER__BIND", "127.0.0.1:0");
        command.env("AGENTWIRE__API__KEYS", API_KEY).env("RUST_LOG", "info");
        command.env("AGENTWIRE__AUTH__SECRET", TEST_SECRET).env("AGENTWIRE__SERVER__REGISTRY_SHARDS", "2");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(WAIT).expect("the server prints its address");
        let url = first.split_whitespace().find(|w| w.starts_with("http://")).expect("address").to_owned();
        let addr = url.trim_start_matches("http://").to_owned();
        BinaryServer { child, addr, log, _dir: dir }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, sub: &str) -> String {
        let minter = agentwire::auth::Minter::new(&test_auth()).unwrap();
        minter.mint(sub, None, 3600).unwrap().0
    }

    pub fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(status.unwrap().success());
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tests/ag-ui-client/client.mjs` and returns what it printed.
pub async fn node_client(mode: &str, server: &TestServer, token: &str, thread: &str) -> Value {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ag-ui-client");
    assert!(
        dir.join("node_modules/@ag-ui/client").exists(),
        "@ag-ui/client is not installed: run .ci/test (it runs npm ci in tests/ag-ui-client)"
    );
    let run = tokio::process::Command::new("node")
        .arg(dir.join("client.mjs"))
        .args([mode, &server.http("/ag-ui"), token, thread])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the AG-UI client finished in time")
        .expect("node runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the AG-UI client failed ({}):\n{stderr}", output.status);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("client output: {e}\n{stderr}"))
}
