//! Store tests on real files in temporary directories.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use super::*;

struct Fixture {
    _dirs: Vec<TempDir>,
    config: StoreConfig,
}

impl Fixture {
    fn new(layout: Layout, max_size: Option<u64>) -> Fixture {
        let dir = TempDir::new().expect("temp dir");
        let config = StoreConfig {
            root: dir.path().join("replica"),
            state: dir.path().join("replica.cistern"),
            layout,
            max_size,
            min_free: 0,
        };
        Fixture {
            _dirs: vec![dir],
            config,
        }
    }

    fn open(&self) -> ReplicaStore {
        ReplicaStore::open(&self.config).expect("store opens")
    }

    fn root(&self) -> &Path {
        &self.config.root
    }
}

fn key(url: &str) -> CacheKey {
    CacheKey::parse(url).expect("valid key")
}

/// The RFC 9111 inputs of a GET of `url` answered with `max-age=60` at
/// 1_700_000_000.
fn rfc(url: &str) -> meta::RfcInputs {
    let at = meta::from_unix_secs(1_700_000_000);
    let mut req = http::HeaderMap::new();
    req.insert("host", "example.org".parse().expect("value"));
    req.insert("authorization", "Basic c2VjcmV0".parse().expect("value"));
    let mut res = http::HeaderMap::new();
    res.insert("cache-control", "max-age=60".parse().expect("value"));
    res.insert("content-type", "text/plain".parse().expect("value"));
    meta::RfcInputs::new(
        http::Method::GET,
        url.parse().expect("uri"),
        &req,
        http::StatusCode::OK,
        &res,
        at,
        at,
    )
}

fn object_meta(key: &CacheKey, body: &[u8]) -> ObjectMeta {
    let rfc = rfc(key.as_str());
    ObjectMeta {
        key: key.as_str().to_owned(),
        url: key.as_str().to_owned(),
        replica: String::new(),
        status: 200,
        headers: vec![("content-type".into(), "text/plain".into())],
        policy: rfc.policy(),
        rfc,
        file: None,
        length: body.len() as u64,
        sha256: hex::encode(Sha256::digest(body)),
        stored_at: 1_700_000_000,
        validated_at: 1_700_000_000,
        immutable: false,
        ttl_override: None,
    }
}

fn partial_meta(key: &CacheKey) -> PartialMeta {
    PartialMeta {
        key: key.as_str().to_owned(),
        url: key.as_str().to_owned(),
        total_length: None,
        etag: Some("\"v1\"".into()),
        last_modified: None,
        started_at: 1_700_000_000,
    }
}

/// Fills and commits `body` as the replica of `url`, the way the fetch
/// engine does: positioned writes into the partial, then commit.
fn put(store: &ReplicaStore, url: &str, body: &[u8]) -> Arc<Replica> {
    let key = key(url);
    let partial = store
        .begin_partial(&key, partial_meta(&key), false)
        .expect("begin");
    partial.file.write_all_at(body, 0).expect("write");
    let meta = object_meta(&key, body);
    store.commit(partial, meta).expect("commit")
}

/// Everything under `dir`, relative, sorted (files and directories).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(base)
                .expect("under base")
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn read(store: &ReplicaStore, replica: &Replica) -> Vec<u8> {
    let file = store
        .open_replica(replica)
        .expect("open")
        .expect("still current");
    let mut buf = vec![0; replica.meta.length as usize];
    file.read_exact_at(&mut buf, 0).expect("read");
    buf
}

#[test]
fn commit_then_lookup_serves_the_bytes_from_a_browsable_tree() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let committed = put(
        &store,
        "http://Example.org/debian/dists/bookworm/Release",
        b"release",
    );
    assert_eq!(
        committed.meta.replica,
        "example.org:80/debian/dists/bookworm/Release"
    );

    let hit = store
        .lookup(&key("http://example.org:80/debian/dists/bookworm/Release"))
        .expect("hit");
    assert_eq!(read(&store, &hit), b"release");
    assert_eq!(hit.hits(), 1);
    assert_eq!(store.stats(), StoreStats { files: 1, bytes: 7 });

    // The root holds only the mirrored file; metadata lives in state.
    assert_eq!(
        tree(fx.root()),
        [
            "example.org:80/",
            "example.org:80/debian/",
            "example.org:80/debian/dists/",
            "example.org:80/debian/dists/bookworm/",
            "example.org:80/debian/dists/bookworm/Release",
        ]
    );
    let k = key("http://example.org/debian/dists/bookworm/Release");
    let hash = k.hash_hex();
    let obj = fx
        .config
        .state
        .join("objects")
        .join(&hash[..2])
        .join(format!("{hash}.json"));
    let (on_disk, version) =
        meta::decode_object(&fs::read(&obj).expect("metadata on disk")).expect("readable");
    assert_eq!(version, META_VERSION);
    assert_eq!(on_disk.replica, committed.meta.replica);
    // The partial and its metadata are gone.
    assert!(tree(&fx.config.state.join("partial")).is_empty());

    // peek does not count.
    store.peek(&k).expect("peek");
    assert_eq!(store.peek(&k).expect("peek").hits(), 1);
    assert!(store.lookup(&key("http://example.org/other")).is_none());
}

#[test]
fn directory_urls_become_index_html() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://example.org/docs/", b"listing");
    put(&store, "http://example.org/docs/?sort=name", b"sorted");
    assert_eq!(
        tree(fx.root()),
        [
            "example.org:80/",
            "example.org:80/docs/",
            "example.org:80/docs/index.html",
            "example.org:80/docs/index.html?sort=name",
        ]
    );
}

