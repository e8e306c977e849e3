//! The same example policy in C, Zig, AssemblyScript and WAT, built by
//! `examples/build.sh` and loaded into the real policy runtime. A language
//! whose toolchain is missing is skipped with a message (CI installs them
//! all with `.ci/install-toolchains.sh`).

mod policy_common;

use std::path::Path;
use std::process::Command;

use cistern::config::PolicySource;
use cistern::policy::{RequestOutcome, ResponseView};
use http::StatusCode;
use policy_common::{TestHost, decl, engine, header, request};

const LANGUAGES: &[(&str, &str)] = &[
    ("c", "c.wasm"),
    ("zig", "zig.wasm"),
    ("assemblyscript", "assemblyscript.wasm"),
    ("wat", "wat.wat"),
];

fn check_language(language: &str, module: &Path) {
    let mut host = TestHost::default();
    host.limiters.insert("per-client".into(), 1);
    let host = host.shared();
    let mut d = decl(language, PolicySource::File(module.to_owned()));
    d.params = vec![("limited-prefix".into(), "/limited/".into())];
    let set = engine()
        .load(&[d])
        .unwrap_or_else(|e| panic!("{language}: {e}"));
    let chain = set.chain(&[language.into()]).unwrap();

    // The limited path: one request per client, then 429 + Retry-After.
    let mut first = request("http://mirror.test/limited/a", &[]);
    assert!(
        matches!(
            chain.on_request(&host, &mut first),
            RequestOutcome::Continue
        ),
        "{language}: first request passes"
    );
    let mut second = request("http://mirror.test/limited/b", &[]);
    let RequestOutcome::Respond(answer) = chain.on_request(&host, &mut second) else {
        panic!("{language}: second request must be rate-limited");
    };
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{language}");
    assert_eq!(header(&answer.headers, "retry-after"), "2", "{language}");
    assert_eq!(&answer.body[..], b"rate limited\n", "{language}");

    // Other paths are not limited; a query bypasses the cache.
    for _ in 0..3 {
        let mut other = request("http://mirror.test/other", &[]);
        assert!(matches!(
            chain.on_request(&host, &mut other),
            RequestOutcome::Continue
        ));
        assert!(!other.bypass_cache, "{language}: no query, cache used");
    }
    let mut query = request("http://mirror.test/other?q=1", &[]);
    assert!(matches!(
        chain.on_request(&host, &mut query),
        RequestOutcome::Continue
    ));
    assert!(query.bypass_cache, "{language}: a query bypasses the cache");

    // Responses are tagged with the language.
    let mut resp = ResponseView::default();
    let decision = chain.on_response(&host, &mut query, &mut resp);
    assert!(!decision.deny);
    assert_eq!(header(&resp.headers, "x-policy"), language);
    assert_eq!(set.stats()[0].failures, 0, "{language}");
    // The C example asks the host to reuse its decisions outside the
    // limited prefix (ABI version 3): of the three identical requests for
    // /other, the last two were answered without a call.
    let reused = if language == "c" { 2 } else { 0 };
    assert_eq!(set.stats()[0].reused, reused, "{language}");
}

#[test]
fn the_example_policy_behaves_the_same_in_every_language() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(root.join("examples/build.sh"))
        .arg(out.path())
        .status()
        .expect("run examples/build.sh");
    assert!(status.success(), "examples/build.sh failed");
    let mut tested = Vec::new();
    for (language, file) in LANGUAGES {
        let module = out.path().join(file);
        if !module.exists() {
            // CI installs every toolchain; there a skipped language is a failure.
            assert!(
                std::env::var_os("CISTERN_REQUIRE_ALL_TOOLCHAINS").is_none(),
                "{language} was not built and CISTERN_REQUIRE_ALL_TOOLCHAINS is set"
            );
            eprintln!(
                "skipping {language}: its toolchain is missing (see examples/build.sh output)"
            );
            continue;
        }
        check_language(language, &module);
        tested.push(*language);
    }
    eprintln!("example policy tested in: {}", tested.join(", "));
    assert!(
        tested.contains(&"wat"),
        "WAT needs no toolchain and is always tested"
    );
}
