//! Revalidation answered by a 304 that repeats no validator. Real servers
//! do this (some CDNs and application servers send a bare `304` with only
//! new freshness). Cistern keeps one response per key and asked with that
//! response's own validators, so the 304 selects it (RFC 9111 §4.3.4): it
//! is updated and served, and the object is not fetched a second time.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Cistern, get};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &str = "the stored body\n";

/// What the origin saw of one request: its path and whether it was
/// conditional.
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    path: String,
    conditional: bool,
}

/// An origin whose `/etag` carries only an ETag and `/lm` only a
/// Last-Modified, both stale at once (`max-age=0`); a conditional request
/// gets a bare 304 with nothing but `Cache-Control: max-age=3600`
/// (`/other`'s 304 names another ETag).
#[derive(Clone)]
struct BareOrigin {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl BareOrigin {
    async fn start() -> BareOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = BareOrigin {
            addr: listener.local_addr().unwrap(),
            asked: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let o = o.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let o = o.clone();
                        async move { Ok::<_, Infallible>(o.answer(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        origin
    }

    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let h = req.headers();
        let conditional = h.contains_key("if-none-match") || h.contains_key("if-modified-since");
        self.asked.lock().unwrap().push(Asked {
            path: req.uri().path().to_owned(),
            conditional,
        });
        if conditional {
            let b = Response::builder()
                .status(StatusCode::NOT_MODIFIED)
                .header("cache-control", "max-age=3600");
            // `/other` changed in between: its 304 names another version.
            let b = match req.uri().path() {
                "/other" => b.header("etag", "\"v2\""),
                _ => b,
            };
            return b.body(Full::new(Bytes::new())).unwrap();
        }
        let b = Response::builder().header("cache-control", "max-age=0");
        let b = match req.uri().path() {
            "/etag" | "/other" => b.header("etag", "\"v1\""),
            _ => b.header("last-modified", "Wed, 01 Jan 2020 00:00:00 GMT"),
        };
        b.body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap()
    }

    fn asked(&self, path: &str) -> Vec<bool> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.path == path)
            .map(|a| a.conditional)
            .collect()
    }
}

#[tokio::test]
async fn a_304_without_validators_updates_the_one_stored_response() {
    let origin = BareOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &common_config(origin.addr), &[]);
    for path in ["/etag", "/lm"] {
        let target = format!("/files{path}");
        let first = get(c.addr, &target).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.bytes(), BODY.as_bytes());
        // Stale at once: revalidated, answered by a bare 304.
        let second = get(c.addr, &target).await;
        assert_eq!(second.status, 200, "{path}: {second:?}\nlog:\n{}", c.log());
        assert_eq!(second.bytes(), BODY.as_bytes(), "{path}");
        assert_eq!(
            origin.asked(path),
            [false, true],
            "{path}: one fill, then exactly one conditional request and no refetch"
        );
        // The 304's max-age=3600 now describes the replica: a hit.
        let third = get(c.addr, &target).await;
        assert_eq!(third.status, 200);
        assert_eq!(third.bytes(), BODY.as_bytes());
        assert_eq!(
            origin.asked(path).len(),
            2,
            "{path}: the 304 did not refresh it"
        );
    }
    // A client's own conditional request is answered from the replica too.
    let own = common::request(c.addr, "GET", "/files/etag", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(own.status, 304);
    assert_eq!(origin.asked("/etag").len(), 2);
}

fn common_config(addr: SocketAddr) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
mirror "files" {{
    prefix "/files/"
    upstream "http://{addr}/"
}}
"#
    )
}

/// A 304 that names another validator than the stored one's does not
/// select it: the object is fetched whole, and the log says why.
#[tokio::test]
async fn a_304_naming_another_validator_refetches_and_says_why() {
    let origin = BareOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &common_config(origin.addr), &[]);
    assert_eq!(get(c.addr, "/files/other").await.status, 200);
    let second = get(c.addr, "/files/other").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.bytes(), BODY.as_bytes());
    assert_eq!(origin.asked("/other"), [false, true, false]);
    c.log_when("the reason for the second request", |l| {
        l.contains("304 names another validator than the replica's")
    })
    .await;
}
