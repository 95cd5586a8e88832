//! Bad input and abuse (protocol sections 1, 4 and 8): every case gets the specified error frame
//! or close code, and the server keeps serving its other sessions through all of them.

mod common;

use std::num::NonZero;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;

/// A session of another user that must keep working whatever the misbehaving one does.
async fn assert_bystander_fine(bystander: &mut Client) {
    assert_eq!(bystander.ping(json!("still here")).await["id"], "still here");
}

#[actix_web::test]
async fn malformed_frames_get_errors_and_the_connection_stays_open() {
    let server = TestServer::start();
    let mut client = server.ready_client("sloppy").await;
    let long_id = "x".repeat(129);
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{\"type\":".into(), "bad_message", None),
        ("[1,2,3]".into(), "bad_message", None),
        ("\"just a string\"".into(), "bad_message", None),
        ("{\"no_type\":1}".into(), "bad_message", None),
        ("{\"type\":[\"ping\"]}".into(), "bad_message", None),
        ("{\"type\":\"self_destruct\"}".into(), "unknown_type", Some("self_destruct")),
        (json!({"type": "user_message", "content": "x"}).to_string(), "bad_message", Some("user_message")),
        (
            json!({"type": "user_message", "thread_id": long_id, "content": "x"}).to_string(),
            "bad_message",
            Some("user_message"),
        ),
        (
            json!({"type": "user_message", "thread_id": "t", "content": "x", "client_msg_id": ""})
                .to_string(),
            "bad_message",
            Some("user_message"),
        ),
        (json!({"type": "cancel_run", "run_id": 42}).to_string(), "bad_message", Some("cancel_run")),
        (json!({"type": "auth"}).to_string(), "bad_message", Some("auth")),
    ];
    for (text, code, reference) in cases {
        client.send_text(text.clone()).await;
        let error = client.recv().await;
        assert_eq!(error["type"], "error", "{text}");
        assert_eq!(error["code"], code, "{text}");
        assert_eq!(error["ref"].as_str(), reference, "{text}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(client.ping(json!(1)).await["type"], "pong");
}

#[actix_web::test]
async fn binary_frame_closes_with_1003() {
    let server = TestServer::start();
    let mut bystander = server.ready_client("bystander").await;
    let mut client = server.ready_client("binary").await;
    client.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(client.expect_close_code().await, 1003);
    assert_bystander_fine(&mut bystander).await;
}

#[actix_web::test]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start();
    let mut bystander = server.ready_client("bystander").await;
    let mut client = server.ready_client("mojibake").await;
    client.write_raw(&raw_frame(TEXT, true, &[b'{', 0xff, 0xfe, b'}'])).await;
    assert_eq!(client.expect_close_code().await, 1007);
    // Invalid UTF-8 split across fragments is caught when the message is reassembled.
    let mut fragmented = server.ready_client("mojibake").await;
    fragmented.write_raw(&raw_frame(TEXT, false, &[b'"', 0xe2])).await;
    fragmented.write_raw(&raw_frame(CONTINUATION, true, &[0x28, b'"'])).await;
    assert_eq!(fragmented.expect_close_code().await, 1007);
    assert_bystander_fine(&mut bystander).await;
}

#[actix_web::test]
async fn oversized_frame_closes_with_1009() {
    let server = TestServer::with(|c| c.limits.max_message_bytes = 4096);
    let mut bystander = server.ready_client("bystander").await;
    let mut client = server.ready_client("big").await;
    let text = json!({"type": "ping", "id": "x".repeat(5000)}).to_string();
    client.send_text(text).await;
    assert_eq!(client.expect_close_code().await, 1009);
    assert_bystander_fine(&mut bystander).await;
}

#[actix_web::test]
async fn oversized_frame_is_refused_from_its_header_alone() {
    let server = TestServer::start();
    let mut client = server.ready_client("liar").await;
    // Announce 100 MB and send 16 bytes of it: the server must not wait for (or buffer) the rest.
    client.write_raw(&raw_frame_header(TEXT, true, 100_000_000)).await;
    client.write_raw(&[b'a'; 16]).await;
    assert_eq!(client.expect_close_code().await, 1009);
}

#[actix_web::test]
async fn fragmented_messages_are_reassembled_up_to_the_limit() {
    let server = TestServer::with(|c| c.limits.max_message_bytes = 4096);
    let mut client = server.ready_client("fragments").await;
    let content = "y".repeat(3000);
    let text = json!({"type": "user_message", "thread_id": "t", "content": content}).to_string();
    let (a, rest) = text.as_bytes().split_at(1000);
    let (b, c) = rest.split_at(1000);
    client.write_raw(&raw_frame(TEXT, false, a)).await;
    client.write_raw(&raw_frame(CONTINUATION, false, b)).await;
    // A ping may arrive between fragments (RFC 6455 5.4).
    client.write_raw(&raw_frame(0x9, true, b"hi")).await;
    client.write_raw(&raw_frame(CONTINUATION, true, c)).await;
    let echo = client.recv_where(|f| f["type"] == "user_message").await;
    assert_eq!(echo["payload"]["content"], content);

    // Three fragments of 2000 bytes: each is fine, together they are over 4096.
    for (i, fin) in [(0, false), (1, false), (2, true)] {
        let opcode = if i == 0 { TEXT } else { CONTINUATION };
        client.write_raw(&raw_frame(opcode, fin, &[b' '; 2000])).await;
    }
    assert_eq!(client.expect_close_code().await, 1009);
}

