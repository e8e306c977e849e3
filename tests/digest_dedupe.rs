//! Digest dedupe on disk: the same content under two URLs is one file
//! (two hard links), counted once in the store's size, rebuilt so at
//! start, and removing one URL's replica keeps the other's.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cistern::clock::Clock;
use common::{Origin, Resource, get, pattern, request};
use http::StatusCode;
use serde_json::Value;

fn config(dir: &Path, origin: &Origin, store_extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
{store_extra}
}}
admin {{
    listen "127.0.0.1:0"
}}
mirror "m" {{
    prefix "/m/"
    upstream "http://{}/pub/"
}}
"#,
        dir.join("replica").display(),
        origin.addr
    )
}

async fn start(dir: &Path, origin: &Origin) -> cistern::app::Running {
    start_with(dir, origin, "").await
}

async fn start_with(dir: &Path, origin: &Origin, store_extra: &str) -> cistern::app::Running {
    let text = config(dir, origin, store_extra);
    common::start_on_clock(&text, &dir.join("config.kdl"), &Clock::default()).await
}

/// The store's files and bytes, from the admin JSON.
async fn store_size(admin: SocketAddr) -> (u64, u64) {
    let got = get(admin, "/api/status").await;
    let v: Value = serde_json::from_slice(got.bytes()).unwrap();
    (
        v["replica_files"].as_u64().unwrap(),
        v["replica_bytes"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_content_under_two_urls_is_stored_once_and_counted_once() {
    let origin = Origin::start().await;
    let body = pattern(11, 300_000);
    // Two names for one file, as distributions publish (by-hash, aliases);
    // different validators: only the bytes are the same.
    origin.put("/pub/pool/a.deb", Resource::new(body.clone()));
    origin.put(
        "/pub/by-hash/b",
        Resource::new(body.clone()).header("etag", "\"other\""),
    );
    origin.put("/pub/pool/c.deb", Resource::new(pattern(12, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let tree: PathBuf = dir
        .path()
        .join("replica")
        .join(origin.addr.to_string())
        .join("pub");
    let (a, b) = (tree.join("pool/a.deb"), tree.join("by-hash/b"));
    let len = body.len() as u64;

    let cistern = start(dir.path(), &origin).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    assert_eq!(get(addr, "/m/pool/a.deb").await.bytes(), &body);
    assert_eq!(get(addr, "/m/by-hash/b").await.bytes(), &body);
    assert_eq!(get(addr, "/m/pool/c.deb").await.status, StatusCode::OK);
    let (ma, mb) = (
        std::fs::metadata(&a).unwrap(),
        std::fs::metadata(&b).unwrap(),
    );
    assert_eq!(ma.ino(), mb.ino(), "one file, two links");
    assert_eq!(ma.nlink(), 2);
    assert_eq!(std::fs::read(&b).unwrap(), body);
    assert_eq!(store_size(admin).await, (3, len + 1000), "counted once");
    // Both are served from the replica.
    assert_eq!(get(addr, "/m/by-hash/b").await.bytes(), &body);
    assert_eq!(origin.hits("/pub/by-hash/b"), 1);

    // Rebuilt from disk at start: still counted once.
    cistern.shutdown().await;
    let cistern = start(dir.path(), &origin).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    assert_eq!(store_size(admin).await, (3, len + 1000), "after a restart");

    // An unsafe method invalidates one URL (RFC 9111 §4.4): its link goes,
    // the other keeps the bytes and is still a hit.
    let deleted = request(addr, "DELETE", "/m/by-hash/b", &[]).await;
    assert!(deleted.status.is_success(), "{}", deleted.status);
    assert!(!b.exists());
    assert_eq!(std::fs::metadata(&a).unwrap().nlink(), 1);
    assert_eq!(store_size(admin).await, (2, len + 1000));
    assert_eq!(get(addr, "/m/pool/a.deb").await.bytes(), &body);
    assert_eq!(
        origin.hits("/pub/pool/a.deb"),
        1,
        "still served from the replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_counts_linked_content_once_and_frees_it_with_its_last_link() {
    let origin = Origin::start().await;
    let kib = 1024;
    let same = pattern(21, 300 * kib);
    origin.put("/pub/a", Resource::new(same.clone()));
    origin.put("/pub/b", Resource::new(same.clone()));
    origin.put("/pub/c", Resource::new(pattern(22, 300 * kib)));
    origin.put("/pub/d", Resource::new(pattern(23, 300 * kib)));
    let dir = tempfile::tempdir().unwrap();
    let cistern = start_with(dir.path(), &origin, "    max-size \"700KiB\"").await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    let bytes = 300 * kib as u64;
    for f in ["a", "b", "c"] {
        assert_eq!(get(addr, &format!("/m/{f}")).await.status, StatusCode::OK);
    }
    // a and b are one file: 600 KiB stored, under the bound, nothing
    // evicted (counted twice they would be 900 KiB, and a would go).
    assert_eq!(store_size(admin).await, (3, 2 * bytes));
    // d takes it to 900 KiB: eviction down to 630 KiB takes the least
    // recently used, a, which frees nothing while b still links the
    // bytes, then b, which frees them.
    assert_eq!(get(addr, "/m/d").await.status, StatusCode::OK);
    assert_eq!(store_size(admin).await, (2, 2 * bytes));
    for (f, hits) in [("c", 1), ("d", 1)] {
        assert_eq!(get(addr, &format!("/m/{f}")).await.status, StatusCode::OK);
        assert_eq!(origin.hits(&format!("/pub/{f}")), hits, "{f} was kept");
    }
    assert_eq!(get(addr, "/m/a").await.bytes(), &same);
    assert_eq!(origin.hits("/pub/a"), 2, "a was evicted");
}
