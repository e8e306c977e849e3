//! What Cistern accepts from a client before it goes upstream: a GET or
//! HEAD never carries a body (and never a body framing header without
//! one), and an HTTP/1.1 request names exactly one valid `Host`
//! (RFC 9112 §3.2). Both are checked with raw TCP on the client side, and
//! with a hand-written keep-alive origin that, like nginx or Go, answers a
//! GET before reading its body: where a `Content-Length` without its body
//! would make it take the next request's first bytes as that body.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Cistern;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request the raw origin parsed.
#[derive(Debug, Clone)]
struct RawSeen {
    method: String,
    path: String,
    /// Header lines as received, names lower-cased.
    headers: Vec<(String, String)>,
    /// The body it read (only for methods it reads bodies of).
    body: Vec<u8>,
}

impl RawSeen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 keep-alive origin written by hand, so that it behaves like
/// the servers a smuggled request fools: it answers a GET or HEAD at once,
/// then discards `Content-Length` bytes as that request's body, and parses
/// whatever follows on the connection as the next request.
#[derive(Clone)]
struct RawOrigin {
    addr: SocketAddr,
    bodies: Arc<HashMap<&'static str, &'static str>>,
    seen: Arc<Mutex<Vec<RawSeen>>>,
}

impl RawOrigin {
    async fn start(bodies: &[(&'static str, &'static str)]) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = RawOrigin {
            addr: listener.local_addr().unwrap(),
            bodies: Arc::new(bodies.iter().copied().collect()),
            seen: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(o.clone().connection(stream));
            }
        });
        origin
    }

    fn seen(&self) -> Vec<RawSeen> {
        self.seen.lock().unwrap().clone()
    }

    /// Reads from `s` until `buf` holds at least `n` bytes; false on EOF.
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
        let mut chunk = [0u8; 4096];
        while buf.len() < n {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    async fn connection(self, mut s: TcpStream) {
        let mut buf = Vec::new();
        // Bounded: a test connection carries a handful of requests.
        for _ in 0..1000 {
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                let want = buf.len() + 1;
                if want > 64 * 1024 || !Self::fill(&mut s, &mut buf, want).await {
                    return;
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let mut parts = lines.next().unwrap_or("").split(' ');
            let method = parts.next().unwrap_or("").to_owned();
            let path = parts.next().unwrap_or("").to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let reads_body_first = method != "GET" && method != "HEAD";
            let mut seen = RawSeen {
                method: method.clone(),
                path: path.clone(),
                headers,
                body: Vec::new(),
            };
            if reads_body_first {
                if !Self::fill(&mut s, &mut buf, length).await {
                    return;
                }
                seen.body = buf.drain(..length).collect();
            }
            self.seen.lock().unwrap().push(seen);
            let response = match self.bodies.get(path.as_str()) {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=3600\r\n\r\n{}",
                    body.len(),
                    if method == "HEAD" { "" } else { body }
                ),
                None => {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n".to_owned()
                }
            };
            if s.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            if !reads_body_first {
                // Answered already; now the body is skipped, as nginx's
                // lingering discard does.
                if !Self::fill(&mut s, &mut buf, length).await {
                    return;
                }
                buf.drain(..length);
            }
        }
    }
}

