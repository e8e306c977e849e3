//! `ftp://` through the forward proxy, as `ftp_proxy=` clients send it
//! (`GET ftp://host/path HTTP/1.1`): curl against Cistern in front of a
//! real FTP server (pyftpdlib) on loopback. The file is served and cached
//! (one RETR for two downloads), a directory is an HTML index, a missing
//! file is a 404, a refused login a 502 that does not show the password,
//! and a transfer cut short is resumed with REST.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Cistern, free_port, pattern, skip};

const CONFIG: &str = r#"
listen "127.0.0.1:{PORT}"
store {
    root "{ROOT}"
}
forward {
    enabled #true
}
"#;

/// The FTP server, killed when dropped.
struct FtpServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl FtpServer {
    /// Serves `root`, cutting the first RETR after `cut` bytes (0: never);
    /// `None` when pyftpdlib is not installed.
    fn start(dir: &Path, root: &Path, cut: usize) -> Option<FtpServer> {
        let have = Command::new("python3")
            .args(["-c", "import pyftpdlib"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have {
            return None;
        }
        let port = free_port();
        let log = dir.join("ftp-commands.log");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ftp/server.py");
        let out = std::fs::File::create(dir.join("ftp-server.out")).unwrap();
        let child = Command::new("python3")
            .arg(script)
            .arg(root)
            .arg(port.to_string())
            .arg(&log)
            .arg(cut.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the FTP server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the FTP server did not start: {}",
                std::fs::read_to_string(dir.join("ftp-server.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(FtpServer { child, port, log })
    }

    fn url(&self, path: &str) -> String {
        format!("ftp://127.0.0.1:{}{path}", self.port)
    }

    /// The commands the server received.
    fn commands(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn count(&self, verb: &str) -> usize {
        self.commands()
            .iter()
            .filter(|c| c.split(' ').next() == Some(verb))
            .count()
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What curl got for `url` through the proxy at `proxy`.
struct Got {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

fn curl(proxy: &Cistern, url: &str) -> Got {
    curl_with(proxy, url, &["-x", &format!("http://{}", proxy.addr)])
}

/// What curl got for `url`, with `args` (`-x PROXY` or none).
fn curl_with(proxy: &Cistern, url: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let headers = dir.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .arg("-o")
        .arg(&body)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "%{http_code}"])
        .arg(url)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url}: {out:?}\n{}", proxy.log());
    Got {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A served tree: `file.bin` (a year old, so the heuristic freshness of its
/// `Last-Modified` lasts), a directory and a name that needs escaping.
fn tree(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let root = dir.join("ftproot");
    std::fs::create_dir_all(root.join("sub dir")).unwrap();
    let data = pattern(7, len).to_vec();
    let file = root.join("file.bin");
    std::fs::write(&file, &data).unwrap();
    let year_ago = SystemTime::now() - Duration::from_secs(365 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(year_ago)
        .unwrap();
    std::fs::write(root.join("a<b>&c.txt"), b"x").unwrap();
    (root, data)
}

/// Polls the access log for `n` lines naming `what`, within 20 s.
fn access_lines(cistern: &Cistern, what: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = cistern.log();
        if log.lines().filter(|l| l.contains(what)).count() >= n {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {n} lines with {what}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ftp_file_is_served_cached_and_listed() {
    if !have_curl() {
        return skip("curl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = tree(dir.path(), 300_000);
    let Some(ftp) = FtpServer::start(dir.path(), &root, 0) else {
        return skip("pyftpdlib is not installed (python3 -m pip install pyftpdlib)");
    };
    let cistern = Cistern::start(dir.path(), CONFIG, &[]);

    let first = curl(&cistern, &ftp.url("/file.bin"));
    assert_eq!(first.status, 200, "{}", first.headers);
    assert!(first.body == data, "the first download is the file");
    assert!(
        first
            .headers
            .to_ascii_lowercase()
            .contains("last-modified:"),
        "MDTM is the Last-Modified: {}",
        first.headers
    );
    access_lines(&cistern, "/file.bin", 1);
    let second = curl(&cistern, &ftp.url("/file.bin"));
    assert_eq!(second.status, 200);
    assert!(second.body == data, "the second download is the file");
    assert_eq!(
        ftp.count("RETR"),
        1,
        "one RETR for two downloads: {:?}",
        ftp.commands()
    );
    assert!(ftp.count("TYPE") >= 1 && ftp.commands().iter().any(|c| c == "TYPE I"));
    // The replica lives under host:port, like an http one.
    let replica = cistern
        .root
        .join(format!("127.0.0.1:{}", ftp.port))
        .join("file.bin");
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        data,
        "{}",
        replica.display()
    );

    // A client that wants it checked: If-Modified-Since, answered from
    // MDTM with a 304, and still no second RETR.
    let checked = curl_with(
        &cistern,
        &ftp.url("/file.bin"),
        &[
            "-x",
            &format!("http://{}", cistern.addr),
            "-H",
            "Cache-Control: no-cache",
        ],
    );
    assert_eq!(checked.status, 200);
    assert!(checked.body == data);
    assert_eq!(
        ftp.count("MDTM"),
        2,
        "revalidated with MDTM: {:?}",
        ftp.commands()
    );
    assert_eq!(ftp.count("RETR"), 1, "{:?}", ftp.commands());

    let index = curl(&cistern, &ftp.url("/"));
    assert_eq!(index.status, 200);
    let html = String::from_utf8_lossy(&index.body);
    assert!(index.headers.contains("text/html"), "{}", index.headers);
    assert!(html.contains("href=\"file.bin\""), "{html}");
    assert!(html.contains("href=\"sub%20dir/\">sub dir/</a>"), "{html}");
    assert!(
        html.contains("a&lt;b&gt;&amp;c.txt"),
        "names are escaped: {html}"
    );
    assert!(!html.contains("a<b>"), "{html}");

    // A directory named without its slash goes to the slashed URL.
    let bare = curl(&cistern, &ftp.url("/sub%20dir"));
    assert_eq!(bare.status, 301, "{}", bare.headers);
    assert!(bare.headers.contains("/sub%20dir/"), "{}", bare.headers);

    let missing = curl(&cistern, &ftp.url("/nope.bin"));
    assert_eq!(
        missing.status,
        404,
        "{}",
        String::from_utf8_lossy(&missing.body)
    );

    let refused = curl(
        &cistern,
        &format!("ftp://alice:wr0ng@127.0.0.1:{}/other.bin", ftp.port),
    );
    assert_eq!(refused.status, 502);
    let said = String::from_utf8_lossy(&refused.body);
    assert!(said.contains("login"), "{said}");
    assert!(!said.contains("wr0ng"), "the password is not shown: {said}");
    let log = cistern.log();
    assert!(!log.contains("wr0ng"), "nor logged: {log}");
}

#[test]
fn ftp_with_credentials_logs_in_as_the_user() {
    if !have_curl() {
        return skip("curl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = tree(dir.path(), 10_000);
    let Some(ftp) = FtpServer::start(dir.path(), &root, 0) else {
        return skip("pyftpdlib is not installed (python3 -m pip install pyftpdlib)");
    };
    let cistern = Cistern::start(dir.path(), CONFIG, &[]);
    let got = curl(
        &cistern,
        &format!("ftp://alice:s3cret@127.0.0.1:{}/file.bin", ftp.port),
    );
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert!(got.body == data);
    assert!(
        ftp.commands().iter().any(|c| c == "USER alice"),
        "{:?}",
        ftp.commands()
    );
}

#[test]
fn cut_ftp_transfer_resumes_with_rest() {
    if !have_curl() {
        return skip("curl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = tree(dir.path(), 400_000);
    let cut = 150_000;
    let Some(ftp) = FtpServer::start(dir.path(), &root, cut) else {
        return skip("pyftpdlib is not installed (python3 -m pip install pyftpdlib)");
    };
    let cistern = Cistern::start(dir.path(), CONFIG, &[]);
    let got = curl(&cistern, &ftp.url("/file.bin"));
    assert_eq!(got.status, 200, "{}", cistern.log());
    assert!(
        got.body == data,
        "the client gets the whole file, {} bytes",
        got.body.len()
    );
    let commands = ftp.commands();
    // The rest is asked for from where the partial ends (at most where
    // the server cut: the last bytes in flight may be lost with the cut).
    let rest: Vec<usize> = commands
        .iter()
        .filter_map(|c| c.strip_prefix("REST ")?.parse().ok())
        .collect();
    assert!(
        rest.len() == 1 && rest[0] > 0 && rest[0] <= cut,
        "one REST within the first {cut} bytes: {commands:?}"
    );
    assert_eq!(ftp.count("RETR"), 2, "{commands:?}");
}

#[test]
fn ftp_mirror_upstream_is_served_and_cached() {
    if !have_curl() {
        return skip("curl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, data) = tree(dir.path(), 100_000);
    let Some(ftp) = FtpServer::start(dir.path(), &root, 0) else {
        return skip("pyftpdlib is not installed (python3 -m pip install pyftpdlib)");
    };
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{
    root "{{ROOT}}"
}}
mirror "pub" {{
    prefix "/pub/"
    upstream "ftp://127.0.0.1:{}/"
}}
"#,
        ftp.port
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let url = format!("http://{}/pub/file.bin", cistern.addr);
    let first = curl_with(&cistern, &url, &[]);
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(first.body == data);
    access_lines(&cistern, "/pub/file.bin", 1);
    let second = curl_with(&cistern, &url, &[]);
    assert!(second.body == data);
    assert_eq!(ftp.count("RETR"), 1, "{:?}", ftp.commands());
    let replica = cistern
        .root
        .join(format!("127.0.0.1:{}", ftp.port))
        .join("file.bin");
    assert!(replica.is_file(), "{}", replica.display());
    let index = curl_with(&cistern, &format!("http://{}/pub/", cistern.addr), &[]);
    assert_eq!(index.status, 200);
    assert!(String::from_utf8_lossy(&index.body).contains("href=\"file.bin\""));
    let missing = curl_with(&cistern, &format!("http://{}/pub/nope", cistern.addr), &[]);
    assert_eq!(missing.status, 404);
}

#[test]
fn ftp_to_cisterns_own_listener_is_refused() {
    if !have_curl() {
        return skip("curl is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let config = format!("{CONFIG}admin {{\n    listen \"127.0.0.1:{admin}\"\n}}\n");
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let got = curl(&cistern, &format!("ftp://127.0.0.1:{admin}/x"));
    assert_eq!(got.status, 403, "{}", String::from_utf8_lossy(&got.body));
    assert!(
        String::from_utf8_lossy(&got.body).contains("never proxies to itself"),
        "{}",
        String::from_utf8_lossy(&got.body)
    );
}
