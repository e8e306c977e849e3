//! The policy runtime against real wasm guests: every ABI function from a
//! Rust guest built from the repo, hostile WAT guests, load-time checks,
//! isolation modes and the module cache.

mod policy_common;

use std::time::Duration;

use cistern::config::{Isolation, OnError};
use cistern::policy::{
    LimitVerdict, PolicyError, PolicyHost, ReplicaState, RequestOutcome, ResponseDecision,
    ResponseView,
};
use http::{HeaderMap, StatusCode};
use policy_common::{TestHost, built_guest, decl, engine, guest, header, request};

fn tour_host() -> TestHost {
    let mut host = TestHost::default();
    host.replicas
        .insert("complete-key".into(), ReplicaState::Complete);
    host.digests
        .insert([0xab; 32], "http://cached.test/file".into());
    host.limiters.insert("tour".into(), 1);
    host
}

fn tour_decl() -> cistern::config::PolicyDecl {
    let mut d = decl("tour", built_guest("policy_abi_tour"));
    d.params = vec![
        ("greeting".into(), "hello".into()),
        ("multi".into(), "a".into()),
        ("probe-key".into(), "complete-key".into()),
        ("multi".into(), "b".into()),
    ];
    d
}

/// A panic in the host's side of a hook (a bug, here in `replica_state`)
/// is caught in the request's own future, where hooks run: the request is
/// refused with a 503 (no `on-error` applies to a host bug), and the same
/// task goes on to run the chain again with a sound host.
#[tokio::test(flavor = "current_thread")]
async fn a_host_panic_in_a_hook_refuses_the_request_and_the_task_goes_on() {
    struct Panicky;
    impl PolicyHost for Panicky {
        fn replica_state(&self, _: &str) -> ReplicaState {
            panic!("a host bug");
        }
        fn url_by_sha256(&self, _: &[u8; 32]) -> Option<String> {
            None
        }
        fn limiter_check(&self, _: &str, _: &str) -> Option<LimitVerdict> {
            None
        }
    }
    let set = engine().load(&[tour_decl()]).unwrap();
    let chain = set.chain(&["tour".into()]).unwrap();
    let url = "http://mirror.test/dir/file.deb?bypass=1";
    let panicky: std::sync::Arc<dyn PolicyHost> = std::sync::Arc::new(Panicky);
    let (_, outcome) = chain.run_on_request(&panicky, request(url, &[])).await;
    let RequestOutcome::Respond(answer) = outcome else {
        panic!("a host panic let the request through");
    };
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let (req, outcome) = chain
        .run_on_request(&tour_host().shared(), request(url, &[]))
        .await;
    assert!(matches!(outcome, RequestOutcome::Continue));
    assert_eq!(header(&req.headers, "x-method"), "GET");
}

