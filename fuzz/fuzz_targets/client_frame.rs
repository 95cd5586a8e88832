//! Any bytes a client can send as a text frame: the parser answers Ok or a FrameError, never panics.
#![no_main]

use agentwire::protocol::{parse_client_frame, FieldLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_client_frame(text, FieldLimits { max_content_chars: 16_000 });
    }
});
