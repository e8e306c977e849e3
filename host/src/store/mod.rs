//! The replica store: the browsable tree, the metadata kept beside it (out
//! of the tree), partial files, the in-memory index and LRU eviction.
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
//! - `state/quarantine/`: metadata that could not be read, moved aside on
//!   open (never deleted; counted in [`StoreHealth`]).
//! - `state/objects/ab/<sha256(key)>.json.new`: the metadata of a commit in
//!   progress (see below).
//! - `state/partial/<sha256(key)>.part` and `.json`: a fill in progress or
//!   interrupted, with the validators needed to resume it.
//! - `state/journal/`: the root's temporary files in use, for cleanup.
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

mod index;
mod key;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};

pub use meta::{FileStamp, META_VERSION, ObjectMeta, PartialMeta};
pub use path::{PathError, ReplicaPath};

use crate::config::{Layout, StoreConfig};
use index::parse_digest;

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
    /// Last access, in milliseconds since the store opened (LRU order).
    pub last_access: AtomicU64,
    /// The response headers built from `meta` the first time the replica
    /// is served, so a hit does not parse stored headers again.
    pub served_headers: std::sync::OnceLock<http::HeaderMap>,
    /// The body in RAM, for small replicas once served (see [`ram`]).
    pub ram: std::sync::OnceLock<ram::RamBody>,
}

impl Replica {
    /// Number of hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn new(meta: ObjectMeta, path: PathBuf, hits: u64, last_access: u64) -> Replica {
        Replica {
            meta: Arc::new(meta),
            path,
            hits: AtomicU64::new(hits),
            last_access: AtomicU64::new(last_access),
            served_headers: std::sync::OnceLock::new(),
            ram: std::sync::OnceLock::new(),
        }
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
    /// Disk room held for the rest of the body until the fill ends.
    room: room::Reservation,
}

impl PartialFile {
    /// Records `n` more bytes written, giving back their reserved room.
    pub fn wrote(&mut self, n: u64) {
        self.room.wrote(n);
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
}

impl CacheKey {
    /// Builds the key for an absolute URL: lower-case scheme and host, the
    /// port always explicit, dot segments removed, the query kept.
    pub fn from_uri(uri: &http::Uri) -> Result<CacheKey, PathError> {
        key::normalize(uri).map(|k| CacheKey(k.into()))
    }

    /// Parses a key given as text (a policy's store-id); it must be an
    /// absolute http(s) URL.
    pub fn parse(text: &str) -> Result<CacheKey, PathError> {
        let uri = text
            .parse::<http::Uri>()
            .map_err(|e| PathError::Invalid(e.to_string()))?;
        CacheKey::from_uri(&uri)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lower-case hex SHA-256 of the key: the name of its metadata and
    /// partial files.
    pub fn hash_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
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

/// A name for a temporary file in the root that no other call picks.
fn temp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(".cistern-{}-{n}-{nanos}.tmp", std::process::id())
}

/// A temporary file in the root, recorded in the journal so that a crash
/// cannot leave it in the browsable tree for good. Dropping it removes the
/// file (if still there) and its journal entry.
struct RootTemp {
    path: PathBuf,
    journal: PathBuf,
}

impl RootTemp {
    fn new(store: &ReplicaStore, dir: &Path) -> Result<RootTemp, StoreError> {
        let name = temp_name();
        let path = dir.join(&name);
        let journal = store.state.join("journal").join(&name);
        write_synced(&journal, path.as_os_str().as_encoded_bytes())?;
        Ok(RootTemp { path, journal })
    }
}

impl Drop for RootTemp {
    fn drop(&mut self) {
        let _ = remove_file_if_exists(&self.path);
        let _ = fs::remove_file(&self.journal);
    }
}

impl ReplicaStore {
    /// Opens (creating) the root and state directories and rebuilds the index
    /// from the metadata on disk: complete entries whose replica file exists
    /// with the recorded length and modification time are indexed (older
    /// metadata versions rewritten in the current one); dangling metadata is
    /// removed, unreadable metadata quarantined; partial files with their `.json` are kept for resume, others removed.
    pub fn open(config: &StoreConfig) -> Result<ReplicaStore, StoreError> {
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
            room: room::Room::new(config.min_free),
            index: index::Index::default(),
            ram: ram::RamBudget::new(ram::RAM_BUDGET),
            tree: Mutex::new(()),
            health: HealthCounters::default(),
        };
        store.replay_journal()?;
        // Interrupted commits are settled by whether their `.part` still
        // exists, so before strays are cleaned out of the partials.
        store.settle_pendings()?;
        store.clean_partials()?;
        store.load_objects()?;
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

