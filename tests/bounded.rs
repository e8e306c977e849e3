//! Bounded resources at the edge (issue 12): fills in flight capped over
//! all and per client, orphaned fills under quick-abort rules, query
//! strings on mirrors, slow readers timed out (the socket, or an HTTP/2
//! stream left without window), and the admin's authentication. Each test asserts what a client or the origin sees.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cistern, Got, Origin, Resource, free_port, get, pattern, read};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// A config serving `origin` as the mirror `/files/` with the admin
/// listener on `admin`, plus `extra` top-level nodes.
fn config(origin: &Origin, admin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{origin}/"
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

/// Sends a GET for `path` to `proxy` from the loopback address `from`
/// (any 127/8 address is this machine's), returning the response unread.
async fn get_from(from: IpAddr, proxy: SocketAddr, path: &str) -> Response<Incoming> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket.connect(proxy).await.expect("connect to cistern");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", proxy.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.send_request(req).await.expect("send request")
}

/// The value of the sample `series` (name plus labels, as written) on the
/// admin's `/metrics` page; 0 when absent.
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let page = get(admin, "/metrics").await;
    assert_eq!(page.status, StatusCode::OK);
    let text = String::from_utf8(page.bytes().to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Polls `metric` until it reaches `want`, for up to 20 s.
async fn metric_reaches(admin: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = metric(admin, series).await;
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_in_flight_are_capped_over_all_and_per_client_and_followers_need_no_place() {
    const SIZE: usize = 2 * 1024 * 1024;
    let origin = Origin::start().await;
    for i in 0..6u8 {
        origin.put(
            &format!("/big{i}.bin"),
            Resource::new(pattern(i, SIZE)).slow(Duration::from_millis(100)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let limits = "limit {\n    max-fills 3\n    max-fills-per-client 2\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, limits), &[]);
    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let two: IpAddr = "127.0.0.2".parse().unwrap();

    // Two fills from the first client: its share.
    let a = get_from(one, cistern.addr, "/files/big0.bin").await;
    let b = get_from(one, cistern.addr, "/files/big1.bin").await;
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    let over_client = read(get_from(one, cistern.addr, "/files/big2.bin").await).await;
    assert_eq!(over_client.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(over_client.header("retry-after"), "5");
    assert!(
        String::from_utf8_lossy(over_client.bytes()).contains("max-fills-per-client"),
        "{over_client:?}"
    );
    // Another client gets the third place, then the total is reached.
    let c = get_from(two, cistern.addr, "/files/big3.bin").await;
    assert_eq!(c.status(), StatusCode::OK);
    let over_total = read(get_from(two, cistern.addr, "/files/big4.bin").await).await;
    assert_eq!(over_total.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(over_total.bytes()).contains("(max-fills)"),
        "{over_total:?}"
    );
    // Reading along a fill under way costs the upstream nothing: allowed.
    let follower = get_from(two, cistern.addr, "/files/big0.bin").await;
    assert_eq!(follower.status(), StatusCode::OK);
    assert_eq!(
        origin.most_bodies_in_flight(),
        3,
        "the origin is asked for at most max-fills bodies at once"
    );
    assert_eq!(origin.hits("/big2.bin") + origin.hits("/big4.bin"), 0);

    for (i, resp) in [(0u8, a), (1, b), (3, c), (0, follower)] {
        let got: Got = read(resp).await;
        assert_eq!(got.bytes(), &pattern(i, SIZE), "big{i}.bin");
    }
    // The places are given back when the fills end: the refused ones can
    // be fetched now.
    metric_reaches(admin, "cistern_fills_total", 3.0).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(admin, "cistern_fill_permits_in_use").await > 0.0 {
        assert!(Instant::now() < deadline, "the fills kept their places");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = read(get_from(one, cistern.addr, "/files/big2.bin").await).await;
    assert_eq!(again.bytes(), &pattern(2, SIZE));
    assert_eq!(
        metric(
            admin,
            "cistern_fills_refused_total{cap=\"max-fills-per-client\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(admin, "cistern_fills_refused_total{cap=\"max-fills\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_far_from_its_end_is_cut_at_once_and_resumed_by_the_next_client() {
    // 4 MiB at 64 KiB per 40 ms: about 2.5 s of body, so a cut after the
    // first chunks is far from both quick-abort thresholds (1 MiB, 90 %).
    const SIZE: usize = 4 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(21, SIZE);
    origin.put(
        "/far.bin",
        Resource::new(body.clone()).slow(Duration::from_millis(40)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, ""), &[]);

    let resp = get_from("127.0.0.1".parse().unwrap(), cistern.addr, "/files/far.bin").await;
    let mut b = resp.into_body();
    let _ = http_body_util::BodyExt::frame(&mut b).await;
    drop(b);
    let hung_up = Instant::now();
    let deadline = hung_up + Duration::from_secs(5);
    let cut = loop {
        if let Some(at) = origin.cut_at("/far.bin") {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the origin's download was never cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        cut.duration_since(hung_up) < Duration::from_secs(2),
        "cut {:?} after the client left",
        cut.duration_since(hung_up)
    );
    metric_reaches(
        admin,
        "cistern_orphan_fills_stopped_total{reason=\"not-worth-finishing\"}",
        1.0,
    )
    .await;
    assert!(
        common::find_files(&cistern.root).is_empty(),
        "a cut fill is not a replica"
    );

    // The partial was kept: the next client's fill resumes it.
    let again = common::get(cistern.addr, "/files/far.bin").await;
    assert_eq!(again.bytes(), &body);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    let range = seen[1]
        .headers
        .get("range")
        .expect("the second fetch resumes");
    assert_ne!(range, "bytes=0-", "{range:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_near_its_end_is_finished_and_committed() {
    // 768 KiB: under orphan-finish-left's 1 MiB from the first byte, so the
    // fill goes on without its client.
    const SIZE: usize = 768 * 1024;
    let origin = Origin::start().await;
    let body = pattern(22, SIZE);
    origin.put(
        "/near.bin",
        Resource::new(body.clone()).slow(Duration::from_millis(60)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, ""), &[]);

    let resp = get_from(
        "127.0.0.1".parse().unwrap(),
        cistern.addr,
        "/files/near.bin",
    )
    .await;
    let mut b = resp.into_body();
    let _ = http_body_util::BodyExt::frame(&mut b).await;
    drop(b);
    let file = cistern.root.join(origin.addr.to_string()).join("near.bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !file.exists() {
        assert!(Instant::now() < deadline, "the orphan was not finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(&file).unwrap(), body);
    assert_eq!(origin.cut_at("/near.bin"), None, "the origin sent it all");
    let hit = common::get(cistern.addr, "/files/near.bin").await;
    assert_eq!(hit.bytes(), &body);
    assert_eq!(origin.hits("/near.bin"), 1);
    assert_eq!(
        metric(
            admin,
            "cistern_orphan_fills_stopped_total{reason=\"not-worth-finishing\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_a_mirror_is_dropped_by_default_kept_in_the_key_or_passed_as_configured() {
    let origin = Origin::start().await;
    for (path, seed) in [
        ("/a.deb", 31u8),
        ("/b.deb?x=1", 32),
        ("/b.deb?x=2", 33),
        ("/c.deb?x=1", 34),
        ("/c.deb", 35),
    ] {
        origin.put(path, Resource::new(pattern(seed, 100_000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let extra = format!(
        "mirror \"k\" {{\n    upstream \"http://{o}/\"\n    query \"key\"\n}}\nmirror \"p\" {{\n    upstream \"http://{o}/\"\n    query \"pass\"\n}}\n",
        o = origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, &extra), &[]);

    // Default ("ignore"): N queries are one file, one fill, and the
    // upstream is asked for the path alone.
    for i in 1..=5 {
        let got = get(cistern.addr, &format!("/files/a.deb?x={i}")).await;
        assert_eq!(got.bytes(), &pattern(31, 100_000), "?x={i}");
    }
    assert_eq!(origin.hits("/a.deb"), 1);
    assert!(
        origin.seen().iter().all(|s| !s.path.starts_with("/a.deb?")),
        "the query is not sent upstream"
    );
    assert_eq!(
        metric(admin, "cistern_mirror_queries_dropped_total").await,
        5.0
    );

    // "key": each query is a resource of its own, cached apart.
    for _ in 0..2 {
        assert_eq!(
            get(cistern.addr, "/k/b.deb?x=1").await.bytes(),
            &pattern(32, 100_000)
        );
        assert_eq!(
            get(cistern.addr, "/k/b.deb?x=2").await.bytes(),
            &pattern(33, 100_000)
        );
    }
    assert_eq!(
        (origin.hits("/b.deb?x=1"), origin.hits("/b.deb?x=2")),
        (1, 1)
    );

    // "pass": with a query, sent as is and never stored; without, cached.
    for _ in 0..2 {
        let got = get(cistern.addr, "/p/c.deb?x=1").await;
        assert_eq!(got.bytes(), &pattern(34, 100_000));
        assert_eq!(
            got.header("cache-status"),
            "cistern; fwd=bypass; detail=query"
        );
        assert_eq!(
            get(cistern.addr, "/p/c.deb").await.bytes(),
            &pattern(35, 100_000)
        );
    }
    assert_eq!((origin.hits("/c.deb?x=1"), origin.hits("/c.deb")), (2, 1));
    assert_eq!(
        metric(admin, "cistern_passes_total{reason=\"query\"}").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_of_a_big_hit_is_closed_after_the_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 16 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(41, SIZE);
    origin.put("/huge.iso", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let timeouts = "timeouts {\n    send \"1s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, timeouts), &[]);
    assert_eq!(
        common::get(cistern.addr, "/files/huge.iso").await.bytes(),
        &body
    );

    // A client with a small receive window asks for the hit and never
    // reads: Cistern's writes stop making progress once the buffers fill.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(cistern.addr).await.unwrap();
    let asked = Instant::now();
    stream
        .write_all(
            format!(
                "GET /files/huge.iso HTTP/1.1\r\nHost: {}\r\n\r\n",
                cistern.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let series = "cistern_connections_stalled_closed_total{listener=\"proxy\",reason=\"socket\"}";
    metric_reaches(admin, series, 1.0).await;
    let closed_after = asked.elapsed();
    assert!(
        closed_after < Duration::from_secs(10),
        "closed {closed_after:?} after the request, with send \"1s\""
    );
    // What the client finds when it reads at last: a cut transfer, then
    // the end of the connection.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    let read = read.expect("the connection is closed, not held");
    assert!(
        read.is_err() || got.len() < SIZE,
        "a stalled client never gets the whole body ({} bytes)",
        got.len()
    );
    // The proxy still serves others.
    assert_eq!(
        common::get(cistern.addr, "/files/huge.iso").await.bytes(),
        &body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_gets_at_most_http2_max_streams_at_once() {
    use hyper_util::rt::TokioExecutor;
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    for i in 0..3u8 {
        origin.put(
            &format!("/s{i}.bin"),
            Resource::new(pattern(50 + i, SIZE)).slow(Duration::from_millis(40)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let limits = "limit {\n    http2-max-streams 2\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, limits), &[]);

    let stream = tokio::net::TcpStream::connect(cistern.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // One request first, so the client has the server's SETTINGS: a stream
    // opened over the cap before them is refused (REFUSED_STREAM), which a
    // client may retry but this test would not tell from a failure.
    origin.put("/warm.bin", Resource::new(pattern(49, 10)));
    let mut warm = sender.clone();
    let req = Request::get(format!("http://{}/files/warm.bin", cistern.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        read(warm.send_request(req).await.unwrap()).await.status,
        StatusCode::OK
    );
    let mut tasks = Vec::new();
    for i in 0..3u8 {
        let mut sender = sender.clone();
        let uri = format!("http://{}/files/s{i}.bin", cistern.addr);
        tasks.push(tokio::spawn(async move {
            let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
            let resp = sender.send_request(req).await.expect("h2 request");
            (i, read(resp).await)
        }));
    }
    for t in tasks {
        let (i, got) = t.await.unwrap();
        assert_eq!(got.bytes(), &pattern(50 + i, SIZE), "s{i}.bin");
    }
    assert_eq!(
        origin.most_bodies_in_flight(),
        2,
        "the third stream waited for one of the first two"
    );
}

/// SHA-256 of `s` in hex, as `printf %s s | sha256sum` prints it.
fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_asks_for_its_token_or_user_when_configured() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let text = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "files" {{
    upstream "http://{}/"
}}
admin {{
    listen "{admin}"
    token-sha256 "{}"
    user "ops" password-sha256="{}"
}}
"#,
        origin.addr,
        sha256_hex("a-long-random-token"),
        sha256_hex("hunter2"),
    );
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let _ = &cistern;

    let refused = common::get(admin, "/metrics").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let challenges: Vec<&str> = refused
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        challenges,
        [
            "Bearer realm=\"cistern admin\"",
            "Basic realm=\"cistern admin\", charset=\"UTF-8\""
        ]
    );
    for wrong in ["Bearer a-long-random-tokeN", "Basic b3BzOmh1bnRlcjM="] {
        let got = common::request(admin, "GET", "/api/status", &[("authorization", wrong)]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let bearer = common::request(
        admin,
        "GET",
        "/metrics",
        &[("authorization", "Bearer a-long-random-token")],
    )
    .await;
    assert_eq!(bearer.status, StatusCode::OK);
    let page = String::from_utf8(bearer.bytes().to_vec()).unwrap();
    assert!(
        page.contains("cistern_admin_auth_refused_total 3"),
        "{page}"
    );
    // ops:hunter2
    let basic = common::request(
        admin,
        "GET",
        "/api/status",
        &[("authorization", "Basic b3BzOmh1bnRlcjI=")],
    )
    .await;
    assert_eq!(basic.status, StatusCode::OK);
    // A health check needs no credentials.
    assert_eq!(common::get(admin, "/healthz").await.status, StatusCode::OK);
}

#[test]
fn an_admin_off_loopback_without_authentication_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    std::fs::write(
        dir.path().join("open.kdl"),
        format!(
            "listen \"127.0.0.1:{port}\"\nstore {{\n    root \"r\"\n}}\nadmin {{\n    listen \"0.0.0.0:{admin_port}\"\n}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["--config", "open.kdl"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("open.kdl:6:12"),
        "file, line and column: {text}"
    );
    assert!(text.contains("which is not a loopback address"), "{text}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing was bound"
    );

    // With a token it starts.
    std::fs::write(
        dir.path().join("open.kdl"),
        format!(
            "listen \"127.0.0.1:{port}\"\nstore {{\n    root \"r\"\n}}\nadmin {{\n    listen \"0.0.0.0:{admin_port}\"\n    token-sha256 \"{}\"\n}}\n",
            sha256_hex("t")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["check", "open.kdl"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_revalidation_nobody_reads_is_not_cut_by_the_quick_abort_rules() {
    // Stale at once (max-age=0) and served stale while revalidated
    // (`stale-while-revalidate` of the mirror): the refresh has no reader
    // from its start, which is no client leaving it.
    const SIZE: usize = 2 * 1024 * 1024;
    let origin = Origin::start().await;
    let v1 = pattern(61, SIZE);
    let v2 = pattern(62, SIZE);
    origin.put(
        "/index.bin",
        Resource::new(v1.clone()).header("cache-control", "max-age=0"),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "files" {{
    upstream "http://{}/"
    stale-while-revalidate "1h"
}}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &text, &[]);
    assert_eq!(
        common::get(cistern.addr, "/files/index.bin").await.bytes(),
        &v1
    );
    origin.put(
        "/index.bin",
        Resource::new(v2.clone())
            .header("cache-control", "max-age=0")
            .header("etag", "\"v2\"")
            .slow(Duration::from_millis(20)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = common::get(cistern.addr, "/files/index.bin").await;
        if got.bytes() == &v2 {
            break;
        }
        assert_eq!(
            got.bytes(),
            &v1,
            "the stale copy, whole, until the refresh lands"
        );
        assert!(
            Instant::now() < deadline,
            "the background refresh never completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(origin.cut_at("/index.bin"), None, "no refresh was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_its_socket_is_closed_after_the_send_timeout() {
    use tokio::io::AsyncWriteExt;
    const SIZE: usize = 16 * 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(71, SIZE);
    origin.put("/huge2.iso", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let timeouts = "timeouts {\n    send \"1s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, timeouts), &[]);
    assert_eq!(
        common::get(cistern.addr, "/files/huge2.iso").await.bytes(),
        &body
    );

    // HTTP/2 with prior knowledge, by hand: the preface, SETTINGS with the
    // largest stream window, the largest connection window, then one GET;
    // after that the client reads nothing, so only the socket, not flow
    // control, stops Cistern's writes.
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    out.extend(frame(0x8, 0, 0, &0x7fff_0000u32.to_be_bytes()));
    let path = b"/files/huge2.iso";
    let authority = cistern.addr.to_string();
    // :method GET, :scheme http (static table), then :path and :authority
    // as literals without indexing, their names from the static table.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend([0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    out.extend(frame(0x1, 0x4 | 0x1, 1, &block));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(cistern.addr).await.unwrap();
    let asked = Instant::now();
    stream.write_all(&out).await.unwrap();

    let series = "cistern_connections_stalled_closed_total{listener=\"proxy\",reason=\"socket\"}";
    metric_reaches(admin, series, 1.0).await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    drop(stream);
}

/// The descriptors `cistern` has open on files whose name ends with `name`:
/// what `ls -l /proc/PID/fd` (or lsof) shows an operator.
fn open_files(cistern: &Cistern, name: &str) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", cistern.child.id())).unwrap();
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().ends_with(name))
        .count()
}

/// Waits up to 5 s for `cistern` to have no file ending with `name` open.
async fn files_close(cistern: &Cistern, name: &str, failure: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_files(cistern, name) > 0 {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/2 connection by the `h2` crate, with a stream window of
/// `window` bytes and a connection window large enough never to be the
/// limit; its driver runs on a task whose end is the connection's.
async fn h2_connect(
    addr: SocketAddr,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::PingPong,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, mut conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(64 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let pings = conn.ping_pong().expect("ping_pong");
    let driver = tokio::spawn(conn);
    (client, pings, driver)
}

/// Sends a GET for `path` on `client`, returning the response head.
async fn h2_get(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let (resp, _) = client.clone().ready().await?.send_request(req, true)?;
    resp.await
}

/// Reads `body` whole, giving its window back as it goes.
async fn h2_read(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        got.extend_from_slice(&chunk);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_left_without_window_ends_its_connection_after_the_send_timeout() {
    const SIZE: usize = 4 * 1024 * 1024;
    let origin = Origin::start().await;
    let big = pattern(81, SIZE);
    origin.put("/stuck.iso", Resource::new(big.clone()));
    origin.put("/small.txt", Resource::new(pattern(82, 4096)));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let timeouts = "timeouts {\n    send \"2s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, timeouts), &[]);
    assert_eq!(get(cistern.addr, "/files/stuck.iso").await.bytes(), &big);
    // The lane lets go of the file right after its last `sendfile`, which
    // the client may see finish a moment before.
    files_close(&cistern, "stuck.iso", "the miss's file is still open").await;

    // A client with 16 KiB stream windows asks for the hit and never gives
    // that stream's window back, while the connection stays busy: small
    // downloads on other streams (their windows given back) and pings.
    let (mut client, mut pings, driver) = h2_connect(cistern.addr, 16 * 1024).await;
    let stuck = h2_get(&mut client, cistern.addr, "/files/stuck.iso")
        .await
        .expect("the stuck stream's head");
    assert_eq!(stuck.status(), StatusCode::OK);
    let asked = Instant::now();
    let addr = cistern.addr;
    let busy = tokio::spawn(async move {
        let mut served = 0u32;
        loop {
            let Ok(resp) = h2_get(&mut client, addr, "/files/small.txt").await else {
                return served;
            };
            let read = h2_read(resp.into_body()).await;
            if read.map(|b| b.len()).ok() != Some(4096)
                || pings.ping(h2::Ping::opaque()).await.is_err()
            {
                return served;
            }
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Meanwhile the stuck stream holds its replica file open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !busy.is_finished(),
        "the other streams are served meanwhile"
    );
    assert_eq!(open_files(&cistern, "stuck.iso"), 1, "held while stuck");

    let stream_series =
        "cistern_connections_stalled_closed_total{listener=\"proxy\",reason=\"stream\"}";
    metric_reaches(admin, stream_series, 1.0).await;
    let closed_after = asked.elapsed();
    assert!(
        closed_after >= Duration::from_secs(2) && closed_after < Duration::from_secs(6),
        "closed {closed_after:?} after the request, with send \"2s\""
    );
    let served = tokio::time::timeout(Duration::from_secs(5), busy)
        .await
        .expect("the other streams end with the connection")
        .unwrap();
    assert!(
        served >= 5,
        "the connection was busy until cut ({served} small downloads)"
    );
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the connection is ended, not held")
        .unwrap()
        .ok();
    // The replica file is let go, and the socket itself never stalled.
    files_close(
        &cistern,
        "stuck.iso",
        "the stuck stream's file is still open",
    )
    .await;
    let socket_series =
        "cistern_connections_stalled_closed_total{listener=\"proxy\",reason=\"socket\"}";
    assert_eq!(metric(admin, socket_series).await, 0.0);
    drop(stuck);
    // Others are still served, over HTTP/2 too.
    let (mut client, _pings, _driver) = h2_connect(cistern.addr, 1 << 20).await;
    let resp = h2_get(&mut client, cistern.addr, "/files/stuck.iso")
        .await
        .unwrap();
    assert_eq!(h2_read(resp.into_body()).await.unwrap(), big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_http2_download_is_not_cut_by_the_send_timeout() {
    const SIZE: usize = 4 * 1024 * 1024;
    /// The pace the client reads at: the download takes about 8 s, four
    /// send timeouts.
    const PER_SECOND: usize = 512 * 1024;
    let origin = Origin::start().await;
    let big = pattern(83, SIZE);
    origin.put("/steady.iso", Resource::new(big.clone()));
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let timeouts = "timeouts {\n    send \"2s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, timeouts), &[]);
    assert_eq!(get(cistern.addr, "/files/steady.iso").await.bytes(), &big);

    let (mut client, _pings, driver) = h2_connect(cistern.addr, 16 * 1024).await;
    let resp = h2_get(&mut client, cistern.addr, "/files/steady.iso")
        .await
        .unwrap();
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(SIZE);
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the steady download is not cut");
        got.extend_from_slice(&chunk);
        // Gives the window back only as fast as the pace allows.
        let due = started + Duration::from_secs_f64(got.len() as f64 / PER_SECOND as f64);
        tokio::time::sleep_until(due.into()).await;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let took = started.elapsed();
    assert_eq!(got.len(), SIZE);
    assert!(got == big, "the body arrives intact");
    assert!(took > Duration::from_secs(6), "it was slow: {took:?}");
    assert!(!driver.is_finished(), "the connection is still open");
    for reason in ["socket", "stream"] {
        let series = format!(
            "cistern_connections_stalled_closed_total{{listener=\"proxy\",reason=\"{reason}\"}}"
        );
        assert_eq!(metric(admin, &series).await, 0.0, "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_left_without_window_on_a_miss_lets_go_of_its_download() {
    // 16 MiB at 64 KiB per 40 ms: about 10 s of body, so a reader that
    // leaves after the 2 s send timeout leaves the fill far from both
    // quick-abort thresholds, and the origin's download is cut.
    const SIZE: usize = 16 * 1024 * 1024;
    let origin = Origin::start().await;
    origin.put(
        "/slow.iso",
        Resource::new(pattern(84, SIZE)).slow(Duration::from_millis(40)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let timeouts = "timeouts {\n    send \"2s\"\n}\n";
    let cistern = Cistern::start(dir.path(), &config(&origin, admin, timeouts), &[]);

    // The only reader of the fill takes its first 16 KiB and never gives
    // the window back; the connection itself answers pings.
    let (mut client, mut pings, driver) = h2_connect(cistern.addr, 16 * 1024).await;
    let asked = Instant::now();
    let stuck = h2_get(&mut client, cistern.addr, "/files/slow.iso")
        .await
        .expect("the stuck stream's head");
    assert_eq!(stuck.status(), StatusCode::OK);
    let pinging = tokio::spawn(async move {
        while pings.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let deadline = asked + Duration::from_secs(7);
    let cut = loop {
        if let Some(at) = origin.cut_at("/slow.iso") {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the fill kept its reader: the origin's download was never cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = cut.duration_since(asked);
    assert!(
        after >= Duration::from_secs(2),
        "cut {after:?} after the request, before the send timeout"
    );
    let stream_series =
        "cistern_connections_stalled_closed_total{listener=\"proxy\",reason=\"stream\"}";
    assert_eq!(metric(admin, stream_series).await, 1.0);
    metric_reaches(
        admin,
        "cistern_orphan_fills_stopped_total{reason=\"not-worth-finishing\"}",
        1.0,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the connection is ended, not held")
        .unwrap()
        .ok();
    let _ = tokio::time::timeout(Duration::from_secs(5), pinging).await;
    drop(stuck);
}
