//! Hot reload: edits to config.kdl go live without a restart, broken ones
//! are reported with file, line and column while the old config keeps
//! serving, listeners come and go, SIGHUP reloads, and none of it fails a
//! request, even under load.

mod common;
mod tls_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cistern::app::{self, StartOptions};
use cistern::config::Config;
use cistern::reload::Triggers;
use common::{Cistern, Origin, Resource, free_port, get, pattern};
use tls_common::{Ca, connect, eventually, replace_file};

const WAIT: Duration = Duration::from_secs(20);

/// A config with mirrors `names` of `origin` on `listens` (ports, or
/// `{PORT}` for the fixture's own).
fn mirrors(origin: &Origin, names: &[&str], listens: &[&str]) -> String {
    let mut text = String::new();
    for port in listens {
        text.push_str(&format!("listen \"127.0.0.1:{port}\"\n"));
    }
    text.push_str("store {\n    root \"{ROOT}\"\n}\n");
    for name in names {
        text.push_str(&format!(
            "mirror \"{name}\" {{\n    upstream \"http://{}/{name}/\"\n}}\n",
            origin.addr
        ));
    }
    text
}

fn write_config(dir: &Path, text: &str) {
    let root = dir.join("replica");
    replace_file(
        &dir.join("config.kdl"),
        text.replace("{ROOT}", &root.display().to_string())
            .as_bytes(),
    );
}

async fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    // Not listening (yet) is "no answer", not a panic in the fixture.
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(get(addr, path).await.status.as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_mirror_goes_live_and_a_broken_edit_keeps_the_old_config() {
    let origin = Origin::start().await;
    for name in ["a", "b", "c"] {
        origin.put(&format!("/{name}/f"), Resource::new(pattern(7, 1000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirrors(&origin, &["a"], &["{PORT}"]), &[]);
    let port = cistern.addr.port().to_string();
    assert_eq!(get(cistern.addr, "/b/f").await.status, 404);

    write_config(dir.path(), &mirrors(&origin, &["a", "b"], &[&port]));
    eventually("mirror b is live", WAIT, || async move {
        (status_of(cistern.addr, "/b/f").await == Some(200)).then_some(())
    })
    .await;

    // Line 4, column 5: a typo in a node name.
    let broken = format!(
        "listen \"127.0.0.1:{port}\"\nstore {{\n    root \"{{ROOT}}\"\n    max-siz \"1GiB\"\n}}\n"
    );
    write_config(dir.path(), &broken);
    eventually("the refused reload in the log", WAIT, || {
        let log = cistern.log();
        async move {
            log.contains("config.kdl:4:5: unknown node `max-siz`")
                .then_some(())
        }
    })
    .await;
    assert!(
        cistern.log().contains("still serving generation 2"),
        "{}",
        cistern.log()
    );
    assert_eq!(
        get(cistern.addr, "/b/f").await.status,
        200,
        "the old config keeps serving"
    );

    // Fixing the file makes the next reload succeed.
    write_config(dir.path(), &mirrors(&origin, &["c"], &[&port]));
    eventually("mirror c is live", WAIT, || async move {
        (status_of(cistern.addr, "/c/f").await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(
        get(cistern.addr, "/b/f").await.status,
        404,
        "mirror b was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirrors(&origin, &["a"], &["{PORT}"]), &[]);
    let pid = cistern.child.id().to_string();
    let sent = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(sent.success());
    eventually("the SIGHUP reload in the log", WAIT, || {
        let log = cistern.log();
        async move { log.contains("(SIGHUP): generation 2 is live").then_some(()) }
    })
    .await;
    assert_eq!(
        get(cistern.addr, "/").await.status,
        200,
        "still serving after SIGHUP"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_and_a_removed_one_drains() {
    let origin = Origin::start().await;
    // Slow enough to be in flight while its listener is removed.
    origin.put(
        "/a/slow",
        Resource::new(pattern(9, 1 << 20)).slow(Duration::from_millis(30)),
    );
    origin.put("/a/f", Resource::new(pattern(8, 100)));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirrors(&origin, &["a"], &["{PORT}"]), &[]);
    let first = cistern.addr.port().to_string();
    let second = free_port().to_string();
    let second_addr: SocketAddr = format!("127.0.0.1:{second}").parse().unwrap();

    write_config(dir.path(), &mirrors(&origin, &["a"], &[&first, &second]));
    eventually("the second listener", WAIT, || async move {
        (status_of(second_addr, "/a/f").await == Some(200)).then_some(())
    })
    .await;

    let slow = tokio::spawn(common::request(cistern.addr, "GET", "/a/slow", &[]));
    eventually("the slow download started", WAIT, || {
        let started = origin.first_byte_at("/a/slow").is_some();
        async move { started.then_some(()) }
    })
    .await;
    write_config(dir.path(), &mirrors(&origin, &["a"], &[&second]));
    eventually("the first listener closed", WAIT, || {
        let addr = cistern.addr;
        async move {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        get(second_addr, "/a/f").await.status,
        200,
        "the kept listener is untouched"
    );
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.bytes(),
        &pattern(9, 1 << 20),
        "the request in flight finished on its draining listener"
    );
}

/// The config of step `i` of the load test: mirror `base` always, `gI`
/// for the step, and a TLS site.
fn step_config(dir: &Path, origin: &Origin, step: usize, tls_port: u16) -> String {
    format!(
        r#"listen "127.0.0.1:0"
store {{
    root "{root}"
}}
mirror "base" {{
    upstream "http://{o}/base/"
}}
mirror "g{step}" {{
    upstream "http://{o}/g/"
}}
site "one.test" {{
    listen "127.0.0.1:{tls_port}"
    tls cert="one.pem" key="one.key"
    upstream "http://{o}/base/"
}}
"#,
        root = dir.join("replica").display(),
        o = origin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_reloads_under_load_fail_no_request() {
    let origin = Origin::start().await;
    const FILES: usize = 40;
    for i in 0..FILES {
        // Two chunks with a pause: fills are often in flight during a swap.
        origin.put(
            &format!("/base/f{i}"),
            Resource::new(pattern(i as u8, 100_000)).slow(Duration::from_millis(5)),
        );
    }
    origin.put("/g/x", Resource::new(pattern(200, 500)));
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    let tls_port = free_port();
    let path = dir.path().join("config.kdl");
    replace_file(
        &path,
        step_config(dir.path(), &origin, 0, tls_port).as_bytes(),
    );
    let config = Config::load(&path).unwrap();
    let options = StartOptions {
        reload: Triggers {
            files: true,
            sighup: false,
        },
        ..StartOptions::default()
    };
    let running = app::start(config, options).await.expect("start");
    let addr = running.addrs[0];
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..3 {
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut n = c;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let i = n % FILES;
                let got = common::request(addr, "GET", &format!("/base/f{i}"), &[]).await;
                if got.status != 200 || got.body.as_ref().ok() != Some(&pattern(i as u8, 100_000)) {
                    failures.push(format!(
                        "/base/f{i}: {} {:?}",
                        got.status,
                        got.body.as_ref().err()
                    ));
                } else {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                n += 3;
            }
            failures
        }));
    }
    // One TLS connection kept open across every reload.
    {
        let (stop, ok) = (stop.clone(), ok.clone());
        let client = ca.client(&[b"h2"]);
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut conn = connect(tls_addr, "one.test", client)
                .await
                .expect("tls connect");
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let i = n % FILES;
                match conn.get(&format!("/f{i}")).await {
                    Ok(a)
                        if a.status == 200
                            && a.body.as_ref().ok() == Some(&pattern(i as u8, 100_000)) =>
                    {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => failures.push(format!("tls /f{i}: {}", a.status)),
                    Err(e) => failures.push(format!("tls /f{i}: {e}")),
                }
                n += 1;
            }
            failures
        }));
    }

    for step in 1..=20 {
        let before = running.reload_status();
        if step % 2 == 1 {
            replace_file(
                &path,
                step_config(dir.path(), &origin, step, tls_port).as_bytes(),
            );
            let status = eventually("a valid reload", WAIT, || {
                let s = running.reload_status();
                async move { (s.generation > before.generation).then_some(s) }
            })
            .await;
            assert!(status.last_error.is_none());
            // The next request sees the change.
            let got = get(addr, &format!("/g{step}/x")).await;
            assert_eq!(got.status, 200, "step {step}: the new mirror serves");
            if step > 2 {
                let old = get(addr, &format!("/g{}/x", step - 2)).await;
                assert_eq!(old.status, 404, "step {step}: the previous mirror is gone");
            }
        } else {
            // Line 3, column 5: a typo in `store`.
            let bad = step_config(dir.path(), &origin, step, tls_port)
                .replace("    root \"", "    roo \"");
            replace_file(&path, bad.as_bytes());
            let status = eventually("a refused reload", WAIT, || {
                let s = running.reload_status();
                async move { (s.attempts > before.attempts && s.last_error.is_some()).then_some(s) }
            })
            .await;
            assert_eq!(
                status.generation, before.generation,
                "step {step}: nothing went live"
            );
            let failure = status.last_error.unwrap();
            let p = &failure.problems[0];
            assert_eq!(
                (p.file.as_path(), p.line, p.column),
                (path.as_path(), 3, 5),
                "{failure}"
            );
            assert!(p.message.contains("roo"), "{failure}");
            let got = get(addr, &format!("/g{}/x", step - 1)).await;
            assert_eq!(
                got.status, 200,
                "step {step}: the previous config keeps serving"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "the clients kept requesting"
    );
    assert_eq!(running.reload_status().generation, 11);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_a_config_nested_thousands_deep_keeps_the_proxy_serving() {
    let origin = Origin::start().await;
    origin.put("/a/f", Resource::new(pattern(7, 1000)));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &mirrors(&origin, &["a"], &["{PORT}"]), &[]);
    assert_eq!(get(cistern.addr, "/a/f").await.status, 200);

    // The reload parses on a blocking thread, whose stack is smaller than
    // the main thread's: 3 000 levels are far past what it holds.
    let port = cistern.addr.port();
    let deep = format!(
        "listen \"127.0.0.1:{port}\"\nstore {{\n    root \"{{ROOT}}\"\n}}\na {}{}\n",
        "{ a ".repeat(3000),
        "}".repeat(3000)
    );
    write_config(dir.path(), &deep);
    eventually("the refused reload in the log", WAIT, || {
        let log = cistern.log();
        async move { log.contains("still serving generation 1").then_some(()) }
    })
    .await;
    assert_eq!(
        get(cistern.addr, "/a/f").await.status,
        200,
        "the old config keeps serving"
    );
}
