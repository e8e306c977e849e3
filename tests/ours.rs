//! "Ours" means Cistern's own addresses and names, nothing else: the admin
//! listener answers only to them (a DNS-rebinding page names its own
//! host), the forward proxy, transparent mode and CONNECT never connect to
//! one of Cistern's own listeners (however the target is spelt), and a
//! host on our port that is not us is forwarded like any other.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cistern, Origin, Resource, free_port, get, pattern};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A forward proxy (transparent too) whose CONNECT may reach its own port
/// and the admin port, with the admin listener on `admin`; `admin_extra`
/// goes into the admin block, `extra` at the top level.
fn config(admin: SocketAddr, admin_extra: &str, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
forward {{
    enabled #true
    transparent #true
    connect-ports 443 {{PORT}} {admin_port}
}}
timeouts {{
    connect "3s"
}}
admin {{
    listen "{admin}"
    {admin_extra}
}}
{extra}
"#,
        admin_port = admin.port(),
    )
}

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Sends `request` as is and reads the answer: its head and a body of
/// `Content-Length` bytes (or up to the end), for heads a client library
/// would not send.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline && !answer_complete(&out) {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `out` holds a head and all the body its `Content-Length` says.
fn answer_complete(out: &[u8]) -> bool {
    let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| out.len() >= end + 4 + n)
}

