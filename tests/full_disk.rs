//! The disk under the replica runs full: every client still gets its file
//! whole or a clearly failed transfer, never a short one that looks
//! complete, and what is already in the replica stays intact.
//!
//! The replica lives on a small tmpfs mounted for the test, which needs
//! root (or CAP_SYS_ADMIN); elsewhere the test says so and does nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cistern, Origin, Resource, find_files, free_port, get, pattern};

/// A tmpfs of a fixed size, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_disk_passes_bodies_through_and_keeps_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = Tmpfs::mount(&dir.path().join("disk"), "4m") else {
        common::skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        return;
    };
    let origin = Origin::start().await;
    let small = pattern(1, 200_000);
    let iso = pattern(2, 6 << 20);
    let stream = pattern(3, 6 << 20);
    let later = pattern(4, 100_000);
    origin.put("/pool/small.deb", Resource::new(small.clone()));
    origin.put("/iso/big.iso", Resource::new(iso.clone()));
    origin.put(
        "/live/stream.bin",
        Resource::new(stream.clone()).unknown_length(),
    );
    origin.put("/pool/later.deb", Resource::new(later.clone()));
    let admin = free_port();
    let config = format!(
        r#"listen "127.0.0.1:{{PORT}}"
store {{
    root "disk/replica"
    min-free "256KiB"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/"
}}
admin {{
    listen "127.0.0.1:{admin}"
}}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let replica = dir.path().join("disk/replica");
    let partials = dir.path().join("disk/replica.cistern/partial");

    // A file that fits is stored and then served from the replica.
    let got = get(cistern.addr, "/files/pool/small.deb").await;
    assert_eq!(got.bytes(), &small);
    let got = get(cistern.addr, "/files/pool/small.deb").await;
    assert_eq!(got.header("cache-status"), "cistern; hit");

    // 6 MiB on a 4 MiB disk: the length is announced, so Cistern knows up
    // front and passes the body through whole instead of storing it.
    let got = get(cistern.addr, "/files/iso/big.iso").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &iso, "the client gets the whole file");
    assert_eq!(
        got.header("cache-status"),
        "cistern; fwd=uri-miss; detail=no-room"
    );
    cistern
        .log_when("why the ISO was not stored", |log| {
            log.contains("no room to store") && log.contains("big.iso")
        })
        .await;

    // A body of unknown length runs the disk full halfway: that transfer
    // fails visibly, and the partial is removed to give the space back.
    let got = get(cistern.addr, "/files/live/stream.bin").await;
    assert!(
        got.body.is_err(),
        "a transfer cut by a full disk must fail, not look complete"
    );
    cistern
        .log_when("the full disk", |log| log.contains("disk full writing"))
        .await;
    assert_eq!(find_files(&partials), Vec::<String>::new());
    // Meanwhile the same URL is passed through whole.
    let got = get(cistern.addr, "/files/live/stream.bin").await;
    assert_eq!(got.bytes(), &stream);

    // What was stored before is untouched, and with the space given back
    // new files are stored again.
    let got = get(cistern.addr, "/files/pool/small.deb").await;
    assert_eq!(got.header("cache-status"), "cistern; hit");
    assert_eq!(got.bytes(), &small);
    let got = get(cistern.addr, "/files/pool/later.deb").await;
    assert_eq!(got.bytes(), &later);
    let got = get(cistern.addr, "/files/pool/later.deb").await;
    assert_eq!(got.header("cache-status"), "cistern; hit");
    let host = format!("127.0.0.1:{}", origin.addr.port());
    assert_eq!(
        find_files(&replica),
        vec![
            format!("{host}/pool/later.deb"),
            format!("{host}/pool/small.deb"),
        ]
    );
    assert_eq!(
        std::fs::read(replica.join(&host).join("pool/small.deb")).unwrap(),
        small
    );
    // An operator's alert sees it: the ISO, the cut stream and the stream
    // passed through afterwards.
    let metrics = get(format!("127.0.0.1:{admin}").parse().unwrap(), "/metrics").await;
    let text = String::from_utf8_lossy(metrics.bytes()).into_owned();
    assert!(
        text.lines().any(|l| l == "cistern_store_refusals_total 3"),
        "{text}"
    );
    drop(cistern);
    // Give a dying process a moment before the lazy unmount.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_resume_that_no_longer_fits_is_served_whole() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = Tmpfs::mount(&dir.path().join("disk"), "4m") else {
        common::skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)");
        return;
    };
    let origin = Origin::start().await;
    let iso = pattern(5, 3 << 20);
    // The first transfer breaks after 256 KiB, and so does each of the
    // fill's own resumes, leaving a partial of at most 1 MiB to resume.
    let deaths = cistern::fetch::RESUME_ATTEMPTS as usize + 1;
    origin.put(
        "/iso/netinst.iso",
        Resource::new(iso.clone())
            .slow(Duration::from_millis(5))
            .die_after(256 << 10, deaths as u32),
    );
    let config = format!(
        r#"listen "127.0.0.1:{{PORT}}"
store {{
    root "disk/replica"
    min-free "256KiB"
}}
mirror "files" {{
    prefix "/files/"
    upstream "http://{}/"
}}
"#,
        origin.addr
    );
    let cistern = Cistern::start(dir.path(), &config, &[]);
    let partials = dir.path().join("disk/replica.cistern/partial");

    let cut = get(cistern.addr, "/files/iso/netinst.iso").await;
    assert!(cut.body.is_err(), "the cut transfer fails");
    assert_eq!(
        find_files(&partials).len(),
        2,
        "the partial and its metadata"
    );
    // Something else takes 1.5 MiB of the disk: the 2 MiB still to come
    // no longer fit.
    std::fs::write(dir.path().join("disk/other"), vec![0u8; 3 << 19]).unwrap();

    let got = get(cistern.addr, "/files/iso/netinst.iso").await;
    assert_eq!(got.bytes(), &iso, "the whole file, not the resumed tail");
    assert_eq!(
        got.header("cache-status"),
        "cistern; fwd=uri-miss; detail=no-room"
    );
    assert_eq!(
        find_files(&partials),
        Vec::<String>::new(),
        "the partial that cannot be finished gives its space back"
    );
    let ranges: Vec<_> = origin
        .seen()
        .iter()
        .map(|s| {
            s.headers
                .get("range")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    // Asked to resume from what the partial held, then fetched whole for
    // the client.
    let resumed_from = ranges[deaths]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        ranges.len() == deaths + 2
            && ranges[0].is_none()
            && resumed_from.is_some_and(|n| n > 0 && n <= 1 << 20)
            && ranges[deaths + 1].is_none(),
        "{ranges:?}"
    );
}