    fn partial_paths(&self, key: &CacheKey) -> (PathBuf, PathBuf) {
        let hash = key.hash_hex();
        let dir = self.state.join("partial");
        (
            dir.join(format!("{hash}.part")),
            dir.join(format!("{hash}.json")),
        )
    }

    fn lock_tree(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data of its own, only the order of disk
        // changes, so a panic in another holder leaves nothing to repair.
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An interrupted fill of `key` left on disk, to be resumed: its metadata
    /// and the number of bytes in its `.part` file. Blocking.
    pub fn find_partial(&self, key: &CacheKey) -> Result<Option<(PartialMeta, u64)>, StoreError> {
        let (part, json) = self.partial_paths(key);
        if !json.exists() {
            return Ok(None);
        }
        let meta: PartialMeta = read_json(&json)?;
        if meta.key != key.as_str() {
            return Ok(None);
        }
        match fs::metadata(&part) {
            Ok(m) => Ok(Some((meta, m.len()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat partial", &part)(e)),
        }
    }

    /// Opens the partial file of `key` for a fill. With `resume`, keeps the
    /// bytes already there (their count is in [`PartialFile::len`]);
    /// otherwise truncates. Writes `meta` beside it first so that a crash
    /// leaves a resumable partial. Blocking.
    pub fn begin_partial(
        &self,
        key: &CacheKey,
        mut meta: PartialMeta,
        resume: bool,
    ) -> Result<PartialFile, StoreError> {
        key.as_str().clone_into(&mut meta.key);
        let (part, json) = self.partial_paths(key);
        let have = match fs::metadata(&part) {
            Ok(m) if resume => m.len(),
            _ => 0,
        };
        let needed = meta.total_length.map(|t| t.saturating_sub(have));
        let reservation = self
            .room
            .reserve(&[&self.state, &self.root], needed)
            .map_err(io_err("check free space", &self.state))?
            .map_err(|room| StoreError::NoRoom {
                key: key.as_str().to_owned(),
                path: self.state.clone(),
                room,
            })?;
        write_json_atomic(&json, &meta)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!resume)
            .open(&part)
            .map_err(io_err("open partial", &part))?;
        let len = file
            .metadata()
            .map_err(io_err("stat partial", &part))?
            .len();
        Ok(PartialFile {
            key: key.clone(),
            file: Arc::new(file),
            len,
            path: part,
            meta,
            room: reservation,
        })
    }

    /// Commits a finished fill: syncs the data, writes `meta` (whose
    /// `length` and `sha256` the caller computed), renames the partial into
    /// the replica tree (resolving file/directory collisions as documented in
    /// [`path`]), indexes it, records its digest and evicts least recently
    /// used replicas past `max-size`. Blocking.
    ///
    /// `meta.key` and `meta.replica` are set by the store. On error the
    /// partial stays where it was (resumable) unless the failure came after
    /// the rename.
    pub fn commit(
        &self,
        partial: PartialFile,
        mut meta: ObjectMeta,
    ) -> Result<Arc<Replica>, StoreError> {
        let key = partial.key.clone();
        key.as_str().clone_into(&mut meta.key);
        if parse_digest(&meta.sha256).is_none() {
            return Err(StoreError::BadMeta {
                key: meta.key,
                reason: "sha256 is not 64 hex digits",
            });
        }
        let wanted =
            ReplicaPath::for_key(&key, self.layout).map_err(|source| StoreError::Path {
                key: meta.key.clone(),
                source,
            })?;
        partial
            .file
            .sync_data()
            .map_err(io_err("sync partial", &partial.path))?;
        let stat = partial
            .file
            .metadata()
            .map_err(io_err("stat partial", &partial.path))?;
        let actual = stat.len();
        // The rename keeps the inode and its modification time (a copy
        // across filesystems sets it), so this is what the tree will show.
        meta.file = Some(FileStamp::of(&stat));
        if actual != meta.length {
            return Err(StoreError::Length {
                key: meta.key,
                expected: meta.length,
                actual,
            });
        }

        let _tree = self.lock_tree();
        let target = self.prepare_target(&wanted)?;
        target.as_str().clone_into(&mut meta.replica);
        let abs = self.root.join(target.as_path());

        // Nothing may vouch for the bytes at `abs` (or for this key's old
        // bytes) once they can change.
        let old = self.index.remove(&key);
        let obj = self.object_path(&key.hash_hex());
        let pending = with_suffix(&obj, ".new");
        let staged = (|| {
            if let Some(other) = self.index.owner_of(target.as_str()) {
                self.forget(&other)?;
            }
            if let Some(dir) = obj.parent() {
                fs::create_dir_all(dir).map_err(io_err("create metadata directory", dir))?;
            }
            write_synced(&pending, &encode_object(&meta, &pending)?)?;
            remove_file_if_exists(&obj).map_err(io_err("remove old metadata", &obj))?;
            // Durable before the bytes move, or a power cut could keep the
            // old metadata next to the new bytes.
            if let Some(dir) = obj.parent() {
                sync_dir(dir)?;
            }
            // An error from here on means the tree was not changed.
            self.move_into_tree(&partial.path, &abs)
        })();
        if let Err(e) = staged {
            let _ = fs::remove_file(&pending);
            if let Some(old) = old {
                self.restore(&key, &old, &obj);
            }
            return Err(e);
        }
        if let Err(e) = fs::rename(&pending, &obj).map_err(io_err("rename metadata", &obj)) {
            // The bytes are in place but nothing durable vouches for them:
            // take them out rather than keep an unexplained file.
            let _ = fs::remove_file(&pending);
            let _ = fs::remove_file(&abs);
            return Err(e);
        }
        if let Some(Err(e)) = obj.parent().map(sync_dir) {
            tracing::warn!(error = %e, "cannot sync metadata directory");
        }
        let (_, partial_json) = self.partial_paths(&key);
        let _ = remove_file_if_exists(&partial_json);

        let hits = old.as_ref().map_or(0, |o| o.hits());
        let replica = Arc::new(Replica::new(meta, abs, hits, self.index.now_ms()));
        self.index.insert(key.clone(), Arc::clone(&replica));
        if let Some(old) = old
            && old.path != replica.path
            && self.index.owner_of(&old.meta.replica).is_none()
        {
            self.unlink_replica(&old.meta.replica);
        }
        self.evict(&key);
        Ok(replica)
    }

    /// Puts a replica that a failed commit took out of service back, if its
    /// bytes were not touched.
    fn restore(&self, key: &CacheKey, old: &Arc<Replica>, obj: &Path) {
        let intact = fs::metadata(&old.path).is_ok_and(|m| m.is_file() && describes(&old.meta, &m));
        if intact && write_object_atomic(obj, &old.meta).is_ok() {
            self.index.insert(key.clone(), Arc::clone(old));
        } else {
            let _ = fs::remove_file(obj);
        }
    }

    /// Renames `src` (in the state directory) to `dst` (in the tree); across
    /// filesystems, copies through a hidden temporary file in `dst`'s
    /// directory and removes `src` afterwards.
    fn move_into_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        let dir = dst.parent().unwrap_or(&self.root);
        match fs::rename(src, dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let temp = RootTemp::new(self, dir)?;
                let copied = (|| {
                    let mut from = File::open(src)?;
                    let mut to = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&temp.path)?;
                    io::copy(&mut from, &mut to)?;
                    // The commit recorded the partial's modification time.
                    to.set_modified(from.metadata()?.modified()?)?;
                    to.sync_all()
                })();
                copied.map_err(io_err("copy into replica", &temp.path))?;
                fs::rename(&temp.path, dst).map_err(io_err("rename into replica", dst))?;
                drop(temp);
                // The partial must go before the metadata is promoted: on
                // open, a surviving `.part` means "not committed". If it
                // cannot go, the commit still stands: once the metadata is
                // promoted, the next open removes the `.part` as a stray.
                if let Err(e) = remove_file_if_exists(src) {
                    tracing::warn!(path = %src.display(), error = %e, "cannot remove copied partial");
                }
            }
            Err(e) => return Err(io_err("rename into replica", dst)(e)),
        }
        // Past the rename the tree has changed; a failed directory sync only
        // weakens durability against power loss, so it is logged, not
        // reported as a failed commit.
        if let Err(e) = sync_dir(dir) {
            tracing::warn!(error = %e, "cannot sync replica directory");
        }
        Ok(())
    }

