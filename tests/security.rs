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
    // The origin resolves paths the way nginx does (decode, merge `//`,
    // resolve dot segments, then look up), so whatever climbs out of the
    // mirror's base `/pub/` on the way there would be served from outside.
    let origin = Origin::start().await;
    origin.normalise_like_nginx();
    for p in [
        "/etc/passwd",
        "/secret",
        "/x",
        "/outside.txt",
        "/pub/etc/passwd",
    ] {
        origin.put(p, Resource::new(pattern(1, 10)));
    }
    let inside = pattern(2, 10);
    origin.put("/pub/a/b", Resource::new(inside.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("outside.txt");
    std::fs::write(&sentinel, "untouched").unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "enabled #true"), &[]);
    // Each attempt and the status it must get: 400 for anything that climbs
    // above the base, however it is spelled; a harmless dot segment inside
    // the base is resolved and served.
    let attempts = [
        ("/files/../secret", 400),
        ("/files/../../etc/passwd", 400),
        ("/files/%2e%2e/%2e%2e/%2e%2e/outside.txt", 400),
        ("/files/%2E%2e/secret", 400),
        ("/files/.%2e/.%2e/x", 400),
        ("/files/..%2f..%2f..%2foutside.txt", 400),
        ("/files/a%2f..%2f..%2fsecret", 400),
        ("/files/a/../../secret", 400),
        ("/files/a//../../secret", 400),
        ("/files/..%5csecret", 400),
        ("/files/../pub/a/b", 400),
        ("/files/a/./b", 200),
        ("/files/a/x/../b", 200),
        ("/files/a/x/%2e%2e/b", 200),
        ("/files/a%2fb", 200),
    ];
    for (target, want) in attempts {
        let answer = raw(
            cistern.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let status = format!("HTTP/1.1 {want} ");
        assert!(answer.starts_with(&status), "{target}: {answer}");
        if want == 400 {
            assert!(
                answer.contains("climbs above /files/"),
                "{target}: {answer}"
            );
        }
    }
    assert_eq!(get(cistern.addr, "/files/a/./b").await.bytes(), &inside);
    // A NUL byte is refused too (the key cannot name a file with it).
    let nul = raw(
        cistern.addr,
        "GET /files/a%00b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(nul.starts_with("HTTP/1.1 4"), "{nul}");

    // What the origin was asked, resolved as nginx resolves it, is always
    // below the mirror's base.
    let seen = origin.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        let resolved = common::nginx_path(&s.path);
        assert!(
            resolved.as_deref().is_some_and(|p| p.starts_with("/pub/")),
            "the origin was asked for {} ({resolved:?}), outside /pub/",
            s.path
        );
    }
    for p in ["/etc/passwd", "/secret", "/x", "/outside.txt"] {
        assert_eq!(origin.hits(p), 0, "{p} was asked for directly");
    }

    // The forward proxy goes where its client says; it still never writes
    // outside the replica root.
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
    // Everything the mirror stored is under root/host:port/pub/; the
    // forward proxy's files are under root/host:port/.
    let host = origin.addr.to_string();
    for f in find_files(&cistern.root) {
        assert!(
            f.starts_with(&format!("{host}/pub/")) || f == format!("{host}/outside.txt"),
            "{f} escaped the mirror's base"
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
