//! Mirror sets: weighted, sticky choice of an upstream per file; health
//! probes that disable a failing mirror and re-enable it only once it
//! answers again (on the manual clock); partial mirrors whose 404s send a
//! file to the next one; and what the admin API and `/metrics` show.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cistern::clock::Clock;
use common::{Origin, Resource, get, pattern};
use http::StatusCode;
use serde_json::Value;

/// A mirror "m" on `/m/` over `upstreams` (origin, weight), with `extra`
/// nodes in its block and an admin listener.
fn config(dir: &Path, upstreams: &[(&Origin, u32)], extra: &str) -> String {
    let mut ups = String::new();
    for (o, w) in upstreams {
        ups.push_str(&format!(
            "    upstream \"http://{}/pub/\" weight={w}\n",
            o.addr
        ));
    }
    format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
admin {{
    listen "127.0.0.1:0"
}}
mirror "m" {{
    prefix "/m/"
{ups}{extra}
}}
"#,
        dir.join("replica").display()
    )
}

async fn start(dir: &Path, text: &str, clock: &Clock) -> cistern::app::Running {
    common::start_on_clock(text, &dir.join("config.kdl"), clock).await
}

/// A file every request of which goes upstream (nothing is stored), so
/// each request shows which mirror it was sent to.
fn unstored(seed: u8) -> Resource {
    Resource::new(pattern(seed, 100)).header("cache-control", "no-store")
}

/// How many requests `origin` saw for `path`s below `/pub/f`.
fn file_hits(origin: &Origin) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/pub/f"))
        .count()
}

async fn api(admin: SocketAddr, path: &str) -> Value {
    let got = get(admin, path).await;
    assert_eq!(got.status, StatusCode::OK, "{path}");
    serde_json::from_slice(got.bytes()).expect("JSON")
}

/// The upstreams of mirror "m" in `/api/mirrors`.
async fn upstreams(admin: SocketAddr) -> Vec<Value> {
    api(admin, "/api/mirrors").await[0]["upstreams"]
        .as_array()
        .unwrap()
        .clone()
}

/// Polls the admin API until `check` holds for upstream `i` (bounded).
async fn wait_upstream(admin: SocketAddr, i: usize, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ups = upstreams(admin).await;
        if check(&ups[i]) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {:#}", ups[i]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// HEAD requests `origin` saw for the probe path.
fn probes(origin: &Origin) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.path == "/pub/probe")
        .count()
}

