//! Giving memory back to the operating system after a crowd of sessions has gone.
//!
//! glibc's allocator keeps freed memory in its per-thread arenas: after 19,000 sessions close,
//! the process would keep their peak footprint for good, although nothing of them is left.
//! `malloc_trim` returns the free pages of every arena. It costs a pass over the heap, so it runs
//! only after the connection count has fallen well below its last peak, on a thread of its own.
//! The same holds for a burst of large events: ten verbose agent runs streaming 90 MB each left
//! 86 MB resident after they ended, 43 MB after a trim (BENCHMARKS.md, "a verbose agent"); so
//! once at least [`RELAYED_TRIM`] bytes of events were relayed since the last trim and no run is
//! in progress, the next tick trims.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, info};

/// Below this many connections closed since the peak, a trim at once is not worth its pass.
const MIN_DROP: usize = 1000;
/// What a quiet period (see [`Trimmer::tick`]) still trims after.
const SETTLED_DROP: usize = 100;
/// Bytes of events relayed since the last trim that make an idle tick trim.
pub const RELAYED_TRIM: usize = 64 << 20;

/// Watches the connection count (told of every change, so no peak is missed between samples)
/// and trims once it has fallen to half of its peak or less.
pub struct Trimmer {
    peak: usize,
    /// Bytes of events relayed since the last trim.
    relayed: usize,
    running: Arc<AtomicBool>,
}

impl Trimmer {
    pub fn new() -> Trimmer {
        Trimmer { peak: 0, relayed: 0, running: Arc::new(AtomicBool::new(false)) }
    }

    /// Called with the current number of connections from time to time.
    pub fn observe(&mut self, connections: usize) {
        self.peak = self.peak.max(connections);
        if self.peak - connections >= MIN_DROP.max(self.peak / 2) {
            self.trim(connections);
        }
    }

    /// Events of `bytes` were relayed (a run's steps, published events).
    pub fn relayed(&mut self, bytes: usize) {
        self.relayed = self.relayed.saturating_add(bytes);
    }

    /// Called every few seconds: the tail of a crowd that left (fewer than [`MIN_DROP`] since the
    /// last trim) is given back too, and so is what the caller just freed (`freed`: tables it
    /// shrank), and what a burst of large events left once no run is in progress (`idle`).
    pub fn tick(&mut self, connections: usize, freed: bool, idle: bool) {
        let after_burst = idle && self.relayed >= RELAYED_TRIM;
        if freed || after_burst || self.peak >= connections + SETTLED_DROP {
            self.trim(connections);
        }
    }

    fn trim(&mut self, connections: usize) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (peak, running) = (self.peak, Arc::clone(&self.running));
        self.peak = connections;
        self.relayed = 0;
        let spawned = std::thread::Builder::new().name("agentwire-trim".into()).spawn(move || {
            let started = std::time::Instant::now();
            let released = trim();
            info!("memory: {peak} -> {connections} connections; returned free heap to the OS ({released}) in {:?}", started.elapsed());
            running.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            debug!("memory: could not start the trim thread");
            self.running.store(false, Ordering::Release);
        }
    }
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer::new()
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> &'static str {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes its own locks.
    if unsafe { libc::malloc_trim(0) } == 1 {
        "some"
    } else {
        "none"
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> &'static str {
    "not needed on this allocator"
}
