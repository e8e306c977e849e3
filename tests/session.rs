//! A user session like HTTP Replicator's README: start Cistern, fetch
//! through it as `http_proxy`, look at the replica with `find`.

mod common;

use common::{Cistern, Origin, Resource, find_files, get, pattern, request};

fn config(origin: &Origin) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
forward {{
    enabled #true
}}
mirror "debian" {{
    prefix "/debian/"
    upstream "http://{}/debian/"
}}
"#,
        origin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_session_builds_a_browsable_replica() {
    let origin = Origin::start().await;
    let page = pattern(1, 5000);
    origin.put(
        "/index.html",
        Resource::new(page.clone())
            .header("content-type", "text/html")
            .header("cache-control", "max-age=300"),
    );
    origin.put(
        "/pub/file.tar.gz",
        Resource::new(pattern(2, 300_000)).header("cache-control", "max-age=3600"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin), &[]);

    // http_proxy=localhost:PORT wget http://origin/index.html
    let first = get(cistern.addr, &origin.url("/index.html")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.bytes(), &page);
    assert!(
        first.header("cache-status").contains("fwd=miss"),
        "{:?}",
        first.headers
    );
    assert!(first.header("via").contains("cistern"));

    let second = get(cistern.addr, &origin.url("/index.html")).await;
    assert_eq!(second.bytes(), &page);
    assert!(
        second.header("cache-status").contains("hit"),
        "{:?}",
        second.headers
    );
    assert_eq!(
        origin.hits("/index.html"),
        1,
        "the second request must come from the replica"
    );
    let digest = second.header("repr-digest");
    assert!(
        digest.starts_with("sha-256=:"),
        "complete replicas carry Repr-Digest: {digest}"
    );

    let tarball = get(cistern.addr, &origin.url("/pub/file.tar.gz")).await;
    assert_eq!(tarball.bytes().len(), 300_000);

    // `find replica` shows exactly the mirrored files under host:port.
    let host = origin.addr.to_string();
    assert_eq!(
        find_files(&cistern.root),
        vec![
            format!("{host}/index.html"),
            format!("{host}/pub/file.tar.gz")
        ]
    );
    let on_disk = std::fs::read(cistern.root.join(&host).join("pub/file.tar.gz")).unwrap();
    assert_eq!(on_disk, pattern(2, 300_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_path_is_served_from_the_upstream_and_kept_under_its_host() {
    let origin = Origin::start().await;
    let deb = pattern(3, 70_000);
    // No Cache-Control: fresh by the RFC 9111 heuristic (10% of its age).
    origin.put(
        "/debian/pool/main/h/hello/hello_2.10_amd64.deb",
        Resource::new(deb.clone()).header("last-modified", "Wed, 01 Jan 2020 00:00:00 GMT"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin), &[]);

    let got = get(
        cistern.addr,
        "/debian/pool/main/h/hello/hello_2.10_amd64.deb",
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &deb);
    let again = get(
        cistern.addr,
        "/debian/pool/main/h/hello/hello_2.10_amd64.deb",
    )
    .await;
    assert_eq!(again.bytes(), &deb);
    assert_eq!(
        origin.hits("/debian/pool/main/h/hello/hello_2.10_amd64.deb"),
        1
    );
    assert_eq!(
        find_files(&cistern.root),
        vec![format!(
            "{}/debian/pool/main/h/hello/hello_2.10_amd64.deb",
            origin.addr
        )]
    );

    // A path no mirror serves is a clear 404 from Cistern itself.
    let missing = get(cistern.addr, "/nothing/here").await;
    assert_eq!(missing.status, 404);
    // An upstream 404 is passed on, and nothing is stored for it.
    let absent = get(cistern.addr, "/debian/pool/absent.deb").await;
    assert_eq!(absent.status, 404);
    assert_eq!(find_files(&cistern.root).len(), 1);
    // HEAD on a cached file answers from the replica with its length.
    let head = request(
        cistern.addr,
        "HEAD",
        "/debian/pool/main/h/hello/hello_2.10_amd64.deb",
        &[],
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), "70000");
    assert_eq!(head.header("cache-status"), "cistern; hit");
    assert!(head.bytes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_config_it_is_a_forward_proxy_with_the_replica_in_the_current_directory() {
    let origin = Origin::start().await;
    origin.put("/a.txt", Resource::new(pattern(4, 100)));
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let port_s = port.to_string();
    let cistern = Cistern::spawn(
        dir.path(),
        port,
        dir.path().to_owned(),
        &["-p", &port_s],
        &[],
    );
    let got = get(cistern.addr, &origin.url("/a.txt")).await;
    assert_eq!(got.status, 200, "{}", cistern.log());
    let files = find_files(dir.path());
    assert!(
        files.contains(&format!("{}/a.txt", origin.addr)),
        "{files:?}"
    );
    // The access log has one line for the request, with its cache status.
    cistern
        .log_when("the access-log line", |log| {
            log.contains("GET") && log.contains("/a.txt") && log.contains("miss")
        })
        .await;
}
