//! The store's thread: a runtime of its own, a pool of connections (sqlx's `Any` driver over
//! SQLite or PostgreSQL), one writer that commits whatever writes are waiting together, and
//! reads that run beside it. Why a thread of its own: a pool's connections belong to the
//! runtime that made them, and the registry's shards and the HTTP workers each run their own.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use log::{debug, info, warn};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    Added, Confirmed, Conversation, NewUserMessage, Page, PublishedAnswer, RunMessages, StoreError,
    StoreSettings, ThreadView, QUEUE,
};

mod group;

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the store's thread is asked.
pub enum Job {
    AddUserMessage(NewUserMessage, Answer<Added>),
    Confirm {
        user_id: String,
        what: Confirmed,
        epoch: String,
        seq: u64,
        answer: Answer<()>,
    },
    RunStarted {
        user_id: String,
        thread_id: String,
        run_id: String,
        answer: Answer<()>,
    },
    AddRunMessages(RunMessages, Answer<()>),
    AddAnswers(Vec<PublishedAnswer>, Answer<Vec<(String, String)>>),
    Rename {
        user_id: String,
        thread_id: String,
        title: String,
        now: u64,
        answer: Answer<Option<ThreadView>>,
    },
    Delete {
        user_id: String,
        thread_id: String,
        answer: Answer<Option<Option<String>>>,
    },
    Expire {
        cutoff: u64,
        answer: Answer<Vec<(String, String)>>,
    },
    History {
        user_id: String,
        thread_id: String,
        up_to: i64,
        limit: usize,
        answer: Answer<Conversation>,
    },
    Threads {
        user_id: String,
        limit: usize,
        before: Option<String>,
        answer: Answer<Page<ThreadView>>,
    },
    Thread {
        user_id: String,
        thread_id: String,
        answer: Answer<Option<ThreadView>>,
    },
    Known {
        user_id: String,
        thread_id: String,
        ids: Vec<String>,
        answer: Answer<HashSet<String>>,
    },
    Messages {
        user_id: String,
        thread_id: String,
        limit: usize,
        before: Option<String>,
        answer: Answer<Option<Page<Box<RawValue>>>>,
    },
    Ping(Answer<()>),
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations");

/// Starts the store's thread; answers once the database is open and migrated.
pub fn start(settings: StoreSettings) -> Result<mpsc::Sender<Job>, String> {
    let (jobs, queue) = mpsc::channel(QUEUE);
    let (ready, opened) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("aw-store".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready.send(Err(format!("cannot start the store's runtime: {e}")))),
            };
            runtime.block_on(async move {
                let pool = match open(&settings.url).await {
                    Ok(pool) => pool,
                    Err(e) => return drop(ready.send(Err(e))),
                };
                let _ = ready.send(Ok(()));
                serve(pool, settings, queue).await;
            });
        })
        .map_err(|e| format!("cannot start the store's thread: {e}"))?;
    opened.recv().map_err(|_| "the store's thread stopped while opening".to_owned())??;
    Ok(jobs)
}

async fn open(url: &str) -> Result<AnyPool, String> {
    sqlx::any::install_default_drivers();
    let options: AnyConnectOptions = url.parse().map_err(|e| format!("{e}"))?;
    let memory = url.starts_with("sqlite::memory:");
    let sqlite = url.starts_with("sqlite:");
    // An SQLite database in memory lives as long as its one connection.
    let pool = AnyPoolOptions::new()
        .max_connections(if memory {
            1
        } else if sqlite {
            4
        } else {
            8
        })
        .min_connections(u32::from(memory))
        .idle_timeout(if memory { None } else { Some(Duration::from_secs(300)) })
        .max_lifetime(if memory { None } else { Some(Duration::from_secs(1800)) })
        // A database that is away fails calls after this long (`unavailable`, `/readyz` 503).
        .acquire_timeout(Duration::from_secs(2))
        .after_connect(move |connection, _| {
            Box::pin(async move {
                if sqlite && !memory {
                    // WAL: readers beside the writer; a commit survives the process being killed.
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *connection).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *connection).await?;
                    sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *connection).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| format!("cannot open the database: {e}"))?;
    MIGRATOR.run(&pool).await.map_err(|e| format!("cannot migrate the database: {e}"))?;
    Ok(pool)
}

/// Hands reads to tasks of their own and writes to the one writer.
async fn serve(pool: AnyPool, settings: StoreSettings, mut queue: mpsc::Receiver<Job>) {
    let (writes, waiting) = mpsc::unbounded_channel();
    tokio::spawn(writer(pool.clone(), settings.clone(), waiting));
    while let Some(job) = queue.recv().await {
        match job {
            Job::History { user_id, thread_id, up_to, limit, answer } => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let sent = history(&pool, &user_id, &thread_id, up_to, limit).await;
                    let _ = answer.send(sent.map_err(error));
                });
            }
            Job::Threads { user_id, limit, before, answer } => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ =
                        answer.send(threads(&pool, &user_id, limit, before.as_deref()).await.map_err(error));
                });
            }
            Job::Known { user_id, thread_id, ids, answer } => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ = answer.send(known(&pool, &user_id, &thread_id, &ids).await.map_err(error));
                });
            }
            Job::Thread { user_id, thread_id, answer } => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let found = async {
                        let mut connection = pool.acquire().await?;
                        thread(&mut connection, &user_id, &thread_id, true).await
                    };
                    let _ = answer.send(found.await.map_err(error));
                });
            }
            Job::Messages { user_id, thread_id, limit, before, answer } => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let page = messages(&pool, &user_id, &thread_id, limit, before.as_deref()).await;
                    let _ = answer.send(page.map_err(error));
                });
            }
            Job::Ping(answer) => {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ =
                        answer.send(sqlx::query("SELECT 1").execute(&pool).await.map(drop).map_err(error));
                });
            }
            write => {
                // The writer is this thread's own task: it goes on until the queue closes.
                let _ = writes.send(write);
            }
        }
    }
}

