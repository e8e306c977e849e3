//! The threads policy hooks run on, away from the async workers.
//!
//! A hook is bounded by its deadline, but a deadline of 50 ms spent on a
//! Tokio worker is 50 ms in which none of that worker's connections move:
//! one crafted request could stall every hit behind it. So a chain's hooks
//! run here, on a few dedicated threads, and the request's task waits for
//! them without holding its worker.
//!
//! Cost: one hand-off (a channel send, a wake, a oneshot back) per chain
//! run, never per hook, and none at all for a route without policies or
//! whose policies do not export the hook (the chain checks before it
//! submits). Dedicated threads rather than `spawn_blocking`: the blocking
//! pool also reads replica files for hits, and a flood of slow hooks must
//! not take its threads from them; here at most [`PolicyThreads::size`]
//! hooks run at once and the rest wait their turn, each bounded by its
//! deadline. The threads start at the first hook, so a process without
//! policies has none.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Native stack of a hook thread: the wasm frames' 512 KiB limit
/// (`MAX_WASM_STACK`) plus the host's own frames, like a Tokio worker's.
const STACK: usize = 2 * 1024 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// A small pool of threads that run policy hooks. Cheap to clone; the
/// threads stop when the last clone is gone.
#[derive(Clone, Default)]
pub(crate) struct PolicyThreads {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Started at the first job; `None` if no thread could be started.
    jobs: OnceLock<Option<Sender<Job>>>,
}

/// The job's thread died before it answered (a bug in the host's side of
/// a hook, caught so the thread lives on).
#[derive(Debug, thiserror::Error)]
#[error("the policy thread running this hook panicked")]
pub(crate) struct HookPanicked;

impl PolicyThreads {
    /// A pool with no thread yet.
    pub(crate) fn new() -> PolicyThreads {
        PolicyThreads::default()
    }

    /// How many hooks run at once at most: one thread per core, at least
    /// two, so one slow hook does not make every other policy request
    /// wait for it.
    pub(crate) fn size() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.max(2)
    }

    /// Runs `work` on a policy thread and waits for it without blocking the
    /// caller's worker. Runs it in place if no thread could be started (the
    /// process is out of threads: better slow than refusing every request).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HookPanicked> {
        let Some(jobs) = self.inner.jobs.get_or_init(|| self.start()) else {
            return Ok(work());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The receiver may be gone (the client left): nothing to do.
            let _ = tx.send(work());
        });
        if jobs.send(job).is_err() {
            // Every thread died, which `catch_unwind` below prevents.
            return Err(HookPanicked);
        }
        rx.await.map_err(|_| HookPanicked)
    }

    fn start(&self) -> Option<Sender<Job>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for n in 0..PolicyThreads::size() {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("cistern-policy-{n}"))
                .stack_size(STACK)
                .spawn(move || serve(&rx));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start policy thread {n}: {e}"),
            }
        }
        (started > 0).then_some(tx)
    }
}

/// One thread's loop: take a job, run it, until every sender is gone.
fn serve(jobs: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, so the
        // threads take turns at the queue and run their jobs in parallel.
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = job else { return };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a policy hook panicked in the host; the request is refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_off_the_caller_and_in_parallel() {
        let pool = PolicyThreads::new();
        let caller = std::thread::current().id();
        let ran_on = pool.run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(ran_on, caller);
        // Two jobs that each wait for the other can only finish if they run
        // at the same time.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (b1, b2) = (Arc::clone(&barrier), Arc::clone(&barrier));
        let started = Instant::now();
        let (a, b) = tokio::join!(pool.run(move || b1.wait()), pool.run(move || b2.wait()));
        a.unwrap();
        b.unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_job_is_reported_and_the_thread_lives_on() {
        let pool = PolicyThreads::new();
        for _ in 0..PolicyThreads::size() + 1 {
            let got = pool.run(|| -> u8 { panic!("host bug") }).await;
            assert!(got.is_err());
        }
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
    }
}
