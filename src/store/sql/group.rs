//! Writes of one batch grouped into a few statements: a chat under load sends the writer a user
//! message, its seq, its run's start, the run's messages and their seq for every message, and a
//! statement costs the same round trip (to PostgreSQL, or to sqlx's SQLite worker thread)
//! whether it carries one row or two hundred. So the batch's user messages are checked in one
//! SELECT, take their turns in one upsert and go in with one INSERT; the runs' messages, the
//! runs' starts and the seqs each go in one or two statements more (docs/conversations.md, "The
//! store's speed"). The answers are those of one write at a time in arrival order.
//!
//! Only these four kinds are grouped; the rest (renames, deletes, retention, publishers'
//! answers) are rare and written one by one between groups (`sql.rs`, `write_together`).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use super::{to_i64, to_u64, Job, Written, ROWS_PER_INSERT};
use crate::store::{Added, Confirmed, NewUserMessage, RunMessages, StoreSettings};

/// Whether a write is one of the kinds written as a group.
pub(super) fn groupable(job: &Job) -> bool {
    matches!(
        job,
        Job::AddUserMessage(..) | Job::Confirm { .. } | Job::RunStarted { .. } | Job::AddRunMessages(..)
    )
}

/// How a statement numbers its parameters. sqlx's SQLite driver finds a `$n` parameter by name,
/// comparing it with every parameter of the statement: quadratic in a statement of thousands, so
/// SQLite is given `?` (positional) and PostgreSQL `$n` (its only form).
#[derive(Clone, Copy)]
pub(super) struct Places {
    positional: bool,
}

impl Places {
    pub(super) fn of(connection: &AnyConnection) -> Places {
        Places { positional: connection.backend_name() == "SQLite" }
    }

    /// The `n`th parameter (from 1).
    fn one(self, n: usize) -> String {
        if self.positional {
            "?".to_owned()
        } else {
            format!("${n}")
        }
    }

    /// `($1, ...), (...)`: `rows` tuples of `columns` parameters, numbered from 1.
    pub(super) fn tuples(self, rows: usize, columns: usize) -> String {
        let mut sql = String::with_capacity(rows * columns * 5);
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for column in 0..columns {
                if column > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&self.one(row * columns + column + 1));
            }
            sql.push(')');
        }
        sql
    }

    /// `($1, $2, ...)`: `count` parameters for an `IN` list.
    fn list(self, count: usize) -> String {
        self.tuples(1, count)
    }
}

/// Writes `jobs` (all [`groupable`]); their answers, in order.
pub(super) async fn write(
    connection: &mut AnyConnection,
    jobs: &[Job],
    settings: &StoreSettings,
) -> Result<Vec<Written>, sqlx::Error> {
    let mut written: Vec<Option<Written>> = jobs.iter().map(|_| None).collect();
    let places = Places::of(connection);
    add_user_messages(connection, places, jobs, settings, &mut written).await?;
    // Starts before ends: a run's end clears `running` only when it names that run, so a run
    // started and ended within one batch leaves the thread as the one-by-one writes would.
    runs_started(connection, places, jobs).await?;
    add_runs(connection, places, jobs).await?;
    confirm(connection, places, jobs).await?;
    Ok(written.into_iter().map(|w| w.unwrap_or(Written::Done)).collect())
}

/// A user message the batch stores: where its answer goes, its row, and its turn once known.
struct Accepted<'j> {
    index: usize,
    message: &'j NewUserMessage,
    body: String,
    bytes: i64,
    turn: i64,
}

