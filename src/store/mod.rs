//! The store: conversations that last (docs/conversations.md). Threads and one row per message,
//! in the AG-UI message shape, kept for months, not for the stream's TTL.
//!
//! It sits beside the broker under the registry, with the same rule: the registry never waits.
//! Every call goes to the store's own thread (its own runtime and connection pool, `sql.rs`) and
//! is answered through a future the registry acts on in the user's call order; HTTP routes await
//! the same futures. Writes waiting together are committed in one transaction, each in a
//! savepoint of its own, and answered only once committed: an answer to a write means it is on
//! disk (durability order, docs/conversations.md).
//!
//! `kind = "sqlite"` (one file, the default), `"postgres"` (several nodes on one database) and
//! `"memory"` (SQLite in memory: lost at exit) share one implementation through sqlx's `Any`
//! driver and one portable schema (`migrations/`).

mod sql;
pub mod transcript;

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

pub use transcript::Transcript;

/// A store's answer, possibly later; `Send`, so HTTP handlers on any worker can await it.
pub type StoreCall<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// A call the store could not carry out; nothing of it took effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (or the store is too far behind): try again later.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement: a bug or a schema this version does not know.
    #[error("the store failed: {0}")]
    Failed(String),
}

impl StoreError {
    /// How a message or a run failed by it is counted.
    pub fn failure(&self) -> crate::metrics::Failure {
        match self {
            StoreError::Unavailable(_) => crate::metrics::Failure::StoreUnavailable,
            StoreError::Failed(_) => crate::metrics::Failure::StoreFailed,
        }
    }
}

/// Where the store keeps conversations (`[store]`).
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// An sqlx URL: `sqlite://PATH?mode=rwc`, `sqlite::memory:` or `postgres://...`.
    pub url: String,
    /// `store.max_threads_per_user`: beyond, the least recently updated thread is deleted.
    pub max_threads_per_user: usize,
    /// `store.max_bytes_per_user`: beyond, a user message is refused (`quota_exceeded`).
    pub max_bytes_per_user: usize,
    /// `store.retention_days`: threads untouched this long are deleted (0: never).
    pub retention_days: u64,
}

/// A user message to store before it is acked.
#[derive(Clone, Debug)]
pub struct NewUserMessage {
    pub user_id: String,
    pub thread_id: String,
    pub message_id: String,
    pub run_id: String,
    pub client_msg_id: Option<String>,
    pub content: String,
    /// A frontend tool's result (`tool_result`): stored as a `tool` message of this call.
    pub tool_call_id: Option<String>,
    /// A plain message, not stored while the thread's last run stopped to ask and no run of
    /// it is going (docs/agents.md, v2): [`Added::Interrupted`]. False for an answer, or with
    /// `agent.on_busy = "interrupt"`.
    pub refused_when_interrupted: bool,
    /// The interrupt a `resume_run` answers: stored only when the thread has it
    /// ([`Added::NoSuchInterrupt`]).
    pub answers_interrupt: Option<String>,
    pub created_at: u64,
}

impl NewUserMessage {
    /// Whether the thread's state refuses the message: `interrupts` is the thread's (JSON, as
    /// stored), `running` whether a run of it is going.
    pub fn refusal(&self, interrupts: Option<&str>, running: bool) -> Option<Added> {
        match (&self.answers_interrupt, interrupts) {
            (Some(id), Some(interrupts)) => {
                let asked: Vec<serde_json::Value> = serde_json::from_str(interrupts).unwrap_or_default();
                (!asked.iter().any(|i| i["id"] == id.as_str())).then_some(Added::NoSuchInterrupt)
            }
            (Some(_), None) => Some(Added::NoSuchInterrupt),
            (None, Some(_)) if self.refused_when_interrupted && !running => Some(Added::Interrupted),
            (None, _) => None,
        }
    }

