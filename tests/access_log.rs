//! The log when nobody reads it: a log collector that stops reading
//! Cistern's standard error (a full pipe) must not stall the proxy, the
//! lines logged meanwhile come out once it reads again, and the process
//! still stops when asked.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Origin, Resource, files_mirror, free_port, get, pattern};

/// Requests made while the pipe is full: a pipe holds 64 KiB, about 500
/// access lines, so these overflow it several times.
const REQUESTS: usize = 3_000;
/// One request in this many asks for a file the origin lacks: besides
/// its access line, the fetch logs why the 404 is not stored, a
/// `tracing` line written from a request thread.
const MISS_EVERY: usize = 4;

/// The process under test, killed when the test ends, failed or not, so
/// a failing test leaves no Cistern holding its ports.
struct Unread(Child);

impl std::ops::Deref for Unread {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Unread {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary on `origin`'s files with its standard error
/// piped to us and not read.
fn start_unread(origin: &Origin, dir: &std::path::Path) -> (Unread, SocketAddr) {
    let port = free_port();
    let root = dir.join("replica");
    let config = files_mirror(origin)
        .replace("{PORT}", &port.to_string())
        .replace("{ROOT}", &root.display().to_string());
    std::fs::write(dir.join("config.kdl"), config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["--config", "config.kdl"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cistern");
    let child = Unread(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "cistern did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

/// Makes `n` requests, every [`MISS_EVERY`]th for a missing file; fails
/// if they do not all get their answer within a minute.
async fn requests(addr: SocketAddr, n: usize) {
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..n {
            if i % MISS_EVERY == 0 {
                let got = get(addr, &format!("/files/pub/missing-{i}")).await;
                assert_eq!(got.status, 404, "request {i}");
            } else {
                let got = get(addr, "/files/pub/small.txt").await;
                assert_eq!(got.status, 200, "request {i}");
                assert_eq!(got.body, Ok(pattern(7, 300)));
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "requests stalled behind a log nobody read"
    );
}

/// Reads the process's standard error until `done` holds for what came,
/// for a minute at most; then kills it, which ends the pipe for a reader
/// still waiting.
async fn read_log_until(mut child: Unread, done: fn(&str) -> bool) -> String {
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
            if done(&String::from_utf8_lossy(&text)) {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    tokio::task::spawn_blocking(move || {
        let log = rx.recv_timeout(Duration::from_secs(60));
        drop(child);
        log.unwrap_or_else(|_| rx.recv().unwrap_or_default())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_stalls_no_request_and_loses_no_line() {
    let origin = Origin::start().await;
    origin.put("/pub/small.txt", Resource::new(pattern(7, 300)));
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = start_unread(&origin, dir.path());

    // Every request is answered although the log's pipe filled long ago.
    requests(addr, REQUESTS).await;

    // Read again: every request's line is there, and every miss's reason,
    // none dropped (the backlog is far below the writer's bound). The
    // reader stops at the last line, or at the end of the pipe once the
    // process is killed.
    const MISSED: usize = REQUESTS.div_ceil(MISS_EVERY);
    let log = read_log_until(child, |log| {
        log.matches("cistern::access:").count() >= REQUESTS
            && log.matches("not stored").count() >= MISSED
    })
    .await;
    assert_eq!(
        log.matches("cistern::access:").count(),
        REQUESTS,
        "access lines written once the pipe drained"
    );
    assert_eq!(
        log.matches("not stored").count(),
        MISSED,
        "the fetch's own lines too"
    );
    assert!(!log.contains("lines dropped"), "no line was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_log_nobody_reads_still_stops_on_sigterm() {
    let origin = Origin::start().await;
    origin.put("/pub/small.txt", Resource::new(pattern(7, 300)));
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_unread(&origin, dir.path());
    requests(addr, 1_000).await;

    // The pipe is full and stays unread: the shutdown's own log line and
    // the final flush must not wait on it for ever.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let status = status.expect("cistern did not exit within 30 s of SIGTERM");
    assert!(status.success(), "a clean exit: {status}");
}

/// Requests of the drop test, each for a missing file.
const MISSES: usize = 1_000;

/// The lines of a miss the log holds, and those it says it dropped.
fn accounted(log: &str) -> (usize, usize) {
    let dropped: usize = log
        .lines()
        .filter_map(|l| l.strip_prefix("cistern: "))
        .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let written = log.matches("cistern::access:").count() + log.matches("not stored").count();
    (written, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_beyond_the_bound_are_dropped_and_counted() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = start_unread(&origin, dir.path());

    // Misses with 4 KiB paths: each logs an access line and the fetch's
    // reason, about 12 KiB, so 1 000 of them are past the writer's 8 MiB
    // bound while nobody reads.
    let deep = format!("{}/", "d".repeat(200)).repeat(20);
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..MISSES {
            let got = get(addr, &format!("/files/{deep}missing-{i}")).await;
            assert_eq!(got.status, 404, "request {i}");
        }
    })
    .await;
    assert!(answered.is_ok(), "requests stalled behind a full log");

    // Every line is either written or counted as dropped.
    let log = read_log_until(child, |log| {
        let (written, dropped) = accounted(log);
        written + dropped >= 2 * MISSES
    })
    .await;
    let (written, dropped) = accounted(&log);
    assert!(
        log.contains("log lines dropped (log writer too slow)"),
        "the drop is said"
    );
    assert!(
        dropped > 0 && written > 0,
        "{written} written, {dropped} dropped"
    );
    assert_eq!(written + dropped, 2 * MISSES, "every line accounted for");
}
