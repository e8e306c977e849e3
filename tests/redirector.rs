//! Redirect mode (`mirror "NAME" mode="redirect"`), against the real
//! binary with in-process origins as the mirrors: a 302 to the weighted,
//! sticky choice with no upstream request on the way, a disabled mirror
//! never chosen, JSON by `Accept` and by `?json`, the `?mirrorlist` page,
//! files that change in place proxied and cached, a partial mirror's 404
//! learnt by a background check, and the redirect counters in the admin
//! API, page and `/metrics`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Cistern, Origin, Resource, free_port, get, pattern, request};
use http::StatusCode;
use serde_json::Value;

/// A Cistern whose mirror "vlc" redirects to `mirrors` (origin, weight)
/// below their `/pub/`, with `extra` nodes in the block and `more` after
/// it; plus an admin listener.
struct Redirector {
    cistern: Cistern,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

fn start(mirrors: &[(String, u32)], extra: &str, more: &str) -> Redirector {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let mut ups = String::new();
    for (base, w) in mirrors {
        ups.push_str(&format!("    upstream \"{base}\" weight={w}\n"));
    }
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
admin {{
    listen "127.0.0.1:{admin_port}"
}}
mirror "vlc" mode="redirect" {{
{ups}{extra}
}}
{more}
"#
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    Redirector {
        cistern,
        admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
        _dir: dir,
    }
}

fn base(o: &Origin) -> String {
    format!("http://{}/pub/", o.addr)
}

/// The base of a mirror nobody listens on (a port bound once, then let go).
fn dead_base() -> String {
    format!("http://127.0.0.1:{}/pub/", free_port())
}

async fn api(admin: SocketAddr, path: &str) -> Value {
    // The proxy listener is up once Cistern::start returns; the admin one
    // may follow a moment later.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the admin listener never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = get(admin, path).await;
    assert_eq!(got.status, StatusCode::OK, "{path}");
    serde_json::from_slice(got.bytes()).expect("JSON")
}

/// Whether everything `origin` saw is a background check (a `HEAD` of a
/// file below `/pub/`) or a probe, at most one check per file.
fn only_checks(origin: &Origin) -> bool {
    let seen = origin.seen();
    let checks: Vec<&str> = seen
        .iter()
        .filter(|s| s.path != "/pub/probe")
        .map(|s| s.path.as_str())
        .collect();
    let distinct: std::collections::HashSet<&&str> = checks.iter().collect();
    seen.iter()
        .all(|s| s.path == "/pub/probe" || (s.method == "HEAD" && s.path.starts_with("/pub/")))
        && distinct.len() == checks.len()
}

/// HEADs of `path` that `origin` saw.
fn heads(origin: &Origin, path: &str) -> usize {
    seen_as(origin, "HEAD", path)
}

/// GETs of `path` that `origin` saw.
fn gets(origin: &Origin, path: &str) -> usize {
    seen_as(origin, "GET", path)
}

fn seen_as(origin: &Origin, method: &str, path: &str) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

async fn json(proxy: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Value {
    let got = request(proxy, "GET", target, headers).await;
    assert_eq!(got.status, StatusCode::OK, "{target}");
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(got.header("vary"), "accept");
    serde_json::from_slice(got.bytes()).expect("JSON")
}

#[tokio::test]
async fn files_get_a_302_to_their_sticky_weighted_mirror_and_no_upstream_request() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    // The same upstreams as a proxy-mode mirror: it fetches each file
    // from the mirror the redirect names.
    let proxy_mode = format!(
        "mirror \"p\" {{\n    upstream \"{}\" weight=1\n    upstream \"{}\" weight=3\n}}\n",
        base(&a),
        base(&b)
    );
    let r = start(&[(base(&a), 1), (base(&b), 3)], "", &proxy_mode);
    let mut to: HashMap<String, usize> = HashMap::new();
    let mut chosen = Vec::new();
    let n = 200;
    // Every mirror has every file (the background checks find them).
    for i in 0..n {
        for o in [&a, &b] {
            o.put(
                &format!("/pub/3.0/vlc-{i}.tar.xz"),
                Resource::new(pattern(i as u8, 100)),
            );
        }
    }
    for i in 0..n {
        let target = format!("/vlc/3.0/vlc-{i}.tar.xz");
        let got = get(r.cistern.addr, &target).await;
        assert_eq!(got.status, StatusCode::FOUND, "{target}");
        let location = got.header("location").to_owned();
        let mirror = [base(&a), base(&b)]
            .into_iter()
            .find(|m| location.starts_with(m.as_str()))
            .unwrap_or_else(|| panic!("{location} is on no mirror"));
        assert_eq!(location, format!("{mirror}3.0/vlc-{i}.tar.xz"));
        assert_eq!(got.header("cache-control"), "no-store");
        assert_eq!(got.header("vary"), "accept");
        // A tiny body for clients that show it, naming the same URL.
        assert_eq!(got.header("content-type"), "text/plain; charset=utf-8");
        assert_eq!(
            got.body.as_deref(),
            Ok(format!("Found: {location}\n").as_bytes())
        );
        *to.entry(mirror.clone()).or_default() += 1;
        chosen.push(mirror);
        // The same file goes to the same mirror, HEAD as GET.
        let again = request(r.cistern.addr, "HEAD", &target, &[]).await;
        assert_eq!(again.status, StatusCode::FOUND);
        assert_eq!(again.header("location"), location);
    }
    // Weight 3 of 4: 150 of 200 expected, σ ≈ 6.
    let to_b = to.get(&base(&b)).copied().unwrap_or(0);
    assert!((125..=175).contains(&to_b), "{to:?}");
    // No upstream request on the way: what the mirrors saw are only the
    // background checks that follow a redirect, one per file at most,
    // each on the mirror the file was sent to.
    assert!(
        only_checks(&a) && only_checks(&b),
        "{:?} {:?}",
        a.seen(),
        b.seen()
    );
    for (i, mirror) in chosen.iter().enumerate() {
        let path = format!("/pub/3.0/vlc-{i}.tar.xz");
        let other = if *mirror == base(&a) { &b } else { &a };
        assert_eq!(heads(other, &path), 0, "{path} checked on another mirror");
    }
    for (i, mirror) in chosen.iter().enumerate().take(20) {
        let path = format!("/pub/3.0/vlc-{i}.tar.xz");
        let got = get(r.cistern.addr, &format!("/p/3.0/vlc-{i}.tar.xz")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(gets(&a, &path) + gets(&b, &path), 1);
        let fetched_from = if gets(&a, &path) == 1 {
            base(&a)
        } else {
            base(&b)
        };
        assert_eq!(&fetched_from, mirror, "{path}: the proxy's choice");
    }
}

#[tokio::test]
async fn a_disabled_mirror_is_never_chosen_and_none_left_is_a_503() {
    let a = Origin::start().await;
    a.put("/pub/probe", Resource::new(pattern(1, 10)));
    for i in 0..50 {
        a.put(&format!("/pub/f{i}.iso"), Resource::new(pattern(i, 10)));
    }
    let dead = dead_base();
    let health = r#"    health {
        probe "probe"
        interval "100ms"
        timeout "1s"
        fail-after 1
    }
"#;
    let gone = format!(
        "mirror \"gone\" mode=\"redirect\" {{\n    upstream \"{}\"\n{health}}}\n",
        dead_base()
    );
    // The dead mirror weighs far more: only its being down keeps it out.
    let r = start(&[(base(&a), 1), (dead.clone(), 100)], health, &gone);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mirrors = api(r.admin, "/api/mirrors").await;
        let states: Vec<&str> = mirrors
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["upstreams"].as_array().unwrap())
            .map(|u| u["state"].as_str().unwrap())
            .collect();
        if states.iter().filter(|s| **s == "down").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never disabled: {mirrors:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..50 {
        let got = get(r.cistern.addr, &format!("/vlc/f{i}.iso")).await;
        assert_eq!(got.status, StatusCode::FOUND);
        assert!(got.header("location").starts_with(&base(&a)), "{got:?}");
    }
    let choice = json(r.cistern.addr, "/vlc/f1.iso?json", &[]).await;
    assert_eq!(choice["alternatives"][0]["upstream"], dead.as_str());
    assert_eq!(choice["alternatives"][0]["state"], "down");
    assert_eq!(choice["alternatives"][0]["share"], 0.0);

    let got = get(r.cistern.addr, "/gone/f1.iso").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
    let retry: u64 = got.header("retry-after").parse().expect("Retry-After");
    assert!((1..=30).contains(&retry), "{retry}");
    let choice = json(r.cistern.addr, "/gone/f1.iso?json", &[]).await;
    assert!(choice["chosen"].is_null(), "{choice:#}");
    assert!(only_checks(&a), "{:?}", a.seen());
}

#[tokio::test]
async fn json_by_accept_or_query_and_an_escaped_mirror_list() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let r = start(&[(base(&a), 2), (base(&b), 1)], "", "");
    let target = "/vlc/3.0/vlc.tar.xz";
    for o in [&a, &b] {
        o.put("/pub/3.0/vlc.tar.xz", Resource::new(pattern(1, 10)));
    }
    let location = get(r.cistern.addr, target)
        .await
        .header("location")
        .to_owned();
    let by_accept = json(
        r.cistern.addr,
        target,
        &[("accept", "text/html;q=0.5, application/json")],
    )
    .await;
    let by_query = json(r.cistern.addr, &format!("{target}?json"), &[]).await;
    assert_eq!(by_accept, by_query);
    assert_eq!(by_accept["mirror"], "vlc");
    assert_eq!(by_accept["file"], target);
    assert_eq!(by_accept["chosen"]["url"], location.as_str());
    assert_eq!(by_accept["chosen"]["state"], "up");
    let alt = &by_accept["alternatives"].as_array().unwrap()[..];
    assert_eq!(alt.len(), 1);
    assert!(location.starts_with(by_accept["chosen"]["upstream"].as_str().unwrap()));
    let (chosen_w, alt_w) = (
        by_accept["chosen"]["weight"].as_u64().unwrap(),
        alt[0]["weight"].as_u64().unwrap(),
    );
    assert_eq!(chosen_w + alt_w, 3);
    let share = by_accept["chosen"]["share"].as_f64().unwrap() + alt[0]["share"].as_f64().unwrap();
    assert!((share - 1.0).abs() < 1e-9, "{by_accept:#}");
    // A browser's Accept is no JSON request.
    let browser = request(
        r.cistern.addr,
        "GET",
        target,
        &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")],
    )
    .await;
    assert_eq!(browser.status, StatusCode::FOUND);