/// `GET path` with `host` as the `Host` header, on a new connection.
async fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> String {
    raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// The status code of a raw answer.
fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

/// An HTTP/2 (prior knowledge) GET of `url`, whose authority becomes
/// `:authority`; the status and body.
async fn h2_get(addr: SocketAddr, url: &str) -> (StatusCode, Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get(url).body(Empty::<Bytes>::new()).unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_only_to_its_own_address_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(admin, "", ""), &[]);
    let port = admin.port();

    // Its own address and localhost, as a browser on this machine sends them.
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let answer = get_with_host(admin, "/api/status", &host).await;
        assert_eq!(status(&answer), 200, "{host}: {answer}");
        assert!(answer.contains("generation"), "{answer}");
    }
    // A page of evil.example whose DNS name now points here.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        let answer = get_with_host(admin, "/api/status", &host).await;
        assert_eq!(status(&answer), 421, "{host}: {answer}");
        assert!(!answer.contains("generation"), "{answer}");
        assert!(answer.contains("admin { host"), "{answer}");
        let page = get_with_host(admin, "/replica", &host).await;
        assert_eq!(status(&page), 421, "{host}: {page}");
    }
    // The absolute URL counts as much as the Host header.
    let answer = raw(
        admin,
        &format!(
            "GET http://evil.example:{port}/api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status(&answer), 421, "{answer}");
    // No Host at all (HTTP/1.0) names nothing.
    let answer = raw(admin, "GET /api/status HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), 400, "{answer}");
    // HTTP/2 names the host in :authority.
    let (code, body) = h2_get(admin, &format!("http://evil.example:{port}/api/status")).await;
    assert_eq!(code, StatusCode::MISDIRECTED_REQUEST, "{body:?}");
    let (code, body) = h2_get(admin, &format!("http://127.0.0.1:{port}/api/status")).await;
    assert_eq!(code, StatusCode::OK, "{body:?}");
    drop(cistern);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_host_names_extend_what_the_admin_answers_to() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let names = r#"host "cistern.lan" "Cistern.Example.:8443""#;
    let cistern = Cistern::start(dir.path(), &config(admin, names, ""), &[]);
    let port = admin.port();
    for (host, want) in [
        (format!("cistern.lan:{port}"), 200),
        (format!("CISTERN.LAN.:{port}"), 200),
        // A port mapping in front: the name with the port it names.
        ("cistern.example:8443".to_owned(), 200),
        (format!("cistern.example:{port}"), 421),
        ("cistern.lan:8443".to_owned(), 421),
        (format!("other.lan:{port}"), 421),
    ] {
        let answer = get_with_host(admin, "/healthz", &host).await;
        assert_eq!(status(&answer), want, "{host}: {answer}");
    }
    drop(cistern);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_proxy_never_connects_to_cisterns_own_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(admin, "", ""), &[]);
    let (a, p) = (admin.port(), cistern.addr.port());
    // The admin API through the proxy, by address and by names and
    // spellings that resolve to it.
    for url in [
        format!("http://127.0.0.1:{a}/api/status"),
        format!("http://localhost:{a}/api/status"),
        format!("http://2130706433:{a}/api/status"),
        format!("http://127.1:{a}/healthz"),
    ] {
        let got = get(cistern.addr, &url).await;
        let body = String::from_utf8_lossy(got.bytes()).into_owned();
        assert_eq!(got.status, StatusCode::LOOP_DETECTED, "{url}: {body}");
        assert!(body.contains("own admin listener"), "{url}: {body}");
        assert!(!body.contains("generation"), "{url}: {body}");
    }
    // Its own proxy port under a name that is not one of ours.
    for url in [
        format!("http://127.1:{p}/"),
        format!("http://2130706433:{p}/x"),
    ] {
        let got = get(cistern.addr, &url).await;
        let body = String::from_utf8_lossy(got.bytes()).into_owned();
        assert_eq!(got.status, StatusCode::LOOP_DETECTED, "{url}: {body}");
        assert!(body.contains("own proxy listener"), "{url}: {body}");
    }
    // Transparent mode: an origin-form request whose Host is the admin.
    let answer = get_with_host(cistern.addr, "/api/status", &format!("127.0.0.1:{a}")).await;
    assert_eq!(status(&answer), 508, "{answer}");
    assert!(!answer.contains("generation"), "{answer}");
    // Each refusal is one request in the access log: none of them made a
    // second pass through Cistern (which would log a request of its own).
    let lines = |l: &str| l.matches("cistern::access:").count();
    let log = cistern
        .log_when("seven access-log lines", |l| lines(l) >= 7)
        .await;
    assert_eq!(lines(&log), 7, "{log}");
    assert_eq!(log.matches(" 508 ").count(), 7, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_cisterns_own_ports_is_refused() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    // The origin's port is allowed too, to show tunnels still work.
    let text = config(admin, "", "").replace(
        "connect-ports 443",
        &format!("connect-ports 443 {}", origin.addr.port()),
    );
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let p = cistern.addr.port();
    for target in [
        format!("127.0.0.1:{p}"),
        format!("localhost:{p}"),
        format!("127.1:{p}"),
        format!("127.0.0.1:{}", admin.port()),
    ] {
        let answer = raw(
            cistern.addr,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&answer), 508, "{target}: {answer}");
        assert!(answer.contains("refusing to connect"), "{target}: {answer}");
    }
    // A tunnel elsewhere still opens.
    let target = origin.addr.to_string();
    let mut s = TcpStream::connect(cistern.addr).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_our_port_at_another_address_is_forwarded() {
    // Cistern on 127.0.0.1:P and the origin on 127.0.0.2:P: the same port
    // number, another server.
    let port = free_port();
    let origin = Origin::start_on(&format!("127.0.0.2:{port}")).await;
    origin.put("/x", Resource::new(pattern(7, 1000)));
    origin.put("/y", Resource::new(pattern(8, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("replica");
    let text = format!(
        r#"
listen "127.0.0.1:{port}"
store {{
    root "{}"
}}
forward {{
    enabled #true
    transparent #true
}}
admin {{
    enabled #false
}}
"#,
        root.display()
    );
    std::fs::write(dir.path().join("config.kdl"), text).unwrap();
    let cistern = Cistern::spawn(dir.path(), port, root, &["--config", "config.kdl"], &[]);
    let got = get(cistern.addr, &format!("http://127.0.0.2:{port}/x")).await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(got.bytes(), &pattern(7, 1000));
    assert_eq!(origin.hits("/x"), 1);
    // Transparent: the Host names the other server.
    let answer = get_with_host(cistern.addr, "/y", &format!("127.0.0.2:{port}")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(origin.hits("/y"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_names_are_served_locally_and_other_names_are_not() {
    let origin = Origin::start().await;
    origin.put("/pub/a.txt", Resource::new(pattern(3, 500)));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let mirror = format!(
        r#"server-name "cache.lan"
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/pub/"
}}"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config(admin, "", &mirror), &[]);
    let p = cistern.addr.port();
    // apt with http_proxy set and sources naming the cache.
    let got = get(cistern.addr, &format!("http://cache.lan:{p}/files/a.txt")).await;
    assert_eq!(got.status, StatusCode::OK, "{:?}", got.body);
    assert_eq!(got.bytes(), &pattern(3, 500));
    assert_eq!(origin.hits("/pub/a.txt"), 1);
    // Transparent mode, the same name in Host: ours, so the mirror again.
    let answer = get_with_host(cistern.addr, "/files/a.txt", &format!("cache.lan:{p}")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    // Another name on our port is somebody else's: forwarded (and it does
    // not resolve), never the mirror.
    let got = get(
        cistern.addr,
        &format!("http://other.invalid:{p}/files/a.txt"),
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{:?}", got.body);
    assert_eq!(origin.hits("/pub/a.txt"), 1);
}
