//! HTTP caching as a shared cache (RFC 9111), on a manual clock: freshness,
//! revalidation, no-store/private/Authorization, Vary, cookies, and the
//! client's own conditional requests.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use cistern::app::Running;
use cistern::clock::Clock;
use common::{Origin, Resource, get, pattern, request};

async fn start(origin: &Origin, dir: &Path, clock: &Clock, extra: &str) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "site" {{
    prefix "/"
    upstream "http://{}/"
}}
{extra}
"#,
        dir.join("replica").display(),
        origin.addr
    );
    common::start_on_clock(&text, &dir.join("config.kdl"), clock).await
}

fn t0() -> SystemTime {
    SystemTime::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_then_stale_then_revalidated_with_a_304() {
    let origin = Origin::start().await;
    origin.put(
        "/doc",
        Resource::new(pattern(1, 1000)).header("cache-control", "max-age=60"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];

    assert!(
        get(addr, "/doc")
            .await
            .header("cache-status")
            .contains("fwd=miss")
    );
    clock.advance(Duration::from_secs(30));
    let hit = get(addr, "/doc").await;
    assert!(hit.header("cache-status").contains("hit"));
    assert_eq!(hit.header("age"), "30");
    assert_eq!(origin.hits("/doc"), 1);

    clock.advance(Duration::from_secs(31));
    let revalidated = get(addr, "/doc").await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.bytes(), &pattern(1, 1000));
    assert!(
        revalidated
            .header("cache-status")
            .contains("fwd-status=304"),
        "{:?}",
        revalidated.headers
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].headers.get("if-none-match").unwrap(), "\"v1\"");
    // The 304 refreshed the freshness: fresh again without asking.
    clock.advance(Duration::from_secs(10));
    assert!(
        get(addr, "/doc")
            .await
            .header("cache-status")
            .contains("hit")
    );
    assert_eq!(origin.hits("/doc"), 2);
    cistern.shutdown().await;
}