#[test]
fn a_directory_needed_where_a_file_is_moves_the_file_inside() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://example.org/a", b"file a");
    put(&store, "http://example.org/a/b", b"file b");

    assert_eq!(
        tree(fx.root()),
        [
            "example.org:80/",
            "example.org:80/a/",
            "example.org:80/a/b",
            "example.org:80/a/index.html"
        ]
    );
    let a = store
        .lookup(&key("http://example.org/a"))
        .expect("a still cached");
    assert_eq!(a.meta.replica, "example.org:80/a/index.html");
    assert_eq!(read(&store, &a), b"file a");
    let b = store
        .lookup(&key("http://example.org/a/b"))
        .expect("b cached");
    assert_eq!(read(&store, &b), b"file b");

    // The move survives a restart: metadata follows the file.
    drop(store);
    let store = fx.open();
    let a = store
        .lookup(&key("http://example.org/a"))
        .expect("a after reopen");
    assert_eq!(read(&store, &a), b"file a");
    assert_eq!(store.stats().files, 2);
    assert!(tree(&fx.config.state.join("journal")).is_empty());
}

#[test]
fn a_file_whose_path_is_a_directory_goes_inside_it() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://example.org/a/b", b"file b");
    let a = put(&store, "http://example.org/a", b"file a");
    assert_eq!(a.meta.replica, "example.org:80/a/index.html");
    assert_eq!(
        read(
            &store,
            &store.lookup(&key("http://example.org/a")).expect("hit")
        ),
        b"file a"
    );

    // `/a/` maps to the same file: the newer one wins, the older key is a
    // miss instead of serving the other's bytes.
    put(&store, "http://example.org/a/", b"dir listing");
    assert!(store.lookup(&key("http://example.org/a")).is_none());
    let listing = store.lookup(&key("http://example.org/a/")).expect("hit");
    assert_eq!(read(&store, &listing), b"dir listing");
    assert_eq!(
        store.stats(),
        StoreStats {
            files: 2,
            bytes: 6 + 11
        }
    );

    drop(store);
    let store = fx.open();
    assert!(store.lookup(&key("http://example.org/a")).is_none());
    assert_eq!(store.stats().files, 2);
}

#[test]
fn flat_layout_replaces_files_with_the_same_name() {
    let fx = Fixture::new(Layout::Flat, None);
    let store = fx.open();
    put(&store, "http://one.example/pool/x.deb", b"one");
    put(&store, "http://two.example/other/x.deb", b"two!");
    assert_eq!(tree(fx.root()), ["x.deb"]);
    assert!(
        store
            .lookup(&key("http://one.example/pool/x.deb"))
            .is_none()
    );
    let two = store
        .lookup(&key("http://two.example/other/x.deb"))
        .expect("hit");
    assert_eq!(read(&store, &two), b"two!");
    assert_eq!(store.stats(), StoreStats { files: 1, bytes: 4 });
}

#[test]
fn a_new_version_replaces_the_old_one() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let v1 = put(&store, "http://example.org/f", b"version 1");
    store.lookup(&key("http://example.org/f"));
    let v2 = put(&store, "http://example.org/f", b"v2");

    // A reader holding the old entry learns that it is stale instead of
    // reading v2's bytes under v1's headers.
    assert!(store.open_replica(&v1).expect("open").is_none());
    assert_eq!(read(&store, &v2), b"v2");
    assert_eq!(store.stats(), StoreStats { files: 1, bytes: 2 });
    assert_eq!(v2.hits(), 1, "hits carry over to the new version");

    let d1: [u8; 32] = Sha256::digest(b"version 1").into();
    let d2: [u8; 32] = Sha256::digest(b"v2").into();
    assert!(store.by_sha256(&d1).is_none());
    assert_eq!(
        store.by_sha256(&d2).expect("digest indexed").meta.key,
        v2.meta.key
    );
}

#[test]
fn digest_index_finds_any_key_with_that_content() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://mirror-a.example/pool/x.deb", b"same bytes");
    put(&store, "http://mirror-b.example/pool/x.deb", b"same bytes");
    let digest: [u8; 32] = Sha256::digest(b"same bytes").into();
    let found = store.by_sha256(&digest).expect("found");
    assert_eq!(read(&store, &found), b"same bytes");

    store
        .remove(&key("http://mirror-a.example/pool/x.deb"))
        .expect("remove");
    let found = store.by_sha256(&digest).expect("other key still has it");
    assert_eq!(found.meta.key, "http://mirror-b.example:80/pool/x.deb");
    store
        .remove(&key("http://mirror-b.example/pool/x.deb"))
        .expect("remove");
    assert!(store.by_sha256(&digest).is_none());
}

#[test]
fn refresh_replaces_metadata_but_not_the_body() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let k = key("http://example.org/f");
    let first = put(&store, k.as_str(), b"body");
    let mut meta = object_meta(&k, b"ignored");
    meta.validated_at = 1_800_000_000;
    meta.headers.push(("etag".into(), "\"x\"".into()));
    let refreshed = store.refresh(&k, meta).expect("refresh");
    assert_eq!(refreshed.meta.validated_at, 1_800_000_000);
    assert_eq!(refreshed.meta.length, 4);
    assert_eq!(refreshed.meta.sha256, first.meta.sha256);
    // A reader of the entry from before the refresh still gets its bytes.
    assert_eq!(read(&store, &first), b"body");

    drop(store);
    let store = fx.open();
    let after = store.peek(&k).expect("still there");
    assert_eq!(after.meta.validated_at, 1_800_000_000);
    assert!(matches!(
        store.refresh(&key("http://example.org/none"), object_meta(&k, b"")),
        Err(StoreError::Missing { .. })
    ));
}

#[test]
fn remove_deletes_file_metadata_and_empty_directories() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let r = put(&store, "http://example.org/deep/dir/f", b"x");
    put(&store, "http://example.org/keep", b"y");
    store
        .remove(&key("http://example.org/deep/dir/f"))
        .expect("remove");
    assert!(
        store
            .lookup(&key("http://example.org/deep/dir/f"))
            .is_none()
    );
    assert!(store.open_replica(&r).expect("open").is_none());
    assert_eq!(tree(fx.root()), ["example.org:80/", "example.org:80/keep"]);
    drop(store);
    assert_eq!(fx.open().stats(), StoreStats { files: 1, bytes: 1 });
}