    /// Creates the directories of `wanted`, moving files that stand where a
    /// directory is needed, and descends into `index.html` while the target
    /// itself is a directory. Returns where the file really goes.
    fn prepare_target(&self, wanted: &ReplicaPath) -> Result<ReplicaPath, StoreError> {
        for dir in wanted.ancestors() {
            let abs = self.root.join(dir.as_path());
            match fs::metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => self.move_into_dir(&dir)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if fs::symlink_metadata(&abs).is_ok() {
                        // A dangling symbolic link: treat it like a file.
                        self.move_into_dir(&dir)?;
                    } else {
                        match fs::create_dir(&abs) {
                            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                                return Err(io_err("create directory", &abs)(e));
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => return Err(io_err("inspect replica path", &abs)(e)),
            }
        }
        let mut target = wanted.clone();
        while fs::metadata(self.root.join(target.as_path())).is_ok_and(|m| m.is_dir()) {
            target = target.join(path::INDEX_NAME);
        }
        ReplicaPath::from_relative(target.as_path()).map_err(|source| StoreError::Path {
            key: wanted.as_str().to_owned(),
            source,
        })
    }

    /// A directory is needed at `dir`, where a file is: the file becomes
    /// `dir/index.html` and its metadata follows it.
    fn move_into_dir(&self, dir: &ReplicaPath) -> Result<(), StoreError> {
        let abs = self.root.join(dir.as_path());
        let new_rel = dir.join(path::INDEX_NAME);
        let owner = self.index.owner_of(dir.as_str());
        let moving = owner.as_ref().and_then(|k| self.index.remove(k));
        let mut new_meta = None;
        if let (Some(key), Some(replica)) = (&owner, &moving) {
            let mut meta = (*replica.meta).clone();
            new_rel.as_str().clone_into(&mut meta.replica);
            let obj = self.object_path(&key.hash_hex());
            if let Err(e) = write_object_atomic(&obj, &meta) {
                let _ = fs::remove_file(&obj);
                return Err(e);
            }
            new_meta = Some(meta);
        }
        let parent = abs.parent().unwrap_or(&self.root);
        let temp = RootTemp::new(self, parent)?;
        let moved = fs::rename(&abs, &temp.path)
            .map_err(io_err("move file aside", &abs))
            .and_then(|()| fs::create_dir(&abs).map_err(io_err("create directory", &abs)))
            .and_then(|()| {
                let dst = self.root.join(new_rel.as_path());
                fs::rename(&temp.path, &dst).map_err(io_err("move file into directory", &dst))
            });
        if let Err(e) = moved {
            // Put the file back where it was (its directory, if created, is
            // empty); its metadata already names the new place, so it goes.
            let _ = fs::remove_dir(&abs);
            let _ = fs::rename(&temp.path, &abs);
            if let Some(key) = &owner {
                let _ = fs::remove_file(self.object_path(&key.hash_hex()));
            }
            return Err(e);
        }
        drop(temp);
        if let Err(e) = sync_dir(&abs) {
            tracing::warn!(error = %e, "cannot sync replica directory");
        }
        if let (Some(key), Some(replica), Some(meta)) = (owner, moving, new_meta) {
            let moved = Replica::new(
                meta,
                self.root.join(new_rel.as_path()),
                replica.hits(),
                replica.last_access.load(Ordering::Relaxed),
            );
            self.index.insert(key, Arc::new(moved));
        }
        Ok(())
    }

    /// Drops `key` from the index and removes its metadata, leaving its
    /// file (about to be replaced). Returns the dropped replica.
    fn forget(&self, key: &CacheKey) -> Result<Option<Arc<Replica>>, StoreError> {
        let replica = self.index.remove(key);
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

    /// Evicts least recently used replicas, never `keep`, until the total
    /// is below 90 % of `max_size`. Failures are logged: the commit that
    /// triggered eviction has succeeded.
    fn evict(&self, keep: &CacheKey) {
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

    /// Removes the partial of `key` (file and metadata), e.g. when the
    /// upstream's validators changed. Blocking.
    pub fn discard_partial(&self, key: &CacheKey) -> Result<(), StoreError> {
        let (part, json) = self.partial_paths(key);
        remove_file_if_exists(&json).map_err(io_err("remove partial metadata", &json))?;
        remove_file_if_exists(&part).map_err(io_err("remove partial", &part))
    }

    /// Gives back the space of a fill whose write ran out of it, and stops
    /// storing bodies of unknown length for a while ([`room::FULL_PAUSE`]).
    /// Blocking.
    pub fn ran_full(&self, key: &CacheKey, path: PathBuf, written: u64) -> StoreError {
        self.room.ran_full();
        if let Err(e) = self.discard_partial(key) {
            tracing::warn!(%key, "{e}");
        }
        StoreError::DiskFull { path, written }
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
        let replica = Arc::new(Replica::new(
            meta,
            current.path.clone(),
            current.hits(),
            current.last_access.load(Ordering::Relaxed),
        ));
        self.index.insert(key.clone(), Arc::clone(&replica));
        Ok(replica)
    }

    /// Removes a replica and its metadata (invalidation). Blocking.
    pub fn remove(&self, key: &CacheKey) -> Result<(), StoreError> {
        let _tree = self.lock_tree();
        if let Some(replica) = self.forget(key)? {
            self.unlink_replica(&replica.meta.replica);
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

    /// Removes temporary files a crash left in the root.
    fn replay_journal(&self) -> Result<(), StoreError> {
        let dir = self.state.join("journal");
        for entry in fs::read_dir(&dir).map_err(io_err("read journal", &dir))? {
            let entry = entry.map_err(io_err("read journal", &dir))?;
            let journal = entry.path();
            if let Ok(bytes) = fs::read(&journal) {
                let temp = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
                let ours = temp
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".cistern-") && n.ends_with(".tmp"));
                if ours && temp.starts_with(&self.root) {
                    remove_file_if_exists(&temp).map_err(io_err("remove temporary file", &temp))?;
                }
            }
            remove_file_if_exists(&journal).map_err(io_err("remove journal entry", &journal))?;
        }
        Ok(())
    }

    /// Keeps partials that have both their data and their metadata; removes
    /// everything else in the partial directory.
    fn clean_partials(&self) -> Result<(), StoreError> {
        let dir = self.state.join("partial");
        let mut names: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read partial directory", &dir))? {
            names.push(
                entry
                    .map_err(io_err("read partial directory", &dir))?
                    .path(),
            );
        }
        for path in &names {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let keep = if let Some(stem) = name.strip_suffix(".part") {
                dir.join(format!("{stem}.json")).is_file()
            } else if let Some(stem) = name.strip_suffix(".json") {
                dir.join(format!("{stem}.part")).is_file() && read_json::<PartialMeta>(path).is_ok()
            } else {
                false
            };
            if !keep {
                tracing::debug!(path = %path.display(), "removing stray partial file");
                remove_file_if_exists(path).map_err(io_err("remove stray partial", path))?;
            }
        }
        // A `.part` whose `.json` was unreadable lost its partner above.
        for path in &names {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(stem) = name.strip_suffix(".part")
                && !dir.join(format!("{stem}.json")).exists()
            {
                remove_file_if_exists(path).map_err(io_err("remove stray partial", path))?;
            }
        }
        Ok(())
    }

    /// Every file under `state/objects`, sorted.
    fn object_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let objects = self.state.join("objects");
        let mut files: Vec<PathBuf> = Vec::new();
        for sub in fs::read_dir(&objects).map_err(io_err("read metadata directory", &objects))? {
            let sub = sub.map_err(io_err("read metadata directory", &objects))?;
            let sub = sub.path();
            if !sub.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&sub).map_err(io_err("read metadata directory", &sub))? {
                let entry = entry.map_err(io_err("read metadata directory", &sub))?;
                files.push(entry.path());
            }
        }
        files.sort();
        Ok(files)
    }