    /// The AG-UI message stored: the user's words, or a frontend tool's result.
    pub fn body(&self) -> String {
        match &self.tool_call_id {
            None => serde_json::json!({"id": self.message_id, "role": "user", "content": self.content}),
            Some(call) => serde_json::json!({"id": self.message_id, "role": "tool", "toolCallId": call,
                "content": self.content}),
        }
        .to_string()
    }
}

/// The answer to [`Store::add_user_message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Added {
    /// Stored as the thread's `turn`. `new_thread` is the title of a thread this message made;
    /// `evicted` are the user's threads deleted to stay within `store.max_threads_per_user`.
    Stored { turn: i64, new_thread: Option<String>, evicted: Vec<String> },
    /// Its `client_msg_id` is stored already, with these ids; `seq` is `None` while its echo has
    /// not been confirmed on the stream (the earlier attempt may have failed after storing).
    Repeat { message_id: String, run_id: String, turn: i64, seq: Option<u64> },
    /// Storing it would take the user past `store.max_bytes_per_user`: nothing was stored.
    QuotaExceeded,
    /// The thread waits for the answer to its interrupts: nothing was stored.
    Interrupted,
    /// The thread has no interrupt of that id to answer: nothing was stored.
    NoSuchInterrupt,
}

/// Which stored messages a stream event completed (`seq`, `epoch` in the threads API).
#[derive(Clone, Debug)]
pub enum Confirmed {
    /// User messages, by id: their echo.
    /// `(message_id, run_id)`: an id is the client's own when it gave one (an AG-UI client's),
    /// so the run the message starts is named too, to hit only that message.
    Messages(Vec<(String, String)>),
    /// What a run produced: its terminal event.
    Run(String),
}

/// What a run produced, stored when it ends, before its terminal event reaches anyone.
#[derive(Clone, Debug)]
pub struct RunMessages {
    pub user_id: String,
    pub thread_id: String,
    pub turn: i64,
    pub run_id: String,
    /// `ok`, `cancelled`, `error` or `interrupted`.
    pub status: &'static str,
    /// AG-UI messages (`{"id","role",...}`), in order.
    pub messages: Vec<Box<RawValue>>,
    /// The thread's new AG-UI state, when the run set one.
    pub state: Option<Box<RawValue>>,
    /// `messages` are the thread's whole conversation (`MESSAGES_SNAPSHOT`): the thread's
    /// messages of this turn and before become them, by id (docs/conversations.md).
    pub whole: bool,
    /// The interrupts the run ended with (`status: "interrupted"`), shown by the threads API
    /// until a run of the thread ends otherwise.
    pub interrupts: Option<Box<RawValue>>,
    pub created_at: u64,
}

/// A publisher's answer (`POST /api/v1/publish`, an `agent_completed` with a `response`): stored
/// as the run's assistant message before the event is published (docs/conversations.md, "What
/// is stored, and when"). Under the turn of the user message whose run it answers when that is
/// stored, else in a turn of its own (making the thread when new).
#[derive(Clone, Debug)]
pub struct PublishedAnswer {
    pub user_id: String,
    pub thread_id: String,
    /// A run event always names its run (docs/protocol.md, the publish API).
    pub run_id: String,
    pub content: String,
    /// `ok` or `cancelled`, from the event's `status`.
    pub status: &'static str,
    pub created_at: u64,
}

/// A thread as the threads API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadView {
    pub thread_id: String,
    pub title: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub message_count: u64,
    pub running: Option<String>,
    /// The thread's last run stopped to ask (docs/agents.md, v2): `resume_run` answers.
    pub interrupted: bool,
    /// What it asked (`[{id, value}]`), while `interrupted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupts: Option<Box<RawValue>>,
    /// Only in the answer for one thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<Box<RawValue>>,
}

/// One page of a listing, and the cursor of the next (`None`: no more).
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// A thread's conversation in AG-UI form: what an agent is sent of its thread (the newest
/// `agent.history_messages`, oldest first, never a tool result without its call) and the
/// thread's state; or what a run added to it.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    pub messages: Vec<Box<RawValue>>,
    pub state: Option<Box<RawValue>>,
    /// What a run added: `messages` are the thread's whole conversation, as the agent's
    /// `MESSAGES_SNAPSHOT` gave it (docs/agents.md, v2), not only what the run added.
    pub whole: bool,
}