/// What a write produced, sent as its answer once its transaction is settled.
enum Written {
    Added(Added),
    Done,
    View(Option<ThreadView>),
    Deleted(Option<Option<String>>),
    Expired(Vec<(String, String)>),
    Answers(Vec<(String, String)>),
}

/// Commits the waiting writes together, in one transaction (the common kinds grouped into a
/// few statements: `group.rs`), and answers each only after the commit. When the database refuses one of them, the whole group is written again with each
/// write in a savepoint of its own, so that one does not take the others with it; savepoints
/// cost two statements a write, so they are not paid while every write goes in
/// (docs/conversations.md, "The store's speed").
async fn writer(pool: AnyPool, settings: StoreSettings, mut waiting: mpsc::UnboundedReceiver<Job>) {
    let mut batch = Vec::new();
    while let Some(first) = waiting.recv().await {
        batch.push(first);
        while batch.len() < 256 {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Rows are locked in one order whatever node writes (several nodes on one PostgreSQL
        // database would otherwise deadlock, each holding a thread the other wants next). The
        // sort is stable: one thread's writes keep their order.
        batch.sort_by(|a, b| lock_order(a).cmp(&lock_order(b)));
        let results = match write_together(&pool, &batch, &settings).await {
            Ok(results) => Ok(results),
            Err(e) if refused(&e) => {
                debug!("store: a write of {} was refused ({e}); writing them one by one", batch.len());
                write_apart(&pool, &batch, &settings).await
            }
            Err(e) => Err(e),
        };
        match results {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    answer(job, result);
                }
            }
            Err(e) => {
                warn!("store: {} writes not committed: {e}", batch.len());
                let e = error(e);
                for job in batch.drain(..) {
                    answer(job, Err(e.clone()));
                }
            }
        }
    }
}

/// Every write of the group in one transaction; any failure fails them all.
async fn write_together(
    pool: &AnyPool,
    batch: &[Job],
    settings: &StoreSettings,
) -> Result<Vec<Result<Written, StoreError>>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let mut transaction = connection.begin().await?;
    let mut results = Vec::with_capacity(batch.len());
    let mut rest = batch;
    while let Some(first) = rest.first() {
        let grouped = rest.iter().take_while(|job| group::groupable(job)).count();
        if grouped > 0 {
            let written = group::write(&mut transaction, &rest[..grouped], settings).await?;
            results.extend(written.into_iter().map(Ok));
            rest = &rest[grouped..];
        } else {
            results.push(Ok(write(&mut transaction, first, settings).await?));
            rest = &rest[1..];
        }
    }
    transaction.commit().await?;
    Ok(results)
}

/// Every write of the group in a savepoint of its own: a refused one is answered with why.
async fn write_apart(
    pool: &AnyPool,
    batch: &[Job],
    settings: &StoreSettings,
) -> Result<Vec<Result<Written, StoreError>>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let mut transaction = connection.begin().await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let mut savepoint = transaction.begin().await?;
        match write(&mut savepoint, job, settings).await {
            Ok(written) => {
                savepoint.commit().await?;
                results.push(Ok(written));
            }
            Err(e) => {
                warn!("store: a write failed: {e}");
                savepoint.rollback().await?;
                results.push(Err(error(e)));
            }
        }
    }
    transaction.commit().await?;
    Ok(results)
}

/// Whether the database refused a statement (as opposed to not being reached at all).
fn refused(e: &sqlx::Error) -> bool {
    !matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    )
}

/// The rows a write locks first: its user's thread.
fn lock_order(job: &Job) -> (&str, &str) {
    match job {
        Job::AddUserMessage(message, _) => (&message.user_id, &message.thread_id),
        Job::AddRunMessages(run, _) => (&run.user_id, &run.thread_id),
        Job::AddAnswers(answers, _) => answers.first().map_or(("", ""), |a| (&a.user_id, &a.thread_id)),
        Job::RunStarted { user_id, thread_id, .. }
        | Job::Rename { user_id, thread_id, .. }
        | Job::Delete { user_id, thread_id, .. } => (user_id, thread_id),
        Job::Confirm { user_id, .. } => (user_id, ""),
        _ => ("", ""),
    }
}

/// Sends a job its answer: what it wrote, or why it was not carried out.
fn answer(job: Job, result: Result<Written, StoreError>) {
    fn send<T>(answer: Answer<T>, result: Result<Written, StoreError>, take: fn(Written) -> Option<T>) {
        let value = result.and_then(|written| {
            take(written).ok_or_else(|| StoreError::Failed("a write answered another's kind".into()))
        });
        let _ = answer.send(value);
    }
    fn fail<T>(answer: Answer<T>, result: Result<Written, StoreError>) {
        let e = result.err().unwrap_or_else(|| StoreError::Failed("a read was sent to the writer".into()));
        let _ = answer.send(Err(e));
    }
    match job {
        Job::AddUserMessage(_, answer) => send(answer, result, |w| match w {
            Written::Added(added) => Some(added),
            _ => None,
        }),
        Job::Confirm { answer, .. } | Job::RunStarted { answer, .. } | Job::AddRunMessages(_, answer) => {
            send(answer, result, |w| matches!(w, Written::Done).then_some(()))
        }
        Job::Rename { answer, .. } => send(answer, result, |w| match w {
            Written::View(view) => Some(view),
            _ => None,
        }),
        Job::Delete { answer, .. } => send(answer, result, |w| match w {
            Written::Deleted(running) => Some(running),
            _ => None,
        }),
        Job::AddAnswers(_, answer) => send(answer, result, |w| match w {
            Written::Answers(made) => Some(made),
            _ => None,
        }),
        Job::Expire { answer, .. } => send(answer, result, |w| match w {
            Written::Expired(gone) => Some(gone),
            _ => None,
        }),
        Job::History { answer, .. } => fail(answer, result),
        Job::Threads { answer, .. } => fail(answer, result),
        Job::Thread { answer, .. } => fail(answer, result),
        Job::Known { answer, .. } => fail(answer, result),
        Job::Messages { answer, .. } => fail(answer, result),
        Job::Ping(answer) => fail(answer, result),
    }
}

