//! Who may open a WebSocket at all, decided before the upgrade (protocol section 8): the
//! connection cap (`limits.max_connections`, HTTP 503), the caps on connections that have not
//! authenticated yet (`limits.max_unauthenticated`, `limits.max_unauthenticated_per_ip`, HTTP
//! 503) and the Origin allow-list (HTTP 403).
//!
//! The unauthenticated caps exist because a socket that never sends a token costs memory and
//! reads from its first byte while it proves nothing; an authenticated one is bounded per user.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connection setups handed to a registry shard and not yet taken up by it: what
/// `limits.max_registry_backlog` caps. Admission decides on this count, not on the metric it
/// mirrors (`agentwire_registry_backlog`), so no scrape-facing value steers a decision.
pub struct SetupBacklog {
    waiting: AtomicUsize,
    gauge: prometheus::IntGauge,
}

/// One setup message on its way to a registry shard: it travels in the message, so the shard
/// taking the message up (or dropping it) ends the wait, whatever happens to the session.
pub struct SetupTicket(Arc<SetupBacklog>);

impl SetupBacklog {
    pub fn new(gauge: prometheus::IntGauge) -> Arc<SetupBacklog> {
        Arc::new(SetupBacklog { waiting: AtomicUsize::new(0), gauge })
    }

    pub fn enter(self: &Arc<Self>) -> SetupTicket {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
        SetupTicket(Arc::clone(self))
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

impl Drop for SetupTicket {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// Counts connections that have not authenticated, server-wide and per IP address.
pub struct UnauthenticatedSlots {
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    open: AtomicUsize,
    max: usize,
    max_per_ip: usize,
}

/// Why an unauthenticated connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum UnauthenticatedRefusal {
    ServerWide,
    PerIp,
}

/// One unauthenticated connection's place; given back when it authenticates or ends.
pub struct UnauthenticatedSlot {
    slots: Arc<UnauthenticatedSlots>,
    ip: IpAddr,
}

impl UnauthenticatedSlots {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<UnauthenticatedSlots> {
        Arc::new(UnauthenticatedSlots {
            by_ip: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            max,
            max_per_ip,
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<UnauthenticatedSlot, UnauthenticatedRefusal> {
        // A poisoned lock only means another thread panicked mid-update of a plain counter map.
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if self.open.load(Ordering::Acquire) >= self.max {
            return Err(UnauthenticatedRefusal::ServerWide);
        }
        let count = by_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return Err(UnauthenticatedRefusal::PerIp);
        }
        *count += 1;
        self.open.fetch_add(1, Ordering::AcqRel);
        Ok(UnauthenticatedSlot { slots: Arc::clone(self), ip })
    }
}

impl Drop for UnauthenticatedSlot {
    fn drop(&mut self) {
        let mut by_ip = self.slots.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
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
        assert_eq!(slots.open.load(Ordering::Acquire), 1);
        assert!(slots.try_acquire().is_some());
    }

    #[test]
    fn unauthenticated_slots_are_capped_per_ip_and_overall() {
        let slots = UnauthenticatedSlots::new(3, 2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let a1 = slots.try_acquire(a).unwrap();
        let _a2 = slots.try_acquire(a).unwrap();
        assert_eq!(slots.try_acquire(a).err(), Some(UnauthenticatedRefusal::PerIp));
        let _b1 = slots.try_acquire(b).unwrap();
        assert_eq!(slots.try_acquire(c).err(), Some(UnauthenticatedRefusal::ServerWide));
        drop(a1);
        assert_eq!(slots.open.load(Ordering::Acquire), 2);
        assert!(slots.try_acquire(c).is_ok());
        assert!(slots.by_ip.lock().unwrap().get(&c).is_none(), "an IP with no connection is forgotten");
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
