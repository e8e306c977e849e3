//! The admin UI in a real browser: headless Chromium loads the pages of a
//! running Cistern with a filled replica and a slow download under way, and
//! the test reads what a person would see: the tree, a file's SHA-256, a
//! download's progress bar, and the bar kept current by the page's script.
//!
//! Chromium comes from Debian (`.ci/install-browser.sh`); without it the
//! tests say so and pass without checking anything. With
//! `CISTERN_SCREENSHOTS=DIR` they also save PNGs of the pages there
//! (`scripts/admin-screenshot.sh` does that).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Cistern, Origin, Resource, free_port, get, pattern, send};
use sha2::{Digest, Sha256};

const CHROMIUM: &str = "/usr/bin/chromium";
const BIG: usize = 16 << 20;

/// Chromium, or why the browser tests cannot run here.
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from(CHROMIUM);
    if path.is_file() {
        Some(path)
    } else {
        // CI installs everything; there a missing browser is a failure.
        assert!(
            std::env::var_os("CISTERN_REQUIRE_ALL_TOOLCHAINS").is_none(),
            "{CHROMIUM} is missing and CISTERN_REQUIRE_ALL_TOOLCHAINS is set"
        );
        eprintln!("SKIPPED: {CHROMIUM} is missing; install it with `bash .ci/install-browser.sh`");
        None
    }
}

/// Runs headless Chromium on `url` with `extra` flags and returns its
/// standard output.
async fn browse(chromium: &Path, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finished within two minutes")
        .expect("chromium runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium failed on {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The DOM of `url` after load, as Chromium serialises it.
async fn dom(chromium: &Path, url: &str, extra: &[&str]) -> String {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.push("--dump-dom".into());
    browse(chromium, url, &args).await
}

/// Saves a screenshot of `url` when `CISTERN_SCREENSHOTS` names a directory.
async fn maybe_screenshot(chromium: &Path, url: &str, name: &str) {
    let Some(dir) = std::env::var_os("CISTERN_SCREENSHOTS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    browse(
        chromium,
        url,
        &[
            format!("--screenshot={}", file.display()),
            "--window-size=1280,900".into(),
        ],
    )
    .await;
    assert!(file.is_file(), "no screenshot at {}", file.display());
    eprintln!("screenshot: {}", file.display());
}

/// The element that starts with `open` and contains `needle`, up to the
/// first `close` after `needle`: e.g. the table row of one file.
fn element<'a>(dom: &'a str, open: &str, needle: &str, close: &str) -> &'a str {
    let at = dom
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not on the page:\n{dom}"));
    let start = if needle.starts_with(open) {
        at
    } else {
        dom[..at]
            .rfind(open)
            .unwrap_or_else(|| panic!("no {open:?} before {needle:?}"))
    };
    let end = at
        + dom[at..]
            .find(close)
            .unwrap_or_else(|| panic!("no {close:?} after {needle:?}"))
        + close.len();
    &dom[start..end]
}

/// The value of `attr="…"` inside `tag`.
fn attr(tag: &str, attr: &str) -> Option<u64> {
    let pat = format!("{attr}=\"");
    let at = tag.find(&pat)? + pat.len();
    tag[at..].split('"').next()?.parse().ok()
}

struct Scene {
    origin: Origin,
    cistern: Cistern,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    /// A client of the slow download; kept so the fill has a reader.
    _client: http::Response<hyper::body::Incoming>,
    packages: bytes::Bytes,
}