#[test]
fn every_abi_function_from_a_rust_guest() {
    let set = engine().load(&[tour_decl()]).unwrap();
    let chain = set.chain(&["tour".into()]).unwrap();
    let host = tour_host().shared();

    let mut req = request(
        "http://mirror.test/dir/file.deb?bypass=1",
        &[
            ("accept", "a/b"),
            ("accept", "c/d"),
            ("x-remove-me", "1"),
            ("x-remove-me", "2"),
        ],
    );
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    let h = &req.headers;
    assert_eq!(header(h, "x-method"), "GET");
    assert_eq!(
        header(h, "x-url"),
        "http://mirror.test/dir/file.deb?bypass=1"
    );
    assert_eq!(header(h, "x-path"), "/dir/file.deb");
    assert_eq!(header(h, "x-query"), "bypass=1");
    assert_eq!(header(h, "x-host"), "mirror.test");
    assert_eq!(header(h, "x-client-addr"), "192.0.2.7:40000");
    assert_eq!(header(h, "x-client-ip"), "192.0.2.7");
    assert_eq!(header(h, "x-greeting"), "hello");
    assert_eq!(header(h, "x-multi"), "a,b");
    assert_eq!(header(h, "x-missing-param"), "None");
    assert_eq!(header(h, "x-accept-all"), "a/b|c/d");
    assert_eq!(
        header(h, "x-names"),
        "accept,x-remove-me,x-method,x-url,x-path,x-query,x-host,x-client-addr,x-client-ip,x-greeting,x-multi,x-missing-param,x-accept-all"
    );
    assert_eq!(header(h, "x-replica"), "complete");
    assert_eq!(header(h, "x-sha-hit"), "http://cached.test/file");
    assert_eq!(header(h, "x-sha-miss"), "none");
    assert_eq!(header(h, "x-limit"), "allow");
    assert_eq!(header(h, "x-limit-unknown"), "error:unknown-limiter");
    assert_eq!(header(h, "x-status-in-request"), "error:wrong-hook");
    assert_eq!(header(h, "x-bad-header"), "error:invalid");
    assert_eq!(header(h, "x-bad-url"), "error:invalid");
    assert_eq!(header(h, "x-removed"), "2");
    assert!(!h.contains_key("x-remove-me"));
    let added: Vec<_> = h
        .get_all("x-added")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(added, ["1", "2"]);
    assert_eq!(req.cache_key.as_deref(), Some("tour:/dir/file.deb"));
    assert_eq!(
        req.upstream_url.as_ref().map(|u| u.to_string()).as_deref(),
        Some("http://upstream.test/dir/file.deb")
    );
    assert_eq!(header(h, "x-key-back"), "tour:/dir/file.deb");
    assert_eq!(
        header(h, "x-upstream-back"),
        "http://upstream.test/dir/file.deb"
    );
    assert!(
        req.bypass_cache,
        "cache_set(UNCACHEABLE) in on_request bypasses the cache"
    );

    // The limiter allows one request per client: the second is denied,
    // with the retry-after rounded up to whole seconds.
    let mut again = request("http://mirror.test/x", &[]);
    chain.on_request(&host, &mut again);
    assert_eq!(header(&again.headers, "x-limit"), "deny:2");

    // on_response: status, read-only request, response edits, TTL decisions.
    let mut resp = ResponseView {
        status: StatusCode::FOUND,
        headers: HeaderMap::new(),
    };
    resp.headers
        .insert("location", "http://a.test/f".parse().unwrap());
    resp.headers.insert("x-remove-me", "1".parse().unwrap());
    let mut req = request("http://mirror.test/ttl", &[]);
    chain.on_request(&host, &mut req);
    let decision = chain.on_response(&host, &mut req, &mut resp);
    assert_eq!(header(&resp.headers, "x-status"), "302");
    assert_eq!(header(&resp.headers, "x-seen-method"), "GET");
    assert_eq!(header(&resp.headers, "x-req-readonly"), "error:wrong-hook");
    assert_eq!(header(&resp.headers, "x-respond"), "error:wrong-hook");
    assert_eq!(header(&resp.headers, "x-set-url"), "error:wrong-hook");
    assert_eq!(header(&resp.headers, "location"), "http://a.test/f#tour");
    assert!(!resp.headers.contains_key("x-remove-me"));
    assert_eq!(
        decision,
        ResponseDecision {
            ttl: Some(Duration::from_secs(60)),
            ttl_cap: Some(Duration::from_secs(30)),
            ..ResponseDecision::default()
        }
    );
    for (path, expected) in [
        (
            "/immutable",
            ResponseDecision {
                immutable: true,
                ..Default::default()
            },
        ),
        (
            "/nostore",
            ResponseDecision {
                uncacheable: true,
                ..Default::default()
            },
        ),
    ] {
        let mut req = request(&format!("http://mirror.test{path}"), &[]);
        let mut resp = ResponseView::default();
        assert_eq!(
            chain.on_response(&host, &mut req, &mut resp),
            expected,
            "{path}"
        );
    }
}

