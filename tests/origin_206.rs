//! An origin that answers 206 to a request it was not asked a range in
//! (some CDNs and object stores do): a cold fill takes a 206 that starts
//! the whole representation as the body's beginning, asks for the rest as
//! each part ends, and stores the whole; a part it cannot hold goes to the
//! client once, unstored, without a second upstream request.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cistern::app::Running;
use cistern::clock::Clock;
use common::{find_files, get, pattern, request};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the origin cuts its answers.
#[derive(Clone, Copy)]
enum Parts {
    /// A 206 for every GET: the asked range, or, without one, parts of
    /// at most this many bytes from the start.
    Chunked(usize),
    /// A 206 of bytes 100-199 whatever is asked.
    AlwaysTheMiddle,
}

/// The origin: serves `body` with a strong `ETag`, records the `Range`
/// of every request it gets.
#[derive(Clone)]
struct PartOrigin {
    addr: SocketAddr,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    requests: Arc<AtomicUsize>,
}

impl PartOrigin {
    async fn start(body: Bytes, parts: Parts) -> PartOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = PartOrigin {
            addr: listener.local_addr().unwrap(),
            ranges: Arc::default(),
            requests: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (o, body) = (o.clone(), body.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (o, body) = (o.clone(), body.clone());
                        async move { Ok::<_, Infallible>(o.answer(&req, &body, parts)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        origin
    }

    fn answer(&self, req: &Request<Incoming>, body: &Bytes, parts: Parts) -> Response<Full<Bytes>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let range = req
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.ranges.lock().unwrap().push(range.clone());
        let total = body.len();
        let (start, end) = match parts {
            Parts::AlwaysTheMiddle => (100, 200),
            Parts::Chunked(chunk) => {
                let from = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|f| f.parse::<usize>().ok())
                    .unwrap_or(0);
                (from, (from + chunk).min(total))
            }
        };
        Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header("etag", "\"part-v1\"")
            .header("cache-control", "max-age=600")
            .header(
                "content-range",
                format!("bytes {start}-{}/{total}", end - 1),
            )
            .body(Full::new(body.slice(start..end)))
            .unwrap()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn start(upstream: SocketAddr, dir: &Path, clock: &Clock) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "cdn" {{
    prefix "/"
    upstream "http://{upstream}/"
}}
"#,
        dir.join("replica").display(),
    );
    common::start_on_clock(&text, &dir.join("config.kdl"), clock).await
}

/// Waits (bounded) until no fill is in progress.
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
async fn a_206_that_is_the_whole_is_stored_with_one_request() {
    let body = pattern(7, 5000);
    let origin = PartOrigin::start(body.clone(), Parts::Chunked(1 << 20)).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let got = request(addr, "GET", "/f.bin", &[("range", "bytes=100-199")]).await;
    assert_eq!(got.status, 206);
    assert_eq!(got.bytes(), &body.slice(100..200));
    assert_eq!(got.header("content-range"), "bytes 100-199/5000");
    settled(&cistern).await;
    let got = get(addr, "/f.bin").await;
    assert_eq!(got.status, 200, "the whole, from the replica");
    assert!(got.bytes() == &body);
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(origin.requests(), 1, "{:?}", origin.ranges.lock().unwrap());
    let file = dir
        .path()
        .join("replica")
        .join(origin.addr.to_string())
        .join("f.bin");
    assert!(std::fs::read(file).unwrap() == body);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdn_that_answers_in_parts_is_asked_for_the_rest_and_the_whole_is_stored() {
    let body = pattern(8, 200 * 1024);
    let chunk = 64 * 1024;
    let origin = PartOrigin::start(body.clone(), Parts::Chunked(chunk)).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    // A client asks for a range that lies in the third part.
    let got = request(addr, "GET", "/big.iso", &[("range", "bytes=150000-150099")]).await;
    assert_eq!(got.status, 206);
    assert!(got.bytes() == &body.slice(150_000..150_100));
    settled(&cistern).await;
    let got = get(addr, "/big.iso").await;
    assert_eq!(got.status, 200);
    assert!(got.bytes() == &body, "the parts joined in order");
    assert_eq!(got.header("cache-status"), "cistern; hit");
    let ranges = origin.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        [
            None,
            Some(format!("bytes={chunk}-")),
            Some(format!("bytes={}-", 2 * chunk)),
            Some(format!("bytes={}-", 3 * chunk)),
        ],
        "one request per part, each for the rest"
    );
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_is_not_the_start_reaches_the_client_once_unstored() {
    let body = pattern(9, 1000);
    let origin = PartOrigin::start(body.clone(), Parts::AlwaysTheMiddle).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let got = get(addr, "/odd").await;
    assert_eq!(got.status, 206, "what the upstream sent");
    assert_eq!(got.bytes(), &body.slice(100..200));
    assert_eq!(got.header("content-range"), "bytes 100-199/1000");
    assert_eq!(
        got.header("cache-status"),
        "cistern; fwd=uri-miss; detail=not-storable"
    );
    settled(&cistern).await;
    assert_eq!(origin.requests(), 1, "not asked again");
    assert!(find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}