    /// Finishes or undoes commits interrupted between writing their
    /// metadata and promoting it; removes leftover temporary files.
    fn settle_pendings(&self) -> Result<(), StoreError> {
        for path in self.object_files()? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(hash) = name.strip_suffix(".json.new") {
                self.settle_pending(&path, hash)?;
            } else if !name.ends_with(".json") {
                remove_file_if_exists(&path).map_err(io_err("remove stray metadata", &path))?;
            }
        }
        Ok(())
    }

    /// Rebuilds the index from `state/objects`.
    fn load_objects(&self) -> Result<(), StoreError> {
        let mut metas: Vec<(PathBuf, ObjectMeta)> = Vec::new();
        let mut rewrites: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
        for path in self.object_files()? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(hash) = name.strip_suffix(".json") else {
                continue;
            };
            match self.check_object(&path, hash) {
                Checked::Good { meta, rewrite } => {
                    if rewrite {
                        rewrites.insert(path.clone());
                    }
                    metas.push((path, *meta));
                }
                Checked::Unreadable(reason) => self.quarantine(&path, &reason)?,
                Checked::Stale(why) => {
                    tracing::info!(path = %path.display(), "dropping metadata: {why}");
                    remove_file_if_exists(&path).map_err(io_err("remove metadata", &path))?;
                }
            }
        }

