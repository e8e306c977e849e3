//! What a connection may hold, tried as an attacker would on loopback:
//! connections that say nothing (or stop inside the HTTP/2 preface, or
//! after a TLS handshake) are closed after the idle timeout on the proxy,
//! site and admin listeners;
//! connections over `max-connections` or `max-connections-per-client` are
//! closed at once while other clients are still served; and a CONNECT
//! tunnel that moves no byte for the idle timeout is closed while a busy
//! one stays open.

mod common;
mod tls_common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cistern, Origin, Resource, free_port, get, pattern};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The idle timeout the tests start Cistern with (`-t`).
const IDLE: Duration = Duration::from_secs(2);

/// How much later than the timeout a close may come and still pass.
const SLACK: Duration = Duration::from_secs(3);

fn config(origin: &Origin, admin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{origin}/pub/"
}}
admin {{
    listen "{admin}"
}}
{extra}
"#,
        origin = origin.addr,
    )
}

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A TCP connection to `to` from the loopback address `from`: Linux
/// routes all of 127.0.0.0/8 to `lo`, so each address is a client of its
/// own.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Waits (up to 10 s) until something accepts on `addr`: the admin
/// listener comes up a little after the proxy's.
async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the peer closes (EOF or reset), up to `bound`; how long
/// that took, or `None` when the connection was still open at `bound`.
/// Whatever it sent before closing is returned too.
async fn closed_within(
    s: &mut (impl AsyncRead + Unpin),
    bound: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (None, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(start.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An HTTP/1.1 keep-alive connection from `from` that has had one
/// request answered: a client's idle pooled connection.
struct Pooled {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

/// Opens a pooled connection and sends `GET path` on it; `None` when
/// Cistern closed it instead of answering.
async fn pooled(from: IpAddr, proxy: SocketAddr, path: &str) -> Option<Pooled> {
    let stream = connect_from(from, proxy).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", proxy.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    assert_eq!(resp.status(), 200, "{path}");
    resp.into_body().collect().await.ok()?;
    Some(Pooled { sender })
}

/// `count` pooled connections from `from`. Each is retried for a while:
/// the start-up probe's connection may not be counted out yet.
async fn pool(from: IpAddr, proxy: SocketAddr, count: usize) -> Vec<Pooled> {
    let mut out = Vec::new();
    for _ in 0..count {
        let mut tries = 0;
        let p = loop {
            if let Some(p) = pooled(from, proxy, "/files/a").await {
                break p;
            }
            tries += 1;
            assert!(
                tries < 100,
                "could not open pooled connection {}",
                out.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        out.push(p);
    }
    out
}

/// Sends a whole request from `from` on a new connection and reports
/// whether it was closed without an answer within 5 s.
async fn refused(from: IpAddr, proxy: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(from, proxy).await else {
        return true;
    };
    let _ = s
        .write_all(b"GET /files/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (closed, got) = closed_within(&mut s, Duration::from_secs(5)).await;
    closed.is_some() && got.is_empty()
}

/// Polls (up to 10 s) until a request from `from` on a new connection is
/// answered: a freed place is seen a moment after the client lets go.
async fn eventually_served(from: IpAddr, proxy: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if pooled(from, proxy, "/files/a").await.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "{from} was never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(admin: SocketAddr) -> String {
    String::from_utf8(get(admin, "/metrics").await.bytes().to_vec()).unwrap()
}

/// The value of the sample line starting with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

fn localhost(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_open_connections_are_closed_after_the_idle_timeout() {
    let origin = Origin::start().await;
    origin.put("/pub/a", Resource::new(pattern(1, 100)));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, ""), &["-t", "2"]);
    wait_listening(admin).await;

    // What each connection sends before it goes quiet, and where.
    let cases: [(&str, SocketAddr, &[u8]); 6] = [
        ("proxy, nothing", cistern.addr, b""),
        (
            "proxy, half the HTTP/2 preface",
            cistern.addr,
            b"PRI * HTTP/2.0\r\n",
        ),
        (
            "proxy, the HTTP/2 preface only",
            cistern.addr,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ),
        (
            "proxy, half a request head",
            cistern.addr,
            b"GET /files/a HTTP/1.1\r\nHost: x\r\n",
        ),
        ("admin, nothing", admin, b""),
        (
            "admin, half the HTTP/2 preface",
            admin,
            b"PRI * HTTP/2.0\r\n",
        ),
    ];
    let mut conns = Vec::new();
    for (what, addr, bytes) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        conns.push((what, s));
    }
    let checks = conns.into_iter().map(|(what, mut s)| async move {
        let (closed, _) = closed_within(&mut s, IDLE + SLACK).await;
        (what, closed)
    });
    let mut wrong = Vec::new();
    for (what, closed) in futures_util::future::join_all(checks).await {
        match closed {
            None => wrong.push(format!("{what}: still open after {:?}", IDLE + SLACK)),
            // Closed by the timeout, not at once.
            Some(after) if after < IDLE / 2 => {
                wrong.push(format!("{what}: closed after only {after:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // A client that does send a request is still served, on both.
    assert_eq!(get(cistern.addr, "/files/a").await.status, 200);
    let m = metrics(admin).await;
    assert!(
        sample(
            &m,
            "cistern_connections_silent_closed_total{listener=\"proxy\"}"
        ) >= 4,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "cistern_connections_silent_closed_total{listener=\"admin\"}"
        ) >= 2,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_send_no_request_are_closed_after_the_idle_timeout() {
    let origin = Origin::start().await;
    origin.put("/a", Resource::new(pattern(4, 100)));
    let dir = tempfile::tempdir().unwrap();
    let ca = tls_common::Ca::new();
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    // Only the site's TLS listener, on the port the fixture waits for.
    let text = format!(
        r#"
store {{
    root "{{ROOT}}"
}}
site "one.test" {{
    listen "127.0.0.1:{{PORT}}"
    tls cert="one.pem" key="one.key"
    upstream "http://{}/"
}}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &text, &["-t", "2"]);
    // A handshake, then nothing: h2 and HTTP/1.1 by ALPN.
    let mut streams = Vec::new();
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let tcp = TcpStream::connect(cistern.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("one.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(ca.client(&[alpn]))
            .connect(name, tcp)
            .await
            .expect("handshake");
        streams.push((String::from_utf8_lossy(alpn).into_owned(), tls));
    }
    let checks = streams.into_iter().map(|(alpn, mut s)| async move {
        let (closed, _) = closed_within(&mut s, IDLE + SLACK).await;
        (alpn, closed)
    });
    let mut wrong = Vec::new();
    for (alpn, closed) in futures_util::future::join_all(checks).await {
        match closed {
            None => wrong.push(format!("{alpn}: still open after {:?}", IDLE + SLACK)),
            Some(after) if after < IDLE / 4 => {
                wrong.push(format!("{alpn}: closed after only {after:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_client_cap_are_closed_at_once() {
    let origin = Origin::start().await;
    origin.put("/pub/a", Resource::new(pattern(2, 100)));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let limit = "limit {\n    max-connections-per-client 5\n}";
    // A long idle timeout: only the cap closes connections here.
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, limit), &["-t", "60"]);
    wait_listening(admin).await;

    let mut held = pool(localhost(1), cistern.addr, 5).await;
    assert!(
        refused(localhost(1), cistern.addr).await,
        "a sixth connection from 127.0.0.1 was let in"
    );
    // Another client is served meanwhile.
    assert!(
        pooled(localhost(2), cistern.addr, "/files/a")
            .await
            .is_some()
    );
    // The held connections still work.
    let p = held.last_mut().unwrap();
    let req = Request::get("/files/a")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(p.sender.send_request(req).await.unwrap().status(), 200);

    let m = metrics(admin).await;
    assert!(
        sample(
            &m,
            "cistern_connections_refused_total{listener=\"proxy\",cap=\"max-connections-per-client\"}"
        ) >= 1,
        "{m}"
    );
    // Letting one go makes room for the client again.
    held.pop();
    eventually_served(localhost(1), cistern.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_global_cap_are_closed_at_once() {
    let origin = Origin::start().await;
    origin.put("/pub/a", Resource::new(pattern(3, 100)));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let limit = "limit {\n    max-connections 5\n}";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, limit), &["-t", "60"]);
    wait_listening(admin).await;

    let mut held = pool(localhost(1), cistern.addr, 5).await;
    assert!(
        refused(localhost(3), cistern.addr).await,
        "a sixth connection (from another client) was let in"
    );
    // The admin listener counts its connections apart: still reachable.
    let m = metrics(admin).await;
    assert!(
        sample(
            &m,
            "cistern_connections_refused_total{listener=\"proxy\",cap=\"max-connections\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(
        sample(&m, "cistern_connections_open{listener=\"proxy\"}"),
        5,
        "{m}"
    );
    held.pop();
    eventually_served(localhost(3), cistern.addr).await;
}

/// A TCP echo server: what a tunnel's far end would be.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Opens a CONNECT tunnel to `target` through `proxy`.
async fn tunnel(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("CONNECT answer in time")
            .unwrap();
        assert_eq!(n, 1, "closed before answering CONNECT: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_are_closed_and_busy_ones_are_not() {
    let origin = Origin::start().await;
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let forward = format!(
        "forward {{\n    enabled #true\n    connect-ports {}\n}}",
        echo.port()
    );
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, &forward), &["-t", "2"]);

    let mut idle = tunnel(cistern.addr, echo).await;
    let mut busy = tunnel(cistern.addr, echo).await;
    // Tunnels count as the connections they came on.
    wait_listening(admin).await;
    let m = metrics(admin).await;
    assert!(
        sample(&m, "cistern_connections_open{listener=\"proxy\"}") >= 2,
        "{m}"
    );
    let idle_check = async {
        let (closed, _) = closed_within(&mut idle, IDLE + SLACK).await;
        closed
    };
    // Bytes every half-timeout for three timeouts, each echoed back.
    let busy_check = async {
        let start = Instant::now();
        let mut round = 0u32;
        while start.elapsed() < IDLE * 3 {
            let msg = format!("ping {round}\n");
            busy.write_all(msg.as_bytes())
                .await
                .expect("busy tunnel open");
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), busy.read_exact(&mut back))
                .await
                .expect("echo in time")
                .unwrap_or_else(|e| panic!("busy tunnel closed after {:?}: {e}", start.elapsed()));
            assert_eq!(back, msg.as_bytes());
            round += 1;
            tokio::time::sleep(IDLE / 2).await;
        }
        round
    };
    let (closed, rounds) = tokio::join!(idle_check, busy_check);
    let after = closed.expect("an idle tunnel was still open after the timeout");
    assert!(after >= IDLE / 2, "idle tunnel closed after only {after:?}");
    assert!(rounds >= 3, "{rounds}");
    // Once quiet, the busy one goes too.
    let (closed, _) = closed_within(&mut busy, IDLE + SLACK).await;
    assert!(closed.is_some(), "a tunnel gone quiet was never closed");
    let m = metrics(admin).await;
    assert!(sample(&m, "cistern_tunnels_idle_closed_total") >= 2, "{m}");
}

/// The soft and hard "Max open files" of process `pid`, from /proc.
fn open_file_limits(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_raised_to_the_hard_limit_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("cistern.log")).unwrap();
    // Started the way a distribution's default (soft 1024) or a careless
    // unit file would start it: with a soft limit far below the hard one.
    let child = common::KillOnDrop(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -Sn 256 && exec \"$0\" -p \"$1\"")
            .arg(env!("CARGO_BIN_EXE_cistern"))
            .arg(port.to_string())
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "cistern never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (soft, hard) = open_file_limits(&child.0.id().to_string());
    let text = std::fs::read_to_string(dir.path().join("cistern.log")).unwrap();
    drop(child);
    assert_eq!(soft, hard, "the soft limit stayed below the hard one");
    assert_ne!(soft, "256");
    assert!(
        text.contains(&format!("open-file limit {hard} (was 256)")),
        "{text}"
    );
}
