//! TLS termination for sites: SNI picks the certificate, the Host picks the
//! upstream, HTTP/2 and HTTP/1.1 by ALPN, session resumption, bad material
//! refused with the file named, and certificates replaced on disk served
//! to new connections while old ones carry on.

mod common;
mod tls_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Cistern, Origin, Resource, find_files, free_port, pattern};
use http::Version;
use tls_common::{Ca, connect, eventually};

/// A config with two sites on one TLS listener, each with its own origin.
fn two_sites(tls_port: u16, one: &Origin, two: &Origin, extra: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
site "one.test" {{
    listen "127.0.0.1:{tls_port}"
    tls cert="one.pem" key="one.key"
    upstream "http://{}/"
}}
site "two.test" {{
    listen "127.0.0.1:{tls_port}"
    tls cert="two.pem" key="two.key"
    upstream "http://{}/b/"
}}
{extra}
"#,
        one.addr, two.addr
    )
}

async fn origins() -> (Origin, Origin) {
    let one = Origin::start().await;
    one.put("/a.txt", Resource::new(pattern(1, 3000)));
    let two = Origin::start().await;
    two.put("/b/c.txt", Resource::new(pattern(2, 70_000)));
    (one, two)
}

fn tls_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_host_the_site_over_h2_and_http1() {
    let (o1, o2) = origins().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let one = ca.leaf(&["one.test"]);
    let two = ca.leaf(&["two.test"]);
    one.write(dir.path(), "one");
    two.write(dir.path(), "two");
    let port = free_port();
    let cistern = Cistern::start(dir.path(), &two_sites(port, &o1, &o2, ""), &[]);
    let addr = tls_addr(port);

    for (alpn, version) in [
        (&b"h2"[..], Version::HTTP_2),
        (&b"http/1.1"[..], Version::HTTP_11),
    ] {
        let config = ca.client(&[alpn]);
        let mut c = connect(addr, "one.test", config.clone())
            .await
            .expect("connect one.test");
        assert_eq!(c.peer, one.der, "SNI one.test gets one.test's certificate");
        assert_eq!(c.alpn.as_deref(), Some(alpn));
        let got = c.get("/a.txt").await.unwrap();
        assert_eq!(got.status, 200, "{:?}", got.headers);
        assert_eq!(got.version, version);
        assert_eq!(got.body.unwrap(), pattern(1, 3000));
        // A host no site on this listener serves.
        let other = c.get_host("/a.txt", "nobody.test").await.unwrap();
        assert_eq!(other.status, 421);

        let mut c = connect(addr, "two.test", config)
            .await
            .expect("connect two.test");
        assert_eq!(c.peer, two.der, "SNI two.test gets two.test's certificate");
        let got = c.get("/c.txt").await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.version, version);
        assert_eq!(got.body.unwrap(), pattern(2, 70_000));
    }
    // The second round (HTTP/1.1) came from the replica, which is laid out
    // under each upstream's host:port like any mirror.
    assert_eq!(o1.hits("/a.txt"), 1);
    assert_eq!(o2.hits("/b/c.txt"), 1);
    assert_eq!(find_files(&cistern.root), {
        let mut v = vec![format!("{}/a.txt", o1.addr), format!("{}/b/c.txt", o2.addr)];
        v.sort();
        v
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_fails_the_handshake_unless_there_is_a_default_site() {
    let (o1, o2) = origins().await;
    let ca = Ca::new();
    // The certificate also covers other.test, so only the server can be
    // the one refusing it.
    let one = ca.leaf(&["one.test", "other.test"]);
    let two = ca.leaf(&["two.test"]);
    let client = ca.client(&[b"http/1.1"]);

    let dir = tempfile::tempdir().unwrap();
    one.write(dir.path(), "one");
    two.write(dir.path(), "two");
    let port = free_port();
    let _strict = Cistern::start(dir.path(), &two_sites(port, &o1, &o2, ""), &[]);
    let err = connect(tls_addr(port), "other.test", client.clone())
        .await
        .err();
    assert!(
        err.as_deref().is_some_and(|e| e.contains("handshake")),
        "{err:?}"
    );
    assert!(
        connect(tls_addr(port), "one.test", client.clone())
            .await
            .is_ok()
    );

    let dir = tempfile::tempdir().unwrap();
    one.write(dir.path(), "one");
    two.write(dir.path(), "two");
    let port = free_port();
    let _lenient = Cistern::start(
        dir.path(),
        &two_sites(port, &o1, &o2, "default-site \"one.test\""),
        &[],
    );
    let mut c = connect(tls_addr(port), "other.test", client)
        .await
        .expect("the default site's certificate");
    assert_eq!(c.peer, one.der);
    let got = c.get("/a.txt").await.unwrap();
    assert_eq!(got.status, 200, "the default site serves unknown hosts");
    assert_eq!(got.body.unwrap(), pattern(1, 3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_over_tls13_and_tls12() {
    let (o1, o2) = origins().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    ca.leaf(&["two.test"]).write(dir.path(), "two");
    let port = free_port();
    let _cistern = Cistern::start(dir.path(), &two_sites(port, &o1, &o2, ""), &[]);
    for (versions, name) in [
        (
            &[&rustls::version::TLS13][..],
            rustls::ProtocolVersion::TLSv1_3,
        ),
        (
            &[&rustls::version::TLS12][..],
            rustls::ProtocolVersion::TLSv1_2,
        ),
    ] {
        let config = ca.client_versions(&[b"http/1.1"], versions);
        let mut first = connect(tls_addr(port), "one.test", config.clone())
            .await
            .unwrap();
        assert_eq!(first.version, Some(name));
        assert!(!first.resumed);
        // A round trip, so TLS 1.3 session tickets have been read.
        assert_eq!(first.get("/a.txt").await.unwrap().status, 200);
        let second = connect(tls_addr(port), "one.test", config).await.unwrap();
        assert!(
            second.resumed,
            "{name:?}: the second handshake resumes the first session"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_a_site_over_http11_and_http2() {
    let Ok(version) = tokio::process::Command::new("curl")
        .arg("-V")
        .output()
        .await
    else {
        common::skip("curl is not installed: no curl client check");
        return;
    };
    let features = String::from_utf8_lossy(&version.stdout).into_owned();
    let (o1, o2) = origins().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_file = ca.write(dir.path());
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    ca.leaf(&["two.test"]).write(dir.path(), "two");
    let port = free_port();
    let _cistern = Cistern::start(dir.path(), &two_sites(port, &o1, &o2, ""), &[]);
    let mut flags = vec![("--http1.1", "1.1")];
    if features.contains("HTTP2") {
        flags.push(("--http2", "2"));
    } else {
        eprintln!("this curl has no HTTP/2: checking HTTP/1.1 only");
    }
    for (flag, want) in flags {
        let out_file = dir.path().join(format!("out{want}"));
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail", flag, "--resolve"])
            .arg(format!("two.test:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca_file)
            .args(["-w", "%{http_version}", "-o"])
            .arg(&out_file)
            .arg(format!("https://two.test:{port}/c.txt"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, want, "curl {flag} negotiated HTTP/{stdout}");
        assert_eq!(std::fs::read(&out_file).unwrap(), pattern(2, 70_000));
    }
}

fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["check", "config.kdl"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn bad_material_is_refused_naming_the_file() {
    let ca = Ca::new();
    let good = ca.leaf(&["one.test"]);
    let config = "site \"one.test\" {\n    listen \"127.0.0.1:0\"\n    tls cert=\"one.pem\" key=\"one.key\"\n    upstream \"http://127.0.0.1:9/\"\n}\n";
    let setup = |cert: &str, key: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.kdl"), config).unwrap();
        std::fs::write(dir.path().join("one.pem"), cert).unwrap();
        std::fs::write(dir.path().join("one.key"), key).unwrap();
        dir
    };
    let dir = setup(&good.cert_pem, &good.key_pem);
    let (ok, text) = check(dir.path());
    assert!(ok, "good material passes: {text}");

    let other = ca.leaf(&["one.test"]);
    let expired = ca.leaf_with(&["one.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    });
    let wrong_name = ca.leaf(&["else.test"]);
    let cases: Vec<(&str, String, String, &str, &str)> = vec![
        (
            "mismatched key",
            good.cert_pem.clone(),
            other.key_pem.clone(),
            "one.key",
            "does not match",
        ),
        (
            "expired",
            expired.cert_pem.clone(),
            expired.key_pem.clone(),
            "one.pem",
            "expired",
        ),
        (
            "swapped",
            good.key_pem.clone(),
            good.cert_pem.clone(),
            "one.pem",
            "swapped",
        ),
        (
            "not PEM",
            "hello\n".into(),
            good.key_pem.clone(),
            "one.pem",
            "no PEM certificate",
        ),
        (
            "key not PEM",
            good.cert_pem.clone(),
            "hello\n".into(),
            "one.key",
            "no PEM private key",
        ),
        (
            "wrong name",
            wrong_name.cert_pem.clone(),
            wrong_name.key_pem.clone(),
            "one.pem",
            "else.test, not one.test",
        ),
    ];
    for (what, cert, key, file, reason) in cases {
        let dir = setup(&cert, &key);
        let (ok, text) = check(dir.path());
        assert!(!ok, "{what}: refused");
        let named = dir.path().join(file);
        assert!(
            text.contains(&named.display().to_string()),
            "{what}: names {file}: {text}"
        );
        assert!(text.contains(reason), "{what}: says {reason:?}: {text}");
    }

    // A missing file is a config error at its place in config.kdl.
    let dir = setup(&good.cert_pem, &good.key_pem);
    std::fs::remove_file(dir.path().join("one.key")).unwrap();
    let (ok, text) = check(dir.path());
    assert!(!ok);
    assert!(
        text.contains("one.key") && text.contains("config.kdl:3:"),
        "{text}"
    );

    // And the proxy does not start with bad material.
    let dir = setup(&good.cert_pem, &other.key_pem);
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["--config", "config.kdl", "-p", &free_port().to_string()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_served_to_new_connections_while_old_ones_continue() {
    let (o1, o2) = origins().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let first = ca.leaf(&["one.test"]);
    first.write(dir.path(), "one");
    ca.leaf(&["two.test"]).write(dir.path(), "two");
    let port = free_port();
    let cistern = Cistern::start(dir.path(), &two_sites(port, &o1, &o2, ""), &[]);
    let addr = tls_addr(port);
    let client = ca.client(&[b"h2"]);

    let mut old = connect(addr, "one.test", client.clone()).await.unwrap();
    assert_eq!(old.peer, first.der);
    assert_eq!(old.get("/a.txt").await.unwrap().status, 200);

    let renewed = ca.leaf(&["one.test"]);
    renewed.write(dir.path(), "one");
    eventually(
        "the renewed certificate on a new connection",
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let want = renewed.der.clone();
            async move {
                let c = connect(addr, "one.test", client).await.ok()?;
                (c.peer == want).then_some(())
            }
        },
    )
    .await;
    let again = old
        .get("/a.txt")
        .await
        .expect("the old connection still serves");
    assert_eq!(again.status, 200);
    assert_eq!(again.body.unwrap(), pattern(1, 3000));

    // A broken replacement (a key of another certificate) is refused and
    // the renewed certificate keeps serving.
    let stray = ca.leaf(&["one.test"]);
    tls_common::replace_file(&dir.path().join("one.key"), stray.key_pem.as_bytes());
    eventually(
        "the refused reload in the log",
        Duration::from_secs(20),
        || {
            let log = cistern.log();
            async move { (log.contains("does not match") && log.contains("one.key")).then_some(()) }
        },
    )
    .await;
    let c = connect(addr, "one.test", client)
        .await
        .expect("still serving");
    assert_eq!(c.peer, renewed.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_sends_the_clients_host_to_the_upstream() {
    let (o1, o2) = origins().await;
    o2.put("/b/d.txt", Resource::new(pattern(3, 100)));
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["one.test"]).write(dir.path(), "one");
    ca.leaf(&["two.test"]).write(dir.path(), "two");
    let port = free_port();
    // one.test keeps the client's Host; two.test does not.
    let text = two_sites(port, &o1, &o2, "default-site \"one.test\"").replace(
        "    tls cert=\"one.pem\" key=\"one.key\"\n",
        "    tls cert=\"one.pem\" key=\"one.key\"\n    preserve-host #true\n",
    );
    let _cistern = Cistern::start(dir.path(), &text, &[]);
    let addr = tls_addr(port);
    let host_seen = |o: &Origin, path: &str| {
        let seen = o.seen();
        let req = seen
            .iter()
            .rfind(|s| s.path == path)
            .expect("origin saw it");
        req.headers["host"].to_str().unwrap().to_owned()
    };
    for (alpn, path) in [(&b"h2"[..], "/a.txt"), (&b"http/1.1"[..], "/e.txt")] {
        o1.put(path, Resource::new(pattern(4, 10)));
        let mut c = connect(addr, "one.test", ca.client(&[alpn])).await.unwrap();
        let got = c.get_host(path, &format!("One.Test:{port}")).await.unwrap();
        assert_eq!(got.status, 200, "{:?}", got.headers);
        assert_eq!(host_seen(&o1, path), format!("One.Test:{port}"));
    }
    // Another name answered by one.test as the default site: the origin
    // gets the site's name, never a host the replica was not keyed for.
    o1.put("/f.txt", Resource::new(pattern(5, 10)));
    let mut c = connect(addr, "one.test", ca.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let got = c.get_host("/f.txt", "nobody.test").await.unwrap();
    assert_eq!(got.status, 200, "{:?}", got.headers);
    assert_eq!(host_seen(&o1, "/f.txt"), "one.test");
    let mut c = connect(addr, "two.test", ca.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let got = c.get("/d.txt").await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(host_seen(&o2, "/b/d.txt"), o2.addr.to_string());
}
