//! The built-in policies (`policies/`), loaded from the binary as
//! `builtin:NAME` and run on real request and response views.

mod policy_common;

use std::time::Duration;

use base64::Engine as _;
use cistern::config::PolicySource;
use cistern::policy::{ReplicaState, RequestOutcome, ResponseDecision, ResponseView};
use http::{HeaderMap, StatusCode};
use policy_common::{TestHost, decl, engine, header, request};
use sha2::{Digest, Sha256};

fn builtin(name: &str) -> PolicySource {
    PolicySource::Builtin(name.into())
}

fn response(status: u16, headers: &[(&str, &str)]) -> ResponseView {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    ResponseView {
        status: StatusCode::from_u16(status).unwrap(),
        headers: map,
    }
}

#[test]
fn the_binary_carries_the_builtins() {
    let mut names = cistern::policy::builtin_names();
    names.sort();
    assert_eq!(
        names,
        ["cargo", "distro", "metalink", "npm", "pypi", "store-id"]
    );
}

#[test]
fn distro_marks_packages_immutable_and_indexes_revalidate() {
    let mut d = decl("distro", builtin("distro"));
    d.params = vec![("immutable-suffix".into(), ".iso".into())];
    let set = engine().load(&[d]).unwrap();
    let chain = set.chain(&["distro".into()]).unwrap();
    let host = TestHost::default().shared();
    let decide = |url: &str, status: u16| {
        let mut req = request(url, &[]);
        chain.on_response(&host, &mut req, &mut response(status, &[]))
    };
    let immutable = ResponseDecision {
        immutable: true,
        ..Default::default()
    };
    let revalidate = ResponseDecision {
        ttl: Some(Duration::ZERO),
        ..Default::default()
    };
    for url in [
        "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/0f3a",
        "http://mirror.test/fedora/repodata/0a1b2c-primary.xml.gz",
        "http://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/musl-1.2.5-r0.apk",
        "http://mirror.test/os/x.rpm",
        "http://mirror.test/images/debian-12.iso",
    ] {
        assert_eq!(decide(url, 200), immutable, "{url}");
    }
    for url in [
        "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "http://deb.debian.org/debian/dists/bookworm/Release.gpg",
        "http://deb.debian.org/debian/dists/bookworm/main/binary-amd64/Packages.xz",
        "http://mirror.test/fedora/repodata/repomd.xml",
        "http://dl-cdn.alpinelinux.org/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
        "http://mirror.test/archlinux/core/os/x86_64/core.db",
    ] {
        assert_eq!(decide(url, 200), revalidate, "{url}");
    }
    // A partial or error response is not a version to keep forever.
    assert_eq!(
        decide("http://mirror.test/x.deb", 404),
        ResponseDecision::default()
    );
    assert_eq!(
        decide("http://mirror.test/index.html", 200),
        ResponseDecision::default()
    );
}

#[test]
fn store_id_collapses_mirrors_into_one_key() {
    let mut d = decl("store-id", builtin("store-id"));
    d.params = vec![
        (
            "rule".into(),
            "http://*/debian/pool/* http://debian.cistern/pool/$2".into(),
        ),
        (
            "rule".into(),
            "https://*.example.net/files/* http://files.cistern/$2".into(),
        ),
    ];
    let set = engine().load(&[d]).unwrap();
    let chain = set.chain(&["store-id".into()]).unwrap();
    let host = TestHost::default().shared();
    let key = |url: &str| {
        let mut req = request(url, &[]);
        assert!(matches!(
            chain.on_request(&host, &mut req),
            RequestOutcome::Continue
        ));
        req.cache_key
    };
    let one = Some("http://debian.cistern/pool/main/h/hello.deb".to_owned());
    assert_eq!(
        key("http://deb.debian.org/debian/pool/main/h/hello.deb"),
        one
    );
    assert_eq!(
        key("http://ftp.fr.debian.org/debian/pool/main/h/hello.deb"),
        one
    );
    assert_eq!(
        key("https://eu3.example.net/files/a/b.tar"),
        Some("http://files.cistern/a/b.tar".to_owned())
    );
    assert_eq!(
        key("http://deb.debian.org/debian/dists/bookworm/InRelease"),
        None
    );
}

