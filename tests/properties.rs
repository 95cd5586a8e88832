//! Property tests: the client-frame parser, the frame-header guard and the state table never
//! panic, whatever they are given, and keep their invariants.

use agentwire::protocol::{parse_client_frame, ClientFrame, ErrorCode, FieldLimits};
use agentwire::state::ConnectionState;
use agentwire::ws::frame_guard::FrameGuard;
use proptest::prelude::*;

const LIMITS: FieldLimits = FieldLimits { max_content_chars: 64 };

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z_ ]{0,12}".prop_map(serde_json::Value::from),
        prop::sample::select(vec!["auth", "user_message", "cancel_run", "ping", "tool_result", "resume_run"])
            .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "type",
                    "token",
                    "thread_id",
                    "content",
                    "client_msg_id",
                    "run_id",
                    "tool_call_id",
                    "interrupt_id",
                    "value",
                    "id",
                    "x"
                ]),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #[test]
    fn the_parser_never_panics_on_any_text(text in ".{0,200}") {
        let _ = parse_client_frame(&text, LIMITS);
    }

    #[test]
    fn the_parser_judges_json_shapes_consistently(value in json_value()) {
        let text = value.to_string();
        match parse_client_frame(&text, LIMITS) {
            Ok(frame) => {
                // Whatever is accepted is an object whose `type` names what was parsed.
                prop_assert_eq!(value["type"].as_str(), Some(frame.type_name()));
                if let ClientFrame::UserMessage(m) = frame {
                    // A tool's result or an interrupt's answer may be empty; words may not.
                    let least = usize::from(m.frame_type() == "user_message");
                    prop_assert!((least..=64).contains(&m.content.chars().count()));
                    prop_assert!((1..=128).contains(&m.thread_id.chars().count()));
                }
            }
            Err(e) => {
                prop_assert!(!e.message.is_empty());
                let known = ["auth", "user_message", "cancel_run", "ping", "tool_result", "resume_run"];
                match value.get("type").and_then(|t| t.as_str()) {
                    Some(t) if !known.contains(&t) => prop_assert_eq!(e.code, ErrorCode::UnknownType),
                    _ => prop_assert_eq!(e.code, ErrorCode::BadMessage),
                }
            }
        }
    }

    #[test]
    fn the_frame_guard_never_panics_and_refuses_only_oversized_frames(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
        max in 0usize..100_000,
    ) {
        let mut guard = FrameGuard::new(max);
        for chunk in &chunks {
            if let Err(oversized) = guard.inspect(chunk) {
                prop_assert!(oversized.announced > max as u64);
                break;
            }
        }
    }

    #[test]
    fn any_walk_through_the_state_table_ends_in_closed_or_gets_stuck_legally(
        steps in prop::collection::vec(0usize..7, 0..20)
    ) {
        let mut state = ConnectionState::Accepted;
        for step in steps {
            let to = ConnectionState::ALL[step];
            if state.can_transition_to(to) {
                prop_assert_ne!(state, ConnectionState::Closed);
                state = to;
            }
        }
        // From anywhere but closed, closed stays reachable in at most two steps.
        if state != ConnectionState::Closed {
            let direct = state.can_transition_to(ConnectionState::Closed);
            let via_closing = state.can_transition_to(ConnectionState::Closing);
            prop_assert!(direct || via_closing);
        }
    }
}
