//! One upstream fetch per file, however many clients ask at once; readers
//! stream the growing file; a client leaving never cancels the fetch.

mod common;

use std::time::{Duration, Instant, SystemTime};

use cistern::clock::Clock;
use cistern::fetch::{ErrorKind, FillState};
use common::{Cistern, Origin, Resource, get, pattern, request, send};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

/// Reads a body as it streams: its SHA-256, its length, and when its first
/// byte arrived.
async fn stream_digest(
    resp: http::Response<hyper::body::Incoming>,
) -> (Result<[u8; 32], String>, u64, Option<Instant>) {
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut first = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if !d.is_empty() && first.is_none() {
                        first = Some(Instant::now());
                    }
                    len += d.len() as u64;
                    hasher.update(&d);
                }
            }
            Err(e) => return (Err(e.to_string()), len, first),
        }
    }
    (Ok(hasher.finalize().into()), len, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_of_a_cold_64_mib_file_cause_one_upstream_fetch() {
    const SIZE: usize = 64 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(9, SIZE);
    let want: [u8; 32] = Sha256::digest(&body).into();
    // 1024 chunks of 64 KiB, 3 ms apart: about three seconds of fill.
    origin.put(
        "/big.iso",
        Resource::new(body).slow(Duration::from_millis(3)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);

    let mut clients = Vec::new();
    for _ in 0..50 {
        let addr = cistern.addr;
        clients.push(tokio::spawn(async move {
            let resp = send(addr, "GET", "/files/big.iso", &[]).await;
            let status = resp.status();
            let cache = resp
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned());
            let (digest, len, first) = stream_digest(resp).await;
            (status, cache, digest, len, first)
        }));
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    let done = Instant::now();
    assert_eq!(origin.hits("/big.iso"), 1, "exactly one upstream request");
    let origin_first = origin
        .first_byte_at("/big.iso")
        .expect("origin sent the body");
    let mut collapsed = 0;
    for (status, cache, digest, len, first) in &results {
        assert_eq!(*status, 200);
        assert_eq!(*len, SIZE as u64);
        assert_eq!(
            digest.as_ref().unwrap(),
            &want,
            "every client gets the right bytes"
        );
        if cache.as_deref().unwrap_or("").contains("collapsed") {
            collapsed += 1;
        }
        // Followers stream while the file grows: their first byte comes long
        // before the fill ends, not after it.
        let first = first.unwrap();
        assert!(first >= origin_first);
        assert!(
            first.duration_since(origin_first) < done.duration_since(origin_first) / 2,
            "a client waited for the whole fill before its first byte"
        );
    }
    assert_eq!(collapsed, 49, "one leader, 49 collapsed followers");
    // And now it is a hit.
    let hit = get(cistern.addr, "/files/big.iso").await;
    assert!(hit.header("cache-status").contains("hit"));
    assert_eq!(origin.hits("/big.iso"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_are_answered_while_the_file_is_still_filling() {
    const SIZE: usize = 8 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(5, SIZE);
    // 128 chunks of 64 KiB, 100 ms apart: the fill takes about 13 s, far
    // longer than asking for a range takes on a loaded machine.
    origin.put(
        "/pkg.tar",
        Resource::new(body.clone()).slow(Duration::from_millis(100)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);
    let committed = cistern.root.join(origin.addr.to_string()).join("pkg.tar");

    // Start the fill, then ask for a range near the start and one near the end.
    let leader = tokio::spawn({
        let addr = cistern.addr;
        async move { common::read(send(addr, "GET", "/files/pkg.tar", &[]).await).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while origin.first_byte_at("/pkg.tar").is_none() {
        assert!(
            Instant::now() < deadline,
            "the origin never started sending"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let early = request(
        cistern.addr,
        "GET",
        "/files/pkg.tar",
        &[("range", "bytes=100-199")],
    )
    .await;
    assert_eq!(early.status, 206);
    assert_eq!(
        early.header("content-range"),
        format!("bytes 100-199/{SIZE}")
    );
    assert_eq!(early.bytes(), &body.slice(100..200));
    // Answered from the growing partial, not after the download: the
    // replica is not committed yet and the leader is still reading.
    assert!(
        !committed.exists() && !leader.is_finished(),
        "the early range waited for the whole fill"
    );
    let tail = request(
        cistern.addr,
        "GET",
        "/files/pkg.tar",
        &[("range", "bytes=-1000")],
    )
    .await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.bytes(), &body.slice(SIZE - 1000..));
    let whole = leader.await.unwrap();
    assert_eq!(whole.bytes(), &body);
    assert_eq!(origin.hits("/pkg.tar"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_cancel_the_fill() {
    const SIZE: usize = 4 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(6, SIZE);
    origin.put(
        "/linux.tar.xz",
        Resource::new(body.clone()).slow(Duration::from_millis(5)),
    );
    let dir = tempfile::tempdir().unwrap();
    // Every orphan is finished (the quick-abort rules would cut this one:
    // tests/bounded.rs tests them).
    let text = common::files_mirror(&origin) + "limit {\n    orphan-finish-done \"0%\"\n}\n";
    let cistern = Cistern::start(dir.path(), &text, &[]);

    // The only client reads a little and hangs up.
    let resp = send(cistern.addr, "GET", "/files/linux.tar.xz", &[]).await;
    let mut b = resp.into_body();
    let _ = b.frame().await;
    drop(b);
    // The fill carries on and the replica completes.
    let file = cistern
        .root
        .join(origin.addr.to_string())
        .join("linux.tar.xz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        body,
        "the replica completed without any client"
    );
    // The file lands a moment before the fill publishes its end, so the next
    // client may still read along it; either way the origin is not asked again.
    let next = get(cistern.addr, "/files/linux.tar.xz").await;
    assert_eq!(next.bytes(), &body);
    assert_eq!(origin.hits("/linux.tar.xz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_nobody_reads_stops_after_orphan_fill_and_is_resumed_later() {
    const SIZE: usize = 4 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(11, SIZE);
    origin.put(
        "/orphan.bin",
        Resource::new(body.clone()).slow(Duration::from_millis(20)),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = common::files_mirror(&origin) + "timeouts {\n    orphan-fill \"0s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &text, &[]);

    let resp = send(cistern.addr, "GET", "/files/orphan.bin", &[]).await;
    let mut b = resp.into_body();
    let _ = b.frame().await;
    drop(b);
    cistern
        .log_when("the abandoned fill", |log| log.contains("no client left"))
        .await;
    assert!(
        common::find_files(&cistern.root).is_empty(),
        "an abandoned fill is not a replica"
    );

    let again = get(cistern.addr, "/files/orphan.bin").await;
    assert_eq!(again.bytes(), &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].headers.get("range").is_some(),
        "the second fetch resumes the partial"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_without_readers_goes_on_for_orphan_fill_on_the_clock() {
    // About 3 s of body in real time: far less than orphan-fill, so only the
    // manual clock can make the fill an orphan before the body ends.
    const SIZE: usize = 8 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(12, SIZE);
    origin.put(
        "/orphan.bin",
        Resource::new(body.clone()).slow(Duration::from_millis(25)),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/"
}}
timeouts {{
    orphan-fill "60s"
}}
// Only orphan-fill stops an orphan here.
limit {{
    orphan-finish-done "0%"
}}
"#,
        root.display(),
        origin.addr
    );
    let clock = Clock::manual(SystemTime::now());
    let cistern = common::start_on_clock(&text, &dir.path().join("config.kdl"), &clock).await;
    let addr = cistern.addrs[0];
    let engine = cistern.proxy.engine();

    let resp = send(addr, "GET", "/files/orphan.bin", &[]).await;
    let mut b = resp.into_body();
    let _ = b.frame().await;
    drop(b);
    let fill = {
        let fills = engine.in_progress();
        assert_eq!(fills.len(), 1, "the fill outlives its only client");
        fills[0].clone()
    };
    let written = || match fill.state() {
        FillState::Streaming { written, .. } => Some(written),
        _ => None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while fill.readers() > 0 {
        assert!(Instant::now() < deadline, "the client never left");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two more writes without readers: the fill has seen it has none (it
    // looks after each write) and goes on, as orphan-fill has not passed.
    let mut last = written().expect("still streaming");
    for _ in 0..2 {
        while written() == Some(last) {
            assert!(Instant::now() < deadline, "the fill stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last = written().expect("an orphan goes on until orphan-fill has passed");
    }
    clock.advance(Duration::from_secs(61));
    while engine
        .in_progress()
        .iter()
        .any(|f| std::sync::Arc::ptr_eq(f, &fill))
    {
        assert!(Instant::now() < deadline, "the orphan was not stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match fill.state() {
        FillState::Failed(e) => assert_eq!(e.kind(), ErrorKind::Orphaned, "{e}"),
        other => panic!("the orphaned fill ended {}", other.as_str()),
    }
    assert!(
        common::find_files(&root).is_empty(),
        "an abandoned fill is not a replica"
    );

    let again = get(addr, "/files/orphan.bin").await;
    assert_eq!(again.bytes(), &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].headers.get("range").is_some(),
        "the second fetch resumes the partial"
    );
}
