//! The ways clients reach Cistern: HTTP/2 with prior knowledge, a
//! transparent (iptables REDIRECT) request, and HEAD requests that read
//! along a download without starting one.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Cistern, Origin, Resource, pattern, request, send};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(origin: &Origin, forward: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
forward {{
{forward}
}}
mirror "files" {{ prefix "/files/"; upstream "http://{}/"; }}
"#,
        origin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_clients_are_served_from_the_same_replica() {
    let origin = Origin::start().await;
    let body = pattern(1, 200_000);
    origin.put("/app.js", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #true"), &[]);

    let stream = TcpStream::connect(cistern.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let url = format!("http://{}/files/app.js", cistern.addr);
    for want in ["fwd=miss", "hit"] {
        let req = http::Request::get(&url)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let cache = resp.headers()["cache-status"].to_str().unwrap().to_owned();
        assert!(cache.contains(want), "{cache}");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, body);
    }
    assert_eq!(origin.hits("/app.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_requests_go_to_the_host_they_name() {
    let origin = Origin::start().await;
    origin.put("/index.html", Resource::new(pattern(2, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &config(&origin, "enabled #true\ntransparent #true"),
        &[],
    );
    // What a client whose port-80 traffic is redirected to Cistern sends:
    // origin-form, with the real site in Host.
    let mut s = TcpStream::connect(cistern.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /index.html HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            origin.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(origin.hits("/index.html"), 1);
    assert!(
        common::find_files(&cistern.root).contains(&format!("{}/index.html", origin.addr)),
        "kept under the host it came from"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_reads_along_a_download_and_never_starts_one() {
    let origin = Origin::start().await;
    let body = pattern(3, 2 * 1024 * 1024);
    origin.put(
        "/big.bin",
        Resource::new(body.clone()).slow(Duration::from_millis(10)),
    );
    origin.put("/other.bin", Resource::new(pattern(4, 10)));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #true"), &[]);

    let download = send(cistern.addr, "GET", "/files/big.bin", &[]).await;
    let head = request(cistern.addr, "HEAD", "/files/big.bin", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), (2 * 1024 * 1024).to_string());
    assert!(
        head.header("cache-status").contains("collapsed"),
        "{:?}",
        head.headers
    );
    let got = download.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, body);
    // A HEAD for something not cached asks the upstream with HEAD only.
    let cold = request(cistern.addr, "HEAD", "/files/other.bin", &[]).await;
    assert_eq!(cold.status, 200);
    let seen = origin.seen();
    assert!(
        seen.iter()
            .filter(|s| s.path == "/big.bin")
            .all(|s| s.method == "GET")
    );
    assert_eq!(origin.hits("/big.bin"), 1);
    assert!(
        seen.iter()
            .any(|s| s.path == "/other.bin" && s.method == "HEAD")
    );
    assert!(
        common::find_files(&cistern.root)
            .iter()
            .all(|f| !f.ends_with("other.bin"))
    );
}
