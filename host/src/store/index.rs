//! The in-memory index of complete replicas: key → replica, content digest
//! → keys, replica path → key, and the byte total that drives eviction.
//!
//! Replicas of the same content stored as one file (hard links, see
//! `commit`) count their bytes once: the total counts each (digest, file)
//! once, whatever number of keys share it, and eviction frees those bytes
//! only with the last of them.
//!
//! The hit path takes the read lock just long enough to clone an `Arc`;
//! hit counting is an atomic on the replica itself, and the LRU bump an
//! O(1) move in the recency list ([`super::evict`]) under its own short
//! lock, never held together with the maps' lock on the hit path. Writers (commit, refresh, remove, eviction)
//! are already serialised by the store's commit lock and hold the write
//! lock only for map updates, never for file I/O.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::evict::Recency;
use super::{CacheKey, DigestWatch, Replica, StoreStats};

/// A SHA-256 digest.
pub(crate) type Digest = [u8; 32];

/// One piece of content on disk: its digest and its file (device, inode).
type Content = (Digest, (u64, u64));

#[derive(Debug, Default)]
struct Maps {
    /// Hashed with foldhash, seeded at random per index: every request
    /// looks its key up here, where SipHash cost as much as the lookup
    /// around it; keys name clients' URLs, so the seed keeps clients from
    /// aiming collisions.
    by_key: HashMap<CacheKey, Arc<Replica>, foldhash::fast::RandomState>,
    by_digest: HashMap<Digest, Vec<CacheKey>>,
    /// Relative replica path (as in the metadata) → the key stored there.
    by_path: HashMap<String, CacheKey>,
    /// Content shared by several keys (one file, several links) → how many
    /// indexed keys are linked to it.
    by_content: HashMap<Content, u32>,
    bytes: u64,
}

/// The content `replica` shares with others, when the store knows its file.
fn content_of(replica: &Replica) -> Option<Content> {
    if !replica.meta.in_tree() {
        return None;
    }
    Some((parse_digest(&replica.meta.sha256)?, replica.file_id?))
}

/// The index.
#[derive(Debug, Default)]
pub(crate) struct Index {
    maps: RwLock<Maps>,
    /// LRU order of the keys in `maps`.
    pub(super) recency: Recency,
    /// Told when a digest comes or goes (the fleet's digest index).
    pub(super) watch: OnceLock<Arc<dyn DigestWatch>>,
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

    /// The replica of `key`, optionally counting a hit and bumping its LRU
    /// position.
    pub(crate) fn get(&self, key: &CacheKey, touch: bool) -> Option<Arc<Replica>> {
        let replica = self.read().by_key.get(key).cloned()?;
        if touch {
            replica.hits.fetch_add(1, Ordering::Relaxed);
            self.recency.hit(key, &replica.promoted_ms);
        }
        Some(replica)
    }

    /// Some replica with this content digest.
    pub(crate) fn by_digest(&self, digest: &Digest) -> Option<Arc<Replica>> {
        let maps = self.read();
        let key = maps.by_digest.get(digest)?.first()?;
        maps.by_key.get(key).cloned()
    }

    /// Every replica with this content digest.
    pub(crate) fn all_by_digest(&self, digest: &Digest) -> Vec<Arc<Replica>> {
        let maps = self.read();
        maps.by_digest.get(digest).map_or_else(Vec::new, |keys| {
            keys.iter()
                .filter_map(|k| maps.by_key.get(k).cloned())
                .collect()
        })
    }

    /// The key whose replica is at `path` (relative), if any.
    pub(crate) fn owner_of(&self, path: &str) -> Option<CacheKey> {
        self.read().by_path.get(path).cloned()
    }

    /// Adds (or replaces) the replica of `key`; returns the one it replaced.
    /// A key new to the LRU order comes in as the most recently used; one
    /// that has a place (a refresh, a move, a restored replica) keeps it.
    pub(crate) fn insert(&self, key: CacheKey, replica: Arc<Replica>) -> Option<Arc<Replica>> {
        self.recency.add(&key);
        let mut maps = self.write();
        let old = remove_locked(&mut maps, &key, self.watch.get());
        let first_link = match content_of(&replica) {
            Some(content) => {
                let links = maps.by_content.entry(content).or_default();
                *links += 1;
                *links == 1
            }
            None => true,
        };
        if first_link {
            maps.bytes = maps.bytes.saturating_add(replica.meta.length);
        }
        // Only files in the tree have a path there, and only they are the
        // content a digest names (a 404 page is not the file it stands for).
        if replica.meta.in_tree() {
            if let Some(digest) = parse_digest(&replica.meta.sha256) {
                maps.by_digest.entry(digest).or_default().push(key.clone());
                if let Some(w) = self.watch.get() {
                    w.held(&digest, &key, replica.meta.length);
                }
            }
            maps.by_path
                .insert(replica.meta.replica.clone(), key.clone());
        }
        maps.by_key.insert(key, replica);
        old
    }

    /// Takes `key` out of service while it is replaced or moved; returns
    /// its replica. The key keeps its LRU place: [`Index::forget`] is for a
    /// key removed for good.
    pub(crate) fn remove(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        remove_locked(&mut self.write(), key, self.watch.get())
    }

    /// Removes `key` and its LRU place; returns its replica.
    pub(crate) fn forget(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        let old = self.remove(key);
        self.recency.forget(key);
        old
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
        let mut excess = maps.bytes - target;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        // Links of shared content not chosen yet: its bytes go with the last.
        let mut links_left: HashMap<Content, u32> = HashMap::new();
        // Lock order: the maps, then the recency list (the hit path never
        // holds both).
        self.recency.walk_lru(|key| {
            match maps.by_key.get(key) {
                Some(_) if key == keep => {}
                Some(replica) => {
                    out.push(key.clone());
                    let frees = match content_of(replica) {
                        Some(content) => {
                            let left = links_left.entry(content).or_insert_with(|| {
                                maps.by_content.get(&content).copied().unwrap_or(1)
                            });
                            *left = left.saturating_sub(1);
                            *left == 0
                        }
                        None => true,
                    };
                    if frees {
                        excess = excess.saturating_sub(replica.meta.length);
                    }
                }
                // Eviction runs under the store's tree lock, so no replica
                // is out of service for a replacement now: a key without
                // one was left by a failed commit or move.
                None => stale.push(key.clone()),
            }
            excess > 0
        });
        drop(maps);
        for key in &stale {
            self.recency.forget(key);
        }
        out
    }
}

fn remove_locked(
    maps: &mut Maps,
    key: &CacheKey,
    watch: Option<&Arc<dyn DigestWatch>>,
) -> Option<Arc<Replica>> {
    let old = maps.by_key.remove(key)?;
    let last_link = match content_of(&old) {
        Some(content) => match maps.by_content.get_mut(&content) {
            Some(links) if *links > 1 => {
                *links -= 1;
                false
            }
            _ => {
                maps.by_content.remove(&content);
                true
            }
        },
        None => true,
    };
    if last_link {
        maps.bytes = maps.bytes.saturating_sub(old.meta.length);
    }
    if !old.meta.in_tree() {
        return Some(old);
    }
    if let Some(digest) = parse_digest(&old.meta.sha256)
        && let Some(keys) = maps.by_digest.get_mut(&digest)
    {
        keys.retain(|k| k != key);
        if keys.is_empty() {
            maps.by_digest.remove(&digest);
            if let Some(w) = watch {
                w.dropped(&digest);
            }
        }
    }
    if maps.by_path.get(&old.meta.replica) == Some(key) {
        maps.by_path.remove(&old.meta.replica);
    }
    Some(old)
}