async fn add_user_messages(
    connection: &mut AnyConnection,
    places: Places,
    jobs: &[Job],
    settings: &StoreSettings,
    written: &mut [Option<Written>],
) -> Result<(), sqlx::Error> {
    let messages: Vec<(usize, &NewUserMessage)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, job)| match job {
            Job::AddUserMessage(message, _) => Some((i, message)),
            _ => None,
        })
        .collect();
    if messages.is_empty() {
        return Ok(());
    }
    // Which `client_msg_id`s are stored already (each with its ids), and what each user keeps
    // (`store.max_bytes_per_user`), in one SELECT. A batch holds at most 256 writes, so its
    // keys fit one statement.
    let keyed: Vec<(&str, &str)> = messages
        .iter()
        .filter_map(|(_, m)| Some((m.user_id.as_str(), m.client_msg_id.as_deref()?)))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let users: Vec<&str> =
        messages.iter().map(|(_, m)| m.user_id.as_str()).collect::<HashSet<_>>().into_iter().collect();
    let wheres: Vec<String> = (0..keyed.len())
        .map(|i| {
            format!("(user_id = {} AND client_msg_id = {})", places.one(2 * i + 1), places.one(2 * i + 2))
        })
        .collect();
    let in_users: Vec<String> = (0..users.len()).map(|i| places.one(2 * keyed.len() + i + 1)).collect();
    let in_users_again: Vec<String> =
        (0..users.len()).map(|i| places.one(2 * keyed.len() + users.len() + i + 1)).collect();
    let sql = format!(
        "SELECT 'seen' AS what, user_id, client_msg_id, id, run_id, turn, seq, CAST(0 AS BIGINT) AS used \
         FROM messages WHERE {} \
         UNION ALL SELECT 'used', user_id, NULL, NULL, NULL, NULL, NULL, CAST(COALESCE(SUM(bytes), 0) AS BIGINT) \
         FROM threads WHERE user_id IN ({}) GROUP BY user_id \
         UNION ALL SELECT 'interrupted', user_id, thread_id, interrupts, running, NULL, NULL, CAST(0 AS BIGINT) \
         FROM threads WHERE user_id IN ({}) AND interrupts IS NOT NULL",
        if wheres.is_empty() { "1 = 0".to_owned() } else { wheres.join(" OR ") },
        in_users.join(", "),
        in_users_again.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (user_id, client_msg_id) in &keyed {
        query = query.bind(*user_id).bind(*client_msg_id);
    }
    // The users twice: positional parameters (SQLite's) are not reused.
    for user_id in users.iter().chain(&users) {
        query = query.bind(*user_id);
    }
    let mut seen: HashMap<(String, String), Added> = HashMap::new();
    let mut used: HashMap<String, i64> = HashMap::new();
    // The users' threads that wait for an interrupt's answer (`thread_id` in the third column,
    // its interrupts in the fourth, its run going in the fifth).
    let mut interrupted: HashMap<(String, String), (String, bool)> = HashMap::new();
    for row in query.fetch_all(&mut *connection).await? {
        let user_id: String = row.try_get("user_id")?;
        match row.try_get::<String, _>("what")?.as_str() {
            "used" => {
                used.insert(user_id, row.try_get::<Option<i64>, _>("used")?.unwrap_or_default());
                continue;
            }
            "interrupted" => {
                let thread_id: Option<String> = row.try_get("client_msg_id")?;
                let asked: Option<String> = row.try_get("id")?;
                let running = row.try_get::<Option<String>, _>("run_id")?.is_some();
                interrupted
                    .insert((user_id, thread_id.unwrap_or_default()), (asked.unwrap_or_default(), running));
                continue;
            }
            _ => {}
        }
        let repeat = Added::Repeat {
            message_id: row.try_get::<Option<String>, _>("id")?.unwrap_or_default(),
            run_id: row.try_get::<Option<String>, _>("run_id")?.unwrap_or_default(),
            turn: row.try_get::<Option<i64>, _>("turn")?.unwrap_or_default(),
            seq: row.try_get::<Option<i64>, _>("seq")?.map(to_u64),
        };
        let client_msg_id: Option<String> = row.try_get("client_msg_id")?;
        seen.insert((user_id, client_msg_id.unwrap_or_default()), repeat);
    }
    // Each message in arrival order: a repeat, over the quota, or stored. A `client_msg_id`
    // twice in one batch is the first one's repeat.
    let max = to_i64(settings.max_bytes_per_user as u64);
    // What runs ending earlier in the group add to their users counts for the messages after.
    let mut ended_runs = jobs.iter().enumerate().filter_map(|(i, job)| match job {
        Job::AddRunMessages(run, _) => Some((
            i,
            run.user_id.as_str(),
            run.messages.iter().map(|m| to_i64(m.get().len() as u64)).sum::<i64>(),
        )),
        _ => None,
    });
    let mut next_run = ended_runs.next();
    let mut accepted: Vec<Accepted<'_>> = Vec::new();
    let mut repeats_in_batch: Vec<(usize, usize)> = Vec::new();
    let mut first_with: HashMap<(&str, &str), usize> = HashMap::new();
    for (index, message) in messages {
        while let Some((_, user_id, bytes)) = next_run.filter(|(at, ..)| *at < index) {
            *used.entry(user_id.to_owned()).or_insert(0) += bytes;
            next_run = ended_runs.next();
        }
        if let Some(client_msg_id) = message.client_msg_id.as_deref() {
            if let Some(repeat) = seen.get(&(message.user_id.clone(), client_msg_id.to_owned())) {
                written[index] = Some(Written::Added(repeat.clone()));
                continue;
            }
            if let Some(&first) = first_with.get(&(message.user_id.as_str(), client_msg_id)) {
                repeats_in_batch.push((index, first));
                continue;
            }
        }
        let waiting = interrupted.get(&(message.user_id.clone(), message.thread_id.clone()));
        if let Some(refused) =
            message.refusal(waiting.map(|(asked, _)| asked.as_str()), waiting.is_some_and(|w| w.1))
        {
            written[index] = Some(Written::Added(refused));
            continue;
        }
        let body = message.body();
        let bytes = to_i64(body.len() as u64);
        let kept = used.entry(message.user_id.clone()).or_insert(0);
        if kept.saturating_add(bytes) > max {
            written[index] = Some(Written::Added(Added::QuotaExceeded));
            continue;
        }
        *kept += bytes;
        if let Some(client_msg_id) = message.client_msg_id.as_deref() {
            first_with.insert((message.user_id.as_str(), client_msg_id), accepted.len());
        }
        accepted.push(Accepted { index, message, body, bytes, turn: 0 });
    }
    if accepted.is_empty() {
        return Ok(());
    }
    // The threads made, or their next turns taken, in one upsert: a thread's messages of the
    // batch take consecutive turns, in arrival order; a thread whose turns are just the batch's
    // is new.
    let mut threads: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, a) in accepted.iter().enumerate() {
        threads.entry((a.message.user_id.as_str(), a.message.thread_id.as_str())).or_default().push(i);
    }
    let mut made: HashSet<(String, String)> = HashSet::new();
    let keys: Vec<(&(&str, &str), &Vec<usize>)> = threads.iter().collect();
    for chunk in keys.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO threads (user_id, thread_id, title, created_at, updated_at, turns, message_count, bytes) \
             VALUES {} ON CONFLICT (user_id, thread_id) DO UPDATE SET turns = threads.turns + excluded.turns, \
             updated_at = excluded.updated_at, message_count = threads.message_count + excluded.message_count, \
             bytes = threads.bytes + excluded.bytes RETURNING user_id, thread_id, turns",
            places.tuples(chunk.len(), 8)
        );
        let mut query = sqlx::query(&sql);
        for ((user_id, thread_id), members) in chunk {
            let first = &accepted[members[0]];
            let now = members.iter().map(|&i| to_i64(accepted[i].message.created_at)).max().unwrap_or(0);
            let count = to_i64(members.len() as u64);
            let bytes: i64 = members.iter().map(|&i| accepted[i].bytes).sum();
            query = query
                .bind(*user_id)
                .bind(*thread_id)
                .bind(crate::store::title_of(&first.message.content))
                .bind(to_i64(first.message.created_at))
                .bind(now)
                .bind(count)
                .bind(count)
                .bind(bytes);
        }
        for row in query.fetch_all(&mut *connection).await? {
            let (user_id, thread_id): (String, String) = (row.try_get("user_id")?, row.try_get("thread_id")?);
            let turns: i64 = row.try_get("turns")?;
            let Some(members) = threads.get(&(user_id.as_str(), thread_id.as_str())) else { continue };
            let count = to_i64(members.len() as u64);
            for (n, &i) in members.iter().enumerate() {
                accepted[i].turn = turns - count + 1 + to_i64(n as u64);
            }
            if turns == count {
                made.insert((user_id, thread_id));
            }
        }
    }
    // The messages, in one INSERT.
    for chunk in accepted.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO messages (user_id, thread_id, turn, part, id, body, client_msg_id, run_id, created_at, bytes) \
             VALUES {}",
            places.tuples(chunk.len(), 10)
        );
        let mut query = sqlx::query(&sql);
        for a in chunk {
            let m = a.message;
            query = query
                .bind(m.user_id.as_str())
                .bind(m.thread_id.as_str())
                .bind(a.turn)
                .bind(0i64)
                .bind(m.message_id.as_str())
                .bind(a.body.as_str())
                .bind(m.client_msg_id.as_deref())
                .bind(m.run_id.as_str())
                .bind(to_i64(m.created_at))
                .bind(a.bytes);
        }
        query.execute(&mut *connection).await?;
    }
    let evicted = evict(connection, places, &accepted, &made, settings).await?;
    // The answers: a new thread's title goes with its first message, a user's evicted threads
    // with the first message that made one.
    let mut titled: HashSet<(&str, &str)> = HashSet::new();
    let mut told: HashSet<&str> = HashSet::new();
    for a in &accepted {
        let key = (a.message.user_id.as_str(), a.message.thread_id.as_str());
        let new_thread = (made.contains(&(key.0.to_owned(), key.1.to_owned())) && titled.insert(key))
            .then(|| crate::store::title_of(&a.message.content));
        let evicted = match (&new_thread, evicted.get(key.0)) {
            (Some(_), Some(gone)) if told.insert(key.0) => gone.clone(),
            _ => Vec::new(),
        };
        written[a.index] = Some(Written::Added(Added::Stored { turn: a.turn, new_thread, evicted }));
    }
    for (index, first) in repeats_in_batch {
        let a = &accepted[first];
        written[index] = Some(Written::Added(Added::Repeat {
            message_id: a.message.message_id.clone(),
            run_id: a.message.run_id.clone(),
            turn: a.turn,
            seq: None,
        }));
    }
    Ok(())
}

