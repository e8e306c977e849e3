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
    let mut cramped = decl(
        "pypi",
        cistern::config::PolicySource::Builtin("pypi".into()),
    );
    cramped.body = Some(BodyRule {
        types: vec!["text/html".into()],
        max: 32 << 20,
    });
    let err = engine().load(&[cramped]).expect_err("refused");
    assert!(
        err.to_string()
            .contains("needs a memory of at least twice that"),
        "{err}"
    );
    // And the plain version-1 guest still loads.
    engine()
        .load(&[decl("v1", guest("v1_marks_response.wat"))])
        .expect("a version-1 guest loads");
}

/// Writes a minimal wheel (`demo/__init__.py` and its dist-info) and
/// returns its bytes and its METADATA's.
fn build_wheel(dir: &std::path::Path) -> Option<(Vec<u8>, Vec<u8>)> {
    let script = r#"
import base64, hashlib, sys, zipfile
out = sys.argv[1]
files = {
    "demo/__init__.py": b"VALUE = 42\n",
    "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
    "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: cistern-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
record.append("demo-1.0.dist-info/RECORD,,")
files["demo-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in files.items():
        z.writestr(name, data)
open(out + ".metadata", "wb").write(files["demo-1.0.dist-info/METADATA"])
"#;
    let wheel = dir.join("demo-1.0-py3-none-any.whl");
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .status()
        .ok()?;
    assert!(status.success(), "building the test wheel failed");
    let metadata = dir.join("demo-1.0-py3-none-any.whl.metadata");
    Some((std::fs::read(&wheel).ok()?, std::fs::read(metadata).ok()?))
}

/// `python3 -m pip download` of `demo` through Cistern into `dest`.
fn pip_download(index: &str, dest: &std::path::Path) -> std::process::Output {
    std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-cache-dir", "--no-deps"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--index-url",
            index,
        ])
        .arg("-d")
        .arg(dest)
        .arg("demo")
        // Only the index Cistern serves: no user config, no proxy.
        .env("PIP_CONFIG_FILE", "/dev/null")
        .env_remove("PIP_INDEX_URL")
        .env_remove("PIP_EXTRA_INDEX_URL")
        .env_remove("PIP_FIND_LINKS")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .expect("run pip")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_downloads_through_cistern_and_the_second_download_takes_the_files_from_the_replica() {
    let has_pip = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pip {
        common::skip("python3 -m pip is not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let Some((wheel, metadata)) = build_wheel(work.path()) else {
        common::skip("python3 cannot build the test wheel");
        return;
    };
    let hex = |b: &[u8]| hex::encode(Sha256::digest(b));
    // Two hosts, as on PyPI: the index names files on the file host.
    let index_host = Origin::start().await;
    let file_host = Origin::start().await;
    let files = format!("http://{}/", file_host.addr);
    let page = format!(
        "<!DOCTYPE html>\n<html><body>\n\
         <a href=\"{files}packages/de/mo/demo-1.0-py3-none-any.whl#sha256={}\" \
         data-dist-info-metadata=\"sha256={m}\" data-core-metadata=\"sha256={m}\">\
         demo-1.0-py3-none-any.whl</a>\n</body></html>\n",
        hex(&wheel),
        m = hex(&metadata),
    );
    index_host.put(
        "/simple/demo/",
        Resource::new(page.into()).header("content-type", "text/html"),
    );
    let wheel_path = "/packages/de/mo/demo-1.0-py3-none-any.whl";
    let metadata_path = "/packages/de/mo/demo-1.0-py3-none-any.whl.metadata";
    file_host.put(
        wheel_path,
        Resource::new(wheel.clone().into()).header("content-type", "application/octet-stream"),
    );
    file_host.put(
        metadata_path,
        Resource::new(metadata.into()).header("content-type", "application/octet-stream"),
    );
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "pypi" path="builtin:pypi" memory="64MiB" {{
    param "files" "{files}=/pypi-files/"
    body-types "text/html" "application/vnd.pypi.simple.v1+json"
    body-max "8MiB"
}}
mirror "pypi" {{ prefix "/pypi/"; upstream "http://{index}/"; policies "pypi"; }}
mirror "pypi-files" {{ prefix "/pypi-files/"; upstream "{files}"; policies "pypi"; }}
"#,
        index = index_host.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let index = format!("http://{}/pypi/simple/", cistern.addr);

    let first = work.path().join("first");
    let out = pip_download(&index, &first);
    assert!(
        out.status.success(),
        "pip failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cistern.log()
    );
    let got = std::fs::read(first.join("demo-1.0-py3-none-any.whl")).unwrap();
    assert_eq!(got, wheel, "pip checked the #sha256 and got the wheel");
    // Every request the file host saw came from Cistern (its Via hop),
    // none from pip directly.
    let seen = file_host.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        let via = s.headers.get("via").map(|v| v.to_str().unwrap_or(""));
        assert!(
            via.is_some_and(|v| v.contains("cistern")),
            "{} reached the file host without Cistern: {:?}",
            s.path,
            s.headers
        );
    }
    assert_eq!(file_host.hits(wheel_path), 1);
    let before = (index_host.seen().len(), file_host.seen().len());

    // A second download with an empty pip cache: all from the replica.
    let second = work.path().join("second");
    let out = pip_download(&index, &second);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(second.join("demo-1.0-py3-none-any.whl")).unwrap(),
        wheel
    );
    assert_eq!(
        file_host.seen().len(),
        before.1,
        "the files all came from the replica"
    );
    // pip asks for index pages with `Cache-Control: max-age=0`, so the
    // page is revalidated: with the original's ETag, answered 304, and the
    // rewritten replica serves it.
    let index_seen = index_host.seen();
    assert_eq!(index_seen.len(), before.0 + 1, "{index_seen:?}");
    let again = index_seen.last().unwrap();
    assert_eq!(again.headers.get("if-none-match").unwrap(), "\"v1\"");
    let log = cistern
        .log_when("the wheel hit", |log| {
            log.lines()
                .filter(|l| l.contains("demo-1.0-py3-none-any.whl") && l.contains("hit"))
                .count()
                >= 1
        })
        .await;
    assert!(
        log.contains("/pypi-files/packages/de/mo/demo-1.0-py3-none-any.whl"),
        "{log}"
    );
}

