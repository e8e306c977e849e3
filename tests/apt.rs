//! Debian's own apt-get through Cistern's plain mode (issue 11): no
//! `config.kdl`, `cistern -p PORT -r DIR`, and a mirror that, like
//! deb.debian.org, sends no `Last-Modified`, `ETag` or `Cache-Control`.
//! The test builds a tiny unsigned repository with `dpkg-deb`, serves it
//! from a loopback origin, and runs the real `apt-get update` and
//! `apt-get download` in a sandbox under a temporary directory, through
//! Cistern as its HTTP proxy.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use sha2::{Digest, Sha256};

const PACKAGE: &str = "cistern-hello";
const DEB_PATH: &str = "/debian/pool/main/c/cistern-hello/cistern-hello_1.0_amd64.deb";
const DEB_NAME: &str = "cistern-hello_1.0_amd64.deb";
const DISTS: &str = "/debian/dists/stable";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A response with only a body: no `ETag`, `Last-Modified` or
/// `Cache-Control`, as Debian's mirrors answer.
fn bare(body: Bytes) -> Resource {
    let mut r = Resource::new(body);
    r.headers.clear();
    r
}

/// Whether `tool --version` runs here.
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds `cistern-hello_1.0_amd64.deb` with `dpkg-deb --build` from a
/// minimal `DEBIAN/control` and one file, and returns its bytes.
fn build_deb(work: &Path) -> Bytes {
    let root = work.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/doc/cistern-hello")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: cistern-hello\n\
         Version: 1.0\n\
         Architecture: amd64\n\
         Maintainer: Cistern tests <tests@example.invalid>\n\
         Description: a package served by Cistern's tests\n \
         Built by tests/apt.rs at test time.\n",
    )
    .unwrap();
    std::fs::write(
        root.join("usr/share/doc/cistern-hello/blob"),
        pattern(11, 64 * 1024),
    )
    .unwrap();
    let out = work.join(DEB_NAME);
    let run = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out)
        .output()
        .expect("run dpkg-deb");
    assert!(
        run.status.success(),
        "dpkg-deb failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    Bytes::from(std::fs::read(&out).unwrap())
}

/// Puts the repository on `origin`: the .deb under `pool/`, and hand-written
/// `Packages` and `Release` (unsigned: there is no `InRelease` and no
/// `Release.gpg`, so apt's first requests get 404s, as from an unsigned
/// repository) with the sizes and SHA-256s apt checks.
fn serve_repository(origin: &Origin, deb: &Bytes) {
    let packages = format!(
        "Package: cistern-hello\n\
         Version: 1.0\n\
         Architecture: amd64\n\
         Maintainer: Cistern tests <tests@example.invalid>\n\
         Filename: pool/main/c/cistern-hello/{DEB_NAME}\n\
         Size: {}\n\
         SHA256: {}\n\
         Description: a package served by Cistern's tests\n\n",
        deb.len(),
        sha256_hex(deb),
    );
    let release = format!(
        "Origin: Cistern tests\n\
         Label: Cistern tests\n\
         Suite: stable\n\
         Codename: stable\n\
         Date: Thu, 01 Jan 2026 00:00:00 UTC\n\
         Architectures: amd64\n\
         Components: main\n\
         SHA256:\n {} {} main/binary-amd64/Packages\n",
        sha256_hex(packages.as_bytes()),
        packages.len(),
    );
    origin.put(DEB_PATH, bare(deb.clone()));
    origin.put(
        &format!("{DISTS}/main/binary-amd64/Packages"),
        bare(Bytes::from(packages)),
    );
    origin.put(&format!("{DISTS}/Release"), bare(Bytes::from(release)));
}

/// One machine's apt, entirely under `home`: its own state, cache, lists,
/// configuration and sources, nothing read from /etc/apt or /var.
struct Apt {
    home: PathBuf,
}

impl Apt {
    fn new(home: PathBuf, origin: &Origin, proxy: std::net::SocketAddr) -> Apt {
        for d in [
            "etc/apt/apt.conf.d",
            "etc/apt/sources.list.d",
            "etc/apt/preferences.d",
            "etc/apt/trusted.gpg.d",
            "state/lists/partial",
            "cache/archives/partial",
            "log",
            "dpkg",
            "downloads",
        ] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        std::fs::write(home.join("dpkg/status"), "").unwrap();
        std::fs::write(
            home.join("etc/apt/sources.list"),
            format!(
                "deb [trusted=yes] http://{}/debian stable main\n",
                origin.addr
            ),
        )
        .unwrap();
        let h = home.display();
        // Read through APT_CONFIG, before anything in /etc/apt, so the
        // machine's own apt.conf.d (a proxy, a cleaning hook) plays no part.
        std::fs::write(
            home.join("apt.conf"),
            format!(
                "Dir \"{h}/\";\n\
                 Dir::Etc \"{h}/etc/apt/\";\n\
                 Dir::State \"{h}/state/\";\n\
                 Dir::State::status \"{h}/dpkg/status\";\n\
                 Dir::Cache \"{h}/cache/\";\n\
                 Dir::Log \"{h}/log/\";\n\
                 Debug::NoLocking \"true\";\n\
                 APT::Sandbox::User \"root\";\n\
                 APT::Architecture \"amd64\";\n\
                 APT::Architectures {{ \"amd64\"; }};\n\
                 Acquire::Languages \"none\";\n\
                 Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\n\
                 Acquire::Retries \"0\";\n\
                 Acquire::http::Proxy \"http://{proxy}/\";\n\
                 Acquire::http::Timeout \"20\";\n"
            ),
        )
        .unwrap();
        Apt { home }
    }

