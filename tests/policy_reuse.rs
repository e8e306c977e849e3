//! Kept policy outcomes (ABI version 3, `reuse_outcome`) on real requests
//! through the real binary: a policy that promises its decision depends
//! only on what it read is called once per distinct value, its edits and
//! answers still apply to every request, and a call that read something
//! the host cannot key is always made again.

mod common;
mod tls_common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Cistern, Origin, Resource, free_port, get, pattern, request, run_to_end, store_id_mirrors,
};
use serde_json::Value;
use tls_common::{eventually, replace_file};

/// A WAT policy that answers every request with the number of calls it
/// has had, as one character (`1`, `2`, …), after reading the URL, running
/// `extra` (more reads) and promising reuse for `seconds`. The count lives
/// in the guest's memory, which the host does not see: a reused outcome
/// repeats the number of the call that made it.
fn counting_policy(extra: &str, seconds: u32) -> String {
    format!(
        r#"(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "header_get" (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "replica_state" (func $replica_state (param i32 i32) (result i32)))
  (import "cistern" "reuse_outcome" (func $reuse_outcome (param i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (data (i32.const 0) "x-tenant")
  (data (i32.const 16) "x-answered-by")
  (data (i32.const 32) "counter")
  (func (export "cistern_abi_version") (result i32) (i32.const 3))
  (func (export "on_request") (result i32)
    (drop (call $request_get (i32.const 1) (i32.const 1024) (i32.const 4096)))
    {extra}
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $calls)))
    (drop (call $reuse_outcome (i32.const {seconds})))
    (drop (call $header_set (i32.const 1) (i32.const 16) (i32.const 13) (i32.const 32) (i32.const 7)))
    (drop (call $respond (i32.const 200) (i32.const 100) (i32.const 1)))
    (i32.const 0)))"#
    )
}

/// Also reads every value of the request header `x-tenant`.
const READ_TENANT: &str = "(drop (call $header_get (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 0) (i32.const 512) (i32.const 256)))";
/// Also asks the replica store about the key `x-tenant` (any text will do).
const ASK_REPLICA: &str = "(drop (call $replica_state (i32.const 0) (i32.const 8)))";

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Starts Cistern with the policy `counter` (from `wat`) on every request,
/// and the admin listener on `admin`.
fn start(dir: &std::path::Path, wat: &str, admin: SocketAddr) -> Cistern {
    std::fs::write(dir.join("counter.wat"), wat).unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "counter" path="counter.wat"
mirror "m" {{ prefix "/"; upstream "http://127.0.0.1:9/"; policies "counter"; }}
admin {{ listen "{admin}"; }}
"#
    );
    Cistern::start(dir, &config, &[])
}

/// The body of the answer to `GET target` with `headers`.
async fn answer(cistern: &Cistern, target: &str, headers: &[(&str, &str)]) -> String {
    let got = request(cistern.addr, "GET", target, headers).await;
    assert_eq!(got.status, 200, "{target}: {}", cistern.log());
    assert_eq!(
        got.header("x-answered-by"),
        "counter",
        "the answer's headers are kept with it"
    );
    String::from_utf8(got.bytes().to_vec()).unwrap()
}

