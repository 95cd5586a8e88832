//! Leaf types: what the registry, the broker and the WebSocket edge (`ws/`) all speak of.
//!
//! They live below every module that uses them so that types point down (docs/architecture.md,
//! "Files"): nothing here imports another module of the crate.

mod connection_id;
mod delivery;
mod maps;
mod outbound;

pub use connection_id::ConnectionId;
pub use delivery::Delivery;
pub use maps::shrink_if_oversized;
pub use outbound::{close_frame_len, encoded_len, Outbound};
