//! Giving back a hash map's memory after a crowd has left (the registry's tables and the
//! in-memory broker's, `memory.rs` then returns the freed heap to the system).

use std::collections::HashMap;

/// Gives back a map's table once it is four times larger than what it holds.
pub fn shrink_if_oversized<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) -> bool {
    let oversized = map.capacity() > 4 * map.len().max(256);
    if oversized {
        map.shrink_to_fit();
    }
    oversized
}
