//! The connection state machine of protocol section 3, as a pure table.
//!
//! The registry is the only caller: it asks [`ConnectionState::can_transition_to`] before it
//! records a new state, so a transition that is not in this table never happens, whoever asks.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Accepted,
    Authenticated,
    ServicesReady,
    ProcessingReady,
    Closing,
    Closed,
    Failed,
}

use ConnectionState::*;

impl ConnectionState {
    pub const ALL: [ConnectionState; 7] =
        [Accepted, Authenticated, ServicesReady, ProcessingReady, Closing, Closed, Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Accepted => "accepted",
            Authenticated => "authenticated",
            ServicesReady => "services_ready",
            ProcessingReady => "processing_ready",
            Closing => "closing",
            Closed => "closed",
            Failed => "failed",
        }
    }

    /// The transition table:
    ///
    /// ```text
    /// accepted -> authenticated -> services_ready -> processing_ready -> closing -> closed
    /// any state before processing_ready -> failed -> closed
    /// any state before closing          -> closing
    /// ```
    pub fn can_transition_to(self, to: ConnectionState) -> bool {
        matches!(
            (self, to),
            (Accepted, Authenticated)
                | (Authenticated, ServicesReady)
                | (ServicesReady, ProcessingReady)
                | (Accepted | Authenticated | ServicesReady, Failed)
                | (Accepted | Authenticated | ServicesReady | ProcessingReady, Closing)
                | (Closing | Failed, Closed)
        )
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every allowed pair, written out by hand from protocol section 3.
    const ALLOWED: &[(ConnectionState, ConnectionState)] = &[
        (Accepted, Authenticated),
        (Authenticated, ServicesReady),
        (ServicesReady, ProcessingReady),
        (ProcessingReady, Closing),
        (Closing, Closed),
        (Accepted, Failed),
        (Authenticated, Failed),
        (ServicesReady, Failed),
        (Failed, Closed),
        (Accepted, Closing),
        (Authenticated, Closing),
        (ServicesReady, Closing),
    ];

    #[test]
    fn every_pair_matches_the_protocol_table() {
        for from in ConnectionState::ALL {
            for to in ConnectionState::ALL {
                assert_eq!(from.can_transition_to(to), ALLOWED.contains(&(from, to)), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn closed_is_final_and_nothing_returns_to_accepted() {
        for to in ConnectionState::ALL {
            assert!(!Closed.can_transition_to(to));
            assert!(!to.can_transition_to(Accepted));
        }
    }

    #[test]
    fn names_match_the_wire() {
        for state in ConnectionState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }
}