        // Two metadata files can only claim one path after outside
        // interference; the newest wins.
        let mut by_path: HashMap<String, (PathBuf, ObjectMeta)> = HashMap::new();
        for (path, meta) in metas {
            let loser = match by_path.remove(&meta.replica) {
                Some((other_path, other))
                    if (other.stored_at, &other.key) > (meta.stored_at, &meta.key) =>
                {
                    by_path.insert(other.replica.clone(), (other_path, other));
                    path
                }
                Some((other_path, _)) => {
                    by_path.insert(meta.replica.clone(), (path, meta));
                    other_path
                }
                None => {
                    by_path.insert(meta.replica.clone(), (path, meta));
                    continue;
                }
            };
            remove_file_if_exists(&loser).map_err(io_err("remove metadata", &loser))?;
        }
        for (path, meta) in by_path.into_values() {
            if rewrites.contains(&path) {
                // An older version is rewritten in the current one; if that
                // fails, the old file is still readable next time.
                match write_object_atomic(&path, &meta) {
                    Ok(()) => {
                        tracing::debug!(path = %path.display(), "metadata rewritten in version {META_VERSION}")
                    }
                    Err(e) => tracing::warn!("cannot rewrite metadata in the current version: {e}"),
                }
            }
            let key = CacheKey(meta.key.as_str().into());
            let abs = self.root.join(&meta.replica);
            self.index
                .insert(key, Arc::new(Replica::new(meta, abs, 0, 0)));
        }
        Ok(())
    }