async fn write(
    connection: &mut AnyConnection,
    job: &Job,
    settings: &StoreSettings,
) -> Result<Written, sqlx::Error> {
    Ok(match job {
        Job::AddUserMessage(message, _) => {
            Written::Added(add_user_message(connection, message, settings).await?)
        }
        Job::Confirm { user_id, what, epoch, seq, .. } => {
            confirm(connection, user_id, what, epoch, *seq).await?;
            Written::Done
        }
        Job::RunStarted { user_id, thread_id, run_id, .. } => {
            sqlx::query("UPDATE threads SET running = $1 WHERE user_id = $2 AND thread_id = $3")
                .bind(run_id.as_str())
                .bind(user_id.as_str())
                .bind(thread_id.as_str())
                .execute(&mut *connection)
                .await?;
            Written::Done
        }
        Job::AddRunMessages(run, _) => {
            add_run_messages(connection, run).await?;
            Written::Done
        }
        Job::AddAnswers(answers, _) => {
            let mut made = Vec::new();
            for answer in answers {
                if let Some(title) = add_answer(connection, answer).await? {
                    made.push((answer.thread_id.clone(), title));
                }
            }
            Written::Answers(made)
        }
        Job::Rename { user_id, thread_id, title, now, .. } => {
            Written::View(rename(connection, user_id, thread_id, title, *now).await?)
        }
        Job::Delete { user_id, thread_id, .. } => {
            Written::Deleted(delete(connection, user_id, thread_id).await?)
        }
        Job::Expire { cutoff, .. } => Written::Expired(expire(connection, *cutoff).await?),
        // Reads never reach the writer (`serve`); one that did is answered as failed.
        Job::History { .. }
        | Job::Threads { .. }
        | Job::Thread { .. }
        | Job::Known { .. }
        | Job::Messages { .. }
        | Job::Ping(_) => return Err(sqlx::Error::Configuration("a read was sent to the writer".into())),
    })
}

fn error(e: sqlx::Error) -> StoreError {
    // A deadlock or a serialisation failure between nodes: nothing was written, try again.
    if let sqlx::Error::Database(db) = &e {
        if matches!(db.code().as_deref(), Some("40P01" | "40001")) {
            return StoreError::Unavailable(e.to_string());
        }
    }
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        other => StoreError::Failed(other.to_string()),
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

async fn add_user_message(
    connection: &mut AnyConnection,
    message: &NewUserMessage,
    settings: &StoreSettings,
) -> Result<Added, sqlx::Error> {
    let body = message.body();
    let NewUserMessage { user_id, thread_id, message_id, run_id, client_msg_id, content, created_at, .. } =
        message;
    // One statement for both questions asked before writing: was this `client_msg_id` stored
    // already, and how much does the user keep.
    let seen = sqlx::query(
        "SELECT m.id, m.run_id, m.turn, m.seq, \
         (SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM threads WHERE user_id = $1) AS used, \
         (SELECT interrupts FROM threads WHERE user_id = $4 AND thread_id = $5) AS interrupts, \
         (SELECT running FROM threads WHERE user_id = $6 AND thread_id = $7) AS running \
         FROM (SELECT 1 AS one) AS here LEFT JOIN messages m ON m.user_id = $2 AND m.client_msg_id = $3",
    )
    .bind(user_id.as_str())
    .bind(user_id.as_str())
    .bind(client_msg_id.clone())
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .fetch_one(&mut *connection)
    .await?;
    if let Some(id) = seen.try_get::<Option<String>, _>("id")? {
        return Ok(Added::Repeat {
            message_id: id,
            run_id: seen.try_get::<Option<String>, _>("run_id")?.unwrap_or_default(),
            turn: seen.try_get::<Option<i64>, _>("turn")?.unwrap_or_default(),
            seq: seen.try_get::<Option<i64>, _>("seq")?.map(to_u64),
        });
    }
    let interrupts: Option<String> = seen.try_get("interrupts")?;
    let running = seen.try_get::<Option<String>, _>("running")?.is_some();
    if let Some(refused) = message.refusal(interrupts.as_deref(), running) {
        return Ok(refused);
    }
    let used: i64 = seen.try_get::<Option<i64>, _>("used")?.unwrap_or_default();
    let bytes = to_i64(body.len() as u64);
    if used.saturating_add(bytes) > to_i64(settings.max_bytes_per_user as u64) {
        return Ok(Added::QuotaExceeded);
    }
    let now = to_i64(*created_at);
    let title = super::title_of(content);
    let turn = take_turn(connection, user_id, thread_id, &title, now, bytes).await?;
    let made = turn == 1;
    sqlx::query(
        "INSERT INTO messages (user_id, thread_id, turn, part, id, body, client_msg_id, run_id, created_at, bytes) \
         VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8, $9)",
    )
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .bind(turn)
    .bind(message_id.as_str())
    .bind(body)
    .bind(client_msg_id.clone())
    .bind(run_id.as_str())
    .bind(now)
    .bind(bytes)
    .execute(&mut *connection)
    .await?;
    let mut evicted = Vec::new();
    if made {
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM threads WHERE user_id = $1")
            .bind(user_id.as_str())
            .fetch_one(&mut *connection)
            .await?
            .try_get("n")?;
        let over = count - to_i64(settings.max_threads_per_user as u64);
        if over > 0 {
            let oldest = sqlx::query(
                "SELECT thread_id FROM threads WHERE user_id = $1 AND thread_id <> $2 \
                 ORDER BY updated_at, thread_id LIMIT $3",
            )
            .bind(user_id.as_str())
            .bind(thread_id.as_str())
            .bind(over)
            .fetch_all(&mut *connection)
            .await?;
            for row in oldest {
                let gone: String = row.try_get("thread_id")?;
                delete(connection, user_id, &gone).await?;
                evicted.push(gone);
            }
        }
    }
    Ok(Added::Stored { turn, new_thread: made.then_some(title), evicted })
}

/// The thread made, or its next turn taken, with one message of `bytes` counted: a thread's
/// first message is its turn 1, so a turn of 1 says the thread is new.
async fn take_turn(
    connection: &mut AnyConnection,
    user_id: &str,
    thread_id: &str,
    title: &str,
    now: i64,
    bytes: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO threads (user_id, thread_id, title, created_at, updated_at, turns, message_count, bytes) \
         VALUES ($1, $2, $3, $4, $5, 1, 1, $6) \
         ON CONFLICT (user_id, thread_id) DO UPDATE SET turns = threads.turns + 1, \
         updated_at = excluded.updated_at, message_count = threads.message_count + 1, \
         bytes = threads.bytes + excluded.bytes \
         RETURNING turns",
    )
    .bind(user_id)
    .bind(thread_id)
    .bind(title)
    .bind(now)
    .bind(now)
    .bind(bytes)
    .fetch_one(&mut *connection)
    .await?
    .try_get("turns")
}

