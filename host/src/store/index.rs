//! The in-memory index of complete replicas: key → replica, content digest
//! → keys, replica path → key, and the byte total that drives eviction.
//!
//! The hit path takes the read lock just long enough to clone an `Arc`;
//! hit counting and the LRU bump are atomics on the replica itself, so hits
//! never wait for each other. Writers (commit, refresh, remove, eviction)
//! are already serialised by the store's commit lock and hold the write
//! lock only for map updates, never for file I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::{CacheKey, Replica, StoreStats};

/// A SHA-256 digest.
pub(crate) type Digest = [u8; 32];

#[derive(Debug, Default)]
struct Maps {
    by_key: HashMap<CacheKey, Arc<Replica>>,
    by_digest: HashMap<Digest, Vec<CacheKey>>,
    /// Relative replica path (as in the metadata) → the key stored there.
    by_path: HashMap<String, CacheKey>,
    bytes: u64,
}

/// The index.
#[derive(Debug)]
pub(crate) struct Index {
    maps: RwLock<Maps>,
    opened: Instant,
    /// Added to the wall time since `opened`; tests move time forward with
    /// it instead of sleeping.
    offset_ms: AtomicU64,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            maps: RwLock::default(),
            opened: Instant::now(),
            offset_ms: AtomicU64::new(0),
        }
    }
}

/// Parses a lower-case (or upper-case) hex SHA-256.
pub(crate) fn parse_digest(text: &str) -> Option<Digest> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

impl Index {
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        // The maps are updated in small steps that keep them consistent, so
        // a panic elsewhere while holding the lock leaves usable data.
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the store opened (the LRU clock).
    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        elapsed.saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves the LRU clock forward (tests).
    #[cfg(test)]
    pub(crate) fn advance_ms(&self, ms: u64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The replica of `key`, optionally counting a hit and bumping its LRU
    /// position.
    pub(crate) fn get(&self, key: &CacheKey, touch: bool) -> Option<Arc<Replica>> {
        let replica = self.read().by_key.get(key).cloned()?;
        if touch {
            replica.hits.fetch_add(1, Ordering::Relaxed);
            replica
                .last_access
                .fetch_max(self.now_ms(), Ordering::Relaxed);
        }
        Some(replica)
    }

    /// Some replica with this content digest.
    pub(crate) fn by_digest(&self, digest: &Digest) -> Option<Arc<Replica>> {
        let maps = self.read();
        let key = maps.by_digest.get(digest)?.first()?;
        maps.by_key.get(key).cloned()
    }

    /// The key whose replica is at `path` (relative), if any.
    pub(crate) fn owner_of(&self, path: &str) -> Option<CacheKey> {
        self.read().by_path.get(path).cloned()
    }

    /// Adds (or replaces) the replica of `key`; returns the one it replaced.
    pub(crate) fn insert(&self, key: CacheKey, replica: Arc<Replica>) -> Option<Arc<Replica>> {
        let mut maps = self.write();
        let old = remove_locked(&mut maps, &key);
        maps.bytes = maps.bytes.saturating_add(replica.meta.length);
        if let Some(digest) = parse_digest(&replica.meta.sha256) {
            maps.by_digest.entry(digest).or_default().push(key.clone());
        }
        maps.by_path
            .insert(replica.meta.replica.clone(), key.clone());
        maps.by_key.insert(key, replica);
        old
    }

    /// Removes `key`; returns its replica.
    pub(crate) fn remove(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        remove_locked(&mut self.write(), key)
    }

    /// Files and bytes.
    pub(crate) fn stats(&self) -> StoreStats {
        let maps = self.read();
        StoreStats {
            files: maps.by_key.len() as u64,
            bytes: maps.bytes,
        }
    }

    /// All replicas.
    pub(crate) fn entries(&self) -> Vec<Arc<Replica>> {
        self.read().by_key.values().cloned().collect()
    }

    /// Keys to evict, least recently used first, so that the total drops to
    /// `target` bytes; `keep` is never chosen.
    pub(crate) fn eviction_candidates(&self, target: u64, keep: &CacheKey) -> Vec<CacheKey> {
        let maps = self.read();
        if maps.bytes <= target {
            return Vec::new();
        }
        let mut all: Vec<(u64, &CacheKey, u64)> = maps
            .by_key
            .iter()
            .filter(|(k, _)| *k != keep)
            .map(|(k, r)| (r.last_access.load(Ordering::Relaxed), k, r.meta.length))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let mut excess = maps.bytes - target;
        let mut out = Vec::new();
        for (_, key, length) in all {
            if excess == 0 {
                break;
            }
            out.push(key.clone());
            excess = excess.saturating_sub(length);
        }
        out
    }
}

fn remove_locked(maps: &mut Maps, key: &CacheKey) -> Option<Arc<Replica>> {
    let old = maps.by_key.remove(key)?;
    maps.bytes = maps.bytes.saturating_sub(old.meta.length);
    if let Some(digest) = parse_digest(&old.meta.sha256)
        && let Some(keys) = maps.by_digest.get_mut(&digest)
    {
        keys.retain(|k| k != key);
        if keys.is_empty() {
            maps.by_digest.remove(&digest);
        }
    }
    if maps.by_path.get(&old.meta.replica) == Some(key) {
        maps.by_path.remove(&old.meta.replica);
    }
    Some(old)
}