    let list = get(
        r.cistern.addr,
        "/vlc/%3Cscript%3Ealert(1)%3C/script%3E.iso?mirrorlist",
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.header("content-type"), "text/html; charset=utf-8");
    let page = std::str::from_utf8(list.bytes()).unwrap();
    assert!(!page.contains("<script>"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;.iso"),
        "{page}"
    );
    for m in [base(&a), base(&b)] {
        assert!(
            page.contains(&format!(
                "href=\"{m}%3Cscript%3Ealert(1)%3C/script%3E.iso\""
            )),
            "{m} in {page}"
        );
    }
    assert!(only_checks(&a) && only_checks(&b));
}

#[tokio::test]
async fn files_that_change_in_place_are_proxied_and_cached() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let release = pattern(7, 3000);
    let sums = pattern(8, 64);
    for o in [&a, &b] {
        o.put(
            "/pub/dists/stable/InRelease",
            Resource::new(release.clone()).header("cache-control", "max-age=300"),
        );
        o.put(
            "/pub/3.0/vlc.tar.xz.sha256",
            Resource::new(sums.clone()).header("cache-control", "max-age=300"),
        );
    }
    let r = start(
        &[(base(&a), 1), (base(&b), 1)],
        "    serve-locally \"*.sha256\"\n",
        "",
    );
    for (path, body) in [
        ("/vlc/dists/stable/InRelease", &release),
        ("/vlc/3.0/vlc.tar.xz.sha256", &sums),
    ] {
        for _ in 0..2 {
            let got = get(r.cistern.addr, path).await;
            assert_eq!(got.status, StatusCode::OK, "{path}: {got:?}");
            assert_eq!(got.bytes(), body, "{path}");
            assert!(got.header("location").is_empty());
        }
        let origin_path = path.replacen("/vlc/", "/pub/", 1);
        assert_eq!(
            a.hits(&origin_path) + b.hits(&origin_path),
            1,
            "{path}: one upstream request for two clients"
        );
    }
}