/// Polls until `origin` has seen `n` probes (bounded).
async fn wait_probes(origin: &Origin, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while probes(origin) < n {
        assert!(
            Instant::now() < deadline,
            "{} probes, not {n}",
            probes(origin)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the sample `series` in a Prometheus page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{page}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_spread_over_mirrors_by_weight_and_each_file_sticks_to_its_mirror() {
    let origins = [
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    ];
    let files = 1000;
    for o in &origins {
        for i in 0..files {
            o.put(&format!("/pub/f{i}"), unstored(i as u8));
        }
    }
    let weights = [1u32, 2, 7];
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &[(&origins[0], 1), (&origins[1], 2), (&origins[2], 7)],
        "",
    );
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];
    for i in 0..files {
        let got = get(addr, &format!("/m/f{i}")).await;
        assert_eq!(got.status, 200, "f{i}");
        assert_eq!(got.bytes(), &pattern(i as u8, 100));
    }
    // Each file reached exactly one mirror: no failover happened.
    let counts: Vec<usize> = origins.iter().map(file_hits).collect();
    assert_eq!(counts.iter().sum::<usize>(), files, "{counts:?}");
    // Each mirror's count is binomial(n, w/Σw): within 5 standard
    // deviations (±48, ±63, ±73 files) of its expectation; a choice that
    // ignored weights (333 each) or took the first mirror fails by far.
    for (i, &w) in weights.iter().enumerate() {
        let p = f64::from(w) / 10.0;
        let expected = files as f64 * p;
        let sd = (files as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (counts[i] as f64 - expected).abs() <= 5.0 * sd,
            "mirror {i} (weight {w}) got {} of {files} files, expected {expected} ± {:.0}: {counts:?}",
            counts[i],
            5.0 * sd
        );
    }
    // The same file again goes to the same mirror, for every file.
    let owner =
        |path: &str| -> Vec<usize> { (0..3).filter(|&o| origins[o].hits(path) > 0).collect() };
    for i in (0..files).step_by(10) {
        let path = format!("/pub/f{i}");
        let before = owner(&path);
        assert_eq!(before.len(), 1, "{path}: {before:?}");
        let got = get(addr, &format!("/m/f{i}")).await;
        assert_eq!(got.status, 200);
        assert_eq!(owner(&path), before, "{path} moved to another mirror");
        assert_eq!(origins[before[0]].hits(&path), 2, "{path}");
    }
    // The admin API shows the weights and their shares.
    let admin = cistern.admin_addr.unwrap();
    let ups = upstreams(admin).await;
    // (Shares equal weights over their sum unless a mirror's latency
    // passed twice the fastest's and 50 ms, which loopback does not.)
    let shares: Vec<f64> = ups.iter().map(|u| u["share"].as_f64().unwrap()).collect();
    for (i, &w) in weights.iter().enumerate() {
        assert_eq!(ups[i]["weight"], w);
    }
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{shares:?}"
    );
    assert!(
        shares[2] > shares[1] && shares[1] > shares[0] * 0.99,
        "{shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_goes_down_is_disabled_probed_and_re_enabled_only_by_probes() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    for o in [&a, &b] {
        o.put("/pub/probe", Resource::new(pattern(0, 10)));
        for i in 0..200u32 {
            o.put(&format!("/pub/f{i}"), unstored(i as u8));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &[(&a, 1), (&b, 1)],
        "    health {\n        probe \"/probe\"\n        interval \"10s\"\n        timeout \"2s\"\n        fail-after 3\n        ok-after 2\n        retry \"30s\"\n    }",
    );
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(dir.path(), &text, &clock).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    let mut next = 0u32;
    let mut fetch_files = async |n: u32| {
        for _ in 0..n {
            let got = get(addr, &format!("/m/f{next}")).await;
            assert_eq!(got.status, 200, "f{next}");
            assert_eq!(got.bytes(), &pattern(next as u8, 100), "f{next}");
            next += 1;
        }
    };

    // Probed at start, both up; both get files.
    wait_probes(&a, 1).await;
    wait_probes(&b, 1).await;
    wait_upstream(admin, 0, "probed ok", |u| u["last_probe"]["ok"] == true).await;
    fetch_files(20).await;
    assert!(
        file_hits(&a) > 0 && file_hits(&b) > 0,
        "{} {}",
        file_hits(&a),
        file_hits(&b)
    );

    // A goes down: 503 for everything. Clients still get every file (its
    // files fail over to B) and after three failures A is disabled
    // without a probe having to notice.
    for i in 0..200u32 {
        a.put(
            &format!("/pub/f{i}"),
            Resource {
                status: StatusCode::SERVICE_UNAVAILABLE,
                ..Resource::new(pattern(9, 10))
            },
        );
    }
    a.put(
        "/pub/probe",
        Resource {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..Resource::new(pattern(9, 10))
        },
    );
    let before = file_hits(&a);
    for _ in 0..60 {
        if file_hits(&a) >= before + 3 {
            break;
        }
        fetch_files(1).await;
    }
    assert_eq!(file_hits(&a), before + 3, "three failures, then no more");
    let ups = upstreams(admin).await;
    assert_eq!(ups[0]["state"], "down", "{:#}", ups[0]);
    assert_eq!(ups[0]["share"], 0.0);
    assert_eq!(ups[0]["last_error"], "status 503 Service Unavailable");
    assert_eq!(ups[1]["share"], 1.0);
    let metrics = String::from_utf8_lossy(get(admin, "/metrics").await.bytes()).into_owned();
    let series = |name: &str, o: &Origin| {
        format!("{name}{{mirror=\"m\",upstream=\"http://{}/pub/\"}}", o.addr)
    };
    assert_eq!(
        sample(&metrics, &series("cistern_mirror_upstream_up", &a)),
        0.0
    );
    assert_eq!(
        sample(&metrics, &series("cistern_mirror_upstream_up", &b)),
        1.0
    );
    assert_eq!(
        sample(&metrics, &series("cistern_mirror_upstream_share", &b)),
        1.0
    );
    assert_eq!(
        sample(&metrics, &series("cistern_mirror_upstream_weight", &a)),
        1.0
    );
    assert!(
        sample(
            &metrics,
            &series("cistern_mirror_upstream_latency_seconds", &b)
        ) > 0.0
    );
    assert_eq!(
        sample(
            &metrics,
            &series("cistern_mirror_upstream_probe_success", &a)
        ),
        1.0
    );

    // Disabled: no client request reaches it, whatever the files.
    let disabled_at = file_hits(&a);
    fetch_files(30).await;
    assert_eq!(
        file_hits(&a),
        disabled_at,
        "a client reached a disabled mirror"
    );

    // Its retry is due 30 s later: a probe, which fails (still 503), so
    // the next retry waits twice as long.
    let probes_before = probes(&a);
    clock.advance(Duration::from_secs(30));
    wait_probes(&a, probes_before + 1).await;
    wait_upstream(admin, 0, "a failed probe", |u| {
        u["last_probe"]["ok"] == false
    })
    .await;
    let ups = upstreams(admin).await;
    assert_eq!(ups[0]["state"], "down");
    assert_eq!(
        ups[0]["last_probe"]["detail"],
        "status 503 Service Unavailable"
    );
    let metrics = String::from_utf8_lossy(get(admin, "/metrics").await.bytes()).into_owned();
    assert_eq!(
        sample(
            &metrics,
            &series("cistern_mirror_upstream_probe_success", &a)
        ),
        0.0
    );

    // It comes back. No timer re-enables it: 59 s on, no probe is due
    // yet, and clients still do not reach it.
    for i in 0..200u32 {
        a.put(&format!("/pub/f{i}"), unstored(i as u8));
    }
    a.put("/pub/probe", Resource::new(pattern(0, 10)));
    let probes_before = probes(&a);
    clock.advance(Duration::from_secs(59));
    fetch_files(20).await;
    assert_eq!(probes(&a), probes_before, "probed before its backoff");
    assert_eq!(file_hits(&a), disabled_at);
    assert_eq!(upstreams(admin).await[0]["state"], "down");

    // At 60 s the probe succeeds: one of ok-after 2, still disabled.
    clock.advance(Duration::from_secs(1));
    wait_probes(&a, probes_before + 1).await;
    wait_upstream(admin, 0, "a good probe", |u| u["last_probe"]["ok"] == true).await;
    assert_eq!(upstreams(admin).await[0]["state"], "down");
    fetch_files(20).await;
    assert_eq!(file_hits(&a), disabled_at, "enabled after one probe");

    // The second good probe, an interval later, re-enables it, and its
    // files come back to it.
    clock.advance(Duration::from_secs(10));
    wait_probes(&a, probes_before + 2).await;
    wait_upstream(admin, 0, "re-enabled", |u| u["state"] == "up").await;
    fetch_files(40).await;
    assert!(file_hits(&a) > disabled_at, "its files did not come back");
    let ups = upstreams(admin).await;
    assert!(ups[0]["share"].as_f64().unwrap() > 0.0, "{:#}", ups[0]);
    assert!(ups[0]["last_probe"]["at"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_on_a_partial_mirror_sends_the_file_to_the_next_and_is_remembered() {
    let origins = [
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    ];
    // Only the last mirror has the f files; every mirror has the g files.
    for i in 0..30u32 {
        origins[2].put(&format!("/pub/f{i}"), unstored(i as u8));
        for o in &origins {
            o.put(&format!("/pub/g{i}"), unstored(100 + i as u8));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &[(&origins[0], 1), (&origins[1], 1), (&origins[2], 1)],
        "",
    );
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    let partial_hits = || {
        origins[..2]
            .iter()
            .map(|o| {
                o.seen()
                    .iter()
                    .filter(|s| s.path.starts_with("/pub/f"))
                    .count()
            })
            .sum::<usize>()
    };
    for i in 0..30u32 {
        let got = get(addr, &format!("/m/f{i}")).await;
        assert_eq!(got.status, 200, "f{i}");
        assert_eq!(got.bytes(), &pattern(i as u8, 100));
    }
    // Some files were first asked of a mirror that lacks them (about
    // two thirds); each such mirror was asked once per file.
    let asked = partial_hits();
    assert!(asked >= 5, "only {asked} 404s: the test shows nothing");
    for o in &origins[..2] {
        let paths: Vec<String> = o.seen().into_iter().map(|s| s.path).collect();
        let distinct: HashSet<&String> = paths.iter().collect();
        assert_eq!(distinct.len(), paths.len(), "asked twice: {paths:?}");
    }
    // Asked again, the files go straight to the mirror that has them.
    for i in 0..30u32 {
        let got = get(addr, &format!("/m/f{i}")).await;
        assert_eq!(got.status, 200, "f{i}");
    }
    assert_eq!(partial_hits(), asked, "a remembered 404 was asked again");
    assert_eq!(origins[2].seen().len(), 60);
    // The 404s disabled nobody: every mirror still gets its g files.
    let ups = upstreams(admin).await;
    for u in &ups {
        assert_eq!(u["state"], "up", "{u:#}");
        assert_eq!(u["failures"], 0, "{u:#}");
    }
    for i in 0..30u32 {
        let got = get(addr, &format!("/m/g{i}")).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.bytes(), &pattern(100 + i as u8, 100));
    }
    for o in &origins {
        let g = o
            .seen()
            .iter()
            .filter(|s| s.path.starts_with("/pub/g"))
            .count();
        assert!(g > 0, "a mirror got none of the g files");
    }
    // A file no mirror has is a 404 only after each said so, once.
    let got = get(addr, "/m/nowhere").await;
    assert_eq!(got.status, 404);
    for o in &origins {
        assert_eq!(o.hits("/pub/nowhere"), 1);
    }
}

/// Which of `origins` a HEAD of `path` (on Cistern) reached: the mirror
/// chosen for that file.
async fn chosen(addr: SocketAddr, path: &str, origins: &[&Origin], upstream_path: &str) -> usize {
    let got = common::request(addr, "HEAD", path, &[]).await;
    assert_eq!(got.status, 200, "HEAD {path}");
    let asked: Vec<usize> = (0..origins.len())
        .filter(|&i| origins[i].hits(upstream_path) > 0)
        .collect();
    assert_eq!(asked.len(), 1, "HEAD {path} reached {asked:?}");
    asked[0]
}

/// Reads a response body until it ends or fails: the bytes that arrived
/// and whether it ended cleanly.
async fn read_until_failure(resp: http::Response<hyper::body::Incoming>) -> (Vec<u8>, bool) {
    use http_body_util::BodyExt;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            None => return (got, true),
            Some(Err(_)) => return (got, false),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Requests for `path` that carried a `Range` header, with it and `If-Range`.
fn ranged(origin: &Origin, path: &str) -> Vec<(String, String)> {
    origin
        .seen()
        .iter()
        .filter(|s| s.path == path && s.method == "GET")
        .filter_map(|s| {
            let h = |n: &str| s.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
            Some((h("range")?, h("if-range").unwrap_or_default()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_whose_mirror_dies_mid_body_continues_on_another_with_range_and_if_range() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let body = pattern(7, 3 << 20);
    let slow = Duration::from_millis(20);
    for o in [&a, &b] {
        // The same file (same length, same strong ETag "v1") on both.
        o.put("/pub/big.iso", Resource::new(body.clone()).slow(slow));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[(&a, 1), (&b, 1)], "");
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];
    let origins = [&a, &b];
    let first = chosen(addr, "/m/big.iso", &origins, "/pub/big.iso").await;
    let (dies, other) = (origins[first], origins[1 - first]);
    // The chosen mirror dies after 1 MiB of its next answer.
    dies.put(
        "/pub/big.iso",
        Resource::new(body.clone()).slow(slow).die_after(1 << 20, 1),
    );

    let resp = common::send(addr, "GET", "/m/big.iso", &[]).await;
    assert_eq!(resp.status(), 200);
    // A second client joins the same fill while it streams (20 ms per
    // 64 KiB: the fill takes about a second).
    let follower = tokio::spawn(async move {
        let resp = common::send(addr, "GET", "/m/big.iso", &[]).await;
        assert_eq!(resp.status(), 200);
        read_until_failure(resp).await
    });
    let (got, clean) = read_until_failure(resp).await;
    assert!(
        clean,
        "the client's transfer failed after {} bytes",
        got.len()
    );
    assert!(
        got == body,
        "the client got other bytes ({} of {})",
        got.len(),
        body.len()
    );
    // The follower saw only a pause too.
    let (got, clean) = follower.await.unwrap();
    assert!(clean && got == body, "the follower got {} bytes", got.len());
    // The other mirror was asked for the rest only, and only if its copy
    // is still "v1"; the dead one was not asked again.
    let asked = ranged(other, "/pub/big.iso");
    assert_eq!(asked.len(), 1, "{asked:?}");
    let from: usize = asked[0]
        .0
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{asked:?}"));
    // From where the fill had got to (what had arrived of the first MiB).
    assert!(from > 0 && from <= 1 << 20, "{asked:?}");
    assert_eq!(asked[0].1, "\"v1\"");
    assert!(ranged(dies, "/pub/big.iso").is_empty());
    // The cut body counted against the mirror that cut it.
    let ups = upstreams(cistern.admin_addr.unwrap()).await;
    assert_eq!(ups[first]["failures"], 1, "{:#}", ups[first]);
    assert_eq!(ups[1 - first]["failures"], 0, "{:#}", ups[1 - first]);
    // The committed replica is the origin's content, byte for byte (and
    // so its SHA-256).
    let again = get(addr, "/m/big.iso").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert!(again.bytes() == &body);
    let files = common::find_files(&dir.path().join("replica"));
    let stored = files
        .iter()
        .find(|f| f.ends_with("/pub/big.iso"))
        .unwrap_or_else(|| panic!("no replica in {files:?}"));
    let on_disk = std::fs::read(dir.path().join("replica").join(stored)).unwrap();
    assert!(on_disk == body, "the replica on disk differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_with_another_version_is_not_spliced_into_a_fill() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let ours = pattern(1, 4 << 20);
    let theirs = pattern(2, 4 << 20);
    a.put("/pub/big.iso", Resource::new(ours.clone()));
    b.put("/pub/big.iso", Resource::new(ours.clone()));
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[(&a, 1), (&b, 1)], "");
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];
    let origins = [&a, &b];
    let first = chosen(addr, "/m/big.iso", &origins, "/pub/big.iso").await;
    let (dies, other) = (origins[first], origins[1 - first]);
    // The chosen mirror dies after every MiB; the other has another
    // version of the file (same length, ETag "v2").
    dies.put(
        "/pub/big.iso",
        Resource::new(ours.clone()).die_after(1 << 20, 100),
    );
    other.put(
        "/pub/big.iso",
        Resource::new(theirs.clone()).header("etag", "\"v2\""),
    );

    let resp = common::send(addr, "GET", "/m/big.iso", &[]).await;
    assert_eq!(resp.status(), 200);
    let (got, clean) = read_until_failure(resp).await;
    // The other mirror was asked, with If-Range "v1", and its whole "v2"
    // answer was refused: the client got only bytes of "v1" and a failed
    // transfer, never a splice.
    assert!(
        !ranged(other, "/pub/big.iso").is_empty(),
        "the other mirror was not tried"
    );
    assert!(
        ranged(other, "/pub/big.iso")
            .iter()
            .all(|(_, ir)| ir == "\"v1\""),
        "{:?}",
        ranged(other, "/pub/big.iso")
    );
    assert!(
        !clean,
        "a transfer of {} bytes ended as if whole",
        got.len()
    );
    // (Readers stop at the failure, so they may not have read all the
    // fill had.) After refusing the other copy the fill went back to the
    // mirror it came from, which only the same "v1" may continue.
    assert!(got.len() < ours.len(), "{}", got.len());
    assert!(
        ranged(dies, "/pub/big.iso")
            .iter()
            .all(|(_, ir)| ir == "\"v1\""),
        "{:?}",
        ranged(dies, "/pub/big.iso")
    );
    assert!(!ranged(dies, "/pub/big.iso").is_empty());
    assert!(
        got[..] == ours[..got.len()],
        "the client got bytes of another version"
    );
    // Nothing was committed; a later request starts over and gets one
    // whole version.
    let files = common::find_files(&dir.path().join("replica"));
    assert!(
        !files.iter().any(|f| f.ends_with("/pub/big.iso")),
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_and_health_settings_change_with_a_reload() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    for o in [&a, &b] {
        o.put("/pub/probe", Resource::new(pattern(0, 10)));
        for i in 0..400u32 {
            o.put(&format!("/pub/f{i}"), unstored(i as u8));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.kdl");
    let text = config(dir.path(), &[(&a, 1), (&b, 1)], "");
    std::fs::write(&path, &text).unwrap();
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    assert_eq!(upstreams(admin).await[1]["weight"], 1);
    assert_eq!(probes(&a), 0, "no probe path, no probes");

    let text = config(
        dir.path(),
        &[(&a, 1), (&b, 9)],
        "    health {\n        probe \"/probe\"\n    }",
    );
    std::fs::write(&path, &text).unwrap();
    cistern.reload().await.expect("reload");
    let ups = upstreams(admin).await;
    assert_eq!(ups[1]["weight"], 9);
    // The new set is probed at once.
    wait_probes(&a, 1).await;
    wait_probes(&b, 1).await;
    for i in 0..400u32 {
        assert_eq!(get(addr, &format!("/m/f{i}")).await.status, 200);
    }
    // 9 in 10 of 400 files to b: 360 ± 5 sd (±30).
    let to_b = file_hits(&b);
    assert_eq!(file_hits(&a) + to_b, 400);
    assert!((330..=390).contains(&to_b), "b got {to_b} of 400");
}

/// `Repr-Digest: sha-256=:…:` of `body` (RFC 9530).
fn repr_digest(body: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let sha = sha2::Sha256::digest(body);
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sha)
    )
}

fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(body))
}

/// The replica file of `path` (below the origin) under `dir`, if any.
fn replica_of(dir: &Path, path: &str) -> Option<Vec<u8>> {
    let root = dir.join("replica");
    common::find_files(&root)
        .iter()
        .find(|f| f.ends_with(path))
        .map(|f| std::fs::read(root.join(f)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_whose_bodies_fail_their_digest_is_disabled_and_nothing_wrong_is_stored() {
    let (good, bad) = (Origin::start().await, Origin::start().await);
    let files = 40u8;
    let real = |i: u8| pattern(i, 20_000);
    for i in 0..files {
        let path = format!("/pub/f{i}");
        let digest = repr_digest(&real(i));
        good.put(&path, Resource::new(real(i)).header("repr-digest", &digest));
        // Same length, a correct-looking digest of the real file, other
        // bytes: what a mirror with bit rot or a broken sync serves.
        bad.put(
            &path,
            Resource::new(pattern(100 + i, 20_000)).header("repr-digest", &digest),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &[(&good, 1), (&bad, 1)],
        "    health {\n        fail-after 2\n    }",
    );
    // Manual time: the disabled mirror's retry never comes due.
    let cistern = start(dir.path(), &text, &Clock::manual(SystemTime::now())).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    let mut failed = Vec::new();
    for i in 0..files {
        let got = get(addr, &format!("/m/f{i}")).await;
        assert_eq!(got.status, 200, "f{i}");
        match &got.body {
            Ok(bytes) => assert!(bytes == &real(i), "f{i}: a whole transfer of wrong bytes"),
            Err(_) => failed.push(i),
        }
    }
    // Each answer of the bad mirror failed its client's transfer (its
    // last byte is held back until the digest is checked) and counted
    // against it, though its heads were fine: after two it is disabled
    // and the other mirror serves every file.
    assert_eq!(failed.len(), 2, "failed transfers: {failed:?}");
    assert_eq!(
        file_hits(&bad),
        2,
        "the bad mirror was asked after it failed twice"
    );
    let ups = upstreams(admin).await;
    assert_eq!(ups[1]["state"], "down", "{:#}", ups[1]);
    assert_eq!(ups[1]["failures"], 2, "{:#}", ups[1]);
    let last = ups[1]["last_error"].as_str().unwrap_or_default();
    assert!(
        last.contains("SHA-256") && last.contains(&bad.addr.to_string()),
        "{last}"
    );
    assert_eq!(ups[0]["state"], "up");
    assert_eq!(ups[0]["failures"], 0);
    // The files that failed come whole from the good mirror now.
    for &i in &failed {
        let got = get(addr, &format!("/m/f{i}")).await;
        assert!(got.bytes() == &real(i), "f{i}");
    }
    assert_eq!(file_hits(&bad), 2);
    // Nothing wrong was stored: every file on disk is the real one.
    for i in 0..files {
        let on_disk = replica_of(dir.path(), &format!("/pub/f{i}"))
            .unwrap_or_else(|| panic!("f{i} not stored"));
        assert!(on_disk == real(i), "f{i} on disk is not the real file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_continues_on_a_mirror_with_its_own_etag_when_both_announce_the_same_digest() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let body = pattern(5, 3 << 20);
    let digest = repr_digest(&body);
    let slow = Duration::from_millis(20);
    // Each mirror's web server makes its own ETag (mtime and size) and
    // its own Last-Modified; the content and its digest are the same.
    let on = |etag: &str, date: &str| {
        Resource::new(body.clone())
            .header("etag", etag)
            .header("last-modified", date)
            .header("repr-digest", &digest)
            .slow(slow)
    };
    a.put(
        "/pub/big.iso",
        on("\"5e0b6f00-300000\"", "Wed, 01 Jan 2020 00:00:00 GMT"),
    );
    b.put(
        "/pub/big.iso",
        on("\"5e0c1a3c-300000\"", "Thu, 02 Jan 2020 01:02:03 GMT"),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[(&a, 1), (&b, 1)], "");
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];
    let origins = [&a, &b];
    let first = chosen(addr, "/m/big.iso", &origins, "/pub/big.iso").await;
    let (dies, other) = (origins[first], origins[1 - first]);
    // The chosen mirror dies after 1 MiB of each answer from now on.
    let (etag, date) = if first == 0 {
        ("\"5e0b6f00-300000\"", "Wed, 01 Jan 2020 00:00:00 GMT")
    } else {
        ("\"5e0c1a3c-300000\"", "Thu, 02 Jan 2020 01:02:03 GMT")
    };
    dies.put("/pub/big.iso", on(etag, date).die_after(1 << 20, 100));

    let resp = common::send(addr, "GET", "/m/big.iso", &[]).await;
    assert_eq!(resp.status(), 200);
    let (got, clean) = read_until_failure(resp).await;
    assert!(clean, "the transfer failed after {} bytes", got.len());
    assert_eq!(sha256_hex(&got), sha256_hex(&body), "the client's bytes");
    // The other mirror was asked for the rest with a Range and no
    // If-Range (its ETag is not the first one's), once.
    let asked = ranged(other, "/pub/big.iso");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].0.starts_with("bytes=") && asked[0].0 != "bytes=0-");
    assert_eq!(asked[0].1, "", "{asked:?}");
    // The committed file is the content the digest names.
    let on_disk = replica_of(dir.path(), "/pub/big.iso").expect("stored");
    assert_eq!(
        sha256_hex(&on_disk),
        sha256_hex(&body),
        "the replica on disk"
    );
    let again = get(addr, "/m/big.iso").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_lies_about_its_digest_fails_the_splice_and_nothing_is_committed() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let body = pattern(5, 3 << 20);
    let digest = repr_digest(&body);
    let real = |etag: &str| {
        Resource::new(body.clone())
            .header("etag", etag)
            .header("repr-digest", &digest)
    };
    // The other mirror serves other bytes under the real file's digest.
    let liar = |etag: &str| {
        Resource::new(pattern(6, 3 << 20))
            .header("etag", etag)
            .header("repr-digest", &digest)
    };
    a.put("/pub/big.iso", real("\"a-1\""));
    b.put("/pub/big.iso", real("\"b-1\""));
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[(&a, 1), (&b, 1)], "");
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    let origins = [&a, &b];
    let first = chosen(addr, "/m/big.iso", &origins, "/pub/big.iso").await;
    let (dies, other) = (origins[first], origins[1 - first]);
    let etags = ["\"a-1\"", "\"b-1\""];
    dies.put("/pub/big.iso", real(etags[first]).die_after(1 << 20, 100));
    other.put("/pub/big.iso", liar(etags[1 - first]));

    let resp = common::send(addr, "GET", "/m/big.iso", &[]).await;
    assert_eq!(resp.status(), 200);
    let (got, clean) = read_until_failure(resp).await;
    // The splice was tried (the digests agree) and the whole was checked
    // against the digest before the commit: a failed transfer, short of
    // its last byte.
    let asked = ranged(other, "/pub/big.iso");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].1, "", "no If-Range: {asked:?}");
    assert!(
        !clean,
        "a transfer of {} bytes ended as if whole",
        got.len()
    );
    assert!(got.len() < body.len());
    assert!(
        replica_of(dir.path(), "/pub/big.iso").is_none(),
        "a spliced file that failed its digest was committed"
    );
    let ups = upstreams(admin).await;
    let last = ups[1 - first]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("SHA-256"), "{:#}", ups[1 - first]);

    // Nothing of it is kept to resume from: the next request starts over
    // and gets the real file whole.
    dies.put("/pub/big.iso", real(etags[first]));
    other.put(
        "/pub/big.iso",
        Resource {
            status: StatusCode::NOT_FOUND,
            ..Resource::new(pattern(0, 10))
        },
    );
    let before = ranged(dies, "/pub/big.iso").len();
    let next = get(addr, "/m/big.iso").await;
    assert_eq!(next.status, 200);
    assert_eq!(sha256_hex(next.bytes()), sha256_hex(&body));
    assert_eq!(
        ranged(dies, "/pub/big.iso").len(),
        before,
        "the next request resumed what the failed fill left"
    );
    let on_disk = replica_of(dir.path(), "/pub/big.iso").expect("stored");
    assert_eq!(sha256_hex(&on_disk), sha256_hex(&body));
}
