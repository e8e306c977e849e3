//! The replica's metadata on disk, as an operator meets it: metadata written
//! by an older Cistern is served and rewritten in the current version,
//! metadata that cannot be read is quarantined (never deleted), a replica
//! file edited in place is never served with the digest of its old content,
//! and `cistern verify` finds such edits.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{Cistern, Got, Origin, Resource, free_port, get};
use sha2::{Digest, Sha256};

/// The mirror `/files/` of the origin's root, and an admin listener.
fn config(origin: &Origin, admin: SocketAddr) -> String {
    common::files_mirror(origin) + &format!("admin {{\n    listen \"{admin}\"\n}}\n")
}

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The cache key of the origin's `path` (the mirror keys by upstream URL).
fn key(origin: &Origin, path: &str) -> String {
    format!("http://{}{path}", origin.addr)
}

/// Where the store keeps the metadata of `key`, under `state`.
fn meta_path(state: &Path, key: &str) -> PathBuf {
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    state
        .join("objects")
        .join(&hash[..2])
        .join(format!("{hash}.json"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Metadata exactly as Cistern wrote it before its format had a version
/// (`http-cache-semantics` 3's `CachePolicy` serialised in place).
fn version_0(key: &str, replica: &str, body: &[u8], response_secs: u64) -> String {
    serde_json::json!({
        "key": key,
        "url": key,
        "replica": replica,
        "status": 200,
        "headers": [["content-type", "text/plain"], ["cache-control", "max-age=3600"]],
        "policy": {
            "req": {"host": "127.0.0.1", "user-agent": "apt"},
            "res": {"content-type": "text/plain", "cache-control": "max-age=3600"},
            "uri": key,
            "status": 200,
            "method": "GET",
            "opts": {"shared": true, "cache_heuristic": 0.1,
                     "immutable_min_time_to_live": {"secs": 86400, "nanos": 0},
                     "ignore_cargo_cult": false},
            "res_cc": {"max-age": "3600"},
            "req_cc": {},
            "response_time": {"secs_since_epoch": response_secs, "nanos_since_epoch": 0}
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

/// The value of an unlabelled sample in a Prometheus page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `Repr-Digest`, if sent, names the bytes that were served; a hit from a
/// replica must send it.
fn assert_digest_matches(got: &Got, required: bool) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(got.bytes()));
    let digest = got.header("repr-digest");
    assert!(!required || !digest.is_empty(), "a hit without Repr-Digest");
    assert!(
        digest.is_empty() || digest == format!("sha-256=:{b64}:"),
        "Repr-Digest {digest} does not name the served bytes {:?}",
        got.bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_metadata_is_served_and_rewritten_unreadable_metadata_is_quarantined() {
    let origin = Origin::start().await;
    origin.put("/old.txt", Resource::new("from the origin".into()));
    origin.put("/bad.txt", Resource::new("fetched again".into()));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let state = dir.path().join("replica.cistern");
    let host = origin.addr.to_string();

    // Before Cistern starts: a replica with version-0 metadata stored ten
    // seconds ago, and one whose metadata is garbled.
    let old_file = root.join(&host).join("old.txt");
    let bad_file = root.join(&host).join("bad.txt");
    std::fs::create_dir_all(old_file.parent().unwrap()).unwrap();
    std::fs::write(&old_file, b"from the replica").unwrap();
    std::fs::write(&bad_file, b"unreadable meta").unwrap();
    let old_key = key(&origin, "/old.txt");
    let bad_key = key(&origin, "/bad.txt");
    let old_meta = meta_path(&state, &old_key);
    let bad_meta = meta_path(&state, &bad_key);
    for p in [&old_meta, &bad_meta] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    }
    let stored = unix_now() - 10;
    let v0 = version_0(
        &old_key,
        &format!("{host}/old.txt"),
        b"from the replica",
        stored,
    );
    std::fs::write(&old_meta, v0).unwrap();
    std::fs::write(&bad_meta, r#"{"key": "http://x/", "policy": {"req": [1, 2"#).unwrap();

    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);

    // The old version is a hit, with its age counted from when it was
    // stored, and the origin is not asked.
    let got = get(cistern.addr, "/files/old.txt").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes().as_ref(), b"from the replica");
    assert!(
        got.header("cache-status").contains("hit"),
        "{}",
        got.header("cache-status")
    );
    let age: u64 = got.header("age").parse().unwrap();
    assert!((10..60).contains(&age), "Age {age}");
    assert_eq!(origin.hits("/old.txt"), 0);
    assert_digest_matches(&got, false);
    // ... and its metadata was rewritten in the current version.
    let rewritten: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&old_meta).unwrap()).unwrap();
    assert_eq!(rewritten["version"], 2, "{rewritten:#}");
    assert!(
        !rewritten.to_string().contains("user-agent"),
        "request headers that do not select the response are not kept: {rewritten:#}"
    );

    // The garbled one is moved into the quarantine folder, counted, and
    // its file stays in the tree untouched.
    assert!(!bad_meta.exists(), "unreadable metadata is moved aside");
    let quarantined = state.join("quarantine").join(bad_meta.file_name().unwrap());
    assert!(
        std::fs::read_to_string(&quarantined)
            .unwrap()
            .contains("policy"),
        "the quarantined file is the metadata, as it was"
    );
    assert_eq!(std::fs::read(&bad_file).unwrap(), b"unreadable meta");
    let log = cistern.log();
    assert!(
        log.contains("quarantined") && log.contains(&bad_meta.display().to_string()),
        "the log names the file:\n{log}"
    );
    let page = get(admin, "/metrics").await;
    let page = std::str::from_utf8(page.bytes()).unwrap();
    assert_eq!(
        sample(page, "cistern_metadata_quarantined_total"),
        Some(1.0),
        "{page}"
    );

    // The next request for it fetches it again and replaces the file.
    let got = get(cistern.addr, "/files/bad.txt").await;
    assert_eq!(got.bytes().as_ref(), b"fetched again");
    assert_eq!(origin.hits("/bad.txt"), 1);
    assert_digest_matches(&got, false);
}

/// Overwrites `path` in place with `bytes` (same size) and gives it a
/// modification time the commit cannot have recorded.
fn edit_in_place(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    assert_eq!(std::fs::metadata(path).unwrap().len(), bytes.len() as u64);
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
    file.set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
}

/// Waits (bounded) until this process has committed `n` fills: a small
/// body reaches the client before its fill is committed.
async fn wait_fills(cistern: &Cistern, n: usize) {
    cistern
        .log_when("the fill committed", |log| {
            log.matches("fill complete").count() >= n
        })
        .await;
}

fn run_verify(dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["verify", "--config", "config.kdl"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_edited_in_place_is_fetched_again_also_after_a_restart() {
    const BODY: &[u8] = b"the origin's own content";
    const EDIT: &[u8] = b"EDITED by hand, same len";
    let origin = Origin::start().await;
    origin.put(
        "/e.txt",
        Resource::new(BODY.into()).header("cache-control", "max-age=3600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("replica.cistern");
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);
    let file = cistern.root.join(origin.addr.to_string()).join("e.txt");
    let meta = meta_path(&state, &key(&origin, "/e.txt"));
    let stamp = |meta: &Path| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(meta).unwrap()).unwrap()["file"]
            .clone()
    };

    assert_eq!(
        get(cistern.addr, "/files/e.txt").await.bytes().as_ref(),
        BODY
    );
    wait_fills(&cistern, 1).await;
    let (ok, out) = run_verify(dir.path());
    assert!(ok, "a clean tree verifies:\n{out}");
    assert_eq!(
        stamp(&meta)["size"],
        BODY.len(),
        "the commit records the file"
    );
    assert!(out.contains("1 replica(s)"), "{out}");

    // Edited while Cistern runs: the next request fetches it again.
    edit_in_place(&file, EDIT);
    let (ok, out) = run_verify(dir.path());
    assert!(!ok, "verify must fail on an edited replica:\n{out}");
    assert!(
        out.contains(&file.display().to_string()) && out.contains("content changed"),
        "verify names the edited file:\n{out}"
    );
    let got = get(cistern.addr, "/files/e.txt").await;
    assert_digest_matches(&got, false);
    assert_eq!(got.bytes().as_ref(), BODY, "never the edited bytes");
    assert_eq!(origin.hits("/e.txt"), 2);
    // Served once more from the replica (now also from memory).
    wait_fills(&cistern, 2).await;
    let got = get(cistern.addr, "/files/e.txt").await;
    assert_eq!(got.bytes().as_ref(), BODY);
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_digest_matches(&got, true);
    assert_eq!(origin.hits("/e.txt"), 2);
    assert_eq!(std::fs::read(&file).unwrap(), BODY);
    let page = get(admin, "/metrics").await;
    let page = std::str::from_utf8(page.bytes()).unwrap();
    assert_eq!(
        sample(page, "cistern_replicas_changed_outside_total"),
        Some(1.0),
        "{page}"
    );

    // Edited while Cistern is stopped: noticed on start.
    drop(cistern);
    edit_in_place(&file, EDIT);
    let cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);
    let got = get(cistern.addr, "/files/e.txt").await;
    assert_digest_matches(&got, false);
    assert_eq!(got.bytes().as_ref(), BODY, "never the edited bytes");
    assert_eq!(origin.hits("/e.txt"), 3);
    let log = cistern.log();
    assert!(log.contains("modified outside Cistern"), "{log}");
    wait_fills(&cistern, 1).await;
    let (ok, out) = run_verify(dir.path());
    assert!(ok, "fetched again, the tree verifies:\n{out}");
}
