//! Any byte stream, split anywhere: the frame-header guard never panics, and refuses only frames
//! that announce more than the limit.
#![no_main]

use agentwire::ws::frame_guard::FrameGuard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut guard = FrameGuard::new(65_536);
    for chunk in rest.chunks(usize::from(split).max(1)) {
        if let Err(oversized) = guard.inspect(chunk) {
            assert!(oversized.announced > 65_536);
            return;
        }
    }
});
