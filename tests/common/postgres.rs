//! A PostgreSQL database of a test's own, for `store.kind = "postgres"` (required by
//! `broker.kind = "redis"`: several nodes share one database).
//!
//! Made on the server at `AGENTWIRE_TEST_POSTGRES_URL` (default postgres://127.0.0.1:5432/postgres;
//! `.ci/test` starts one where none answers) under a name no other test or run can have, and
//! dropped when the test ends. Only that database is ever created or dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

/// Upper bound of creating or dropping a database: longer than the tests' usual wait, since a
/// forced drop waits for the nodes' connections to end, and the machine may be busy building.
const ADMIN_WAIT: Duration = Duration::from_secs(30);

/// The server's administrative URL: a database that exists there, to connect to while creating
/// and dropping the test's own.
pub fn server_url() -> String {
    std::env::var("AGENTWIRE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://127.0.0.1:5432/postgres".into())
}

/// A database created for one test and dropped (with its connections) when this is dropped.
/// Keep it alive until every node using it is dropped: declare it before them.
pub struct TestDatabase {
    server: String,
    name: String,
    url: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let server = server_url();
        let name = format!(
            "agentwire_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        if let Err(e) = admin(&server, format!("CREATE DATABASE \"{name}\"")) {
            panic!(
                "cannot create the test database {name} at {} ({e}); run PostgreSQL there or set \
                 AGENTWIRE_TEST_POSTGRES_URL (.ci/test starts one)",
                redacted(&server)
            );
        }
        let url = with_database(&server, &name);
        TestDatabase { server, name, url }
    }

    /// `postgres://...` of this database, for `store.url`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE ends the connections the nodes may still hold. Never a panic here: the test may
        // already be unwinding from one of its own.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = admin(&self.server, sql) {
            eprintln!("could not drop the test database {} at {}: {e}", self.name, redacted(&self.server));
        }
    }
}

/// Runs one statement on the server's administrative database, within `ADMIN_WAIT`. On a thread
/// and runtime of its own, so that it works from a plain test and from inside an async one.
fn admin(server: &str, sql: String) -> Result<(), String> {
    let server = server.to_owned();
    std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let work = async {
                let mut connection = PgConnection::connect(&server).await?;
                connection.execute(sql.as_str()).await?;
                connection.close().await
            };
            match tokio::time::timeout(ADMIN_WAIT, work).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {ADMIN_WAIT:?}")),
            }
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the thread talking to PostgreSQL panicked".into()))
}

/// `server` with its database (the URL's path) replaced by `name`; user, host, port and
/// parameters kept.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..path_start])
}

/// The URL without its user and password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}{}", &url[..scheme + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
