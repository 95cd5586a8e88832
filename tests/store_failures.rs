//! docs/conversations.md, "When the store fails", against a PostgreSQL server of the test's own
//! (`initdb` into a temporary folder, `postgres` on a free port; never the machine's server),
//! stopped in the middle of a run and started again on the same port and data: `/readyz`
//! answers 503 `store_unavailable`, new messages get `unavailable` and no ack, the run goes on
//! streaming but holds its terminal event until its messages are written (retried while the
//! database is away), and once the database is back the end goes out, `/readyz` is ready, the
//! answer reads back and the refused message, sent again with its `client_msg_id`, is acked.

mod common;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agentwire::config::StoreKind;
use agentwire::protocol::now_ms;
use common::*;
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};

/// Upper bound of PostgreSQL starting or stopping: the machine may be busy building.
const PG_WAIT: Duration = Duration::from_secs(30);

/// Upper bound of what waits on the store's pool while the database is away or coming back: an
/// acquire gives up after 5 s (src/store/sql.rs) and a write may wait behind another batch.
const STORE_WAIT: Duration = Duration::from_secs(20);

/// A run that ended well, as counted when it ends (before its messages are stored).
const RUNS_OK: &str = "agentwire_agent_runs_total{code=\"\",outcome=\"ok\"}";

/// A PostgreSQL server of the test's own: a cluster made by `initdb` in a temporary folder,
/// served by `postgres` on a free port of 127.0.0.1 (its socket in the same folder), as an
/// unprivileged user when the test runs as root (PostgreSQL refuses root). Stopped (immediate
/// shutdown) and removed on drop.
struct OwnPostgres {
    /// The folder of `initdb` and `postgres` (the highest version installed).
    bin: PathBuf,
    /// The uid and gid PostgreSQL runs as; `None`: the test's own (it is not root).
    owner: Option<(u32, u32)>,
    port: u16,
    /// The `postgres` process itself (no `runuser` between: signals reach it directly).
    child: Option<Child>,
    /// Holds `data/` (the cluster), `postgres.log` and the server's socket.
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    /// Makes the cluster, starts the server and creates the database `agentwire` in it.
    async fn start() -> OwnPostgres {
        let bin = server_binaries();
        let owner = unprivileged_owner();
        let dir = tempfile::tempdir().expect("a temporary folder");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("the folder given to PostgreSQL's user");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut pg = OwnPostgres { bin, owner, port, child: None, dir };
        let made = pg
            .command("initdb")
            .arg("-D")
            .arg(pg.data())
            .args(["--auth=trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            made.status.success(),
            "initdb failed ({}): {}{}",
            made.status,
            String::from_utf8_lossy(&made.stdout),
            String::from_utf8_lossy(&made.stderr)
        );
        pg.restart().await;
        let mut admin = PgConnection::connect(&pg.url("postgres")).await.expect("connect to the own server");
        admin.execute("CREATE DATABASE agentwire").await.expect("CREATE DATABASE agentwire");
        let _ = admin.close().await;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// `postgres://` of one of its databases (trust authentication: no password).
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// One of PostgreSQL's programs, run as its user, in its folder.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts the server (again: same port, same data) and waits, bounded, until it takes
    /// connections.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is running already");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("PostgreSQL's log file");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + PG_WAIT;
        let url = self.url("postgres");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("postgres exited ({status}) before taking connections:\n{}", self.log());
            }
            let attempt = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url)).await;
            match attempt {
                Ok(Ok(connection)) => {
                    let _ = connection.close().await;
                    return;
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connecting took over 5 s".to_owned(),
                    };
                    assert!(
                        Instant::now() < deadline,
                        "PostgreSQL not taking connections within {PG_WAIT:?} ({why}):\n{}",
                        self.log()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Stops the server as `pg_ctl stop -m fast` does (SIGINT: sessions ended, a checkpoint) and
    /// waits, bounded, until it has exited.
    async fn stop(&mut self) {
        let child = self.child.take().expect("PostgreSQL is running");
        signal(&child, libc::SIGINT);
        let exited = tokio::task::spawn_blocking(move || wait_within(child, PG_WAIT)).await;
        match exited {
            Ok(Some(status)) => assert!(status.success(), "postgres stopped with {status}:\n{}", self.log()),
            _ => panic!("postgres did not stop within {PG_WAIT:?} of SIGINT:\n{}", self.log()),
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT); SIGKILL if even that does not end it. Never a panic: the
        // test may be unwinding from one of its own. The folder goes with `dir`.
        if let Some(child) = self.child.take() {
            signal(&child, libc::SIGQUIT);
            wait_within(child, Duration::from_secs(10));
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// The child's exit status, awaited (on a thread of its own) for at most `limit`; past it the
/// child is killed and `None` answered.
fn wait_within(mut child: Child, limit: Duration) -> Option<ExitStatus> {
    let pid = child.id() as libc::pid_t;
    let (exited, status) = std::sync::mpsc::channel();
    std::thread::spawn(move || exited.send(child.wait()));
    match status.recv_timeout(limit) {
        Ok(Ok(status)) => Some(status),
        _ => {
            // SAFETY: kill(2) on our own child's pid; the waiting thread reaps it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            None
        }
    }
}

/// `/usr/lib/postgresql/<version>/bin` of the highest version that has `initdb`.
fn server_binaries() -> PathBuf {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.split('.').map(|part| part.parse().ok()).collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("postgres").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL's server programs in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
}

/// Who runs PostgreSQL: nobody else when the test is not root; as root, the `postgres` system
/// user (Debian's package makes it), else `nobody`.
fn unprivileged_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid cannot fail; getpwnam's answer is read at once, on this thread.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        for name in [c"postgres", c"nobody"] {
            let entry = libc::getpwnam(name.as_ptr());
            if !entry.is_null() {
                return Some(((*entry).pw_uid, (*entry).pw_gid));
            }
        }
    }
    panic!("running as root, and neither a `postgres` nor a `nobody` user to run PostgreSQL as");
}

/// The tab's next frame, or `None` once `deadline` has passed without one. `Client::recv` gives
/// up after `WAIT`; it is asked in shorter spans (it loses nothing when cut short).
async fn frame_by(tab: &mut Client, deadline: Instant) -> Option<Value> {
    loop {
        let left = deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())?;
        if let Ok(frame) = tokio::time::timeout(left.min(Duration::from_secs(5)), tab.recv()).await {
            return Some(frame);
        }
    }
}

