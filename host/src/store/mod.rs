//! The replica store: the browsable tree, the metadata kept beside it (out
//! of the tree), partial files, the in-memory index and LRU eviction.
//!
//! This file is the [`ReplicaStore`] facade (open, lookup, reading,
//! refresh, remove) and the small file helpers its parts share; the parts
//! are `commit` (atomic commit of a fill), `aside` (responses other than
//! 200, kept in the state directory), `partial` (partial files),
//! `recovery` (rebuilding the index at open, quarantine), `evict` (LRU
//! eviction), `index` (the in-memory maps), `key` and [`path`] (URL → key →
//! replica path).
//!
//! # On disk
//! - `root/`: only mirrored files, at the [`ReplicaPath`] of their key
//!   (`root/host:port/path`, or `root/name` in the flat layout). The only
//!   other names that ever appear there are short-lived hidden
//!   `.cistern-*.tmp` files while a replica is copied across filesystems or
//!   moved to make room for a directory; they are journalled in the state
//!   directory and removed on the next [`ReplicaStore::open`] if a crash
//!   left them behind.
//! - `state/objects/ab/<sha256(key)>.json`: one [`ObjectMeta`] per complete
//!   replica, in Cistern's own versioned format ([`meta::format`]). A
//!   metadata file vouches for the bytes at its `replica` path, as long as
//!   the file keeps the size and modification time recorded at commit.
//! - `state/objects/ab/<sha256(key)>.body`: the body of a response kept
//!   aside (any stored status but 200: a redirect, a 404), which never
//!   becomes a file in the tree (see `aside`).
//! - `state/quarantine/`: metadata that could not be read, moved aside on
//!   open (never deleted; counted in [`StoreHealth`]).
//! - `state/objects/ab/<sha256(key)>.json.new`: the metadata of a commit in
//!   progress (see below).
//! - `state/partial/<sha256(key)>.part` and `.json`: a fill in progress or
//!   interrupted, with the validators needed to resume it.
//! - `state/journal/`: the root's temporary files in use, for cleanup.
//! - Replicas with the same SHA-256 and length are hard links of one file
//!   where the filesystem allows (see `commit`); the index counts their
//!   bytes once.
//!
//! # Commit, and why a crash never leaves a wrong replica
//! 1. The partial's data is synced and its length checked against the
//!    metadata.
//! 2. The target path is prepared (directories created, file/directory
//!    collisions resolved as documented in [`path`]), and every index entry
//!    that describes bytes about to be replaced (the key's old version,
//!    another key mapped to the same path) is taken out of service.
//! 3. The new metadata is written, synced, as `<hash>.json.new`; the old
//!    `<hash>.json` is removed, so no metadata vouches for the old bytes
//!    once they may be replaced.
//! 4. The partial is renamed into the tree (or, across filesystems, copied
//!    into a hidden temporary file in the target directory, synced, renamed
//!    into place, and the partial removed); the directory is synced.
//! 5. `.json.new` is renamed to `.json`, the partial's `.json` removed.
//!
//! On [`ReplicaStore::open`], a `.json.new` whose `.part` still exists was
//! interrupted before step 4 and is dropped (the partial stays resumable);
//! without its `.part` the bytes are in place and it is promoted. Every
//! metadata file whose replica is missing, has another length or another
//! modification time is dropped; one of an older version is rewritten in
//! the current one; one that cannot be read is quarantined.
//!
//! # Reading a replica
//! [`ReplicaStore::lookup`] returns what the index says now; a commit may
//! replace the file a moment later. [`ReplicaStore::open_replica`] opens the
//! file and then checks that the index still describes those bytes, so a
//! reader never pairs one version's metadata with another's body.
//!
//! # Concurrency
//! The fetch engine guarantees at most one writer per key. Methods that
//! touch the disk block: call them through `spawn_blocking`. Changes to the
//! tree (commit, refresh, remove, eviction) are serialised by one lock,
//! which a commit across filesystems holds while it copies.
//! [`ReplicaStore::lookup`] touches only memory and is what the hit path
//! uses.

pub mod meta;
pub mod path;
pub mod ram;
pub mod room;
pub mod verify;

mod aside;
mod commit;
mod evict;
mod index;
mod key;
mod partial;
mod recovery;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use key::{CacheKey, KeyBase};
pub use meta::{FileStamp, META_VERSION, ObjectMeta, PartialMeta};
pub use partial::PartialFile;
pub use path::{PathError, ReplicaPath};
pub use recovery::QUARANTINE;

