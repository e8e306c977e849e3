//! Responses kept aside: every stored status but 200 (a redirect, a 404,
//! a 410, an error page with explicit freshness). Their body never goes
//! into the browsable tree, where it would stand in the place of the real
//! file: it is `state/objects/ab/<hash>.body`, beside the key's metadata,
//! and the entry is indexed, served, revalidated, evicted and verified like
//! a replica whose file is that body.
//!
//! # Commit, and why a crash never leaves a wrong entry
//! As for a file in the tree ([`super`]): the new metadata is written as
//! `<hash>.json.new` and the old `<hash>.json` removed before the partial
//! is renamed over `<hash>.body` (same directory tree, so always a
//! rename), then `.json.new` is promoted. On open, a `.json.new` whose
//! `.part` survives is dropped; a `.body` that no loaded metadata keeps
//! aside is removed ([`ReplicaStore::sweep_bodies`]).

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use super::index::parse_digest;
use super::{
    FileStamp, ObjectMeta, PartialFile, Replica, ReplicaStore, StoreError, io_err,
    remove_file_if_exists, sync_dir, with_suffix, write_synced,
};

/// The file name suffix of a kept-aside body, beside `<hash>.json`.
pub(super) const BODY_SUFFIX: &str = ".body";

impl ReplicaStore {
    /// Where the body of a response kept aside for the key of `hash` is.
    pub(super) fn body_path(&self, hash: &str) -> PathBuf {
        self.state
            .join("objects")
            .join(&hash[..2])
            .join(format!("{hash}{BODY_SUFFIX}"))
    }

    /// Commits a finished fill of a response kept aside (`meta.status` is
    /// not 200): its body becomes `<hash>.body` in the state directory,
    /// never a file in the tree. Whatever the key held before (another
    /// response kept aside, or a file in the tree) is replaced. Blocking.
    pub(super) fn commit_aside(
        &self,
        partial: PartialFile,
        mut meta: ObjectMeta,
    ) -> Result<Arc<Replica>, StoreError> {
        let key = partial.key.clone();
        key.as_str().clone_into(&mut meta.key);
        meta.replica.clear();
        if parse_digest(&meta.sha256).is_none() {
            return Err(StoreError::BadMeta {
                key: meta.key,
                reason: "sha256 is not 64 hex digits",
            });
        }
        partial
            .file
            .sync_data()
            .map_err(io_err("sync partial", &partial.path))?;
        let stat = partial
            .file
            .metadata()
            .map_err(io_err("stat partial", &partial.path))?;
        // The rename keeps the inode and its modification time.
        meta.file = Some(FileStamp::of(&stat));
        if stat.len() != meta.length {
            return Err(StoreError::Length {
                key: meta.key,
                expected: meta.length,
                actual: stat.len(),
            });
        }
        let hash = key.hash_hex();
        let obj = self.object_path(&hash);
        let body = self.body_path(&hash);
        let pending = with_suffix(&obj, ".new");

        let _tree = self.lock_tree();
        let old = self.index.remove(&key);
        let staged = (|| {
            if let Some(dir) = obj.parent() {
                fs::create_dir_all(dir).map_err(io_err("create metadata directory", dir))?;
            }
            write_synced(&pending, &super::encode_object(&meta, &pending)?)?;
            remove_file_if_exists(&obj).map_err(io_err("remove old metadata", &obj))?;
            if let Some(dir) = obj.parent() {
                sync_dir(dir)?;
            }
            fs::rename(&partial.path, &body).map_err(io_err("rename into state", &body))
        })();
        if let Err(e) = staged {
            let _ = fs::remove_file(&pending);
            if let Some(old) = old {
                self.restore(&key, &old, &obj);
            }
            return Err(e);
        }
        self.partials.forget(&key);
        if let Err(e) = fs::rename(&pending, &obj).map_err(io_err("rename metadata", &obj)) {
            let _ = fs::remove_file(&pending);
            let _ = fs::remove_file(&body);
            self.index.recency.forget(&key);
            return Err(e);
        }
        if let Some(Err(e)) = obj.parent().map(sync_dir) {
            tracing::warn!(error = %e, "cannot sync metadata directory");
        }
        let (_, partial_json) = self.partial_paths(&key);
        let _ = remove_file_if_exists(&partial_json);

        let hits = old.as_ref().map_or(0, |o| o.hits());
        let replica = Arc::new(Replica::new(meta, body, hits));
        self.index.insert(key.clone(), Arc::clone(&replica));
        self.index.recency.touch(&key);
        if let Some(old) = old
            && old.meta.in_tree()
            && self.index.owner_of(&old.meta.replica).is_none()
        {
            self.unlink_replica(&old.meta.replica);
        }
        self.evict(&key);
        Ok(replica)
    }

    /// Removes the bytes of an entry taken out of the index for good: its
    /// file in the tree (and the directories it leaves empty), or its
    /// kept-aside body.
    pub(super) fn discard_bytes(&self, replica: &Replica) {
        if replica.meta.in_tree() {
            self.unlink_replica(&replica.meta.replica);
        } else if let Err(e) = remove_file_if_exists(&replica.path) {
            tracing::warn!(path = %replica.path.display(), error = %e, "cannot remove kept-aside body");
        }
    }

    /// Removes every `<hash>.body` that no indexed entry keeps aside: left
    /// by a crash in the middle of a commit that replaced it, or by a
    /// metadata file dropped on open. Runs once the index is loaded.
    pub(super) fn sweep_bodies(&self) -> Result<(), StoreError> {
        let kept: std::collections::HashSet<PathBuf> = self
            .index
            .entries()
            .into_iter()
            .filter(|r| !r.meta.in_tree())
            .map(|r| r.path.clone())
            .collect();
        for path in self.object_files()? {
            let Some(hash) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(BODY_SUFFIX))
            else {
                continue;
            };
            if !kept.contains(&path) {
                tracing::debug!(%hash, "removing a kept-aside body without metadata");
                remove_file_if_exists(&path).map_err(io_err("remove stray body", &path))?;
            }
        }
        Ok(())
    }
}
