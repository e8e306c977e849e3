//! HTTP Replicator's command line: daemon mode with a pid file, -v, the flat
//! layout, offline mode and the bandwidth cap.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cistern, Origin, Resource, free_port, get, pattern};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_detaches_writes_its_pid_and_logs_to_the_file() {
    let origin = Origin::start().await;
    origin.put("/a", Resource::new(pattern(1, 10)));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let status = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args([
            "-p",
            &port.to_string(),
            "-v",
            "--daemon",
            "cistern.log",
            "--pid",
            "cistern.pid",
        ])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "the launching process returns at once");
    let pid_file = dir.path().join("cistern.pid");
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    while std::net::TcpStream::connect(addr).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let got = get(addr, &origin.url("/a")).await;
    assert_eq!(got.status, 200);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(dir.path().join("cistern.log")).unwrap();
    assert!(log.contains("/a") && log.contains("shutting down"), "{log}");
    // -v logs the request and response headers with the access line.
    assert!(
        log.contains("request=") && log.contains("\"cache-status\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_offline_and_limit_flags() {
    let origin = Origin::start().await;
    let body = pattern(2, 128 * 1024);
    origin.put("/deep/path/file.bin", Resource::new(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("flat");
    let port = free_port();
    let port_s = port.to_string();
    let args = [
        "-p",
        port_s.as_str(),
        "--flat",
        "-r",
        "flat",
        "--limit",
        "64",
    ];
    let cistern = Cistern::spawn(dir.path(), port, root.clone(), &args, &[]);
    let started = Instant::now();
    let got = get(cistern.addr, &origin.url("/deep/path/file.bin")).await;
    assert_eq!(got.bytes(), &body);
    // 128 KiB at 64 KiB/s with one second of burst cannot take less than
    // about a second; this checks the cap applies, not how fast anything is.
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "--limit 64 was not applied"
    );
    assert_eq!(common::find_files(&root), vec!["file.bin".to_owned()]);
    drop(cistern);

    let port = free_port();
    let port_s = port.to_string();
    let args = ["-p", port_s.as_str(), "--flat", "-r", "flat", "--offline"];
    let cistern = Cistern::spawn(dir.path(), port, root, &args, &[]);
    assert_eq!(
        get(cistern.addr, &origin.url("/deep/path/file.bin"))
            .await
            .bytes(),
        &body
    );
    assert_eq!(get(cistern.addr, &origin.url("/never")).await.status, 504);
    assert_eq!(origin.hits("/never"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_timeout_and_debug_flags_take_effect() {
    let origin = Origin::start().await;
    origin.put("/a", Resource::new(pattern(3, 10)));
    // 64 KiB, then the origin goes quiet for longer than any test waits;
    // it cannot resume (no ranges), so the fill cannot recover either.
    origin.put(
        "/stalls",
        Resource {
            ranges: false,
            ..Resource::new(pattern(4, 256 * 1024)).slow(Duration::from_secs(60))
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("cistern.log")).unwrap();
    // Not `Cistern::spawn`: it turns debug logging on by itself.
    let _child = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["-b", "127.0.0.3", "-p", &port.to_string()])
            .args(["--timeout", "2", "--debug"])
            .env_remove("CISTERN_LOG")
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "cistern never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // --bind: on the address asked for, and only there.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "--bind 127.0.0.3 also listened on 127.0.0.1"
    );
    assert_eq!(get(addr, &origin.url("/a")).await.bytes(), &pattern(3, 10));

    // --timeout 2: a stalled upstream fails the transfer after about two
    // seconds, not the default fifteen, and never as a complete body.
    let started = Instant::now();
    let stalled = get(addr, &origin.url("/stalls")).await;
    let took = started.elapsed();
    assert!(stalled.body.is_err(), "a cut body passed as complete");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(12),
        "the stalled transfer ended after {took:?}"
    );

    // --debug: engine events (not only access lines) are logged.
    let text = || std::fs::read_to_string(dir.path().join("cistern.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text().contains("fill complete") {
        assert!(
            Instant::now() < deadline,
            "--debug logged no fill events:\n{}",
            text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HTTP Replicator's session, with apt's kind of mirror: no `config.kdl`,
/// and a mirror that sends no `Last-Modified`, `ETag` or `Cache-Control`
/// (deb.debian.org sends none). A package is fetched once and then served
/// from the replica; an index file is asked for every time; and
/// `--no-package-policies` leaves only HTTP's rules, which can reuse
/// neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_caches_packages_from_a_mirror_that_sends_no_validators() {
    let origin = Origin::start().await;
    let deb = pattern(7, 20_000);
    let bare = |body: bytes::Bytes| {
        let mut r = Resource::new(body);
        r.headers.clear();
        r
    };
    origin.put(
        "/debian/pool/main/h/hello_2.10_amd64.deb",
        bare(deb.clone()),
    );
    origin.put(
        "/debian/dists/bookworm/InRelease",
        bare(bytes::Bytes::from_static(b"Suite: bookworm\n")),
    );
    let package = origin.url("/debian/pool/main/h/hello_2.10_amd64.deb");
    let index = origin.url("/debian/dists/bookworm/InRelease");

    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::plain(dir.path(), &[]);
    let first = get(cistern.addr, &package).await;
    assert_eq!(first.bytes(), &deb);
    assert_eq!(first.header("cache-status"), "cistern; fwd=miss; stored");
    let second = get(cistern.addr, &package).await;
    assert_eq!(second.bytes(), &deb);
    assert_eq!(second.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/debian/pool/main/h/hello_2.10_amd64.deb"), 1);
    for _ in 0..2 {
        assert_eq!(get(cistern.addr, &index).await.status, 200);
    }
    assert_eq!(origin.hits("/debian/dists/bookworm/InRelease"), 2);
    drop(cistern);

    // Without the package policies, nothing says the file may be reused.
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::plain(dir.path(), &["--no-package-policies"]);
    get(cistern.addr, &package).await;
    let again = get(cistern.addr, &package).await;
    assert_eq!(again.bytes(), &deb);
    assert_ne!(again.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/debian/pool/main/h/hello_2.10_amd64.deb"), 3);
}
