//! What a reverse proxy in front of real servers is expected to do: Cisterns
//! in series pass each other's requests (loops are told apart by node id,
//! not by product name), upstreams learn the client's address
//! (`X-Forwarded-For`, `Forwarded`), and a site can keep the client's
//! `Host`.

mod common;

use bytes::Bytes;
use common::{Cistern, Origin, Resource, free_port, get};
use http::StatusCode;

/// A mirror `/files/` of `upstream` on `port`, with `extra` at the top
/// level (`{ROOT}` left for [`Cistern::start`] or filled by [`spawn`]).
fn mirror_config(port: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{port}"
store {{
    root "{{ROOT}}"
}}
{extra}
mirror "files" {{
    prefix "/files/"
    upstream "{upstream}"
}}
"#
    )
}

/// Starts a Cistern on a chosen `port` (so that two can point at each
/// other) from `config`.
fn spawn(dir: &std::path::Path, port: u16, config: &str) -> Cistern {
    let root = dir.join("replica");
    let text = config.replace("{ROOT}", &root.display().to_string());
    std::fs::write(dir.join("config.kdl"), text).unwrap();
    Cistern::spawn(dir, port, root, &["--config", "config.kdl"], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cisterns_in_series_serve_and_the_origin_sees_one_request() {
    let origin = Origin::start().await;
    let body = Bytes::from_static(b"through two tiers\n");
    origin.put("/pkg.tar", Resource::new(body.clone()));
    let (back_dir, front_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let back = Cistern::start(
        back_dir.path(),
        &mirror_config("{PORT}", &origin.url("/"), ""),
        &[],
    );
    let front = Cistern::start(
        front_dir.path(),
        &mirror_config(
            "{PORT}",
            &format!("http://{}/files/", back.addr),
            "node-id \"edge-1\"",
        ),
        &[],
    );
    for _ in 0..2 {
        let got = get(front.addr, "/files/pkg.tar").await;
        assert_eq!(got.status, StatusCode::OK, "{:?}", got.bytes());
        assert_eq!(got.bytes(), &body);
        // The front names itself by its configured id.
        let via = got.header("via");
        assert!(via.contains("cistern-edge-1"), "{via}");
    }
    assert_eq!(origin.hits("/pkg.tar"), 1);
    let seen = origin.seen();
    let via: Vec<_> = seen[0].headers.get_all("via").iter().collect();
    // Both hops named themselves, the back by its random id.
    assert_eq!(via.len(), 2, "{via:?}");
    assert_eq!(via[0], "1.1 cistern-edge-1");
    assert!(
        via[1].to_str().unwrap().starts_with("1.1 cistern-"),
        "{via:?}"
    );
    assert_ne!(via[0], via[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_between_two_cisterns_is_refused_with_508() {
    let origin = Origin::start().await;
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_port, b_port) = (free_port(), free_port());
    // A's mirror is B's, B's is A's: only Via can stop the request.
    let a = spawn(
        a_dir.path(),
        a_port,
        &mirror_config(
            &a_port.to_string(),
            &format!("http://127.0.0.1:{b_port}/files/"),
            "",
        ),
    );
    let b = spawn(
        b_dir.path(),
        b_port,
        &mirror_config(
            &b_port.to_string(),
            &format!("http://127.0.0.1:{a_port}/files/"),
            "",
        ),
    );
    let got = get(a.addr, "/files/x").await;
    assert_eq!(got.status, StatusCode::LOOP_DETECTED, "{:?}", got.bytes());
    // A refused its own request the second time round: it came in twice,
    // B once.
    let lines = |l: &str| l.matches("cistern::access:").count();
    let log = a.log_when("two access-log lines", |l| lines(l) >= 2).await;
    assert_eq!(lines(&log), 2, "{log}");
    assert_eq!(
        lines(&b.log_when("one access-log line", |l| lines(l) >= 1).await),
        1
    );
    assert!(origin.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_pointing_at_its_own_cistern_is_refused_with_508() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let c = spawn(
        dir.path(),
        port,
        &mirror_config(
            &port.to_string(),
            &format!("http://127.0.0.1:{port}/files/"),
            "",
        ),
    );
    let got = get(c.addr, "/files/x").await;
    assert_eq!(got.status, StatusCode::LOOP_DETECTED, "{:?}", got.bytes());
}

/// The `X-Forwarded-For` and `Forwarded` lines the origin saw on its
/// request for `path`.
fn forwarded_seen(origin: &Origin, path: &str) -> (Vec<String>, Vec<String>) {
    let seen = origin.seen();
    let req = seen.iter().find(|s| s.path == path).expect("origin saw it");
    let all = |name: &str| {
        req.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    (all("x-forwarded-for"), all("forwarded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_tells_the_origin_the_client_address_and_drops_spoofed_ones() {
    let origin = Origin::start().await;
    for p in ["/a", "/b"] {
        origin.put(p, Resource::new(Bytes::from_static(b"x")));
    }
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &mirror_config("{PORT}", &origin.url("/"), ""),
        &[],
    );
    let got = get(cistern.addr, "/files/a").await;
    assert_eq!(got.status, StatusCode::OK);
    let (xff, fwd) = forwarded_seen(&origin, "/a");
    assert_eq!(xff, ["127.0.0.1"]);
    assert_eq!(fwd, ["for=127.0.0.1"]);
    // Anyone can write these headers: by default they are replaced.
    let spoof = [("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")];
    let got = common::request(cistern.addr, "GET", "/files/b", &spoof).await;
    assert_eq!(got.status, StatusCode::OK);
    let (xff, fwd) = forwarded_seen(&origin, "/b");
    assert_eq!(xff, ["127.0.0.1"]);
    assert_eq!(fwd, ["for=127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_client_keeps_its_list_and_the_forward_proxy_adds_nothing() {
    let origin = Origin::start().await;
    for p in ["/a", "/b"] {
        origin.put(p, Resource::new(Bytes::from_static(b"x")));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = mirror_config("{PORT}", &origin.url("/"), "forward {\n}\n").replace(
        "    prefix \"/files/\"",
        "    prefix \"/files/\"\n    forwarded-for \"append\"",
    );
    let cistern = Cistern::start(dir.path(), &text, &[]);
    let lb = [("x-forwarded-for", "203.0.113.9")];
    let got = common::request(cistern.addr, "GET", "/files/a", &lb).await;
    assert_eq!(got.status, StatusCode::OK);
    let (xff, fwd) = forwarded_seen(&origin, "/a");
    assert_eq!(xff, ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(fwd, ["for=127.0.0.1"]);
    // The forward proxy would tell every web site the LAN behind it.
    let got = get(cistern.addr, &origin.url("/b")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(forwarded_seen(&origin, "/b"), (vec![], vec![]));
}
