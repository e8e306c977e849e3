//! One loaded policy: its pre-linked module, its idle instances, the
//! deadline and memory cap of each call, and its counters.
//!
//! # Hooks run inline, a tick at a time
//! A hook runs in the request's own future (`call_async`, on a fiber
//! stack), not on a thread of its own: a hook that returns before the next
//! epoch tick costs a plain call. One that is still running at a tick
//! yields: the fiber suspends, the worker goes back to Tokio and its other
//! connections, and the guest resumes when its task is polled again. So a
//! guest never holds a worker for more than about one [`TICK`], however
//! long its deadline.
//!
//! # Deadlines under load
//! The deadline counts the time the guest *runs*, not the time it waits to
//! be polled again on a busy worker: the epoch callback adds up the slices
//! between a resume and the next yield (a healthy 1 µs hook on a loaded
//! runtime never gets near its deadline). And a slice of wall time may
//! still be one in which the OS gave the thread no CPU, so the running
//! time only *arms* the check: once the guest has run half its deadline,
//! the callback counts the thread's CPU time of each further slice, and
//! the call is interrupted once it has *used* the other half (or after a
//! hard wall cap of ten deadlines from the start, at least one second,
//! waits included). A runaway guest on an idle machine is stopped after
//! about one deadline; a healthy one that lost the CPU is not stopped at
//! all. None of this is on the common path: the callback, and with it
//! every clock read beyond the call's start, runs only at a tick.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use wasmtime::{InstancePre, Store, Trap, TypedFunc, UpdateDeadline};

use super::abi::{CallCtx, Clock, Hook, HostState, Limits};
use super::reuse::OutcomeMemo;
use super::{Failure, PolicyStats};
use crate::config::{Isolation, OnError};

/// The epoch ticker's period: the resolution of deadlines, and about the
/// longest a running guest holds a worker before it yields.
pub(crate) const TICK: Duration = Duration::from_millis(2);

/// Ticks without a guest call after which the epoch ticker sleeps until
/// the next one (about 100 ms): a process whose policies are idle, or that
/// has none, is not woken 500 times a second.
const IDLE_TICKS: u32 = 50;

/// How often a sleeping ticker looks whether its engine is gone. The
/// first guest call wakes it at once; the look only ends the thread of an
/// engine dropped while asleep (tests make many), so once a minute keeps
/// an idle process from being woken every second for nothing.
const PARKED_CHECK: Duration = Duration::from_secs(60);

/// The epoch ticker's state, shared between its thread and every policy,
/// which holds a [`Ticking`] while guest code may run.
#[derive(Default)]
pub(crate) struct Ticker {
    /// Guest calls in flight, yielded ones included: the ticker never
    /// sleeps while there is one, or it would never be interrupted.
    running: AtomicUsize,
    /// A guest call started since the ticker last looked: back-to-back
    /// short calls keep it awake instead of waking it each time.
    active: AtomicBool,
    /// The ticker is asleep, or about to be.
    parked: AtomicBool,
    thread: OnceLock<Thread>,
}

/// A guest call in flight, from before its first instruction to its end
/// (or to the drop of its future); see [`Ticker::enter`].
pub(crate) struct Ticking<'a>(&'a Ticker);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Before a guest call: makes sure the epoch advances until the
    /// returned guard is dropped. Three atomic operations while the ticker
    /// runs; one `unpark` for the first call after an idle spell.
    pub(crate) fn enter(&self) -> Ticking<'_> {
        // SeqCst on both sides: either this sees `parked`, or the ticker
        // sees `running` before it sleeps (see `run_ticker`).
        self.running.fetch_add(1, Ordering::SeqCst);
        self.active.store(true, Ordering::Relaxed);
        if self.parked.load(Ordering::SeqCst)
            && self.parked.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Ticking(self)
    }
}