#[test]
fn reopen_rebuilds_the_index_and_drops_what_a_crash_left() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://example.org/good", b"good bytes");
    let gone = put(&store, "http://example.org/gone", b"will vanish");
    let wrong = put(&store, "http://example.org/wrong", b"will be cut");
    // An interrupted fill with its metadata: kept for resume.
    let resumable = key("http://example.org/resume");
    let partial = store
        .begin_partial(&resumable, partial_meta(&resumable), false)
        .expect("begin");
    partial.file.write_all_at(b"half", 0).expect("write");
    drop(partial);
    // A partial without metadata and a stale temp file: strays.
    let stray = fx.config.state.join("partial").join(format!(
        "{}.part",
        key("http://example.org/stray").hash_hex()
    ));
    fs::write(&stray, b"junk").expect("write stray");
    fs::write(fx.config.state.join("partial").join("x.json.tmp"), b"{").expect("write tmp");
    drop(store);

    fs::remove_file(&gone.path).expect("simulate lost replica");
    fs::write(&wrong.path, b"short").expect("simulate truncated replica");

    let store = fx.open();
    assert_eq!(
        store.stats(),
        StoreStats {
            files: 1,
            bytes: 10
        }
    );
    let good = store
        .lookup(&key("http://example.org/good"))
        .expect("good survives");
    assert_eq!(read(&store, &good), b"good bytes");
    assert!(store.lookup(&key("http://example.org/gone")).is_none());
    assert!(store.lookup(&key("http://example.org/wrong")).is_none());
    assert!(
        !wrong.path.exists(),
        "a replica of the wrong length is not left to browse"
    );

    let (meta, len) = store.find_partial(&resumable).expect("find").expect("kept");
    assert_eq!((meta.etag.as_deref(), len), (Some("\"v1\""), 4));
    assert!(!stray.exists());
    let partials = tree(&fx.config.state.join("partial"));
    assert_eq!(partials.len(), 2, "{partials:?}");

    // Resuming keeps the bytes; starting over truncates.
    let resumed = store
        .begin_partial(&resumable, meta.clone(), true)
        .expect("resume");
    assert_eq!(resumed.len, 4);
    resumed
        .file
        .write_all_at(b" done", resumed.len)
        .expect("append");
    let full = store
        .commit(resumed, object_meta(&resumable, b"half done"))
        .expect("commit");
    assert_eq!(read(&store, &full), b"half done");
    assert!(store.find_partial(&resumable).expect("find").is_none());
    let again = store
        .begin_partial(&resumable, meta, false)
        .expect("restart");
    assert_eq!(again.len, 0);
    store.discard_partial(&resumable).expect("discard");
    assert!(store.find_partial(&resumable).expect("find").is_none());
    assert!(tree(&fx.config.state.join("partial")).is_empty());
}

/// The states a kill -9 can leave in the middle of a commit.
#[test]
fn an_interrupted_commit_never_looks_complete() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let k = key("http://example.org/f");
    put(&store, k.as_str(), b"old version!");
    drop(store);
    let hash = k.hash_hex();
    let obj = fx
        .config
        .state
        .join("objects")
        .join(&hash[..2])
        .join(format!("{hash}.json"));
    let pending = with_suffix(&obj, ".new");
    let part = fx.config.state.join("partial").join(format!("{hash}.part"));
    let replica = fx.root().join("example.org:80/f");

    // 1. Killed after writing the pending metadata and removing the old
    //    one, before the rename: the new bytes (same length!) are still in
    //    the partial. Nothing may pair the new metadata with the old file.
    let mut new_meta = object_meta(&k, b"new version!");
    new_meta.replica = "example.org:80/f".into();
    fs::write(&pending, meta::encode_object(&new_meta).expect("json")).expect("pending");
    fs::remove_file(&obj).expect("old metadata removed");
    fs::write(&part, b"new version!").expect("partial");
    let partial_json = part.with_extension("json");
    fs::write(
        &partial_json,
        serde_json::to_vec(&partial_meta(&k)).expect("json"),
    )
    .expect("partial json");
    let store = fx.open();
    assert!(
        store.lookup(&k).is_none(),
        "old bytes must not be served as the new version"
    );
    assert!(!pending.exists());
    assert_eq!(
        store.find_partial(&k).expect("find").expect("resumable").1,
        12
    );
    drop(store);

    // 2. Killed after the rename, before promoting the metadata: the bytes
    //    in place are the new ones, so the commit is finished on open.
    fs::write(&pending, meta::encode_object(&new_meta).expect("json")).expect("pending");
    fs::rename(&part, &replica).expect("rename happened");
    let store = fx.open();
    let hit = store.lookup(&k).expect("commit finished on open");
    assert_eq!(hit.meta.sha256, new_meta.sha256);
    assert_eq!(read(&store, &hit), b"new version!");
    assert!(obj.exists() && !pending.exists());
    drop(store);

    // 3. A temporary file journalled in the root is removed on open.
    let temp = fx.root().join("example.org:80").join(".cistern-1-2-3.tmp");
    fs::write(&temp, b"half a copy").expect("temp");
    fs::write(
        fx.config.state.join("journal").join(".cistern-1-2-3.tmp"),
        temp.to_str().expect("utf8"),
    )
    .expect("journal");
    let store = fx.open();
    assert!(!temp.exists());
    assert_eq!(tree(fx.root()), ["example.org:80/", "example.org:80/f"]);
    assert_eq!(store.stats().files, 1);
}