async fn policy_stats(admin: SocketAddr) -> Value {
    let got = get(admin, "/api/policies").await;
    assert_eq!(got.status, 200);
    let all: Value = serde_json::from_slice(got.bytes()).unwrap();
    all[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_promises_reuse_is_called_once_per_url() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = start(dir.path(), &counting_policy("", 3600), admin);
    assert_eq!(answer(&cistern, "/a", &[]).await, "1");
    assert_eq!(answer(&cistern, "/a", &[]).await, "1", "not called again");
    assert_eq!(
        answer(&cistern, "/b", &[]).await,
        "2",
        "a new URL is a call"
    );
    assert_eq!(answer(&cistern, "/a", &[]).await, "1");
    assert_eq!(
        answer(&cistern, "/a", &[("x-tenant", "blue")]).await,
        "1",
        "a header the policy never read does not matter"
    );
    let stats = policy_stats(admin).await;
    assert_eq!(stats["calls"], 2, "{stats}");
    assert_eq!(stats["reused"], 3, "{stats}");
    let metrics = get(admin, "/metrics").await;
    let page = String::from_utf8(metrics.bytes().to_vec()).unwrap();
    assert!(
        page.contains("cistern_policy_reused_total{policy=\"counter\"} 3"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_the_policy_read_is_part_of_what_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let cistern = start(
        dir.path(),
        &counting_policy(READ_TENANT, 3600),
        admin_addr(),
    );
    let blue = [("x-tenant", "blue")];
    let red = [("x-tenant", "red")];
    assert_eq!(answer(&cistern, "/a", &blue).await, "1");
    assert_eq!(answer(&cistern, "/a", &red).await, "2");
    assert_eq!(
        answer(&cistern, "/a", &[]).await,
        "3",
        "no header is a value too"
    );
    for _ in 0..3 {
        assert_eq!(answer(&cistern, "/a", &blue).await, "1");
        assert_eq!(answer(&cistern, "/a", &red).await, "2");
        assert_eq!(answer(&cistern, "/a", &[]).await, "3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_asked_the_replica_store_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    let cistern = start(dir.path(), &counting_policy(ASK_REPLICA, 3600), admin);
    for want in ["1", "2", "3"] {
        assert_eq!(answer(&cistern, "/a", &[]).await, want);
    }
    assert_eq!(policy_stats(admin).await["reused"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fails_after_promising_reuse_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_addr();
    // The same policy, but its hook returns 1 (a failure) at the end: its
    // answer is discarded (on-error="pass"), and so is the promise.
    let failing = counting_policy("", 3600).replace(
        "(drop (call $respond (i32.const 200) (i32.const 100) (i32.const 1)))\n    (i32.const 0)))",
        "(drop (call $respond (i32.const 200) (i32.const 100) (i32.const 1)))\n    (i32.const 1)))",
    );
    assert_ne!(failing, counting_policy("", 3600));
    let cistern = start(dir.path(), &failing, admin);
    for _ in 0..3 {
        let got = request(cistern.addr, "GET", "/a", &[]).await;
        assert_ne!(got.status, 200, "the failed call's answer must not apply");
    }
    let stats = policy_stats(admin).await;
    assert_eq!(stats["calls"], 3, "{stats}");
    assert_eq!(stats["reused"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_outcome_expires_after_the_seconds_the_policy_gave() {
    let dir = tempfile::tempdir().unwrap();
    let cistern = start(dir.path(), &counting_policy("", 1), admin_addr());
    // The second answer is made of the kept outcome, the third of the
    // chain's kept decision: both expire with the outcome.
    for _ in 0..3 {
        assert_eq!(answer(&cistern, "/a", &[]).await, "1");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(answer(&cistern, "/a", &[]).await, "2");
    assert_eq!(answer(&cistern, "/a", &[]).await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_forgets_the_kept_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let cistern = start(dir.path(), &counting_policy("", 3600), admin_addr());
    // The third answer is the chain's kept decision.
    for _ in 0..3 {
        assert_eq!(answer(&cistern, "/a", &[]).await, "1");
    }
    // The same policy counting from `@`: its first call answers `A`.
    let edited = counting_policy("", 3600).replace("(i32.const 48)", "(i32.const 64)");
    assert_ne!(edited, counting_policy("", 3600));
    // Policy modules are watched like the config: replacing it reloads.
    replace_file(&dir.path().join("counter.wat"), edited.as_bytes());
    eventually(
        "the reloaded policy's answer",
        Duration::from_secs(20),
        || {
            let cistern = &cistern;
            async move {
                let got = answer(cistern, "/a", &[]).await;
                assert!(got == "1" || got == "A", "before or after: {got}");
                (got == "A").then_some(())
            }
        },
    )
    .await;
    for _ in 0..3 {
        assert_eq!(answer(&cistern, "/a", &[]).await, "A", "kept again, anew");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_id_keys_apply_without_a_call_and_still_share_one_replica() {
    let origin = Origin::start().await;
    let deb = pattern(3, 20_000);
    for mirror in ["mirror-a", "mirror-b"] {
        origin.put(
            &format!("/{mirror}/pool/main/h/hello.deb"),
            Resource::new(deb.clone()),
        );
    }
    let admin = admin_addr();
    let config = store_id_mirrors(origin.addr, &format!(r#"admin {{ listen "{admin}"; }}"#));
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    for path in ["/a/pool/main/h/hello.deb", "/b/pool/main/h/hello.deb"] {
        for _ in 0..3 {
            let got = get(cistern.addr, path).await;
            assert_eq!(got.bytes(), &deb, "{path}: {}", cistern.log());
        }
    }
    let got = get(cistern.addr, "/b/pool/main/h/hello.deb").await;
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/mirror-a/pool/main/h/hello.deb"), 1);
    assert_eq!(
        origin.hits("/mirror-b/pool/main/h/hello.deb"),
        0,
        "the key set from a kept outcome is the same replica"
    );
    let stats = policy_stats(admin).await;
    assert_eq!(stats["calls"], 2, "one call per URL: {stats}");
    assert_eq!(stats["reused"], 5, "{stats}");
}

/// A policy that tags every request (`x-tag: kept`, a request header)
/// and sends its fetch to `upstream` (`UPSTREAM_URL`) after reading its
/// URL, and promises reuse for an hour.
fn tag(upstream: &str) -> String {
    format!(
        r#"(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "request_set" (func $request_set (param i32 i32 i32) (result i32)))
  (import "cistern" "reuse_outcome" (func $reuse_outcome (param i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-tag")
  (data (i32.const 16) "kept")
  (data (i32.const 64) "{upstream}")
  (func (export "cistern_abi_version") (result i32) (i32.const 3))
  (func (export "on_request") (result i32)
    (drop (call $request_get (i32.const 1) (i32.const 1024) (i32.const 4096)))
    (drop (call $reuse_outcome (i32.const 3600)))
    (drop (call $header_set (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 4)))
    (if (call $request_set (i32.const 8) (i32.const 64) (i32.const {len})) (then unreachable))
    (i32.const 0)))"#,
        len = upstream.len()
    )
}

/// A response hook that shows what it saw of the request: its URL, its
/// client's IP and its `x-tag`, as the response headers `x-seen-url`,
/// `x-seen-client` and `x-seen-tag`.
const ECHO: &str = r#"(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "header_get" (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-seen-url")
  (data (i32.const 16) "x-seen-client")
  (data (i32.const 32) "x-tag")
  (data (i32.const 48) "x-seen-tag")
  (func (export "cistern_abi_version") (result i32) (i32.const 3))
  (func (export "on_response") (result i32)
    (local $n i32)
    (local.set $n (call $request_get (i32.const 1) (i32.const 1024) (i32.const 4096)))
    (drop (call $header_set (i32.const 1) (i32.const 0) (i32.const 10) (i32.const 1024) (local.get $n)))
    (local.set $n (call $request_get (i32.const 6) (i32.const 1024) (i32.const 4096)))
    (drop (call $header_set (i32.const 1) (i32.const 16) (i32.const 13) (i32.const 1024) (local.get $n)))
    (local.set $n (call $header_get (i32.const 0) (i32.const 32) (i32.const 5) (i32.const 0) (i32.const 1024) (i32.const 4096)))
    (drop (call $header_set (i32.const 1) (i32.const 48) (i32.const 10) (i32.const 1024) (local.get $n)))
    (i32.const 0)))"#;

/// `GET target` from the loopback address `client` (any 127.x.y.z).
async fn get_from(client: [u8; 4], proxy: SocketAddr, target: &str) -> common::Got {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((client, 0))).unwrap();
    let stream = socket.connect(proxy).await.expect("connect to cistern");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(target)
        .header("host", proxy.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    common::read(sender.send_request(req).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_kept_whole_still_edits_and_sends_each_request_and_shows_it_to_on_response() {
    let origin = Origin::start().await;
    // Never stored: every request is a miss, and `on_response` runs.
    // `tag` fetches `/f` from `/g`.
    origin.put(
        "/g",
        Resource::new(pattern(5, 100)).header("cache-control", "no-store"),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tag.wat"), tag(&origin.url("/g"))).unwrap();
    std::fs::write(dir.path().join("echo.wat"), ECHO).unwrap();
    let admin = admin_addr();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "tag" path="tag.wat"
policy "echo" path="echo.wat"
mirror "m" {{ prefix "/"; upstream "http://{}/"; policies "tag" "echo"; }}
admin {{ listen "{admin}"; }}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    // The first request calls `tag`; the second is made of its kept
    // outcome; from the third on, the chain's kept decision applies.
    for (i, client) in [
        [127, 0, 0, 2],
        [127, 0, 0, 2],
        [127, 0, 0, 2],
        [127, 0, 0, 3],
    ]
    .into_iter()
    .enumerate()
    {
        let got = get_from(client, cistern.addr, "/f").await;
        assert_eq!(got.status, 200, "request {i}: {}", cistern.log());
        assert_eq!(got.header("x-seen-url"), origin.url("/f"), "request {i}");
        assert_eq!(
            got.header("x-seen-client"),
            std::net::IpAddr::from(client).to_string(),
            "request {i}: on_response sees this request's client"
        );
        assert_eq!(got.header("x-seen-tag"), "kept", "request {i}");
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), 4);
    for (i, req) in seen.iter().enumerate() {
        assert_eq!(
            req.path, "/g",
            "upstream request {i} goes where `tag` sent it"
        );
        assert_eq!(req.headers["x-tag"], "kept", "upstream request {i}");
    }
    let got = get(admin, "/api/policies").await;
    let all: Value = serde_json::from_slice(got.bytes()).unwrap();
    let tag = &all[0];
    assert_eq!(tag["name"], "tag", "{all}");
    assert_eq!(tag["calls"], 1, "{tag}");
    assert_eq!(tag["reused"], 3, "{tag}");
}

#[test]
fn a_version_2_module_that_imports_reuse_outcome_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let wat = counting_policy("", 60).replace(
        "(func (export \"cistern_abi_version\") (result i32) (i32.const 3))",
        "(func (export \"cistern_abi_version\") (result i32) (i32.const 2))",
    );
    std::fs::write(dir.path().join("old.wat"), wat).unwrap();
    std::fs::write(
        dir.path().join("config.kdl"),
        "listen \"127.0.0.1:0\"\nstore { root \"r\"; }\npolicy \"old\" path=\"old.wat\"\n",
    )
    .unwrap();
    let ran = run_to_end(dir.path(), &["check", "config.kdl"]);
    assert!(!ran.ok);
    let text = ran.stderr;
    assert!(
        text.contains("old") && text.contains("`reuse_outcome`") && text.contains("returning 3"),
        "{text}"
    );
}