/// A Cistern mirror with three files in its replica and a 16 MiB download
/// crawling along at 64 KiB per 200 ms (about 50 s: the pages are looked at
/// while it runs).
async fn scene() -> Scene {
    let origin = Origin::start().await;
    let packages = pattern(7, 30_000);
    origin.put(
        "/debian/dists/bookworm/InRelease",
        Resource::new(pattern(6, 2_000)),
    );
    origin.put(
        "/debian/dists/bookworm/main/Packages.gz",
        Resource::new(packages.clone()),
    );
    origin.put(
        "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
        Resource::new(pattern(8, 50_000)),
    );
    origin.put(
        "/debian/cd/debian-12.iso",
        Resource::new(pattern(9, BIG)).slow(Duration::from_millis(200)),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        "listen \"127.0.0.1:{{PORT}}\"\nstore {{\n    root \"{{ROOT}}\"\n}}\n\
         mirror \"debian\" {{\n    prefix \"/debian/\"\n    upstream \"http://{}/debian/\"\n}}\n\
         admin {{\n    listen \"{admin}\"\n}}\n",
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    for path in [
        "/debian/dists/bookworm/InRelease",
        "/debian/dists/bookworm/main/Packages.gz",
        "/debian/dists/bookworm/main/Packages.gz",
        "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
    ] {
        assert_eq!(get(cistern.addr, path).await.status, 200, "{path}");
    }
    let client = send(cistern.addr, "GET", "/debian/cd/debian-12.iso", &[]).await;
    // Wait until the download shows progress, as a person would.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = get(admin, "/api/downloads").await;
        let list: serde_json::Value = serde_json::from_slice(got.bytes()).unwrap();
        if list[0]["written"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the download never started: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Scene {
        origin,
        cistern,
        admin,
        _dir: dir,
        _client: client,
        packages,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_the_tree_a_digest_and_a_download_in_progress() {
    let Some(chromium) = chromium() else { return };
    let s = scene().await;
    let host = s.origin.addr.to_string();
    let base = format!("http://{}", s.admin);

    // The overview: config generation, the download with its progress bar.
    let page = dom(&chromium, &format!("{base}/"), &[]).await;
    assert!(page.contains("<title>Overview · Cistern</title>"), "{page}");
    let generation = element(&page, "<dd", "id=\"config-generation\"", "</dd>");
    assert!(generation.contains(">1</dd>"), "{generation}");
    assert!(
        !page.contains("id=\"reload-error\""),
        "no reload error shown"
    );
    let row = element(&page, "<tr", "debian-12.iso", "</tr>");
    let bar = element(row, "<progress", "<progress", ">");
    assert_eq!(attr(bar, "max"), Some(BIG as u64), "{row}");
    let value = attr(bar, "value").expect("the bar shows bytes done");
    assert!(value > 0 && value < BIG as u64, "{row}");
    assert!(row.contains("of 16.0 MiB"), "{row}");
    assert!(row.contains("<td class=\"num readers\">1</td>"), "{row}");
    let mirrors = element(&page, "<section", "id=\"mirrors\"", "</section>");
    assert!(
        mirrors.contains(&format!("http://{host}/debian/")),
        "{mirrors}"
    );
    assert!(
        mirrors.contains("<span class=\"badge up\">up</span>"),
        "{mirrors}"
    );
    maybe_screenshot(&chromium, &format!("{base}/"), "admin-overview.png").await;

    // The partial file in its directory, with a progress bar too.
    let cd = dom(
        &chromium,
        &format!("{base}/replica?path={host}/debian/cd"),
        &[],
    )
    .await;
    let partial = element(&cd, "<tr", ">debian-12.iso</td>", "</tr>");
    assert!(partial.contains("badge partial"), "{partial}");
    assert_eq!(
        attr(element(partial, "<progress", "<progress", ">"), "max"),
        Some(BIG as u64)
    );
    // The tree, from the root down to a file and its digest.
    let root = dom(&chromium, &format!("{base}/replica"), &[]).await;
    let hostdir = element(&root, "<tr", &format!(">{host}/</a>"), "</tr>");
    assert!(hostdir.contains("3 files"), "{hostdir}");
    let debian = dom(
        &chromium,
        &format!("{base}/replica?path={host}/debian"),
        &[],
    )
    .await;
    for dir in ["cd/", "dists/", "pool/"] {
        assert!(
            debian.contains(&format!(">{dir}</a>")),
            "{dir} listed:\n{debian}"
        );
    }
    let cd = element(&debian, "<tr", ">cd/</a>", "</tr>");
    assert!(cd.contains("1 downloading"), "{cd}");
    let main = dom(
        &chromium,
        &format!("{base}/replica?path={host}/debian/dists/bookworm/main"),
        &[],
    )
    .await;
    let crumbs = element(&main, "<nav", "id=\"crumbs\"", "</nav>");
    assert!(crumbs.contains(">bookworm</a>"), "{crumbs}");
    let file = element(&main, "<tr", ">Packages.gz</td>", "</tr>");
    let digest = hex::encode(Sha256::digest(&s.packages));
    assert!(
        file.contains(&format!("<code class=\"sha256\">{digest}</code>")),
        "{file}"
    );
    assert!(file.contains("29.3 KiB"), "{file}");
    assert!(file.contains("<td class=\"num hits\">1</td>"), "{file}");
    assert!(
        file.contains("<span class=\"badge complete\">complete</span>"),
        "{file}"
    );
    maybe_screenshot(
        &chromium,
        &format!("{base}/replica?path={host}/debian/dists/bookworm/main"),
        "admin-replica.png",
    )
    .await;

    drop(s.cistern);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_script_keeps_the_progress_bar_moving() {
    let Some(chromium) = chromium() else { return };
    let s = scene().await;
    let first = {
        let got = get(s.admin, "/api/downloads").await;
        let list: serde_json::Value = serde_json::from_slice(got.bytes()).unwrap();
        list[0]["written"].as_u64().unwrap()
    };
    // Let the page's timers run: the script polls /api/downloads every two
    // seconds and rebuilds the table from it.
    let page = dom(
        &chromium,
        &format!("http://{}/", s.admin),
        &[
            "--virtual-time-budget=5000",
            "--run-all-compositor-stages-before-draw",
        ],
    )
    .await;
    let body = element(&page, "<tbody", "id=\"downloads-body\"", ">");
    assert!(
        body.contains("data-updated="),
        "the script refreshed the table: {body}"
    );
    let row = element(&page, "<tr", "debian-12.iso", "</tr>");
    let bar = element(row, "<progress", "<progress", ">");
    assert_eq!(attr(bar, "max"), Some(BIG as u64), "{row}");
    let value = attr(bar, "value").expect("the bar shows bytes done");
    assert!(
        value >= first,
        "progress went from {first} to {value}: {row}"
    );
    assert!(row.contains("/s</td>"), "{row}");
    drop(s.cistern);
}