    /// Runs `apt-get ARGS` in `downloads/` and returns its output, failing
    /// the test (with Cistern's log) if apt-get fails.
    async fn run(&self, args: &[&str], cistern: &Cistern) -> String {
        let run = tokio::process::Command::new("apt-get")
            .args(args)
            .current_dir(self.home.join("downloads"))
            .env("APT_CONFIG", self.home.join("apt.conf"))
            .env("LC_ALL", "C")
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("apt-get finished within a minute")
            .expect("run apt-get");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "apt-get {args:?} failed:\n{text}\ncistern:\n{}",
            cistern.log()
        );
        // apt-get update succeeds with only a warning when an index could
        // not be fetched; a user would see that as broken.
        assert!(
            !text.contains("W: ") && !text.contains("E: "),
            "apt-get {args:?} warned:\n{text}\ncistern:\n{}",
            cistern.log()
        );
        text
    }

    /// `apt-get update` then `apt-get download PACKAGE`; returns the .deb.
    async fn update_and_download(&self, cistern: &Cistern) -> Vec<u8> {
        self.run(&["update"], cistern).await;
        self.run(&["download", PACKAGE], cistern).await;
        std::fs::read(self.home.join("downloads").join(DEB_NAME)).expect("apt-get saved the .deb")
    }
}

/// `apt-get` twice through plain mode, each time as a fresh machine (its
/// own lists and `Dir::Cache`): the second download of the package is a hit
/// and reaches no mirror; the index files are asked for again each time.
/// With `--no-package-policies` only HTTP's rules are left, and they can
/// reuse nothing the mirror sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_get_through_plain_mode_downloads_a_package_from_the_mirror_once() {
    for tool in ["apt-get", "dpkg-deb"] {
        if !have(tool) {
            return common::skip(&format!(
                "{tool} is not installed (Debian packages apt, dpkg)"
            ));
        }
    }
    let work = tempfile::tempdir().unwrap();
    let deb = build_deb(work.path());
    let origin = Origin::start().await;
    serve_repository(&origin, &deb);
    let release = format!("{DISTS}/Release");
    let in_release = format!("{DISTS}/InRelease");
    let packages = format!("{DISTS}/main/binary-amd64/Packages");

    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::plain(dir.path(), &[]);

    for round in 1..=2 {
        let apt = Apt::new(
            work.path().join(format!("machine{round}")),
            &origin,
            cistern.addr,
        );
        let got = apt.update_and_download(&cistern).await;
        assert_eq!(
            sha256_hex(&got),
            sha256_hex(&deb),
            "round {round}: apt-get saved another file"
        );
        assert_eq!(
            origin.hits(DEB_PATH),
            1,
            "round {round}: the mirror was asked for the .deb again; it saw {:?}",
            origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
        );
        // Index files change in place on a mirror: each update asks for them.
        assert_eq!(origin.hits(&release), round, "Release, round {round}");
        assert_eq!(origin.hits(&in_release), round, "InRelease, round {round}");
        assert_eq!(origin.hits(&packages), round, "Packages, round {round}");
    }
    // The access log tells the first download filled the replica and the
    // second was served from it; the index files were fetched again
    // ("refreshed": the mirror gave nothing to revalidate with).
    let deb_line = |word: &str| format!("{DEB_PATH} 200 {} {word} ", deb.len());
    let log = cistern
        .log_when("the .deb's miss and hit", |log| {
            log.contains(&deb_line("miss")) && log.contains(&deb_line("hit"))
        })
        .await;
    for index in [&release, &packages] {
        let refreshed = format!("{index} 200 ");
        assert!(
            log.lines()
                .any(|l| l.contains(&refreshed) && l.contains(" refreshed ")),
            "{index} was not fetched again:\n{log}"
        );
    }
    drop(cistern);

    // Without the package policies nothing says the .deb may be reused.
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::plain(dir.path(), &["--no-package-policies"]);
    for round in 1..=2 {
        let apt = Apt::new(
            work.path().join(format!("bare{round}")),
            &origin,
            cistern.addr,
        );
        let got = apt.update_and_download(&cistern).await;
        assert_eq!(sha256_hex(&got), sha256_hex(&deb));
    }
    assert_eq!(
        origin.hits(DEB_PATH),
        3,
        "without the package policies each download reaches the mirror"
    );
    let log = cistern
        .log_when("both downloads' access lines", |log| {
            log.matches(&format!("{DEB_PATH} 200 ")).count() >= 2
        })
        .await;
    assert!(!log.contains(&deb_line("hit")), "{log}");
}
