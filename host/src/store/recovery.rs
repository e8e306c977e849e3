//! Rebuilding the index from disk at [`ReplicaStore::open`]: removing
//! temporary files a crash left in the root, settling interrupted commits,
//! cleaning stray partials, loading and checking every metadata file
//! (migrating older versions) and quarantining what cannot be read.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::index::parse_digest;
use super::{
    CacheKey, FileStamp, META_VERSION, ObjectMeta, PartialMeta, Replica, ReplicaPath, ReplicaStore,
    StoreError, io_err, meta, read_json, remove_file_if_exists, write_object_atomic,
};

impl ReplicaStore {
    /// Removes temporary files a crash left in the root.
    pub(super) fn replay_journal(&self) -> Result<(), StoreError> {
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
    pub(super) fn clean_partials(&self) -> Result<(), StoreError> {
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
                let meta = dir
                    .join(format!("{stem}.part"))
                    .is_file()
                    .then(|| read_json::<PartialMeta>(path).ok())
                    .flatten();
                // Recorded only if `find_partial` will find it: filed
                // under the hash of the normalised key it names.
                if let Some(m) = &meta
                    && let Ok(key) = CacheKey::parse(&m.key)
                    && key.as_str() == m.key
                    && key.hash_hex() == stem
                {
                    self.partials.add(&key);
                }
                meta.is_some()
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
    pub(super) fn object_files(&self) -> Result<Vec<PathBuf>, StoreError> {
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
    pub(super) fn settle_pendings(&self) -> Result<(), StoreError> {
        for path in self.object_files()? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(hash) = name.strip_suffix(".json.new") {
                self.settle_pending(&path, hash)?;
            } else if !name.ends_with(".json") && !name.ends_with(super::aside::BODY_SUFFIX) {
                // Kept-aside bodies are settled once the index is loaded.
                remove_file_if_exists(&path).map_err(io_err("remove stray metadata", &path))?;
            }
        }
        Ok(())
    }

    /// Rebuilds the index from `state/objects`.
    pub(super) fn load_objects(&self) -> Result<(), StoreError> {
        let mut metas: Vec<(PathBuf, ObjectMeta)> = Vec::new();
        let mut rewrites: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
        let mut stats: HashMap<PathBuf, Box<fs::Metadata>> = HashMap::new();
        for path in self.object_files()? {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let Some(hash) = name.strip_suffix(".json") else {
                continue;
            };
            match self.check_object(&path, hash) {
                Checked::Good {
                    meta,
                    rewrite,
                    stat,
                } => {
                    if rewrite {
                        rewrites.insert(path.clone());
                    }
                    // Replicas linked to one file (digest dedupe) count
                    // their bytes once again after the restart.
                    stats.insert(path.clone(), stat);
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
        let mut aside: Vec<(PathBuf, ObjectMeta)> = Vec::new();
        for (path, meta) in metas {
            if !meta.in_tree() {
                aside.push((path, meta));
                continue;
            }
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
        // Nothing tells which replica was used last before the restart, so
        // the LRU order starts as key order (the smallest key goes first).
        let mut loaded: Vec<(PathBuf, ObjectMeta)> = by_path.into_values().chain(aside).collect();
        loaded.sort_unstable_by(|a, b| a.1.key.cmp(&b.1.key));
        for (path, meta) in loaded {
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
            let abs = if meta.in_tree() {
                self.root.join(&meta.replica)
            } else {
                self.body_path(&key.hash_hex())
            };
            let mut replica = Replica::new(meta, abs, 0);
            if let Some(stat) = stats.get(&path) {
                replica = replica.on_file(stat);
            }
            self.index.insert(key, Arc::new(replica));
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
        let abs = if meta.in_tree() {
            let Ok(rel) = ReplicaPath::from_relative(meta.replica.as_str()) else {
                return Checked::Unreadable(format!(
                    "its replica path {:?} is not a safe path",
                    meta.replica
                ));
            };
            self.root.join(rel.as_path())
        } else {
            self.body_path(hash)
        };
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
            stat: Box::new(file),
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
        /// Its file, for the index's count of shared content.
        stat: Box<fs::Metadata>,
    },
    /// Cannot be read, or does not describe the key it is filed under:
    /// quarantined.
    Unreadable(String),
    /// Readable, but its replica file is gone or changed: dropped.
    Stale(&'static str),
}