/// Sends a `user_message` and returns its ack; a refusal fails the test with its `error`.
async fn acked(tab: &mut Client, thread: &str, content: &str, client_msg_id: &str) -> Value {
    let message = json!({"type": "user_message", "thread_id": thread, "content": content, "client_msg_id": client_msg_id});
    tab.send(message).await;
    let answer = tab.recv_where(|f| f["type"] == "ack" || f["type"] == "error").await;
    assert_eq!(answer["type"], "ack", "{client_msg_id} was refused: {answer}");
    answer
}

/// Sends a `user_message` while the database is down and reads until its `error`, which it
/// returns with how long it took; the frames read meanwhile are kept in `frames`.
async fn send_refused(
    tab: &mut Client,
    thread: &str,
    content: &str,
    client_msg_id: &str,
    frames: &mut Vec<(u64, Value)>,
) -> (Value, Duration) {
    let message = json!({"type": "user_message", "thread_id": thread, "content": content, "client_msg_id": client_msg_id});
    tab.send(message).await;
    let sent = Instant::now();
    let deadline = sent + STORE_WAIT;
    let refused = loop {
        let frame =
            frame_by(tab, deadline).await.expect("an answer to the message while the database is down");
        if frame["type"] == "error" {
            break frame;
        }
        frames.push((now_ms(), frame));
    };
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("unavailable"), Some("user_message")),
        "{client_msg_id}: {refused}"
    );
    (refused, sent.elapsed())
}