/// A stale replica the origin replaces with new content is reported as
/// RFC 9211 says: the request went upstream because the stored response
/// was stale (`fwd=stale`), and the new one was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_replaced_by_new_content_says_fwd_stale() {
    let origin = Origin::start().await;
    origin.put(
        "/news",
        Resource::new(pattern(2, 500)).header("cache-control", "max-age=60"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];
    let first = get(addr, "/news").await;
    assert_eq!(first.header("cache-status"), "cistern; fwd=miss; stored");
    // A new edition: another body, another validator.
    origin.put(
        "/news",
        Resource::new(pattern(3, 700))
            .header("cache-control", "max-age=60")
            .header("etag", "\"v2\""),
    );
    clock.advance(Duration::from_secs(61));
    let replaced = get(addr, "/news").await;
    assert_eq!(replaced.bytes(), &pattern(3, 700));
    assert_eq!(
        replaced.header("cache-status"),
        "cistern; fwd=stale; stored",
        "{:?}",
        replaced.headers
    );
    let hit = get(addr, "/news").await;
    assert_eq!(hit.bytes(), &pattern(3, 700));
    assert_eq!(hit.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/news"), 2);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_a_shared_cache_must_not_store_are_fetched_every_time() {
    let origin = Origin::start().await;
    origin.put(
        "/no-store",
        Resource::new(pattern(2, 10)).header("cache-control", "no-store"),
    );
    origin.put(
        "/private",
        Resource::new(pattern(3, 10)).header("cache-control", "private, max-age=600"),
    );
    origin.put(
        "/auth",
        Resource::new(pattern(4, 10)).header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];
    for path in ["/no-store", "/private"] {
        for _ in 0..2 {
            let got = get(addr, path).await;
            assert_eq!(got.status, 200);
            assert_eq!(
                got.header("cache-status"),
                "cistern; fwd=uri-miss; detail=not-storable",
                "{path}"
            );
        }
        assert_eq!(origin.hits(path), 2, "{path} must not be stored");
    }
    for _ in 0..2 {
        let got = request(addr, "GET", "/auth", &[("authorization", "Bearer secret")]).await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.header("cache-status"),
            "cistern; fwd=uri-miss; detail=not-storable"
        );
    }
    // The counters say why, too.
    let m = cistern.proxy.engine().metrics().snapshot();
    let passes: std::collections::HashMap<_, _> = m.passes.iter().copied().collect();
    assert_eq!(passes["not-storable"], 6, "{passes:?}");
    assert_eq!(passes["method"], 0, "{passes:?}");
    assert_eq!(
        origin.hits("/auth"),
        2,
        "a response to an authorized request is not shared"
    );
    assert!(common::find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_never_serves_the_wrong_variant_and_cookies_are_not_shared() {
    let origin = Origin::start().await;
    origin.put(
        "/styles.css",
        // `public`: a response with Set-Cookie is otherwise never fresh in
        // a shared cache (http-cache-semantics' conservative default).
        Resource::new(pattern(5, 500))
            .header("cache-control", "public, max-age=600")
            .header("vary", "accept-language")
            .header("set-cookie", "session=alice"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];

    let first = request(addr, "GET", "/styles.css", &[("accept-language", "fr")]).await;
    assert_eq!(first.status, 200);
    let same = request(addr, "GET", "/styles.css", &[("accept-language", "fr")]).await;
    assert_eq!(same.header("cache-status"), "cistern; hit");
    assert_eq!(
        same.header("set-cookie"),
        "",
        "a stored Set-Cookie is never handed to another client"
    );
    let other = request(addr, "GET", "/styles.css", &[("accept-language", "de")]).await;
    assert!(
        !other.header("cache-status").contains("hit"),
        "another variant is fetched, not served from the fr one"
    );
    assert_eq!(origin.hits("/styles.css"), 2, "{:#?}", origin.seen());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_conditionals_and_ranges_are_answered_from_the_replica() {
    let origin = Origin::start().await;
    let body = pattern(6, 10_000);
    origin.put(
        "/file.bin",
        Resource::new(body.clone())
            .header("cache-control", "max-age=600")
            .header("last-modified", "Wed, 01 Jan 2025 00:00:00 GMT"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];
    get(addr, "/file.bin").await;

    let not_modified = request(addr, "GET", "/file.bin", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), "\"v1\"");
    let ims = request(
        addr,
        "GET",
        "/file.bin",
        &[("if-modified-since", "Thu, 02 Jan 2025 00:00:00 GMT")],
    )
    .await;
    assert_eq!(ims.status, 304);
    let changed = request(addr, "GET", "/file.bin", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!(changed.status, 200);
    let range = request(addr, "GET", "/file.bin", &[("range", "bytes=9000-")]).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.bytes(), &body.slice(9000..));
    let bad = request(addr, "GET", "/file.bin", &[("range", "bytes=20000-")]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), "bytes */10000");
    assert_eq!(origin.hits("/file.bin"), 1, "all answered from the replica");
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_mode_never_revalidates_and_offline_mode_never_connects() {
    let origin = Origin::start().await;
    origin.put(
        "/old",
        Resource::new(pattern(7, 100)).header("cache-control", "max-age=1"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "mode \"static\"").await;
    let addr = cistern.addrs[0];
    get(addr, "/old").await;
    clock.advance(Duration::from_secs(3600));
    assert!(
        get(addr, "/old")
            .await
            .header("cache-status")
            .contains("hit")
    );
    assert_eq!(origin.hits("/old"), 1);
    cistern.shutdown().await;

    // Offline over the same replica: what is there is served, the rest is 504.
    let cistern = start(&origin, dir.path(), &clock, "mode \"offline\"").await;
    let addr = cistern.addrs[0];
    let kept = get(addr, "/old").await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.bytes(), &pattern(7, 100));
    let missing = get(addr, "/never-fetched").await;
    assert_eq!(missing.status, 504);
    assert_eq!(origin.hits("/never-fetched"), 0);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_pass_through_and_invalidate() {
    let origin = Origin::start().await;
    origin.put(
        "/item",
        Resource::new(pattern(8, 100)).header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(t0());
    let cistern = start(&origin, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];
    get(addr, "/item").await;
    let post = request(addr, "POST", "/item", &[]).await;
    assert_eq!(post.status, 200);
    assert_eq!(post.header("cache-status"), "cistern; fwd=method");
    // The replica is gone: the next GET goes upstream.
    let after = get(addr, "/item").await;
    assert!(
        after.header("cache-status").contains("fwd=miss"),
        "{:?}",
        after.headers
    );
    assert_eq!(
        origin.seen().iter().filter(|s| s.method == "GET").count(),
        2
    );
    cistern.shutdown().await;
}