/// `store.max_threads_per_user`: the users who made threads are counted in one SELECT; those
/// past it lose their least recently updated threads (not one this batch wrote to: a user who
/// makes more new threads in one batch than the cap, at most 256, keeps them until the next).
async fn evict(
    connection: &mut AnyConnection,
    places: Places,
    accepted: &[Accepted<'_>],
    made: &HashSet<(String, String)>,
    settings: &StoreSettings,
) -> Result<HashMap<String, Vec<String>>, sqlx::Error> {
    let mut evicted: HashMap<String, Vec<String>> = HashMap::new();
    let makers: Vec<&str> =
        made.iter().map(|(user_id, _)| user_id.as_str()).collect::<HashSet<_>>().into_iter().collect();
    if makers.is_empty() {
        return Ok(evicted);
    }
    let mut over: Vec<(String, i64)> = Vec::new();
    for chunk in makers.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "SELECT user_id, COUNT(*) AS n FROM threads WHERE user_id IN {} GROUP BY user_id",
            places.list(chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for user_id in chunk {
            query = query.bind(*user_id);
        }
        for row in query.fetch_all(&mut *connection).await? {
            let count: i64 = row.try_get("n")?;
            let beyond = count - to_i64(settings.max_threads_per_user as u64);
            if beyond > 0 {
                over.push((row.try_get("user_id")?, beyond));
            }
        }
    }
    for (user_id, beyond) in over {
        let written: HashSet<&str> = accepted
            .iter()
            .filter(|a| a.message.user_id == user_id)
            .map(|a| a.message.thread_id.as_str())
            .collect();
        let oldest = sqlx::query(
            "SELECT thread_id FROM threads WHERE user_id = $1 ORDER BY updated_at, thread_id LIMIT $2",
        )
        .bind(user_id.as_str())
        .bind(beyond + to_i64(written.len() as u64))
        .fetch_all(&mut *connection)
        .await?;
        let mut gone = Vec::new();
        for row in oldest {
            let thread_id: String = row.try_get("thread_id")?;
            if written.contains(thread_id.as_str()) || to_i64(gone.len() as u64) >= beyond {
                continue;
            }
            super::delete(connection, &user_id, &thread_id).await?;
            gone.push(thread_id);
        }
        evicted.insert(user_id, gone);
    }
    Ok(evicted)
}

/// The runs' messages: their threads updated in one statement (which also says which threads
/// still exist: a thread deleted while its run went on stays deleted), the messages in one INSERT.
async fn add_runs(connection: &mut AnyConnection, places: Places, jobs: &[Job]) -> Result<(), sqlx::Error> {
    let mut runs: Vec<&RunMessages> = jobs
        .iter()
        .filter_map(|job| match job {
            Job::AddRunMessages(run, _) => Some(run),
            _ => None,
        })
        .collect();
    if runs.is_empty() {
        return Ok(());
    }
    runs.sort_by(|a, b| (&a.user_id, &a.thread_id).cmp(&(&b.user_id, &b.thread_id)));
    // Two runs of one thread in a batch (their ends are written one after the other, so this
    // is rare) are written one by one: one UPDATE cannot add both to the thread. So is a run
    // that gave the thread's whole conversation (`MESSAGES_SNAPSHOT`), which rewrites it.
    let whole = runs.iter().any(|run| run.whole);
    if whole || runs.windows(2).any(|w| (&w[0].user_id, &w[0].thread_id) == (&w[1].user_id, &w[1].thread_id))
    {
        for run in runs {
            super::add_run_messages(connection, run).await?;
        }
        return Ok(());
    }
    let mut live: HashSet<(String, String)> = HashSet::new();
    for chunk in runs.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "UPDATE threads SET updated_at = v.column3, message_count = threads.message_count + v.column4, \
             bytes = threads.bytes + v.column5, state = COALESCE(v.column6, threads.state), \
             running = CASE WHEN threads.running = v.column7 THEN NULL ELSE threads.running END, \
             interrupts = {} \
             FROM (VALUES {}) AS v \
             WHERE threads.user_id = v.column1 AND threads.thread_id = v.column2 \
             RETURNING threads.user_id, threads.thread_id",
            super::interrupts_after_run("v.column8", "v.column9", "threads.interrupts"),
            places.tuples(chunk.len(), 9)
        );
        let mut query = sqlx::query(&sql);
        for run in chunk {
            let bytes: usize = run.messages.iter().map(|m| m.get().len()).sum();
            query = query
                .bind(run.user_id.as_str())
                .bind(run.thread_id.as_str())
                .bind(to_i64(run.created_at))
                .bind(to_i64(run.messages.len() as u64))
                .bind(to_i64(bytes as u64))
                .bind(run.state.as_ref().map(|s| s.get().to_owned()))
                .bind(run.run_id.as_str())
                .bind(run.status)
                .bind(run.interrupts.as_ref().map(|i| i.get().to_owned()));
        }
        for row in query.fetch_all(&mut *connection).await? {
            live.insert((row.try_get("user_id")?, row.try_get("thread_id")?));
        }
    }
    let rows: Vec<(&RunMessages, usize, &RawValue)> = runs
        .iter()
        .filter(|run| live.contains(&(run.user_id.clone(), run.thread_id.clone())))
        .flat_map(|run| run.messages.iter().enumerate().map(move |(part, m)| (*run, part, &**m)))
        .collect();
    insert_run_rows(connection, places, &rows).await
}