#[test]
fn commit_refuses_a_short_partial_or_a_bad_digest() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let k = key("http://example.org/f");
    let partial = store
        .begin_partial(&k, partial_meta(&k), false)
        .expect("begin");
    partial.file.write_all_at(b"trunc", 0).expect("write");
    let err = store
        .commit(partial, object_meta(&k, b"truncated body"))
        .expect_err("short");
    assert!(
        matches!(
            err,
            StoreError::Length {
                expected: 14,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(store.lookup(&k).is_none());
    assert!(tree(fx.root()).is_empty());

    let partial = store
        .begin_partial(&k, partial_meta(&k), true)
        .expect("begin");
    let mut meta = object_meta(&k, b"trunc");
    meta.sha256 = "not hex".into();
    assert!(matches!(
        store.commit(partial, meta),
        Err(StoreError::BadMeta { .. })
    ));
    // The partial is still there to resume.
    assert_eq!(store.find_partial(&k).expect("find").expect("kept").1, 5);
}

#[test]
fn eviction_removes_least_recently_used_first() {
    let fx = Fixture::new(Layout::HostPort, Some(100));
    let store = fx.open();
    put(&store, "http://example.org/a", &[b'a'; 30]);
    put(&store, "http://example.org/b", &[b'b'; 30]);
    put(&store, "http://example.org/c", &[b'c'; 30]);
    // `a` is the oldest commit but was just used.
    store.lookup(&key("http://example.org/a")).expect("a");

    // 120 bytes > 100: evict to at most 90, LRU first: `b` goes, then
    // `c`; the entry being committed stays whatever its age.
    put(&store, "http://example.org/d", &[b'd'; 30]);
    let alive: Vec<bool> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            store
                .peek(&key(&format!("http://example.org/{n}")))
                .is_some()
        })
        .collect();
    assert_eq!(alive, [true, false, true, true]);
    assert_eq!(
        store.stats(),
        StoreStats {
            files: 3,
            bytes: 90
        }
    );
    assert!(!fx.root().join("example.org:80/b").exists());

    // A single replica bigger than the cap is kept; everything else goes.
    put(&store, "http://example.org/big", &[b'x'; 150]);
    assert_eq!(
        store.stats(),
        StoreStats {
            files: 1,
            bytes: 150
        }
    );
    drop(store);
    assert_eq!(
        fx.open().stats(),
        StoreStats {
            files: 1,
            bytes: 150
        }
    );
}

#[test]
fn lru_order_follows_hits_and_survives_eviction_and_refresh() {
    let fx = Fixture::new(Layout::HostPort, Some(100));
    let store = fx.open();
    let order = |store: &ReplicaStore| -> Vec<String> {
        store
            .index
            .recency
            .lru_first()
            .iter()
            .map(|k| {
                k.as_str()
                    .trim_start_matches("http://example.org:80/")
                    .to_owned()
            })
            .collect()
    };
    // Each its own content: the same bytes would be stored (and counted)
    // once.
    for name in ["a", "b", "c"] {
        put(
            &store,
            &format!("http://example.org/{name}"),
            &[name.as_bytes()[0]; 30],
        );
    }
    assert_eq!(
        order(&store),
        ["a", "b", "c"],
        "commits come in as most recent"
    );
    store.lookup(&key("http://example.org/a")).expect("a");
    // A peek (admin, policies) is not a use.
    store.peek(&key("http://example.org/b")).expect("b");
    assert_eq!(order(&store), ["b", "c", "a"], "a hit moves to the front");
    // A 304 refresh rewrites metadata; it is not a use either.
    let c = key("http://example.org/c");
    store
        .refresh(&c, object_meta(&c, &[b'x'; 30]))
        .expect("refresh");
    assert_eq!(order(&store), ["b", "c", "a"]);

    // 120 bytes > 100: one commit evicts exactly the least recently used
    // and leaves the others where they were.
    put(&store, "http://example.org/d", &[b'd'; 30]);
    assert_eq!(order(&store), ["c", "a", "d"]);
    assert!(store.peek(&key("http://example.org/b")).is_none());

    store.lookup(&c).expect("c");
    put(&store, "http://example.org/e", &[b'e'; 30]);
    assert_eq!(order(&store), ["d", "c", "e"], "a, least recent, went");

    // After a restart, nothing says which was used last: key order.
    drop(store);
    let store = fx.open();
    assert_eq!(order(&store), ["c", "d", "e"]);
}

#[test]
fn has_partial_follows_the_partial_directory_without_touching_it() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let (a, b, c) = (
        key("http://example.org/a"),
        key("http://example.org/b"),
        key("http://example.org/c"),
    );
    assert!(!store.has_partial(&a));

    let partial = store.begin_partial(&a, partial_meta(&a), false).expect("a");
    partial.file.write_all_at(b"abc", 0).expect("write");
    assert!(store.has_partial(&a), "a fill under way");
    store
        .commit(partial, object_meta(&a, b"abc"))
        .expect("commit");
    assert!(!store.has_partial(&a), "committed: the data is in the tree");

    let partial = store.begin_partial(&b, partial_meta(&b), false).expect("b");
    partial.file.write_all_at(b"ab", 0).expect("write");
    drop(partial);
    assert!(store.has_partial(&b), "an interrupted fill stays a partial");
    drop(store.begin_partial(&c, partial_meta(&c), false).expect("c"));
    store.discard_partial(&c).expect("discard");
    assert!(!store.has_partial(&c), "discarded");

    // Recovery finds the interrupted partial again, and only that one.
    drop(store);
    let store = fx.open();
    assert!(store.has_partial(&b), "found at open");
    assert!(!store.has_partial(&a) && !store.has_partial(&c));
    let _ = store.ran_full(&b, fx.config.state.join("x"), 2);
    assert!(!store.has_partial(&b), "a partial given up on a full disk");
}

#[test]
fn state_inside_root_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let config = StoreConfig {
        root: dir.path().join("replica"),
        state: dir.path().join("replica/.cistern"),
        layout: Layout::HostPort,
        max_size: None,
        min_free: 0,
    };
    assert!(matches!(
        ReplicaStore::open(&config),
        Err(StoreError::Overlap { .. })
    ));
}

