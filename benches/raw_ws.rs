//! The raw baseline of `benches/run.sh` (`ONLY=raw`): a bare tokio-tungstenite broadcast server
//! that takes the same load as agentwire in the same run, so agentwire's figures can be read as
//! ratios to what the machine does with nothing but WebSockets. It speaks just enough of the
//! protocol for `agentwire loadtest`'s idle and fan-out scenarios: any upgrade is a session of its
//! token's `sub` (not verified), ready at once; `POST /api/v1/publish` numbers the events of a
//! user and hands each frame to every connection of that user. No auth, limits, history, resume.
//!
//!     cargo run --release --example raw_ws -- 18100

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// One publish's frames, serialised once and shared by every connection of the user.
type Batch = Arc<[Utf8Bytes]>;

/// A user's last seq and the queues of its open connections.
#[derive(Default)]
struct User {
    seq: u64,
    sinks: Vec<(u64, mpsc::UnboundedSender<Batch>)>,
}

type Users = Arc<Mutex<HashMap<String, User>>>;

/// The `sub` of a JWT, read without checking it (this is a baseline, not a server).
fn sub(authorization: &str) -> Option<String> {
    let payload = authorization.strip_prefix("Bearer ")?.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&claims).ok()?["sub"].as_str().map(str::to_owned)
}

// The handshake callback's signature is tungstenite's, error type included.
#[allow(clippy::result_large_err)]
async fn session(stream: TcpStream, users: Users, id: u64) {
    let mut user = None;
    let callback = |request: &Request, response: Response| {
        user = request.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(sub);
        Ok(response)
    };
    // A small read buffer (clients send little); frames fed to the write buffer go out with one
    // write per flush (a write buffer of 0 would make every frame its own write).
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(32 * 1024);
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let Ok(mut ws) = accepted else { return };
    let Some(user) = user else { return };
    let (sink, mut batches) = mpsc::unbounded_channel();
    users.lock().unwrap().entry(user.clone()).or_default().sinks.push((id, sink));
    let ready = r#"{"type":"connection_state","state":"processing_ready"}"#;
    if ws.send(Message::text(ready)).await.is_ok() {
        loop {
            tokio::select! {
                Some(batch) = batches.recv() => {
                    // Every batch already waiting goes out with one flush, as agentwire batches.
                    let mut next = Some(batch);
                    let mut failed = false;
                    while let Some(batch) = next.take() {
                        for frame in batch.iter() {
                            failed |= ws.feed(Message::Text(frame.clone())).await.is_err();
                        }
                        next = batches.try_recv().ok();
                    }
                    if failed || ws.flush().await.is_err() {
                        break;
                    }
                },
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    if let Some(entry) = users.lock().unwrap().get_mut(&user) {
        entry.sinks.retain(|(sink, _)| *sink != id);
    }
}

/// Keep-alive HTTP/1.1 `POST /api/v1/publish`, read by Content-Length.
async fn publish(mut stream: TcpStream, users: Users) {
    let mut buffer = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 65_536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value = serde_json::from_slice(&buffer[head_end..head_end + length]).unwrap_or(Value::Null);
        buffer.drain(..head_end + length);
        let user = body["user_id"].as_str().unwrap_or_default().to_owned();
        let events = body["events"].as_array().cloned().unwrap_or_default();
        let (seqs, sessions) = {
            let mut users = users.lock().unwrap();
            let entry = users.entry(user).or_default();
            let mut seqs = Vec::with_capacity(events.len());
            let batch: Batch = events
                .into_iter()
                .map(|mut event| {
                    entry.seq += 1;
                    seqs.push(entry.seq);
                    event["seq"] = entry.seq.into();
                    Utf8Bytes::from(event.to_string())
                })
                .collect();
            entry.sinks.retain(|(_, sink)| sink.send(Arc::clone(&batch)).is_ok());
            (seqs, entry.sinks.len())
        };
        let answer = serde_json::json!({"seqs": seqs, "sessions": sessions}).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(18100);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The same accept backlog as agentwire's listener, so neither turns connections away first.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    let listener: TcpListener = socket.listen(4096)?;
    println!("raw baseline on ws://127.0.0.1:{port}/ws");
    let users: Users = Arc::default();
    for id in 0u64.. {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let users = Arc::clone(&users);
        tokio::spawn(async move {
            let mut first = [0u8; 4];
            // Each path boxed on its own: one future holding both would make every WebSocket
            // connection carry the publish path's 64 KB read buffer.
            match stream.peek(&mut first).await {
                Ok(4) if &first == b"POST" => Box::pin(publish(stream, users)).await,
                Ok(_) => Box::pin(session(stream, users, id)).await,
                Err(_) => {}
            }
        });
    }
    Ok(())
}