#[tokio::test]
async fn redirects_are_counted_per_file_mirror_and_day() {
    let a = Origin::start().await;
    for file in ["hot.iso", "cold.iso"] {
        a.put(&format!("/pub/{file}"), Resource::new(pattern(1, 10)));
    }
    let r = start(&[(base(&a), 1)], "", "");
    for target in [
        "/vlc/hot.iso",
        "/vlc/hot.iso",
        "/vlc/hot.iso",
        "/vlc/cold.iso",
    ] {
        assert_eq!(get(r.cistern.addr, target).await.status, StatusCode::FOUND);
    }
    // JSON and mirror lists are no redirects.
    json(r.cistern.addr, "/vlc/hot.iso?json", &[]).await;
    let days = api(r.admin, "/api/redirects").await;
    let today = &days["days"][0];
    assert_eq!(today["date"].as_str().unwrap().len(), 10, "{days:#}");
    let vlc = &today["mirrors"][0];
    assert_eq!(vlc["mirror"], "vlc");
    assert_eq!(vlc["redirects"], 4, "{days:#}");
    assert_eq!(vlc["upstreams"][0]["upstream"], base(&a).as_str());
    assert_eq!(vlc["upstreams"][0]["redirects"], 4);
    assert_eq!(vlc["files"][0]["file"], "hot.iso");
    assert_eq!(vlc["files"][0]["redirects"], 3);
    assert_eq!(vlc["files"][0]["upstreams"][0]["redirects"], 3);
    assert_eq!(vlc["files"][1]["file"], "cold.iso");
    assert_eq!(days["files_per_day"], 1000);

    let metrics = get(r.admin, "/metrics").await;
    let text = std::str::from_utf8(metrics.bytes()).unwrap();
    let series = format!(
        "cistern_mirror_redirects_total{{mirror=\"vlc\",upstream=\"{}\"}} 4",
        base(&a)
    );
    assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");

    let page = get(r.admin, "/").await;
    let html = std::str::from_utf8(page.bytes()).unwrap();
    assert!(html.contains("id=\"redirects\""), "{html}");
    assert!(html.contains("hot.iso"), "{html}");
    assert!(
        html.contains("vlc <span class=\"badge\">redirect</span>"),
        "{html}"
    );
    let mirrors = api(r.admin, "/api/mirrors").await;
    assert_eq!(mirrors[0]["mode"], "redirect");
}

