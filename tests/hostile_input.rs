//! Requests no honest client sends: both `Content-Length` and
//! `Transfer-Encoding`, two different lengths, an oversized request line or
//! head, a folded header. Each is refused or framed one safe way, nothing
//! is smuggled to the origin, and Cistern goes on serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{Cistern, Origin, Resource, files_mirror, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads until the server closes
/// it or 5 s pass; returns what came back.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The server may close before it has read everything: that is an answer.
    let _ = tcp.write_all(request).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_never_passed_on_and_nothing_is_smuggled() {
    let origin = Origin::start().await;
    origin.put(
        "/a.txt",
        Resource::new(Bytes::from_static(b"the real file\n")),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    let smuggle = "GET /files/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST /files/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggle}"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /files/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggle}",
                smuggle.len()
            ),
        ),
        (
            "a Transfer-Encoding that is not chunked last",
            format!(
                "POST /files/a.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggle}"
            ),
        ),
        (
            "an obsolete folded header",
            format!(
                "POST /files/a.txt HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n{smuggle}"
            ),
        ),
    ];
    for (what, request) in &cases {
        let answer = exchange(cistern.addr, request.as_bytes()).await;
        match status_of(&answer) {
            // Refused outright, or answered once with the connection closed
            // before the bytes after the body could be read as a request.
            Some(400) | Some(501) | None => {}
            Some(other) => {
                assert!(
                    !answer.contains("HTTP/1.1 404") && answer.matches("HTTP/1.1 ").count() == 1,
                    "{what}: {other}, then more answers: {answer}"
                );
            }
        }
    }
    assert!(
        origin.seen().iter().all(|s| !s.path.contains("smuggled")),
        "a request was smuggled to the origin: {:?}",
        origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    assert_eq!(get(cistern.addr, "/files/a.txt").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_lines_and_heads_are_refused_and_serving_goes_on() {
    let origin = Origin::start().await;
    origin.put(
        "/a.txt",
        Resource::new(Bytes::from_static(b"the real file\n")),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    let long_target = format!("/files/{}", "a".repeat(1 << 20));
    let many_headers: String = (0..2000).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let huge_value = format!("X-Big: {}\r\n", "v".repeat(1 << 20));
    let cases = [
        (
            "a 1 MiB request line",
            format!("GET {long_target} HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        (
            "2000 header fields",
            format!("GET /files/a.txt HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n"),
        ),
        (
            "a 1 MiB header value",
            format!("GET /files/a.txt HTTP/1.1\r\nHost: x\r\n{huge_value}\r\n"),
        ),
        (
            "a request line that is not HTTP",
            "GET\0/ \x01HTTP/9\r\n\r\n".to_owned(),
        ),
    ];
    for (what, request) in cases {
        let answer = exchange(cistern.addr, request.as_bytes()).await;
        let status = status_of(&answer);
        assert!(
            matches!(status, None | Some(400) | Some(414) | Some(431)),
            "{what}: {:?}",
            answer.get(..answer.len().min(200))
        );
    }
    // Nothing reached the origin, and Cistern is still there.
    assert!(origin.seen().is_empty(), "{:?}", origin.seen().len());
    let after = get(cistern.addr, "/files/a.txt").await;
    assert_eq!(after.status, 200);
    assert_eq!(after.bytes().as_ref(), b"the real file\n");
}
