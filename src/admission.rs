//! Who may open a WebSocket at all, decided before the upgrade (protocol section 8): the
//! connection cap (`limits.max_connections`, HTTP 503) and the Origin allow-list (HTTP 403).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts open WebSocket connections against `limits.max_connections`.
pub struct ConnectionSlots {
    open: AtomicUsize,
    max: usize,
}

/// One open connection's place under the cap; released when the session is dropped, however it
/// ends.
pub struct ConnectionSlot(Arc<ConnectionSlots>);

impl ConnectionSlots {
    pub fn new(max: usize) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots { open: AtomicUsize::new(0), max })
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let acquired = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < self.max).then_some(open + 1))
            .is_ok();
        acquired.then(|| ConnectionSlot(Arc::clone(self)))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An upgrade without `Origin` is not from a browser and is accepted; with an allow-list, a
/// browser's Origin must be on it. Without one, every Origin is accepted.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(origin) => allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_released_on_drop() {
        let slots = ConnectionSlots::new(2);
        let a = slots.try_acquire().unwrap();
        let _b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert_eq!(slots.open(), 1);
        assert!(slots.try_acquire().is_some());
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://chat.example.com".to_owned()];
        assert!(origin_allowed(None, &allowed));
        assert!(origin_allowed(Some("https://chat.example.com"), &allowed));
        assert!(!origin_allowed(Some("https://evil.example"), &allowed));
        assert!(origin_allowed(Some("https://anything"), &[]));
    }
}
