//! The admin listener as an operator uses it: `/healthz`, `/metrics` after a
//! few hits, misses and coalesced downloads, and the JSON API the UI is built
//! from, against the real binary; the `admin` config node; and start-up with
//! the admin port taken.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cistern, Got, Origin, Resource, free_port, get, pattern, request, send};
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A mirror `/files/` of the origin's `/pub/`, a second mirror `/t/` whose
/// policy traps on every call, and the admin listener on `admin`.
fn config(origin: &Origin, admin: SocketAddr) -> String {
    let trap = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/guests/trap.wat");
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
mirror "trapped" {{
    prefix "/t/"
    upstream "http://{origin}/pub/"
    policies "trap"
}}
policy "trap" path="{trap}"
admin {{
    listen "{admin}"
}}
"#,
        origin = origin.addr,
    )
}

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn api(admin: SocketAddr, path: &str) -> Value {
    let got = get(admin, path).await;
    assert_eq!(got.status, StatusCode::OK, "{path}: {:?}", got.body);
    assert_eq!(got.header("content-type"), "application/json", "{path}");
    serde_json::from_slice(got.bytes()).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// The value of the sample `series` (name plus labels, as written) in a
/// Prometheus text page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{page}"))
        .parse()
        .unwrap()
}

/// Polls `/api/downloads` until a fill of `name` is streaming with at least
/// one byte written, and returns its entry.
async fn wait_streaming(admin: SocketAddr, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = api(admin, "/api/downloads").await;
        if let Some(d) = list.as_array().unwrap().iter().find(|d| {
            d["path"].as_str().is_some_and(|p| p.ends_with(name))
                && d["state"] == "streaming"
                && d["written"].as_u64() > Some(0)
        }) {
            return d.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no streaming download of {name}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn read_all(resp: http::Response<hyper::body::Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_hits_misses_coalesced_requests_and_bytes() {
    let origin = Origin::start().await;
    let small = pattern(1, 100_000);
    let slow = pattern(2, 2 << 20);
    origin.put("/pub/a.bin", Resource::new(small.clone()));
    // 32 chunks of 64 KiB, 100 ms apart: the fill lasts about three seconds,
    // long enough for two more clients to join it.
    origin.put(
        "/pub/slow.bin",
        Resource::new(slow.clone()).slow(Duration::from_millis(100)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);

    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.bytes().as_ref(), b"ok\n");

    // One miss, then two hits.
    for want in ["fwd=miss", "hit", "hit"] {
        let got = get(cistern.addr, "/files/a.bin").await;
        assert_eq!(got.bytes(), &small);
        assert!(
            got.header("cache-status").contains(want),
            "{}",
            got.header("cache-status")
        );
    }

    // One client starts the slow fill; two join it while it streams.
    let leader = send(cistern.addr, "GET", "/files/slow.bin", &[]).await;
    wait_streaming(admin, "slow.bin").await;
    let f1 = send(cistern.addr, "GET", "/files/slow.bin", &[]).await;
    let f2 = send(cistern.addr, "GET", "/files/slow.bin", &[]).await;
    for resp in [&f1, &f2] {
        let status = resp.headers()["cache-status"].to_str().unwrap();
        assert!(status.contains("collapsed"), "{status}");
    }
    for resp in [leader, f1, f2] {
        assert_eq!(read_all(resp).await, slow);
    }
    assert_eq!(origin.hits("/pub/slow.bin"), 1);

    // A request the origin does not know: passed on, a 404 from upstream.
    let missing = get(cistern.addr, "/files/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let missing_len = missing.bytes().len() as f64;

    let page = get(admin, "/metrics").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.header("content-type")
            .starts_with("text/plain; version=0.0.4")
    );
    let m = std::str::from_utf8(page.bytes()).unwrap().to_owned();
    assert_eq!(
        sample(&m, r#"cistern_requests_total{cache="hit"}"#),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"cistern_requests_total{cache="miss"}"#),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"cistern_requests_total{cache="coalesced"}"#),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"cistern_requests_total{cache="pass"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "cistern_coalesced_followers_total"), 2.0);
    // a.bin, slow.bin and the 404 (which was asked for as a fill, found
    // unstorable and handed to its client).
    assert_eq!(sample(&m, "cistern_fills_total"), 3.0);
    assert_eq!(sample(&m, "cistern_fills_failed_total"), 0.0);
    assert_eq!(sample(&m, "cistern_upstream_requests_total"), 3.0);
    assert_eq!(sample(&m, "cistern_upstream_failures_total"), 0.0);
    let (small_len, slow_len) = (small.len() as f64, slow.len() as f64);
    assert_eq!(
        sample(&m, "cistern_client_bytes_total"),
        3.0 * small_len + 3.0 * slow_len + missing_len
    );
    assert_eq!(
        sample(&m, "cistern_upstream_bytes_total"),
        small_len + slow_len
    );
    assert_eq!(sample(&m, "cistern_replica_files"), 2.0);
    assert_eq!(sample(&m, "cistern_replica_bytes"), small_len + slow_len);
    assert_eq!(sample(&m, "cistern_fills_in_progress"), 0.0);
    assert_eq!(sample(&m, "cistern_limited_requests_total"), 0.0);
    assert_eq!(sample(&m, "cistern_config_generation"), 1.0);
    assert_eq!(
        sample(&m, r#"cistern_config_reloads_total{result="error"}"#),
        0.0
    );
    let up = format!(
        r#"cistern_mirror_upstream_up{{mirror="files",upstream="http://{}/pub/"}}"#,
        origin.addr
    );
    assert_eq!(sample(&m, &up), 1.0);

    // The trapping policy: a miss calls on_request and on_response, a hit
    // on_request only; every call traps and the requests still succeed.
    origin.put("/pub/c.bin", Resource::new(pattern(3, 1000)));
    for _ in 0..2 {
        let got = get(cistern.addr, "/t/c.bin").await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let m = String::from_utf8(get(admin, "/metrics").await.bytes().to_vec()).unwrap();
    assert_eq!(
        sample(&m, r#"cistern_policy_calls_total{policy="trap"}"#),
        3.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"cistern_policy_failures_total{policy="trap",kind="trap"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            r#"cistern_policy_failures_total{policy="trap",kind="timeout"}"#
        ),
        0.0
    );
    assert!(sample(&m, r#"cistern_policy_call_seconds_total{policy="trap"}"#) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_shows_the_replica_downloads_mirrors_and_status() {
    let origin = Origin::start().await;
    let a = pattern(3, 5000);
    let b = pattern(4, 7000);
    origin.put("/pub/dists/a.txt", Resource::new(a.clone()));
    origin.put("/pub/dists/b.txt", Resource::new(b.clone()));
    origin.put("/pub/top.txt", Resource::new(Bytes::from_static(b"top\n")));
    origin.put(
        "/pub/pool/big.iso",
        Resource::new(pattern(5, 4 << 20)).slow(Duration::from_millis(100)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);
    for path in [
        "/files/dists/a.txt",
        "/files/dists/b.txt",
        "/files/dists/a.txt",
        "/files/top.txt",
    ] {
        assert_eq!(get(cistern.addr, path).await.status, StatusCode::OK);
    }
    let host = origin.addr.to_string();

    // The root lists the upstream's host:port directory with its totals.
    let root = api(admin, "/api/replica").await;
    assert_eq!(root["path"], "");
    assert_eq!(root["parent"], Value::Null);
    assert_eq!(root["dirs"][0]["name"], host.as_str());
    assert_eq!(root["dirs"][0]["files"], 3);
    assert_eq!(root["dirs"][0]["bytes"], (a.len() + b.len() + 4) as u64);

    // A directory: subdirectories first, then files.
    let pubdir = api(admin, &format!("/api/replica?path={host}/pub")).await;
    assert_eq!(pubdir["parent"], host.as_str());
    assert_eq!(pubdir["dirs"][0]["name"], "dists");
    assert_eq!(pubdir["dirs"][0]["files"], 2);
    assert_eq!(pubdir["files"][0]["name"], "top.txt");

    // Files carry size, hits, digest and where they came from.
    let dists = api(admin, &format!("/api/replica?path={host}/pub/dists/")).await;
    let files = dists["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["name"], "a.txt");
    assert_eq!(files[0]["state"], "complete");
    assert_eq!(files[0]["size"], a.len() as u64);
    assert_eq!(files[0]["hits"], 1);
    assert_eq!(files[0]["sha256"], hex::encode(Sha256::digest(&a)));
    assert_eq!(files[0]["url"], format!("http://{host}/pub/dists/a.txt"));
    assert_eq!(files[0]["path"], format!("{host}/pub/dists/a.txt"));
    assert_eq!(files[1]["hits"], 0);
    assert_eq!(dists["total_entries"], 2);
    assert_eq!(dists["next_offset"], Value::Null);

    // Pages: one entry at a time.
    let first = api(
        admin,
        &format!("/api/replica?path={host}/pub/dists&limit=1"),
    )
    .await;
    assert_eq!(first["files"].as_array().unwrap().len(), 1);
    assert_eq!(first["next_offset"], 1);
    let second = api(
        admin,
        &format!("/api/replica?path={host}/pub/dists&limit=1&offset=1"),
    )
    .await;
    assert_eq!(second["files"][0]["name"], "b.txt");
    assert_eq!(second["next_offset"], Value::Null);
    let bad = get(admin, "/api/replica?limit=lots").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // A download in progress: in /api/downloads with its progress, and in
    // the tree as a partial file.
    let client = send(cistern.addr, "GET", "/files/pool/big.iso", &[]).await;
    let d = wait_streaming(admin, "big.iso").await;
    assert_eq!(d["path"], format!("{host}/pub/pool/big.iso"));
    assert_eq!(d["length"], 4u64 << 20);
    assert_eq!(d["readers"], 1);
    assert_eq!(d["url"], format!("http://{host}/pub/pool/big.iso"));
    assert!(d["percent"].as_f64().unwrap() < 100.0, "{d}");
    let pool = api(admin, &format!("/api/replica?path={host}/pub/pool")).await;
    assert_eq!(pool["files"][0]["name"], "big.iso");
    assert_eq!(pool["files"][0]["state"], "partial");
    assert_eq!(pool["files"][0]["length"], 4u64 << 20);
    let pubdir = api(admin, &format!("/api/replica?path={host}/pub")).await;
    let pool_dir = pubdir["dirs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "pool")
        .unwrap()
        .clone();
    assert_eq!(pool_dir["partial"], 1);
    assert_eq!(pool_dir["files"], 0);
    let status = api(admin, "/api/status").await;
    assert_eq!(status["downloads_in_progress"], 1);
    drop(client);

    let mirrors = api(admin, "/api/mirrors").await;
    assert_eq!(mirrors[0]["name"], "files");
    assert_eq!(mirrors[0]["prefix"], "/files/");
    assert_eq!(
        mirrors[0]["upstreams"][0]["base"],
        format!("http://{host}/pub/")
    );
    assert_eq!(mirrors[0]["upstreams"][0]["state"], "up");
    assert_eq!(mirrors[0]["upstreams"][0]["fetches"], 4);
    assert_eq!(mirrors[1]["name"], "trapped");

    let policies = api(admin, "/api/policies").await;
    assert_eq!(policies[0]["name"], "trap");
    assert_eq!(policies[0]["calls"], 0);

    assert_eq!(status["config_generation"], 1);
    assert_eq!(status["last_reload_error"], Value::Null);
    assert_eq!(status["replica_files"], 3);
    assert_eq!(status["mode"], "normal");
    assert!(
        status["config_source"]
            .as_str()
            .unwrap()
            .ends_with("config.kdl")
    );
    assert_eq!(
        status["counters"]["requests"][0],
        serde_json::json!(["hit", 1])
    );
}

#[tokio::test]
async fn the_admin_interface_is_read_only_and_says_where_to_go() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let _cistern = Cistern::start(dir.path(), &config(&origin, admin), &[]);
    let post = request(admin, "POST", "/api/status", &[]).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), "GET, HEAD");
    let nothing = get(admin, "/nothing-here").await;
    assert_eq!(nothing.status, StatusCode::NOT_FOUND);
    let head: Got = request(admin, "HEAD", "/metrics", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.bytes().is_empty());
    // Pages only run the admin's own script.
    let page = get(admin, "/").await;
    assert_eq!(
        page.header("content-security-policy"),
        "default-src 'self'; frame-ancestors 'none'"
    );
    assert!(page.header("content-type").starts_with("text/html"));
}

#[test]
fn the_admin_node_is_validated_with_its_position() {
    use cistern::config::{AdminConfig, Config};
    let name = std::path::Path::new("/etc/cistern/config.kdl");
    let parse = |text: &str| Config::parse(text, name);

    // A config file gets the loopback admin unless it says otherwise.
    let c = parse("listen \"127.0.0.1:8080\"\n").unwrap();
    assert_eq!(
        c.admin,
        AdminConfig {
            listen: Some("127.0.0.1:9090".parse().unwrap()),
            required: false,
            hosts: Vec::new(),
            auth: Default::default(),
        }
    );
    let c = parse("admin {\n    listen \"[::1]:9999\"\n}\n").unwrap();
    assert_eq!(c.admin.listen, Some("[::1]:9999".parse().unwrap()));
    assert!(c.admin.required);
    let c = parse("admin {\n    enabled #false\n}\n").unwrap();
    assert_eq!(c.admin.listen, None);
    let c = parse("admin {\n}\n").unwrap();
    assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert!(c.admin.required);

    // Without a file: a throwaway forward proxy, no admin port.
    assert_eq!(Config::forward_default(name).admin.listen, None);

    let problems = parse("admin {\n    listen \"localhost\"\n    colour \"blue\"\n}\n")
        .unwrap_err()
        .problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!((problems[0].0, problems[0].1), (2, 12), "{problems:?}");
    assert!(
        problems[0].2.contains("not an IP address and port"),
        "{problems:?}"
    );
    assert_eq!((problems[1].0, problems[1].1), (3, 5), "{problems:?}");
    assert!(
        problems[1].2.contains("unknown node `colour`"),
        "{problems:?}"
    );

    // The admin port may not be a proxy listener, whichever comes first.
    let problems = parse("admin {\n    listen \"127.0.0.1:8080\"\n}\nlisten \"127.0.0.1:8080\"\n")
        .unwrap_err()
        .problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, 2);
    assert!(
        problems[0].2.contains("already a proxy listener"),
        "{problems:?}"
    );

    let problems = parse("admin {\n    enabled \"yes\"\n}\nadmin {\n}\n")
        .unwrap_err()
        .problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[1].2.contains("given twice"), "{problems:?}");
}

fn in_process_config(dir: &std::path::Path, admin: &str) -> cistern::config::Config {
    let text = format!(
        "listen \"127.0.0.1:0\"\nstore {{\n    root \"{}\"\n}}\n{admin}",
        dir.join("replica").display()
    );
    cistern::config::Config::parse(&text, &dir.join("config.kdl")).unwrap()
}

#[tokio::test]
async fn start_reports_the_admin_address_and_a_taken_port() {
    use cistern::app::{StartError, StartOptions, start};
    use cistern::server::BindError;
    let dir = tempfile::tempdir().unwrap();

    // Port 0 picks a free port; Running says which.
    let running = start(
        in_process_config(dir.path(), "admin {\n    listen \"127.0.0.1:0\"\n}\n"),
        StartOptions::default(),
    )
    .await
    .unwrap();
    let admin = running.admin_addr.expect("admin listener started");
    assert_ne!(admin.port(), 0);
    assert_eq!(get(admin, "/healthz").await.status, StatusCode::OK);
    running.shutdown().await;

    // An address the file asks for must be had.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = in_process_config(
        dir.path(),
        &format!("admin {{\n    listen \"{addr}\"\n}}\n"),
    );
    match start(config, StartOptions::default()).await {
        Err(StartError::Bind(BindError::Bind { addr: a, .. })) => assert_eq!(a, addr),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("started with the admin port taken"),
    }

    // The implicit default (127.0.0.1:9090) being taken only costs the UI.
    let _hold = std::net::TcpListener::bind("127.0.0.1:9090");
    let running = start(in_process_config(dir.path(), ""), StartOptions::default())
        .await
        .expect("the proxy starts without its default admin port");
    assert_eq!(running.admin_addr, None);
    running.shutdown().await;
}

#[tokio::test]
async fn a_refused_reload_shows_in_the_page_the_api_and_the_metrics() {
    use cistern::app::{StartOptions, start};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.kdl");
    let text = |extra: &str| {
        format!(
            "listen \"127.0.0.1:0\"\nstore {{\n    root \"{}\"\n}}\nadmin {{\n    listen \"127.0.0.1:0\"\n}}\n{extra}",
            dir.path().join("replica").display()
        )
    };
    std::fs::write(&file, text("")).unwrap();
    let config = cistern::config::Config::load(&file).unwrap();
    let running = start(config, StartOptions::default()).await.unwrap();
    let admin = running.admin_addr.unwrap();

    // One reload taken, then one refused: a typo in the file.
    std::fs::write(&file, text("mode \"static\"\n")).unwrap();
    assert_eq!(running.reload().await.unwrap(), 2);
    std::fs::write(&file, text("mirorr \"typo\" {\n}\n")).unwrap();
    assert!(running.reload().await.is_err());

    let status = api(admin, "/api/status").await;
    assert_eq!(status["config_generation"], 2);
    let error = status["last_reload_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("config.kdl:8:1") && error.contains("mirorr"),
        "{error}"
    );
    assert_eq!(status["reload_failures"], 1);

    let m = String::from_utf8(get(admin, "/metrics").await.bytes().to_vec()).unwrap();
    assert_eq!(sample(&m, "cistern_config_generation"), 2.0);
    assert_eq!(
        sample(&m, r#"cistern_config_reloads_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        sample(&m, r#"cistern_config_reloads_total{result="error"}"#),
        1.0
    );
    assert_eq!(sample(&m, "cistern_config_last_reload_ok"), 0.0);

    // The page shows the error and the generation still serving.
    let page = String::from_utf8(get(admin, "/").await.bytes().to_vec()).unwrap();
    assert!(page.contains("mirorr"), "{page}");
    assert!(page.contains("id=\"reload-error\""), "{page}");
    assert!(
        page.contains("<dd id=\"config-generation\">2</dd>"),
        "{page}"
    );

    // Fixing the file clears it.
    std::fs::write(&file, text("")).unwrap();
    assert_eq!(running.reload().await.unwrap(), 3);
    let status = api(admin, "/api/status").await;
    assert_eq!(status["config_generation"], 3);
    assert_eq!(status["last_reload_error"], Value::Null);
    assert_eq!(status["reload_failures"], 1);
    running.shutdown().await;
}
