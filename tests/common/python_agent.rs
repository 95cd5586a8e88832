//! A Python example agent of `examples/` as a real process of its own (the tests of
//! `tests/ag_ui_python.rs` and `tests/ag_ui_langgraph.rs`): started on a free port, its address
//! read from the one line it prints once it listens, killed when dropped. `.ci/test` installs
//! each example's packages into its `.venv`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct PythonAgent {
    child: Child,
    pub url: String,
}

impl PythonAgent {
    /// `examples/{example}/agent.py --port 0`, with `env` set.
    pub fn start(example: &str, env: &[(&str, &str)]) -> PythonAgent {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples").join(example);
        let python = dir.join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run .ci/test, which installs the example agent's packages",
            python.display()
        );
        let mut child = Command::new(&python)
            .arg(dir.join("agent.py"))
            .args(["--port", "0"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example agent starts");
        // The agent prints its address once it listens; reading it is the wait (bounded by the
        // reader thread's channel timeout).
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the agent listens in time");
        let url = line.trim().strip_prefix("listening on ").expect("the agent's address line").to_owned();
        PythonAgent { child, url }
    }
}

impl Drop for PythonAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