/// Rows of runs' messages, `(run, part - 1, message)`, in multi-row INSERTs; one stored already
/// (a write sent again) is left as it is.
pub(super) async fn insert_run_rows(
    connection: &mut AnyConnection,
    places: Places,
    rows: &[(&RunMessages, usize, &RawValue)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO messages (user_id, thread_id, turn, part, id, body, run_id, created_at, run_status, bytes) \
             VALUES {} ON CONFLICT DO NOTHING",
            places.tuples(chunk.len(), 10)
        );
        let mut query = sqlx::query(&sql);
        for &(run, part, message) in chunk {
            let id = serde_json::from_str::<Value>(message.get())
                .ok()
                .and_then(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| format!("{}-{part}", run.run_id));
            query = query
                .bind(run.user_id.as_str())
                .bind(run.thread_id.as_str())
                .bind(run.turn)
                .bind(to_i64(part as u64 + 1))
                .bind(id)
                .bind(message.get())
                .bind(run.run_id.as_str())
                .bind(to_i64(run.created_at))
                .bind(run.status)
                .bind(to_i64(message.get().len() as u64));
        }
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

/// The runs started (`running` in the threads API), in one UPDATE: the last one per thread.
async fn runs_started(
    connection: &mut AnyConnection,
    places: Places,
    jobs: &[Job],
) -> Result<(), sqlx::Error> {
    let mut latest: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for job in jobs {
        if let Job::RunStarted { user_id, thread_id, run_id, .. } = job {
            latest.insert((user_id, thread_id), run_id);
        }
    }
    let started: Vec<_> = latest.into_iter().collect();
    for chunk in started.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "UPDATE threads SET running = v.column3 FROM (VALUES {}) AS v \
             WHERE threads.user_id = v.column1 AND threads.thread_id = v.column2",
            places.tuples(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for ((user_id, thread_id), run_id) in chunk {
            query = query.bind(*user_id).bind(*thread_id).bind(*run_id);
        }
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

/// The stream events that completed messages (`epoch`, `seq`): user messages by id in one
/// UPDATE, runs' messages by run in another.
async fn confirm(connection: &mut AnyConnection, places: Places, jobs: &[Job]) -> Result<(), sqlx::Error> {
    // (user, run, epoch, seq, message): a run's messages by their run; a user message by the
    // run it starts and its id (an id may be a client's own, the same in two threads).
    let mut by_id: Vec<(&str, &str, &str, i64, Option<&str>)> = Vec::new();
    let mut by_run: Vec<(&str, &str, &str, i64, Option<&str>)> = Vec::new();
    for job in jobs {
        if let Job::Confirm { user_id, what, epoch, seq, .. } = job {
            match what {
                Confirmed::Messages(ids) => by_id.extend(ids.iter().map(|(id, run_id)| {
                    (user_id.as_str(), run_id.as_str(), epoch.as_str(), to_i64(*seq), Some(id.as_str()))
                })),
                Confirmed::Run(run_id) => by_run.push((user_id, run_id, epoch, to_i64(*seq), None)),
            }
        }
    }
    let statements = [
        (by_id, 5, "messages.run_id = v.column2 AND messages.id = v.column5 AND messages.part = 0"),
        (by_run, 4, "messages.run_id = v.column2 AND messages.part <> 0"),
    ];
    for (rows, columns, which) in statements {
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "UPDATE messages SET epoch = v.column3, seq = v.column4 FROM (VALUES {}) AS v \
                 WHERE messages.user_id = v.column1 AND {which}",
                places.tuples(chunk.len(), columns)
            );
            let mut query = sqlx::query(&sql);
            for (user_id, run_id, epoch, seq, id) in chunk {
                query = query.bind(*user_id).bind(*run_id).bind(*epoch).bind(*seq);
                if let Some(id) = id {
                    query = query.bind(*id);
                }
            }
            query.execute(&mut *connection).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_across_rows() {
        let numbered = Places { positional: false };
        assert_eq!(numbered.tuples(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(numbered.list(2), "($1, $2)");
        assert_eq!(Places { positional: true }.tuples(2, 2), "(?, ?), (?, ?)");
    }
}