async fn confirm(
    connection: &mut AnyConnection,
    user_id: &str,
    what: &Confirmed,
    epoch: &str,
    seq: u64,
) -> Result<(), sqlx::Error> {
    match what {
        Confirmed::Messages(ids) => {
            for (id, run_id) in ids {
                sqlx::query(
                    "UPDATE messages SET epoch = $1, seq = $2 \
                     WHERE user_id = $3 AND id = $4 AND run_id = $5 AND part = 0",
                )
                .bind(epoch)
                .bind(to_i64(seq))
                .bind(user_id)
                .bind(id.as_str())
                .bind(run_id.as_str())
                .execute(&mut *connection)
                .await?;
            }
        }
        Confirmed::Run(run_id) => {
            sqlx::query(
                "UPDATE messages SET epoch = $1, seq = $2 WHERE user_id = $3 AND run_id = $4 AND part <> 0",
            )
            .bind(epoch)
            .bind(to_i64(seq))
            .bind(user_id)
            .bind(run_id.as_str())
            .execute(&mut *connection)
            .await?;
        }
    }
    Ok(())
}

/// Rows of one multi-row insert: SQLite takes at most 32,766 parameters in a statement.
const ROWS_PER_INSERT: usize = 500;

/// How a run's end changes the thread's `interrupts`: set by an interrupted run, cleared by
/// one that ended `ok`, left by a cancel or an error (the agent still waits for its answer).
pub(super) fn interrupts_after_run(status: &str, interrupts: &str, column: &str) -> String {
    format!("CASE WHEN {status} = 'interrupted' THEN {interrupts} WHEN {status} = 'ok' THEN NULL ELSE {column} END")
}

async fn add_run_messages(connection: &mut AnyConnection, run: &RunMessages) -> Result<(), sqlx::Error> {
    if run.whole {
        return replace_conversation(connection, run).await;
    }
    let now = to_i64(run.created_at);
    let sizes: Vec<i64> = run.messages.iter().map(|m| to_i64(m.get().len() as u64)).collect();
    let interrupts = interrupts_after_run("$8", "$9", "interrupts");
    let updated = sqlx::query(&format!(
        "UPDATE threads SET updated_at = $1, message_count = message_count + $2, bytes = bytes + $3, \
         state = COALESCE($4, state), running = CASE WHEN running = $5 THEN NULL ELSE running END, \
         interrupts = {interrupts} WHERE user_id = $6 AND thread_id = $7"
    ))
    .bind(now)
    .bind(to_i64(run.messages.len() as u64))
    .bind(sizes.iter().sum::<i64>())
    .bind(run.state.as_ref().map(|s| s.get().to_owned()))
    .bind(run.run_id.as_str())
    .bind(run.user_id.as_str())
    .bind(run.thread_id.as_str())
    .bind(run.status)
    .bind(run.interrupts.as_ref().map(|i| i.get().to_owned()))
    .execute(&mut *connection)
    .await?
    .rows_affected();
    // A thread deleted while its run went on stays deleted.
    if updated == 0 {
        return Ok(());
    }
    let rows: Vec<(&RunMessages, usize, &RawValue)> =
        run.messages.iter().enumerate().map(|(part, m)| (run, part, &**m)).collect();
    group::insert_run_rows(connection, group::Places::of(connection), &rows).await
}

