//! One loaded policy: its pre-linked module, its idle instances, the
//! deadline and memory cap of each call, and its counters.
//!
//! # Deadlines under load
//! Epoch interruption counts wall time, and on a busy machine a healthy hook
//! that costs a microsecond can be descheduled for tens of milliseconds. So
//! the wall-clock deadline only *arms* the check: when half the deadline has
//! passed, the epoch callback notes the thread's CPU time, and from then on
//! the call is interrupted only once it has *used* the other half in CPU time
//! (or after a hard wall cap of ten deadlines, at least one second). A
//! runaway guest on an idle machine is stopped after about one deadline; a
//! healthy one that lost the CPU is not stopped at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{InstancePre, Store, Trap, TypedFunc, UpdateDeadline};

use super::abi::{CallCtx, Clock, Hook, HostState, Limits};
use super::{Failure, PolicyStats};
use crate::config::{Isolation, OnError};

/// The epoch ticker's period: the resolution of deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(2);

/// How much a reused instance's memory may grow past its size after
/// instantiation before it is replaced: bounds what one request can leave
/// behind for the next, and returns memory a burst made the guest allocate.
pub(crate) const REUSE_GROWTH_ALLOWANCE: usize = 1024 * 1024;

/// Epoch ticks that cover at least `d` from an arbitrary point in a tick.
fn ticks(d: Duration) -> u64 {
    let n = d.as_nanos().div_ceil(TICK.as_nanos());
    u64::try_from(n).unwrap_or(u64::MAX / 2).saturating_add(1)
}

/// CPU time used by the calling thread, in nanoseconds (one
/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`: a vDSO call, no file to read on
/// the worker); `None` if the clock is unusable, which falls back to wall
/// time.
fn thread_cpu_ns() -> Option<u64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let secs = u64::try_from(t.tv_sec).ok()?;
    let nanos = u64::try_from(t.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// The epoch-deadline callback: decides whether a call that reached its
/// armed deadline is really over budget (see the module docs).
fn on_epoch(state: &mut HostState) -> UpdateDeadline {
    let half = state.deadline / 2;
    let elapsed = state.clock.started.elapsed();
    let hard_cap = (state.deadline * 10).max(Duration::from_secs(1));
    if elapsed >= hard_cap {
        state.clock.timed_out = true;
        return UpdateDeadline::Interrupt;
    }
    match (state.clock.cpu_mark, thread_cpu_ns()) {
        (_, None) => {
            if elapsed >= state.deadline {
                state.clock.timed_out = true;
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(ticks(state.deadline - elapsed))
            }
        }
        (None, Some(now)) => {
            state.clock.cpu_mark = Some(now);
            UpdateDeadline::Continue(ticks(half))
        }
        (Some(mark), Some(now)) => {
            let used = Duration::from_nanos(now.saturating_sub(mark));
            if used >= half {
                state.clock.timed_out = true;
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(ticks(half - used))
            }
        }
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
}

/// A loaded policy.
pub(crate) struct Policy {
    pub(crate) settings: Settings,
    pre: InstancePre<HostState>,
    idle: Mutex<Vec<Slot>>,
    idle_cap: usize,
    counters: Counters,
}

fn reason(error: &wasmtime::Error) -> String {
    format!("{error:#}")
}

impl Policy {
    /// A policy around a pre-linked module; no instance yet.
    pub(crate) fn new(settings: Settings, pre: InstancePre<HostState>) -> Policy {
        // One idle instance per policy thread is the steady state; twice
        // that absorbs bursts without instantiating.
        let idle_cap = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        Policy {
            settings,
            pre,
            idle: Mutex::new(Vec::new()),
            idle_cap,
            counters: Counters::default(),
        }
    }

    fn arm(&self, store: &mut Store<HostState>) {
        let data = store.data_mut();
        data.clock = Clock {
            started: Instant::now(),
            cpu_mark: None,
            timed_out: false,
        };
        data.limits.hit = false;
        store.set_epoch_deadline(ticks(self.settings.deadline / 2));
    }

    fn instantiate(&self) -> wasmtime::Result<Slot> {
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
                cpu_mark: None,
                timed_out: false,
            },
            call: None,
        };
        let mut store = Store::new(self.pre.module().engine(), state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut ctx| Ok(on_epoch(ctx.data_mut())));
        // A start function or `_initialize` is guest code too: same deadline.
        self.arm(&mut store);
        let instance = self.pre.instantiate(&mut store)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::Error::msg("the module exports no memory named `memory`"))?;
        store.data_mut().memory = Some(memory);
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ())?;
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
    pub(crate) fn probe(&self) -> Result<i32, String> {
        let mut slot = self
            .instantiate()
            .map_err(|e| format!("cannot instantiate: {}", describe(&e, false)))?;
        self.arm(&mut slot.store);
        let version = slot.version.call(&mut slot.store, ()).map_err(|e| {
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
    pub(crate) fn run(&self, ctx: CallCtx) -> (CallCtx, Result<(), Failure>) {
        let started = Instant::now();
        let hook = ctx.hook;
        let reused = match self.settings.isolation {
            Isolation::Reuse => self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop(),
            Isolation::Fresh => None,
        };
        let mut slot = match reused.map_or_else(|| self.instantiate(), Ok) {
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
        let result = func.call(&mut slot.store, ());
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