#[test]
fn traversal_urls_never_write_outside_the_root() {
    let urls = [
        "http://example.org/../../etc/passwd",
        "http://example.org/%2e%2e/%2e%2e/escape",
        "http://example.org/..%2f..%2fescape",
        "http://example.org/%2F..%2F..%2Fescape",
        "http://example.org/a/%2e%2e%5c%2e%2e%5cescape",
        "http://example.org/%00escape",
        "http://example.org//escape-abs",
        "http://example.org/?/../../escape",
        "http://..:80/escape",
    ];
    for layout in [Layout::HostPort, Layout::Flat] {
        let fx = Fixture::new(layout, None);
        let store = fx.open();
        for url in urls {
            let r = put(&store, url, url.as_bytes());
            assert!(
                r.path.starts_with(store.root()),
                "{url} → {}",
                r.path.display()
            );
            assert_eq!(read(&store, &r), url.as_bytes());
        }
        // Only the root and the state directory exist beside each other.
        let parent = fx.config.root.parent().expect("parent");
        let mut outside: Vec<String> = fs::read_dir(parent)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        outside.sort();
        assert_eq!(outside, ["replica", "replica.cistern"], "{layout:?}");
    }
}

#[test]
fn commit_across_filesystems_copies_through_a_hidden_temp() {
    // /dev/shm is a tmpfs on most Linux machines; when it is the same
    // filesystem as the temp dir there is no cross-device case to test.
    let Ok(shm) = TempDir::new_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm");
        return;
    };
    let root_dir = TempDir::new().expect("temp dir");
    let dev = |p: &Path| std::os::unix::fs::MetadataExt::dev(&fs::metadata(p).expect("stat"));
    if dev(shm.path()) == dev(root_dir.path()) {
        eprintln!("skipped: /dev/shm is on the same filesystem");
        return;
    }
    let config = StoreConfig {
        root: root_dir.path().join("replica"),
        state: shm.path().join("state"),
        layout: Layout::HostPort,
        max_size: None,
        min_free: 0,
    };
    let store = ReplicaStore::open(&config).expect("open");
    let k = key("http://example.org/dir/f");
    let partial = store
        .begin_partial(&k, partial_meta(&k), false)
        .expect("begin");
    let follower = Arc::clone(&partial.file);
    partial
        .file
        .write_all_at(b"crossing devices", 0)
        .expect("write");
    let r = store
        .commit(partial, object_meta(&k, b"crossing devices"))
        .expect("commit");
    assert_eq!(read(&store, &r), b"crossing devices");
    // A follower still reading the partial keeps its bytes.
    let mut buf = [0u8; 8];
    follower.read_exact_at(&mut buf, 0).expect("follower reads");
    assert_eq!(&buf, b"crossing");
    assert_eq!(
        tree(&config.root),
        [
            "example.org:80/",
            "example.org:80/dir/",
            "example.org:80/dir/f"
        ]
    );
    assert!(tree(&config.state.join("partial")).is_empty());
    assert!(tree(&config.state.join("journal")).is_empty());
    drop(store);
    let store = ReplicaStore::open(&config).expect("reopen");
    assert_eq!(
        read(&store, &store.lookup(&k).expect("hit")),
        b"crossing devices"
    );
}

#[test]
fn io_errors_name_the_operation_and_path_and_keep_the_tree_clean() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    put(&store, "http://example.org/ro/existing", b"x");
    let dir = fx.root().join("example.org:80/ro");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).expect("chmod");
    // Root ignores permissions; then this test has nothing to show.
    let probe = dir.join("probe");
    if fs::write(&probe, b"").is_ok() {
        let _ = fs::remove_file(&probe);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        eprintln!("skipped: running with permission overrides");
        return;
    }
    let k = key("http://example.org/ro/new");
    let partial = store
        .begin_partial(&k, partial_meta(&k), false)
        .expect("begin");
    partial.file.write_all_at(b"new", 0).expect("write");
    let err = store
        .commit(partial, object_meta(&k, b"new"))
        .expect_err("read-only dir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    match &err {
        StoreError::Io { op, path, .. } => {
            assert_eq!(*op, "rename into replica");
            assert!(path.ends_with("ro/new"), "{}", path.display());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(store.lookup(&k).is_none());
    assert_eq!(
        store.find_partial(&k).expect("find").expect("resumable").1,
        3
    );
    assert_eq!(tree(&dir), ["existing"]);
    drop(store);
    assert!(fx.open().lookup(&k).is_none());
}

#[test]
fn a_replica_deleted_by_hand_becomes_a_miss() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let k = key("http://example.org/f");
    let r = put(&store, k.as_str(), b"content");
    fs::remove_file(&r.path).expect("delete by hand");
    assert!(store.open_replica(&r).expect("open").is_none());
    assert!(store.lookup(&k).is_none());
    assert_eq!(store.stats(), StoreStats::default());

    let r = put(&store, k.as_str(), b"content");
    fs::write(&r.path, b"edited to another size").expect("edit by hand");
    assert!(store.open_replica(&r).expect("open").is_none());
    assert!(store.lookup(&k).is_none());
}

