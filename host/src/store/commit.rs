//! Atomic commit of a finished fill into the browsable tree: preparing the
//! target path (file/directory collisions), writing and promoting the
//! metadata, moving the partial into place (copying through a journalled
//! temporary file across filesystems), and undoing a failed commit.
//! The crash-safety argument is in the [`super`] module documentation.
//!
//! # Digest dedupe
//! When the index already holds a file with the same SHA-256 and length
//! (the same content under another URL), the new replica becomes a hard
//! link of that file instead of a second copy: the link is made in a
//! journalled temporary name, the metadata (with the twin's file stamp,
//! which the link shares) written, the link renamed into place and the
//! partial removed, in the order a copy across filesystems follows, so a
//! crash leaves the same states. Where the filesystem refuses the link
//! (another filesystem, no hard links, too many links) the partial is
//! moved in as usual: a copy of its own. Nothing ever writes into a
//! replica file (a new version is renamed over its path), so one link's
//! replacement or removal never touches the other.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::index::parse_digest;
use super::{
    CacheKey, FileStamp, ObjectMeta, PartialFile, Replica, ReplicaPath, ReplicaStore, StoreError,
    describes, encode_object, io_err, path, remove_file_if_exists, sync_dir, with_suffix,
    write_object_atomic, write_synced,
};

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
    /// Commits a finished fill: syncs the data, writes `meta` (whose
    /// `length` and `sha256` the caller computed), renames the partial into
    /// the replica tree (resolving file/directory collisions as documented in
    /// [`path`]), indexes it, records its digest and evicts least recently
    /// used replicas past `max-size`. Blocking.
    ///
    /// A response other than 200 is kept aside instead (see `aside`).
    ///
    /// `meta.key` and `meta.replica` are set by the store. On error the
    /// partial stays where it was (resumable) unless the failure came after
    /// the rename.
    pub fn commit(
        &self,
        partial: PartialFile,
        mut meta: ObjectMeta,
    ) -> Result<Arc<Replica>, StoreError> {
        if !meta.in_tree() {
            return self.commit_aside(partial, meta);
        }
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
            let link = self.link_twin(&meta, &abs);
            if let Some((_, twin)) = &link {
                // The link shares the twin's inode, so its stamp.
                meta.file = Some(FileStamp::of(twin));
            }
            write_synced(&pending, &encode_object(&meta, &pending)?)?;
            remove_file_if_exists(&obj).map_err(io_err("remove old metadata", &obj))?;
            // Durable before the bytes move, or a power cut could keep the
            // old metadata next to the new bytes.
            if let Some(dir) = obj.parent() {
                sync_dir(dir)?;
            }
            // An error from here on means the tree was not changed.
            match link {
                Some((temp, _)) => self.place_link(temp, &partial.path, &abs),
                None => self.move_into_tree(&partial.path, &abs),
            }
        })();
        if let Err(e) = staged {
            let _ = fs::remove_file(&pending);
            if let Some(old) = old {
                self.restore(&key, &old, &obj);
            }
            return Err(e);
        }
        // The data has left the partial directory.
        self.partials.forget(&key);
        if let Err(e) = fs::rename(&pending, &obj).map_err(io_err("rename metadata", &obj)) {
            // The bytes are in place but nothing durable vouches for them:
            // take them out rather than keep an unexplained file.
            let _ = fs::remove_file(&pending);
            let _ = fs::remove_file(&abs);
            self.index.recency.forget(&key);
            return Err(e);
        }
        if let Some(Err(e)) = obj.parent().map(sync_dir) {
            tracing::warn!(error = %e, "cannot sync metadata directory");
        }
        let (_, partial_json) = self.partial_paths(&key);
        let _ = remove_file_if_exists(&partial_json);

        let hits = old.as_ref().map_or(0, |o| o.hits());
        let mut replica = Replica::new(meta, abs, hits);
        // Its inode, so that content linked to another key counts once.
        if let Ok(stat) = fs::symlink_metadata(&replica.path) {
            replica = replica.on_file(&stat);
        }
        let replica = Arc::new(replica);
        self.index.insert(key.clone(), Arc::clone(&replica));
        // A new version is the most recently used, whatever the old one was.
        self.index.recency.touch(&key);
        if let Some(old) = old {
            if !old.meta.in_tree() {
                // A 404 or a redirect the file now replaces.
                self.discard_bytes(&old);
            } else if old.path != replica.path && self.index.owner_of(&old.meta.replica).is_none() {
                self.unlink_replica(&old.meta.replica);
            }
        }
        self.evict(&key);
        Ok(replica)
    }

    /// A hard link, in a journalled temporary name in `abs`'s directory, of
    /// an indexed file with `meta`'s content (same SHA-256 and length)
    /// elsewhere in the tree, with that file's `stat`; `None` when there is
    /// none, it was changed outside Cistern, or the filesystem refuses the
    /// link (the commit then moves its own copy in). Under the tree lock.
    fn link_twin(&self, meta: &ObjectMeta, abs: &Path) -> Option<(RootTemp, fs::Metadata)> {
        let digest = parse_digest(&meta.sha256)?;
        let dir = abs.parent()?;
        for twin in self.index.all_by_digest(&digest) {
            if twin.path == abs || !twin.meta.in_tree() || twin.meta.length != meta.length {
                continue;
            }
            match fs::symlink_metadata(&twin.path) {
                Ok(stat) if stat.is_file() && describes(&twin.meta, &stat) => {}
                _ => continue,
            }
            let temp = RootTemp::new(self, dir).ok()?;
            if let Err(e) = fs::hard_link(&twin.path, &temp.path) {
                tracing::debug!(twin = %twin.path.display(), error = %e,
                    "cannot hard-link the same content; storing a copy");
                return None;
            }
            // The link is the twin's inode: check it is still the bytes the
            // twin's metadata vouches for.
            match fs::symlink_metadata(&temp.path) {
                Ok(stat) if describes(&twin.meta, &stat) => {
                    tracing::debug!(twin = %twin.path.display(), path = %abs.display(),
                        "same content as another replica: stored once, hard-linked");
                    return Some((temp, stat));
                }
                _ => return None,
            }
        }
        None
    }

    /// Renames the hard link `temp` to `dst` and removes the partial at
    /// `src`, whose bytes are no longer needed (see [`Self::move_into_tree`]
    /// for why the partial goes before the metadata is promoted).
    fn place_link(&self, temp: RootTemp, src: &Path, dst: &Path) -> Result<(), StoreError> {
        fs::rename(&temp.path, dst).map_err(io_err("rename link into replica", dst))?;
        drop(temp);
        if let Err(e) = remove_file_if_exists(src) {
            tracing::warn!(path = %src.display(), error = %e, "cannot remove linked partial");
        }
        if let Err(e) = sync_dir(dst.parent().unwrap_or(&self.root)) {
            tracing::warn!(error = %e, "cannot sync replica directory");
        }
        Ok(())
    }

    /// Puts a replica that a failed commit took out of service back, if its
    /// bytes were not touched.
    pub(super) fn restore(&self, key: &CacheKey, old: &Arc<Replica>, obj: &Path) {
        let intact = fs::metadata(&old.path).is_ok_and(|m| m.is_file() && describes(&old.meta, &m));
        if intact && write_object_atomic(obj, &old.meta).is_ok() {
            self.index.insert(key.clone(), Arc::clone(old));
        } else {
            let _ = fs::remove_file(obj);
            self.index.recency.forget(key);
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
                self.index.recency.forget(key);
                return Err(e);
            }
            new_meta = Some(meta);
        }
        let parent = abs.parent().unwrap_or(&self.root);
        let temp = RootTemp::new(self, parent).inspect_err(|_| {
            if let Some(key) = &owner {
                self.index.recency.forget(key);
            }
        })?;
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
                self.index.recency.forget(key);
            }
            return Err(e);
        }
        drop(temp);
        if let Err(e) = sync_dir(&abs) {
            tracing::warn!(error = %e, "cannot sync replica directory");
        }
        if let (Some(key), Some(replica), Some(meta)) = (owner, moving, new_meta) {
            let mut moved = Replica::new(meta, self.root.join(new_rel.as_path()), replica.hits());
            // A rename keeps the inode.
            moved.file_id = replica.file_id;
            self.index.insert(key, Arc::new(moved));
        }
        Ok(())
    }
}
