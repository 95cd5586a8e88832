//! A `redis-server` of a test's own, on a free port, never the machine's: the tests that stop,
//! restart or empty Redis (docs/scale-out.md's failure table, the randomized fault run).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::WAIT;

/// A `redis-server` on a free port, stopped on drop.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    /// Whether it keeps its data on disk (an append-only file): a restart brings it back.
    persistent: bool,
    /// More of `redis-server`'s options (a cluster node's).
    options: Vec<String>,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        OwnRedis::start_with(false).await
    }

    /// [`OwnRedis::start`], keeping its data on disk when `persistent`.
    pub async fn start_with(persistent: bool) -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        OwnRedis::start_on(port, persistent, &[]).await
    }

    /// One on `port`, with more `options` (`--cluster-enabled yes`...).
    pub async fn start_on(port: u16, persistent: bool, options: &[&str]) -> OwnRedis {
        let options = options.iter().map(|o| (*o).to_owned()).collect();
        let mut redis =
            OwnRedis { child: None, port, persistent, options, dir: tempfile::tempdir().unwrap() };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again: empty, as Redis without persistence comes back, or with its data) and waits until it logs
    /// that it accepts connections.
    pub async fn restart(&mut self) {
        let mut child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
            ])
            .args(&self.options)
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

    /// Stops it as an operator would (SIGTERM): a persistent one writes its data out first.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn command(&self, args: &[&str]) -> Result<String, String> {
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