/// The ticker thread's loop: advances `engine`'s epoch every [`TICK`] while
/// guests run, sleeps after [`IDLE_TICKS`] without one, and ends once the
/// engine is gone.
pub(crate) fn run_ticker(engine: wasmtime::EngineWeak, ticker: Arc<Ticker>) {
    let _ = ticker.thread.set(std::thread::current());
    let mut idle = 0u32;
    loop {
        std::thread::sleep(TICK);
        let Some(strong) = engine.upgrade() else {
            return;
        };
        strong.increment_epoch();
        drop(strong);
        let started = ticker.active.swap(false, Ordering::Relaxed);
        if started || ticker.running.load(Ordering::SeqCst) > 0 {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < IDLE_TICKS {
            continue;
        }
        ticker.parked.store(true, Ordering::SeqCst);
        if ticker.running.load(Ordering::SeqCst) > 0 {
            // A call started meanwhile: keep ticking.
            ticker.parked.store(false, Ordering::SeqCst);
            continue;
        }
        while ticker.parked.load(Ordering::SeqCst) {
            std::thread::park_timeout(PARKED_CHECK);
            if engine.upgrade().is_none() {
                return;
            }
        }
        idle = 0;
    }
}

/// How much a reused instance's memory may grow past its size after
/// instantiation before it is replaced: bounds what one request can leave
/// behind for the next, and returns memory a burst made the guest allocate.
pub(crate) const REUSE_GROWTH_ALLOWANCE: usize = 1024 * 1024;

/// CPU time used by the calling thread, in nanoseconds (one
/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, a real system call: only
/// ever read at a tick); `None` if the clock is unusable, which falls back
/// to running time.
fn thread_cpu_ns() -> Option<u64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(t.tv_sec).ok()?;
    let nanos = u64::try_from(t.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The epoch callback, at a tick while the guest runs: ends the slice in
/// progress, decides whether the call is over budget (see the module
/// docs), and otherwise yields to the executor until the next tick.
fn on_epoch(state: &mut HostState) -> UpdateDeadline {
    let now = Instant::now();
    let deadline = state.deadline;
    let half = deadline / 2;
    let clock = &mut state.clock;
    let hard_cap = (deadline * 10).max(Duration::from_secs(1));
    if now.saturating_duration_since(clock.started) >= hard_cap {
        clock.timed_out = true;
        return UpdateDeadline::Interrupt;
    }
    let slice_start = if clock.yields == 0 {
        clock.started
    } else {
        clock.started + Duration::from_nanos(clock.resume.at_ns.load(Ordering::Relaxed))
    };
    clock.ran += now.saturating_duration_since(slice_start);
    let count_cpu = match clock.cpu_used {
        Some(used) => match thread_cpu_ns() {
            Some(cpu) => {
                let slice = cpu.saturating_sub(clock.resume.cpu_ns.load(Ordering::Relaxed));
                let used = used + Duration::from_nanos(slice);
                if used >= half {
                    clock.timed_out = true;
                    return UpdateDeadline::Interrupt;
                }
                clock.cpu_used = Some(used);
                true
            }
            None => {
                clock.cpu_used = None;
                false
            }
        },
        None if clock.ran >= half && thread_cpu_ns().is_some() => {
            clock.cpu_used = Some(Duration::ZERO);
            true
        }
        None => false,
    };
    if !count_cpu && clock.ran >= deadline {
        // No CPU clock: running time alone.
        clock.timed_out = true;
        return UpdateDeadline::Interrupt;
    }
    clock.yields += 1;
    let started = clock.started;
    let resume = Arc::clone(&clock.resume);
    UpdateDeadline::YieldCustom(
        1,
        Box::pin(async move {
            if BLOCKING.get() {
                YieldOnce(false).await;
            } else {
                // Tokio defers the wake until the worker has run its other
                // ready tasks and polled the I/O driver: a self-wake alone
                // would queue the guest behind ready tasks only, and a few
                // looping guests would keep I/O readiness waiting for up to
                // the driver's polling interval (61 polls).
                tokio::task::yield_now().await;
            }
            let at = nanos(started.elapsed());
            resume.at_ns.store(at, Ordering::Relaxed);
            if count_cpu {
                let cpu = thread_cpu_ns().unwrap_or(0);
                resume.cpu_ns.store(cpu, Ordering::Relaxed);
            }
        }),
    )
}

thread_local! {
    /// This thread is in [`block_on`]: a yield must wake at once, not
    /// wait for a Tokio scheduler that the blocked thread would be running.
    static BLOCKING: Cell<bool> = const { Cell::new(false) };
}

/// Pending once, woken at once.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Runs a future to completion on the calling thread, parking it between
/// polls. Hooks only ever wait for their own yield at a tick, which wakes
/// at once here, so this needs no runtime: it serves the load-time probe
/// and the blocking `PolicyChain::on_request` and siblings (tests, tools).
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BLOCKING.set(self.0);
        }
    }
    let _reset = Reset(BLOCKING.replace(true));
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// An instance with its hooks looked up once.
struct Slot {
    store: Store<HostState>,
    version: TypedFunc<(), i32>,
    on_request: Option<TypedFunc<(), i32>>,
    on_response: Option<TypedFunc<(), i32>>,
    on_body: Option<TypedFunc<(), i32>>,
    baseline: usize,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    traps: AtomicU64,
    memory_limits: AtomicU64,
    guest_errors: AtomicU64,
    reused: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// Settings of one policy, from its declaration.
pub(crate) struct Settings {
    pub(crate) name: Arc<str>,
    pub(crate) origin: String,
    pub(crate) params: Arc<[(String, String)]>,
    pub(crate) on_error: OnError,
    pub(crate) isolation: Isolation,
    pub(crate) deadline: Duration,
    pub(crate) memory_limit: usize,
    pub(crate) has_on_request: bool,
    pub(crate) has_on_response: bool,
    /// Exports `on_body` (ABI version 2) and declares `body-types`.
    pub(crate) has_on_body: bool,
    /// The responses `on_body` receives.
    pub(crate) body: Option<crate::config::BodyRule>,
    /// Imports `reuse_outcome` (ABI version 3): its `on_request` calls
    /// are recorded, and kept when they ask to be.
    pub(crate) reuses_outcomes: bool,
}

/// A loaded policy.
pub(crate) struct Policy {
    pub(crate) settings: Settings,
    pre: InstancePre<HostState>,
    idle: Mutex<Vec<Slot>>,
    idle_cap: usize,
    /// Calls in flight over every policy of the engine: bounds the fiber
    /// stacks and instances that guests yielding at ticks can hold.
    calls: Arc<Semaphore>,
    /// The engine's epoch ticker, woken before guest code runs.
    ticker: Arc<Ticker>,
    counters: Counters,
    /// Kept `on_request` outcomes, for a policy that may reuse them.
    pub(crate) memo: Option<OutcomeMemo>,
}

fn reason(error: &wasmtime::Error) -> String {
    format!("{error:#}")
}

impl Policy {
    /// A policy around a pre-linked module; no instance yet.
    pub(crate) fn new(
        settings: Settings,
        pre: InstancePre<HostState>,
        calls: Arc<Semaphore>,
        ticker: Arc<Ticker>,
    ) -> Policy {
        // One idle instance per core is the steady state (a hook that
        // returns before a tick holds its instance for one poll); twice
        // that absorbs bursts without instantiating.
        let idle_cap = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        Policy {
            memo: settings.reuses_outcomes.then(OutcomeMemo::default),
            settings,
            pre,
            idle: Mutex::new(Vec::new()),
            idle_cap,
            calls,
            ticker,
            counters: Counters::default(),
        }
    }

