//! The binary as an operator runs it: `serve` prints where it listens, `token` mints a token the
//! server accepts, and an unusable configuration stops the start with one line and exit code 2.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use agentwire::auth::KeyFile;

fn agentwire(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentwire"));
    command.current_dir(dir).env_remove("RUST_LOG");
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("AGENTWIRE__")) {
        command.env_remove(name);
    }
    command
}

#[test]
fn token_command_mints_a_token_for_the_configured_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = agentwire(dir.path())
        .args(["token", "--sub", "alice", "--ttl", "120", "--name", "Alice"])
        .env("AGENTWIRE__AUTH__SECRET", common::TEST_SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap();
    let identity = KeyFile::new(&common::test_auth()).unwrap().verify(token.trim()).unwrap();
    assert_eq!(identity.user_id, "alice");
    // `--name` goes into the token's `name` claim (the server accepts it and does not use it).
    use base64::Engine;
    let payload = token.trim().split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap())
            .unwrap();
    assert_eq!(claims["name"], "Alice");
    let remaining = identity.expires_at_ms - agentwire::protocol::now_ms();
    assert!((100_000..=120_000).contains(&remaining), "{remaining}");

    let bad = agentwire(dir.path())
        .args(["token", "--sub", "not valid"])
        .env("AGENTWIRE__AUTH__SECRET", common::TEST_SECRET)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

fn expect_config_error(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)], key: &str) {
    let mut command = agentwire(dir);
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one clear line: {stderr}");
    assert!(lines[0].contains(key), "{key} not named in: {stderr}");
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // The built-in defaults carry no secret: the server refuses to start, naming the key.
    expect_config_error(dir.path(), &[], &[], "auth.secret");
    expect_config_error(dir.path(), &[], &[("AGENTWIRE__LIMITS__BURST", "lots")], "limits.burst");
    expect_config_error(dir.path(), &[], &[("AGENTWIRE__SERVER__BIND", "0.0.0.0:0")], "auth.secret");
    expect_config_error(
        dir.path(),
        &[],
        &[("AGENTWIRE__SERVER__BIND", "0.0.0.0:0"), ("AGENTWIRE__SERVER__DEV_MODE", "true")],
        "server.dev_mode",
    );
    expect_config_error(
        dir.path(),
        &[],
        &[
            ("AGENTWIRE__SERVER__BIND", "0.0.0.0:0"),
            ("AGENTWIRE__AUTH__SECRET", "a-real-secret-of-ours"),
            ("AGENTWIRE__AUTH__DEV_TOKENS", "true"),
        ],
        "auth.dev_tokens",
    );
    std::fs::write(dir.path().join("custom.toml"), "[limits]\nmax_connections = -1\n").unwrap();
    expect_config_error(dir.path(), &["--config", "custom.toml"], &[], "limits.max_connections");
    // ./config.toml is read when present.
    std::fs::write(dir.path().join("config.toml"), "[auth]\nalgorithm = \"HS384\"\n").unwrap();
    expect_config_error(dir.path(), &["serve"], &[], "auth.algorithm");
    expect_config_error(dir.path(), &["--config", "missing.toml"], &[], "missing.toml");
}

/// The newcomer's path: the repository's config.toml (development mode) beside the binary.
#[actix_web::test]
async fn serve_prints_its_address_and_answers_there() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"), dir.path().join("config.toml"))
        .unwrap();
    let mut child = agentwire(dir.path())
        .env("AGENTWIRE__SERVER__BIND", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(common::WAIT).expect("the server prints its address");
    let url =
        first.split_whitespace().find(|w| w.starts_with("http://")).expect("an http:// address").to_owned();
    let (status, _) = common::http_get(&format!("{url}/healthz"), None).await;
    assert_eq!(status, 200);
    // The start-up lines say how to get a token, and say plainly that this is development mode.
    let wanted = ["/dev/token", "development mode"];
    let deadline = std::time::Instant::now() + common::WAIT;
    let mut lines: Vec<String> = Vec::new();
    while !wanted.iter().all(|w| lines.iter().any(|l| l.contains(w))) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("the start-up lines do not say {wanted:?}: {lines:?}"),
        }
    }
    // The secret made on first start is kept beside the config, so `agentwire token` agrees.
    assert!(dir.path().join(".agentwire-dev-secret").is_file());
    // Conversations go to the SQLite file config.toml names, beside it too.
    assert!(dir.path().join("agentwire.db").is_file(), "store.path is relative to the config's folder");
    let output = agentwire(dir.path()).args(["token", "--sub", "alice"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap();
    let ws = url.replace("http://", "ws://") + "/ws";
    common::Client::connect_bearer(&ws, token.trim())
        .await
        .expect("the server takes it")
        .expect_setup("alice")
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
}
