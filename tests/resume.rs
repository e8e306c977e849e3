//! Never serve or keep a wrong byte: an upstream that dies mid-body, a
//! crash of Cistern itself, and a body that does not match its digest.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Cistern, Origin, Resource, find_files, get, pattern};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_death_mid_body_fails_the_transfer_and_the_next_request_resumes() {
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(7, SIZE);
    origin.put(
        "/dvd.iso",
        Resource::new(body.clone())
            .slow(Duration::from_millis(20))
            .die_after(300_000, 1),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);

    let first = get(cistern.addr, "/files/dvd.iso").await;
    assert_eq!(first.status, 200);
    assert!(
        first.body.is_err(),
        "a cut upstream must be a failed transfer, not a short body"
    );
    assert!(
        find_files(&cistern.root).is_empty(),
        "nothing that looks complete is in the replica"
    );

    let second = get(cistern.addr, "/files/dvd.iso").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.bytes(), &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    let resume = &seen[1].headers;
    let range = resume
        .get("range")
        .expect("the second fetch resumes with Range")
        .to_str()
        .unwrap();
    assert!(
        range.starts_with("bytes=") && range != "bytes=0-",
        "{range}"
    );
    assert_eq!(resume.get("if-range").unwrap(), "\"v1\"");
    let on_disk =
        std::fs::read(cistern.root.join(origin.addr.to_string()).join("dvd.iso")).unwrap();
    assert_eq!(Sha256::digest(&on_disk), Sha256::digest(&body));
    let hit = get(cistern.addr, "/files/dvd.iso").await;
    let want = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
    assert_eq!(hit.header("repr-digest"), format!("sha-256=:{want}:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_fill_then_restart_resumes_the_partial() {
    const SIZE: usize = 8 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(8, SIZE);
    origin.put(
        "/big.img",
        Resource::new(body.clone()).slow(Duration::from_millis(10)),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = common::files_mirror(&origin);
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let addr = cistern.addr;
    let reader = tokio::spawn(async move {
        common::read(common::send(addr, "GET", "/files/big.img", &[]).await).await
    });
    // Let a good part arrive, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let partial_bytes: u64 = walk_sizes(&dir.path().join("replica.cistern"));
        if partial_bytes > 1_000_000 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = cistern.addr.port();
    cistern.kill9();
    let cut = reader.await.unwrap();
    assert!(
        cut.body.is_err(),
        "the client of a killed proxy sees a failed transfer"
    );
    assert!(find_files(&dir.path().join("replica")).is_empty());

    // Restart on the same port with the same config: the partial is resumed.
    let cistern = Cistern::spawn(
        dir.path(),
        port,
        dir.path().join("replica"),
        &["--config", "config.kdl"],
        &[],
    );
    origin.put("/big.img", Resource::new(body.clone()));
    let again = get(cistern.addr, "/files/big.img").await;
    assert_eq!(again.bytes(), &body, "{}", cistern.log());
    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert!(
        last.headers.get("range").is_some(),
        "restart resumed with Range"
    );
}

fn walk_sizes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += walk_sizes(&p);
            } else if p.extension().is_some_and(|x| x == "part") {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_match_the_announced_digest_is_never_committed() {
    let origin = Origin::start().await;
    let body = pattern(10, 200_000);
    let wrong = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"something else"));
    origin.put(
        "/tampered.deb",
        Resource::new(body.clone()).header("repr-digest", &format!("sha-256=:{wrong}:")),
    );
    let right = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
    origin.put(
        "/good.deb",
        Resource::new(body.clone()).header("digest", &format!("SHA-256={right}")),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);

    let bad = get(cistern.addr, "/files/tampered.deb").await;
    assert!(
        bad.body.is_err(),
        "the client must not receive a complete-looking wrong body"
    );
    assert!(find_files(&cistern.root).is_empty());
    cistern
        .log_when("the SHA-256 mismatch", |log| log.contains("SHA-256"))
        .await;

    let good = get(cistern.addr, "/files/good.deb").await;
    assert_eq!(good.bytes(), &body);
    assert_eq!(
        find_files(&cistern.root),
        vec![format!("{}/good.deb", origin.addr)]
    );
}
