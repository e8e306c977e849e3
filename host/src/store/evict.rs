//! LRU order and eviction: once a commit takes the store past `max-size`,
//! the least recently used replicas go until the total is below 90 % of it.
//!
//! The order is an [`lru::LruCache`] of keys (a hash map threaded on a
//! linked list), so a hit moves its key to the front in O(1) and eviction
//! walks from the back only as far as it needs, instead of sorting the
//! whole index on every commit over `max-size`. `lru` rather than
//! `hashlink`: it offers exactly this (promote, walk from the LRU end, pop
//! by key) and nothing to misuse, and its `hashbrown` is already in the
//! build.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CacheKey, ReplicaStore};

/// A replica is moved to the front at most this often by its hits (as
/// Varnish's `lru_interval`): a hot object is hit thousands of times a
/// second, and each move takes the order's lock; for eviction, a second
/// of precision is plenty.
const PROMOTE_EVERY: Duration = Duration::from_secs(1);

/// The recency order of indexed keys, least recently used at the back.
///
/// It may briefly hold a key the index does not (a replica taken out of
/// service while a commit or a move replaces it keeps its place, so that a
/// refresh or a move does not make it "recent"); eviction skips such keys.
#[derive(Debug)]
pub(super) struct Recency {
    order: Mutex<lru::LruCache<CacheKey, ()>>,
    /// The origin of the replicas' `promoted_ms` marks.
    epoch: Instant,
}

impl Default for Recency {
    fn default() -> Self {
        Recency {
            order: Mutex::new(lru::LruCache::unbounded()),
            epoch: Instant::now(),
        }
    }
}

impl Recency {
    fn lock(&self) -> MutexGuard<'_, lru::LruCache<CacheKey, ()>> {
        // Each operation leaves the list consistent, so a panic elsewhere
        // while holding the lock leaves usable data.
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves `key` to the front (a new commit); no effect on a key not in
    /// the order.
    pub(super) fn touch(&self, key: &CacheKey) {
        self.lock().promote(key);
    }

    /// A hit on `key`, whose replica keeps its last move in `promoted_ms`:
    /// moves it to the front unless a hit already did within
    /// [`PROMOTE_EVERY`], so most hits take no lock.
    pub(super) fn hit(&self, key: &CacheKey, promoted_ms: &AtomicU64) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = promoted_ms.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < PROMOTE_EVERY.as_millis() as u64 {
            return;
        }
        promoted_ms.store(now, Ordering::Relaxed);
        self.touch(key);
    }

    /// Adds `key` at the front unless it already has a place, which it keeps.
    pub(super) fn add(&self, key: &CacheKey) {
        let mut order = self.lock();
        if !order.contains(key) {
            order.push(key.clone(), ());
        }
    }

    /// Forgets `key` (removed for good).
    pub(super) fn forget(&self, key: &CacheKey) {
        self.lock().pop(key);
    }

    /// Walks keys from the least recently used on, while `take` returns
    /// `true`.
    pub(super) fn walk_lru(&self, mut take: impl FnMut(&CacheKey) -> bool) {
        for (key, ()) in self.lock().iter().rev() {
            if !take(key) {
                break;
            }
        }
    }

    /// Keys from the least recently used to the most (tests).
    #[cfg(test)]
    pub(super) fn lru_first(&self) -> Vec<CacheKey> {
        self.lock().iter().rev().map(|(k, ())| k.clone()).collect()
    }
}

impl ReplicaStore {
    /// Evicts least recently used replicas, never `keep`, until the total
    /// is below 90 % of `max_size`. Failures are logged: the commit that
    /// triggered eviction has succeeded.
    pub(super) fn evict(&self, keep: &CacheKey) {
        let Some(max) = self.max_size else { return };
        if self.index.stats().bytes <= max {
            return;
        }
        let target = max - max / 10;
        for key in self.index.eviction_candidates(target, keep) {
            match self.forget(&key) {
                Ok(Some(replica)) => {
                    tracing::debug!(key = %key, bytes = replica.meta.length, "evicted");
                    self.discard_bytes(&replica);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(key = %key, error = %e, "eviction failed"),
            }
        }
    }
}
