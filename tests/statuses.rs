//! Every storable status, not only 200 (RFC 9111 §3, RFC 9110 §15.1): a
//! redirect, a 404, a 410, a 204 or a 503 with explicit freshness, and the
//! heuristically cacheable ones with only a `Last-Modified`, are stored and
//! served from the cache with one upstream request; the browsable tree
//! never holds them (they are kept aside in the state directory); a 200
//! replaces a stored 404, and a 404 never replaces a stored file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cistern::app::Running;
use cistern::clock::Clock;
use common::{Cistern, Origin, Resource, find_files, get, pattern, request};
use http::StatusCode;
use sha2::{Digest, Sha256};

async fn start(upstream: std::net::SocketAddr, dir: &Path, clock: &Clock) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "site" {{
    prefix "/"
    upstream "http://{upstream}/"
}}
"#,
        dir.join("replica").display(),
    );
    common::start_on_clock(&text, &dir.join("config.kdl"), clock).await
}

/// A response of `status` with exactly these headers (no validators
/// unless given) and `body`.
fn answer(status: u16, body: &'static [u8], headers: &[(&str, &str)]) -> Resource {
    Resource {
        status: StatusCode::from_u16(status).unwrap(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Resource::new(Bytes::from_static(body))
    }
}

/// The files under the state directory's `objects/` whose name ends in
/// `suffix`.
fn state_files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let objects = dir.join("replica.cistern").join("objects");
    find_files(&objects)
        .into_iter()
        .filter(|f| f.ends_with(suffix))
        .map(|f| objects.join(f))
        .collect()
}