/// A run that gave the thread's whole conversation (`MESSAGES_SNAPSHOT`, docs/agents.md, v2):
/// the thread's messages up to the run's turn become the snapshot's, in its order, matched by
/// `id`. Stored user messages the snapshot has stay where they are (each opens its turn, with
/// its `client_msg_id` and `seq`); every other message of the snapshot is laid out after the
/// user message before it (before the first one: ahead of it, in negative parts), keeping its
/// run and stream position when it was stored already. Stored messages the snapshot lacks go.
/// Messages of later turns (queued behind the run) stay as they are.
async fn replace_conversation(connection: &mut AnyConnection, run: &RunMessages) -> Result<(), sqlx::Error> {
    // A thread deleted while its run went on stays deleted.
    let exists = sqlx::query("SELECT 1 FROM threads WHERE user_id = $1 AND thread_id = $2")
        .bind(run.user_id.as_str())
        .bind(run.thread_id.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if exists.is_none() {
        return Ok(());
    }
    let stored = sqlx::query(
        "SELECT turn, part, id, run_id, created_at, epoch, seq, run_status FROM messages \
         WHERE user_id = $1 AND thread_id = $2 AND (turn <= $3 OR part = 0)",
    )
    .bind(run.user_id.as_str())
    .bind(run.thread_id.as_str())
    .bind(run.turn)
    .fetch_all(&mut *connection)
    .await?;
    let id_of = |message: &RawValue| {
        serde_json::from_str::<Value>(message.get())
            .ok()
            .and_then(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default()
    };
    let named: HashSet<String> = run.messages.iter().map(|m| id_of(m)).collect();
    let mut rows = Vec::with_capacity(stored.len());
    for row in &stored {
        let (turn, part, id): (i64, i64, String) =
            (row.try_get("turn")?, row.try_get("part")?, row.try_get("id")?);
        rows.push((turn, part, id, row));
    }
    // The snapshot is the thread from the first stored message it names on: older messages
    // were not sent to the agent (`agent.history_messages`) and stay as they are. A snapshot
    // with nothing in common with the thread is this run's answer, after its message.
    let start = rows
        .iter()
        .filter(|(turn, _, id, _)| *turn <= run.turn && named.contains(id))
        .map(|(turn, part, _, _)| (*turn, *part))
        .min()
        .unwrap_or((run.turn, 1));
    replace_window(connection, run, start, &rows, id_of).await
}

/// [`replace_conversation`] from `start` on: the stored rows from there to the run's turn are
/// the window the snapshot replaces.
async fn replace_window(
    connection: &mut AnyConnection,
    run: &RunMessages,
    start: (i64, i64),
    rows: &[(i64, i64, String, &sqlx::any::AnyRow)],
    id_of: impl Fn(&RawValue) -> String,
) -> Result<(), sqlx::Error> {
    /// Where a stored message came from, kept when the snapshot has it again.
    struct Origin {
        run_id: Option<String>,
        created_at: i64,
        epoch: Option<String>,
        seq: Option<i64>,
        run_status: Option<String>,
    }
    let mut anchors: HashMap<String, i64> = HashMap::new();
    let mut origins: HashMap<String, Origin> = HashMap::new();
    // The run of each turn (its user message's), for messages the snapshot adds to that turn.
    let mut turn_runs: HashMap<i64, Option<String>> = HashMap::new();
    let mut later: HashSet<&str> = HashSet::new();
    let mut floor = 0;
    for (turn, part, id, row) in rows {
        if *turn > run.turn {
            // A message queued behind the run: its own turn's, never laid out here.
            later.insert(id.as_str());
            continue;
        }
        if *part == 0 {
            turn_runs.insert(*turn, row.try_get("run_id")?);
        }
        if (*turn, *part) < start {
            floor = floor.min(if *turn == start.0 { *part } else { 0 });
            continue;
        }
        if *part == 0 {
            anchors.insert(id.clone(), *turn);
        } else {
            let origin = Origin {
                run_id: row.try_get("run_id")?,
                created_at: row.try_get("created_at")?,
                epoch: row.try_get("epoch")?,
                seq: row.try_get("seq")?,
                run_status: row.try_get("run_status")?,
            };
            origins.insert(id.clone(), origin);
        }
    }
    // The layout: each message's (turn, part). User messages stored already keep theirs; the
    // others follow the user message before them in the snapshot (before the first one: ahead of
    // it, below any part its turn keeps).
    let first_turn = run.messages.iter().find_map(|m| anchors.get(&id_of(m)).copied());
    let ahead = run.messages.iter().take_while(|m| !anchors.contains_key(&id_of(m))).count();
    let (mut turn, mut part) = match first_turn {
        Some(first) => (first, floor - to_i64(ahead as u64) - 1),
        None => (start.0, start.1.max(1) - 1),
    };
    let mut kept_anchors: HashSet<String> = HashSet::new();
    let mut laid: Vec<(i64, i64, String, &RawValue)> = Vec::new();
    let mut placed: HashSet<String> = HashSet::new();
    for message in &run.messages {
        let id = id_of(message);
        // Twice in the snapshot: its first place holds it. A queued message keeps its turn.
        if !placed.insert(id.clone()) || later.contains(id.as_str()) {
            continue;
        }
        if let Some(&anchor) = anchors.get(&id) {
            kept_anchors.insert(id);
            (turn, part) = (anchor, 0);
            continue;
        }
        part += 1;
        if part == 0 {
            part = 1;
        }
        laid.push((turn, part, id, &**message));
    }
    let gone: Vec<&String> = anchors.keys().filter(|id| !kept_anchors.contains(*id)).collect();
    for id in gone {
        sqlx::query("DELETE FROM messages WHERE user_id = $1 AND thread_id = $2 AND part = 0 AND id = $3 AND turn <= $4")
            .bind(run.user_id.as_str())
            .bind(run.thread_id.as_str())
            .bind(id.as_str())
            .bind(run.turn)
            .execute(&mut *connection)
            .await?;
    }
    // The window's other rows go; they are laid out again from the snapshot.
    sqlx::query(
        "DELETE FROM messages WHERE user_id = $1 AND thread_id = $2 AND turn <= $3 AND part <> 0 \
         AND (turn > $4 OR (turn = $5 AND part >= $6))",
    )
    .bind(run.user_id.as_str())
    .bind(run.thread_id.as_str())
    .bind(run.turn)
    .bind(start.0)
    .bind(start.0)
    .bind(start.1)
    .execute(&mut *connection)
    .await?;
    let places = group::Places::of(connection);
    for chunk in laid.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO messages (user_id, thread_id, turn, part, id, body, run_id, created_at, epoch, seq, \
             run_status, bytes) VALUES {}",
            places.tuples(chunk.len(), 12)
        );
        let mut query = sqlx::query(&sql);
        for (turn, part, id, message) in chunk {
            let origin = origins.remove(id);
            // A message new to the thread belongs to its turn's run (this run's, for its own).
            let turn_run = match turn_runs.get(turn) {
                Some(Some(run_id)) if *turn != run.turn => run_id.clone(),
                _ => run.run_id.clone(),
            };
            query = query
                .bind(run.user_id.as_str())
                .bind(run.thread_id.as_str())
                .bind(*turn)
                .bind(*part)
                .bind(id.as_str())
                .bind(message.get())
                .bind(origin.as_ref().map_or(Some(turn_run), |o| o.run_id.clone()))
                .bind(origin.as_ref().map_or(to_i64(run.created_at), |o| o.created_at))
                .bind(origin.as_ref().and_then(|o| o.epoch.clone()))
                .bind(origin.as_ref().and_then(|o| o.seq))
                .bind(origin.as_ref().map_or(Some(run.status.to_owned()), |o| o.run_status.clone()))
                .bind(to_i64(message.get().len() as u64));
        }
        query.execute(&mut *connection).await?;
    }
    // The thread's counts follow from its rows; its other columns as for any run's end.
    let interrupts = interrupts_after_run("$4", "$5", "interrupts");
    sqlx::query(&format!(
        "UPDATE threads SET updated_at = $1, state = COALESCE($2, state), \
         running = CASE WHEN running = $3 THEN NULL ELSE running END, interrupts = {interrupts}, \
         message_count = (SELECT COUNT(*) FROM messages m WHERE m.user_id = $6 AND m.thread_id = $7), \
         bytes = (SELECT COALESCE(SUM(bytes), 0) FROM messages m WHERE m.user_id = $6 AND m.thread_id = $7) \
         WHERE user_id = $6 AND thread_id = $7"
    ))
    .bind(to_i64(run.created_at))
    .bind(run.state.as_ref().map(|s| s.get().to_owned()))
    .bind(run.run_id.as_str())
    .bind(run.status)
    .bind(run.interrupts.as_ref().map(|i| i.get().to_owned()))
    .bind(run.user_id.as_str())
    .bind(run.thread_id.as_str())
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Stores a publisher's answer; the title of the thread it made, if it made one.
async fn add_answer(
    connection: &mut AnyConnection,
    answer: &PublishedAnswer,
) -> Result<Option<String>, sqlx::Error> {
    let PublishedAnswer { user_id, thread_id, run_id, content, status, created_at } = answer;
    let now = to_i64(*created_at);
    // Named after its run, so a publish sent again stores it once.
    let id = format!("{run_id}-answer");
    let known = sqlx::query("SELECT 1 AS one FROM messages WHERE user_id = $1 AND id = $2")
        .bind(user_id.as_str())
        .bind(id.as_str())
        .fetch_optional(&mut *connection)
        .await?;
    if known.is_some() {
        return Ok(None);
    }
    let body = serde_json::json!({"id": id, "role": "assistant", "content": content}).to_string();
    let bytes = to_i64(body.len() as u64);
    // The turn of the user message this run answers, when that is stored.
    let asked = sqlx::query(
        "SELECT turn FROM messages WHERE user_id = $1 AND thread_id = $2 AND run_id = $3 AND part = 0",
    )
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .bind(run_id.as_str())
    .fetch_optional(&mut *connection)
    .await?
    .map(|row| row.try_get::<i64, _>("turn"))
    .transpose()?;
    let (turn, made) = match asked {
        Some(turn) => {
            let updated = sqlx::query(
                "UPDATE threads SET updated_at = $1, message_count = message_count + 1, bytes = bytes + $2, \
                 running = CASE WHEN running = $3 THEN NULL ELSE running END \
                 WHERE user_id = $4 AND thread_id = $5",
            )
            .bind(now)
            .bind(bytes)
            .bind(run_id.as_str())
            .bind(user_id.as_str())
            .bind(thread_id.as_str())
            .execute(&mut *connection)
            .await?
            .rows_affected();
            if updated == 0 {
                return Ok(None);
            }
            (turn, None)
        }
        None => {
            let title = super::title_of(content);
            let turn = take_turn(connection, user_id, thread_id, &title, now, bytes).await?;
            (turn, (turn == 1).then_some(title))
        }
    };
    let part: i64 = sqlx::query(
        "SELECT CAST(COALESCE(MAX(part), 0) + 1 AS BIGINT) AS next FROM messages \
         WHERE user_id = $1 AND thread_id = $2 AND turn = $3",
    )
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .bind(turn)
    .fetch_one(&mut *connection)
    .await?
    .try_get("next")?;
    sqlx::query(
        "INSERT INTO messages (user_id, thread_id, turn, part, id, body, run_id, created_at, run_status, bytes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(user_id.as_str())
    .bind(thread_id.as_str())
    .bind(turn)
    .bind(part.max(1))
    .bind(id)
    .bind(body)
    .bind(run_id.as_str())
    .bind(now)
    .bind(*status)
    .bind(bytes)
    .execute(&mut *connection)
    .await?;
    Ok(made)
}

async fn rename(
    connection: &mut AnyConnection,
    user_id: &str,
    thread_id: &str,
    title: &str,
    now: u64,
) -> Result<Option<ThreadView>, sqlx::Error> {
    let renamed =
        sqlx::query("UPDATE threads SET title = $1, updated_at = $2 WHERE user_id = $3 AND thread_id = $4")
            .bind(title)
            .bind(to_i64(now))
            .bind(user_id)
            .bind(thread_id)
            .execute(&mut *connection)
            .await?
            .rows_affected();
    if renamed == 0 {
        return Ok(None);
    }
    thread(connection, user_id, thread_id, true).await
}

async fn delete(
    connection: &mut AnyConnection,
    user_id: &str,
    thread_id: &str,
) -> Result<Option<Option<String>>, sqlx::Error> {
    let Some(row) = sqlx::query("SELECT running FROM threads WHERE user_id = $1 AND thread_id = $2")
        .bind(user_id)
        .bind(thread_id)
        .fetch_optional(&mut *connection)
        .await?
    else {
        return Ok(None);
    };
    let running: Option<String> = row.try_get("running")?;
    sqlx::query("DELETE FROM messages WHERE user_id = $1 AND thread_id = $2")
        .bind(user_id)
        .bind(thread_id)
        .execute(&mut *connection)
        .await?;
    sqlx::query("DELETE FROM threads WHERE user_id = $1 AND thread_id = $2")
        .bind(user_id)
        .bind(thread_id)
        .execute(&mut *connection)
        .await?;
    Ok(Some(running))
}

async fn expire(connection: &mut AnyConnection, cutoff: u64) -> Result<Vec<(String, String)>, sqlx::Error> {
    let old = sqlx::query("SELECT user_id, thread_id FROM threads WHERE updated_at < $1")
        .bind(to_i64(cutoff))
        .fetch_all(&mut *connection)
        .await?;
    let mut gone = Vec::with_capacity(old.len());
    for row in old {
        let (user_id, thread_id): (String, String) = (row.try_get("user_id")?, row.try_get("thread_id")?);
        delete(connection, &user_id, &thread_id).await?;
        gone.push((user_id, thread_id));
    }
    if !gone.is_empty() {
        info!("store: {} threads past store.retention_days deleted", gone.len());
    }
    Ok(gone)
}

async fn thread(
    connection: &mut AnyConnection,
    user_id: &str,
    thread_id: &str,
    with_state: bool,
) -> Result<Option<ThreadView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT thread_id, title, created_at, updated_at, message_count, running, state, interrupts FROM threads \
         WHERE user_id = $1 AND thread_id = $2",
    )
    .bind(user_id)
    .bind(thread_id)
    .fetch_optional(&mut *connection)
    .await?;
    row.map(|row| thread_view(&row, with_state)).transpose()
}

