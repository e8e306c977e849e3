//! Faults Cistern must survive without a wrong byte: `kill -9` in the middle
//! of many downloads, upstreams that misbehave every way a real one can
//! (reset, stall, say more than they send, send more than they say, break
//! their chunked framing), and replica files changed behind its back.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cistern, Origin, Resource, find_files, get, pattern};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A GET on a new connection; `None` when the connection ends before a
/// response head (which a client sees as a failed transfer).
async fn try_get(addr: SocketAddr, target: &str) -> Option<common::Got> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(target)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    Some(common::read(resp).await)
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Bytes of the partial files under the state directory.
fn partial_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += partial_bytes(&p);
            } else if p.extension().is_some_and(|x| x == "part") {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_twenty_fills_loses_nothing_and_resumes_with_range() {
    const FILES: usize = 20;
    const SIZE: usize = 1 << 20;
    let origin = Origin::start().await;
    let bodies: Vec<Bytes> = (0..FILES).map(|i| pattern(i as u8, SIZE)).collect();
    for (i, body) in bodies.iter().enumerate() {
        // 16 chunks of 64 KiB, 40 ms apart: each fill takes over half a second.
        let slow = Resource::new(body.clone()).slow(Duration::from_millis(40));
        origin.put(&format!("/pool/f{i}.deb"), slow);
    }
    let dir = tempfile::tempdir().unwrap();
    let text = common::files_mirror(&origin);
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let addr = cistern.addr;
    let readers: Vec<_> = (0..FILES)
        .map(|i| {
            tokio::spawn(async move {
                let target = format!("/files/pool/f{i}.deb");
                common::read(common::send(addr, "GET", &target, &[]).await).await
            })
        })
        .collect();
    // kill -9 once the downloads are well under way.
    let state = dir.path().join("replica.cistern");
    let deadline = Instant::now() + Duration::from_secs(20);
    while partial_bytes(&state) < (FILES * SIZE / 4) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cistern.kill9();
    for reader in readers {
        let got = reader.await.unwrap();
        // A client cut off by the kill never gets a short body as complete.
        if let Ok(body) = &got.body {
            assert_eq!(body.len(), SIZE, "a short body passed for complete");
        }
    }
    let root = dir.path().join("replica");
    let check_tree = |when: &str| {
        for file in find_files(&root) {
            let i: usize = file
                .rsplit('f')
                .next()
                .and_then(|n| n.trim_end_matches(".deb").parse().ok())
                .unwrap_or_else(|| panic!("unexpected file {file}"));
            let bytes = std::fs::read(root.join(&file)).unwrap();
            assert_eq!(
                sha256(&bytes),
                sha256(&bodies[i]),
                "{when}: {file} differs from the origin's content"
            );
        }
    };
    check_tree("after kill -9");
    let requests_before = origin.seen().len();

    // Restart on the same state: every file comes out whole, and the
    // interrupted downloads continue where they stopped.
    let cistern = Cistern::start(dir.path(), &text, &[]);
    for (i, body) in bodies.iter().enumerate() {
        origin.put(&format!("/pool/f{i}.deb"), Resource::new(body.clone()));
    }
    for (i, body) in bodies.iter().enumerate() {
        let got = get(cistern.addr, &format!("/files/pool/f{i}.deb")).await;
        assert_eq!(got.status, 200);
        assert_eq!(sha256(got.bytes()), sha256(body), "f{i}: {}", cistern.log());
    }
    check_tree("after the restart");
    assert_eq!(find_files(&root).len(), FILES);
    let resumed = origin.seen()[requests_before..]
        .iter()
        .filter(|s| s.headers.get("range").is_some())
        .count();
    assert!(
        resumed > 0,
        "no download was resumed with Range after the restart"
    );
}

/// How the raw origin spoils the first answer for a path.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `Content-Length` 100000, 30000 bytes, then a TCP reset.
    Reset,
    /// `Content-Length` 100000, 30000 bytes, then a FIN.
    Short,
    /// `Content-Length` 100000, 30000 bytes, then silence.
    Stall,
    /// `Content-Length` 1000, then 1000 bytes and 500 more.
    Long,
    /// Chunked, one good chunk, then a chunk-size line that is not hex.
    BadChunk,
}

