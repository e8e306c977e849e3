//! A mirror with several upstreams: a dead or failing first mirror is
//! skipped, the file still lands under the first mirror's directory, and a
//! mirror that keeps failing is tried last.

mod common;

use std::time::{Duration, SystemTime};

use cistern::clock::Clock;
use common::{Cistern, Origin, Resource, find_files, free_port, get, pattern};

fn two_mirrors(first: &str, second: &Origin) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "debian" {{
    prefix "/debian/"
    upstream "{first}"
    upstream "http://{}/debian/"
}}
"#,
        second.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_mirror_fails_over_to_the_second() {
    let origin = Origin::start().await;
    let body = pattern(1, 300_000);
    origin.put("/debian/pool/hello.deb", Resource::new(body.clone()));
    // Nothing listens there: every connection is refused.
    let dead = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &two_mirrors(&format!("http://{dead}/debian/"), &origin),
        &[],
    );

    let got = get(cistern.addr, "/debian/pool/hello.deb").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &body);
    assert_eq!(origin.hits("/debian/pool/hello.deb"), 1);
    // One replica, named after the first mirror, whichever one served it.
    assert_eq!(
        find_files(&cistern.root),
        vec![format!("{dead}/debian/pool/hello.deb")]
    );
    let again = get(cistern.addr, "/debian/pool/hello.deb").await;
    assert_eq!(again.bytes(), &body);
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/debian/pool/hello.deb"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_answering_5xx_is_skipped_then_disabled() {
    let broken = Origin::start().await;
    let good = Origin::start().await;
    for i in 0..80 {
        let path = format!("/debian/pool/p{i}.deb");
        broken.put(
            &path,
            Resource {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                ..Resource::new(pattern(9, 10))
            },
        );
        good.put(&path, Resource::new(pattern(i, 1000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &two_mirrors(&format!("http://{}/debian/", broken.addr), &good),
        &[],
    );
    let addr = cistern.addr;
    let fetch = |i: u8| async move {
        let got = get(addr, &format!("/debian/pool/p{i}.deb")).await;
        assert_eq!(got.status, 200, "p{i}");
        assert_eq!(got.bytes(), &pattern(i, 1000), "p{i}: the 503 body leaked");
    };
    // The files the broken mirror is chosen for fail over to the good one
    // (about half of them), until three failures in a row disable it.
    let mut i = 0u8;
    while broken.seen().len() < 3 && i < 60 {
        fetch(i).await;
        i += 1;
    }
    assert_eq!(broken.seen().len(), 3, "{:?}", broken.seen());
    // Then every file goes straight to the second.
    for j in i..i + 20 {
        fetch(j).await;
    }
    assert_eq!(broken.seen().len(), 3, "{:?}", broken.seen());
    assert_eq!(good.seen().len(), usize::from(i) + 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mirror_down_is_a_502_that_names_no_upstream() {
    let first = format!("127.0.0.1:{}", free_port());
    let second = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "debian" {{
    prefix "/debian/"
    upstream "http://{first}/debian/"
    upstream "http://{second}/secret-base/"
}}
"#
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let got = get(cistern.addr, "/debian/pool/hello.deb").await;
    assert_eq!(got.status, 502);
    let page = String::from_utf8_lossy(got.bytes()).into_owned();
    for private in [first.as_str(), second.as_str(), "secret-base", "replica"] {
        assert!(
            !page.contains(private),
            "the error page shows {private}: {page}"
        );
    }
    assert!(page.contains("upstream"), "{page}");
    // The operator's log has the details.
    cistern
        .log_when("the failed upstream's address", |log| log.contains(&second))
        .await;
}

/// The paths the origin was asked for, in order.
fn paths(origin: &Origin) -> Vec<String> {
    origin.seen().into_iter().map(|s| s.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_marked_down_gets_another_chance_after_30_seconds_on_the_clock() {
    let broken = Origin::start().await;
    let good = Origin::start().await;
    for i in 0..100u8 {
        let path = format!("/debian/pool/p{i}.deb");
        broken.put(
            &path,
            Resource {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                ..Resource::new(pattern(9, 10))
            },
        );
        good.put(&path, Resource::new(pattern(i, 1000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "debian" {{
    prefix "/debian/"
    upstream "http://{}/debian/"
    upstream "http://{}/debian/"
}}
"#,
        dir.path().join("replica").display(),
        broken.addr,
        good.addr
    );
    let clock = Clock::manual(SystemTime::now());
    let cistern = common::start_on_clock(&text, &dir.path().join("config.kdl"), &clock).await;
    let addr = cistern.addrs[0];
    let fetch = |i: u8| async move {
        let got = get(addr, &format!("/debian/pool/p{i}.deb")).await;
        assert_eq!(got.status, 200, "p{i}");
        assert_eq!(got.bytes(), &pattern(i, 1000), "p{i}");
    };

    // Three 503s in a row disable the first mirror.
    let mut i = 0u8;
    while broken.seen().len() < 3 && i < 60 {
        fetch(i).await;
        i += 1;
    }
    let disabled = paths(&broken);
    assert_eq!(disabled.len(), 3);
    // While it is down, requests go to the second without touching it,
    // however long that takes in real time: only the clock counts.
    clock.advance(Duration::from_secs(29));
    for j in i..i + 10 {
        fetch(j).await;
    }
    i += 10;
    assert_eq!(paths(&broken), disabled, "a mirror marked down was asked");
    // 30 s after it was disabled, the next request tries it first.
    clock.advance(Duration::from_secs(2));
    fetch(i).await;
    let mut expected = disabled.clone();
    expected.push(format!("/debian/pool/p{i}.deb"));
    assert_eq!(
        paths(&broken),
        expected,
        "the first mirror got no second chance"
    );
    // It failed again, so it is down again, now for 60 s.
    clock.advance(Duration::from_secs(59));
    for j in i + 1..i + 11 {
        fetch(j).await;
    }
    assert_eq!(paths(&broken), expected);
    assert_eq!(good.seen().len(), usize::from(i) + 11);
}