    /// Finishes or undoes a commit interrupted between writing its
    /// metadata and promoting it.
    fn settle_pending(&self, pending: &Path, hash: &str) -> Result<(), StoreError> {
        let part = self.state.join("partial").join(format!("{hash}.part"));
        if part.exists() {
            remove_file_if_exists(pending).map_err(io_err("remove metadata", pending))?;
            return Ok(());
        }
        let committed = match self.check_object(pending, hash) {
            Checked::Good { .. } => true,
            Checked::Unreadable(reason) => return self.quarantine(pending, &reason),
            Checked::Stale(_) => false,
        };
        if committed {
            let obj = self.object_path(hash);
            fs::rename(pending, &obj).map_err(io_err("promote metadata", &obj))?;
        } else {
            remove_file_if_exists(pending).map_err(io_err("remove metadata", pending))?;
        }
        Ok(())
    }

    /// Reads the metadata at `path` (filed under `hash`) and checks it
    /// against its replica file. A replica file of another length is
    /// removed: it cannot be trusted.
    fn check_object(&self, path: &Path, hash: &str) -> Checked {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) => return Checked::Unreadable(format!("cannot read it: {e}")),
        };
        let (mut meta, version) = match meta::decode_object(&bytes) {
            Ok(m) => m,
            Err(e) => return Checked::Unreadable(e.to_string()),
        };
        match CacheKey::parse(&meta.key) {
            Ok(key) if key.as_str() == meta.key && key.hash_hex() == hash => {}
            _ => {
                return Checked::Unreadable(format!(
                    "its key {:?} is not a normalised key filed under this name",
                    meta.key
                ));
            }
        }
        if parse_digest(&meta.sha256).is_none() {
            return Checked::Unreadable("its sha256 is not 64 hex digits".into());
        }
        let Ok(rel) = ReplicaPath::from_relative(meta.replica.as_str()) else {
            return Checked::Unreadable(format!(
                "its replica path {:?} is not a safe path",
                meta.replica
            ));
        };
        let abs = self.root.join(rel.as_path());
        let file = match fs::symlink_metadata(&abs) {
            Ok(f) if f.is_file() => f,
            _ => return Checked::Stale("its replica file is missing"),
        };
        if file.len() != meta.length {
            tracing::warn!(path = %abs.display(), "replica has the wrong length; removing it");
            let _ = fs::remove_file(&abs);
            return Checked::Stale("its replica file had the wrong length");
        }
        let now = FileStamp::of(&file);
        let mut rewrite = version < META_VERSION;
        match meta.file {
            Some(stamp) if stamp != now => {
                tracing::warn!(
                    path = %abs.display(),
                    recorded_mtime_ns = stamp.mtime_ns,
                    mtime_ns = now.mtime_ns,
                    "replica file was modified outside Cistern since it was stored; it will be fetched again"
                );
                self.health.changed_outside.fetch_add(1, Ordering::Relaxed);
                return Checked::Stale("its replica file was modified outside Cistern");
            }
            Some(_) => {}
            None => {
                // Metadata from before stamps were recorded: the length
                // matched, so take the file as it is now.
                meta.file = Some(now);
                rewrite = true;
            }
        }
        Checked::Good {
            meta: Box::new(meta),
            rewrite,
        }
    }

    /// Moves unreadable metadata into `state/quarantine/` (never deletes it:
    /// a newer Cistern, or a person, may still read it), logs why and counts
    /// it. Its replica file stays in the tree, unserved, until fetched again.
    fn quarantine(&self, path: &Path, reason: &str) -> Result<(), StoreError> {
        let dir = self.state.join(QUARANTINE);
        fs::create_dir_all(&dir).map_err(io_err("create quarantine directory", &dir))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let mut dest = dir.join(&*name);
        let mut n = 1;
        while dest.exists() {
            dest = dir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &dest).map_err(io_err("move metadata into quarantine", path))?;
        self.health.quarantined.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            path = %path.display(),
            moved_to = %dest.display(),
            "unreadable replica metadata quarantined: {reason}"
        );
        Ok(())
    }

    /// Counters of what the store found wrong on disk.
    pub fn health(&self) -> StoreHealth {
        StoreHealth {
            quarantined: self.health.quarantined.load(Ordering::Relaxed),
            changed_outside: self.health.changed_outside.load(Ordering::Relaxed),
        }
    }
}

/// Where unreadable metadata is moved, under the state directory.
pub const QUARANTINE: &str = "quarantine";

/// What [`ReplicaStore::check_object`] found.
enum Checked {
    /// Usable; `rewrite` when it must be written again in the current
    /// version (migrated, or its file stamp recorded only now).
    Good {
        meta: Box<ObjectMeta>,
        rewrite: bool,
    },
    /// Cannot be read, or does not describe the key it is filed under:
    /// quarantined.
    Unreadable(String),
    /// Readable, but its replica file is gone or changed: dropped.
    Stale(&'static str),
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