/// A crafted URL against a rule with many `*` must cost store-id time in
/// proportion to the URL, not the combinations of its stars: thirty `*`
/// against a 4 KiB URL that almost matches used to backtrack until the
/// deadline (and then fail open, losing the rule for that request).
#[test]
fn store_id_matches_a_crafted_url_against_many_stars_in_linear_time() {
    let stars = "*a".repeat(29);
    let mut d = decl("store-id", builtin("store-id"));
    d.deadline = Duration::from_secs(3);
    d.params = vec![(
        "rule".into(),
        format!("http://h.test/{stars}*b http://k.test/$1-$2-$9"),
    )];
    let set = engine().load(&[d]).unwrap();
    let chain = set.chain(&["store-id".into()]).unwrap();
    let host = TestHost::default().shared();
    let almost = format!("http://h.test/{}", "a".repeat(4096));
    let matching = format!("{almost}b");
    for (url, want) in [
        (&almost, None),
        // Each `*` takes the shortest run that still lets the rest match:
        // the first 29 are empty, the last takes the rest of the `a`s.
        (&matching, Some("http://k.test/--".to_owned())),
    ] {
        let started = std::time::Instant::now();
        let mut req = request(url, &[]);
        assert!(matches!(
            chain.on_request(&host, &mut req),
            RequestOutcome::Continue
        ));
        let took = started.elapsed();
        assert_eq!(req.cache_key, want);
        assert!(took < Duration::from_secs(1), "matching took {took:?}");
    }
    let stats = &set.stats()[0];
    assert_eq!((stats.calls, stats.failures), (2, 0), "{stats:?}");
}

#[test]
fn metalink_sends_redirects_to_the_cached_copy() {
    let content = b"the same file on every mirror";
    let digest: [u8; 32] = Sha256::digest(content).into();
    let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
    let mut host = TestHost::default();
    host.digests
        .insert(digest, "http://mirror-a.test/f.iso".into());
    host.replicas
        .insert("http://mirror-a.test/f.iso".into(), ReplicaState::Complete);
    host.replicas
        .insert("http://mirror-c.test/f.iso".into(), ReplicaState::Complete);
    let host = host.shared();
    let set = engine()
        .load(&[decl("metalink", builtin("metalink"))])
        .unwrap();
    let chain = set.chain(&["metalink".into()]).unwrap();
    let location = |status: u16, headers: &[(&str, &str)]| {
        let mut req = request("http://download.test/f.iso", &[]);
        let mut resp = response(status, headers);
        chain.on_response(&host, &mut req, &mut resp);
        header(&resp.headers, "location")
    };

    // RFC 3230 Digest: the uncached mirror is swapped for the cached URL.
    let digest_header = format!("SHA-256={b64}");
    assert_eq!(
        location(
            302,
            &[
                ("location", "http://mirror-b.test/f.iso"),
                ("digest", &digest_header)
            ]
        ),
        "http://mirror-a.test/f.iso"
    );
    // RFC 9530 Repr-Digest, among other algorithms.
    let repr = format!("sha-512=:AAAA:, sha-256=:{b64}:");
    assert_eq!(
        location(
            307,
            &[
                ("location", "http://mirror-b.test/f.iso"),
                ("repr-digest", &repr)
            ]
        ),
        "http://mirror-a.test/f.iso"
    );
    // Already cached target: left alone.
    assert_eq!(
        location(
            302,
            &[
                ("location", "http://mirror-c.test/f.iso"),
                ("digest", &digest_header)
            ]
        ),
        "http://mirror-c.test/f.iso"
    );
    // RFC 6249 duplicates when no digest matches.
    assert_eq!(
        location(
            302,
            &[
                ("location", "http://mirror-b.test/f.iso"),
                ("link", "<http://mirror-d.test/f.iso>; rel=duplicate; pri=1"),
                ("link", "<http://mirror-c.test/f.iso>; rel=duplicate; pri=2"),
            ]
        ),
        "http://mirror-c.test/f.iso"
    );
    // Unknown digest, no duplicates, or not a redirect: unchanged.
    let unknown = format!(
        "SHA-256={}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    assert_eq!(
        location(
            302,
            &[
                ("location", "http://mirror-b.test/f.iso"),
                ("digest", &unknown)
            ]
        ),
        "http://mirror-b.test/f.iso"
    );
    assert_eq!(
        location(
            200,
            &[
                ("location", "http://mirror-b.test/f.iso"),
                ("digest", &digest_header)
            ]
        ),
        "http://mirror-b.test/f.iso"
    );
    assert_eq!(set.stats()[0].failures, 0);
}