/// Commits from several threads over URLs that collide in every way the
/// mapping allows (same file, file vs directory, flat names), with
/// eviction on: afterwards, and after a reopen, every indexed key reads
/// exactly its own bytes and the totals match the files.
#[test]
fn concurrent_colliding_commits_keep_every_key_on_its_own_bytes() {
    let fx = Fixture::new(Layout::HostPort, Some(2_000));
    let store = Arc::new(fx.open());
    let urls = [
        "http://h.example/a",
        "http://h.example/a/",
        "http://h.example/a/index.html",
        "http://h.example/a/b",
        "http://h.example/a/b/",
        "http://h.example/a/b/c",
        "http://h.example/a%26b",
        "http://h.example/a&b",
        "http://h.example/a//b",
        "http://h.example/x?q=1",
    ];
    std::thread::scope(|scope| {
        for t in 0..4 {
            let store = Arc::clone(&store);
            scope.spawn(move || {
                for round in 0..15 {
                    let url = urls[(t * 3 + round) % urls.len()];
                    let k = key(url);
                    // Distinct bytes per commit; several threads may fill
                    // the same key, so serialise per key as the engine does.
                    let body = format!("{url} #{t}.{round}").repeat(1 + round % 4);
                    let dir = TempDir::new().expect("tmp");
                    let scratch = dir.path().join("body");
                    fs::write(&scratch, &body).expect("scratch");
                    let _ = store.lookup(&k);
                    let partial_meta = partial_meta(&k);
                    let _guard = KEY_LOCKS[(t * 3 + round) % urls.len()]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let partial = store.begin_partial(&k, partial_meta, false).expect("begin");
                    partial
                        .file
                        .write_all_at(body.as_bytes(), 0)
                        .expect("write");
                    store
                        .commit(partial, object_meta(&k, body.as_bytes()))
                        .expect("commit");
                }
            });
        }
    });

    let check = |store: &ReplicaStore| {
        let mut bytes = 0;
        for r in store.entries() {
            let body = read(store, &r);
            let text = String::from_utf8(body).expect("utf8");
            assert!(
                text.starts_with(&format!(
                    "{} #",
                    urls.iter()
                        .find(|u| key(u).as_str() == r.meta.key)
                        .expect("known")
                )),
                "{} holds {text}",
                r.meta.key
            );
            assert_eq!(hex::encode(Sha256::digest(text.as_bytes())), r.meta.sha256);
            bytes += r.meta.length;
        }
        assert_eq!(store.stats().bytes, bytes);
        assert!(bytes <= 2_000);
    };
    check(&store);
    let before = store.stats();
    drop(store);
    let store = fx.open();
    assert_eq!(store.stats(), before);
    check(&store);
    assert!(tree(fx.root()).iter().all(|p| !p.contains(".cistern-")));
}

static KEY_LOCKS: [Mutex<()>; 10] = [const { Mutex::new(()) }; 10];

/// Metadata as Cistern wrote it before it had a format of its own
/// (version 0): `ObjectMeta` with `http-cache-semantics` 3's `CachePolicy`
/// serialised in place, request headers and all.
fn v0_json(key: &CacheKey, replica: &str, body: &[u8], response_secs: u64) -> String {
    serde_json::json!({
        "key": key.as_str(),
        "url": key.as_str(),
        "replica": replica,
        "status": 200,
        "headers": [["content-type", "text/plain"], ["etag", "\"v0\""]],
        "policy": {
            "req": {"host": "example.org", "authorization": "Basic c2VjcmV0", "accept": ["a", "b"]},
            "res": {"cache-control": "max-age=600", "content-type": "text/plain",
                    "etag": "\"v0\"", "age": "100", "set-cookie": "id=secret"},
            "uri": key.as_str(),
            "status": 200,
            "method": "GET",
            "opts": {"shared": true, "cache_heuristic": 0.1,
                     "immutable_min_time_to_live": {"secs": 86400, "nanos": 0},
                     "ignore_cargo_cult": false},
            "res_cc": {"max-age": "600"},
            "req_cc": {},
            "response_time": {"secs_since_epoch": response_secs, "nanos_since_epoch": 5}
        },
        "length": body.len(),
        "sha256": hex::encode(Sha256::digest(body)),
        "stored_at": response_secs,
        "validated_at": response_secs,
        "immutable": false,
        "ttl_override": null
    })
    .to_string()
}

#[test]
fn metadata_round_trips_through_its_own_format() {
    let k = key("http://example.org/round");
    let mut m = object_meta(&k, b"body");
    m.replica = "example.org:80/round".into();
    m.file = Some(FileStamp {
        size: 4,
        mtime_ns: 1_700_000_000_123_456_789,
    });
    m.immutable = true;
    m.ttl_override = Some(30);
    let bytes = meta::encode_object(&m).expect("encode");
    let text = String::from_utf8(bytes.clone()).expect("utf-8");
    assert!(text.contains("\"version\": 2"), "{text}");
    assert!(
        !text.contains("c2VjcmV0"),
        "credentials are not stored: {text}"
    );
    let (back, version) = meta::decode_object(&bytes).expect("decode");
    assert_eq!(version, 2);
    assert_eq!(
        (
            &back.key,
            &back.url,
            &back.replica,
            back.status,
            &back.headers
        ),
        (&m.key, &m.url, &m.replica, m.status, &m.headers)
    );
    assert_eq!(
        (
            &back.sha256,
            back.length,
            back.file,
            back.stored_at,
            back.validated_at
        ),
        (&m.sha256, m.length, m.file, m.stored_at, m.validated_at)
    );
    assert_eq!((back.immutable, back.ttl_override), (true, Some(30)));
    assert_eq!(back.rfc.request_headers, m.rfc.request_headers);
    assert_eq!(back.rfc.response_headers, m.rfc.response_headers);
    assert_eq!(back.rfc.response_time, m.rfc.response_time);
    // The rebuilt policy says what the original said.
    let t = meta::from_unix_secs(1_700_000_030);
    assert_eq!(back.policy.time_to_live(t), m.policy.time_to_live(t));
    assert_eq!(back.policy.age(t), Duration::from_secs(30));
    // And encoding again gives the same bytes.
    assert_eq!(meta::encode_object(&back).expect("encode"), bytes);
}