/// `npm pack` of a one-file package; returns the tarball's bytes.
fn npm_pack(dir: &std::path::Path) -> Option<Vec<u8>> {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).ok()?;
    std::fs::write(
        pkg.join("package.json"),
        r#"{"name":"demo-pkg","version":"1.0.0","main":"index.js","license":"MIT"}"#,
    )
    .ok()?;
    std::fs::write(pkg.join("index.js"), "module.exports = 42;\n").ok()?;
    let out = npm(dir)
        .current_dir(&pkg)
        .args(["pack", "--pack-destination"])
        .arg(dir)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "npm pack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.join("demo-pkg-1.0.0.tgz")).ok()
}

/// npm with a config of its own: no user `.npmrc`, no proxy, no
/// notifier, and npm's own registry-host replacement off, so only the
/// policy can bring tarballs through Cistern.
fn npm(dir: &std::path::Path) -> std::process::Command {
    let userconfig = dir.join("npmrc");
    let _ = std::fs::write(&userconfig, "");
    let mut cmd = std::process::Command::new("npm");
    cmd.env("npm_config_userconfig", &userconfig)
        .env("npm_config_update_notifier", "false")
        .env("npm_config_replace_registry_host", "never")
        .env("npm_config_audit", "false")
        .env("npm_config_fund", "false");
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "npm_config_proxy",
        "npm_config_https_proxy",
        "npm_config_registry",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_installs_through_cistern_and_the_second_install_takes_the_tarball_from_the_replica() {
    let has_npm = std::process::Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_npm {
        common::skip("npm is not installed");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let Some(tarball) = npm_pack(work.path()) else {
        common::skip("npm pack did not make a tarball");
        return;
    };
    let integrity = format!(
        "sha512-{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            sha2::Sha512::digest(&tarball)
        )
    );
    let shasum = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys;print(hashlib.sha1(open(sys.argv[1],'rb').read()).hexdigest())",
        ])
        .arg(work.path().join("demo-pkg-1.0.0.tgz"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // The registry names tarballs on another host, as a CDN-backed one does.
    let registry = Origin::start().await;
    let file_host = Origin::start().await;
    let files = format!("http://{}/", file_host.addr);
    let packument = format!(
        r#"{{"name":"demo-pkg","dist-tags":{{"latest":"1.0.0"}},"versions":{{"1.0.0":{{"name":"demo-pkg","version":"1.0.0","main":"index.js","dist":{{"tarball":"{files}demo-pkg/-/demo-pkg-1.0.0.tgz","integrity":"{integrity}","shasum":"{shasum}"}}}}}}}}"#
    );
    registry.put(
        "/demo-pkg",
        Resource::new(packument.into()).header("content-type", "application/json"),
    );
    let tgz_path = "/demo-pkg/-/demo-pkg-1.0.0.tgz";
    file_host.put(
        tgz_path,
        Resource::new(tarball.clone().into()).header("content-type", "application/octet-stream"),
    );
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "npm" path="builtin:npm" memory="64MiB" {{
    param "tarballs" "{files}=http://127.0.0.1:{{PORT}}/npm-files/"
    body-types "application/json" "application/vnd.npm.install-v1+json"
    body-max "8MiB"
}}
mirror "npm" {{ prefix "/npm/"; upstream "http://{r}/"; policies "npm"; }}
mirror "npm-files" {{ prefix "/npm-files/"; upstream "{files}"; policies "npm"; }}
"#,
        r = registry.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let registry_url = format!("http://{}/npm/", cistern.addr);
    let install = |n: &str| {
        let project = work.path().join(n);
        std::fs::create_dir_all(&project).unwrap();
        let out = npm(work.path())
            .args(["install", "demo-pkg", "--no-package-lock", "--registry"])
            .arg(&registry_url)
            .arg("--cache")
            .arg(work.path().join(format!("cache-{n}")))
            .arg("--prefix")
            .arg(&project)
            .output()
            .expect("run npm");
        (project, out)
    };
    let (first, out) = install("first");
    assert!(
        out.status.success(),
        "npm install failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cistern.log()
    );
    assert_eq!(
        std::fs::read_to_string(first.join("node_modules/demo-pkg/index.js")).unwrap(),
        "module.exports = 42;\n",
        "installed, after npm checked the integrity"
    );
    let seen = file_host.seen();
    assert_eq!(file_host.hits(tgz_path), 1);
    for s in &seen {
        let via = s.headers.get("via").map(|v| v.to_str().unwrap_or(""));
        assert!(
            via.is_some_and(|v| v.contains("cistern")),
            "{} reached the file host without Cistern: {:?}",
            s.path,
            s.headers
        );
    }
    let files_before = seen.len();

    // An empty npm cache: the tarball comes from the replica.
    let (second, out) = install("second");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(second.join("node_modules/demo-pkg/index.js").exists());
    assert_eq!(
        file_host.seen().len(),
        files_before,
        "the tarball came from the replica"
    );
}

/// The cargo that runs this test (cargo sets `CARGO` for test binaries).
fn cargo_bin() -> std::path::PathBuf {
    std::env::var_os("CARGO").map_or_else(|| "cargo".into(), Into::into)
}

/// cargo with its own home (no user config, no proxy).
fn cargo(home: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(cargo_bin());
    cmd.env("CARGO_HOME", home)
        .env("CARGO_TERM_COLOR", "never")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_REGISTRIES_CRATES_IO_PROTOCOL");
    for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        cmd.env_remove(var);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cargo_fetches_through_cistern_and_the_second_fetch_takes_the_crate_from_the_replica() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A crate made by `cargo package`, offline.
    let krate = w.join("democrate");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"democrate\"\nversion = \"0.1.0\"\nedition = \"2021\"\nlicense = \"MIT\"\ndescription = \"demo\"\n",
    )
    .unwrap();
    std::fs::write(krate.join("src/lib.rs"), "pub const VALUE: u32 = 42;\n").unwrap();
    let packaged = cargo(&w.join("home0"))
        .current_dir(&krate)
        .args(["package", "--no-verify", "--allow-dirty", "--offline"])
        .output();
    let Ok(packaged) = packaged else {
        common::skip("cargo cannot be run");
        return;
    };
    assert!(
        packaged.status.success(),
        "cargo package failed: {}",
        String::from_utf8_lossy(&packaged.stderr)
    );
    let crate_file = std::fs::read(krate.join("target/package/democrate-0.1.0.crate")).unwrap();
    let cksum = hex::encode(Sha256::digest(&crate_file));

    // The index names its downloads on another host, as crates.io does.
    let index_host = Origin::start().await;
    let file_host = Origin::start().await;
    let dl = format!("http://{}/crates", file_host.addr);
    index_host.put(
        "/index/config.json",
        Resource::new(format!(r#"{{"dl":"{dl}"}}"#).into())
            .header("content-type", "application/json"),
    );
    index_host.put(
        "/index/de/mo/democrate",
        Resource::new(
            format!(
                "{{\"name\":\"democrate\",\"vers\":\"0.1.0\",\"deps\":[],\"cksum\":\"{cksum}\",\"features\":{{}},\"yanked\":false}}\n"
            )
            .into(),
        )
        .header("content-type", "text/plain"),
    );
    let download = "/crates/democrate/0.1.0/download";
    file_host.put(
        download,
        Resource::new(crate_file.clone().into()).header("content-type", "application/x-tar"),
    );
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "cargo" path="builtin:cargo" {{
    param "dl" "{dl}=http://127.0.0.1:{{PORT}}/crates-files"
    body-types "application/json"
    body-max "1MiB"
}}
mirror "crates-index" {{ prefix "/crates-index/"; upstream "http://{i}/index/"; policies "cargo"; }}
mirror "crates-files" {{ prefix "/crates-files/"; upstream "{dl}/"; policies "cargo"; }}
"#,
        i = index_host.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);

    let app = w.join("app");
    std::fs::create_dir_all(app.join("src")).unwrap();
    std::fs::write(
        app.join("Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\ndemocrate = { version = \"0.1\", registry = \"local\" }\n",
    )
    .unwrap();
    std::fs::write(app.join("src/main.rs"), "fn main() {}\n").unwrap();
    let fetch = |home: &str| {
        let home = w.join(home);
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(
            home.join("config.toml"),
            format!(
                "[registries.local]\nindex = \"sparse+http://{}/crates-index/\"\n",
                cistern.addr
            ),
        )
        .unwrap();
        let out = cargo(&home)
            .current_dir(&app)
            .arg("fetch")
            .output()
            .expect("run cargo fetch");
        (home, out)
    };
    let (home, out) = fetch("home1");
    assert!(
        out.status.success(),
        "cargo fetch failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cistern.log()
    );
    let cached = find_files(&home.join("registry/cache"));
    assert!(
        cached.iter().any(|f| f.ends_with("democrate-0.1.0.crate")),
        "cargo stored the crate after checking its cksum: {cached:?}"
    );
    let seen = file_host.seen();
    assert_eq!(file_host.hits(download), 1);
    for s in &seen {
        let via = s.headers.get("via").map(|v| v.to_str().unwrap_or(""));
        assert!(
            via.is_some_and(|v| v.contains("cistern")),
            "{} reached the file host without Cistern: {:?}",
            s.path,
            s.headers
        );
    }
    let files_before = seen.len();

    // A new cargo home, so nothing is cached on the client.
    let (_, out) = fetch("home2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        file_host.seen().len(),
        files_before,
        "the crate came from the replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_rewritten_and_stored_on_a_route_with_policies() {
    let origin = Origin::start().await;
    let page = simple_page("https://files.pythonhosted.org/");
    origin.put(
        "/pypi/simple/demo/",
        Resource::new(page.into())
            .header("content-type", "text/html")
            .unknown_length(),
    );
    // A file no policy rewrites, chunked too: on_response runs on its head.
    let wheel = common::pattern(7, 100_000);
    origin.put(
        "/pypi/packages/demo-1.0-py3-none-any.whl",
        Resource::new(wheel.clone()).unknown_length(),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "1MiB", "", "\"pypi\""), &[]);
    let first = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(
        std::str::from_utf8(first.bytes()).unwrap(),
        simple_page("/pypi-files/"),
        "{}",
        cistern.log()
    );
    let again = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert_eq!(
        std::str::from_utf8(again.bytes()).unwrap(),
        simple_page("/pypi-files/")
    );
    let got = get(cistern.addr, "/pypi/packages/demo-1.0-py3-none-any.whl").await;
    assert_eq!(got.bytes(), &wheel);
    let again = get(cistern.addr, "/pypi/packages/demo-1.0-py3-none-any.whl").await;
    assert_eq!(
        again.header("cache-status"),
        "cistern; hit",
        "{}",
        cistern.log()
    );
    assert_eq!(again.bytes(), &wheel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_growing_past_the_cap_streams_on_unchanged() {
    let origin = Origin::start().await;
    let big = simple_page("https://files.pythonhosted.org/").repeat(20);
    origin.put(
        "/pypi/simple/big/",
        Resource::new(big.clone().into())
            .header("content-type", "text/html")
            .unknown_length(),
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "1KiB", "", "\"pypi\""), &[]);
    let got = get(cistern.addr, "/pypi/simple/big/").await;
    assert_eq!(
        std::str::from_utf8(got.bytes()).unwrap(),
        big,
        "{}",
        cistern.log()
    );
    cistern
        .log_when("the pass-through", |log| {
            log.contains("body passes through unchanged: more than the body-max of 1024 bytes")
        })
        .await;
    let again = get(cistern.addr, "/pypi/simple/big/").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert_eq!(std::str::from_utf8(again.bytes()).unwrap(), big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_joining_a_fill_wait_for_the_rewrite() {
    let origin = Origin::start().await;
    // About 300 KiB of links, sent slowly, so the second client joins the
    // fill while the page is still arriving.
    let page = simple_page("https://files.pythonhosted.org/").repeat(1200);
    origin.put(
        "/pypi/simple/slow/",
        Resource::new(page.into())
            .header("content-type", "text/html")
            .slow(std::time::Duration::from_millis(200)),
    );
    let expected = simple_page("/pypi-files/").repeat(1200);
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config(&origin, "1MiB", "", "\"pypi\""), &[]);
    let addr = cistern.addr;
    let leader = tokio::spawn(async move { get(addr, "/pypi/simple/slow/").await });
    // Poll (bounded) until the fill is under way, then join it.
    let started = std::time::Instant::now();
    while origin.hits("/pypi/simple/slow/") == 0 && started.elapsed().as_secs() < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let follower = get(addr, "/pypi/simple/slow/").await;
    let leader = leader.await.unwrap();
    for got in [&leader, &follower] {
        assert_eq!(got.status, 200, "{}", cistern.log());
        assert_eq!(got.header("content-length"), expected.len().to_string());
        assert!(
            got.bytes() == expected.as_bytes(),
            "a reader got other bytes than the rewrite"
        );
    }
    assert_eq!(
        follower.header("cache-status"),
        "cistern; fwd=miss; collapsed",
        "the second client joined the fill"
    );
    assert_eq!(origin.hits("/pypi/simple/slow/"), 1, "one fill for both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_of_the_original_is_not_resumed_into_a_rewritten_document() {
    let origin = Origin::start().await;
    let page = simple_page("https://files.pythonhosted.org/").repeat(2000);
    // The first fill and its three resumes are cut: a partial of the
    // original bytes stays behind.
    origin.put(
        "/pypi/simple/demo/",
        Resource::new(page.clone().into())
            .header("content-type", "text/html")
            .slow(std::time::Duration::from_millis(20))
            .die_after(100_000, cistern::fetch::RESUME_ATTEMPTS + 1),
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
mirror "pypi" {{ prefix "/pypi/"; upstream "http://{o}/pypi/"; }}
"#,
        o = origin.addr
    );
    {
        let before = Cistern::start(dir.path(), &plain, &[]);
        let cut = get(before.addr, "/pypi/simple/demo/").await;
        assert!(cut.body.is_err() || cut.bytes().len() < page.len());
        before
            .log_when("the fill giving up", |log| log.contains("not resuming"))
            .await;
    }

    // Now with the policy: the document comes whole and rewritten.
    let cistern = Cistern::start(dir.path(), &config(&origin, "1MiB", "", "\"pypi\""), &[]);
    let got = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(
        std::str::from_utf8(got.bytes()).unwrap(),
        simple_page("/pypi-files/").repeat(2000),
        "{}",
        cistern.log()
    );
    let again = get(cistern.addr, "/pypi/simple/demo/").await;
    assert_eq!(again.header("cache-status"), "cistern; hit");
    assert_eq!(
        std::str::from_utf8(again.bytes()).unwrap(),
        simple_page("/pypi-files/").repeat(2000)
    );
}