fn thread_view(row: &sqlx::any::AnyRow, with_state: bool) -> Result<ThreadView, sqlx::Error> {
    let state = if with_state {
        let text: Option<String> = row.try_get("state")?;
        // Null in the API when the thread has none; stored text that is not JSON reads as none.
        Some(text.and_then(|t| RawValue::from_string(t).ok()).unwrap_or_else(null))
    } else {
        None
    };
    let interrupts: Option<String> = row.try_get("interrupts")?;
    let interrupts = interrupts.and_then(|i| RawValue::from_string(i).ok());
    Ok(ThreadView {
        thread_id: row.try_get("thread_id")?,
        title: row.try_get("title")?,
        created_at: to_u64(row.try_get("created_at")?),
        updated_at: to_u64(row.try_get("updated_at")?),
        message_count: to_u64(row.try_get("message_count")?),
        running: row.try_get("running")?,
        interrupted: interrupts.is_some(),
        interrupts,
        state,
    })
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

/// A cursor is the sort key of the last item of a page: `<number>.<number>` for messages
/// (turn, part), `<updated_at>.<thread_id>` for threads.
fn split_cursor(cursor: &str) -> Option<(i64, &str)> {
    let (number, rest) = cursor.split_once('.')?;
    Some((number.parse().ok()?, rest))
}

async fn threads(
    pool: &AnyPool,
    user_id: &str,
    limit: usize,
    before: Option<&str>,
) -> Result<Page<ThreadView>, sqlx::Error> {
    let take = to_i64(limit as u64 + 1);
    let rows = match before.and_then(split_cursor) {
        Some((updated_at, thread_id)) => sqlx::query(
            "SELECT thread_id, title, created_at, updated_at, message_count, running, state, interrupts FROM threads \
                 WHERE user_id = $1 AND (updated_at < $2 OR (updated_at = $3 AND thread_id < $4)) \
                 ORDER BY updated_at DESC, thread_id DESC LIMIT $5",
        )
        .bind(user_id)
        .bind(updated_at)
        .bind(updated_at)
        .bind(thread_id)
        .bind(take)
        .fetch_all(pool)
        .await?,
        None => sqlx::query(
            "SELECT thread_id, title, created_at, updated_at, message_count, running, state, interrupts FROM threads \
                 WHERE user_id = $1 ORDER BY updated_at DESC, thread_id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(take)
        .fetch_all(pool)
        .await?,
    };
    let mut items = rows.iter().map(|row| thread_view(row, false)).collect::<Result<Vec<_>, _>>()?;
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map(|t| format!("{}.{}", t.updated_at, t.thread_id))
    });
    Ok(Page { items, next: next.flatten() })
}