/// A JSON value as raw JSON (serialising a `Value` cannot fail).
pub fn raw(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// How a thread's title is made from its first user message: white space collapsed, cut to
/// its first 79 characters and "…" when longer than 80 (docs/conversations.md).
pub fn title_of(content: &str) -> String {
    let collapsed = content.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() <= 80 {
        return collapsed;
    }
    let mut title: String = collapsed.chars().take(79).collect();
    title.push('…');
    title
}

/// Requests still to be written may wait here; past it the store counts as unavailable.
const QUEUE: usize = 16_384;

/// A handle on the store's thread: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<sql::Job>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens the database (creating an SQLite file, running migrations) on the store's own
    /// thread; fails with why when it cannot, so a server does not start without its store.
    pub fn open(settings: StoreSettings) -> Result<Store, String> {
        let jobs = sql::start(settings)?;
        Ok(Store { jobs })
    }

    fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> sql::Job,
    ) -> StoreCall<T> {
        let (answer, answered) = oneshot::channel();
        if let Err(e) = self.jobs.try_send(job(answer)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "too many requests waiting for the database",
                mpsc::error::TrySendError::Closed(_) => "the store's thread has stopped",
            };
            return Box::pin(std::future::ready(Err(StoreError::Unavailable(why.into()))));
        }
        Box::pin(async move {
            answered
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the store's thread has stopped".into())))
        })
    }

    /// Stores a user message (or recognises its `client_msg_id`): answered once committed.
    pub fn add_user_message(&self, message: NewUserMessage) -> StoreCall<Added> {
        self.call(|answer| sql::Job::AddUserMessage(message, answer))
    }

    /// The stream event that completed these messages (`seq`, `epoch`); nobody waits for it.
    pub fn confirm(&self, user_id: &str, what: Confirmed, epoch: &str, seq: u64) {
        let job = |answer| sql::Job::Confirm {
            user_id: user_id.to_owned(),
            what,
            epoch: epoch.to_owned(),
            seq,
            answer,
        };
        drop(self.call(job));
    }

    /// A run started on the thread (`running` in the threads API); nobody waits for it.
    pub fn run_started(&self, user_id: &str, thread_id: &str, run_id: &str) {
        let job = |answer| sql::Job::RunStarted {
            user_id: user_id.to_owned(),
            thread_id: thread_id.to_owned(),
            run_id: run_id.to_owned(),
            answer,
        };
        drop(self.call(job));
    }

    /// Stores what a run produced (and the thread's state): answered once committed.
    pub fn add_run_messages(&self, run: RunMessages) -> StoreCall<()> {
        self.call(|answer| sql::Job::AddRunMessages(run, answer))
    }

    /// Stores publishers' answers: answered once committed, with the threads they made and
    /// their titles (for `thread_updated`).
    pub fn add_answers(&self, answers: Vec<PublishedAnswer>) -> StoreCall<Vec<(String, String)>> {
        self.call(|answer| sql::Job::AddAnswers(answers, answer))
    }

    /// What the agent is sent: the newest `limit` messages of the thread up to its turn
    /// `up_to` (messages queued behind the run are not its to answer), oldest first.
    pub fn history(
        &self,
        user_id: &str,
        thread_id: &str,
        up_to: i64,
        limit: usize,
    ) -> StoreCall<Conversation> {
        let (user_id, thread_id) = (user_id.to_owned(), thread_id.to_owned());
        self.call(|answer| sql::Job::History { user_id, thread_id, up_to, limit, answer })
    }

    /// The user's threads, most recently updated first.
    pub fn threads(
        &self,
        user_id: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreCall<Page<ThreadView>> {
        let user_id = user_id.to_owned();
        self.call(|answer| sql::Job::Threads { user_id, limit, before, answer })
    }

    /// One thread with its state; `None` when the user has no such thread.
    /// Which of `ids` are messages of the thread.
    pub fn known(
        &self,
        user_id: &str,
        thread_id: &str,
        ids: Vec<String>,
    ) -> StoreCall<std::collections::HashSet<String>> {
        let (user_id, thread_id) = (user_id.to_owned(), thread_id.to_owned());
        self.call(|answer| sql::Job::Known { user_id, thread_id, ids, answer })
    }

    pub fn thread(&self, user_id: &str, thread_id: &str) -> StoreCall<Option<ThreadView>> {
        let (user_id, thread_id) = (user_id.to_owned(), thread_id.to_owned());
        self.call(|answer| sql::Job::Thread { user_id, thread_id, answer })
    }

    /// A page of a thread's messages, oldest first (`next` pages towards older ones); `None`
    /// when the user has no such thread.
    pub fn messages(
        &self,
        user_id: &str,
        thread_id: &str,
        limit: usize,
        before: Option<String>,
    ) -> StoreCall<Option<Page<Box<RawValue>>>> {
        let (user_id, thread_id) = (user_id.to_owned(), thread_id.to_owned());
        self.call(|answer| sql::Job::Messages { user_id, thread_id, limit, before, answer })
    }

    /// Renames a thread; the thread afterwards, `None` when the user has no such thread.
    pub fn rename(
        &self,
        user_id: &str,
        thread_id: &str,
        title: &str,
        now: u64,
    ) -> StoreCall<Option<ThreadView>> {
        let (user_id, thread_id, title) = (user_id.to_owned(), thread_id.to_owned(), title.to_owned());
        self.call(|answer| sql::Job::Rename { user_id, thread_id, title, now, answer })
    }

    /// Deletes a thread and its messages; the run that was in progress on it, if any; `None`
    /// when the user had no such thread.
    pub fn delete(&self, user_id: &str, thread_id: &str) -> StoreCall<Option<Option<String>>> {
        let (user_id, thread_id) = (user_id.to_owned(), thread_id.to_owned());
        self.call(|answer| sql::Job::Delete { user_id, thread_id, answer })
    }

    /// `store.retention_days`: deletes threads untouched since `cutoff` (ms); answers their
    /// `(user_id, thread_id)`.
    pub fn expire(&self, cutoff: u64) -> StoreCall<Vec<(String, String)>> {
        self.call(|answer| sql::Job::Expire { cutoff, answer })
    }

    /// Whether the database answers now: `/readyz`.
    pub fn ping(&self) -> StoreCall<()> {
        self.call(sql::Job::Ping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn titles_are_collapsed_and_cut_at_80() {
        assert_eq!(title_of("  hello \n\t world  "), "hello world");
        let long = "x".repeat(80);
        assert_eq!(title_of(&long), long);
        let longer = "y".repeat(81);
        let title = title_of(&longer);
        assert_eq!(title.chars().count(), 80);
        assert!(title.ends_with('…'));
    }

    fn memory() -> Store {
        Store::open(StoreSettings {
            url: "sqlite::memory:".into(),
            max_threads_per_user: 100,
            max_bytes_per_user: 1 << 20,
            retention_days: 0,
        })
        .expect("an in-memory store opens")
    }

    fn block_on<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().expect("a runtime").block_on(future)
    }

    fn user_message(thread: &str, id: &str, at: u64) -> NewUserMessage {
        NewUserMessage {
            user_id: "u".into(),
            thread_id: thread.into(),
            message_id: id.into(),
            run_id: format!("r-{id}"),
            client_msg_id: None,
            content: format!("message {id}"),
            tool_call_id: None,
            refused_when_interrupted: true,
            answers_interrupt: None,
            created_at: at,
        }
    }

    /// What the run of message `m1` of thread `t` produced.
    fn run_of_m1(turn: i64, messages: Vec<Box<RawValue>>) -> RunMessages {
        RunMessages {
            user_id: "u".into(),
            thread_id: "t".into(),
            turn,
            run_id: "r-m1".into(),
            status: "ok",
            messages,
            state: None,
            whole: false,
            interrupts: None,
            created_at: 2,
        }
    }

    /// Stores a user message that must be taken; its turn.
    async fn stored_turn(store: &Store, message: NewUserMessage) -> i64 {
        match store.add_user_message(message).await.unwrap() {
            Added::Stored { turn, .. } => turn,
            other => panic!("not stored: {other:?}"),
        }
    }

    /// The ids of a conversation's messages, in order.
    fn ids(conversation: &Conversation) -> Vec<String> {
        conversation
            .messages
            .iter()
            .map(|m| {
                serde_json::from_str::<serde_json::Value>(m.get()).unwrap()["id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    #[test]
    fn retention_deletes_threads_untouched_since_the_cutoff() {
        let store = memory();
        block_on(async {
            store.add_user_message(user_message("old", "m1", 1_000)).await.unwrap();
            store.add_user_message(user_message("new", "m2", 5_000)).await.unwrap();
            let gone = store.expire(2_000).await.unwrap();
            assert_eq!(gone, [("u".to_owned(), "old".to_owned())]);
            let page = store.threads("u", 10, None).await.unwrap();
            let ids: Vec<_> = page.items.iter().map(|t| t.thread_id.as_str()).collect();
            assert_eq!(ids, ["new"]);
            assert!(store.messages("u", "old", 10, None).await.unwrap().is_none());
        });
    }

    #[test]
    fn history_never_starts_with_a_tool_result_cut_from_its_call() {
        let store = memory();
        block_on(async {
            let turn = stored_turn(&store, user_message("t", "m1", 1)).await;
            let mut run = run_of_m1(
                turn,
                vec![
                    raw(
                        &json!({"id": "a1", "role": "assistant", "toolCalls": [{"id": "c1", "type": "function",
                        "function": {"name": "add", "arguments": "{}"}}]}),
                    ),
                    raw(&json!({"id": "t1", "role": "tool", "toolCallId": "c1", "content": "5"})),
                    raw(&json!({"id": "a2", "role": "assistant", "content": "five"})),
                ],
            );
            run.state = Some(raw(&json!({"n": 1})));
            store.add_run_messages(run).await.unwrap();
            let all = store.history("u", "t", i64::MAX, 10).await.unwrap();
            assert_eq!(all.messages.len(), 4);
            assert_eq!(all.state.map(|s| s.get().to_owned()), Some("{\"n\":1}".to_owned()));
            let cut = store.history("u", "t", i64::MAX, 2).await.unwrap();
            let ids: Vec<String> = cut
                .messages
                .iter()
                .map(|m| {
                    serde_json::from_str::<serde_json::Value>(m.get()).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(ids, ["a2"], "the tool result without its call is left out");
        });
    }

    /// A run that gives the whole thread (`MESSAGES_SNAPSHOT`) makes it the thread, in the
    /// snapshot's order and with its ids: the tool result stored under the event's id is
    /// replaced by the snapshot's, not kept beside it; the thread shows its interrupts until
    /// a run ends `ok`.
    #[test]
    fn a_whole_conversation_replaces_the_thread_in_its_order() {
        let store = memory();
        block_on(async {
            let turn = stored_turn(&store, user_message("t", "m1", 1)).await;
            let call = json!({"id": "a1", "role": "assistant", "toolCalls": [{"id": "c1", "type": "function",
                "function": {"name": "add", "arguments": "{}"}}]});
            let mut run = run_of_m1(
                turn,
                vec![
                    raw(&json!({"id": "sys", "role": "system", "content": "be brief"})),
                    raw(&json!({"id": "m1", "role": "user", "content": "message m1"})),
                    raw(&call),
                    raw(&json!({"id": "checkpoint", "role": "tool", "toolCallId": "c1", "content": "5"})),
                    raw(&json!({"id": "a2", "role": "assistant", "content": "five"})),
                ],
            );
            run.whole = true;
            run.status = "interrupted";
            run.interrupts = Some(raw(&json!([{"id": "i1", "value": "sure?"}])));
            store.add_run_messages(run).await.unwrap();
            let all = store.history("u", "t", i64::MAX, 10).await.unwrap();
            assert_eq!(ids(&all), ["sys", "m1", "a1", "checkpoint", "a2"]);
            let view = store.thread("u", "t").await.unwrap().unwrap();
            assert_eq!((view.message_count, view.interrupted), (5, true));

            // A plain message waits for the interrupt's answer; the answer is taken.
            assert_eq!(
                store.add_user_message(user_message("t", "plain", 3)).await.unwrap(),
                Added::Interrupted
            );
            let mut answer = user_message("t", "m2", 3);
            answer.refused_when_interrupted = false;
            // The next turn: its snapshot has the earlier ones again, from `m1` on (`sys`, before
            // the first message it names, stays).
            let turn = stored_turn(&store, answer).await;
            let mut run = run_of_m1(
                turn,
                vec![
                    raw(&json!({"id": "m1", "role": "user", "content": "message m1"})),
                    raw(&call),
                    raw(&json!({"id": "checkpoint", "role": "tool", "toolCallId": "c1", "content": "5"})),
                    raw(&json!({"id": "a2", "role": "assistant", "content": "five"})),
                    raw(&json!({"id": "m2", "role": "user", "content": "message m2"})),
                    raw(&json!({"id": "a3", "role": "assistant", "content": "ok"})),
                ],
            );
            run.whole = true;
            store.add_run_messages(run).await.unwrap();
            assert_eq!(
                ids(&store.history("u", "t", i64::MAX, 10).await.unwrap()),
                ["sys", "m1", "a1", "checkpoint", "a2", "m2", "a3"]
            );
            let view = store.thread("u", "t").await.unwrap().unwrap();
            assert_eq!((view.message_count, view.interrupted), (7, false));
        });
    }

    /// A snapshot replaces the thread only from the first stored message it names: what the
    /// agent was not sent (older than `agent.history_messages`) stays; a message queued behind the
    /// run keeps its own turn even when the snapshot has it; an empty snapshot is not whole.
    #[test]
    fn a_whole_conversation_replaces_only_what_it_names() {
        let store = memory();
        block_on(async {
            for (n, id) in ["m1", "m2", "m3", "m4"].iter().enumerate() {
                let turn = stored_turn(&store, user_message("t", id, n as u64 + 1)).await;
                if turn <= 2 {
                    let mut run = run_of_m1(
                        turn,
                        vec![raw(&json!({"id": format!("a{turn}"), "role": "assistant", "content": "ok"}))],
                    );
                    run.run_id = format!("r-m{turn}");
                    store.add_run_messages(run).await.unwrap();
                }
            }
            // The run of m3 (turn 3) was sent m2 onwards; m4 waits behind it.
            let mut run = run_of_m1(
                3,
                vec![
                    raw(&json!({"id": "m2", "role": "user", "content": "message m2"})),
                    raw(&json!({"id": "a2", "role": "assistant", "content": "ok"})),
                    raw(&json!({"id": "m3", "role": "user", "content": "message m3"})),
                    raw(&json!({"id": "a3", "role": "assistant", "content": "three"})),
                    raw(&json!({"id": "m4", "role": "user", "content": "message m4"})),
                ],
            );
            run.run_id = "r-m3".into();
            run.whole = true;
            store.add_run_messages(run).await.unwrap();
            let all = store.history("u", "t", i64::MAX, 100).await.unwrap();
            assert_eq!(ids(&all), ["m1", "a1", "m2", "a2", "m3", "a3", "m4"]);
            assert_eq!(
                ids(&store.history("u", "t", 3, 100).await.unwrap()),
                ["m1", "a1", "m2", "a2", "m3", "a3"]
            );
            assert_eq!(store.thread("u", "t").await.unwrap().unwrap().message_count, 7);
        });
    }

    /// Messages sent together are written as one group (`sql/group.rs`) and answered as if one
    /// by one: consecutive turns per thread in arrival order, a new thread's title with its
    /// first message, a `client_msg_id` twice in the group the first one's repeat.
    #[test]
    fn messages_written_as_a_group_are_answered_as_one_by_one() {
        let store = memory();
        block_on(async {
            let calls: Vec<_> = (0..30u64)
                .map(|i| {
                    let mut message = user_message(&format!("t{}", i % 3), &format!("m{i}"), 100 + i);
                    message.client_msg_id = Some(format!("c{}", i.min(28)));
                    store.add_user_message(message)
                })
                .collect();
            let answers: Vec<Added> = futures_util::future::join_all(calls)
                .await
                .into_iter()
                .map(|answer| answer.expect("stored"))
                .collect();
            let mut turns: std::collections::HashMap<u64, i64> = Default::default();
            for (i, answer) in answers.iter().enumerate().take(29) {
                let thread = i as u64 % 3;
                let next = turns.entry(thread).or_insert(0);
                *next += 1;
                let Added::Stored { turn, new_thread, evicted } = answer else { panic!("{i}: {answer:?}") };
                assert_eq!(*turn, *next, "message {i}");
                assert_eq!(new_thread.is_some(), i < 3, "message {i}");
                assert!(evicted.is_empty());
            }
            assert_eq!(
                answers[29],
                Added::Repeat { message_id: "m28".into(), run_id: "r-m28".into(), turn: 10, seq: None }
            );
            let page = store.messages("u", "t2", 100, None).await.unwrap().unwrap();
            assert_eq!(page.items.len(), 9, "the repeat is not stored");
            // And once stored, the same id is a repeat from the database.
            let mut again = user_message("t0", "m99", 999);
            again.client_msg_id = Some("c5".into());
            let repeat = store.add_user_message(again).await.unwrap();
            assert_eq!(
                repeat,
                Added::Repeat { message_id: "m5".into(), run_id: "r-m5".into(), turn: 2, seq: None }
            );
        });
    }

    /// A run started and ended in one batch leaves its thread with no run in progress, as
    /// one-by-one writes would.
    #[test]
    fn a_run_started_and_ended_together_leaves_no_run_in_progress() {
        let store = memory();
        block_on(async {
            let turn = stored_turn(&store, user_message("t", "m1", 1)).await;
            store.run_started("u", "t", "r-m1");
            let run =
                run_of_m1(turn, vec![raw(&json!({"id": "a1", "role": "assistant", "content": "done"}))]);
            store.add_run_messages(run).await.unwrap();
            let thread = store.thread("u", "t").await.unwrap().expect("the thread");
            assert_eq!(thread.running, None);
            assert_eq!(thread.message_count, 2);
        });
    }

    #[test]
    fn messages_page_from_the_newest_towards_older_ones() {
        let store = memory();
        block_on(async {
            for i in 1..=5 {
                store.add_user_message(user_message("t", &format!("m{i}"), i)).await.unwrap();
            }
            let first = store.messages("u", "t", 2, None).await.unwrap().unwrap();
            let ids = |page: &Page<Box<RawValue>>| -> Vec<serde_json::Value> {
                page.items
                    .iter()
                    .map(|m| serde_json::from_str::<serde_json::Value>(m.get()).unwrap()["id"].clone())
                    .collect()
            };
            assert_eq!(ids(&first), [json!("m4"), json!("m5")]);
            let second = store.messages("u", "t", 2, first.next).await.unwrap().unwrap();
            assert_eq!(ids(&second), [json!("m2"), json!("m3")]);
            let last = store.messages("u", "t", 2, second.next).await.unwrap().unwrap();
            assert_eq!(ids(&last), [json!("m1")]);
            assert_eq!(last.next, None);
        });
    }
}
