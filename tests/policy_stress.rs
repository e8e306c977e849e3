//! Hostile guests under concurrent load, and deadlines on a busy machine:
//! the host survives, healthy calls are unaffected, failures are counted.

mod policy_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cistern::config::{Isolation, OnError};
use cistern::policy::{RequestOutcome, ResponseView};
use http::StatusCode;
use policy_common::{TestHost, decl, engine, guest, header, request};

/// CPU burners that keep every core busy until dropped.
struct Burners {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Burners {
    fn start(count: usize) -> Burners {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Burners { stop, threads }
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn cores() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

#[test]
fn hostile_guests_under_concurrency_do_not_disturb_healthy_ones() {
    let mut looping = decl("loop", guest("loop.wat"));
    looping.deadline = Duration::from_millis(10);
    let mut bomb = decl("bomb", guest("membomb.wat"));
    bomb.memory_limit = 2 * 1024 * 1024;
    bomb.isolation = Isolation::Fresh;
    let mut trap = decl("trap", guest("trap.wat"));
    trap.on_error = OnError::Deny;
    let oob = decl("oob", guest("oob.wat"));
    let healthy = decl("healthy", guest("healthy.wat"));
    let set = engine().load(&[looping, bomb, trap, oob, healthy]).unwrap();
    let host = TestHost::default().shared();

    const HOSTILE_ROUNDS: usize = 15;
    const HEALTHY_ROUNDS: usize = 2000;
    let mut workers = Vec::new();
    for name in ["loop", "bomb", "trap", "oob"] {
        let chain = set.chain(&[name.into()]).unwrap();
        let host = Arc::clone(&host);
        workers.push(thread::spawn(move || {
            for _ in 0..HOSTILE_ROUNDS {
                let mut req = request("http://mirror.test/", &[]);
                let outcome = chain.on_request(&host, &mut req);
                match name {
                    "trap" => assert!(
                        matches!(outcome, RequestOutcome::Respond(ref a) if a.status == StatusCode::SERVICE_UNAVAILABLE)
                    ),
                    "oob" => assert_eq!(header(&req.headers, "x-oob"), "ok"),
                    _ => assert!(matches!(outcome, RequestOutcome::Continue)),
                }
            }
        }));
    }
    for _ in 0..2 {
        let chain = set.chain(&["healthy".into()]).unwrap();
        let host = Arc::clone(&host);
        workers.push(thread::spawn(move || {
            for _ in 0..HEALTHY_ROUNDS {
                let mut req = request("http://mirror.test/", &[]);
                assert!(matches!(
                    chain.on_request(&host, &mut req),
                    RequestOutcome::Continue
                ));
                assert_eq!(header(&req.headers, "x-healthy"), "1");
                let mut resp = ResponseView::default();
                let decision = chain.on_response(&host, &mut req, &mut resp);
                assert!(!decision.deny);
                assert_eq!(header(&resp.headers, "x-healthy"), "1");
            }
        }));
    }
    for w in workers {
        w.join().expect("no worker panics");
    }
    let stats = set.stats();
    let get = |name: &str| stats.iter().find(|s| s.name == name).unwrap().clone();
    let healthy = get("healthy");
    assert_eq!(healthy.calls, 2 * 2 * HEALTHY_ROUNDS as u64);
    assert_eq!(healthy.failures, 0);
    assert_eq!(get("loop").timeouts, HOSTILE_ROUNDS as u64);
    assert_eq!(get("bomb").memory_limits, HOSTILE_ROUNDS as u64);
    assert_eq!(get("trap").traps, HOSTILE_ROUNDS as u64);
    assert_eq!(get("oob").failures, 0);
}

#[test]
fn a_busy_machine_does_not_time_out_healthy_policies() {
    // Deadlines a little above the 2 ms tick: with a wall-clock deadline,
    // being descheduled for one time slice would kill these calls.
    let mut work = decl("work", guest("work.wat"));
    work.deadline = Duration::from_millis(5);
    let mut healthy = decl("healthy", guest("healthy.wat"));
    healthy.deadline = Duration::from_millis(5);
    let mut looping = decl("loop", guest("loop.wat"));
    looping.deadline = Duration::from_millis(5);
    let set = engine().load(&[work, healthy, looping]).unwrap();
    let host = TestHost::default().shared();

    let burners = Burners::start(cores() * 2);
    let mut callers = Vec::new();
    for _ in 0..cores() {
        let chain = set.chain(&["work".into(), "healthy".into()]).unwrap();
        let host = Arc::clone(&host);
        callers.push(thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(3);
            let mut calls = 0;
            while Instant::now() < until || calls < 50 {
                let mut req = request("http://mirror.test/", &[]);
                chain.on_request(&host, &mut req);
                assert_eq!(header(&req.headers, "x-work"), "done");
                assert_eq!(header(&req.headers, "x-healthy"), "1");
                calls += 1;
            }
        }));
    }
    // A runaway guest is still stopped while the machine is busy.
    let chain = set.chain(&["loop".into()]).unwrap();
    for _ in 0..3 {
        chain.on_request(&host, &mut request("http://mirror.test/", &[]));
    }
    for c in callers {
        c.join().expect("no healthy call was killed");
    }
    drop(burners);
    let stats = set.stats();
    let get = |name: &str| stats.iter().find(|s| s.name == name).unwrap().clone();
    assert_eq!(get("work").failures, 0);
    assert_eq!(get("healthy").failures, 0);
    assert_eq!(get("loop").timeouts, 3);
}

/// Hooks run inline on the runtime and yield at each tick; the time a
/// yielded call then waits for its worker is not counted against its
/// deadline. On a current-thread runtime shared with three guests looping
/// to a 300 ms deadline, a hook doing a few milliseconds of work under a
/// 20 ms deadline yields at each tick during it and waits for the three
/// loops' slices (about 6 ms) each time before it resumes: counted in wall
/// time, or in the thread's CPU time across the waits (the loops' work),
/// many of those calls would time out. None does, and the loops are still
/// stopped at their deadline.
#[test]
fn a_busy_runtime_does_not_time_out_healthy_policies() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // work.wat's loop ten times over: a few milliseconds, so that most
        // calls see a tick or two.
        let dir = tempfile::tempdir().unwrap();
        let wat = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/work.wat"),
        )
        .unwrap()
        .replace("(i32.const 300000)", "(i32.const 3000000)");
        std::fs::write(dir.path().join("longer_work.wat"), wat).unwrap();
        let mut work = decl(
            "work",
            cistern::config::PolicySource::File(dir.path().join("longer_work.wat")),
        );
        work.deadline = Duration::from_millis(20);
        let mut looping = decl("loop", guest("loop.wat"));
        looping.deadline = Duration::from_millis(300);
        let set = engine().load(&[work, looping]).unwrap();
        let host = TestHost::default().shared();
        let loops = set.chain(&["loop".into()]).unwrap();
        let started = Instant::now();
        let loopers: Vec<_> = (0..3)
            .map(|_| {
                let (chain, host) = (loops.clone(), Arc::clone(&host));
                tokio::spawn(async move {
                    let (_, outcome) = chain
                        .run_on_request(&host, request("http://mirror.test/", &[]))
                        .await;
                    (outcome, started.elapsed())
                })
            })
            .collect();
        let chain = set.chain(&["work".into()]).unwrap();
        let mut calls = 0;
        while loopers.iter().any(|l| !l.is_finished()) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the loops never stopped"
            );
            let (req, outcome) = chain
                .run_on_request(&host, request("http://mirror.test/", &[]))
                .await;
            assert!(matches!(outcome, RequestOutcome::Continue));
            assert_eq!(
                header(&req.headers, "x-work"),
                "done",
                "a healthy call was stopped (after {calls} calls, {:?})",
                started.elapsed()
            );
            calls += 1;
            // Let the loops run between calls too.
            tokio::task::yield_now().await;
        }
        for looper in loopers {
            // on-error="pass": the loop's edits (none) are dropped, the
            // request goes on.
            let (outcome, took) = looper.await.unwrap();
            assert!(matches!(outcome, RequestOutcome::Continue));
            assert!(
                took >= Duration::from_millis(150),
                "a loop stopped after {took:?}"
            );
        }
        let stats = set.stats();
        let work = stats.iter().find(|s| s.name == "work").unwrap();
        let looped = stats.iter().find(|s| s.name == "loop").unwrap();
        assert_eq!(looped.timeouts, 3);
        assert_eq!(work.failures, 0, "{work:?}");
        assert!(
            calls >= 20,
            "only {calls} healthy calls while the loops ran"
        );
        eprintln!(
            "{calls} healthy calls, slowest {:?}, the loops ran {:?}",
            work.max_time,
            started.elapsed()
        );
    });
}
