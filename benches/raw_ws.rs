//! The raw baseline of `benches/run.sh` (`ONLY=raw`): a bare tokio-tungstenite broadcast server
//! that takes the same load as agentwire in the same run, so agentwire's figures can be read as
//! ratios to what the machine does with nothing but WebSockets. It speaks just enough of the
//! protocol for `agentwire loadtest`'s idle and fan-out scenarios: any upgrade is a session of its
//! token's `sub` (not verified), ready at once; `POST /api/v1/publish` numbers the events of a
//! user and hands each frame to every connection of that user. No auth, limits, history, resume.
//!
//! A first version: it spends ~70 KB per connection and its per-user broadcast channel contends
//! under fan-out, so it is not yet the lean baseline to quote ratios against (`run.sh` runs it
//! only with `ONLY=raw`).
//!
//!     cargo run --release --example raw_ws -- 18100

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Users = Arc<Mutex<HashMap<String, (u64, broadcast::Sender<Utf8Bytes>)>>>;

fn channel(users: &Users, user: &str) -> broadcast::Sender<Utf8Bytes> {
    let mut users = users.lock().unwrap();
    // Room for a publish batch or two per user; a reader further behind loses frames (and the
    // load generator counts the gaps): the baseline keeps no history.
    users.entry(user.to_owned()).or_insert_with(|| (0, broadcast::channel(1024).0)).1.clone()
}

/// The `sub` of a JWT, read without checking it (this is a baseline, not a server).
fn sub(authorization: &str) -> Option<String> {
    let payload = authorization.strip_prefix("Bearer ")?.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&claims).ok()?["sub"].as_str().map(str::to_owned)
}

// The handshake callback's signature is tungstenite's, error type included.
#[allow(clippy::result_large_err)]
async fn session(stream: TcpStream, users: Users) {
    let mut user = None;
    let callback = |request: &Request, response: Response| {
        user = request.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(sub);
        Ok(response)
    };
    // Small buffers, as agentwire's sessions have: the kernel's socket buffers do the queueing.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let accepted = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let Ok(mut ws) = accepted else { return };
    let Some(user) = user else { return };
    let mut frames = channel(&users, &user).subscribe();
    let ready = r#"{"type":"connection_state","state":"processing_ready"}"#;
    if ws.send(Message::text(ready)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Ok(frame) => {
                    // Everything already waiting goes out with one flush, as agentwire batches.
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                    while let Ok(frame) = frames.try_recv() {
                        if ws.feed(Message::Text(frame)).await.is_err() {
                            return;
                        }
                    }
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
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
        let sender = channel(&users, &user);
        let mut seqs = Vec::new();
        for mut event in body["events"].as_array().cloned().unwrap_or_default() {
            let seq = {
                let mut users = users.lock().unwrap();
                let entry = users.get_mut(&user).expect("made by channel()");
                entry.0 += 1;
                entry.0
            };
            event["seq"] = seq.into();
            seqs.push(seq);
            let _ = sender.send(Utf8Bytes::from(event.to_string()));
        }
        let answer = serde_json::json!({"seqs": seqs, "sessions": sender.receiver_count()}).to_string();
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
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let users = Arc::clone(&users);
        tokio::spawn(async move {
            let mut first = [0u8; 4];
            match stream.peek(&mut first).await {
                Ok(4) if &first == b"POST" => publish(stream, users).await,
                Ok(_) => session(stream, users).await,
                Err(_) => {}
            }
        });
    }
}