/// `/readyz` polled until it answers `status`; how long that took, and its body.
async fn readyz_until(server: &TestServer, status: u16, from: Instant) -> (Duration, Value) {
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        let (got, body) = http_get(&server.http("/readyz"), None).await;
        if got == status {
            return (from.elapsed(), body);
        }
        assert!([200, 503].contains(&got), "/readyz: {got} {body}");
        assert!(Instant::now() < deadline, "/readyz not {status} within {STORE_WAIT:?}: {got} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// About 20 s: the database is down for about 15 s, three of the pool's 5 s acquire timeouts
/// (the first refused message's write, the run's first write, the second refused message's).
#[actix_web::test]
async fn with_the_database_gone_messages_are_refused_and_a_run_holds_its_end_until_it_is_back() {
    let mut pg = OwnPostgres::start().await;
    let store_url = pg.url("agentwire");
    // The demo agent's run for "what is 2 * 21": eight steps 300 ms apart (started, thinking,
    // the calculator's call and result, three chunks of the answer, completed).
    let server = TestServer::with(move |c| {
        c.store.kind = StoreKind::Postgres;
        c.store.url = store_url;
        c.agent.step_delay_ms = 300;
    });
    let token = server.token("una");
    let mut tab = server.ready_client("una").await;

    let ack = acked(&mut tab, "t1", "what is 2 * 21", "c-1").await;
    let run_id = ack["run_id"].as_str().expect("run_id").to_owned();
    let of_run = |frame: &Value| frame["run_id"] == run_id.as_str();
    tab.recv_where(|f| of_run(f) && f["type"] == "agent_started").await;

    pg.stop().await;
    let down = Instant::now();
    let down_ms = now_ms();

    // The probe and the tab side by side: a `/readyz` waits up to the pool's acquire timeout.
    let not_ready = readyz_until(&server, 503, down);
    let tab_side = async {
        // The run goes on: an event it made after the database stopped reaches the tab.
        let mut frames = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let frame =
                frame_by(&mut tab, deadline).await.expect("the run's next event while the database is down");
            let made_while_down = of_run(&frame) && frame["ts"].as_u64() > Some(down_ms);
            frames.push((now_ms(), frame));
            if made_while_down {
                break;
            }
        }
        // A message on another thread cannot be stored: refused, not acked.
        let (_, after) = send_refused(&mut tab, "t2", "what is 3 * 3", "c-2", &mut frames).await;
        (frames, after)
    };
    let ((not_ready_after, not_ready), (mut frames, refused_after)) = tokio::join!(not_ready, tab_side);
    assert_eq!(not_ready["error"], "store_unavailable", "{not_ready}");

    // The agent has finished meanwhile (a run is counted when it ends, before its messages are
    // stored). Another message is refused too, and since the store's one writer takes its
    // waiting writes a batch at a time, its write is tried (and fails) only once the run's has
    // failed: from here on the run's end waits on the retries.
    server.eventually("the run's end", |s| s.metric(RUNS_OK) >= 1.0).await;
    let (_, second_refused_after) = send_refused(&mut tab, "t3", "and 4 * 4?", "c-3", &mut frames).await;
    for (_, frame) in &frames {
        assert_ne!(frame["type"], "ack", "the message that could not be stored was acked: {frame}");
        assert!(
            !["t2", "t3"].contains(&frame["thread_id"].as_str().unwrap_or_default()),
            "nothing of a refused message goes out: {frame}"
        );
        assert!(
            !(of_run(frame) && is_terminal(frame)),
            "the run's end went out before it was stored: {frame}"
        );
    }
    let while_down: Vec<(&str, u64)> = frames
        .iter()
        .filter(|(_, f)| of_run(f) && f["ts"].as_u64() > Some(down_ms))
        .map(|(at, f)| {
            (f["type"].as_str().unwrap_or_default(), at.saturating_sub(f["ts"].as_u64().unwrap_or(0)))
        })
        .collect();
    // The whole answer reached the tab while the database was down; only the end waits.
    let chunks = frames.iter().filter(|(_, f)| of_run(f) && f["type"] == "agent_message_chunk").count();
    assert_eq!(chunks, 3, "the run streamed its answer while the database was down: {frames:?}");

    let down_for = down.elapsed();
    let restarted_ms = now_ms();
    pg.restart().await;
    let up = Instant::now();
    let deadline = up + STORE_WAIT;
    let end = loop {
        let frame =
            frame_by(&mut tab, deadline).await.expect("the run's terminal event once the database is back");
        assert_ne!(frame["type"], "ack", "the message that could not be stored was acked: {frame}");
        if of_run(&frame) && is_terminal(&frame) {
            break frame;
        }
    };
    let end_after = up.elapsed();
    // From the last step the agent streamed (its end came one step, 300 ms, later) to the end.
    let last_step =
        frames.iter().rev().find(|(_, f)| of_run(f)).and_then(|(_, f)| f["ts"].as_u64()).unwrap_or(0);
    let held = Duration::from_millis(end["ts"].as_u64().unwrap_or(0).saturating_sub(last_step));
    assert_eq!(
        (end["type"].as_str(), end["payload"]["status"].as_str()),
        (Some("agent_completed"), Some("ok")),
        "{end}"
    );
    assert!(end["ts"].as_u64() >= Some(restarted_ms), "the end went out once the database was back: {end}");
    let (ready_after, _) = readyz_until(&server, 200, up).await;

    // The question and its answer read back; the answer's seq is its terminal event's.
    let url = server.http("/api/v1/threads/t1/messages");
    let deadline = Instant::now() + WAIT;
    let page = loop {
        let (status, page) = http_get(&url, Some(&token)).await;
        assert_eq!(status, 200, "{page}");
        if page["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["seq"] == end["seq"]) {
            break page;
        }
        assert!(Instant::now() < deadline, "the answer's seq is not its end's {}: {page}", end["seq"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let messages = page["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap_or_default()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"], "{page}");
    assert_eq!((&messages[0]["id"], &messages[0]["seq"]), (&ack["message_id"], &ack["seq"]), "{page}");
    assert_eq!(messages[0]["content"], "what is 2 * 21");
    assert!(messages[3]["content"].as_str().unwrap_or_default().contains("42"), "{page}");
    for produced in &messages[1..] {
        assert_eq!(
            (produced["run_id"].as_str(), produced["run_status"].as_str()),
            (Some(run_id.as_str()), Some("ok"))
        );
    }
    // Nothing of the refused messages was stored.
    for thread in ["t2", "t3"] {
        assert_eq!(http_get(&server.http(&format!("/api/v1/threads/{thread}")), Some(&token)).await.0, 404);
    }

    // Sent again with the same client_msg_id, it is stored, acked and run.
    let again = acked(&mut tab, "t2", "what is 3 * 3", "c-2").await;
    assert_eq!(again["client_msg_id"], "c-2", "{again}");
    let events = tab.events_until_run_ends(again["run_id"].as_str().expect("run_id")).await;
    assert_eq!(events.last().unwrap()["type"], "agent_completed", "{events:?}");
    let (status, page) = http_get(&server.http("/api/v1/threads/t2/messages"), Some(&token)).await;
    assert_eq!(status, 200, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(
        (messages[0]["id"].as_str(), messages[0]["role"].as_str()),
        (again["message_id"].as_str(), Some("user"))
    );
    assert!(messages.last().unwrap()["content"].as_str().unwrap_or_default().contains('9'), "{page}");

    eprintln!(
        "store_failures: /readyz 503 {not_ready_after:?} after the stop; messages refused \
         {refused_after:?} and {second_refused_after:?} after they were sent; the run's events made \
         while down (kind, ms from made to read): {while_down:?}; the database down for {down_for:?}; \
         the end went out {held:?} after the run's last step, {end_after:?} after the restart; \
         /readyz 200 {ready_after:?} after it"
    );
}
