//! An idle Cistern sleeps: with a mirror, a policy, the admin listener and
//! its config watched, a process that serves nothing is not woken by its
//! own timers (a laptop's or a small box's cache sits idle most of the
//! day). Counted from the kernel's side: voluntary context switches of
//! every thread of the real binary.

mod common;

use std::time::Duration;

use common::{Cistern, Origin, Resource, free_port, get, pattern};

/// Voluntary context switches so far, summed over the process's threads.
fn wakeups(cistern: &Cistern) -> u64 {
    let tasks = format!("/proc/{}/task", cistern.child.id());
    std::fs::read_dir(&tasks)
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Wake-ups over two seconds of doing nothing.
async fn idle_wakeups(cistern: &Cistern) -> u64 {
    let before = wakeups(cistern);
    tokio::time::sleep(Duration::from_secs(2)).await;
    wakeups(cistern) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cistern_is_not_woken_by_its_own_timers() {
    let origin = Origin::start().await;
    origin.put("/pub/file.deb", Resource::new(pattern(2, 4096)));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        r#"
listen "127.0.0.1:{{PORT}}"
store {{ root "{{ROOT}}"; }}
policy "store-id" path="builtin:store-id" {{
    param "rule" "http://*/pub/* http://files.cistern/$2"
}}
mirror "files" {{ prefix "/files/"; upstream "http://{o}/pub/"; policies "store-id"; }}
admin {{ listen "{admin}"; }}
"#,
        o = origin.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let cistern = Cistern::start(dir.path(), &config, &[]);
    // Started, then a miss and a hit (a fill, a guest call, a log line):
    // whatever they set going must settle too.
    for round in ["after start-up", "after serving"] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let woken = idle_wakeups(&cistern).await;
        // A few are the kernel's business (a signal, a page fault); a
        // timer of 1 s would show 2 per thread, the old debouncer's 40.
        assert!(
            woken <= 6,
            "{round}: the idle process was woken {woken} times in 2 s"
        );
        for _ in 0..2 {
            let got = get(cistern.addr, "/files/file.deb").await;
            assert_eq!(got.status, 200, "{}", cistern.log());
        }
    }
    assert_eq!(origin.hits("/pub/file.deb"), 1);
}
