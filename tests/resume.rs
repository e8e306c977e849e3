//! Never serve or keep a wrong byte: an upstream that dies mid-body, a
//! crash of Cistern itself, and a body that does not match its digest.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Cistern, Origin, Resource, find_files, get, pattern};
use sha2::{Digest, Sha256};

/// Starts `n` clients of `target` at once and returns what each got.
async fn concurrent_gets(addr: std::net::SocketAddr, target: &str, n: usize) -> Vec<common::Got> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let target = target.to_owned();
            tokio::spawn(async move { get(addr, &target).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upstream_is_resumed_for_every_waiting_client() {
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

    for (i, got) in concurrent_gets(cistern.addr, "/files/dvd.iso", 3)
        .await
        .iter()
        .enumerate()
    {
        assert_eq!(got.status, 200);
        let bytes = got
            .body
            .as_ref()
            .unwrap_or_else(|e| panic!("client {i} got a failed transfer: {e}\n{}", cistern.log()));
        assert!(
            bytes == &body,
            "client {i} got other bytes than the origin's"
        );
    }
    // One fetch for all three, cut, then one resume of the partial.
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].headers.get("range").is_none());
    let resume = &seen[1].headers;
    let range = resume
        .get("range")
        .expect("the fill resumes with Range")
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
    assert_eq!(origin.seen().len(), 2, "the hit came from the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_validator_a_cut_upstream_fails_cleanly() {
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(9, SIZE);
    // Like many real mirrors: no ETag, no Last-Modified. Nothing proves
    // that a resumed range belongs to the same version of the file.
    let resource = Resource {
        headers: vec![],
        ..Resource::new(body.clone())
    };
    origin.put(
        "/blob",
        resource
            .slow(Duration::from_millis(20))
            .die_after(300_000, 1),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);

    for got in concurrent_gets(cistern.addr, "/files/blob", 2).await {
        assert_eq!(got.status, 200);
        assert!(
            got.body.is_err(),
            "a cut body is a failed transfer, never a short or spliced one"
        );
    }
    assert_eq!(origin.seen().len(), 1, "no resume was attempted");
    assert!(find_files(&cistern.root).is_empty());
    cistern
        .log_when("why the fill was not resumed", |log| {
            log.contains("not resuming: the upstream sent no strong validator")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_death_mid_body_fails_the_transfer_and_the_next_request_resumes() {
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(7, SIZE);
    // Dies once more than a fill resumes: the first client's transfer
    // fails, the partial stays.
    let deaths = cistern::fetch::RESUME_ATTEMPTS + 1;
    origin.put(
        "/dvd.iso",
        Resource::new(body.clone())
            .slow(Duration::from_millis(20))
            .die_after(100_000, deaths),
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
    assert_eq!(
        origin.seen().len(),
        deaths as usize,
        "one fetch and its resumes"
    );

    let second = get(cistern.addr, "/files/dvd.iso").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.bytes(), &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), deaths as usize + 1);
    let resume = &seen[deaths as usize].headers;
    let range = resume
        .get("range")
        .expect("the second fetch resumes with Range")
        .to_str()
        .unwrap();
    // Each resume added what arrived before its cut (how much of what the
    // origin wrote gets through a reset varies): the partial only grew.
    let from = |h: &http::HeaderMap| -> u64 {
        h.get("range").unwrap().to_str().unwrap()["bytes=".len()..]
            .trim_end_matches('-')
            .parse()
            .unwrap()
    };
    let starts: Vec<u64> = seen[1..].iter().map(|s| from(&s.headers)).collect();
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]) && starts[0] > 0,
        "{range}: {starts:?}"
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

/// A raw HTTP/1.1 origin that ends every body by closing the connection
/// (no `Content-Length`, no chunking), the way HTTP/1.0-era servers and
/// some CGI scripts do. Answers `path → (extra headers, body)`; counts the
/// requests per path.
async fn close_delimited_origin(
    routes: Vec<(&'static str, String, bytes::Bytes)>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let routes = routes.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split(' ').nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push(path.clone());
                let Some((_, extra, body)) = routes.iter().find(|(p, _, _)| *p == path) else {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = format!("HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                for chunk in body.chunks(64 * 1024) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                // The end of the body is the FIN.
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_ended_by_connection_close_is_served_but_stored_only_with_a_digest() {
    let plain = pattern(11, 300_000);
    let signed = pattern(12, 300_000);
    let sum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&signed));
    let (addr, seen) = close_delimited_origin(vec![
        // Fresh for ten minutes: a second request that reaches the origin
        // does so because nothing was stored.
        (
            "/plain.tar",
            "Cache-Control: max-age=600\r\n".to_owned(),
            plain.clone(),
        ),
        (
            "/signed.tar",
            format!("Cache-Control: max-age=600\r\nRepr-Digest: sha-256=:{sum}:\r\n"),
            signed.clone(),
        ),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen \"127.0.0.1:{{PORT}}\"\nstore {{\n    root \"{{ROOT}}\"\n}}\nmirror \"files\" {{\n    prefix \"/files/\"\n    upstream \"http://{addr}/\"\n}}\n"
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let hits = |p: &str| seen.lock().unwrap().iter().filter(|s| *s == p).count();

    // No length, no chunking, no digest: nothing proves the FIN was the
    // end, so the body is served whole but not kept.
    let first = get(cistern.addr, "/files/plain.tar").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.bytes(), &plain);
    cistern
        .log_when("why the body was not stored", |log| {
            log.contains("plain.tar") && log.contains("ended with the upstream connection")
        })
        .await;
    assert!(find_files(&cistern.root).is_empty(), "nothing was stored");
    let second = get(cistern.addr, "/files/plain.tar").await;
    assert_eq!(second.bytes(), &plain);
    assert_eq!(
        hits("/plain.tar"),
        2,
        "the second request went upstream again"
    );

    // A matching digest proves it: stored, and the next request is a hit.
    let first = get(cistern.addr, "/files/signed.tar").await;
    assert_eq!(first.bytes(), &signed);
    let again = get(cistern.addr, "/files/signed.tar").await;
    assert_eq!(again.bytes(), &signed);
    assert_eq!(hits("/signed.tar"), 1, "served from the replica");
    assert_eq!(
        find_files(&cistern.root),
        vec![format!("{addr}/signed.tar")]
    );
}
