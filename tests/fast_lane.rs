//! The plaintext HTTP/1.1 fast lane, as a client sees it: hits on large
//! replicas sent whole (and in ranges) from the file, several requests in
//! one write answered in order, HTTP/1.0 clients, and a connection that
//! turns to a request the lane leaves to hyper (a POST) and back.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Cistern, Origin, Resource, files_mirror, get, pattern, request};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIG: usize = 3 * 1024 * 1024 + 17;

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes `raw` on one connection and reads until the server closes it.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut out))
        .await
        .expect("the server closes the connection after the last answer")
        .unwrap();
    out
}

/// One HTTP/1.x response cut off the front of `wire`: status, lowercased
/// headers and body (by `content-length`, chunked, or to the end).
fn next_response(wire: &mut &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    read_response(wire, false)
}

/// The answer to a HEAD: a head alone, whatever its length says.
fn next_head(wire: &mut &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    read_response(wire, true)
}

fn read_response(wire: &mut &[u8], head_only: bool) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole response head")
        + 4;
    let head = std::str::from_utf8(&wire[..end]).unwrap().to_owned();
    *wire = &wire[end..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let field = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if head_only {
        Vec::new()
    } else if let Some(len) = field("content-length") {
        let len: usize = len.parse().unwrap();
        let body = wire[..len].to_vec();
        *wire = &wire[len..];
        body
    } else if field("transfer-encoding").as_deref() == Some("chunked") {
        let mut body = Vec::new();
        loop {
            let eol = wire.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&wire[..eol]).unwrap(), 16).unwrap();
            *wire = &wire[eol + 2..];
            if size == 0 {
                *wire = &wire[2..];
                break;
            }
            body.extend_from_slice(&wire[..size]);
            *wire = &wire[size + 2..];
        }
        body
    } else {
        let body = wire.to_vec();
        *wire = &[];
        body
    };
    (status, headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hit_is_sent_whole_and_in_ranges_from_the_replica() {
    let origin = Origin::start().await;
    let body = pattern(7, BIG);
    origin.put("/big.iso", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);

    let miss = get(cistern.addr, "/files/big.iso").await;
    assert_eq!(sha256(miss.bytes()), sha256(&body));
    let hit = get(cistern.addr, "/files/big.iso").await;
    assert_eq!(hit.status, 200);
    assert!(
        hit.header("cache-status").contains("hit"),
        "{:?}",
        hit.headers
    );
    assert_eq!(hit.header("content-length"), BIG.to_string());
    assert_eq!(sha256(hit.bytes()), sha256(&body));
    assert!(!hit.header("date").is_empty(), "every answer carries Date");

    // A range from the middle, and the last bytes.
    let mid = request(
        cistern.addr,
        "GET",
        "/files/big.iso",
        &[("range", "bytes=1000000-2500000")],
    )
    .await;
    assert_eq!(mid.status, 206);
    assert_eq!(
        mid.header("content-range"),
        format!("bytes 1000000-2500000/{BIG}")
    );
    assert_eq!(&mid.bytes()[..], &body[1_000_000..=2_500_000]);
    let tail = request(
        cistern.addr,
        "GET",
        "/files/big.iso",
        &[("range", "bytes=-10")],
    )
    .await;
    assert_eq!(&tail.bytes()[..], &body[BIG - 10..]);

    // HEAD: the length, no body.
    let head = request(cistern.addr, "HEAD", "/files/big.iso", &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), BIG.to_string());
    assert!(head.bytes().is_empty());

    assert_eq!(
        origin.hits("/big.iso"),
        1,
        "every answer after the first came from the replica"
    );
    // The access log tells the bytes really sent, as for any answer.
    cistern
        .log_when("the hit's access line", |log| {
            log.lines()
                .any(|l| l.contains(&format!("/files/big.iso 200 {BIG} hit")) && l.contains("done"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_written_together_are_answered_in_order_on_one_connection() {
    let origin = Origin::start().await;
    let big = pattern(3, BIG);
    let small = pattern(4, 1000);
    origin.put("/big", Resource::new(big.clone()));
    origin.put("/small", Resource::new(small.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    // Warm both.
    get(cistern.addr, "/files/big").await;
    get(cistern.addr, "/files/small").await;

    let host = cistern.addr;
    let raw = format!(
        "GET /files/big HTTP/1.1\r\nHost: {host}\r\n\r\n\
         HEAD /files/small HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /files/small HTTP/1.1\r\nHost: {host}\r\nRange: bytes=10-19\r\n\r\n\
         GET /files/missing-here HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /files/small HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let wire = exchange(cistern.addr, raw.as_bytes()).await;
    let mut rest = &wire[..];
    let (s1, _, b1) = next_response(&mut rest);
    assert_eq!((s1, sha256(&b1)), (200, sha256(&big)));
    let (s2, h2, _) = next_head(&mut rest);
    assert_eq!((s2, header(&h2, "content-length")), (200, Some("1000")));
    let (s3, _, b3) = next_response(&mut rest);
    assert_eq!((s3, &b3[..]), (206, &small[10..20]));
    let (s4, _, _) = next_response(&mut rest);
    assert_eq!(s4, 404, "the origin's 404 for a file it lacks");
    let (s5, h5, b5) = next_response(&mut rest);
    assert_eq!((s5, &b5[..]), (200, &small[..]));
    assert_eq!(header(&h5, "connection"), Some("close"));
    assert!(rest.is_empty(), "nothing after the last answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_get_whole_answers_and_a_closed_connection() {
    let origin = Origin::start().await;
    let body = pattern(5, 200_000);
    origin.put("/streamed", Resource::new(body.clone()).unknown_length());
    origin.put("/file", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    let host = cistern.addr;

    // A miss of unknown length: no chunking for HTTP/1.0, the end of the
    // body is the end of the connection.
    let wire = exchange(
        cistern.addr,
        format!("GET /files/streamed HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes(),
    )
    .await;
    let mut rest = &wire[..];
    let (status, headers, got) = next_response(&mut rest);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "transfer-encoding"), None);
    assert_eq!(sha256(&got), sha256(&body));

    // The same file for an HTTP/1.1 client is chunked, and the connection
    // stays open for the next request.
    let wire = exchange(
        cistern.addr,
        format!("GET /files/file HTTP/1.1\r\nHost: {host}\r\n\r\nGET /files/file HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes(),
    )
    .await;
    let mut rest = &wire[..];
    let (s1, _, b1) = next_response(&mut rest);
    let (s2, h2, b2) = next_response(&mut rest);
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(sha256(&b1), sha256(&body));
    assert_eq!(sha256(&b2), sha256(&body));
    assert_eq!(header(&h2, "connection"), Some("close"));

    // HTTP/1.0 with keep-alive keeps the connection for a second request.
    let wire = exchange(
        cistern.addr,
        format!(
            "GET /files/file HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n\
             GET /files/file HTTP/1.0\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let mut rest = &wire[..];
    let (s1, _, b1) = next_response(&mut rest);
    let (s2, _, b2) = next_response(&mut rest);
    assert_eq!(
        (s1, s2, b1.len(), b2.len()),
        (200, 200, body.len(), body.len())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_between_gets_is_answered_like_any_other() {
    let origin = Origin::start().await;
    let body = pattern(6, 100_000);
    origin.put("/f", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &files_mirror(&origin), &[]);
    get(cistern.addr, "/files/f").await;
    let host = cistern.addr;
    // GET (the lane's), a POST with a body (left to hyper with the bytes
    // already read), then a GET on the same connection.
    let raw = format!(
        "GET /files/f HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST /files/f HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello\
         GET /files/f HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let wire = exchange(cistern.addr, raw.as_bytes()).await;
    let mut rest = &wire[..];
    let (s1, _, b1) = next_response(&mut rest);
    assert_eq!((s1, sha256(&b1)), (200, sha256(&body)));
    let (s2, _, _) = next_response(&mut rest);
    assert!(s2 < 500, "the POST went to the origin: {s2}");
    let (s3, _, b3) = next_response(&mut rest);
    assert_eq!(s3, 200);
    assert_eq!(sha256(&b3), sha256(&body));
    let posts = origin.seen().iter().filter(|s| s.method == "POST").count();
    assert_eq!(posts, 1);
    // A GET with a body is still refused, as before the lane existed.
    let wire = exchange(
        cistern.addr,
        format!("GET /files/f HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").as_bytes(),
    )
    .await;
    let (status, _, _) = next_response(&mut &wire[..]);
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_large_hit_is_disconnected() {
    let origin = Origin::start().await;
    let body = pattern(8, 64 * 1024 * 1024);
    origin.put("/huge", Resource::new(body));
    let dir = tempfile::tempdir().unwrap();
    let config =
        files_mirror(&origin).replace("store {", "timeouts {\n    send \"1s\"\n}\nstore {");
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let warm = get(cistern.addr, "/files/huge").await;
    assert_eq!(warm.bytes().len(), 64 * 1024 * 1024);

    // Ask, read the head and a little, then read nothing.
    let mut tcp = TcpStream::connect(cistern.addr).await.unwrap();
    tcp.write_all(format!("GET /files/huge HTTP/1.1\r\nHost: {}\r\n\r\n", cistern.addr).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    let n = tcp.read(&mut first).await.unwrap();
    assert!(n > 0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Cistern has given up on it: draining what the socket holds ends in
    // EOF or a reset, well short of the 64 MiB.
    let mut drained = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => drained += k,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was closed");
    assert!(
        drained + n < 64 * 1024 * 1024,
        "the client never got the whole body"
    );
    cistern
        .log_when("the aborted access line", |log| {
            log.lines()
                .any(|l| l.contains("/files/huge 200") && l.contains("aborted"))
        })
        .await;
}
