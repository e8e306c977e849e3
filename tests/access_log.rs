//! The access log when nobody reads it: a log collector that stops
//! reading Cistern's standard error (a full pipe) must not stall the
//! proxy, and the lines logged meanwhile come out once it reads again.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Origin, Resource, files_mirror, free_port, get, pattern};

/// Requests made while the pipe is full: a pipe holds 64 KiB, about 500
/// access lines, so these overflow it several times.
const REQUESTS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_stalls_no_request_and_loses_no_line() {
    let origin = Origin::start().await;
    origin.put("/pub/small.txt", Resource::new(pattern(7, 300)));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let root = dir.path().join("replica");
    let config = files_mirror(&origin)
        .replace("{PORT}", &port.to_string())
        .replace("{ROOT}", &root.display().to_string());
    std::fs::write(dir.path().join("config.kdl"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["--config", "config.kdl"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Piped and not read until every request is answered.
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cistern");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "cistern did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Every request is answered although the log's pipe filled long ago.
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..REQUESTS {
            let got = get(addr, "/files/pub/small.txt").await;
            assert_eq!(got.status, 200, "request {i}");
            assert_eq!(got.body, Ok(pattern(7, 300)));
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "requests stalled behind an access log nobody read"
    );

    // Read again: every request's line is there, none dropped (the
    // backlog is far below the writer's bound). The reader stops at the
    // last line, or at the end of the pipe once the process is killed.
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 64 * 1024];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
            }
            let lines = String::from_utf8_lossy(&text)
                .matches("GET /files/pub/small.txt ")
                .count();
            if lines >= REQUESTS {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    let log = tokio::task::spawn_blocking(move || {
        let log = rx.recv_timeout(Duration::from_secs(60));
        let _ = child.kill();
        let _ = child.wait();
        log.unwrap_or_else(|_| rx.recv().unwrap_or_default())
    })
    .await
    .unwrap();
    let lines = log.matches("GET /files/pub/small.txt ").count();
    assert_eq!(
        lines, REQUESTS,
        "access lines written once the pipe drained"
    );
    assert!(!log.contains("lines dropped"), "no line was dropped");
}