/// Told when the store comes to hold content with a digest it did not
/// hold (`held`, again when the key it lists changes) and when it holds
/// none left (`dropped`): the fleet's digest index follows the store this
/// way (see `crate::shared`). Called with the index's lock held, by the
/// writer that changed it: must neither block nor call the store.
pub trait DigestWatch: Send + Sync + std::fmt::Debug {
    /// The store holds `digest`'s content under `key`, `size` bytes.
    fn held(&self, digest: &[u8; 32], key: &CacheKey, size: u64);
    /// The store no longer holds `digest`'s content under any key.
    fn dropped(&self, digest: &[u8; 32]);
}

use crate::clock::Clock;
use crate::config::{Layout, StoreConfig};

/// Errors of the replica store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key cannot be mapped to a safe path under the root.
    #[error("no safe replica path for {key}: {source}")]
    Path {
        /// The key that was refused.
        key: String,
        /// Why.
        source: PathError,
    },
    /// A filesystem operation failed (full disk, permissions, …).
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing ("write metadata", "rename into replica", …).
        op: &'static str,
        /// The path it was working on.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A replica's metadata could not be encoded or decoded.
    #[error("metadata {path}: {source}")]
    Object {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong with it.
        source: meta::MetaError,
    },
    /// A partial's metadata could not be encoded or decoded.
    #[error("metadata {path}: {source}")]
    Meta {
        /// The metadata file.
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
    },
    /// The partial file does not hold as many bytes as the metadata says;
    /// committing it would keep a wrong replica.
    #[error("partial of {key} holds {actual} bytes, metadata says {expected}")]
    Length {
        /// The key being committed.
        key: String,
        /// `ObjectMeta::length`.
        expected: u64,
        /// Bytes in the partial file.
        actual: u64,
    },
    /// The metadata handed to the store is unusable (e.g. `sha256` is not
    /// 64 hex digits).
    #[error("metadata of {key}: {reason}")]
    BadMeta {
        /// The key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The filesystem has no room for the body beside `min-free`; the
    /// response is served without being stored.
    #[error("no room to store {key} in {path}: {room}")]
    NoRoom {
        /// The key not stored.
        key: String,
        /// The state directory where partials are written.
        path: PathBuf,
        /// What there is and what was needed.
        room: room::NoRoom,
    },
    /// The disk ran full in the middle of a body; the partial file was
    /// removed to give the space back.
    #[error(
        "disk full writing {path} after {written} bytes; partial removed, bodies of unknown length pass through unstored for {}s",
        room::FULL_PAUSE.as_secs()
    )]
    DiskFull {
        /// The partial file.
        path: PathBuf,
        /// Bytes written before the disk ran full.
        written: u64,
    },
    /// The key has no complete replica (refresh of an evicted entry).
    #[error("no replica of {key}")]
    Missing {
        /// The key.
        key: String,
    },
    /// The state directory is inside the root or the other way round, so
    /// metadata would show up in the browsable tree (or URLs could reach it).
    #[error("state directory {state} and replica root {root} overlap")]
    Overlap {
        /// The replica root.
        root: PathBuf,
        /// The state directory.
        state: PathBuf,
    },
}

/// A complete replica in the index.
#[derive(Debug)]
pub struct Replica {
    /// Its metadata, as on disk.
    pub meta: Arc<ObjectMeta>,
    /// Absolute path of the replica file.
    pub path: PathBuf,
    /// Times served from the replica (for the admin UI).
    pub hits: AtomicU64,
    /// When a hit last moved it to the front of the LRU order, in ms on
    /// the order's own clock; `u64::MAX` before the first hit.
    promoted_ms: AtomicU64,
    /// The response headers built from `meta` the first time the replica
    /// is served, so a hit does not parse stored headers again.
    pub served_headers: std::sync::OnceLock<http::HeaderMap>,
    /// The body in RAM, for small replicas once served (see [`ram`]).
    pub ram: std::sync::OnceLock<ram::RamBody>,
    /// When `meta`'s HTTP freshness runs out, worked out at the first hit
    /// that found it fresh, so later hits compare two times instead of
    /// reading the stored `Cache-Control` again (see
    /// `cache::evaluate_fast`).
    pub fresh_until: std::sync::OnceLock<std::time::SystemTime>,
    /// Served headers that depend on more than the replica (a mirror set's
    /// Metalink links, which follow its health), with the stamp of the
    /// state they were built for; rebuilt when the stamp moves.
    pub links: arc_swap::ArcSwapOption<StampedHeaders>,
    /// The file's (device, inode) when the store knows it: replicas of the
    /// same digest on the same file are hard links of one copy, whose bytes
    /// count once (see `index`).
    pub file_id: Option<(u64, u64)>,
}