#[actix_web::test]
async fn floods_are_rate_limited_then_closed_with_1008() {
    let server = TestServer::with(|c| {
        c.limits.messages_per_second = NonZero::new(5).unwrap();
        c.limits.burst = NonZero::new(5).unwrap();
    });
    let mut bystander = server.ready_client("bystander").await;
    let mut client = server.ready_client("flooder").await;
    for i in 0..10 {
        client.send(json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..10 {
        let frame = client.recv().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("pong"), _) => pongs += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {frame}"),
        }
    }
    // The burst passes; the rest (all but what refilled meanwhile) is refused.
    assert!(pongs >= 5 && limited >= 4 && pongs + limited == 10, "{pongs} pongs, {limited} limited");

    for i in 0..150 {
        client.send(json!({"type": "ping", "id": i})).await;
    }
    let (close, frames) = client.expect_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1008);
    // Section 4: the connection is closed once it has collected 100 `rate_limited` answers, not
    // one earlier.
    let later = frames.iter().filter(|f| f["code"] == "rate_limited").count();
    assert_eq!(limited + later, 100, "{limited} + {later} rate_limited answers before 1008");
    assert_eq!(server.metric("agentwire_connection_failures_total{reason=\"rate_abuse\"}"), 1.0);
    assert_bystander_fine(&mut bystander).await;
}

/// Section 4: the close comes right after the 100th `rate_limited` answer, so a client that
/// stops sending once it has collected them is closed all the same.
#[actix_web::test]
async fn the_100th_rate_limited_answer_is_followed_by_1008_without_another_frame() {
    let server = TestServer::with(|c| {
        c.limits.messages_per_second = NonZero::new(1).unwrap();
        c.limits.burst = NonZero::new(1).unwrap();
    });
    let mut client = server.ready_client("stops-at-100").await;
    let mut limited = 0;
    let mut sent = 0;
    while limited < 100 {
        assert!(sent < 1000, "no 100 rate_limited answers in {sent} frames");
        client.send(json!({"type": "ping", "id": sent})).await;
        sent += 1;
        let frame = client.recv().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("pong"), _) => {}
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {frame}"),
        }
    }
    // Nothing more is sent: the close must come on its own, with no frame before it.
    let (close, frames) = client.expect_close().await;
    assert_eq!(u16::from(close.expect("close frame").code), 1008);
    assert!(frames.is_empty(), "frames after the 100th answer: {frames:?}");
}

#[actix_web::test]
async fn connections_over_the_cap_get_503_and_capacity_comes_back() {
    let server = TestServer::with(|c| c.limits.max_connections = NonZero::new(3).unwrap());
    let token = server.token("crowd");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.ready_client("crowd").await);
    }
    let (status, body) = refused_upgrade(Client::connect_bearer(&server.ws_url(), &token).await);
    assert_eq!((status, body["error"].as_str()), (503, Some("over_capacity")));
    clients.pop().unwrap().close().await;
    // The slot is released when the closed session's actor is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Client::connect_bearer(&server.ws_url(), &token).await {
            Ok(mut client) => {
                client.expect_setup("crowd").await;
                break;
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("capacity never came back: {e}"),
        }
    }
    assert!(server.metric("agentwire_connection_failures_total{reason=\"over_capacity\"}") >= 1.0);
}

#[actix_web::test]
async fn allowed_origins_are_enforced() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::with(|c| c.server.allowed_origins = vec!["https://chat.example.com".into()]);
    let with_origin = |origin: &str| {
        let mut request = server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert("Origin", origin.parse().unwrap());
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {}", server.token("o")).parse().unwrap());
        request
    };
    let mut listed = Client::connect_request(with_origin("https://chat.example.com")).await.unwrap();
    listed.expect_setup("o").await;
    let (status, _) = refused_upgrade(Client::connect_request(with_origin("https://evil.example")).await);
    assert_eq!(status, 403);
    // Without Origin (not a browser): accepted.
    server.ready_client("o").await;
    // With no list configured, any Origin is accepted.
    let open = TestServer::start();
    let mut request = open.ws_url().into_client_request().unwrap();
    request.headers_mut().insert("Origin", "https://anywhere.example".parse().unwrap());
    request.headers_mut().insert("Authorization", format!("Bearer {}", open.token("o")).parse().unwrap());
    Client::connect_request(request).await.unwrap().expect_setup("o").await;
}