#[test]
fn version_0_is_read_and_unknown_versions_refused() {
    let k = key("http://example.org/old");
    let json = v0_json(&k, "example.org:80/old", b"old", 1_700_000_000);
    let (m, version) = meta::decode_object(json.as_bytes()).expect("version 0 reads");
    assert_eq!(version, 0);
    assert_eq!(m.key, k.as_str());
    assert_eq!(m.file, None);
    // Only the selecting request header survives; cookies lose their value.
    assert_eq!(
        m.rfc.request_headers.len(),
        1,
        "{:?}",
        m.rfc.request_headers
    );
    assert_eq!(m.rfc.response_headers.get("set-cookie").expect("kept"), "");
    // Age counts from the old response time plus its Age header.
    let t = meta::from_unix_secs(1_700_000_050) + Duration::from_nanos(5);
    assert_eq!(m.policy.age(t).as_secs(), 150);
    // The cookie's presence still counts: a shared cache gives a
    // response with Set-Cookie no lifetime unless it says `public`.
    assert_eq!(m.policy.time_to_live(t).as_secs(), 0);

    let newer = br#"{"version": 7, "key": "x"}"#;
    assert!(matches!(
        meta::decode_object(newer),
        Err(meta::MetaError::Unsupported { found: 7 })
    ));
    assert!(matches!(
        meta::decode_object(b"{\"key\": garbled"),
        Err(meta::MetaError::Syntax { .. })
    ));
}

/// A store opened over version-0 metadata serves it and rewrites it in
/// the current version; unreadable metadata goes into the quarantine
/// folder, counted, and its replica file stays in the tree.
#[test]
fn open_migrates_version_0_and_quarantines_what_it_cannot_read() {
    let fx = Fixture::new(Layout::HostPort, None);
    drop(fx.open());
    let old = key("http://example.org/old");
    let bad = key("http://example.org/bad");
    let newer = key("http://example.org/newer");
    for (k, name) in [(&old, "old"), (&bad, "bad"), (&newer, "newer")] {
        let file = fx.root().join("example.org:80").join(name);
        fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        fs::write(&file, name.as_bytes()).expect("replica");
        let hash = k.hash_hex();
        let dir = fx.config.state.join("objects").join(&hash[..2]);
        fs::create_dir_all(&dir).expect("mkdir");
        let text = match name {
            "old" => v0_json(k, "example.org:80/old", b"old", 1_700_000_000),
            "bad" => "{\"key\": \"http://example.org:80/bad\", \"policy\": {".to_owned(),
            _ => "{\"version\": 99}".to_owned(),
        };
        fs::write(dir.join(format!("{hash}.json")), text).expect("metadata");
    }
    let store = fx.open();
    let r = store.lookup(&old).expect("version 0 is served");
    assert_eq!(read(&store, &r), b"old");
    assert!(store.lookup(&bad).is_none());
    assert!(store.lookup(&newer).is_none());
    assert_eq!(
        store.health(),
        StoreHealth {
            quarantined: 2,
            changed_outside: 0
        }
    );
    let hash = old.hash_hex();
    let obj = fx
        .config
        .state
        .join("objects")
        .join(&hash[..2])
        .join(format!("{hash}.json"));
    let (on_disk, version) =
        meta::decode_object(&fs::read(&obj).expect("still there")).expect("readable");
    assert_eq!(version, META_VERSION, "rewritten in the current version");
    assert!(on_disk.file.is_some(), "the file's stamp is recorded");
    let quarantined = tree(&fx.config.state.join(QUARANTINE));
    let mut expected = vec![
        format!("{}.json", bad.hash_hex()),
        format!("{}.json", newer.hash_hex()),
    ];
    expected.sort();
    assert_eq!(quarantined, expected);
    assert_eq!(
        fs::read(fx.root().join("example.org:80/bad")).expect("left in the tree"),
        b"bad"
    );
    // A fetch of the quarantined key replaces its file as usual.
    put(&store, bad.as_str(), b"fetched again");
    drop(store);
    let store = fx.open();
    assert_eq!(store.health().quarantined, 0, "nothing new to quarantine");
    let r = store.lookup(&bad).expect("stored again");
    assert_eq!(read(&store, &r), b"fetched again");
    assert!(store.lookup(&old).is_some());
}

fn set_mtime(path: &Path, secs: u64) {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for mtime");
    file.set_modified(meta::from_unix_secs(secs))
        .expect("set mtime");
}

/// Editing a replica in place without changing its size is noticed when it
/// is opened and when the store loads: it is never served with the digest
/// of the bytes it had.
#[test]
fn a_same_size_edit_is_not_served() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let k = key("http://example.org/edit");
    let r = put(&store, k.as_str(), b"original");
    fs::write(&r.path, b"EDITED!!").expect("edit in place");
    set_mtime(&r.path, 1_600_000_000);
    assert!(store.open_replica(&r).expect("open").is_none());
    assert!(store.lookup(&k).is_none());
    assert_eq!(store.health().changed_outside, 1);

    // Also when the edit happens while Cistern is stopped.
    let r = put(&store, k.as_str(), b"original");
    let other = put(&store, "http://example.org/untouched", b"untouched");
    drop(store);
    fs::write(&r.path, b"EDITED!!").expect("edit in place");
    set_mtime(&r.path, 1_600_000_000);
    let store = fx.open();
    assert!(store.lookup(&k).is_none(), "dropped on load");
    assert_eq!(store.health().changed_outside, 1);
    assert_eq!(fs::read(&r.path).expect("file kept"), b"EDITED!!");
    let o = store.lookup(&key(other.meta.key.as_str())).expect("kept");
    assert_eq!(read(&store, &o), b"untouched");
}