const FULL: usize = 100_000;

/// An HTTP/1.1 origin on raw TCP that sends no validators (as real mirrors
/// do), spoils the first answer for each path by its fault, and answers
/// well afterwards.
struct FaultyOrigin {
    addr: SocketAddr,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

impl FaultyOrigin {
    async fn start(faults: &[(&str, Fault)]) -> FaultyOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults: HashMap<String, Fault> =
            faults.iter().map(|(p, f)| (p.to_string(), *f)).collect();
        let asked = Arc::new(Mutex::new(HashMap::new()));
        let count = asked.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let faults = faults.clone();
                let count = count.clone();
                tokio::spawn(serve_faulty(tcp, faults, count));
            }
        });
        FaultyOrigin { addr, asked }
    }

    fn asked(&self, path: &str) -> usize {
        self.asked.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn serve_faulty(
    mut tcp: TcpStream,
    faults: HashMap<String, Fault>,
    count: Arc<Mutex<HashMap<String, usize>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
    let n = {
        let mut c = count.lock().unwrap();
        let n = c.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let body = pattern(9, FULL);
    let fault = faults.get(&path).copied().filter(|_| n == 1);
    let head_for = |len: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n"
        )
    };
    match fault {
        None => {
            let _ = tcp.write_all(head_for(FULL).as_bytes()).await;
            let _ = tcp.write_all(&body).await;
            let _ = tcp.shutdown().await;
        }
        Some(Fault::Reset) => {
            let _ = tcp.write_all(head_for(FULL).as_bytes()).await;
            let _ = tcp.write_all(&body[..30_000]).await;
            let _ = tcp.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Linger 0: close() sends RST instead of FIN.
            let _ = tcp.set_zero_linger();
            drop(tcp);
        }
        Some(Fault::Short) => {
            let _ = tcp.write_all(head_for(FULL).as_bytes()).await;
            let _ = tcp.write_all(&body[..30_000]).await;
            let _ = tcp.shutdown().await;
        }
        Some(Fault::Stall) => {
            let _ = tcp.write_all(head_for(FULL).as_bytes()).await;
            let _ = tcp.write_all(&body[..30_000]).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Some(Fault::Long) => {
            let _ = tcp.write_all(head_for(1000).as_bytes()).await;
            let _ = tcp.write_all(&body[..1000]).await;
            let _ = tcp.write_all(&[b'X'; 500]).await;
            let _ = tcp.shutdown().await;
        }
        Some(Fault::BadChunk) => {
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n";
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(format!("{:x}\r\n", 20_000).as_bytes()).await;
            let _ = tcp.write_all(&body[..20_000]).await;
            let _ = tcp.write_all(b"\r\nzz-not-hex\r\n").await;
            let _ = tcp.write_all(&body[20_000..25_000]).await;
            let _ = tcp.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_upstream_never_gets_a_wrong_byte_stored_or_served_as_complete() {
    let cases = [
        ("/reset.bin", Fault::Reset),
        ("/short.bin", Fault::Short),
        ("/stall.bin", Fault::Stall),
        ("/badchunk.bin", Fault::BadChunk),
    ];
    let origin = FaultyOrigin::start(&cases).await;
    let dir = tempfile::tempdir().unwrap();
    let text = common::files_mirror_of(origin.addr);
    // A 2 s inactivity timeout, so the stalled upstream is given up soon.
    let cistern = Cistern::start(dir.path(), &text, &["-t", "2"]);
    let root = dir.path().join("replica");
    let upstream_dir = root.join(origin.addr.to_string());
    let good = pattern(9, FULL);
    for (path, fault) in cases {
        let target = format!("/files{path}");
        let first = tokio::time::timeout(Duration::from_secs(20), try_get(cistern.addr, &target))
            .await
            .unwrap_or_else(|_| panic!("{fault:?}: the client was never answered"));
        // An error status, a transfer that fails, or a connection closed
        // before the head (the upstream failed before the first body byte
        // reached the client): never the announced length with the wrong
        // bytes, never a short body as complete.
        if let Some(first) = &first {
            match (&first.status, &first.body) {
                (s, Ok(body)) if s.is_success() => panic!(
                    "{fault:?}: a {}-byte body was delivered as complete",
                    body.len()
                ),
                _ => {}
            }
        }
        assert!(
            !upstream_dir.join(&path[1..]).exists(),
            "{fault:?}: something was committed to the replica"
        );
        // The upstream is well again: the next request gets the whole file.
        let second = get(cistern.addr, &target).await;
        assert_eq!(second.status, 200, "{fault:?}");
        assert_eq!(second.bytes(), &good, "{fault:?}");
        let stored = std::fs::read(upstream_dir.join(&path[1..])).unwrap();
        assert_eq!(sha256(&stored), sha256(&good), "{fault:?}");
        assert_eq!(origin.asked(path), 2, "{fault:?}");
    }
}

/// An upstream that sends more than its `Content-Length`: the response is
/// what the length says, the surplus is never taken for anything (not
/// stored, not the next response on a reused connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_past_the_announced_length_are_never_stored_or_served() {
    let origin = FaultyOrigin::start(&[("/long.bin", Fault::Long)]).await;
    let dir = tempfile::tempdir().unwrap();
    let text = common::files_mirror_of(origin.addr);
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let first = get(cistern.addr, "/files/long.bin").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.bytes(), &pattern(9, FULL).slice(..1000));
    let stored = std::fs::read(
        dir.path()
            .join("replica")
            .join(origin.addr.to_string())
            .join("long.bin"),
    )
    .unwrap();
    assert_eq!(stored, &pattern(9, FULL)[..1000]);
    // Another file from the same upstream is its own response.
    let other = get(cistern.addr, "/files/other.bin").await;
    assert_eq!(other.status, 200);
    assert_eq!(other.bytes(), &pattern(9, FULL));
}

/// Replica files truncated or deleted behind Cistern's back are never
/// served: the next request fetches the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_files_truncated_or_deleted_behind_its_back_are_fetched_again() {
    let origin = Origin::start().await;
    let body = pattern(5, 300_000);
    origin.put(
        "/a.iso",
        Resource::new(body.clone()).header("cache-control", "max-age=3600"),
    );
    origin.put(
        "/b.iso",
        Resource::new(body.clone()).header("cache-control", "max-age=3600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &common::files_mirror(&origin), &[]);
    for p in ["/files/a.iso", "/files/b.iso"] {
        assert_eq!(get(cistern.addr, p).await.bytes(), &body);
        assert_eq!(
            get(cistern.addr, p).await.header("cache-status"),
            "cistern; hit"
        );
    }
    let files = dir.path().join("replica").join(origin.addr.to_string());
    // Truncated (as a full disk or a careless rsync leaves it) …
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(files.join("a.iso"))
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    // … and deleted.
    std::fs::remove_file(files.join("b.iso")).unwrap();
    for (p, path) in [("/files/a.iso", "/a.iso"), ("/files/b.iso", "/b.iso")] {
        let got = get(cistern.addr, p).await;
        assert_eq!(got.status, 200, "{p}");
        assert_eq!(got.bytes(), &body, "{p}: {}", cistern.log());
        assert_eq!(origin.hits(path), 2, "{p}");
    }
    assert_eq!(std::fs::read(files.join("a.iso")).unwrap(), body);
    assert_eq!(std::fs::read(files.join("b.iso")).unwrap(), body);
}