#[tokio::test]
async fn a_partial_mirrors_404_is_learnt_in_the_background_and_the_next_client_goes_elsewhere() {
    let partial = Origin::start().await;
    let full = Origin::start().await;
    let files = 12;
    for i in 0..files {
        full.put(
            &format!("/pub/iso/f{i}.iso"),
            Resource::new(pattern(i as u8, 100)),
        );
    }
    let r = start(&[(base(&partial), 1), (base(&full), 1)], "", "");
    let addr = r.cistern.addr;
    let location = |got: &common::Got| got.header("location").to_owned();
    // The first clients are sent where the choice says: about half to
    // the partial mirror, which has none of the files. Nothing is known
    // of it yet, and no client's answer waits for a mirror.
    let mut missing = Vec::new();
    for i in 0..files {
        let got = get(addr, &format!("/vlc/iso/f{i}.iso")).await;
        assert_eq!(got.status, StatusCode::FOUND);
        if location(&got).starts_with(&base(&partial)) {
            missing.push(i);
        }
    }
    assert!(
        missing.len() >= 2 && missing.len() < files,
        "{missing:?}: the test shows nothing"
    );
    // Each redirect was followed by one HEAD of the file on its mirror;
    // the partial mirror's 404s are remembered, and the next client for
    // each of those files goes to the mirror that has it.
    for &i in &missing {
        let target = format!("/vlc/iso/f{i}.iso");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = get(addr, &target).await;
            assert_eq!(got.status, StatusCode::FOUND);
            if location(&got) == format!("{}iso/f{i}.iso", base(&full)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{target} still sent to the partial mirror ({} HEADs there)",
                heads(&partial, &format!("/pub/iso/f{i}.iso"))
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(heads(&partial, &format!("/pub/iso/f{i}.iso")), 1);
        let choice = json(addr, &format!("{target}?json"), &[]).await;
        assert_eq!(choice["chosen"]["upstream"], base(&full).as_str());
        assert_eq!(choice["alternatives"][0]["state"], "missing", "{choice:#}");
    }
    // The files the full mirror has stay there, checked once each
    // however many clients ask; the partial mirror is not disabled for
    // its 404s.
    for i in 0..files {
        let got = get(addr, &format!("/vlc/iso/f{i}.iso")).await;
        assert!(location(&got).starts_with(&base(&full)), "f{i}: {got:?}");
    }
    assert!(only_checks(&full) && only_checks(&partial));
    let mirrors = api(r.admin, "/api/mirrors").await;
    for u in mirrors[0]["upstreams"].as_array().unwrap() {
        assert_eq!(u["state"], "up", "{u:#}");
    }
}
