//! Partial files: a fill in progress or interrupted, its `.part` data and
//! the `.json` metadata needed to resume it, in `state/partial/`; and the
//! in-memory set of keys that have one ([`PartialKeys`]), so that a policy
//! asking about a key (`replica_state`) gets an answer without file I/O on
//! an async worker.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use super::{
    CacheKey, PartialMeta, ReplicaStore, StoreError, io_err, read_json, remove_file_if_exists,
    room, write_json_atomic,
};

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

/// The keys with a partial on disk (data and metadata), kept in step with
/// `state/partial/`: filled at open from what recovery keeps, added to when
/// a fill begins, taken from when a commit moves the data into the tree or
/// a partial is discarded.
#[derive(Debug, Default)]
pub(super) struct PartialKeys(RwLock<HashSet<CacheKey>>);

impl PartialKeys {
    /// Records that `key` has a partial.
    pub(super) fn add(&self, key: &CacheKey) {
        let mut keys = self.0.write().unwrap_or_else(|e| e.into_inner());
        if !keys.contains(key) {
            keys.insert(key.clone());
        }
    }

    /// Records that `key` has no partial any more.
    pub(super) fn forget(&self, key: &CacheKey) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Whether `key` has a partial.
    fn contains(&self, key: &CacheKey) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }
}

impl ReplicaStore {
    pub(super) fn partial_paths(&self, key: &CacheKey) -> (PathBuf, PathBuf) {
        let hash = key.hash_hex();
        let dir = self.state.join("partial");
        (
            dir.join(format!("{hash}.part")),
            dir.join(format!("{hash}.json")),
        )
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
        self.partials.add(key);
        Ok(PartialFile {
            key: key.clone(),
            file: Arc::new(file),
            len,
            path: part,
            meta,
            room: reservation,
        })
    }

    /// Removes the partial of `key` (file and metadata), e.g. when the
    /// upstream's validators changed. Blocking.
    pub fn discard_partial(&self, key: &CacheKey) -> Result<(), StoreError> {
        let (part, json) = self.partial_paths(key);
        remove_file_if_exists(&json).map_err(io_err("remove partial metadata", &json))?;
        // Without its metadata a partial cannot be resumed, whatever
        // happens to its data.
        self.partials.forget(key);
        remove_file_if_exists(&part).map_err(io_err("remove partial", &part))
    }

    /// Whether `key` has a partial on disk: a fill under way or one that was
    /// interrupted (a cut download, a crash) and can be resumed. Memory
    /// only: safe on the async hot path and in policy hooks.
    pub fn has_partial(&self, key: &CacheKey) -> bool {
        self.partials.contains(key)
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
}
