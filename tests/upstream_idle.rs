//! Pooled upstream connections that the origin closes while they sit
//! idle. Real servers end an idle keep-alive connection after a few
//! seconds (nginx 75 s, Apache 5 s, many load balancers less) with a FIN;
//! Cistern's pool must not hand the dead connection to the next request
//! and answer the client 502. The origin here is written by hand so that
//! it behaves exactly like such a server: keep-alive, `Cache-Control:
//! no-store` answers (every request goes upstream), and a FIN after
//! 200 ms without a request.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Cistern;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the origin keeps an idle connection open.
const ORIGIN_IDLE: Duration = Duration::from_millis(200);

/// A keep-alive origin that closes idle connections.
#[derive(Clone)]
struct ClosingOrigin {
    addr: SocketAddr,
    /// Requests answered.
    answered: Arc<AtomicUsize>,
    /// Connections it closed for idleness.
    idle_closed: Arc<AtomicUsize>,
}

impl ClosingOrigin {
    async fn start() -> ClosingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = ClosingOrigin {
            addr: listener.local_addr().unwrap(),
            answered: Arc::default(),
            idle_closed: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(o.clone().connection(stream));
            }
        });
        origin
    }

    async fn connection(self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Bounded: a test connection carries a handful of requests.
        for _ in 0..100 {
            // Waiting for the next request. A request that arrives after
            // the idle timeout is the race every keep-alive client meets:
            // the server's timer fired and it closed the connection (a
            // FIN, no answer) while the request was on its way. Made
            // deterministic here by closing on the late request itself.
            if buf.is_empty() {
                let idle_since = Instant::now();
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if idle_since.elapsed() > ORIGIN_IDLE => {
                        let _ = s.shutdown().await;
                        self.idle_closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let length: usize = head
                .split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim() == "content-length")
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < length {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
            let n = self.answered.fetch_add(1, Ordering::SeqCst) + 1;
            let body = format!("answer {n}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Lets a pooled connection outlive the origin's idle timeout. Nothing
/// can be polled for: the passing of time is what is tested.
async fn outlive_origin_idle() {
    tokio::time::sleep(ORIGIN_IDLE + Duration::from_millis(150)).await;
}

/// Sends `request` on a new connection (it says `Connection: close`) and
/// returns the status and body, reading for at most 10 s.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

fn config(origin: &ClosingOrigin, timeouts: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
timeouts {{ {timeouts} }}
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/"
}}
"#,
        origin.addr
    )
}

fn get(c: &Cistern) -> String {
    format!(
        "GET /files/a HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        c.addr
    )
}

fn post(c: &Cistern) -> String {
    format!(
        "POST /files/form HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        c.addr
    )
}

/// The pool (4 s by default) outlives the origin's 200 ms: every second
/// GET meets a pooled connection the origin closed under it and is sent
/// again on a new one (which is not pooled, so the next GET connects).
#[tokio::test]
async fn a_get_on_a_connection_the_origin_closed_is_sent_again() {
    let origin = ClosingOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &config(&origin, ""), &[]);
    for round in 0..4 {
        let (status, text) = raw(c.addr, &get(&c)).await;
        assert_eq!(status, 200, "round {round}: {text}\nlog:\n{}", c.log());
        outlive_origin_idle().await;
    }
    assert_eq!(origin.idle_closed.load(Ordering::SeqCst), 2);
    assert_eq!(origin.answered.load(Ordering::SeqCst), 4);
    c.log_when("the resend logged", |l| {
        l.matches("sending again once on a new connection").count() == 2
    })
    .await;
}

/// A POST is never sent twice, so the pool must let go of a connection
/// before the origin does: with `upstream-idle` below the origin's
/// keep-alive timeout each POST gets a new connection.
#[tokio::test]
async fn a_post_gets_a_connection_younger_than_the_origin_idle_timeout() {
    let origin = ClosingOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(
        dir.path(),
        &config(&origin, r#"upstream-idle "100ms""#),
        &[],
    );
    for round in 0..3 {
        let (status, text) = raw(c.addr, &post(&c)).await;
        assert_eq!(status, 200, "round {round}: {text}\nlog:\n{}", c.log());
        outlive_origin_idle().await;
    }
    assert_eq!(
        origin.idle_closed.load(Ordering::SeqCst),
        0,
        "a stale connection was used"
    );
    assert_eq!(origin.answered.load(Ordering::SeqCst), 3);
}

/// On a connection the origin closed, a POST fails (502) and is not sent
/// again: the origin may have acted on it, and its body is gone.
#[tokio::test]
async fn a_post_on_a_connection_the_origin_closed_is_not_sent_again() {
    let origin = ClosingOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &config(&origin, ""), &[]);
    let (status, _) = raw(c.addr, &post(&c)).await;
    assert_eq!(status, 200);
    outlive_origin_idle().await;
    let (status, text) = raw(c.addr, &post(&c)).await;
    assert_eq!(status, 502, "{text}");
    assert_eq!(origin.idle_closed.load(Ordering::SeqCst), 1);
    assert_eq!(
        origin.answered.load(Ordering::SeqCst),
        1,
        "the POST was sent again"
    );
}
