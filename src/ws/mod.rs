//! The WebSocket edge: everything between a client's socket and the registry.
//!
//! `session.rs` is the actor (one per socket, the only code that touches `actix-web-actors`);
//! `read_gate.rs` and `frame_guard.rs` decide how much of a client is read and when;
//! `output.rs` counts what the session has written and the socket has not taken yet. What the
//! registry hands a session (`Delivery`, `Outbound`) is below both, in `base/`.

pub mod frame_guard;
mod output;
mod read_gate;
mod session;

pub use session::{start, Session, SessionEnv};
