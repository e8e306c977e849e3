//! Credentials in a forward-proxied URL (`http://user:pass@host/…`): they go
//! upstream as `Authorization: Basic`, as curl and wget send them, and
//! nowhere else: not in the replica, its metadata, the admin UI and API,
//! nor the log (even with `-v`, which logs headers). A response to such a
//! request is shared only when it says it may be (RFC 9111 §3.5).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{Cistern, Origin, Resource, find_files, free_port, get, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `alice:s3cret` in base64, as it appears in `Authorization: Basic`.
const BASIC: &str = "YWxpY2U6czNjcmV0";
/// Every form in which the credentials must not leak (alice's, and the
/// ones in a URL whose request brings its own `Authorization`).
const SECRETS: [&str; 5] = ["alice", "s3cret", BASIC, "b0b", "0th3r"];

fn config(admin: SocketAddr) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
forward {{
    enabled #true
}}
admin {{
    listen "{admin}"
}}
"#
    )
}

/// An answer read whole from a raw connection.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `GET target` with `headers` on a new connection, as an
/// `http_proxy=` client would (raw: client libraries take the userinfo out
/// of the URL before sending), and reads the answer until the server
/// closes the connection.
async fn raw_get(proxy: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Raw {
    let host = target
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .map(|a| a.rsplit('@').next().unwrap_or(a))
        .unwrap_or("");
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the answer ends within 20 s")
        .expect("read the answer");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(&out)));
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Raw { status, head, body }
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&data[..line_end])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
    panic!("too many chunks");
}

/// Every file under `dir` holding one of the secrets, with the secret.
fn files_with_secrets(dir: &Path) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    for rel in find_files(dir) {
        if rel == "config.kdl" {
            continue;
        }
        let data = std::fs::read(dir.join(&rel)).unwrap_or_default();
        for secret in SECRETS {
            if data
                .windows(secret.len())
                .any(|w| w.eq_ignore_ascii_case(secret.as_bytes()))
            {
                found.push((rel.clone(), secret));
            }
        }
    }
    found
}

fn assert_clean(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text
                .to_ascii_lowercase()
                .contains(&secret.to_ascii_lowercase()),
            "{what} shows {secret:?}:\n{text}"
        );
    }
}

