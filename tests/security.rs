//! Nothing outside the replica root is ever read or written, and the
//! forward proxy and CONNECT are closed to whoever config does not allow.

mod common;

use common::{Cistern, Origin, Resource, find_files, get, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(origin: &Origin, forward: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
forward {{
{forward}
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/pub/"
}}
"#,
        origin.addr
    )
}

/// Sends raw bytes and returns the answer's head (for requests a
/// well-behaved client library would refuse to send).
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_attempts_never_leave_the_replica_root() {
    let origin = Origin::start().await;
    // The origin answers anything it is asked, so whatever path Cistern
    // computes, a file would be written if it let it through.
    for p in [
        "/etc/passwd",
        "/pub/etc/passwd",
        "/pub/%2e%2e/x",
        "/x",
        "/pub/..%2f..%2fescape",
        "/pub/a%2fb",
        "/pub/a%00b",
    ] {
        origin.put(p, Resource::new(pattern(1, 10)));
    }
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("outside.txt");
    std::fs::write(&sentinel, "untouched").unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #true"), &[]);
    let attempts = [
        "/files/../../etc/passwd",
        "/files/%2e%2e/%2e%2e/%2e%2e/outside.txt",
        "/files/..%2f..%2f..%2foutside.txt",
        "/files/a%2fb",
        "/files/a%00b",
        "/files/.%2e/.%2e/x",
    ];
    for target in attempts {
        let answer = raw(
            cistern.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1"), "{target}: {answer}");
    }
    for target in [
        format!(
            "http://{}/pub/%2e%2e/%2e%2e/%2e%2e/outside.txt",
            origin.addr
        ),
        format!("http://{}/../../../outside.txt", origin.addr),
    ] {
        let answer = raw(
            cistern.addr,
            &format!(
                "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                origin.addr
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1"), "{target}: {answer}");
    }
    assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "untouched");
    // Everything that was stored is under root/host:port/.
    let host = origin.addr.to_string();
    for f in find_files(&cistern.root) {
        assert!(
            f.starts_with(&format!("{host}/")),
            "{f} escaped its host directory"
        );
        assert!(!f.split('/').any(|seg| seg == ".." || seg == "."), "{f}");
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    for e in &entries {
        let e = e.to_string_lossy();
        assert!(
            [
                "outside.txt",
                "config.kdl",
                "cistern.log",
                "replica",
                "replica.cistern"
            ]
            .contains(&e.as_ref()),
            "unexpected file {e} next to the replica"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_limited_to_allowed_ports_and_clients() {
    let origin = Origin::start().await;
    origin.put("/pub/hello", Resource::new(pattern(2, 5)));
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &config(&origin, &format!("enabled #true\nconnect-ports {port}")),
        &[],
    );
    // Allowed port: a working tunnel to the origin.
    let mut s = TcpStream::connect(cistern.addr).await.unwrap();
    s.write_all(
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /pub/hello HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert_eq!(
        origin.hits("/pub/hello"),
        1,
        "the tunnel reached the origin"
    );

    // Another port: refused.
    let refused = raw(
        cistern.addr,
        "CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    drop(cistern);

    // A client outside `allow`: neither CONNECT nor forward requests.
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &config(
            &origin,
            &format!("enabled #true\nallow \"192.0.2.0/24\"\nconnect-ports {port}"),
        ),
        &[],
    );
    let refused = raw(
        cistern.addr,
        &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let forward = get(cistern.addr, &origin.url("/pub/hello")).await;
    assert_eq!(forward.status, 403);
    // Mirrors stay open to everyone.
    let mirror = get(cistern.addr, "/files/hello").await;
    assert_eq!(mirror.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_request_limit_answers_429_with_retry_after() {
    let origin = Origin::start().await;
    origin.put(
        "/pub/a",
        Resource::new(pattern(3, 5)).header("cache-control", "max-age=600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = config(&origin, "enabled #true")
        + "\nlimit {\n    requests-per-client 3 per=\"1h\" burst=3\n}\n";
    let cistern = Cistern::start(dir.path(), &text, &[]);
    for _ in 0..3 {
        assert_eq!(get(cistern.addr, "/files/a").await.status, 200);
    }
    let limited = get(cistern.addr, "/files/a").await;
    assert_eq!(limited.status, 429);
    let retry: u64 = limited
        .header("retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=3600).contains(&retry), "{retry}");
}
