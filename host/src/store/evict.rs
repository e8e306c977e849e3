//! LRU eviction: once a commit takes the store past `max-size`, the least
//! recently used replicas go until the total is below 90 % of it.

use super::{CacheKey, ReplicaStore};

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
                    self.unlink_replica(&replica.meta.replica);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(key = %key, error = %e, "eviction failed"),
            }
        }
    }
}
