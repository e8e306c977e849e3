//! RFC 9111 rules where shared caches go wrong, end to end: `Vary: *`,
//! fields named by `Connection`, header parsing the rules depend on (`Age`,
//! directive case) and the targeted cache-control fields of RFC 9213.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cistern::app::Running;
use cistern::clock::Clock;
use common::{Origin, Resource, get, pattern, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn start(upstream: std::net::SocketAddr, dir: &Path, clock: &Clock) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "site" {{
    prefix "/"
    upstream "http://{upstream}/"
}}
"#,
        dir.join("replica").display(),
    );
    common::start_on_clock(&text, &dir.join("config.kdl"), clock).await
}

/// Every file under `root` as lowercased text.
fn all_text(root: &Path) -> String {
    common::find_files(root)
        .iter()
        .map(|f| String::from_utf8_lossy(&std::fs::read(root.join(f)).unwrap()).to_lowercase())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_passed_through_once_and_never_stored() {
    let origin = Origin::start().await;
    origin.put(
        "/any",
        Resource::new(pattern(1, 300))
            .header("cache-control", "max-age=600")
            .header("vary", "*"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let got = get(addr, "/any").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &pattern(1, 300));
    assert_eq!(
        got.header("cache-status"),
        "cistern; fwd=uri-miss; detail=not-storable"
    );
    assert_eq!(
        origin.hits("/any"),
        1,
        "one client request, one upstream request: {:#?}",
        origin.seen()
    );
    assert!(common::find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}

/// What the raw origin saw: request heads, lowercased.
#[derive(Clone, Default)]
struct RawSeen(Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>);

/// An origin written on raw TCP, as a real server would send a response
/// naming its own hop-by-hop field in `Connection` (hyper's server would
/// act on `Connection: close` itself); one response per connection, ended
/// with a FIN.
async fn raw_origin(head: &'static str, body: &'static [u8]) -> (std::net::SocketAddr, RawSeen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = RawSeen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                s.0.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).to_lowercase());
                s.1.fetch_add(1, Ordering::SeqCst);
                let resp = format!("{head}Content-Length: {}\r\n\r\n", body.len());
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.write_all(body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_named_by_connection_are_never_stored_served_or_sent_upstream() {
    let (upstream, seen) = raw_origin(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Type: text/plain\r\n\
         ETag: \"hop\"\r\nConnection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\n",
        b"hello hop\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(upstream, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let client_hop = [("connection", "X-Client-Hop"), ("x-client-hop", "1")];
    let miss = request(addr, "GET", "/doc.txt", &client_hop).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.bytes().as_ref(), b"hello hop\n");
    assert!(miss.header("cache-status").contains("miss"), "{miss:?}");
    assert_eq!(miss.header("x-secret-hop"), "", "{:?}", miss.headers);
    let hit = get(addr, "/doc.txt").await;
    assert_eq!(hit.header("cache-status"), "cistern; hit");
    assert_eq!(hit.header("x-secret-hop"), "", "{:?}", hit.headers);
    assert_eq!(seen.1.load(Ordering::SeqCst), 1);
    let asked = seen.0.lock().unwrap()[0].clone();
    assert!(!asked.contains("x-client-hop"), "{asked}");

    let stored = all_text(&dir.path().join("replica.cistern"));
    assert!(
        stored.contains("text/plain"),
        "the metadata was read: {stored}"
    );
    assert!(!stored.contains("x-secret-hop"), "{stored}");
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_and_directive_names_are_read_as_the_rfc_says() {
    let origin = Origin::start().await;
    // Already two hours old on arrival, for a lifetime of one: stale.
    origin.put(
        "/aged",
        Resource::new(pattern(2, 100))
            .header("cache-control", "max-age=3600")
            .header("age", "7200, 0"),
    );
    // Directive names in any case. Without `MAX-AGE` the response would be
    // fresh for months by heuristic (its Last-Modified is years old).
    origin.put(
        "/shouting",
        Resource::new(pattern(3, 100)).header("cache-control", "MAX-AGE=60"),
    );
    origin.put(
        "/no-cache",
        Resource::new(pattern(4, 100)).header("cache-control", "max-age=600, No-CaChE"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    for path in ["/aged", "/shouting", "/no-cache"] {
        assert_eq!(get(addr, path).await.status, 200, "{path}");
    }
    // Fresh for up to a minute.
    clock.advance(Duration::from_secs(30));
    assert_eq!(
        get(addr, "/shouting").await.header("cache-status"),
        "cistern; hit"
    );
    clock.advance(Duration::from_secs(31));
    for path in ["/aged", "/shouting", "/no-cache"] {
        let again = get(addr, path).await;
        assert_eq!(again.status, 200, "{path}");
        assert!(
            again.header("cache-status").contains("fwd-status=304"),
            "{path} is stale and revalidated: {:?}",
            again.headers
        );
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_cache_control_steers_cistern_and_stays_here() {
    let origin = Origin::start().await;
    // Browsers must not keep it; Cistern may, for ten minutes.
    origin.put(
        "/cdn",
        Resource::new(pattern(5, 100))
            .header("cache-control", "no-store")
            .header("cdn-cache-control", "max-age=600"),
    );
    // Our own field wins over the CDN one.
    origin.put(
        "/ours",
        Resource::new(pattern(6, 100))
            .header("cache-control", "max-age=600")
            .header("cdn-cache-control", "max-age=600")
            .header("cistern-cache-control", "no-store"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let miss = get(addr, "/cdn").await;
    assert!(miss.header("cache-status").contains("miss"), "{miss:?}");
    clock.advance(Duration::from_secs(300));
    let hit = get(addr, "/cdn").await;
    assert_eq!(hit.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/cdn"), 1);
    for got in [&miss, &hit] {
        assert_eq!(got.header("cache-control"), "no-store", "{:?}", got.headers);
        assert_eq!(got.header("cdn-cache-control"), "", "{:?}", got.headers);
    }

    for _ in 0..2 {
        let passed = get(addr, "/ours").await;
        assert_eq!(
            passed.header("cache-status"),
            "cistern; fwd=uri-miss; detail=not-storable"
        );
        assert_eq!(passed.header("cache-control"), "max-age=600");
        assert_eq!(passed.header("cistern-cache-control"), "");
        assert_eq!(passed.header("cdn-cache-control"), "");
    }
    assert_eq!(origin.hits("/ours"), 2);
    cistern.shutdown().await;
}

/// `targeted-field` renames Cistern's own targeted field: the new name
/// steers it and stays here, the default name becomes an ordinary field.
/// (The real binary: the field is one per process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targeted_field_name_is_configurable() {
    let origin = Origin::start().await;
    origin.put(
        "/edge",
        Resource::new(pattern(7, 100))
            .header("cache-control", "no-store")
            .header("edge-cache-control", "max-age=600"),
    );
    origin.put(
        "/old-name",
        Resource::new(pattern(8, 100))
            .header("cache-control", "max-age=600")
            .header("cistern-cache-control", "no-store"),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\ntargeted-field \"Edge-Cache-Control\"\n",
        common::files_mirror(&origin)
    );
    let cistern = common::Cistern::start(dir.path(), &config, &[]);
    for want in ["cistern; fwd=miss; stored", "cistern; hit"] {
        let got = get(cistern.addr, "/files/edge").await;
        assert_eq!(got.header("cache-status"), want, "{:?}", got.headers);
        assert_eq!(got.header("cache-control"), "no-store");
        assert_eq!(got.header("edge-cache-control"), "", "{:?}", got.headers);
    }
    assert_eq!(origin.hits("/edge"), 1);
    for want in ["cistern; fwd=miss; stored", "cistern; hit"] {
        let got = get(cistern.addr, "/files/old-name").await;
        assert_eq!(got.header("cache-status"), want, "{:?}", got.headers);
        assert_eq!(got.header("cistern-cache-control"), "no-store");
    }
    assert_eq!(origin.hits("/old-name"), 1);
}