#[test]
fn direct_answers_redirects_and_url_rewrites() {
    let set = engine().load(&[tour_decl()]).unwrap();
    let chain = set.chain(&["tour".into()]).unwrap();
    let host = tour_host().shared();

    let mut req = request("http://mirror.test/answer", &[]);
    let RequestOutcome::Respond(answer) = chain.on_request(&host, &mut req) else {
        panic!("expected a direct answer");
    };
    assert_eq!(answer.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(&answer.body[..], b"short and stout");
    assert_eq!(header(&answer.headers, "x-answer"), "yes");

    let mut req = request("http://mirror.test/redirect", &[]);
    let RequestOutcome::Respond(answer) = chain.on_request(&host, &mut req) else {
        panic!("expected a redirect");
    };
    assert_eq!(answer.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        header(&answer.headers, "location"),
        "http://elsewhere.test/"
    );

    let mut req = request("http://mirror.test/rewrite", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert_eq!(req.url.to_string(), "http://rewritten.test/new?x=1");

    // A 1 MiB body is over the cap: the guest gets TOO_LARGE, not an answer.
    let mut req = request("http://mirror.test/bigbody", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert_eq!(header(&req.headers, "x-big-body"), "error:too-large");
}

#[test]
fn a_failed_hook_applies_none_of_its_edits() {
    let mut tour = tour_decl();
    tour.name = "tour-pass".into();
    let mut trap = decl("trap", guest("trap.wat"));
    trap.on_error = OnError::Pass;
    let set = engine().load(&[tour, trap]).unwrap();
    let host = tour_host().shared();

    // The Rust guest returns an error after editing: nothing sticks.
    let chain = set.chain(&["tour-pass".into()]).unwrap();
    let mut req = request("http://mirror.test/fail", &[("x-remove-me", "kept")]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert_eq!(header(&req.headers, "x-remove-me"), "kept");
    assert!(!req.headers.contains_key("x-method"));
    assert_eq!(req.cache_key, None);

    // A panic in a Rust guest is a trap, handled the same way.
    let mut req = request("http://mirror.test/panic", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert!(!req.headers.contains_key("x-method"));

    // The WAT guest sets a header then traps, in both hooks.
    let chain = set.chain(&["trap".into()]).unwrap();
    let mut req = request("http://mirror.test/", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert!(!req.headers.contains_key("x-trapped"));
    let mut resp = ResponseView::default();
    let decision = chain.on_response(&host, &mut req, &mut resp);
    assert!(!resp.headers.contains_key("x-trapped"));
    assert_eq!(decision, ResponseDecision::default());

    let stats = set.stats();
    let tour = stats.iter().find(|s| s.name == "tour-pass").unwrap();
    assert_eq!((tour.calls, tour.guest_errors, tour.traps), (2, 1, 1));
    let trap = stats.iter().find(|s| s.name == "trap").unwrap();
    assert_eq!((trap.calls, trap.traps), (2, 2));
}

#[test]
fn hostile_guests_fail_as_configured() {
    let mut looping = decl("loop", guest("loop.wat"));
    looping.deadline = Duration::from_millis(20);
    let mut bomb = decl("bomb", guest("membomb.wat"));
    bomb.memory_limit = 4 * 1024 * 1024;
    bomb.on_error = OnError::Deny;
    let recurse = decl("recurse", guest("recurse.wat"));
    let mut trap = decl("trap", guest("trap.wat"));
    trap.on_error = OnError::Deny;
    let oob = decl("oob", guest("oob.wat"));
    let healthy = decl("healthy", guest("healthy.wat"));
    let set = engine()
        .load(&[looping, bomb, recurse, trap, oob, healthy])
        .unwrap();
    let host = TestHost::default().shared();

    // pass: the request goes on, and the healthy policy after it still runs.
    for name in ["loop", "recurse"] {
        let chain = set.chain(&[name.into(), "healthy".into()]).unwrap();
        let mut req = request("http://mirror.test/", &[]);
        assert!(matches!(
            chain.on_request(&host, &mut req),
            RequestOutcome::Continue
        ));
        assert_eq!(header(&req.headers, "x-healthy"), "1", "{name}");
    }

    // deny: 503 on the request side, a deny flag on the response side.
    for name in ["bomb", "trap"] {
        let chain = set.chain(&[name.into(), "healthy".into()]).unwrap();
        let mut req = request("http://mirror.test/", &[]);
        let RequestOutcome::Respond(answer) = chain.on_request(&host, &mut req) else {
            panic!("{name}: a failing deny policy must answer");
        };
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{name}");
        assert!(
            !req.headers.contains_key("x-healthy"),
            "{name}: the chain stops"
        );
    }
    let chain = set.chain(&["trap".into(), "healthy".into()]).unwrap();
    let mut resp = ResponseView::default();
    let decision = chain.on_response(&host, &mut request("http://m.test/", &[]), &mut resp);
    assert!(decision.deny);
    assert!(!resp.headers.contains_key("x-healthy"));

    // Out-of-bounds pointers and a 1 GiB output buffer are error codes to the
    // guest (it traps on anything else), so it finishes and sets its header.
    let chain = set.chain(&["oob".into()]).unwrap();
    let mut req = request("http://mirror.test/", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut req),
        RequestOutcome::Continue
    ));
    assert_eq!(header(&req.headers, "x-oob"), "ok");

    let stats = set.stats();
    let get = |name: &str| stats.iter().find(|s| s.name == name).unwrap().clone();
    assert_eq!(get("loop").timeouts, 1);
    assert_eq!(get("bomb").memory_limits, 1);
    assert_eq!(get("recurse").traps, 1);
    assert_eq!(get("oob").failures, 0);
    assert_eq!(get("healthy").failures, 0);
}

#[test]
fn load_refuses_bad_modules_naming_policy_and_file() {
    let cases: Vec<(cistern::config::PolicyDecl, &str)> = vec![
        (
            decl("future", guest("version4.wat")),
            "speaks versions 1 to 3",
        ),
        (decl("importer", guest("unknown_import.wat")), "open_file"),
        (decl("missing", guest("does-not-exist.wasm")), "cannot read"),
        (
            decl(
                "bogus",
                cistern::config::PolicySource::Builtin("nope".into()),
            ),
            "no built-in policy `nope`",
        ),
        (
            {
                let mut d = decl("fat", guest("big_memory.wat"));
                d.memory_limit = 1024 * 1024;
                d
            },
            "cannot instantiate",
        ),
        (
            {
                let mut d = decl("greedy", guest("healthy.wat"));
                d.memory_limit = 1 << 40;
                d
            },
            "above the host maximum",
        ),
        (
            decl("garbage", guest("../policy_runtime.rs")),
            "not a valid WebAssembly module",
        ),
    ];
    for (d, expected) in cases {
        let name = d.name.clone();
        let err = engine().load(&[d]).expect_err(&name).to_string();
        assert!(err.contains(&format!("policy `{name}`")), "{err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
    let err = engine()
        .load(&[
            decl("twice", guest("healthy.wat")),
            decl("twice", guest("healthy.wat")),
        ])
        .unwrap_err();
    assert!(matches!(err, PolicyError::Duplicate(_)));
    let set = engine()
        .load(&[decl("healthy", guest("healthy.wat"))])
        .unwrap();
    assert!(matches!(
        set.chain(&["other".into()]),
        Err(PolicyError::Unknown(_))
    ));
}

#[test]
fn isolation_modes_decide_what_state_carries() {
    let reuse = decl("reuse", guest("counter.wat"));
    let mut fresh = decl("fresh", guest("counter.wat"));
    fresh.isolation = Isolation::Fresh;
    let set = engine().load(&[reuse, fresh]).unwrap();
    let host = TestHost::default().shared();
    let count = |name: &str| {
        let mut req = request("http://mirror.test/", &[]);
        set.chain(&[name.into()])
            .unwrap()
            .on_request(&host, &mut req);
        header(&req.headers, "x-count")
    };
    // Reused: globals persist across calls on one instance (the load-time
    // probe instance is the first one reused).
    assert_eq!(count("reuse"), "1");
    assert_eq!(count("reuse"), "2");
    // Fresh: every call starts from the module's initial state.
    assert_eq!(count("fresh"), "1");
    assert_eq!(count("fresh"), "1");
}

#[test]
fn reloads_reuse_compiled_modules_and_drop_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.wat");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/healthy.wat"),
        &path,
    )
    .unwrap();
    // A private engine: the shared one's cache is touched by other tests.
    let engine = cistern::policy::PolicyEngine::new().unwrap();
    let d = decl("p", cistern::config::PolicySource::File(path.clone()));
    engine.load(std::slice::from_ref(&d)).unwrap();
    engine.load(std::slice::from_ref(&d)).unwrap();
    assert_eq!(engine.cached_modules(), 1);
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/counter.wat"),
        &path,
    )
    .unwrap();
    let set = engine.load(std::slice::from_ref(&d)).unwrap();
    assert_eq!(
        engine.cached_modules(),
        1,
        "the old module is dropped from the cache"
    );
    let mut req = request("http://m.test/", &[]);
    set.chain(&["p".into()])
        .unwrap()
        .on_request(&TestHost::default().shared(), &mut req);
    assert_eq!(
        header(&req.headers, "x-count"),
        "1",
        "the edited file is live"
    );
}

#[test]
fn empty_chain_is_free() {
    let set = engine().load(&[]).unwrap();
    let chain = set.chain(&[]).unwrap();
    assert!(chain.is_empty());
    let mut req = request("http://m.test/", &[]);
    let before = req.clone();
    assert!(matches!(
        chain.on_request(&TestHost::default().shared(), &mut req),
        RequestOutcome::Continue
    ));
    assert_eq!(req.headers, before.headers);
}