    /// Starts a call's clock; the first callback comes at the next tick.
    fn arm(&self, store: &mut Store<HostState>) {
        let data = store.data_mut();
        let clock = &mut data.clock;
        clock.started = Instant::now();
        clock.ran = Duration::ZERO;
        clock.cpu_used = None;
        clock.yields = 0;
        clock.timed_out = false;
        data.limits.hit = false;
        store.set_epoch_deadline(1);
    }

    async fn instantiate(&self) -> wasmtime::Result<Slot> {
        let state = HostState {
            policy: Arc::clone(&self.settings.name),
            params: Arc::clone(&self.settings.params),
            memory: None,
            limits: Limits {
                memory: self.settings.memory_limit,
                hit: false,
            },
            deadline: self.settings.deadline,
            clock: Clock {
                started: Instant::now(),
                ran: Duration::ZERO,
                cpu_used: None,
                yields: 0,
                timed_out: false,
                resume: Arc::default(),
            },
            call: None,
        };
        let mut store = Store::new(self.pre.module().engine(), state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut ctx| Ok(on_epoch(ctx.data_mut())));
        // A start function or `_initialize` is guest code too: same deadline.
        self.arm(&mut store);
        let instance = self.pre.instantiate_async(&mut store).await?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::Error::msg("the module exports no memory named `memory`"))?;
        store.data_mut().memory = Some(memory);
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call_async(&mut store, ()).await?;
        }
        let version = instance.get_typed_func::<(), i32>(&mut store, "cistern_abi_version")?;
        let on_request = if self.settings.has_on_request {
            Some(instance.get_typed_func::<(), i32>(&mut store, "on_request")?)
        } else {
            None
        };
        let on_response = if self.settings.has_on_response {
            Some(instance.get_typed_func::<(), i32>(&mut store, "on_response")?)
        } else {
            None
        };
        let on_body = if self.settings.has_on_body {
            Some(instance.get_typed_func::<(), i32>(&mut store, "on_body")?)
        } else {
            None
        };
        let baseline = memory.data_size(&store);
        Ok(Slot {
            store,
            version,
            on_request,
            on_response,
            on_body,
            baseline,
        })
    }

    /// Instantiates once and calls `cistern_abi_version`: proves at load time
    /// that the module links, starts within its limits and speaks our ABI.
    /// Returns the version it reports; the instance is kept for reuse.
    pub(crate) async fn probe(&self) -> Result<i32, String> {
        let _ticking = self.ticker.enter();
        let mut slot = self
            .instantiate()
            .await
            .map_err(|e| format!("cannot instantiate: {}", describe(&e, false)))?;
        self.arm(&mut slot.store);
        let version = slot
            .version
            .call_async(&mut slot.store, ())
            .await
            .map_err(|e| {
                let hit = slot.store.data().limits.hit;
                format!("`cistern_abi_version` failed: {}", describe(&e, hit))
            })?;
        self.release(slot);
        Ok(version)
    }

    /// Returns an instance to the idle pool, or drops it when it is not
    /// worth keeping.
    fn release(&self, slot: Slot) {
        if self.settings.isolation != Isolation::Reuse {
            return;
        }
        let Some(memory) = slot.store.data().memory else {
            return;
        };
        if memory.data_size(&slot.store) > slot.baseline + REUSE_GROWTH_ALLOWANCE {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.idle_cap {
            idle.push(slot);
        }
    }

    /// Runs one hook. The context comes back in every case; on failure the
    /// caller discards its effects.
    pub(crate) async fn run(&self, ctx: CallCtx) -> (CallCtx, Result<(), Failure>) {
        // Uncontended (every hook that returns before a tick), one atomic
        // operation; a wait only when many guests are mid-call at once.
        let _permit = match self.calls.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => self.calls.acquire().await.ok(),
        };
        // Instantiation runs guest code too (a start function).
        let _ticking = self.ticker.enter();
        let started = Instant::now();
        let hook = ctx.hook;
        let reused = match self.settings.isolation {
            Isolation::Reuse => self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop(),
            Isolation::Fresh => None,
        };
        let slot = match reused {
            Some(slot) => Ok(slot),
            None => self.instantiate().await,
        };
        let mut slot = match slot {
            Ok(slot) => slot,
            Err(error) => {
                let failure = Failure::Instantiate(describe(&error, false));
                self.record(started, Some(&failure));
                return (ctx, Err(failure));
            }
        };
        let func = match hook {
            Hook::Request => slot.on_request.clone(),
            Hook::Response => slot.on_response.clone(),
            Hook::Body => slot.on_body.clone(),
        };
        let Some(func) = func else {
            self.release(slot);
            return (ctx, Ok(()));
        };
        self.arm(&mut slot.store);
        slot.store.data_mut().call = Some(ctx);
        let result = func.call_async(&mut slot.store, ()).await;
        let data = slot.store.data_mut();
        let ctx = data
            .call
            .take()
            .expect("the call context stays in the store for the whole call");
        let outcome = match result {
            Ok(0) => Ok(()),
            Ok(code) => Err(Failure::GuestError(code)),
            Err(error) => Err(classify(&error, data.limits.hit, data.clock.timed_out)),
        };
        // A trapped instance may be mid-update of its own data structures:
        // never reuse it. A normal return, even with an error code, leaves
        // the guest consistent.
        if matches!(outcome, Ok(()) | Err(Failure::GuestError(_))) {
            self.release(slot);
        }
        self.record(started, outcome.as_ref().err());
        (ctx, outcome)
    }

    fn record(&self, started: Instant, failure: Option<&Failure>) {
        let c = &self.counters;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.total_ns.fetch_add(ns, Ordering::Relaxed);
        c.max_ns.fetch_max(ns, Ordering::Relaxed);
        if let Some(failure) = failure {
            c.failures.fetch_add(1, Ordering::Relaxed);
            let kind = match failure {
                Failure::Timeout => &c.timeouts,
                Failure::MemoryLimit => &c.memory_limits,
                Failure::Trap(_) => &c.traps,
                Failure::GuestError(_) => &c.guest_errors,
                Failure::Instantiate(_) => return,
            };
            kind.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot of the counters.
    /// Counts an `on_request` answered from a kept outcome.
    pub(crate) fn note_reused(&self) {
        self.counters.reused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> PolicyStats {
        let c = &self.counters;
        PolicyStats {
            name: self.settings.name.to_string(),
            calls: c.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            traps: c.traps.load(Ordering::Relaxed),
            memory_limits: c.memory_limits.load(Ordering::Relaxed),
            guest_errors: c.guest_errors.load(Ordering::Relaxed),
            reused: c.reused.load(Ordering::Relaxed),
            total_time: Duration::from_nanos(c.total_ns.load(Ordering::Relaxed)),
            max_time: Duration::from_nanos(c.max_ns.load(Ordering::Relaxed)),
        }
    }
}

fn classify(error: &wasmtime::Error, limit_hit: bool, timed_out: bool) -> Failure {
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::Timeout,
        _ if timed_out => Failure::Timeout,
        _ if limit_hit => Failure::MemoryLimit,
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(reason(error)),
    }
}

fn describe(error: &wasmtime::Error, limit_hit: bool) -> String {
    match classify(error, limit_hit, false) {
        Failure::Trap(reason) => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_counts_work_and_not_sleep() {
        let start = thread_cpu_ns().expect("a thread CPU clock on Linux");
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_ns().unwrap() - start;
        // Work until the clock shows 20 ms of CPU: it must get there within
        // a few seconds of wall time however loaded the machine is.
        let mut x = 0u64;
        let busy_from = std::time::Instant::now();
        let mut worked = 0;
        while worked < 20_000_000 && busy_from.elapsed() < Duration::from_secs(5) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            worked = thread_cpu_ns().unwrap() - start - slept;
        }
        assert!(slept < 20_000_000, "sleeping used {slept} ns of CPU");
        assert!(worked >= 20_000_000, "5 s of work counted {worked} ns");
    }
}
