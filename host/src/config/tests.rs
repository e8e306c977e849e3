//! `config.kdl` parsing, through the public API only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The name configs are parsed under: relative paths resolve against /etc/cistern.
const NAME: &str = "/etc/cistern/config.kdl";

fn ok(text: &str) -> Config {
    match Config::parse(text, Path::new(NAME)) {
        Ok(c) => c,
        Err(e) => panic!("config should parse:\n{text}\n{}", e.report()),
    }
}

fn problems(text: &str) -> Vec<(usize, usize, String)> {
    match Config::parse(text, Path::new(NAME)) {
        Ok(_) => panic!("config should be refused:\n{text}"),
        Err(e) => e.problems(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn shipped_config_parses_to_the_documented_setup() {
    let text = include_str!("../../../config.kdl");
    let c = ok(text);
    assert_eq!(c.source.as_deref(), Some(Path::new(NAME)));
    assert_eq!(
        c.listeners,
        vec![Listener {
            addr: addr("127.0.0.1:8080")
        }]
    );
    assert_eq!(c.store.root, Path::new("/etc/cistern/replica"));
    assert_eq!(c.store.state, Path::new("/etc/cistern/replica.cistern"));
    assert_eq!(c.store.layout, Layout::HostPort);
    assert_eq!(c.store.max_size, Some(20 << 30));
    assert!(c.forward.enabled);
    assert!(!c.forward.transparent);
    let allow: Vec<String> = c.forward.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(c.forward.connect_ports, [443]);
    // The commented-out example mirror must stay commented out.
    assert_eq!(c.mirrors.len(), 1);
    let debian = &c.mirrors[0];
    assert_eq!(debian.name, "debian");
    assert_eq!(debian.prefix, "/debian/");
    let ups: Vec<String> = debian.upstreams.iter().map(ToString::to_string).collect();
    assert_eq!(
        ups,
        [
            "http://deb.debian.org/debian/",
            "http://ftp.debian.org/debian/"
        ]
    );
    assert_eq!(c.timeouts.idle, Duration::from_secs(15));
    assert_eq!(c.timeouts.connect, Duration::from_secs(10));
    assert_eq!(c.timeouts.orphan_fill, Duration::from_secs(600));
    assert_eq!(c.timeouts.upstream_idle, Duration::from_secs(4));
    assert_eq!(c.mode, CacheMode::Normal);
    assert!(c.limits.requests_per_client.is_none());
    assert!(c.limits.download_bytes_per_sec.is_none());
    let names: Vec<&str> = c.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["distro", "store-id", "metalink"]);
    assert_eq!(c.forward.policies, ["store-id", "metalink", "distro"]);
    assert_eq!(debian.policies, ["store-id", "distro"]);
}

#[test]
fn an_empty_file_gets_the_defaults_and_no_forward_proxy() {
    let c = ok("// nothing here\n");
    assert_eq!(
        c.listeners,
        vec![Listener {
            addr: addr("127.0.0.1:8080")
        }]
    );
    assert_eq!(c.store.root, Path::new("/etc/cistern/replica"));
    assert_eq!(c.store.state, Path::new("/etc/cistern/replica.cistern"));
    assert_eq!(c.store.layout, Layout::HostPort);
    assert_eq!(c.store.max_size, None);
    assert_eq!(c.store.min_free, 64 << 20);
    assert!(!c.forward.enabled, "forward proxy only when asked for");
    assert!(c.mirrors.is_empty());
    assert_eq!(c.timeouts.idle, Duration::from_secs(15));
    assert_eq!(c.timeouts.connect, Duration::from_secs(10));
    assert_eq!(c.timeouts.orphan_fill, Duration::from_secs(600));
    assert_eq!(c.mode, CacheMode::Normal);
    assert!(c.upstream_tls.system_roots);
    assert!(c.upstream_tls.ca_files.is_empty());
    assert!(c.policies.is_empty() && c.limiters.is_empty());
    // Connections are capped even without a `limit` block.
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.max_connections_per_client, 256);
    assert_eq!(
        (c.limits.max_fills, c.limits.max_fills_per_client),
        (256, 32)
    );
}

#[test]
fn an_empty_forward_block_is_a_loopback_only_forward_proxy() {
    let c = ok("forward");
    assert!(c.forward.enabled);
    assert!(!c.forward.transparent);
    let allow: Vec<String> = c.forward.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(c.forward.connect_ports, [443]);

    // Given lists replace the defaults rather than adding to them, and
    // repeated nodes add up.
    let c = ok(r#"
        forward {
            allow "192.168.1.0/24"
            allow "10.1.2.3" "fd00::/8"
            connect-ports 443 8443
            connect-ports 563
        }
    "#);
    let allow: Vec<String> = c.forward.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["192.168.1.0/24", "10.1.2.3/32", "fd00::/8"]);
    assert_eq!(c.forward.connect_ports, [443, 8443, 563]);
}

#[test]
fn the_full_syntax_parses_into_the_model() {
    let c = ok(r#"
        listen "127.0.0.1:8080"
        listen "[::1]:0"
        store {
            root "/srv/replica"
            state "/var/lib/cistern"
            layout "flat"
            max-size "1.5GiB"
            min-free "0"
        }
        forward {
            enabled #true
            transparent #true
            allow "0.0.0.0/0"
            policies "distro"
        }
        mirror "debian" {
            prefix "/deb"
            upstream "https://deb.debian.org/debian"
            upstream "http://ftp.debian.org:8080/debian/"
            policies "store-id" "distro"
        }
        mirror "pypi" {
            upstream "https://files.pythonhosted.org"
        }
        limit {
            requests-per-client 100 per="1s" burst=200
            download "10MiB"
            max-connections 500
            max-connections-per-client 8
            max-fills 64
            max-fills-per-client 4
            orphan-finish-left "64KiB"
            orphan-finish-done "75%"
            http2-max-streams 10
            http2-max-resets 5
        }
        limiter "per-path" rate=10 per="1m" burst=10
        limiter "slow" rate=3
        timeouts { idle "1m"; connect "500ms"; orphan-fill "0s"; upstream-idle "0s"; send "2m"; }
        mode "offline"
        upstream-tls { system-roots #false; ca-file "ca.pem"; ca-file "/etc/ssl/extra.pem"; }
        policy "distro" path="builtin:distro" on-error="deny" isolation="fresh" deadline="20ms" memory="32MiB" {
            param "immutable" "*.deb"
            param "immutable" "*.udeb"
        }
        policy "store-id" path="policies/store_id.wasm"
    "#);
    assert_eq!(
        c.listeners,
        vec![
            Listener {
                addr: addr("127.0.0.1:8080")
            },
            Listener {
                addr: addr("[::1]:0")
            }
        ]
    );
    assert_eq!(c.store.root, Path::new("/srv/replica"));
    assert_eq!(c.store.state, Path::new("/var/lib/cistern"));
    assert_eq!(c.store.layout, Layout::Flat);
    assert_eq!(c.store.max_size, Some(3 << 29));
    assert_eq!(c.store.min_free, 0);
    assert!(c.forward.enabled && c.forward.transparent);
    assert_eq!(c.forward.policies, ["distro"]);

    let [debian, pypi] = &c.mirrors[..] else {
        panic!("two mirrors expected, got {:?}", c.mirrors)
    };
    // Trailing slashes are added to prefixes and upstream paths.
    assert_eq!(debian.prefix, "/deb/");
    let ups: Vec<String> = debian.upstreams.iter().map(ToString::to_string).collect();
    assert_eq!(
        ups,
        [
            "https://deb.debian.org/debian/",
            "http://ftp.debian.org:8080/debian/"
        ]
    );
    assert_eq!(debian.policies, ["store-id", "distro"]);
    // No prefix: the mirror's name is its prefix.
    assert_eq!(pypi.prefix, "/pypi/");
    assert_eq!(
        pypi.upstreams[0].to_string(),
        "https://files.pythonhosted.org/"
    );

    assert_eq!(
        c.limits.requests_per_client,
        Some(RequestRate {
            count: 100,
            period: Duration::from_secs(1),
            burst: 200
        })
    );
    assert_eq!(c.limits.download_bytes_per_sec, Some(10 << 20));
    assert_eq!(c.limits.max_connections, 500);
    assert_eq!(c.limits.max_connections_per_client, 8);
    assert_eq!((c.limits.max_fills, c.limits.max_fills_per_client), (64, 4));
    assert_eq!(
        (
            c.limits.orphans.finish_left,
            c.limits.orphans.finish_done_pct
        ),
        (64 << 10, 75)
    );
    assert_eq!(
        (c.limits.http2_max_streams, c.limits.http2_max_resets),
        (10, 5)
    );
    assert_eq!(c.timeouts.send, Duration::from_secs(120));
    assert_eq!(c.limiters.len(), 2);
    assert_eq!(c.limiters[0].name, "per-path");
    assert_eq!(
        c.limiters[0].rate,
        RequestRate {
            count: 10,
            period: Duration::from_secs(60),
            burst: 10
        }
    );
    // Defaults: one second, burst = count.
    assert_eq!(
        c.limiters[1].rate,
        RequestRate {
            count: 3,
            period: Duration::from_secs(1),
            burst: 3
        }
    );
    assert_eq!(c.timeouts.idle, Duration::from_secs(60));
    assert_eq!(c.timeouts.connect, Duration::from_millis(500));
    assert_eq!(c.timeouts.orphan_fill, Duration::ZERO);
    assert_eq!(c.timeouts.upstream_idle, Duration::ZERO);
    assert_eq!(c.mode, CacheMode::Offline);
    assert!(!c.upstream_tls.system_roots);
    assert_eq!(
        c.upstream_tls.ca_files,
        [
            PathBuf::from("/etc/cistern/ca.pem"),
            PathBuf::from("/etc/ssl/extra.pem")
        ]
    );

    let distro = &c.policies[0];
    assert_eq!(distro.name, "distro");
    assert_eq!(distro.source, PolicySource::Builtin("distro".into()));
    assert_eq!(distro.on_error, OnError::Deny);
    assert_eq!(distro.isolation, Isolation::Fresh);
    assert_eq!(distro.deadline, Duration::from_millis(20));
    assert_eq!(distro.memory_limit, 32 << 20);
    assert_eq!(
        distro.params,
        [
            ("immutable".to_owned(), "*.deb".to_owned()),
            ("immutable".to_owned(), "*.udeb".to_owned())
        ]
    );
    let store_id = &c.policies[1];
    assert_eq!(
        store_id.source,
        PolicySource::File("/etc/cistern/policies/store_id.wasm".into())
    );
    // Policy defaults.
    assert_eq!(store_id.on_error, OnError::Pass);
    assert_eq!(store_id.isolation, Isolation::Reuse);
    assert_eq!(store_id.deadline, Duration::from_millis(50));
    assert_eq!(store_id.memory_limit, 16 << 20);
    assert!(store_id.params.is_empty());
}

#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let c = ok(r#"store { root "data/replica"; }"#);
    assert_eq!(c.store.root, Path::new("/etc/cistern/data/replica"));
    // The default state follows the root, even a trailing-slash one.
    assert_eq!(
        c.store.state,
        Path::new("/etc/cistern/data/replica.cistern")
    );
    let c = ok(r#"store { root "replica/"; }"#);
    assert_eq!(c.store.state, Path::new("/etc/cistern/replica.cistern"));
    // A root with no last component cannot have a sibling state directory.
    let got = problems(r#"store { root "/"; }"#);
    assert!(got[0].2.contains("must not contain each other"), "{got:?}");

    let c = ok(r#"store { root "../shared"; state "state"; }"#);
    assert_eq!(c.store.root, Path::new("/etc/cistern/../shared"));
    assert_eq!(c.store.state, Path::new("/etc/cistern/state"));
}

#[test]
fn forward_default_is_a_plain_forward_proxy_in_the_working_directory() {
    let c = Config::forward_default(Path::new("/home/me/downloads"));
    assert_eq!(c.source, None);
    assert_eq!(
        c.listeners,
        vec![Listener {
            addr: addr("127.0.0.1:8080")
        }]
    );
    assert_eq!(c.store.root, Path::new("/home/me/downloads"));
    assert_eq!(c.store.state, Path::new("/home/me/downloads.cistern"));
    assert_eq!(c.store.layout, Layout::HostPort);
    assert!(c.forward.enabled);
    assert!(!c.forward.transparent);
    let allow: Vec<String> = c.forward.allow.iter().map(ToString::to_string).collect();
    assert_eq!(allow, ["127.0.0.0/8", "::1/128"]);
    assert!(c.mirrors.is_empty());
    assert!(c.policies.is_empty());
    assert_eq!(c.mode, CacheMode::Normal);
}

#[test]
fn plain_mode_runs_the_package_policies_on_the_forward_proxy_unless_told_not_to() {
    let c = Config::plain(Path::new("/srv/cache"), true);
    assert_eq!(c.store.root, Path::new("/srv/cache"));
    assert_eq!(c.forward.policies, ["store-id", "distro"]);
    let names: Vec<&str> = c.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["store-id", "distro"]);
    assert_eq!(c.policies[1].source, PolicySource::Builtin("distro".into()));
    let bare = Config::plain(Path::new("/srv/cache"), false);
    assert!(bare.policies.is_empty() && bare.forward.policies.is_empty());
}

/// A config text and every problem it must produce: line, column and a part
/// of the message.
type BadCase = (&'static str, &'static [(usize, usize, &'static str)]);

/// Each bad config, with every problem it must produce: line, column and a
/// part of the message.
#[test]
fn bad_configs_are_refused_with_positions() {
    #[rustfmt::skip]
    let cases: &[BadCase] = &[
        // Unknown nodes and properties, wrong shapes.
        ("lisen \"127.0.0.1:8080\"", &[(1, 1, "unknown node `lisen`")]),
        ("store {\n    max_size \"1GiB\"\n}", &[(2, 5, "unknown node `max_size`")]),
        ("listen \"127.0.0.1:1\" backlog=5", &[(1, 22, "unknown property `backlog` on `listen`")]),
        ("mode \"normal\" \"static\"", &[(1, 15, "`mode` takes 1 argument, found 2")]),
        ("mode", &[(1, 1, "`mode` takes 1 argument, found 0")]),
        ("mode \"normal\"\nmode \"static\"", &[(2, 1, "`mode` is given twice (first on line 1)")]),
        ("limiter \"l\" rate=1 rate=2", &[(1, 20, "property `rate` is given twice (first on line 1)")]),
        ("listen \"127.0.0.1:1\" {\n    x 1\n}", &[(1, 22, "`listen` takes no `{ … }` block")]),
        ("store \"x\"", &[(1, 7, "`store` takes no arguments, found 1")]),
        // Values of the wrong type.
        ("listen 8080", &[(1, 8, "`listen` expects a string here, found the number 8080")]),
        ("forward {\n    enabled \"true\"\n}", &[(2, 13, "`enabled` expects #true or #false, found the string \"true\"")]),
        ("forward {\n    enabled true\n}", &[(2, 13, "bare `true` is not a KDL v2 value; write #true")]),
        ("limiter \"l\" rate=1.5", &[(1, 13, "expects a whole number here, found the number 1.5")]),
        // Bad values.
        ("listen \"localhost:8080\"", &[(1, 8, "\"localhost:8080\" is not an IP address and port")]),
        ("listen \"127.0.0.1:1\"\nlisten \"127.0.0.1:1\"", &[(2, 8, "127.0.0.1:1 is already a listener (line 1)")]),
        ("mode \"fast\"", &[(1, 6, "unknown mode \"fast\"")]),
        ("store {\n    layout \"deep\"\n}", &[(2, 12, "unknown layout \"deep\"")]),
        ("store {\n    max-size \"20 gigs\"\n}", &[(2, 14, "unknown size unit")]),
        ("store {\n    max-size 0\n}", &[(2, 14, "`max-size` must be more than zero")]),
        ("store {\n    min-free \"lots\"\n}", &[(2, 14, "unknown size unit")]),
        ("store {\n    root \"r\"\n    state \"r/meta\"\n}", &[(3, 11, "must not contain each other")]),
        ("timeouts {\n    idle \"15\"\n}", &[(2, 10, "has no unit")]),
        ("timeouts {\n    idle 15\n}", &[(2, 10, "`idle`: 15 has no unit")]),
        ("timeouts { idle \"0s\"; }", &[(1, 17, "`idle` must be longer than zero")]),
        ("timeouts {\n    connect \"1.5s\"\n}", &[(2, 13, "has a fraction")]),
        ("forward {\n    allow \"10.0.0.0/33\"\n}", &[(2, 11, "\"10.0.0.0/33\" is not a network (CIDR) or an IP address")]),
        ("forward {\n    allow \"10.0.0.1/8\"\n}", &[(2, 11, "\"10.0.0.1/8\" has host bits set")]),
        ("forward {\n    connect-ports 0\n}", &[(2, 19, "`connect-ports`: 0 is out of range (1 to 65535)")]),
        ("forward {\n    connect-ports 70000\n}", &[(2, 19, "70000 is out of range")]),
        // Mirrors.
        ("mirror \"d\" {\n    upstream \"http://h:0/d/\"\n}", &[(2, 14, "has port 0")]),
        ("mirror \"d\" {\n    upstream \"gopher://h/d/\"\n}", &[(2, 14, "uses gopher: only http, https and ftp are supported")]),
        ("mirror \"d\" {\n    upstream \"deb.debian.org/debian\"\n}", &[(2, 14, "has no scheme")]),
        ("mirror \"d\" {\n    upstream \"http://u:p@h/d/\"\n}", &[(2, 14, "carries credentials")]),
        ("mirror \"d\" {\n    upstream \"http://h/d/?x=1\"\n}", &[(2, 14, "has a query")]),
        ("mirror \"d\" {\n    upstream \"http://h/\"\n    upstream \"http://h\"\n}", &[(3, 14, "upstream http://h/ is listed twice")]),
        ("mirror \"d\" {\n    prefix \"debian/\"\n    upstream \"http://h/\"\n}", &[(2, 12, "`prefix` \"debian/\" must start with '/'")]),
        ("mirror \"d\" {\n    prefix \"/a/../b/\"\n    upstream \"http://h/\"\n}", &[(2, 12, "cannot hold '.' or '..' segments")]),
        ("mirror \"d\"", &[(1, 8, "mirror \"d\" has no upstream")]),
        ("mirror \"a b\" {\n    upstream \"http://h/\"\n}", &[(1, 8, "\"a b\" is not a valid name")]),
        ("mirror \"d\" {\n    upstream \"http://a/\"\n}\nmirror \"d\" {\n    upstream \"http://b/\"\n}",
            &[(4, 8, "mirror \"d\" is declared twice (first on line 1)")]),
        ("mirror \"a\" {\n    prefix \"/x/\"\n    upstream \"http://a/\"\n}\nmirror \"b\" {\n    prefix \"/x\"\n    upstream \"http://b/\"\n}",
            &[(6, 12, "prefix \"/x/\" is already served by the mirror on line 2")]),
        // Policies and limiters.
        ("policy \"p\" path=\"builtin:a\"\npolicy \"p\" path=\"builtin:b\"", &[(2, 8, "policy \"p\" is declared twice (first on line 1)")]),
        ("mirror \"d\" {\n    upstream \"http://a/\"\n    policies \"nope\"\n}", &[(3, 14, "policy \"nope\" is not declared")]),
        ("forward {\n    policies \"p\" \"p\"\n}\npolicy \"p\" path=\"builtin:p\"", &[(2, 18, "\"p\" is listed twice")]),
        ("policy \"p\"", &[(1, 1, "`policy` needs path=\"…\"")]),
        ("policy \"p\" path=\"builtin:\"", &[(1, 12, "\"builtin:\" needs a policy name")]),
        ("policy \"p\" path=\"builtin:x\" on-error=\"explode\"", &[(1, 29, "`on-error`: unknown value \"explode\"")]),
        ("policy \"p\" path=\"builtin:x\" isolation=\"shared\"", &[(1, 29, "`isolation`: unknown value \"shared\"")]),
        ("policy \"p\" path=\"builtin:x\" memory=\"1KiB\"", &[(1, 29, "`memory` must be at least 64KiB")]),
        ("policy \"p\" path=\"builtin:x\" deadline=\"0ms\"", &[(1, 29, "`deadline` must be longer than zero")]),
        ("policy \"p\" path=\"builtin:x\" {\n    param \"k\"\n}", &[(2, 5, "`param` takes 2 arguments, found 1")]),
        ("limiter \"l\" rate=0", &[(1, 13, "`limiter`: 0 is out of range")]),
        ("limiter \"l\"", &[(1, 1, "`limiter` needs rate=N")]),
        ("limiter \"l\" rate=1\nlimiter \"l\" rate=2", &[(2, 9, "limiter \"l\" is declared twice (first on line 1)")]),
        ("limit {\n    requests-per-client 0\n}", &[(2, 25, "`requests-per-client`: 0 is out of range")]),
        ("limit {\n    requests-per-client 5 per=\"0s\"\n}", &[(2, 27, "`requests-per-client` must be longer than zero")]),
        ("limit {\n    requests-per-client 5 burst=0\n}", &[(2, 27, "0 is out of range")]),
        ("limit {\n    download 0\n}", &[(2, 14, "`download` must be more than zero")]),
        ("limit {\n    max-connections 0\n}", &[(2, 21, "`max-connections`: 0 is out of range (1 to 4294967295)")]),
        ("limit {\n    max-fills 0\n}", &[(2, 15, "`max-fills`: 0 is out of range (1 to 4294967295)")]),
        ("admin {\n    token-sha256 \"hunter2\"\n}", &[(2, 18, "`token-sha256`: \"hunter2\" is not a SHA-256 digest (64 hex digits)")]),
        ("admin {\n    user \"ops\"\n}", &[(2, 5, "`user` needs password-sha256=\"…\"")]),
        ("mirror \"m\" {\n    upstream \"http://a.test/\"\n    query \"drop\"\n}", &[(3, 11, "`query`: unknown mode \"drop\"")]),
        ("mirror \"m\" mode=\"bounce\" {\n    upstream \"http://a.test/\"\n}", &[(1, 12, "`mode`: unknown mirror mode \"bounce\"")]),
        ("mirror \"m\" {\n    upstream \"http://a.test/\"\n    serve-locally \"x\"\n}", &[(3, 5, "`serve-locally` applies only to a mirror in mode=\"redirect\"")]),
        ("mirror \"m\" mode=\"redirect\" {\n    upstream \"http://a.test/\"\n    serve-locally \"dists/InRelease\"\n}", &[(3, 19, "holds a '/'")]),
        ("limit {\n    orphan-finish-done \"101%\"\n}", &[(2, 24, "`orphan-finish-done`: \"101%\" is not a percentage from 0% to 100%")]),
        ("limit {\n    max-connections-per-client \"9\"\n}", &[(2, 32, "`max-connections-per-client` expects a whole number here")]),
        ("limit {\n    max-connections-per-client 1 2\n}", &[(2, 34, "`max-connections-per-client` takes 1 argument")]),
        // TLS.
        ("upstream-tls {\n    system-roots #false\n}", &[(1, 1, "`upstream-tls` trusts no certificate authority")]),
        // Type annotations mean nothing here and are refused, not ignored.
        ("listen (ip)\"127.0.0.1:1\"", &[(1, 9, "type annotations are not used")]),
    ];
    let mut failures = Vec::new();
    for (text, want) in cases {
        let got = problems(text);
        let matches = got.len() == want.len()
            && got
                .iter()
                .zip(want.iter())
                .all(|((gl, gc, gm), (wl, wc, wm))| gl == wl && gc == wc && gm.contains(wm));
        if !matches {
            failures.push(format!("{text}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let text = r#"listen "nowhere"
store {
    layout "deep"
}
mirror "debian" {
    upstream "gopher://example.org/"
    policies "missing"
}
timeouts {
    idel "5s"
}
policy "late" path="builtin:late"
"#;
    let got = problems(text);
    let positions: Vec<(usize, usize)> = got.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(
        positions,
        [(1, 8), (3, 12), (6, 14), (7, 14), (10, 5)],
        "{got:?}"
    );
    assert!(got[3].2.contains("policy \"missing\" is not declared"));
    assert!(got[4].2.contains("unknown node `idel`"));
}

#[test]
fn reports_name_the_file_line_and_column_and_suggest_fixes() {
    let err = Config::parse("timeouts {\n    idel \"5s\"\n}\n", Path::new(NAME)).unwrap_err();
    let report = err.report();
    assert!(report.contains("/etc/cistern/config.kdl:2:5"), "{report}");
    assert!(report.contains("unknown node `idel`"), "{report}");
    assert!(report.contains("did you mean `idle`?"), "{report}");
    assert!(
        err.to_string()
            .contains("/etc/cistern/config.kdl has 1 problem")
    );

    let err = Config::parse("forward { enabled \"yes\"; }", Path::new(NAME)).unwrap_err();
    assert!(
        err.report().contains("expects #true or #false"),
        "{}",
        err.report()
    );
    let err = Config::parse("forward { enabled true; }", Path::new(NAME)).unwrap_err();
    assert!(err.report().contains("#true, #false"), "{}", err.report());
}

#[test]
fn kdl_syntax_errors_carry_positions() {
    // An unclosed block and a stray closing quote: both are syntax errors.
    let text = "listen \"127.0.0.1:8080\"\nstore {\n    root \"replica\n}\n";
    let err = Config::parse(text, Path::new(NAME)).unwrap_err();
    let got = err.problems();
    assert!(!got.is_empty());
    for (line, column, _) in &got {
        assert!(*line >= 3, "syntax error placed at line {line}: {got:?}");
        assert!(*column >= 1);
    }
    assert!(
        err.report().contains("/etc/cistern/config.kdl:"),
        "{}",
        err.report()
    );

    // KDL v1 syntax is not silently accepted.
    let err = Config::parse(
        "forward {\n    enabled true; transparent false\n",
        Path::new(NAME),
    );
    assert!(err.is_err());
}

#[test]
fn load_reads_the_file_and_resolves_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not checked for content here").unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/mine.wasm"), b"\0asm").unwrap();
    let path = dir.path().join("cistern.kdl");
    std::fs::write(
        &path,
        r#"
        store { root "replica"; }
        upstream-tls { ca-file "ca.pem"; }
        policy "mine" path="policies/mine.wasm"
        "#,
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.source.as_deref(), Some(path.as_path()));
    assert_eq!(c.store.root, dir.path().join("replica"));
    assert_eq!(c.store.state, dir.path().join("replica.cistern"));
    assert_eq!(c.upstream_tls.ca_files, [dir.path().join("ca.pem")]);
    assert_eq!(
        c.policies[0].source,
        PolicySource::File(dir.path().join("policies/mine.wasm"))
    );
}

#[test]
fn load_refuses_missing_referenced_files_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cistern.kdl");
    std::fs::write(
        &path,
        "upstream-tls {\n    ca-file \"missing.pem\"\n}\npolicy \"p\" path=\"nope.wasm\"\n",
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err();
    let got = err.problems();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].0, got[0].1), (2, 13));
    assert!(got[0].2.contains("missing.pem"), "{got:?}");
    assert_eq!((got[1].0, got[1].1), (4, 12));
    assert!(got[1].2.contains("nope.wasm"), "{got:?}");
    // Parsing alone does not touch the filesystem.
    assert!(Config::parse(&std::fs::read_to_string(&path).unwrap(), &path).is_ok());
}

#[test]
fn load_of_a_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.kdl");
    let err = Config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("absent.kdl"), "{err}");
    let got = err.problems();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1), (0, 0));
    assert!(err.report().contains("absent.kdl"));
}

#[test]
fn slashdash_comments_out_nodes_and_entries() {
    let c = ok("listen \"127.0.0.1:0\"\nlisten \"127.0.0.1:0\"");
    assert_eq!(
        c.listeners.len(),
        2,
        "port 0 repeats are distinct listeners"
    );
    let c = ok(r#"
        /-listen "not even an address"
        listen "127.0.0.1:9000" /-"127.0.0.1:9001"
        /-mirror "gone" { upstream "nope"; }
    "#);
    assert_eq!(
        c.listeners,
        vec![Listener {
            addr: addr("127.0.0.1:9000")
        }]
    );
    assert!(c.mirrors.is_empty());
}

#[test]
fn every_kdl_example_in_the_docs_parses() {
    let doc = include_str!("../../../docs/config.md");
    let mut blocks = 0;
    let mut rest = doc;
    while let Some(start) = rest.find("```kdl\n") {
        let body = &rest[start + 7..];
        let end = body.find("```").expect("closed code block");
        // Fragments showing `policies` lean on declarations shown elsewhere.
        let mut text = body[..end].to_owned();
        for name in ["distro", "store-id"] {
            if !text.contains(&format!("policy \"{name}\"")) {
                text.push_str(&format!("policy \"{name}\" path=\"builtin:{name}\"\n"));
            }
        }
        if let Err(e) = Config::parse(&text, Path::new(NAME)) {
            panic!(
                "docs/config.md example does not parse:\n{text}\n{}",
                e.report()
            );
        }
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert!(blocks >= 10, "only {blocks} examples found");
}

#[test]
fn stale_rules_default_to_a_day_of_stale_if_error_and_are_set_per_block() {
    let c = ok(r#"
forward { stale-while-revalidate "30s"; }
mirror "a" { upstream "http://a.example/"; }
mirror "b" {
    upstream "http://b.example/"
    stale-if-error "0s"
    stale-while-revalidate "1m"
}
"#);
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(c.forward.stale.if_error, day);
    assert_eq!(c.forward.stale.while_revalidate, Duration::from_secs(30));
    assert_eq!(c.mirrors[0].stale, StaleRules::default());
    assert_eq!(c.mirrors[0].stale.if_error, day);
    assert_eq!(c.mirrors[0].stale.while_revalidate, Duration::ZERO);
    assert_eq!(c.mirrors[1].stale.if_error, Duration::ZERO);
    assert_eq!(c.mirrors[1].stale.while_revalidate, Duration::from_secs(60));
    let p = problems(
        r#"mirror "a" {
    upstream "http://a.example/"
    stale-if-error "soon"
}"#,
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 3, "{p:?}");
    assert!(p[0].2.contains("stale-if-error"), "{p:?}");
}

#[test]
fn server_names_and_admin_hosts() {
    let c = ok(
        "server-name \"Cache.LAN.\" \"192.168.1.7\"\nserver-name \"cache.example.org:80\" \"[::1]:8080\"\nadmin {\n    host \"cistern.lan\" \"cistern.example.org:443\"\n}\n",
    );
    let names: Vec<(&str, Option<u16>)> = c
        .server_names
        .iter()
        .map(|n| (n.host.as_str(), n.port))
        .collect();
    assert_eq!(
        names,
        [
            ("cache.lan", None),
            ("192.168.1.7", None),
            ("cache.example.org", Some(80)),
            ("::1", Some(8080)),
        ]
    );
    assert_eq!(c.server_names[3].ip, Some("::1".parse().unwrap()));
    let hosts: Vec<(&str, Option<u16>)> = c
        .admin
        .hosts
        .iter()
        .map(|n| (n.host.as_str(), n.port))
        .collect();
    assert_eq!(
        hosts,
        [("cistern.lan", None), ("cistern.example.org", Some(443))]
    );
    assert!(ok("listen \"127.0.0.1:8080\"\n").server_names.is_empty());

    let p = problems(
        "server-name \"http://cache.lan/\" \"user@cache.lan\" \"cache lan\" \"cache.lan:0\"\nserver-name\nadmin {\n    host \"*\"\n}\n",
    );
    let texts: Vec<&str> = p.iter().map(|(_, _, t)| t.as_str()).collect();
    assert_eq!(p.len(), 6, "{p:?}");
    assert!(texts[0].contains("is a URL"), "{texts:?}");
    assert!(texts[1].contains("user information"), "{texts:?}");
    assert!(texts[2].contains("not a host name"), "{texts:?}");
    assert!(texts[3].contains("port 0"), "{texts:?}");
    assert_eq!((p[4].0, p[4].1), (2, 1), "{p:?}");
    assert!(
        texts[5].contains("`host`: \"*\" is not a host name"),
        "{texts:?}"
    );
}

#[test]
fn node_id_is_a_via_token() {
    assert_eq!(ok("node-id \"edge-1\"").node_id.as_deref(), Some("edge-1"));
    assert_eq!(ok("").node_id, None);
    let p = problems("node-id \"edge 1\"");
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!((p[0].0, p[0].1), (1, 9), "{p:?}");
    assert!(
        p[0].2.contains("`node-id`: ' ' cannot be in a node id"),
        "{p:?}"
    );
    assert_eq!(problems("node-id \"\"").len(), 1);
}

#[test]
fn targeted_field_names_a_field_of_our_own() {
    assert_eq!(ok("").targeted_field.as_str(), "cistern-cache-control");
    assert_eq!(
        ok("targeted-field \"Edge-Cache-Control\"")
            .targeted_field
            .as_str(),
        "edge-cache-control"
    );
    for (text, why) in [
        (
            "targeted-field \"Cache-Control\"",
            "every cache reads already",
        ),
        (
            "targeted-field \"CDN-Cache-Control\"",
            "every cache reads already",
        ),
        ("targeted-field \"connection\"", "hop-by-hop"),
        (
            "targeted-field \"not a name\"",
            "not a valid header field name",
        ),
    ] {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{text}: {p:?}");
        assert!(p[0].2.contains(why), "{text}: {p:?}");
    }
}

#[test]
fn forwarded_for_defaults_and_modes() {
    let c = ok(
        "forward {\n}\nmirror \"m\" {\n    prefix \"/m/\"\n    upstream \"http://a.test/\"\n}\n",
    );
    assert_eq!(c.forward.forwarded_for, ForwardedFor::Off);
    assert_eq!(c.mirrors[0].forwarded_for, ForwardedFor::Replace);
    let c = ok(
        "forward {\n    forwarded-for \"replace\"\n}\nmirror \"m\" {\n    prefix \"/m/\"\n    upstream \"http://a.test/\"\n    forwarded-for \"append\"\n}\n",
    );
    assert_eq!(c.forward.forwarded_for, ForwardedFor::Replace);
    assert_eq!(c.mirrors[0].forwarded_for, ForwardedFor::Append);
    let p = problems("forward {\n    forwarded-for \"yes\"\n}\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].2.contains("`forwarded-for`: unknown mode \"yes\""),
        "{p:?}"
    );
}

#[test]
fn a_redirecting_mirror_keeps_its_serve_locally_patterns() {
    let c = ok(
        "mirror \"vlc\" mode=\"redirect\" {\n    upstream \"http://a.test/\"\n    serve-locally \"*.sha256\" \"*.asc\"\n    serve-locally \"MIRRORS\"\n}\nmirror \"d\" mode=\"proxy\" {\n    upstream \"http://b.test/\"\n}",
    );
    assert_eq!(
        c.mirrors[0].redirect,
        Some(RedirectConfig {
            serve_locally: vec!["*.sha256".into(), "*.asc".into(), "MIRRORS".into()],
        })
    );
    assert_eq!(c.mirrors[1].redirect, None);
}

#[test]
fn policy_body_rules_parse_and_bad_ones_are_refused() {
    let c = ok(r#"policy "pypi" path="builtin:pypi" {
    body-types "text/HTML" "application/vnd.pypi.simple.v1+json"
    body-max "2MiB"
}
policy "npm" path="builtin:npm" {
    body-types "application/json"
}
policy "plain" path="builtin:distro""#);
    let body = |name: &str| {
        c.policies
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .body
            .clone()
    };
    let pypi = body("pypi").unwrap();
    assert_eq!(
        pypi.types,
        ["text/html", "application/vnd.pypi.simple.v1+json"]
    );
    assert_eq!(pypi.max, 2 << 20);
    assert!(pypi.matches("Text/Html; charset=utf-8"));
    assert!(!pypi.matches("text/plain"));
    assert_eq!(body("npm").unwrap().max, 32 << 20, "the default cap");
    assert_eq!(body("plain"), None);

    let cases: &[(&str, &str)] = &[
        (
            "policy \"p\" path=\"builtin:x\" {\n    body-max \"1MiB\"\n}",
            "`body-max` without `body-types` has nothing to cap",
        ),
        (
            "policy \"p\" path=\"builtin:x\" {\n    body-types \"html\"\n}",
            "`body-types`: \"html\" is not a media type",
        ),
        (
            "policy \"p\" path=\"builtin:x\" {\n    body-types \"text/html; charset=utf-8\"\n}",
            "is not a media type",
        ),
        (
            "policy \"p\" path=\"builtin:x\" {\n    body-types \"text/html\"\n    body-max 0\n}",
            "`body-max` must be more than 0 bytes",
        ),
        (
            "policy \"p\" path=\"builtin:x\" {\n    body-types\n}",
            "`body-types` takes",
        ),
    ];
    for (text, want) in cases {
        let got = problems(text);
        assert!(
            got.iter().any(|(_, _, m)| m.contains(want)),
            "{text}\nwanted {want:?}, got {got:?}"
        );
    }
}

#[test]
fn cluster_names_this_node_its_peers_and_a_secret() {
    let c = ok(r#"cluster {
        node "a"
        peer "a" "http://10.0.0.1:8080"
        peer "b" "http://10.0.0.2:8080"
        secret "0123456789abcdef"
        peer-down "1m"
    }"#)
    .cluster
    .expect("a cluster");
    assert_eq!(c.node, "a");
    assert_eq!(c.peers.len(), 2);
    assert_eq!(c.peers[1].url, "http://10.0.0.2:8080/");
    assert_eq!(c.peer_down, Duration::from_secs(60));
    assert_eq!(c.store_on, StoreOn::Every);
    let owner = ok(
        r#"cluster { node "a"; peer "b" "http://h:1"; secret "0123456789abcdef"; store-on "owner"; }"#,
    );
    assert_eq!(owner.cluster.unwrap().store_on, StoreOn::Owner);
    assert_eq!(ok("").cluster, None);
    let refused = [
        // No secret, a short one, no node, no other peer, a path, https,
        // a name listed twice.
        r#"cluster { node "a"; peer "b" "http://h:1"; }"#,
        r#"cluster { node "a"; peer "b" "http://h:1"; secret "short"; }"#,
        r#"cluster { peer "b" "http://h:1"; secret "0123456789abcdef"; }"#,
        r#"cluster { node "a"; peer "a" "http://h:1"; secret "0123456789abcdef"; }"#,
        r#"cluster { node "a"; peer "b" "http://h:1/x"; secret "0123456789abcdef"; }"#,
        r#"cluster { node "a"; peer "b" "https://h:1"; secret "0123456789abcdef"; }"#,
        r#"cluster { node "a"; peer "b" "http://h:1"; peer "b" "http://h:2"; secret "0123456789abcdef"; }"#,
        r#"cluster { node "a"; peer "b" "http://h:1"; secret "0123456789abcdef"; store-on "all"; }"#,
    ];
    for text in refused {
        assert_eq!(problems(text).len(), 1, "{text}: {:?}", problems(text));
    }
}

#[test]
fn cluster_redis_is_a_checked_url_reported_at_its_position() {
    let c = ok(
        r#"cluster { node "a"; peer "b" "http://h:1"; secret "0123456789abcdef"; redis "redis://127.0.0.1:6379/"; }"#,
    );
    assert_eq!(
        c.cluster.unwrap().redis,
        Some(RedisUrl("redis://127.0.0.1:6379/".to_owned()))
    );
    let without = ok(r#"cluster { node "a"; peer "b" "http://h:1"; secret "0123456789abcdef"; }"#);
    assert_eq!(without.cluster.unwrap().redis, None);
    let text = "cluster {\n    node \"a\"\n    peer \"b\" \"http://h:1\"\n    secret \"0123456789abcdef\"\n    redis \"http://127.0.0.1:6379/\"\n}";
    let got = problems(text);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].1), (5, 11), "{got:?}");
    assert!(got[0].2.contains("redis"), "{got:?}");
    for bad in ["redis://", "not a url", "rediss://h/"] {
        let text = format!(
            r#"cluster {{ node "a"; peer "b" "http://h:1"; secret "0123456789abcdef"; redis "{bad}"; }}"#
        );
        assert_eq!(problems(&text).len(), 1, "{bad}");
    }
}

#[test]
fn redis_urls_are_checked_and_their_passwords_hidden() {
    assert!(RedisUrl::parse("redis://127.0.0.1:6379/").is_ok());
    assert!(RedisUrl::parse("redis://h/2").is_ok());
    assert!(RedisUrl::parse("http://h:1/").is_err());
    assert!(RedisUrl::parse("redis://").is_err());
    let hidden = |u: &str| RedisUrl(u.to_owned()).redacted();
    assert_eq!(hidden("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
    assert_eq!(hidden("redis://:secret@h"), "redis://:***@h");
    assert_eq!(hidden("redis://h:1/"), "redis://h:1/");
    let err = RedisUrl::parse("http://u:secret@h/").unwrap_err();
    assert!(!err.contains("secret"), "{err}");
}