/// Polls until the access log holds `n` lines (they are written when a
/// body ends, a little after the client has it).
async fn access_lines(c: &Cistern, n: usize) -> String {
    c.log_when(&format!("{n} access lines"), |l| {
        l.matches("cistern::access:").count() >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_become_basic_auth_and_are_kept_nowhere() {
    let origin = Origin::start().await;
    // Cacheable for anyone asking without credentials, but not marked
    // public: a shared cache must not store it for an authenticated request.
    let private = pattern(3, 5000);
    origin.put(
        "/private/report.txt",
        Resource::new(private.clone()).header("cache-control", "max-age=60"),
    );
    let public = pattern(4, 3000);
    origin.put(
        "/private/public.txt",
        Resource::new(public.clone()).header("cache-control", "public, max-age=60"),
    );
    origin.put("/private/own.txt", Resource::new(pattern(5, 100)));
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &config(admin), &["-v"]);
    let o = origin.addr;
    let with_creds = |path: &str| format!("http://alice:s3cret@{o}{path}");

    // Not public: both requests go upstream, each with the credentials.
    for n in 1..=2 {
        let got = raw_get(c.addr, &with_creds("/private/report.txt"), &[]).await;
        assert_eq!(got.status, 200, "{}", got.head);
        assert_eq!(got.body, private, "request {n}");
        assert_ne!(got.header("cache-status"), Some("cistern; hit"), "{n}");
        assert_eq!(
            origin.hits("/private/report.txt"),
            n,
            "request {n}: an authenticated answer not marked public must not be shared"
        );
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.path, "/private/report.txt",
            "the request line names the path only"
        );
        let auth = s.headers.get("authorization").map(|v| v.to_str().unwrap());
        assert_eq!(auth, Some(format!("Basic {BASIC}").as_str()), "{s:?}");
        let host = s.headers.get("host").unwrap().to_str().unwrap();
        assert_eq!(host, o.to_string(), "Host carries no userinfo");
        for (name, value) in &s.headers {
            if name != "authorization" {
                assert_clean(&format!("upstream header {name}"), value.to_str().unwrap());
            }
        }
    }

    // Public: stored once, under the URL without credentials, and a hit
    // for the next client, with or without them.
    let got = raw_get(c.addr, &with_creds("/private/public.txt"), &[]).await;
    assert_eq!(
        (got.status, &got.body),
        (200, &public.to_vec()),
        "{}",
        got.head
    );
    let got = raw_get(c.addr, &with_creds("/private/public.txt"), &[]).await;
    assert_eq!(got.body, public);
    assert_eq!(
        got.header("cache-status"),
        Some("cistern; hit"),
        "{}",
        got.head
    );
    let got = get(c.addr, &origin.url("/private/public.txt")).await;
    assert_eq!(got.bytes(), &public);
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(origin.hits("/private/public.txt"), 1);
    let files = find_files(&c.root);
    assert_eq!(files, vec![format!("{o}/private/public.txt")], "{files:?}");

    // A request's own Authorization wins over the URL's userinfo; `-v`
    // logs that header redacted.
    let auth = format!("Basic {BASIC}");
    let got = raw_get(
        c.addr,
        &format!("http://b0b:0th3r@{o}/private/own.txt"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.head);
    let last = origin.seen().pop().unwrap();
    assert_eq!(last.path, "/private/own.txt");
    assert_eq!(last.headers.get("authorization").unwrap(), auth.as_str());

    // The admin names the replica by its clean key; nothing it shows, in
    // HTML or JSON, holds the credentials.
    let dir_path = format!("{o}/private");
    let listing = get(admin, &format!("/api/replica?path={dir_path}")).await;
    assert_eq!(listing.status, 200);
    let listing_text = String::from_utf8_lossy(listing.bytes()).into_owned();
    assert!(
        listing_text.contains(&format!("\"http://{o}/private/public.txt\"")),
        "{listing_text}"
    );
    for path in [
        "/".to_owned(),
        format!("/replica?path={dir_path}"),
        format!("/replica?path={o}"),
        "/replica".to_owned(),
        "/api/status".to_owned(),
        "/api/downloads".to_owned(),
        "/api/mirrors".to_owned(),
        "/api/policies".to_owned(),
        "/api/replica".to_owned(),
        format!("/api/replica?path={o}"),
        format!("/api/replica?path={dir_path}"),
        "/metrics".to_owned(),
    ] {
        let page = get(admin, &path).await;
        assert_eq!(page.status, 200, "{path}");
        assert_clean(
            &format!("admin {path}"),
            &String::from_utf8_lossy(page.bytes()),
        );
    }

    // Six requests, six access lines (with headers: -v), none with a secret.
    let log = access_lines(&c, 6).await;
    assert!(
        log.contains("\"authorization\": [redacted]"),
        "-v logs headers, the secret ones redacted:\n{log}"
    );
    assert!(
        log.contains(&format!("GET http://{o}/private/report.txt ")),
        "the access line names the URL without credentials:\n{log}"
    );
    assert_clean("cistern.log", &log);
    // The replica, the state directory (metadata, index) and the log.
    let leaks = files_with_secrets(dir.path());
    assert!(leaks.is_empty(), "credentials written to disk: {leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_credentials_are_decoded_for_basic_auth() {
    let origin = Origin::start().await;
    origin.put("/p", Resource::new(pattern(6, 10)));
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Cistern::start(dir.path(), &config(admin), &[]);
    // curl -u 'a@b:p:w%' would send `a@b:p:w%`, and so does this URL.
    let target = format!("http://a%40b:p%3aw%25@{}/p", origin.addr);
    let got = raw_get(c.addr, &target, &[]).await;
    assert_eq!(got.status, 200, "{}", got.head);
    let seen = origin.seen();
    let auth = seen[0].headers.get("authorization").unwrap();
    // base64("a@b:p:w%")
    assert_eq!(auth, "Basic YUBiOnA6dyU=");
    let log = access_lines(&c, 1).await;
    assert!(
        log.contains(&format!("GET http://{}/p ", origin.addr)),
        "{log}"
    );
    assert!(!log.contains("a%40b") && !log.contains("p%3aw"), "{log}");
}
