//! RFC 9111 rules where shared caches go wrong, end to end: `Vary: *`.

mod common;

use std::path::Path;
use std::time::SystemTime;

use cistern::app::{self, Running, StartOptions};
use cistern::clock::Clock;
use cistern::config::Config;
use common::{Origin, Resource, get, pattern};

async fn start(upstream: std::net::SocketAddr, dir: &Path, clock: &Clock) -> Running {
    let text = format!(
        r#"
listen "127.0.0.1:0"
store {{
    root "{}"
}}
mirror "site" {{
    prefix "/"
    upstream "http://{upstream}/"
}}
"#,
        dir.join("replica").display(),
    );
    let config = Config::parse(&text, &dir.join("config.kdl")).expect("valid config");
    app::start(
        config,
        StartOptions {
            log_headers: false,
            clock: Some(clock.clone()),
            ..StartOptions::default()
        },
    )
    .await
    .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_passed_through_once_and_never_stored() {
    let origin = Origin::start().await;
    origin.put(
        "/any",
        Resource::new(pattern(1, 300))
            .header("cache-control", "max-age=600")
            .header("vary", "*"),
    );
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(SystemTime::now());
    let cistern = start(origin.addr, dir.path(), &clock).await;
    let addr = cistern.addrs[0];

    let got = get(addr, "/any").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &pattern(1, 300));
    assert_eq!(
        got.header("cache-status"),
        "cistern; fwd=uri-miss; detail=not-storable"
    );
    assert_eq!(
        origin.hits("/any"),
        1,
        "one client request, one upstream request: {:#?}",
        origin.seen()
    );
    assert!(common::find_files(&dir.path().join("replica")).is_empty());
    cistern.shutdown().await;
}
