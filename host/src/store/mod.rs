//! The replica store: the browsable tree, the metadata kept beside it (out
//! of the tree), partial files, the in-memory index and LRU eviction.
//!
//! # On disk
//! - `root/`: only mirrored files, at the [`ReplicaPath`] of their key
//!   (`root/host:port/path`, or `root/name` in the flat layout).
//! - `state/objects/ab/<sha256(key)>.json`: one [`ObjectMeta`] per complete
//!   replica. Written before the replica is renamed into place, so a replica
//!   file never exists without its metadata.
//! - `state/partial/<sha256(key)>.part` and `.json`: a fill in progress or
//!   interrupted, with the validators needed to resume it.
//!
//! # Concurrency
//! The fetch engine guarantees at most one writer per key. Methods that
//! touch the disk block: call them through `spawn_blocking`. [`ReplicaStore::lookup`]
//! touches only memory and is what the hit path uses.

pub mod meta;
pub mod path;

mod index;

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use meta::{ObjectMeta, PartialMeta};
pub use path::{PathError, ReplicaPath};

use crate::config::{Layout, StoreConfig};

/// Identifies one cached object: a normalized absolute URL
/// (`scheme://host:port/path?query`), possibly chosen by a policy so that
/// many mirror URLs share one replica (store-id).
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct CacheKey(Arc<str>);

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
    /// A metadata file could not be encoded or decoded.
    #[error("metadata {path}: {source}")]
    Meta {
        /// The metadata file.
        path: PathBuf,
        /// The serde error.
        source: serde_json::Error,
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
    /// Last access, in milliseconds since the store opened (LRU order).
    pub last_access: AtomicU64,
}

impl Replica {
    /// Number of hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// A partial file being written by the one fill of its key. Readers
/// (followers) share the same open file and read it with positioned reads,
/// so the file may be renamed into the replica while they still read it.
#[derive(Debug)]
pub struct PartialFile {
    /// The key being filled.
    pub key: CacheKey,
    /// The open file, read + write. Writers append with positioned writes at
    /// [`PartialFile::len`]; readers use `FileExt::read_at`.
    pub file: Arc<File>,
    /// Bytes already in the file (non-zero when resuming).
    pub len: u64,
    /// Path of the `.part` file.
    pub path: PathBuf,
    /// What was recorded about the fill.
    pub meta: PartialMeta,
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
    index: index::Index,
}

impl CacheKey {
    /// Builds the key for an absolute URL: lower-case scheme and host, the
    /// port always explicit, dot segments removed, the query kept.
    pub fn from_uri(uri: &http::Uri) -> Result<CacheKey, PathError> {
        let _ = uri;
        todo!()
    }

    /// Parses a key given as text (a policy's store-id); it must be an
    /// absolute http(s) URL.
    pub fn parse(text: &str) -> Result<CacheKey, PathError> {
        let _ = text;
        todo!()
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ReplicaStore {
    /// Opens (creating) the root and state directories and rebuilds the index
    /// from the metadata on disk: complete entries whose replica file exists
    /// with the recorded length are indexed; dangling metadata is removed;
    /// partial files with their `.json` are kept for resume, others removed.
    pub fn open(config: &StoreConfig) -> Result<ReplicaStore, StoreError> {
        let _ = config;
        todo!()
    }

    /// The replica root.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The complete replica of `key`, if any; counts a hit and refreshes its
    /// LRU position. Memory only: safe on the async hot path.
    pub fn lookup(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        let _ = key;
        todo!()
    }

    /// Like [`ReplicaStore::lookup`] without counting a hit (admin, policies).
    pub fn peek(&self, key: &CacheKey) -> Option<Arc<Replica>> {
        let _ = key;
        todo!()
    }

    /// A complete replica whose content has this SHA-256, if any.
    pub fn by_sha256(&self, digest: &[u8; 32]) -> Option<Arc<Replica>> {
        let _ = digest;
        todo!()
    }

    /// An interrupted fill of `key` left on disk, to be resumed: its metadata
    /// and the number of bytes in its `.part` file. Blocking.
    pub fn find_partial(&self, key: &CacheKey) -> Result<Option<(PartialMeta, u64)>, StoreError> {
        let _ = key;
        todo!()
    }

    /// Opens the partial file of `key` for a fill. With `resume`, keeps the
    /// bytes already there (their count is in [`PartialFile::len`]);
    /// otherwise truncates. Writes `meta` beside it first so that a crash
    /// leaves a resumable partial. Blocking.
    pub fn begin_partial(
        &self,
        key: &CacheKey,
        meta: PartialMeta,
        resume: bool,
    ) -> Result<PartialFile, StoreError> {
        let _ = (key, meta, resume);
        todo!()
    }

    /// Commits a finished fill: syncs the data, writes `meta` (whose
    /// `length` and `sha256` the caller computed), renames the partial into
    /// the replica tree (resolving file/directory collisions as documented in
    /// [`path`]), indexes it, records its digest and evicts least recently
    /// used replicas past `max-size`. Blocking.
    pub fn commit(
        &self,
        partial: PartialFile,
        meta: ObjectMeta,
    ) -> Result<Arc<Replica>, StoreError> {
        let _ = (partial, meta);
        todo!()
    }

    /// Removes the partial of `key` (file and metadata), e.g. when the
    /// upstream's validators changed. Blocking.
    pub fn discard_partial(&self, key: &CacheKey) -> Result<(), StoreError> {
        let _ = key;
        todo!()
    }

    /// Replaces the metadata of a complete replica (after a 304
    /// revalidation) atomically. Blocking.
    pub fn refresh(&self, key: &CacheKey, meta: ObjectMeta) -> Result<Arc<Replica>, StoreError> {
        let _ = (key, meta);
        todo!()
    }

    /// Removes a replica and its metadata (invalidation). Blocking.
    pub fn remove(&self, key: &CacheKey) -> Result<(), StoreError> {
        let _ = key;
        todo!()
    }

    /// Files and bytes of complete replicas.
    pub fn stats(&self) -> StoreStats {
        todo!()
    }

    /// A snapshot of all complete replicas (admin UI).
    pub fn entries(&self) -> Vec<Arc<Replica>> {
        todo!()
    }
}
