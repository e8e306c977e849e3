//! Metalink for the files of a mirror set: the Metalink/HTTP headers
//! (RFC 6249) on answers from a complete replica, following the mirrors'
//! health; `FILE.meta4` (RFC 5854), checked by a real Metalink client
//! (aria2c) that downloads the file from it and verifies its hash.

mod common;
mod tls_common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use cistern::clock::Clock;
use common::{Cistern, Got, Origin, Resource, get, pattern, request};
use http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A mirror "m" on `/m/` over `origins` (each serving `/pub/`), probed
/// every 7 s on `/probe`, one failure or success enough to flip it.
fn config(dir: &Path, origins: &[&Origin]) -> String {
    let mut ups = String::new();
    for o in origins {
        ups.push_str(&format!("    upstream \"http://{}/pub/\"\n", o.addr));
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
{ups}    health {{
        probe "/probe"
        interval "7s"
        fail-after 1
        ok-after 1
        retry "30s"
    }}
}}
"#,
        dir.join("replica").display()
    )
}

async fn start(dir: &Path, text: &str, clock: &Clock) -> cistern::app::Running {
    common::start_on_clock(text, &dir.join("config.kdl"), clock).await
}

/// Polls the admin API until upstream `i` of mirror "m" is in `state`
/// and was probed `probes` times or more (bounded).
async fn wait_state(admin: SocketAddr, i: usize, state: &str, origin: &Origin, probes: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = origin
            .seen()
            .iter()
            .filter(|s| s.path == "/pub/probe")
            .count();
        let got = get(admin, "/api/mirrors").await;
        let v: Value = serde_json::from_slice(got.bytes()).unwrap();
        let up = &v[0]["upstreams"][i];
        if up["state"] == state && seen >= probes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "upstream {i} never {state} ({seen} probes): {up:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `Link` headers of a response, in order.
fn links(got: &Got) -> Vec<String> {
    got.headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The `rel=duplicate` links as (URL, pri), in order.
fn duplicates(got: &Got) -> Vec<(String, u32)> {
    links(got)
        .iter()
        .filter(|l| l.contains("rel=duplicate"))
        .map(|l| {
            let url = l[1..l.find('>').unwrap()].to_owned();
            let pri = l.rsplit("pri=").next().unwrap().parse().unwrap();
            (url, pri)
        })
        .collect()
}

fn probe_ok() -> Resource {
    Resource::new(pattern(0, 10)).header("cache-control", "no-store")
}

fn probe_down() -> Resource {
    Resource {
        status: StatusCode::SERVICE_UNAVAILABLE,
        ..Resource::new(pattern(9, 10))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_replica_links_its_healthy_mirrors_and_its_meta4() {
    let origins = [
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    ];
    let body = pattern(7, 50_000);
    for o in &origins {
        o.put("/pub/probe", probe_ok());
        o.put("/pub/pool/x.deb", Resource::new(body.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[&origins[0], &origins[1], &origins[2]]);
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(dir.path(), &text, &clock).await;
    let (addr, admin) = (cistern.addrs[0], cistern.admin_addr.unwrap());
    for (i, o) in origins.iter().enumerate() {
        wait_state(admin, i, "up", o, 1).await;
    }
    let url = |i: usize| format!("http://{}/pub/pool/x.deb", origins[i].addr);

    // The answer of the fill itself is no complete replica yet.
    let miss = get(addr, "/m/pool/x.deb").await;
    assert_eq!(miss.bytes(), &body);
    assert!(duplicates(&miss).is_empty(), "{:?}", links(&miss));
    let filled_from = (0..3)
        .find(|&i| origins[i].hits("/pub/pool/x.deb") > 0)
        .unwrap();

    let hit = get(addr, "/m/pool/x.deb").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.bytes(), &body);
    assert!(!hit.header("repr-digest").is_empty());
    let dups = duplicates(&hit);
    assert_eq!(dups.len(), 3, "{:?}", links(&hit));
    let pris: Vec<u32> = dups.iter().map(|d| d.1).collect();
    assert_eq!(pris, vec![1, 2, 3]);
    let mut urls: Vec<String> = dups.iter().map(|d| d.0.clone()).collect();
    // First the mirror the set's choice sends this file to.
    assert_eq!(urls[0], url(filled_from));
    urls.sort();
    let mut want: Vec<String> = (0..3).map(url).collect();
    want.sort();
    assert_eq!(urls, want);
    assert!(
        links(&hit).contains(
            &"</m/pool/x.deb.meta4>; rel=describedby; type=\"application/metalink4+xml\"".into()
        ),
        "{:?}",
        links(&hit)
    );
    // A range and a HEAD from the replica carry them too.
    let range = request(addr, "GET", "/m/pool/x.deb", &[("range", "bytes=0-9")]).await;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(duplicates(&range).len(), 3);
    let head = request(addr, "HEAD", "/m/pool/x.deb", &[]).await;
    assert_eq!(duplicates(&head).len(), 3);

    // A mirror that fails its probe leaves the list at once, on the
    // next answer (no waiting for a refresh period).
    let down = (filled_from + 1) % 3;
    origins[down].put("/pub/probe", probe_down());
    clock.advance(Duration::from_secs(7));
    wait_state(admin, down, "down", &origins[down], 2).await;
    let hit = get(addr, "/m/pool/x.deb").await;
    let dups = duplicates(&hit);
    assert_eq!(dups.len(), 2, "{:?}", links(&hit));
    assert!(dups.iter().all(|d| d.0 != url(down)), "{dups:?}");
    assert_eq!(
        dups.iter().map(|d| d.1).collect::<Vec<_>>(),
        vec![1, 2],
        "priorities stay dense"
    );
    // Its probe succeeds again: back in the list.
    origins[down].put("/pub/probe", probe_ok());
    clock.advance(Duration::from_secs(30));
    wait_state(admin, down, "up", &origins[down], 3).await;
    let hit = get(addr, "/m/pool/x.deb").await;
    assert_eq!(duplicates(&hit).len(), 3, "{:?}", links(&hit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta4_describes_a_complete_file_with_its_size_hash_and_mirrors() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let body = pattern(3, 70_000);
    for o in [&a, &b] {
        o.put("/pub/probe", probe_ok());
        o.put("/pub/pool/a&b%20c.deb", Resource::new(body.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[&a, &b]);
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];

    // Not in the replica yet: no document, and the origin is not asked.
    let none = get(addr, "/m/pool/a&b%20c.deb.meta4").await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert!(
        a.seen()
            .iter()
            .chain(b.seen().iter())
            .all(|s| !s.path.contains("meta4"))
    );

    assert_eq!(get(addr, "/m/pool/a&b%20c.deb").await.bytes(), &body);
    let got = get(addr, "/m/pool/a&b%20c.deb.meta4").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("content-type"), "application/metalink4+xml");
    let xml = String::from_utf8(got.bytes().to_vec()).unwrap();
    let sha = hex::encode(Sha256::digest(&body));
    for part in [
        "<metalink xmlns=\"urn:ietf:params:xml:ns:metalink\">".to_owned(),
        "<file name=\"a&amp;b c.deb\">".to_owned(),
        format!("<size>{}</size>", body.len()),
        format!("<hash type=\"sha-256\">{sha}</hash>"),
        format!("<url priority=\"1\">http://{addr}/m/pool/a&amp;b%20c.deb</url>"),
    ] {
        assert!(xml.contains(&part), "no {part} in\n{xml}");
    }
    for o in [&a, &b] {
        let u = format!("http://{}/pub/pool/a&amp;b%20c.deb</url>", o.addr);
        assert!(xml.contains(&u), "no {u} in\n{xml}");
    }
    assert!(xml.contains("<url priority=\"2\">") && xml.contains("<url priority=\"3\">"));
    let head = request(addr, "HEAD", "/m/pool/a&b%20c.deb.meta4", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), xml.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aria2c_downloads_a_file_from_its_meta4_and_verifies_the_hash() {
    let Ok(version) = std::process::Command::new("aria2c")
        .arg("--version")
        .output()
    else {
        return common::skip("aria2c is not installed (Debian package aria2)");
    };
    assert!(version.status.success());
    let a = Origin::start().await;
    let b = Origin::start().await;
    // Big enough that aria2c splits it between its sources.
    let body = pattern(5, 3 << 20);
    for o in [&a, &b] {
        o.put("/pub/probe", probe_ok());
        o.put("/pub/a&b/disk%201.iso", Resource::new(body.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &[&a, &b]);
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, "/m/a&b/disk%201.iso").await.bytes(), &body);

    let out = dir.path().join("download");
    std::fs::create_dir_all(&out).unwrap();
    let meta4 = format!("http://{addr}/m/a&b/disk%201.iso.meta4");
    let run = tokio::process::Command::new("aria2c")
        // Only what the test names: no config file, no proxy from the
        // environment, no netrc; every URL it gets is on loopback.
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .args([
            "--no-conf=true",
            "--no-netrc=true",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--follow-metalink=mem",
            "--check-integrity=true",
            "--split=4",
            "--min-split-size=1M",
            "--max-tries=2",
            "--connect-timeout=5",
            "--timeout=20",
            "--file-allocation=none",
            "--summary-interval=0",
            "--console-log-level=notice",
            "--log-level=info",
        ])
        .arg(format!("--log={}", dir.path().join("aria2.log").display()))
        .arg(format!("--dir={}", out.display()))
        .arg(&meta4)
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("aria2c finished within a minute")
        .expect("run aria2c");
    let log = std::fs::read_to_string(dir.path().join("aria2.log")).unwrap_or_default();
    assert!(
        run.status.success(),
        "aria2c failed: {}\n{}\n{log}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let saved = std::fs::read(out.join("disk 1.iso")).unwrap_or_else(|e| {
        panic!(
            "aria2c saved no file by its name ({e}): {:?}\n{}\n{log}",
            common::find_files(&out),
            String::from_utf8_lossy(&run.stdout)
        )
    });
    assert_eq!(saved.len(), body.len());
    assert!(saved == body, "the downloaded bytes differ");
    // It checked the whole file against the document's SHA-256 (an `&`
    // in a directory exercises the escaping of the URLs it was given).
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("Verification finished successfully"),
        "no hash check by aria2c:\n{stdout}\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metalink_policy_sends_a_redirect_with_a_known_digest_to_the_cached_copy() {
    // Two mirrors of one file and a download redirector (Mirrorbits-like)
    // that sends clients to the second with the file's digest.
    let (m1, m2, redirector) = (
        Origin::start().await,
        Origin::start().await,
        Origin::start().await,
    );
    let iso = pattern(8, 200_000);
    m1.put("/f.iso", Resource::new(iso.clone()));
    m2.put("/f.iso", Resource::new(iso.clone()));
    let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&iso));
    let mut redirect = Resource::new(bytes::Bytes::new())
        .header("location", &m2.url("/f.iso"))
        .header("digest", &format!("SHA-256={b64}"));
    redirect.status = StatusCode::FOUND;
    redirector.put("/get/f.iso", redirect);
    let config = r#"
listen "127.0.0.1:{PORT}"
store { root "{ROOT}"; }
policy "metalink" path="builtin:metalink"
forward { policies "metalink"; }
"#;
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), config, &[]);
    // An http_proxy client fetched the file from the first mirror once.
    assert_eq!(get(cistern.addr, &m1.url("/f.iso")).await.bytes(), &iso);

    // The redirector's answer now names the cached copy, not the mirror
    // the bytes would come from again.
    let answer = get(cistern.addr, &redirector.url("/get/f.iso")).await;
    assert_eq!(answer.status, StatusCode::FOUND, "{}", cistern.log());
    let location = answer.header("location").to_owned();
    assert_eq!(location, m1.url("/f.iso"));
    // The client follows it through the proxy: served from the replica.
    let followed = get(cistern.addr, &location).await;
    assert_eq!(followed.bytes(), &iso);
    assert_eq!(m1.hits("/f.iso"), 1, "no second download");
    assert_eq!(m2.hits("/f.iso"), 0, "the uncached mirror never asked");
    assert_eq!(redirector.hits("/get/f.iso"), 1);

    // A digest nothing in the replica has: the redirect is left alone.
    let other = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"other"));
    let mut unknown = Resource::new(bytes::Bytes::new())
        .header("location", &m2.url("/g.iso"))
        .header("digest", &format!("SHA-256={other}"));
    unknown.status = StatusCode::FOUND;
    redirector.put("/get/g.iso", unknown);
    let answer = get(cistern.addr, &redirector.url("/get/g.iso")).await;
    assert_eq!(answer.header("location"), m2.url("/g.iso"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_set_links_its_best_eight_and_lists_every_mirror_in_the_meta4() {
    let mut origins = Vec::new();
    for _ in 0..10 {
        let o = Origin::start().await;
        o.put("/pub/probe", probe_ok());
        o.put("/pub/f", Resource::new(pattern(1, 1000)));
        origins.push(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&Origin> = origins.iter().collect();
    let cistern = start(dir.path(), &config(dir.path(), &refs), &Clock::default()).await;
    let addr = cistern.addrs[0];
    assert_eq!(get(addr, "/m/f").await.status, StatusCode::OK);
    let hit = get(addr, "/m/f").await;
    let pris: Vec<u32> = duplicates(&hit).iter().map(|d| d.1).collect();
    assert_eq!(pris, (1..=8).collect::<Vec<_>>(), "{:?}", links(&hit));
    let xml = String::from_utf8(get(addr, "/m/f.meta4").await.bytes().to_vec()).unwrap();
    assert_eq!(xml.matches("<url priority=").count(), 11, "{xml}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_answers_carry_no_metalink_links_and_it_has_no_meta4() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let body = pattern(4, 30_000);
    for o in [&a, &b] {
        o.put("/pub/pool/x.deb", Resource::new(body.clone()));
        o.put("/pool/x.deb", Resource::new(body.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = tls_common::Ca::new();
    ca.leaf(&["site.test"]).write(dir.path(), "site");
    let port = common::free_port();
    // A mirror and a site over the same two servers: the mirror's are
    // public mirrors, the site's are its private backends.
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{root}"
}}
mirror "m" {{
    prefix "/m/"
    upstream "http://{a}/pub/"
    upstream "http://{b}/pub/"
}}
site "site.test" {{
    listen "127.0.0.1:{port}"
    tls cert="site.pem" key="site.key"
    upstream "http://{a}/"
    upstream "http://{b}/"
}}
"#,
        root = dir.path().join("replica").display(),
        a = a.addr,
        b = b.addr,
    );
    let cistern = start(dir.path(), &text, &Clock::default()).await;
    let addr = cistern.addrs[0];

    // The mirror's complete replica links both mirrors and its .meta4.
    assert_eq!(get(addr, "/m/pool/x.deb").await.bytes(), &body);
    let hit = get(addr, "/m/pool/x.deb").await;
    assert_eq!(hit.header("cache-status"), "cistern; hit");
    assert_eq!(duplicates(&hit).len(), 2, "{:?}", links(&hit));

    // The site's complete replica links nothing: no backend URL, no
    // .meta4 (which would list them).
    let site: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = tls_common::connect(site, "site.test", ca.client(&[b"http/1.1"]))
        .await
        .expect("connect to the site");
    for round in ["miss", "hit"] {
        let got = c.get("/pool/x.deb").await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{round}");
        assert_eq!(got.body.as_ref().unwrap(), &body, "{round}");
        let link: Vec<_> = got.headers.get_all("link").iter().collect();
        assert!(link.is_empty(), "{round}: {link:?}");
        if round == "hit" {
            assert_eq!(got.headers["cache-status"], "cistern; hit");
            assert!(!got.headers["repr-digest"].is_empty());
        }
    }
    // Nor does the site answer FILE.meta4 itself: the path is the
    // backends' like any other (here a 404 from each, asked in turn).
    let meta4 = c.get("/pool/x.deb.meta4").await.unwrap();
    assert_eq!(meta4.status, StatusCode::NOT_FOUND);
    assert_ne!(
        meta4
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/metalink4+xml")
    );
    assert_eq!(
        (a.hits("/pool/x.deb.meta4"), b.hits("/pool/x.deb.meta4")),
        (1, 1),
        "the site's .meta4 went to its upstreams"
    );
}