async fn messages(
    pool: &AnyPool,
    user_id: &str,
    thread_id: &str,
    limit: usize,
    before: Option<&str>,
) -> Result<Option<Page<Box<RawValue>>>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    if thread(&mut connection, user_id, thread_id, false).await?.is_none() {
        return Ok(None);
    }
    let take = to_i64(limit as u64 + 1);
    let columns = "SELECT turn, part, body, run_id, created_at, epoch, seq, run_status FROM messages";
    let rows = match before
        .and_then(split_cursor)
        .and_then(|(turn, part)| Some((turn, part.parse::<i64>().ok()?)))
    {
        Some((turn, part)) => {
            sqlx::query(&format!(
            "{columns} WHERE user_id = $1 AND thread_id = $2 AND (turn < $3 OR (turn = $4 AND part < $5)) \
                 ORDER BY turn DESC, part DESC LIMIT $6"
        ))
            .bind(user_id)
            .bind(thread_id)
            .bind(turn)
            .bind(turn)
            .bind(part)
            .bind(take)
            .fetch_all(&mut *connection)
            .await?
        }
        None => {
            sqlx::query(&format!(
                "{columns} WHERE user_id = $1 AND thread_id = $2 ORDER BY turn DESC, part DESC LIMIT $3"
            ))
            .bind(user_id)
            .bind(thread_id)
            .bind(take)
            .fetch_all(&mut *connection)
            .await?
        }
    };
    let mut newest_first = Vec::with_capacity(rows.len());
    let mut keys = Vec::with_capacity(rows.len());
    for row in &rows {
        keys.push((row.try_get::<i64, _>("turn")?, row.try_get::<i64, _>("part")?));
        newest_first.push(message_json(row)?);
    }
    let next = (newest_first.len() > limit).then(|| {
        newest_first.truncate(limit);
        keys.get(limit - 1).map(|(turn, part)| format!("{turn}.{part}"))
    });
    newest_first.reverse();
    Ok(Some(Page { items: newest_first, next: next.flatten() }))
}

