//! Interim (1xx) responses from an origin: `103 Early Hints` before the
//! final answer is never taken for the answer, never stored and never
//! served from the replica; the final response is cached as usual.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Cistern, get};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BODY: &[u8] = b"the final answer\n";

/// A raw HTTP/1.1 origin that answers every request with a `103 Early
/// Hints`, then a cacheable `200`, and closes the connection (FIN) after
/// it, as a server that does not keep connections alive does.
async fn hinting_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let hint = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n";
                let _ = tcp.write_all(hint).await;
                let _ = tcp.flush().await;
                let last = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=3600\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
                    BODY.len()
                );
                let _ = tcp.write_all(last.as_bytes()).await;
                let _ = tcp.write_all(BODY).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_are_not_the_answer_and_are_never_stored() {
    let (origin, requests) = hinting_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::files_mirror_of(origin);
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let first = get(cistern.addr, "/files/page.txt").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.bytes());
    assert_eq!(first.bytes().as_ref(), BODY);
    let hit = get(cistern.addr, "/files/page.txt").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.bytes().as_ref(), BODY);
    assert!(
        hit.header("cache-status").contains("hit"),
        "{:?}",
        hit.headers
    );
    // The hint's fields belong to the hint alone, not to the stored answer
    // (a mirror's hit carries Cistern's own Metalink links, never the hint's).
    assert!(
        hit.headers
            .get_all("link")
            .iter()
            .all(|l| !l.to_str().unwrap().contains("style.css")),
        "{:?}",
        hit.headers
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    let stored = std::fs::read(cistern.root.join(format!("{origin}/page.txt"))).unwrap();
    assert_eq!(stored, BODY);
}
