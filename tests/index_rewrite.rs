//! The body hook (policy ABI version 2, `on_body`) on real requests
//! through the real binary, with the built-in `pypi` policy: a declared
//! index document is rewritten before it is stored, served with its own
//! length and digest, revalidated with the original's validators; a body
//! over the cap passes through unchanged; version-1 guests run unchanged.

mod common;
mod policy_common;

use common::{Cistern, Origin, Resource, find_files, get};
use sha2::{Digest, Sha256};

fn guests() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests")
}

/// A PEP 503 page naming one wheel on the file host, with its hash in the
/// fragment and its metadata's hash in the PEP 658/714 attributes.
fn simple_page(file_host: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><body>\n\
         <a href=\"{file_host}packages/ab/cd/demo-1.0-py3-none-any.whl#sha256=0123abcd\" \
         data-requires-python=\"&gt;=3.8\" data-dist-info-metadata=\"sha256=4567ef\" \
         data-core-metadata=\"sha256=4567ef\">demo-1.0-py3-none-any.whl</a>\n\
         </body></html>\n"
    )
}

fn config(origin: &Origin, body_max: &str, extra_policy: &str, chain: &str) -> String {
    format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "pypi" path="builtin:pypi" {{
    param "files" "https://files.pythonhosted.org/=/pypi-files/"
    body-types "text/html" "application/vnd.pypi.simple.v1+json"
    body-max "{body_max}"
}}
{extra_policy}
mirror "pypi" {{ prefix "/pypi/"; upstream "http://{o}/pypi/"; policies {chain}; }}
"#,
        o = origin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_index_is_rewritten_stored_and_served_with_its_own_length_and_digest() {
    let origin = Origin::start().await;
    let page = simple_page("https://files.pythonhosted.org/");
    // Always revalidated, so the second request shows which validators
    // the rewritten replica keeps.
    origin.put(
        "/pypi/simple/demo/",
        Resource::new(page.clone().into())
            .header("content-type", "text/html; charset=utf-8")
            .header("cache-control", "max-age=0")
            .header(
                "repr-digest",
                &format!(
                    "sha-256=:{}:",
                    base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        Sha256::digest(page.as_bytes())
                    )
                ),
            ),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "1MiB", "", "\"pypi\""), &[]);
    let expected = simple_page("/pypi-files/");

    let first = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(first.status, 200, "{}", cistern.log());
    assert_eq!(
        std::str::from_utf8(first.bytes()).unwrap(),
        expected,
        "the file URL moves, the fragment and data- attributes stay byte for byte"
    );
    assert_eq!(first.header("content-length"), expected.len().to_string());
    assert_eq!(
        first.header("etag"),
        "\"v1\"",
        "the original's validator is kept"
    );
    let digest = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        Sha256::digest(expected.as_bytes()),
    );
    assert_eq!(
        first.header("repr-digest"),
        "",
        "the upstream's digest names the original bytes, never served with the rewrite"
    );
    let asked = origin.seen();
    assert_eq!(
        asked[0].headers.get("accept-encoding").unwrap(),
        "identity",
        "a route with a body hook asks for plain bodies"
    );

    // The replica on disk is the rewrite.
    let files = find_files(&cistern.root);
    let stored = files
        .iter()
        .find(|f| f.contains("simple/demo"))
        .unwrap_or_else(|| panic!("{files:?}"));
    let on_disk = std::fs::read(cistern.root.join(stored)).unwrap();
    assert_eq!(on_disk, expected.as_bytes());

    // Revalidated with the original's ETag; the 304 keeps the rewrite.
    let second = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(std::str::from_utf8(second.bytes()).unwrap(), expected);
    assert!(
        second.header("cache-status").contains("fwd-status=304"),
        "{:?}",
        second.headers
    );
    assert_eq!(second.header("repr-digest"), format!("sha-256=:{digest}:"));
    let last = origin.seen().pop().unwrap();
    assert_eq!(last.headers.get("if-none-match").unwrap(), "\"v1\"");
    assert_eq!(origin.hits("/pypi/simple/demo/"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_cap_or_of_another_type_passes_through_unchanged() {
    let origin = Origin::start().await;
    // 4 KiB of links: over a 1 KiB cap.
    let big = simple_page("https://files.pythonhosted.org/").repeat(20);
    origin.put(
        "/pypi/simple/big/",
        Resource::new(big.clone().into()).header("content-type", "text/html"),
    );
    // The same bytes announced as something no policy declared.
    origin.put(
        "/pypi/simple/other/",
        Resource::new(simple_page("https://files.pythonhosted.org/").into())
            .header("content-type", "text/plain"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "1KiB", "", "\"pypi\""), &[]);
    let got = get(cistern.addr, "/pypi/simple/big/").await;
    assert_eq!(got.status, 200, "{}", cistern.log());
    assert_eq!(std::str::from_utf8(got.bytes()).unwrap(), big);
    assert_eq!(got.header("content-length"), big.len().to_string());
    let log = cistern
        .log_when("the pass-through", |log| {
            log.contains("body passes through unchanged")
        })
        .await;
    assert!(log.contains("over the body-max of 1024 bytes"), "{log}");

    let other = get(cistern.addr, "/pypi/simple/other/").await;
    assert_eq!(
        std::str::from_utf8(other.bytes()).unwrap(),
        simple_page("https://files.pythonhosted.org/")
    );
    // Both are stored and hit as they came.
    let again = get(cistern.addr, "/pypi/simple/big/").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert_eq!(std::str::from_utf8(again.bytes()).unwrap(), big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_guest_runs_unchanged_beside_a_version_2_one() {
    let origin = Origin::start().await;
    origin.put(
        "/pypi/simple/demo/",
        Resource::new(simple_page("https://files.pythonhosted.org/").into())
            .header("content-type", "text/html"),
    );
    let v1 = format!(
        "policy \"v1\" path=\"{}\"",
        guests().join("v1_marks_response.wat").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(
        dir.path(),
        &config(&origin, "1MiB", &v1, "\"v1\" \"pypi\""),
        &[],
    );
    let got = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(got.status, 200, "{}", cistern.log());
    assert_eq!(got.header("x-v1"), "ran", "the version-1 hook ran");
    assert_eq!(
        std::str::from_utf8(got.bytes()).unwrap(),
        simple_page("/pypi-files/")
    );
}

#[test]
fn the_body_declaration_and_the_on_body_export_go_together() {
    use cistern::config::BodyRule;
    use policy_common::{decl, engine, guest};
    let rule = || {
        Some(BodyRule {
            types: vec!["text/html".into()],
            max: 1 << 20,
        })
    };
    let mut v1_with_types = decl("v1", guest("v1_marks_response.wat"));
    v1_with_types.body = rule();
    let err = engine().load(&[v1_with_types]).expect_err("refused");
    assert!(
        err.to_string()
            .contains("declares `body-types` but the module exports no `on_body`"),
        "{err}"
    );
    let mut v1_on_body = decl("old", guest("v1_with_on_body.wat"));
    v1_on_body.body = rule();
    let err = engine().load(&[v1_on_body]).expect_err("refused");
    assert!(
        err.to_string().contains("ABI version 1 does not have"),
        "{err}"
    );
    let untyped = decl(
        "pypi",
        cistern::config::PolicySource::Builtin("pypi".into()),
    );
    let err = engine().load(&[untyped]).expect_err("refused");
    assert!(err.to_string().contains("names no `body-types`"), "{err}");
    // And the plain version-1 guest still loads.
    engine()
        .load(&[decl("v1", guest("v1_marks_response.wat"))])
        .expect("a version-1 guest loads");
}