/// Header values built for one state of something outside the replica.
#[derive(Debug)]
pub struct StampedHeaders {
    /// Which state they describe (the owner's choice of number).
    pub stamp: u64,
    /// The values, each with its header name.
    pub values: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Replica {
    /// Number of hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn new(meta: ObjectMeta, path: PathBuf, hits: u64) -> Replica {
        Replica {
            meta: Arc::new(meta),
            path,
            hits: AtomicU64::new(hits),
            promoted_ms: AtomicU64::new(u64::MAX),
            served_headers: std::sync::OnceLock::new(),
            ram: std::sync::OnceLock::new(),
            fresh_until: std::sync::OnceLock::new(),
            links: arc_swap::ArcSwapOption::empty(),
            file_id: None,
        }
    }

    /// The same replica, on the file with this `stat`.
    fn on_file(mut self, stat: &fs::Metadata) -> Replica {
        use std::os::unix::fs::MetadataExt as _;
        self.file_id = Some((stat.dev(), stat.ino()));
        self
    }
}

/// Totals for the admin UI and eviction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Complete replicas in the index.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// The replica store.
#[derive(Debug)]
pub struct ReplicaStore {
    root: PathBuf,
    state: PathBuf,
    layout: Layout,
    max_size: Option<u64>,
    room: room::Room,
    index: index::Index,
    /// RAM left for copies of small replicas.
    ram: Arc<ram::RamBudget>,
    /// Serialises changes to the tree and to other keys' metadata (commit,
    /// refresh, remove, eviction); lookups never take it.
    tree: Mutex<()>,
    /// What was found wrong on disk.
    health: HealthCounters,
    /// The keys with a partial on disk.
    partials: partial::PartialKeys,
}

/// Whether a file's `stat` matches what `meta` recorded at commit: same
/// length and, when recorded, same modification time.
fn describes(meta: &ObjectMeta, stat: &fs::Metadata) -> bool {
    stat.len() == meta.length && meta.file.is_none_or(|s| s == FileStamp::of(stat))
}

/// Builds the `map_err` closure for an I/O step.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a file; a file that is already gone is fine.
fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename or a new entry in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Writes `bytes` to `path` and syncs them.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path).map_err(io_err("create metadata", path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write metadata", path))
}

/// Encodes metadata as pretty JSON (people read these files when in doubt).
fn encode<T: serde::Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec_pretty(value).map_err(|source| StoreError::Meta {
        path: path.to_path_buf(),
        source,
    })
}

