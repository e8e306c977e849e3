//! Policies on real requests through the real binary: the built-ins the
//! default config uses, an example written in WAT, and hostile guests
//! failing the way config says.

mod common;

use base64::Engine as _;
use common::{
    Cistern, Origin, Resource, find_files, get, pattern, request, run_to_end, store_id_mirrors,
};
use http::StatusCode;
use sha2::{Digest, Sha256};

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_id_collapses_the_same_file_on_two_mirrors_into_one_replica() {
    let origin = Origin::start().await;
    let deb = pattern(1, 50_000);
    origin.put(
        "/mirror-a/pool/main/h/hello.deb",
        Resource::new(deb.clone()),
    );
    origin.put(
        "/mirror-b/pool/main/h/hello.deb",
        Resource::new(deb.clone()),
    );
    let config = store_id_mirrors(origin.addr, "");
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let a = get(cistern.addr, "/a/pool/main/h/hello.deb").await;
    assert_eq!(a.bytes(), &deb, "{}", cistern.log());
    let b = get(cistern.addr, "/b/pool/main/h/hello.deb").await;
    assert_eq!(b.bytes(), &deb);
    assert_eq!(b.header("cache-status"), "cistern; hit");
    assert_eq!(
        origin.hits("/mirror-b/pool/main/h/hello.deb"),
        0,
        "the second mirror is never asked"
    );
    assert_eq!(
        find_files(&cistern.root),
        vec!["pool.cistern:80/pool/main/h/hello.deb".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distro_keeps_packages_immutable_and_always_revalidates_indexes() {
    let origin = Origin::start().await;
    // The origin's own headers say the opposite of what a package cache wants.
    origin.put(
        "/debian/pool/main/h/hello_2.10_amd64.deb",
        Resource::new(pattern(2, 10_000)).header("cache-control", "max-age=0"),
    );
    origin.put(
        "/debian/dists/stable/InRelease",
        Resource::new(pattern(3, 2_000)).header("cache-control", "max-age=3600"),
    );
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "distro" path="builtin:distro"
mirror "debian" {{ prefix "/debian/"; upstream "http://{}/debian/"; policies "distro"; }}
"#,
        origin.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    for _ in 0..3 {
        let deb = get(cistern.addr, "/debian/pool/main/h/hello_2.10_amd64.deb").await;
        assert_eq!(deb.status, 200, "{}", cistern.log());
    }
    assert_eq!(
        origin.hits("/debian/pool/main/h/hello_2.10_amd64.deb"),
        1,
        "a .deb is never revalidated"
    );
    get(cistern.addr, "/debian/dists/stable/InRelease").await;
    let again = get(cistern.addr, "/debian/dists/stable/InRelease").await;
    assert_eq!(again.bytes(), &pattern(3, 2_000));
    assert!(
        again.header("cache-status").contains("fwd-status=304"),
        "{:?}",
        again.headers
    );
    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/debian/dists/stable/InRelease");
    assert_eq!(last.headers.get("if-none-match").unwrap(), "\"v1\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metalink_rewrites_a_redirect_to_the_cached_copy_with_the_same_digest() {
    let origin = Origin::start().await;
    let iso = pattern(4, 100_000);
    origin.put("/pub/distro.iso", Resource::new(iso.clone()));
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&iso));
    let mut redirect = Resource::new(bytes::Bytes::new())
        .header(
            "location",
            &format!("http://{}/elsewhere/distro.iso", origin.addr),
        )
        .header("digest", &format!("SHA-256={b64}"));
    redirect.status = StatusCode::FOUND;
    origin.put("/download/distro.iso", redirect);
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "metalink" path="builtin:metalink"
mirror "m" {{ prefix "/m/"; upstream "http://{}/"; policies "metalink"; }}
"#,
        origin.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    assert_eq!(get(cistern.addr, "/m/pub/distro.iso").await.bytes(), &iso);
    let answer = get(cistern.addr, "/m/download/distro.iso").await;
    assert_eq!(answer.status, 302, "{}", cistern.log());
    assert_eq!(
        answer.header("location"),
        format!("http://{}/pub/distro.iso", origin.addr),
        "the redirect now points at what is already cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wat_example_limits_a_path_bypasses_queries_and_tags_responses() {
    let origin = Origin::start().await;
    origin.put("/api/items", Resource::new(pattern(5, 100)));
    origin.put(
        "/page?x=1",
        Resource::new(pattern(6, 100)).header("cache-control", "max-age=600"),
    );
    let wat = repo().join("examples/wat/policy.wat");
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
limiter "per-client" rate=2 per="1h" burst=2
policy "example" path="{}" {{
    param "limited-prefix" "/api/"
}}
mirror "m" {{ prefix "/"; upstream "http://{}/"; policies "example"; query "key"; }}
"#,
        wat.display(),
        origin.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    for _ in 0..2 {
        let ok = get(cistern.addr, "/api/items").await;
        assert_eq!(ok.status, 200, "{}", cistern.log());
        assert_eq!(ok.header("x-policy"), "wat");
    }
    let limited = get(cistern.addr, "/api/items").await;
    assert_eq!(limited.status, 429);
    assert!(!limited.header("retry-after").is_empty());
    for _ in 0..2 {
        assert_eq!(get(cistern.addr, "/page?x=1").await.status, 200);
    }
    assert_eq!(
        origin.hits("/page?x=1"),
        2,
        "a URL with a query bypasses the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_policy_fails_open_or_closed_as_configured() {
    let origin = Origin::start().await;
    origin.put("/file", Resource::new(pattern(7, 100)));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("trap.wat"),
        r#"(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_request") (result i32) unreachable))"#,
    )
    .unwrap();
    for (on_error, want) in [("pass", 200u16), ("deny", 503)] {
        let config = format!(
            r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "guard" path="trap.wat" on-error="{on_error}"
mirror "m" {{ prefix "/"; upstream "http://{}/"; policies "guard"; }}
"#,
            origin.addr
        );
        let cistern = Cistern::start(dir.path(), &config, &[]);
        for _ in 0..3 {
            let got = request(cistern.addr, "GET", "/file", &[]).await;
            assert_eq!(got.status.as_u16(), want, "on-error={on_error}");
        }
        // The failure is logged with the policy's name, the hook and what
        // config said to do. (The policy is not called "trap", so the word
        // in its name cannot pass for the failure's kind.)
        let want_fields = [
            "policy failed".to_owned(),
            r#"policy="guard""#.to_owned(),
            r#"hook="on_request""#.to_owned(),
            r#"kind="trap""#.to_owned(),
            format!(r#"on_error="{on_error}""#),
        ];
        cistern
            .log_when("the policy failure with its fields", |log| {
                log.lines()
                    .any(|l| want_fields.iter().all(|f| l.contains(f.as_str())))
            })
            .await;
        drop(cistern);
        let _ = std::fs::remove_dir_all(dir.path().join("replica"));
        let _ = std::fs::remove_dir_all(dir.path().join("replica.cistern"));
    }
}

#[test]
fn a_policy_that_does_not_load_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.wat"), "(module (func $x").unwrap();
    std::fs::write(
        dir.path().join("config.kdl"),
        "listen \"127.0.0.1:0\"\nstore { root \"r\"; }\npolicy \"broken\" path=\"broken.wat\"\n",
    )
    .unwrap();
    let ran = run_to_end(dir.path(), &["--config", "config.kdl"]);
    assert!(!ran.ok);
    let text = ran.stderr;
    assert!(text.contains("broken"), "{text}");
}

/// A policy answering every request with the `replica_state` of the key in
/// its `key` parameter, as one ASCII digit (ABI.md §11).
const REPLICA_STATE_PROBE: &str = r#"(module
  (import "cistern" "param_get" (func $param_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "replica_state" (func $replica_state (param i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "key")
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_request") (result i32)
    (local $len i32)
    (local.set $len
      (call $param_get (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 256) (i32.const 1024)))
    (if (i32.lt_s (local.get $len) (i32.const 0)) (then (return (i32.const 1))))
    (i32.store8 (i32.const 16)
      (i32.add (i32.const 48) (call $replica_state (i32.const 256) (local.get $len))))
    (drop (call $respond (i32.const 200) (i32.const 16) (i32.const 1)))
    (i32.const 0)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_state_reports_an_interrupted_partial_as_partial() {
    const SIZE: usize = 1024 * 1024;
    let origin = Origin::start().await;
    let body = pattern(5, SIZE);
    // Dies once more than a fill resumes: the transfer fails and the
    // partial stays on disk, resumable.
    let deaths = cistern::fetch::RESUME_ATTEMPTS + 1;
    origin.put(
        "/dvd.iso",
        Resource::new(body.clone())
            .slow(std::time::Duration::from_millis(20))
            .die_after(100_000, deaths),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("probe.wat"), REPLICA_STATE_PROBE).unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "probe" path="probe.wat" {{
    param "key" "http://{addr}/dvd.iso"
}}
mirror "files" {{ prefix "/files/"; upstream "http://{addr}/"; }}
mirror "probe" {{ prefix "/probe/"; upstream "http://{addr}/"; policies "probe"; }}
"#,
        addr = origin.addr
    );
    let state = |cistern: &Cistern| {
        let addr = cistern.addr;
        async move {
            let got = get(addr, "/probe/state").await;
            assert_eq!(got.status, 200);
            String::from_utf8_lossy(got.bytes()).into_owned()
        }
    };

    let cistern = Cistern::start(dir.path(), &config, &[]);
    assert_eq!(state(&cistern).await, "0", "ABSENT before any fetch");
    let cut = get(cistern.addr, "/files/dvd.iso").await;
    assert!(cut.body.is_err(), "the transfer was cut");
    assert!(find_files(&cistern.root).is_empty());
    assert_eq!(
        state(&cistern).await,
        "1",
        "PARTIAL: the cut download's partial is on disk\n{}",
        cistern.log()
    );

    // After a restart no fill is under way: only the partial on disk says
    // the key is PARTIAL.
    drop(cistern);
    let cistern = Cistern::start(dir.path(), &config, &[]);
    assert_eq!(
        state(&cistern).await,
        "1",
        "PARTIAL: the partial found at open\n{}",
        cistern.log()
    );

    let whole = get(cistern.addr, "/files/dvd.iso").await;
    assert!(
        whole.bytes() == &body,
        "the partial was resumed into the file"
    );
    assert_eq!(state(&cistern).await, "2", "COMPLETE once committed");
    assert_eq!(origin.hits("/state"), 0, "the probe never went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_reach_a_policy_as_bytes_not_only_utf8() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Copies the request's `x-name` value, byte for byte, into a header of
    // a direct answer.
    std::fs::write(
        dir.path().join("echo.wat"),
        r#"(module
  (import "cistern" "header_get" (func $get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-name")
  (data (i32.const 16) "x-echo")
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_request") (result i32)
    (local $n i32)
    (local.set $n (call $get (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 0) (i32.const 100) (i32.const 200)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.const 1))))
    (drop (call $respond (i32.const 200) (i32.const 0) (i32.const 0)))
    (call $set (i32.const 1) (i32.const 16) (i32.const 6) (i32.const 100) (local.get $n))))"#,
    )
    .unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "echo" path="echo.wat" on-error="deny"
mirror "m" {{ prefix "/"; upstream "http://{}/"; policies "echo"; }}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    // "Zoë" in Latin-1, as an old server or client would send it: not UTF-8.
    let latin1 = b"Zo\xeb";
    let mut s = tokio::net::TcpStream::connect(cistern.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Name: ".to_vec();
    req.extend_from_slice(latin1);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("an answer")
    .unwrap();
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = &answer[..head_end];
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(head)
    );
    let mut want = b"\r\nx-echo: ".to_vec();
    want.extend_from_slice(latin1);
    want.extend_from_slice(b"\r\n");
    let mut head_crlf = head.to_vec();
    head_crlf.extend_from_slice(b"\r\n");
    assert!(
        head_crlf.windows(want.len()).any(|w| w == want.as_slice()),
        "the value did not come back byte for byte: {}",
        String::from_utf8_lossy(head)
    );
    assert_eq!(origin.seen().len(), 0, "the policy answered directly");
}

/// A policy hook that loops until its deadline yields its runtime worker
/// at every epoch tick: with the binary's runtime cut to ONE worker, hits
/// on a route without policies are answered promptly the whole time it
/// loops. Checked for a looping `on_request` (the hook runs
/// before the lookup) and a looping `on_response` (it runs in the fill,
/// once the upstream's head is in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_looping_to_its_deadline_does_not_stall_other_requests() {
    let origin = Origin::start().await;
    origin.put("/plain/hit", Resource::new(pattern(3, 1024)));
    origin.put("/slow/file", Resource::new(pattern(4, 1024)));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("loop_response.wat"),
        r#"(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_response") (result i32) (loop $forever (br $forever)) (i32.const 0)))"#,
    )
    .unwrap();
    let loop_request = repo().join("tests/guests/loop.wat");
    let deadline = std::time::Duration::from_secs(2);
    for guest in [
        loop_request.display().to_string(),
        "loop_response.wat".into(),
    ] {
        let config = format!(
            r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "spin" path="{guest}" deadline="2s"
mirror "plain" {{ prefix "/plain/"; upstream "http://{o}/plain/"; }}
mirror "slow" {{ prefix "/slow/"; upstream "http://{o}/slow/"; policies "spin"; }}
"#,
            o = origin.addr
        );
        let cistern = Cistern::start_env(dir.path(), &config, &[("TOKIO_WORKER_THREADS", "1")]);
        let primed = get(cistern.addr, "/plain/hit").await;
        assert_eq!(primed.status, StatusCode::OK, "{}", cistern.log());

        let addr = cistern.addr;
        let sent = std::time::Instant::now();
        let slow = tokio::spawn(async move {
            let got = get(addr, "/slow/file").await;
            (got.status, sent.elapsed())
        });
        // Hits one after another for as long as the spinning request is in
        // flight (bounded): once its hook runs, a hook on the worker would
        // hold the next hit until the deadline.
        let mut hits = 0;
        let mut slowest = std::time::Duration::ZERO;
        while !slow.is_finished() && sent.elapsed() < std::time::Duration::from_secs(30) {
            let started = std::time::Instant::now();
            let got = get(cistern.addr, "/plain/hit").await;
            let took = started.elapsed();
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.header("cache-status"), "cistern; hit");
            slowest = slowest.max(took);
            hits += 1;
        }
        let (status, slow_took) = slow.await.unwrap();
        // on-error="pass": the request goes on as if the policy were absent.
        assert_eq!(status, StatusCode::OK, "{guest}: {}", cistern.log());
        assert!(
            slow_took >= deadline / 2,
            "{guest}: the hook did not loop ({slow_took:?})"
        );
        assert!(hits >= 2, "{guest}: only {hits} hits while the hook looped");
        assert!(
            slowest < deadline / 2,
            "{guest}: a hit took {slowest:?} while a hook looped (deadline {deadline:?})"
        );
        cistern
            .log_when("the timeout", |log| {
                log.lines()
                    .any(|l| l.contains("policy failed") && l.contains(r#"kind="timeout""#))
            })
            .await;
        drop(cistern);
        let _ = std::fs::remove_dir_all(dir.path().join("replica"));
        let _ = std::fs::remove_dir_all(dir.path().join("replica.cistern"));
    }
}

/// Voluntary context switches so far of `cistern`'s thread named `name`.
fn thread_switches(cistern: &Cistern, name: &str) -> u64 {
    let tasks = format!("/proc/{}/task", cistern.child.id());
    for task in std::fs::read_dir(&tasks).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        return status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in /proc/…/status");
    }
    panic!("no thread named {name} in {tasks}");
}

/// An idle Cistern is not woken 500 times a second by the policy engine's
/// epoch ticker: after a spell without guest calls the ticker sleeps. The
/// next hook wakes it, so a looping guest still meets its deadline after
/// every idle spell instead of running forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_ticker_sleeps_while_no_policy_runs_and_wakes_for_the_next_hook() {
    let origin = Origin::start().await;
    origin.put("/slow/file", Resource::new(pattern(5, 1024)));
    let dir = tempfile::tempdir().unwrap();
    let spin = repo().join("tests/guests/loop.wat");
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "spin" path="{}" deadline="300ms"
mirror "slow" {{ prefix "/slow/"; upstream "http://{o}/slow/"; policies "spin"; }}
"#,
        spin.display(),
        o = origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    for round in 1..=2 {
        // Past the idle spell (100 ms), then one second of an idle process.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let before = thread_switches(&cistern, "cistern-epoch");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let woken = thread_switches(&cistern, "cistern-epoch") - before;
        assert!(
            woken <= 10,
            "round {round}: the idle ticker woke {woken} times in a second"
        );
        let sent = std::time::Instant::now();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            get(cistern.addr, "/slow/file"),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the looping hook never timed out"));
        let took = sent.elapsed();
        // on-error="pass": answered as if the policy were absent.
        assert_eq!(got.status, StatusCode::OK, "{}", cistern.log());
        assert!(
            took >= std::time::Duration::from_millis(150),
            "round {round}: the hook did not loop ({took:?})"
        );
    }
    cistern
        .log_when("two timeouts", |log| {
            log.lines()
                .filter(|l| l.contains("policy failed") && l.contains(r#"kind="timeout""#))
                .count()
                == 2
        })
        .await;
}

/// Hooks run inline on the request's task and a guest still running at an
/// epoch tick yields the worker: with the binary's runtime cut to ONE
/// worker and three `on_request` hooks looping to their deadline at once
/// (more than any fixed pool of policy threads on this machine, and each
/// of which, called without yielding, would hold the only worker), hits on
/// a route whose own policy runs a healthy `on_request` are all answered
/// promptly, long before the loops end. The loops still time out: running
/// time is counted, not the time spent waiting for the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_hooks_yield_the_only_worker_to_other_policy_requests() {
    let origin = Origin::start().await;
    origin.put("/fast/hit", Resource::new(pattern(5, 1024)));
    for n in 0..3 {
        origin.put(&format!("/slow/{n}"), Resource::new(pattern(6, 1024)));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "spin" path="{spin}" deadline="1s"
policy "quick" path="{quick}"
mirror "fast" {{ prefix "/fast/"; upstream "http://{o}/fast/"; policies "quick"; }}
mirror "slow" {{ prefix "/slow/"; upstream "http://{o}/slow/"; policies "spin"; }}
"#,
        spin = repo().join("tests/guests/loop.wat").display(),
        quick = repo().join("tests/guests/healthy.wat").display(),
        o = origin.addr
    );
    let cistern = Cistern::start_env(dir.path(), &config, &[("TOKIO_WORKER_THREADS", "1")]);
    let primed = get(cistern.addr, "/fast/hit").await;
    assert_eq!(primed.status, StatusCode::OK, "{}", cistern.log());

    let addr = cistern.addr;
    let sent = std::time::Instant::now();
    let slow: Vec<_> = (0..3)
        .map(|n| {
            tokio::spawn(async move {
                let got = get(addr, &format!("/slow/{n}")).await;
                (got.status, sent.elapsed())
            })
        })
        .collect();
    // Give the three hooks time to start looping before the hits go.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut hits = 0;
    let mut slowest = std::time::Duration::ZERO;
    let mut last_hit = std::time::Duration::ZERO;
    while slow.iter().any(|s| !s.is_finished())
        && sent.elapsed() < std::time::Duration::from_secs(30)
    {
        let started = std::time::Instant::now();
        let got = get(cistern.addr, "/fast/hit").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.header("cache-status"), "cistern; hit");
        last_hit = sent.elapsed();
        hits += 1;
    }
    let mut first_done = std::time::Duration::MAX;
    for s in slow {
        let (status, took) = s.await.unwrap();
        // on-error="pass": each request goes on as if the policy were absent.
        assert_eq!(status, StatusCode::OK, "{}", cistern.log());
        first_done = first_done.min(took);
    }
    eprintln!("{hits} hits, slowest {slowest:?}, the first loop ended after {first_done:?}");
    assert!(
        first_done >= std::time::Duration::from_millis(500),
        "the hooks did not loop ({first_done:?})"
    );
    assert!(
        slowest < std::time::Duration::from_millis(300),
        "a hit through a healthy policy took {slowest:?} while three hooks looped on the only worker"
    );
    assert!(
        hits >= 10,
        "only {hits} hits (the last at {last_hit:?}) while the hooks looped for {first_done:?}"
    );
    cistern
        .log_when("three timeouts", |log| {
            log.lines()
                .filter(|l| l.contains("policy failed") && l.contains(r#"kind="timeout""#))
                .count()
                >= 3
        })
        .await;
}

/// `on_response` runs in the request's task now, for the fill (GET) and for
/// a pass-through (POST): a trapping hook still fails open (the upstream's
/// answer, and a GET is stored) or closed (502) as `on-error` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_response_hook_fails_open_or_closed_as_configured() {
    let origin = Origin::start().await;
    origin.put("/file", Resource::new(pattern(8, 100)));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("trap_response.wat"),
        r#"(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func (export "on_response") (result i32) unreachable))"#,
    )
    .unwrap();
    for (on_error, want) in [("pass", 200u16), ("deny", 502)] {
        let config = format!(
            r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "guard" path="trap_response.wat" on-error="{on_error}"
mirror "m" {{ prefix "/"; upstream "http://{}/"; policies "guard"; }}
"#,
            origin.addr
        );
        let cistern = Cistern::start(dir.path(), &config, &[]);
        let got = request(cistern.addr, "GET", "/file", &[]).await;
        assert_eq!(got.status.as_u16(), want, "GET, on-error={on_error}");
        let posted = request(cistern.addr, "POST", "/file", &[]).await;
        assert_eq!(posted.status.as_u16(), want, "POST, on-error={on_error}");
        if want == 200 {
            assert_eq!(got.bytes(), &pattern(8, 100));
        }
        cistern
            .log_when("the response hook's failure", |log| {
                log.lines().any(|l| {
                    l.contains("policy failed")
                        && l.contains(r#"hook="on_response""#)
                        && l.contains(&format!(r#"on_error="{on_error}""#))
                })
            })
            .await;
        drop(cistern);
        let _ = std::fs::remove_dir_all(dir.path().join("replica"));
        let _ = std::fs::remove_dir_all(dir.path().join("replica.cistern"));
    }
}

/// The instance pool reserves about a terabyte of address space up front.
/// Under a cap on it (`ulimit -v`, as some hosts and profilers set), the
/// engine maps each instance on its own instead of refusing to start.
#[tokio::test]
async fn policies_run_under_an_address_space_cap_too_small_for_the_pool() {
    let origin = Origin::start().await;
    origin.put("/files/a.deb", Resource::new(pattern(7, 1024)));
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let root = dir.path().join("replica");
    let config = format!(
        r#"
listen "127.0.0.1:{port}"
store {{ root "{root}"; }}
policy "store-id" path="builtin:store-id" {{
    param "rule" "http://*/files/* http://files.cistern/$2"
}}
policy "distro" path="builtin:distro"
mirror "m" {{ prefix "/m/"; upstream "http://{o}/files/"; policies "store-id" "distro"; }}
"#,
        root = root.display(),
        o = origin.addr
    );
    std::fs::write(dir.path().join("config.kdl"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("cistern.log")).unwrap();
    // 100 GiB: room for the process and a few instances, not for the pool.
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            "ulimit -v 104857600 && exec \"$0\" --config config.kdl",
        ])
        .arg(env!("CARGO_BIN_EXE_cistern"))
        .current_dir(dir.path())
        .env("CISTERN_LOG", "info,cistern=debug")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let cistern = Cistern {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        dir: dir.path().to_owned(),
        root,
    };
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(cistern.addr).is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "cistern did not start under the cap; log:\n{}",
            cistern.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let first = get(cistern.addr, "/m/a.deb").await;
    assert_eq!(first.status, StatusCode::OK, "{}", cistern.log());
    assert_eq!(first.body.as_deref().unwrap(), &pattern(7, 1024)[..]);
    let again = get(cistern.addr, "/m/a.deb").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    // store-id ran: the replica is kept under its key.
    let files = find_files(&cistern.root);
    assert!(
        files.iter().any(|f| f.contains("files.cistern")),
        "{files:?}"
    );
    let log = cistern.log();
    assert!(log.contains("instantiated on demand"), "{log}");
}