/// A stored message as the API shows it: the AG-UI message and agentwire's fields beside it.
fn message_json(row: &sqlx::any::AnyRow) -> Result<Box<RawValue>, sqlx::Error> {
    let body: String = row.try_get("body")?;
    let mut message = match serde_json::from_str::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let run_id: Option<String> = row.try_get("run_id")?;
    message.insert("run_id".into(), run_id.map_or(Value::Null, Value::String));
    message.insert("created_at".into(), Value::from(to_u64(row.try_get("created_at")?)));
    let epoch: Option<String> = row.try_get("epoch")?;
    message.insert("epoch".into(), epoch.map_or(Value::Null, Value::String));
    let seq: Option<i64> = row.try_get("seq")?;
    message.insert("seq".into(), seq.map_or(Value::Null, |s| Value::from(to_u64(s))));
    let status: Option<String> = row.try_get("run_status")?;
    if let Some(status) = status {
        message.insert("run_status".into(), Value::String(status));
    }
    serde_json::value::to_raw_value(&message).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Which of `ids` the thread's messages have (an AG-UI client's input names the messages it
/// sends by id: docs/ag-ui.md).
async fn known(
    pool: &AnyPool,
    user_id: &str,
    thread_id: &str,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(ROWS_PER_INSERT) {
        let list: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "SELECT id FROM messages WHERE user_id = $1 AND thread_id = $2 AND id IN ({})",
            list.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(user_id).bind(thread_id);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(pool).await? {
            found.insert(row.try_get::<String, _>("id")?);
        }
    }
    Ok(found)
}

async fn history(
    pool: &AnyPool,
    user_id: &str,
    thread_id: &str,
    up_to: i64,
    limit: usize,
) -> Result<Conversation, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT body FROM messages WHERE user_id = $1 AND thread_id = $2 AND turn <= $3 \
         ORDER BY turn DESC, part DESC LIMIT $4",
    )
    .bind(user_id)
    .bind(thread_id)
    .bind(up_to)
    .bind(to_i64(limit as u64))
    .fetch_all(pool)
    .await?;
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows.iter().rev() {
        let body: String = row.try_get("body")?;
        if let Ok(message) = RawValue::from_string(body) {
            messages.push(message);
        }
    }
    // A tool result whose call was cut off by the limit goes too: agents refuse such a history.
    let orphans = messages.iter().take_while(|m| is_tool_result(m)).count();
    messages.drain(..orphans);
    let state = sqlx::query("SELECT state FROM threads WHERE user_id = $1 AND thread_id = $2")
        .bind(user_id)
        .bind(thread_id)
        .fetch_optional(pool)
        .await?
        .and_then(|row| row.try_get::<Option<String>, _>("state").ok().flatten())
        .and_then(|state| RawValue::from_string(state).ok());
    Ok(Conversation { messages, state, whole: false })
}

fn is_tool_result(message: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<&'a str>,
    }
    serde_json::from_str::<Role<'_>>(message.get()).is_ok_and(|m| m.role == Some("tool"))
}