/// Encodes a replica's metadata in the current on-disk version.
fn encode_object(meta: &ObjectMeta, path: &Path) -> Result<Vec<u8>, StoreError> {
    meta::encode_object(meta).map_err(|source| StoreError::Object {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a replica's metadata to `path` atomically.
fn write_object_atomic(path: &Path, meta: &ObjectMeta) -> Result<(), StoreError> {
    write_bytes_atomic(path, &encode_object(meta, path)?)
}

/// Writes JSON to `path` atomically: a synced `.tmp` renamed over it.
fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    write_bytes_atomic(path, &encode(value, path)?)
}

/// Writes `bytes` to `path` atomically: a synced `.tmp` renamed over it.
fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = with_suffix(path, ".tmp");
    write_synced(&tmp, bytes).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StoreError::Io {
            op: "rename metadata",
            path: path.to_path_buf(),
            source: e,
        }
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(io_err("read metadata", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Meta {
        path: path.to_path_buf(),
        source,
    })
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl ReplicaStore {
    /// Opens (creating) the root and state directories and rebuilds the index
    /// from the metadata on disk: complete entries whose replica file exists
    /// with the recorded length and modification time are indexed (older
    /// metadata versions rewritten in the current one); dangling metadata is
    /// removed, unreadable metadata quarantined; partial files with their `.json` are kept for resume, others removed.
    pub fn open(config: &StoreConfig) -> Result<ReplicaStore, StoreError> {
        ReplicaStore::open_with_clock(config, Clock::default())
    }

    /// [`ReplicaStore::open`] with the clock that times the store's pauses
    /// (the one after a full disk); tests pass a manual one.
    pub fn open_with_clock(config: &StoreConfig, clock: Clock) -> Result<ReplicaStore, StoreError> {
        fs::create_dir_all(&config.root).map_err(io_err("create replica root", &config.root))?;
        fs::create_dir_all(&config.state)
            .map_err(io_err("create state directory", &config.state))?;
        let root =
            fs::canonicalize(&config.root).map_err(io_err("resolve replica root", &config.root))?;
        let state = fs::canonicalize(&config.state)
            .map_err(io_err("resolve state directory", &config.state))?;
        if root.starts_with(&state) || state.starts_with(&root) {
            return Err(StoreError::Overlap { root, state });
        }
        for dir in ["objects", "partial", "journal"] {
            let dir = state.join(dir);
            fs::create_dir_all(&dir).map_err(io_err("create state directory", &dir))?;
        }
        let store = ReplicaStore {
            root,
            state,
            layout: config.layout,
            max_size: config.max_size,
            room: room::Room::new(config.min_free, clock),
            index: index::Index::default(),
            ram: ram::RamBudget::new(ram::RAM_BUDGET),
            tree: Mutex::new(()),
            health: HealthCounters::default(),
            partials: partial::PartialKeys::default(),
        };
        store.replay_journal()?;
        // Interrupted commits are settled by whether their `.part` still
        // exists, so before strays are cleaned out of the partials.
        store.settle_pendings()?;
        store.clean_partials()?;
        store.load_objects()?;
        store.sweep_bodies()?;
        Ok(store)
    }

    /// The replica root.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The complete replica of `key`, if any; counts a hit and refreshes its
    /// LRU position. Memory only: safe on the async hot path.
    pub fn lookup(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        self.index.get(key, true)
    }

    /// Keeps `body` (the whole content of a small `replica`, just read from
    /// its file) in RAM for later hits, if the budget allows.
    pub fn keep_in_ram(&self, replica: &Replica, body: &bytes::Bytes) {
        if body.len() as u64 == replica.meta.length
            && replica.meta.length <= ram::MAX_RAM_OBJECT
            && replica.ram.get().is_none()
            && let Some(copy) = ram::RamBody::new(body.clone(), &self.ram)
        {
            // Another request may have set it meanwhile; its copy wins and
            // this one gives its bytes back on drop.
            let _ = replica.ram.set(copy);
        }
    }

    /// Like [`ReplicaStore::lookup`] without counting a hit (admin, policies).
    pub fn peek(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        self.index.get(key, false)
    }

    /// A complete replica whose content has this SHA-256, if any.
    pub fn by_sha256(&self, digest: &[u8; 32]) -> Option<Arc<Replica>> {
        self.index.by_digest(digest)
    }

    /// Opens the file of a replica returned by [`ReplicaStore::lookup`] and
    /// checks that the index still describes these bytes (same path, same
    /// digest, same length); `None` means the replica was replaced, moved or
    /// removed meanwhile: look up again (a miss then fetches it). A file
    /// deleted, changed in size or modified (another modification time than
    /// the commit recorded) behind the store's back is dropped from the index
    /// here, so its recorded digest is never served with other bytes; the
    /// check is the `fstat` of the opened file. Blocking.
    pub fn open_replica(&self, replica: &Replica) -> Result<Option<File>, StoreError> {
        let file = match File::open(&replica.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.drop_if_damaged(replica)?;
                return Ok(None);
            }
            Err(e) => return Err(io_err("open replica", &replica.path)(e)),
        };
        let stat = file
            .metadata()
            .map_err(io_err("stat replica", &replica.path))?;
        if !self.is_current(replica) {
            return Ok(None);
        }
        if !describes(&replica.meta, &stat) {
            self.drop_if_damaged(replica)?;
            return Ok(None);
        }
        Ok(Some(file))
    }

    /// Whether the index still describes `replica`'s bytes at its path.
    fn is_current(&self, replica: &Replica) -> bool {
        let key = CacheKey(replica.meta.key.as_str().into());
        self.index.get(&key, false).is_some_and(|c| {
            c.path == replica.path
                && c.meta.sha256 == replica.meta.sha256
                && c.meta.length == replica.meta.length
        })
    }

    /// Forgets `replica` if, under the tree lock (so not in the middle of a
    /// move), it is still current and its file is missing, has another
    /// length or another modification time: someone changed the tree by hand.
    fn drop_if_damaged(&self, replica: &Replica) -> Result<(), StoreError> {
        let _tree = self.lock_tree();
        if !self.is_current(replica) {
            return Ok(());
        }
        let damaged = match fs::symlink_metadata(&replica.path) {
            Ok(m) => !m.is_file() || !describes(&replica.meta, &m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(io_err("stat replica", &replica.path)(e)),
        };
        if damaged {
            tracing::warn!(path = %replica.path.display(), "replica file deleted or modified outside Cistern; dropping it (it will be fetched again)");
            self.health.changed_outside.fetch_add(1, Ordering::Relaxed);
            self.forget(&CacheKey(replica.meta.key.as_str().into()))?;
        }
        Ok(())
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        self.state
            .join("objects")
            .join(&hash[..2])
            .join(format!("{hash}.json"))
    }

    fn lock_tree(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data of its own, only the order of disk
        // changes, so a panic in another holder leaves nothing to repair.
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops `key` from the index and removes its metadata, leaving its
    /// file (about to be replaced). Returns the dropped replica.
    fn forget(&self, key: &CacheKey) -> Result<Option<Arc<Replica>>, StoreError> {
        let replica = self.index.forget(key);
        let obj = self.object_path(&key.hash_hex());
        remove_file_if_exists(&obj).map_err(io_err("remove metadata", &obj))?;
        Ok(replica)
    }

    /// Removes a replica file and the directories it leaves empty.
    fn unlink_replica(&self, rel: &str) {
        let abs = self.root.join(rel);
        if let Err(e) = remove_file_if_exists(&abs) {
            tracing::warn!(path = %abs.display(), error = %e, "cannot remove replica file");
            return;
        }
        let mut dir = abs.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }

    /// Replaces the metadata of a complete replica (after a 304
    /// revalidation) atomically. Blocking.
    ///
    /// The body did not change, so `key`, `replica`, `length`, `sha256`
    /// and `file` are kept from the current entry whatever `meta` says.
    pub fn refresh(
        &self,
        key: &CacheKey,
        mut meta: ObjectMeta,
    ) -> Result<Arc<Replica>, StoreError> {
        let _tree = self.lock_tree();
        let current = self
            .index
            .get(key, false)
            .ok_or_else(|| StoreError::Missing {
                key: key.as_str().to_owned(),
            })?;
        meta.key.clone_from(&current.meta.key);
        meta.replica.clone_from(&current.meta.replica);
        meta.length = current.meta.length;
        meta.sha256.clone_from(&current.meta.sha256);
        meta.file = current.meta.file;
        write_object_atomic(&self.object_path(&key.hash_hex()), &meta)?;
        let mut replica = Replica::new(meta, current.path.clone(), current.hits());
        replica.file_id = current.file_id;
        let replica = Arc::new(replica);
        self.index.insert(key.clone(), Arc::clone(&replica));
        Ok(replica)
    }

    /// Removes a replica and its metadata (invalidation). Blocking.
    pub fn remove(&self, key: &CacheKey) -> Result<(), StoreError> {
        let _tree = self.lock_tree();
        if let Some(replica) = self.forget(key)? {
            self.discard_bytes(&replica);
        }
        Ok(())
    }

    /// Files and bytes of complete replicas.
    pub fn stats(&self) -> StoreStats {
        self.index.stats()
    }

    /// A snapshot of all complete replicas (admin UI).
    pub fn entries(&self) -> Vec<Arc<Replica>> {
        self.index.entries()
    }

    /// Tells `watch` of every digest change from now on (once per store;
    /// a second watch is ignored). What the store held before is in
    /// [`ReplicaStore::entries`].
    pub fn watch_digests(&self, watch: Arc<dyn DigestWatch>) {
        let _ = self.index.watch.set(watch);
    }

    /// Counters of what the store found wrong on disk.
    pub fn health(&self) -> StoreHealth {
        StoreHealth {
            quarantined: self.health.quarantined.load(Ordering::Relaxed),
            changed_outside: self.health.changed_outside.load(Ordering::Relaxed),
        }
    }
}

/// Counters behind [`ReplicaStore::health`].
#[derive(Debug, Default)]
struct HealthCounters {
    quarantined: AtomicU64,
    changed_outside: AtomicU64,
}

/// What the store found wrong on disk since it opened (`/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Metadata files moved into `state/quarantine/` because they could not
    /// be read.
    pub quarantined: u64,
    /// Replicas dropped because their file was modified outside Cistern
    /// (size or modification time differs from the commit).
    pub changed_outside: u64,
}

#[cfg(test)]
mod tests;
