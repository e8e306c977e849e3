//! Serving stale (RFC 5861, RFC 9111 §4.2.4): when every upstream is down
//! or failing, a replica past its freshness answers instead of a 502, for
//! as long as `stale-if-error` allows; `stale-while-revalidate` answers at
//! once and refreshes in the background. On a manual clock.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cistern::app::Running;
use cistern::clock::Clock;
use common::{Origin, Resource, get, pattern};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A mirror that can go away for good, like a host that is switched off:
/// after [`Mirror::go_away`] its port refuses connections and the
/// connections it had are closed.
struct Mirror {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    tasks: JoinSet<()>,
}

impl Mirror {
    /// Serves `body` for every path, with `cache_control`, no validators
    /// (as many real mirrors do).
    async fn start(body: Bytes, cache_control: &'static str) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let counter = hits.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                let counter = counter.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let resp = http::Response::builder()
                            .header("cache-control", cache_control)
                            .body(Full::new(body.clone()))
                            .unwrap();
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Mirror { addr, hits, tasks }
    }

    /// Stops listening and drops every connection.
    async fn go_away(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "the mirror kept listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn start(upstream: SocketAddr, dir: &Path, clock: &Clock, mirror_extra: &str) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "debian" {{
    prefix "/debian/"
    upstream "http://{upstream}/debian/"
    {mirror_extra}
}}
"#,
        dir.join("replica").display(),
    );
    common::start_on_clock(&text, &dir.join("config.kdl"), clock).await
}

const INDEX: &str = "/debian/dists/stable/InRelease";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_served_stale_while_its_mirror_is_gone_for_a_day() {
    let body = pattern(1, 20_000);
    // `distro` gives indexes TTL 0; max-age=0 is the same to the cache.
    let mirror = Mirror::start(body.clone(), "max-age=0").await;
    let upstream = mirror.addr;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(upstream, dir.path(), &clock, "").await;
    let addr = cistern.addrs[0];

    let first = get(addr, INDEX).await;
    assert_eq!(first.bytes(), &body);
    assert_eq!(first.header("cache-status"), "cistern; fwd=miss; stored");
    // Stale at once: while the mirror is up, every request goes to it.
    clock.advance(Duration::from_secs(5));
    assert_eq!(get(addr, INDEX).await.bytes(), &body);
    assert_eq!(mirror.hits.load(Ordering::Relaxed), 2);

    mirror.go_away().await;
    clock.advance(Duration::from_secs(3600));
    let stale = get(addr, INDEX).await;
    assert_eq!(stale.status, 200, "{:?}", stale.body);
    assert_eq!(stale.bytes(), &body);
    assert_eq!(
        stale.header("cache-status"),
        "cistern; hit; fwd=stale; detail=stale-if-error"
    );
    let age: u64 = stale.header("age").parse().expect("an Age");
    assert!(age >= 3600, "Age {age} after an hour stale");
    assert!(stale.headers.get("warning").is_none());

    // The default window is one day from the end of freshness.
    clock.advance(Duration::from_secs(24 * 3600));
    let too_old = get(addr, INDEX).await;
    assert_eq!(too_old.status, 502, "served stale past stale-if-error");
    // And the replica is still there, byte for byte, for when the mirror
    // comes back.
    let file = dir
        .path()
        .join("replica")
        .join(upstream.to_string())
        .join("debian/dists/stable/InRelease");
    assert_eq!(std::fs::read(file).unwrap(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_zero_and_must_revalidate_give_the_error() {
    for (cache_control, extra) in [
        ("max-age=0", r#"stale-if-error "0s""#),
        ("max-age=0, must-revalidate", ""),
        ("no-cache", ""),
    ] {
        let body = pattern(2, 1000);
        let mirror = Mirror::start(body.clone(), cache_control).await;
        let upstream = mirror.addr;
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(SystemTime::now());
        let cistern = start(upstream, dir.path(), &clock, extra).await;
        let addr = cistern.addrs[0];
        assert_eq!(get(addr, INDEX).await.bytes(), &body);
        mirror.go_away().await;
        clock.advance(Duration::from_secs(60));
        let got = get(addr, INDEX).await;
        assert_eq!(
            got.status, 502,
            "{cache_control} / {extra:?}: {:?}",
            got.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_from_the_mirror_is_answered_from_the_stale_replica() {
    let origin = Origin::start().await;
    let body = pattern(3, 5000);
    origin.put(
        "/debian/dists/stable/InRelease",
        Resource::new(body.clone()).header("cache-control", "max-age=60, stale-if-error=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock, r#"stale-if-error "0s""#).await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, INDEX).await.bytes(), &body);

    origin.put(
        "/debian/dists/stable/InRelease",
        Resource {
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            // No validators: a maintenance page never answers 304.
            headers: Vec::new(),
            ..Resource::new(Bytes::from_static(b"maintenance"))
        },
    );
    // The response's own stale-if-error=600 beats the config's zero, and
    // counts from the end of its max-age.
    clock.advance(Duration::from_secs(60 + 500));
    let stale = get(addr, INDEX).await;
    assert_eq!(stale.bytes(), &body, "the 503 page reached the client");
    assert_eq!(
        stale.header("cache-status"),
        "cistern; hit; fwd=stale; detail=stale-if-error"
    );
    clock.advance(Duration::from_secs(200));
    let got = get(addr, INDEX).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.bytes(), &Bytes::from_static(b"maintenance"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_behind() {
    let origin = Origin::start().await;
    let path = "/debian/dists/stable/InRelease";
    let old = pattern(4, 3000);
    let new = pattern(5, 3000);
    origin.put(
        path,
        Resource::new(old.clone()).header("cache-control", "max-age=10"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(
        origin.addr,
        dir.path(),
        &clock,
        r#"stale-while-revalidate "1m""#,
    )
    .await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, INDEX).await.bytes(), &old);
    origin.put(
        path,
        Resource::new(new.clone())
            .header("cache-control", "max-age=10")
            .header("etag", "\"v2\""),
    );
    clock.advance(Duration::from_secs(30));
    let stale = get(addr, INDEX).await;
    assert_eq!(stale.bytes(), &old);
    assert_eq!(
        stale.header("cache-status"),
        "cistern; hit; fwd=stale; detail=stale-while-revalidate"
    );
    // The background fetch replaces the replica; the next client gets the
    // new body as a plain hit.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get(addr, INDEX).await;
        if got.bytes() == &new {
            // A hit, or read along the refresh's last moments.
            let status = got.header("cache-status");
            assert!(
                status == "cistern; hit" || status == "cistern; fwd=miss; collapsed",
                "{status}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the replica was never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.hits(path), 2);
    // Past the window, the client waits for the upstream as usual.
    clock.advance(Duration::from_secs(10 + 61));
    let got = get(addr, INDEX).await;
    assert_eq!(got.bytes(), &new);
    // Revalidated (a 304 from the origin) before this client was answered.
    assert_eq!(
        got.header("cache-status"),
        "cistern; hit; fwd=stale; fwd-status=304"
    );
    assert_eq!(origin.hits(path), 3, "this client waited for the upstream");
}