#[test]
fn a_hot_replica_is_moved_to_the_front_at_most_once_a_second() {
    let fx = Fixture::new(Layout::HostPort, Some(1000));
    let store = fx.open();
    for name in ["a", "b"] {
        put(&store, &format!("http://example.org/{name}"), &[b'x'; 10]);
    }
    let a = key("http://example.org/a");
    let names = |store: &ReplicaStore| -> Vec<String> {
        store
            .index
            .recency
            .lru_first()
            .iter()
            .map(|k| {
                k.as_str()
                    .trim_start_matches("http://example.org:80/")
                    .to_owned()
            })
            .collect()
    };
    store.lookup(&a).expect("a");
    assert_eq!(names(&store), ["b", "a"], "the first hit moves it");
    put(&store, "http://example.org/c", &[b'x'; 10]);
    assert_eq!(names(&store), ["b", "a", "c"]);
    // Hit again at once: counted, but not moved (no lock taken).
    store.lookup(&a).expect("a");
    assert_eq!(names(&store), ["b", "a", "c"]);
    assert_eq!(store.peek(&a).unwrap().hits(), 2);
}

/// Fills and commits `body` as a response of `status` kept aside.
fn put_status(store: &ReplicaStore, url: &str, status: u16, body: &[u8]) -> Arc<Replica> {
    let key = key(url);
    let partial = store
        .begin_partial(&key, partial_meta(&key), false)
        .expect("begin");
    partial.file.write_all_at(body, 0).expect("write");
    let mut meta = object_meta(&key, body);
    meta.status = status;
    meta.rfc.status = http::StatusCode::from_u16(status).expect("status");
    meta.policy = meta.rfc.policy();
    store.commit(partial, meta).expect("commit")
}

#[test]
fn a_response_kept_aside_never_enters_the_tree_and_survives_a_reopen() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let url = "http://example.org/pool/missing.deb";
    let r = put_status(&store, url, 404, b"no such file");
    assert!(!r.meta.in_tree());
    assert!(r.meta.replica.is_empty());
    assert!(r.path.starts_with(&fx.config.state), "{}", r.path.display());
    assert_eq!(read(&store, &r), b"no such file");
    assert!(tree(fx.root()).is_empty(), "{:?}", tree(fx.root()));
    // Not a content the digest index offers for another URL.
    let digest: [u8; 32] = Sha256::digest(b"no such file").into();
    assert!(store.by_sha256(&digest).is_none());
    drop(store);

    let store = fx.open();
    let r = store.lookup(&key(url)).expect("indexed after reopen");
    assert_eq!(r.meta.status, 404);
    assert_eq!(read(&store, &r), b"no such file");
    // A 200 replaces it: the file goes into the tree, the body goes.
    let file = put(&store, url, b"the package");
    assert!(file.meta.in_tree());
    assert_eq!(
        tree(fx.root()).last().map(String::as_str),
        Some("example.org:80/pool/missing.deb")
    );
    assert!(!r.path.exists(), "the kept-aside body is removed");
    // And a 410 after it (the store does as told; the fill decides).
    let gone = put_status(&store, url, 410, b"gone");
    assert!(gone.path.exists());
    assert!(!fx.root().join("example.org:80/pool/missing.deb").exists());
    store.remove(&key(url)).expect("remove");
    assert!(!gone.path.exists(), "removal takes the body");
}

#[test]
fn a_stray_body_is_swept_and_a_damaged_one_dropped_on_open() {
    let fx = Fixture::new(Layout::HostPort, None);
    let store = fx.open();
    let kept = put_status(&store, "http://example.org/a", 301, b"moved");
    let lost = put_status(&store, "http://example.org/b", 404, b"missing");
    drop(store);
    // The metadata of one is lost (as a crash between steps could leave).
    let hash = key("http://example.org/b").hash_hex();
    fs::remove_file(
        fx.config
            .state
            .join("objects")
            .join(&hash[..2])
            .join(format!("{hash}.json")),
    )
    .expect("remove metadata");
    let store = fx.open();
    assert!(store.lookup(&key("http://example.org/a")).is_some());
    assert!(kept.path.exists());
    assert!(store.lookup(&key("http://example.org/b")).is_none());
    assert!(!lost.path.exists(), "a body without metadata is swept");
}

#[test]
fn eviction_counts_and_removes_kept_aside_bodies() {
    let fx = Fixture::new(Layout::HostPort, Some(100));
    let store = fx.open();
    let old = put_status(&store, "http://example.org/old", 404, &[b'x'; 60]);
    let _new = put(&store, "http://example.org/new", &[b'y'; 60]);
    assert!(
        store.lookup(&key("http://example.org/old")).is_none(),
        "evicted"
    );
    assert!(!old.path.exists());
}

#[test]
fn version_1_metadata_is_read_and_a_mislabelled_entry_refused() {
    let k = key("http://example.org/v1");
    let mut m = object_meta(&k, b"body");
    m.replica = "example.org:80/v1".into();
    let text = String::from_utf8(meta::encode_object(&m).expect("encode")).expect("utf-8");
    let v1 = text.replace("\"version\": 2", "\"version\": 1");
    let (back, version) = meta::decode_object(v1.as_bytes()).expect("version 1 reads");
    assert_eq!(
        (version, back.replica.as_str(), back.status),
        (1, "example.org:80/v1", 200)
    );
    // Version 1 never kept anything aside: a null replica is not one.
    let null = v1.replace("\"replica\": \"example.org:80/v1\"", "\"replica\": null");
    assert!(meta::decode_object(null.as_bytes()).is_err());
    // Version 2: a 404 has no replica path, a 200 has one.
    let mut aside = object_meta(&k, b"body");
    aside.status = 404;
    aside.rfc.status = http::StatusCode::NOT_FOUND;
    let text = String::from_utf8(meta::encode_object(&aside).expect("encode")).expect("utf-8");
    assert!(text.contains("\"replica\": null"), "{text}");
    let (back, _) = meta::decode_object(text.as_bytes()).expect("reads");
    assert!(!back.in_tree());
    let wrong = text.replace("\"replica\": null", "\"replica\": \"example.org:80/v1\"");
    assert!(meta::decode_object(wrong.as_bytes()).is_err());
}