/// Waits (bounded) until no fill is in progress, so that what follows
/// sees their commits.
async fn settled(cistern: &Running) {
    for _ in 0..500 {
        if cistern.proxy.engine().in_progress().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a fill never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_with_max_age_is_served_from_the_cache_and_never_enters_the_tree() {
    let origin = Origin::start().await;
    origin.put(
        "/pool/missing.deb",
        answer(
            404,
            b"no such package\n",
            &[
                ("cache-control", "max-age=600"),
                ("content-type", "text/plain"),
            ],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let first = get(addr, "/pool/missing.deb").await;
    assert_eq!(first.status, 404);
    assert_eq!(first.bytes().as_ref(), b"no such package\n");
    settled(&cistern).await;
    let second = get(addr, "/pool/missing.deb").await;
    assert_eq!(second.status, 404);
    assert_eq!(second.bytes().as_ref(), b"no such package\n");
    assert_eq!(second.header("content-type"), "text/plain");
    assert_eq!(second.header("cache-status"), "cistern; hit");
    assert_eq!(second.header("accept-ranges"), "", "a 404 has no ranges");
    assert!(
        second.header("repr-digest").is_empty(),
        "{:?}",
        second.headers
    );
    // HEAD and a range request are answered from it too, whole.
    let head = request(addr, "HEAD", "/pool/missing.deb", &[]).await;
    assert_eq!(head.status, 404);
    assert!(head.bytes().is_empty());
    let ranged = request(addr, "GET", "/pool/missing.deb", &[("range", "bytes=0-3")]).await;
    assert_eq!(ranged.status, 404);
    assert_eq!(ranged.bytes().as_ref(), b"no such package\n");
    // A condition does not turn a 404 into a 304 (RFC 9110 §13.2.1).
    let cond = request(addr, "GET", "/pool/missing.deb", &[("if-none-match", "*")]).await;
    assert_eq!(cond.status, 404);
    assert_eq!(
        origin.hits("/pool/missing.deb"),
        1,
        "five client requests, one upstream request: {:#?}",
        origin.seen()
    );
    assert!(
        find_files(&dir.path().join("replica")).is_empty(),
        "nothing in the browsable tree: {:?}",
        find_files(&dir.path().join("replica"))
    );
    assert_eq!(state_files(dir.path(), ".body").len(), 1);

    // Age counts on the manual clock.
    clock.advance(Duration::from_secs(120));
    let later = get(addr, "/pool/missing.deb").await;
    assert_eq!(later.status, 404);
    let age: u64 = later.header("age").parse().expect("an Age");
    assert!((120..130).contains(&age), "Age {age}");
    assert_eq!(origin.hits("/pool/missing.deb"), 1);

    // A 404 without freshness (the origin's default) is not stored.
    assert_eq!(get(addr, "/pool/other.deb").await.status, 404);
    settled(&cistern).await;
    assert_eq!(get(addr, "/pool/other.deb").await.status, 404);
    assert_eq!(origin.hits("/pool/other.deb"), 2);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_301_with_max_age_is_stored_and_a_302_without_freshness_is_not() {
    let origin = Origin::start().await;
    origin.put(
        "/moved",
        answer(
            301,
            b"",
            &[("cache-control", "max-age=600"), ("location", "/new-home")],
        ),
    );
    origin.put("/elsewhere", answer(302, b"", &[("location", "/today")]));
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    for round in 0..2 {
        let got = get(addr, "/moved").await;
        assert_eq!(got.status, 301, "round {round}");
        assert_eq!(got.header("location"), "/new-home");
        let got = get(addr, "/elsewhere").await;
        assert_eq!(got.status, 302, "round {round}");
        assert_eq!(got.header("location"), "/today");
        settled(&cistern).await;
    }
    assert_eq!(origin.hits("/moved"), 1, "301 with max-age: stored");
    assert_eq!(
        origin.hits("/elsewhere"),
        2,
        "302 is not heuristically cacheable: asked every time"
    );
    assert!(find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_and_a_404_with_only_last_modified_are_fresh_by_heuristic() {
    let origin = Origin::start().await;
    let lm = ("last-modified", "Wed, 01 Jan 2020 00:00:00 GMT");
    origin.put("/gone", answer(410, b"gone for good\n", &[lm]));
    origin.put("/absent", answer(404, b"absent\n", &[lm]));
    // 503 is not heuristically cacheable: the same header stores nothing.
    origin.put("/busy", answer(503, b"busy\n", &[lm]));
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    for _ in 0..2 {
        assert_eq!(get(addr, "/gone").await.status, 410);
        assert_eq!(get(addr, "/absent").await.status, 404);
        assert_eq!(get(addr, "/busy").await.status, 503);
        settled(&cistern).await;
    }
    assert_eq!(origin.hits("/gone"), 1);
    assert_eq!(origin.hits("/absent"), 1);
    assert_eq!(origin.hits("/busy"), 2);
    let got = get(addr, "/gone").await;
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(got.bytes().as_ref(), b"gone for good\n");
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_and_a_503_with_max_age_are_stored() {
    let origin = Origin::start().await;
    origin.put(
        "/ping",
        answer(204, b"", &[("cache-control", "max-age=600")]),
    );
    origin.put(
        "/maintenance",
        answer(
            503,
            b"down for maintenance\n",
            &[("cache-control", "max-age=60")],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    for round in 0..2 {
        let got = get(addr, "/ping").await;
        assert_eq!(got.status, 204, "round {round}");
        assert!(got.bytes().is_empty());
        assert_eq!(got.header("content-length"), "", "never a length on a 204");
        let got = get(addr, "/maintenance").await;
        assert_eq!(got.status, 503, "round {round}");
        assert_eq!(got.bytes().as_ref(), b"down for maintenance\n");
        settled(&cistern).await;
    }
    assert_eq!(origin.hits("/ping"), 1);
    assert_eq!(origin.hits("/maintenance"), 1);
    // Past its max-age the 503 is asked about again.
    clock.advance(Duration::from_secs(61));
    assert_eq!(get(addr, "/maintenance").await.status, 503);
    assert_eq!(origin.hits("/maintenance"), 2);
    assert!(find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_replaces_a_stored_404_once_it_expires() {
    let origin = Origin::start().await;
    origin.put(
        "/dists/new/Release",
        answer(404, b"not yet\n", &[("cache-control", "max-age=60")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    assert_eq!(get(addr, "/dists/new/Release").await.status, 404);
    settled(&cistern).await;
    origin.put(
        "/dists/new/Release",
        Resource::new(pattern(3, 5000)).header("cache-control", "max-age=600"),
    );
    // Still fresh: the stored 404 answers.
    assert_eq!(get(addr, "/dists/new/Release").await.status, 404);
    assert_eq!(origin.hits("/dists/new/Release"), 1);

    clock.advance(Duration::from_secs(61));
    let got = get(addr, "/dists/new/Release").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &pattern(3, 5000));
    settled(&cistern).await;
    let got = get(addr, "/dists/new/Release").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/dists/new/Release"), 2);
    let file = dir
        .path()
        .join("replica")
        .join(origin.addr.to_string())
        .join("dists/new/Release");
    assert_eq!(std::fs::read(&file).unwrap(), pattern(3, 5000));
    assert!(
        state_files(dir.path(), ".body").is_empty(),
        "the 404's body went with it"
    );
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_never_replaces_a_stored_file() {
    let origin = Origin::start().await;
    let file_body = pattern(4, 3000);
    origin.put(
        "/pool/p.deb",
        Resource::new(file_body.clone()).header("cache-control", "max-age=60"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, "/pool/p.deb").await.bytes(), &file_body);
    settled(&cistern).await;

    // The mirror loses the file for a while (a sync in progress).
    origin.put(
        "/pool/p.deb",
        answer(404, b"syncing\n", &[("cache-control", "max-age=600")]),
    );
    clock.advance(Duration::from_secs(61));
    let got = get(addr, "/pool/p.deb").await;
    assert_eq!(got.status, 404, "the client hears what the upstream says");
    settled(&cistern).await;
    let file = dir
        .path()
        .join("replica")
        .join(origin.addr.to_string())
        .join("pool/p.deb");
    assert_eq!(std::fs::read(&file).unwrap(), file_body, "the file stays");
    assert!(state_files(dir.path(), ".body").is_empty());

    // Back: a revalidation (304) serves the kept file, no body fetched.
    origin.put(
        "/pool/p.deb",
        Resource::new(file_body.clone()).header("cache-control", "max-age=60"),
    );
    let got = get(addr, "/pool/p.deb").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &file_body);
    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        last.headers
            .get("if-none-match")
            .map(|v| v.to_str().unwrap()),
        Some("\"v1\""),
        "the kept file is revalidated: {seen:#?}"
    );
    assert_eq!(origin.hits("/pool/p.deb"), 3);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_error_page_passes_through_unstored() {
    let origin = Origin::start().await;
    let page: &'static [u8] = Box::leak(vec![b'e'; 100 * 1024].into_boxed_slice());
    origin.put(
        "/big-404",
        answer(404, page, &[("cache-control", "max-age=600")]),
    );
    origin.put(
        "/big-410-chunked",
        answer(410, page, &[("cache-control", "max-age=600")]).unknown_length(),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];
    for _ in 0..2 {
        let got = get(addr, "/big-404").await;
        assert_eq!((got.status.as_u16(), got.bytes().len()), (404, page.len()));
        let got = get(addr, "/big-410-chunked").await;
        assert_eq!((got.status.as_u16(), got.bytes().len()), (410, page.len()));
        settled(&cistern).await;
    }
    assert_eq!(origin.hits("/big-404"), 2);
    assert_eq!(origin.hits("/big-410-chunked"), 2);
    assert!(state_files(dir.path(), ".body").is_empty());
    assert!(find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_redirect_superseded_by_one_not_stored_is_dropped() {
    let origin = Origin::start().await;
    origin.put(
        "/latest",
        answer(
            301,
            b"",
            &[("cache-control", "max-age=60"), ("location", "/v1")],
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, "/latest").await.header("location"), "/v1");
    settled(&cistern).await;
    assert_eq!(state_files(dir.path(), ".body").len(), 1);

    origin.put("/latest", answer(302, b"", &[("location", "/v2")]));
    clock.advance(Duration::from_secs(61));
    let got = get(addr, "/latest").await;
    assert_eq!((got.status.as_u16(), got.header("location")), (302, "/v2"));
    settled(&cistern).await;
    assert!(
        state_files(dir.path(), ".body").is_empty(),
        "the old 301 is gone"
    );
    assert!(state_files(dir.path(), ".json").is_empty());
    assert_eq!(get(addr, "/latest").await.header("location"), "/v2");
    assert_eq!(origin.hits("/latest"), 3);
    cistern.shutdown().await;
}

/// `cistern verify` in `dir`: success and its output.
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
async fn a_kept_aside_404_survives_a_restart_and_is_verified() {
    let origin = Origin::start().await;
    origin.put(
        "/gone.txt",
        answer(404, b"gone\n", &[("cache-control", "max-age=3600")]),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = common::files_mirror(&origin);
    let cistern = Cistern::start(dir.path(), &config, &[]);
    assert_eq!(get(cistern.addr, "/files/gone.txt").await.status, 404);
    cistern
        .log_when("the 404 kept aside", |log| log.contains("fill complete"))
        .await;
    drop(cistern);

    let key = format!("http://{}/gone.txt", origin.addr);
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let objects = dir.path().join("replica.cistern/objects").join(&hash[..2]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(objects.join(format!("{hash}.json"))).unwrap())
            .unwrap();
    assert_eq!(meta["version"], 2);
    assert_eq!(meta["replica"], serde_json::Value::Null);
    assert_eq!(meta["response"]["status"], 404);
    let (ok, out) = run_verify(dir.path());
    assert!(ok && out.contains("1 replica(s)"), "{out}");

    let cistern = Cistern::start(dir.path(), &config, &[]);
    let got = get(cistern.addr, "/files/gone.txt").await;
    assert_eq!(got.status, 404);
    assert_eq!(got.bytes().as_ref(), b"gone\n");
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/gone.txt"), 1, "served after the restart");
    assert!(find_files(&cistern.root).is_empty());
    drop(cistern);

    // A body changed behind Cistern's back is found.
    std::fs::write(objects.join(format!("{hash}.body")), b"GONE\n").unwrap();
    let (ok, out) = run_verify(dir.path());
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("{hash}.body")), "{out}");
}