/// A response read by the raw client.
struct RawGot {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Sends `request` on a new connection and reads the answer until the
/// server closes it (every request here says `Connection: close`), for at
/// most 10 s.
async fn raw(addr: SocketAddr, request: &[u8]) -> RawGot {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawGot {
        status,
        head,
        body: out[end + 4..].to_vec(),
    }
}

fn config(origin: &RawOrigin, forward: &str) -> String {
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
async fn a_get_with_a_content_length_cannot_poison_the_cache() {
    let origin = RawOrigin::start(&[
        ("/attack", "attack\n"),
        ("/victim.js", "victim\n"),
        ("/evil.js", "evil\n"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #false"), &[]);
    let host = cistern.addr;

    // 32 is the length of `GET /victim.js HTTP/1.1\r\nx-pad: ` on the
    // upstream connection: an origin that took 32 bytes of the next request
    // as this one's body would next read `GET /evil.js`.
    let attack = raw(
        host,
        format!(
            "GET /files/attack HTTP/1.1\r\nHost: {host}\r\nContent-Length: 32\r\nConnection: close\r\n\r\n{}",
            "x".repeat(32)
        )
        .as_bytes(),
    )
    .await;
    let victim_request = format!(
        "GET /files/victim.js HTTP/1.1\r\nX-Pad: GET /evil.js HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let first = raw(host, victim_request.as_bytes()).await;
    let later = raw(host, victim_request.as_bytes()).await;

    let seen = origin.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert!(
        !paths.contains(&"/evil.js"),
        "a smuggled request reached the origin: {paths:?}"
    );
    for s in &seen {
        assert!(
            s.header("content-length").is_none() && s.header("transfer-encoding").is_none(),
            "{} {} went upstream with body framing but no body: {:?}",
            s.method,
            s.path,
            s.headers
        );
    }
    assert_eq!(first.status, 200, "{}", first.head);
    assert_eq!(first.body, b"victim\n", "{}", first.head);
    assert_eq!(later.status, 200, "{}", later.head);
    assert_eq!(
        later.body, b"victim\n",
        "the replica of victim.js was poisoned"
    );
    assert!(later.head.contains("hit"), "{}", later.head);
    // A shared cache cannot key on a body: such a GET is refused.
    assert_eq!(attack.status, 400, "{}", attack.head);
    assert!(!paths.contains(&"/attack"), "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_head_bodies_are_refused_and_an_empty_one_is_dropped() {
    let origin = RawOrigin::start(&[("/a.txt", "aaaa\n"), ("/b.txt", "bbbb\n")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #false"), &[]);
    let host = cistern.addr;

    let chunked = raw(
        host,
        format!(
            "GET /files/a.txt HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(chunked.status, 400, "{}", chunked.head);
    let head = raw(
        host,
        format!(
            "HEAD /files/a.txt HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(head.status, 400, "{}", head.head);
    // HTTP/1.0 has no chunked, but a Content-Length body is still a body.
    let old = raw(
        host,
        b"GET /files/a.txt HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(old.status, 400, "{}", old.head);
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());

    // `Content-Length: 0` is no body: served, and not passed on.
    let empty = raw(
        host,
        format!(
            "GET /files/b.txt HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(empty.status, 200, "{}", empty.head);
    assert_eq!(empty.body, b"bbbb\n");
    let seen = origin.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/b.txt");
    assert_eq!(seen[0].header("content-length"), None, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_go_upstream_with_the_framing_of_the_body_sent() {
    let origin = RawOrigin::start(&[("/form", "thanks\n"), ("/after.txt", "after\n")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #false"), &[]);
    let host = cistern.addr;

    let post = raw(
        host,
        format!(
            "POST /files/form HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(post.status, 200, "{}", post.head);
    // An empty POST still says so (RFC 9110 §8.6), so an origin that wants
    // a length does not answer 411.
    let empty_post = raw(
        host,
        format!("POST /files/form HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(empty_post.status, 200, "{}", empty_post.head);
    // The upstream connection is still in step: the next request on it is
    // the one sent.
    let after = raw(
        host,
        format!("GET /files/after.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(after.body, b"after\n", "{}", after.head);

    let seen = origin.seen();
    let posts: Vec<&RawSeen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(posts.len(), 2, "{seen:?}");
    assert_eq!(posts[0].body, b"hello");
    assert_eq!(posts[0].header("content-length"), Some("5"));
    assert_eq!(posts[1].body, b"");
    assert_eq!(posts[1].header("content-length"), Some("0"));
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/form", "/form", "/after.txt"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_need_exactly_one_valid_host() {
    let origin = RawOrigin::start(&[("/a.txt", "aaaa\n"), ("/x", "xxxx\n")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &config(&origin, "enabled #true\nallow \"127.0.0.0/8\""),
        &[],
    );
    let host = cistern.addr;
    let o = origin.addr;

    for (why, request) in [
        (
            "no Host",
            "GET /files/a.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_owned(),
        ),
        (
            "two Host lines",
            format!(
                "GET /files/a.txt HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ),
        ),
        (
            "two Host lines, HTTP/1.0",
            format!("GET /files/a.txt HTTP/1.0\r\nHost: {host}\r\nHost: evil.example\r\n\r\n"),
        ),
        (
            "an invalid Host",
            "GET /files/a.txt HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n".to_owned(),
        ),
        (
            "a Host with userinfo",
            format!("GET /files/a.txt HTTP/1.1\r\nHost: user@{host}\r\nConnection: close\r\n\r\n"),
        ),
        (
            "absolute-form without Host",
            format!("GET http://{o}/x HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ),
    ] {
        let got = raw(host, request.as_bytes()).await;
        assert_eq!(got.status, 400, "{why}: {}", got.head);
    }
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());

    // HTTP/1.0 may leave Host out (RFC 9112 §3.2 binds HTTP/1.1).
    let old = raw(host, b"GET /files/a.txt HTTP/1.0\r\n\r\n").await;
    assert_eq!(old.status, 200, "{}", old.head);
    assert_eq!(old.body, b"aaaa\n");
    // An empty Host is valid syntax (a URI without authority).
    let empty = raw(
        host,
        b"GET /files/a.txt HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(empty.status, 200, "{}", empty.head);
    // Absolute-form: the proxy ignores Host and uses the target's
    // authority (RFC 9112 §3.2.2), and the origin is told its own name.
    let fwd = raw(
        host,
        format!(
            "GET http://{o}/x HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(fwd.status, 200, "{}", fwd.head);
    assert_eq!(fwd.body, b"xxxx\n");
    let seen = origin.seen();
    let x = seen.iter().find(|s| s.path == "/x").expect("forwarded");
    assert_eq!(x.header("host"), Some(o.to_string().as_str()), "{x:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_named_by_their_authority() {
    let origin = RawOrigin::start(&[("/a.txt", "aaaa\n")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #false"), &[]);

    let stream = TcpStream::connect(cistern.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let url = format!("http://{}/files/a.txt", cistern.addr);
    // No Host header: `:authority` names the target (RFC 9113 §8.3.1).
    let req = http::Request::get(&url)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "aaaa\n");
    // A Host naming another entity than `:authority` is malformed.
    let req = http::Request::get(&url)
        .header("host", "elsewhere.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    // A Host that repeats `:authority` is fine.
    let req = http::Request::get(&url)
        .header("host", cistern.addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Policies that lie about lengths: `liar` sets `Content-Length: 32` on
/// every request and `Content-Length: 999` on every response; `answer`
/// answers directly with a 7-byte body it says is 999 bytes long.
const LIAR: &str = r#"
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "content-length")
  (data (i32.const 16) "32")
  (data (i32.const 32) "999")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (call $header_set (i32.const 0) (i32.const 0) (i32.const 14) (i32.const 16) (i32.const 2)))
  (func (export "on_response") (result i32)
    (call $header_set (i32.const 1) (i32.const 0) (i32.const 14) (i32.const 32) (i32.const 3))))
"#;

const ANSWER: &str = r#"
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "content-length")
  (data (i32.const 32) "999")
  (data (i32.const 48) "direct\n")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (drop (call $header_set (i32.const 1) (i32.const 0) (i32.const 14) (i32.const 32) (i32.const 3)))
    (call $respond (i32.const 200) (i32.const 48) (i32.const 7))))
"#;

/// The `Content-Length` a raw response head announces.
fn announced_length(head: &str) -> Option<&str> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_cannot_make_framing_disagree_with_the_body() {
    let origin = RawOrigin::start(&[
        ("/attack", "attack\n"),
        ("/victim.js", "victim\n"),
        ("/evil.js", "evil\n"),
        ("/form", "thanks\n"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("liar.wat"), LIAR).unwrap();
    std::fs::write(dir.path().join("answer.wat"), ANSWER).unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "liar" path="liar.wat"
policy "answer" path="answer.wat"
mirror "files" {{ prefix "/files/"; upstream "http://{0}/"; policies "liar"; }}
mirror "direct" {{ prefix "/direct/"; upstream "http://{0}/"; policies "answer"; }}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let host = cistern.addr;

    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let attack = raw(host, get("/files/attack").as_bytes()).await;
    assert_eq!(attack.status, 200, "{}\n{}", attack.head, cistern.log());
    let victim = raw(
        host,
        format!(
            "GET /files/victim.js HTTP/1.1\r\nX-Pad: GET /evil.js HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let post = raw(
        host,
        format!(
            "POST /files/form HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await;
    let direct = raw(host, get("/direct/x").as_bytes()).await;

    let seen = origin.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert!(
        !paths.contains(&"/evil.js"),
        "a smuggled request reached the origin: {paths:?}"
    );
    assert_eq!(victim.body, b"victim\n", "{}", victim.head);
    for s in seen.iter().filter(|s| s.method == "GET") {
        assert_eq!(s.header("content-length"), None, "{s:?}");
    }
    let form = seen
        .iter()
        .find(|s| s.method == "POST")
        .expect("POST upstream");
    assert_eq!(form.body, b"hello");
    assert_eq!(form.header("content-length"), Some("5"), "{form:?}");
    // Responses announce the length of the body that follows.
    for (what, got, body) in [
        ("a passed response", &post, &b"thanks\n"[..]),
        ("a direct answer", &direct, &b"direct\n"[..]),
        ("a cached response", &victim, &b"victim\n"[..]),
    ] {
        assert_eq!(got.status, 200, "{what}: {}", got.head);
        assert_eq!(
            announced_length(&got.head),
            Some("7"),
            "{what}: {}",
            got.head
        );
        assert_eq!(got.body, body, "{what}");
    }
}
