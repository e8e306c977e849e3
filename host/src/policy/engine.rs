//! The process-wide engine, config snapshots of compiled policies, and the
//! per-route chains that run them.

use std::collections::{HashMap, HashSet};
use std::mem;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, Linker, Module,
    PoolingAllocationConfig, ValType,
};

use super::abi::{self, CallCtx, Hook, HostState};
use super::instance::{Policy, Settings, TICK, Ticker, block_on, run_ticker};
use super::reuse::{ChainMemo, ChainTrace, KeptChain, KeptDecision, Replayed};
use super::{
    ABI_VERSION, BodyOutcome, DirectResponse, Failure, MAX_MEMORY_LIMIT, MIN_ABI_VERSION,
    PolicyError, PolicyHost, PolicyStats, RequestOutcome, RequestView, ResponseDecision,
    ResponseView, Reuse,
};
use crate::config::{OnError, PolicyDecl, PolicySource};

include!(concat!(env!("OUT_DIR"), "/builtin_policies.rs"));

/// The built-in policies: (name, module bytes).
pub(crate) fn builtins() -> &'static [(&'static str, &'static [u8])] {
    BUILTINS
}

/// Instances (and so linear memories) the pooling allocator has room for at
/// once: idle reuse instances of every policy plus fresh ones in flight.
const POOL_INSTANCES: u32 = 256;
/// Memory kept mapped when a pooled slot is reused, so a small guest's next
/// instantiation is a memset, not a page fault storm.
const KEEP_RESIDENT: usize = 64 * 1024;
/// Native stack wasm frames may use: deep enough for any sane policy,
/// shallow enough that runaway recursion traps long before the worker
/// thread's 2 MiB stack is at risk.
const MAX_WASM_STACK: usize = 512 * 1024;
/// The fiber stack a call runs on: the wasm frames' [`MAX_WASM_STACK`]
/// plus the host's own (host calls, the store's cache lookups), like a
/// Tokio worker's 2 MiB.
const ASYNC_STACK: usize = 2 * 1024 * 1024;
/// Hook calls in flight at once, over every policy: each holds a fiber
/// stack and an instance until it returns. Half the pool, so the probes of
/// a reload and the idle instances always find room. A call past it waits
/// (a hook that returns before a tick holds its permit for one poll, so
/// only guests running for ticks ever make others wait).
const MAX_CALLS: usize = POOL_INSTANCES as usize / 2;

/// The one wasmtime engine of the process, its epoch ticker, and a cache of
/// compiled modules keyed by content hash so a reload that does not change a
/// file does not recompile it.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<HostState>,
    modules: Mutex<HashMap<[u8; 32], Module>>,
    /// Bounds the calls in flight (see [`MAX_CALLS`]).
    calls: Arc<tokio::sync::Semaphore>,
    /// The epoch ticker, asleep while no guest runs.
    ticker: Arc<Ticker>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine").finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Creates the engine and starts its epoch ticker thread, which stops
    /// when the engine and every module compiled by it are gone.
    pub fn new() -> Result<PolicyEngine, PolicyError> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES)
            .total_stacks(POOL_INSTANCES)
            .max_memory_size(MAX_MEMORY_LIMIT as usize)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .async_stack_size(ASYNC_STACK)
            .max_wasm_stack(MAX_WASM_STACK)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // The pool reserves address space for every slot up front (about a
        // terabyte, nearly none of it ever backed). Where that cannot be
        // had (`ulimit -v`, a profiler's address-space cap), each instance
        // maps its own memory instead: slower to instantiate, same limits
        // (the store's limiter enforces `memory=`).
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(pooled) => {
                config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                let engine = Engine::new(&config).map_err(|e| {
                    PolicyError::Engine(format!("{pooled:#}; without a pool: {e:#}"))
                })?;
                tracing::warn!(
                    target: "cistern::policy",
                    "no room for the policy instance pool ({pooled:#}); policies are instantiated on demand"
                );
                engine
            }
        };
        let linker = abi::linker(&engine).map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        let weak = engine.weak();
        let ticker = Arc::new(Ticker::default());
        let shared = Arc::clone(&ticker);
        std::thread::Builder::new()
            .name("cistern-epoch".into())
            .spawn(move || run_ticker(weak, shared))
            .map_err(|e| PolicyError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(PolicyEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                modules: Mutex::new(HashMap::new()),
                calls: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS)),
                ticker,
            }),
        })
    }

    /// Compiles, links and checks every declared policy (ABI version, hook
    /// signatures, instantiation within its limits) before anything goes
    /// live. Reads files and may compile: call it off the async workers
    /// (e.g. from `spawn_blocking`) when reloading.
    pub fn load(&self, decls: &[PolicyDecl]) -> Result<PolicySet, PolicyError> {
        let mut policies = Vec::with_capacity(decls.len());
        let mut names = HashSet::new();
        let mut used = HashSet::new();
        for decl in decls {
            if !names.insert(decl.name.as_str()) {
                return Err(PolicyError::Duplicate(decl.name.clone()));
            }
            if decl.memory_limit > MAX_MEMORY_LIMIT {
                return Err(PolicyError::MemoryLimit {
                    policy: decl.name.clone(),
                    limit: decl.memory_limit,
                    max: MAX_MEMORY_LIMIT,
                });
            }
            let (bytes, origin) = self.source(decl)?;
            if let Some(body) = &decl.body
                && body.max.saturating_mul(2) > decl.memory_limit
            {
                // The guest holds the body and its replacement at once: a
                // cap it cannot hold would fail every call at the cap.
                return Err(PolicyError::BodyHook {
                    policy: decl.name.clone(),
                    origin,
                    reason: format!(
                        "body-max of {} bytes needs a memory of at least twice that (about three times is right), but memory is {} bytes",
                        body.max, decl.memory_limit
                    ),
                });
            }
            let hash: [u8; 32] = Sha256::digest(&bytes).into();
            used.insert(hash);
            let module = self.compile(decl, &origin, hash, &bytes)?;
            let abi_error = |reason: String| PolicyError::Abi {
                policy: decl.name.clone(),
                origin: origin.clone(),
                reason,
            };
            let (has_on_request, has_on_response, exports_on_body) =
                check_exports(&module).map_err(abi_error)?;
            let reuses_outcomes = module
                .imports()
                .any(|i| i.module() == "cistern" && i.name() == "reuse_outcome");
            let pre = self
                .inner
                .linker
                .instantiate_pre(&module)
                .map_err(|e| abi_error(format!("imports do not match the ABI: {e:#}")))?;
            let policy = Policy::new(
                Settings {
                    name: Arc::from(decl.name.as_str()),
                    origin: origin.clone(),
                    params: decl.params.clone().into(),
                    on_error: decl.on_error,
                    isolation: decl.isolation,
                    deadline: decl.deadline.max(TICK),
                    memory_limit: usize::try_from(decl.memory_limit).unwrap_or(usize::MAX),
                    has_on_request,
                    has_on_response,
                    has_on_body: exports_on_body && decl.body.is_some(),
                    body: decl.body.clone(),
                    reuses_outcomes,
                },
                pre,
                Arc::clone(&self.inner.calls),
                Arc::clone(&self.inner.ticker),
            );
            let version = block_on(policy.probe()).map_err(abi_error)?;
            if !(MIN_ABI_VERSION..=ABI_VERSION).contains(&version) {
                return Err(PolicyError::VersionMismatch {
                    policy: decl.name.clone(),
                    origin,
                    found: version,
                    expected: ABI_VERSION,
                });
            }
            if reuses_outcomes && version < 3 {
                return Err(abi_error(format!(
                    "imports `reuse_outcome`, which ABI version {version} does not have; export `cistern_abi_version` returning 3"
                )));
            }
            let body_error = |reason: &str| PolicyError::BodyHook {
                policy: decl.name.clone(),
                origin: origin.clone(),
                reason: reason.to_owned(),
            };
            match (exports_on_body, decl.body.is_some()) {
                (true, _) if version < 2 => {
                    return Err(body_error(
                        "exports `on_body`, which ABI version 1 does not have; export `cistern_abi_version` returning 2",
                    ));
                }
                (true, false) => {
                    return Err(body_error(
                        "exports `on_body` but its declaration names no `body-types`, so the hook would never run",
                    ));
                }
                (false, true) => {
                    return Err(body_error(
                        "declares `body-types` but the module exports no `on_body` hook (ABI version 2)",
                    ));
                }
                _ => {}
            }
            policies.push(Arc::new(policy));
        }
        // Keep only what this snapshot uses: a file edited ten times leaves
        // one compiled module behind, not ten.
        self.inner
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|hash, _| used.contains(hash));
        Ok(PolicySet {
            policies: Arc::new(policies),
        })
    }

    fn source(&self, decl: &PolicyDecl) -> Result<(Vec<u8>, String), PolicyError> {
        match &decl.source {
            PolicySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| PolicyError::Read {
                    policy: decl.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
                Ok((bytes, path.display().to_string()))
            }
            PolicySource::Builtin(name) => {
                let (_, bytes) = builtins().iter().find(|(n, _)| n == name).ok_or_else(|| {
                    PolicyError::UnknownBuiltin {
                        policy: decl.name.clone(),
                        name: name.clone(),
                        available: super::builtin_names().join(", "),
                    }
                })?;
                Ok((bytes.to_vec(), format!("builtin:{name}")))
            }
        }
    }

    fn compile(
        &self,
        decl: &PolicyDecl,
        origin: &str,
        hash: [u8; 32],
        bytes: &[u8],
    ) -> Result<Module, PolicyError> {
        if let Some(module) = self.cached(&hash) {
            return Ok(module);
        }
        // Compile outside the lock: it takes milliseconds and other loads
        // (tests, a reload racing a start) should not queue behind it.
        let module = Module::new(&self.inner.engine, bytes).map_err(|e| PolicyError::Compile {
            policy: decl.name.clone(),
            origin: origin.to_owned(),
            reason: format!("{e:#}"),
        })?;
        self.inner
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, module.clone());
        Ok(module)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Module> {
        let modules = self.inner.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.get(hash).cloned()
    }

    /// How many compiled modules the cache holds (for tests and the admin
    /// UI).
    pub fn cached_modules(&self) -> usize {
        self.inner
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Checks the exports the ABI requires; returns which hooks exist
/// (`on_request`, `on_response`, `on_body`).
fn check_exports(module: &Module) -> Result<(bool, bool, bool), String> {
    let mut memory = false;
    let mut version = false;
    let mut hooks = (false, false, false);
    for export in module.exports() {
        let is_i32_thunk = |ty: &ExternType| match ty {
            ExternType::Func(f) => {
                f.params().len() == 0
                    && f.results().len() == 1
                    && matches!(f.results().next(), Some(ValType::I32))
            }
            _ => false,
        };
        let ty = export.ty();
        match export.name() {
            "memory" => memory = matches!(ty, ExternType::Memory(_)),
            name @ ("cistern_abi_version" | "on_request" | "on_response" | "on_body") => {
                if !is_i32_thunk(&ty) {
                    return Err(format!("export `{name}` must be a function `() -> i32`"));
                }
                match name {
                    "cistern_abi_version" => version = true,
                    "on_request" => hooks.0 = true,
                    "on_response" => hooks.1 = true,
                    _ => hooks.2 = true,
                }
            }
            _ => {}
        }
    }
    if !version {
        return Err(format!(
            "no `cistern_abi_version` export: not a Cistern policy (this host speaks ABI version {ABI_VERSION})"
        ));
    }
    if !memory {
        return Err("no memory exported as `memory`".into());
    }
    if hooks == (false, false, false) {
        return Err("exports none of `on_request`, `on_response` and `on_body`".into());
    }
    Ok(hooks)
}

/// The compiled policies of one config snapshot. Cheap to clone; dropping
/// the last clone (and its chains) frees the instances.
#[derive(Clone, Default)]
pub struct PolicySet {
    policies: Arc<Vec<Arc<Policy>>>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl PolicySet {
    /// The declared policies' names, in declaration order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| &*p.settings.name).collect()
    }

    /// The chain for a route's ordered list of policy names.
    pub fn chain(&self, names: &[String]) -> Result<PolicyChain, PolicyError> {
        let chain = names
            .iter()
            .map(|name| {
                self.policies
                    .iter()
                    .find(|p| &*p.settings.name == name.as_str())
                    .cloned()
                    .ok_or_else(|| PolicyError::Unknown(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let on_request = || chain.iter().filter(|p| p.settings.has_on_request);
        // A chain whose every request hook may keep its outcomes may keep
        // its whole decision.
        let whole = (on_request().next().is_some() && on_request().all(|p| p.memo.is_some()))
            .then(|| Arc::new(ChainMemo::default()));
        Ok(PolicyChain {
            whole,
            has_on_request: chain.iter().any(|p| p.settings.has_on_request),
            has_on_response: chain.iter().any(|p| p.settings.has_on_response),
            has_on_body: chain.iter().any(|p| p.settings.has_on_body),
            policies: chain.into(),
        })
    }

    /// Counters for every policy, in declaration order.
    pub fn stats(&self) -> Vec<PolicyStats> {
        self.policies.iter().map(|p| p.stats()).collect()
    }
}

/// A route's ordered policies. Cheap to clone; the empty chain does nothing
/// and costs nothing.
#[derive(Clone, Default)]
pub struct PolicyChain {
    policies: Arc<[Arc<Policy>]>,
    /// The chain's kept whole decisions, when every `on_request` hook may
    /// keep its outcomes.
    whole: Option<Arc<ChainMemo>>,
    /// Some policy exports `on_request`: without one a request builds no
    /// call context.
    has_on_request: bool,
    /// Some policy exports `on_response`.
    has_on_response: bool,
    /// Some policy exports `on_body` and declares `body-types`.
    has_on_body: bool,
}

impl std::fmt::Debug for PolicyChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.policies.iter().map(|p| &*p.settings.name))
            .finish()
    }
}

fn log_failure(policy: &Policy, hook: Hook, failure: &Failure) {
    let on_error = match policy.settings.on_error {
        OnError::Pass => "pass",
        OnError::Deny => "deny",
    };
    tracing::warn!(
        policy = &*policy.settings.name,
        module = %policy.settings.origin,
        hook = hook.export(),
        kind = failure.as_str(),
        on_error,
        "policy failed: {failure}"
    );
}

fn host_panicked(hook: Hook) {
    tracing::error!(
        hook = hook.export(),
        "a policy hook panicked in the host; the request is refused"
    );
}

fn denied() -> DirectResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    DirectResponse {
        status: StatusCode::SERVICE_UNAVAILABLE,
        headers,
        body: Bytes::from_static(b"503 Service Unavailable: a policy failed\n"),
    }
}

impl PolicyChain {
    /// No policies: the proxy can skip building views.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| &*p.settings.name).collect()
    }

    /// Some policy of the chain exports `on_response`: without one an
    /// upstream response needs no hook.
    pub fn has_on_response(&self) -> bool {
        self.has_on_response
    }

    /// Some policy of the chain wants whole bodies (`on_body`).
    pub fn has_on_body(&self) -> bool {
        self.has_on_body
    }

    /// The largest body any `on_body` policy of the chain takes for a
    /// response of this `Content-Type`; `None` when no policy wants it, so
    /// the body streams as usual.
    pub fn body_limit(&self, content_type: &str) -> Option<u64> {
        self.body_policies(content_type)
            .filter_map(|p| p.settings.body.as_ref().map(|b| b.max))
            .max()
    }

    fn body_policies<'a>(&'a self, content_type: &'a str) -> impl Iterator<Item = &'a Policy> {
        self.policies
            .iter()
            .filter(|p| p.settings.has_on_body)
            .filter(move |p| {
                p.settings
                    .body
                    .as_ref()
                    .is_some_and(|b| b.matches(content_type))
            })
            .map(|p| &**p)
    }

    /// Runs `on_body` of the chain (see [`PolicyChain::on_body`]) in the
    /// caller's future (see [`PolicyChain::run_on_request`]).
    pub async fn run_on_body(
        &self,
        host: &Arc<dyn PolicyHost>,
        mut req: RequestView,
        mut resp: ResponseView,
        body: Bytes,
    ) -> (RequestView, BodyOutcome) {
        if !self.has_on_body {
            return (req, BodyOutcome::Unchanged);
        }
        let ran = AssertUnwindSafe(self.body_chain(host, &mut req, &mut resp, body))
            .catch_unwind()
            .await;
        match ran {
            Ok(outcome) => (req, outcome),
            Err(_) => {
                host_panicked(Hook::Body);
                (RequestView::default(), BodyOutcome::Deny)
            }
        }
    }

    /// Runs `on_body` of each policy whose `body-types` name the
    /// response's `Content-Type`, in order, each on the body the previous
    /// one left. A body over a policy's `body-max` skips that policy (and
    /// the log says so); a failed `pass` policy's replacement is discarded;
    /// a failed `deny` policy stops the chain with [`BodyOutcome::Deny`].
    ///
    /// Blocks the calling thread until the chain is done (for tests and
    /// tools; the proxy awaits [`PolicyChain::run_on_body`]).
    pub fn on_body(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
        resp: &mut ResponseView,
        body: Bytes,
    ) -> BodyOutcome {
        block_on(self.body_chain(host, req, resp, body))
    }

    async fn body_chain(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
        resp: &mut ResponseView,
        body: Bytes,
    ) -> BodyOutcome {
        let content_type = resp
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut current = body;
        let mut replaced = false;
        for policy in self.body_policies(&content_type) {
            let Some(rule) = &policy.settings.body else {
                continue;
            };
            if current.len() as u64 > rule.max {
                tracing::info!(
                    policy = &*policy.settings.name,
                    url = %req.url,
                    bytes = current.len(),
                    body_max = rule.max,
                    "body passes through this policy unchanged: larger than its body-max"
                );
                continue;
            }
            let mut ctx = CallCtx::new(
                Hook::Body,
                Arc::clone(host),
                mem::take(req),
                mem::take(resp),
            );
            ctx.body = current.clone();
            // Room for a rewrite that lengthens every URL, bounded so a
            // looping guest cannot make the host hold more.
            ctx.body_out_cap = usize::try_from(rule.max.saturating_mul(2))
                .unwrap_or(usize::MAX)
                .saturating_add(64 * 1024);
            let (ctx, result) = policy.run(ctx).await;
            *req = ctx.req;
            *resp = ctx.resp;
            match result {
                Ok(()) => {
                    if let Some(out) = ctx.body_out {
                        current = Bytes::from(out);
                        replaced = true;
                    }
                }
                Err(failure) => {
                    log_failure(policy, Hook::Body, &failure);
                    if policy.settings.on_error == OnError::Deny {
                        return BodyOutcome::Deny;
                    }
                }
            }
        }
        if replaced {
            BodyOutcome::Replaced(current)
        } else {
            BodyOutcome::Unchanged
        }
    }

    /// Whether the chain may keep its whole decision for a path of its
    /// route: a caller whose URL is a function of the path passes a
    /// [`ChainTrace`] to [`PolicyChain::reuse_on_request`].
    pub fn keeps_whole(&self) -> bool {
        self.whole.as_ref().is_some_and(|w| w.is_on())
    }

    /// The chain's kept whole decision for `method` and `rest` (the path
    /// below the route), counted as a reuse by each policy it stands for.
    pub fn kept_whole(&self, method: &Method, rest: &str) -> Option<Arc<KeptChain>> {
        let kept = self.whole.as_ref()?.get(method, rest)?;
        for policy in self
            .policies
            .iter()
            .filter(|p| p.settings.has_on_request)
            .take(kept.reused)
        {
            policy.note_reused();
        }
        Some(kept)
    }

    /// Keeps `decision`, reached from kept outcomes alone as `trace` saw
    /// them, for `method` and `rest` (see [`PolicyChain::kept_whole`]).
    pub fn keep_whole(
        &self,
        method: &Method,
        rest: &str,
        trace: ChainTrace,
        decision: KeptDecision,
    ) {
        if let Some(whole) = &self.whole {
            whole.keep(method, rest, trace, decision);
        }
    }

    /// Runs the chain's `on_request` hooks (see
    /// [`PolicyChain::on_request`]) in the caller's future. A hook that
    /// returns before the next epoch tick is a plain call; one still
    /// running at a tick yields the worker to the runtime's other tasks and
    /// resumes when polled again, so a hook that runs to its deadline holds
    /// no worker for more than about a tick. A chain without an
    /// `on_request` hook returns at once. A panic in the host's side of a
    /// hook (a bug) is caught here and refuses the request with a 503.
    pub async fn run_on_request(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: RequestView,
    ) -> (RequestView, RequestOutcome) {
        let mut req = req;
        match self.reuse_on_request(&mut req, None) {
            Reuse::Kept(outcome) => (req, outcome),
            Reuse::From(i) => self.run_on_request_from(host, req, i).await,
        }
    }

    /// Applies kept outcomes (`reuse_outcome`, ABI version 3) of the
    /// chain's `on_request` hooks in order, without a call or a future:
    /// `Kept(outcome)` when every hook's was kept (the whole chain is
    /// done), `From(i)` when the `i`-th hook must run, for
    /// [`PolicyChain::run_on_request_from`]. On a hit whose policies all
    /// keep their outcomes this is the whole cost of the chain. `trace`
    /// collects what a `Kept` result may be kept as, for
    /// [`PolicyChain::keep_whole`].
    pub fn reuse_on_request(&self, req: &mut RequestView, trace: Option<&mut ChainTrace>) -> Reuse {
        if !self.has_on_request {
            return Reuse::Kept(RequestOutcome::Continue);
        }
        self.reuse_from(0, req, trace)
    }

    /// [`PolicyChain::reuse_on_request`] from the chain's `start`-th
    /// policy on: the one place a kept outcome is applied.
    fn reuse_from(
        &self,
        start: usize,
        req: &mut RequestView,
        mut trace: Option<&mut ChainTrace>,
    ) -> Reuse {
        for (i, policy) in self.policies.iter().enumerate().skip(start) {
            if !policy.settings.has_on_request {
                continue;
            }
            let Some(memo) = &policy.memo else {
                return Reuse::From(i);
            };
            match memo.replay(req, trace.as_deref_mut()) {
                Replayed::Miss => return Reuse::From(i),
                Replayed::Continue => policy.note_reused(),
                Replayed::Respond(status, headers, body) => {
                    policy.note_reused();
                    return Reuse::Kept(RequestOutcome::Respond(DirectResponse {
                        status,
                        headers,
                        body,
                    }));
                }
            }
        }
        Reuse::Kept(RequestOutcome::Continue)
    }

    /// [`PolicyChain::run_on_request`] from the chain's `from`-th policy
    /// on: the rest of a chain [`PolicyChain::reuse_on_request`] stopped
    /// in. That policy is called (its kept outcome, if any, was just
    /// looked for); the ones after it are reused where they can be.
    pub async fn run_on_request_from(
        &self,
        host: &Arc<dyn PolicyHost>,
        mut req: RequestView,
        from: usize,
    ) -> (RequestView, RequestOutcome) {
        let ran = AssertUnwindSafe(self.request_chain_from(host, &mut req, from))
            .catch_unwind()
            .await;
        match ran {
            Ok(outcome) => (req, outcome),
            // A panic is a bug of the host, not a policy's failure: no
            // `on-error` applies, and refusing is the only safe answer.
            Err(_) => {
                host_panicked(Hook::Request);
                (RequestView::default(), RequestOutcome::Respond(denied()))
            }
        }
    }

    /// Runs the chain's `on_response` hooks (see
    /// [`PolicyChain::on_response`]) in the caller's future, like
    /// [`PolicyChain::run_on_request`]; returns the views as the chain left
    /// them and its decision.
    pub async fn run_on_response(
        &self,
        host: &Arc<dyn PolicyHost>,
        mut req: RequestView,
        mut resp: ResponseView,
    ) -> (RequestView, ResponseView, ResponseDecision) {
        if !self.has_on_response {
            return (req, resp, ResponseDecision::default());
        }
        let ran = AssertUnwindSafe(self.response_chain(host, &mut req, &mut resp))
            .catch_unwind()
            .await;
        match ran {
            Ok(decision) => (req, resp, decision),
            Err(_) => {
                host_panicked(Hook::Response);
                let deny = ResponseDecision {
                    deny: true,
                    ..ResponseDecision::default()
                };
                (RequestView::default(), ResponseView::default(), deny)
            }
        }
    }

    /// Runs `on_request` of each policy in order, letting each edit `req`.
    /// Stops at the first direct answer (or at a failed `deny` policy,
    /// answering 503). A failed `pass` policy's edits are discarded. Blocks
    /// the calling thread until the chain is done (for tests and tools):
    /// the proxy awaits [`PolicyChain::run_on_request`] instead.
    pub fn on_request(&self, host: &Arc<dyn PolicyHost>, req: &mut RequestView) -> RequestOutcome {
        block_on(self.request_chain(host, req))
    }

    async fn request_chain(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
    ) -> RequestOutcome {
        match self.reuse_on_request(req, None) {
            Reuse::Kept(outcome) => outcome,
            Reuse::From(i) => self.request_chain_from(host, req, i).await,
        }
    }

    /// Calls the `from`-th policy's `on_request`, then goes on with the
    /// next one whose outcome was not kept, until the chain ends or one
    /// answers.
    async fn request_chain_from(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
        mut from: usize,
    ) -> RequestOutcome {
        while let Some(policy) = self.policies.get(from) {
            if let Some(outcome) = Self::call_on_request(policy, host, req).await {
                return outcome;
            }
            match self.reuse_from(from + 1, req, None) {
                Reuse::Kept(outcome) => return outcome,
                Reuse::From(next) => from = next,
            }
        }
        RequestOutcome::Continue
    }

    /// One policy's `on_request` call, its outcome kept when it asked:
    /// `Some` when the chain stops here (a direct answer, or a failed
    /// `deny` policy's 503).
    async fn call_on_request(
        policy: &Policy,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
    ) -> Option<RequestOutcome> {
        if !policy.settings.has_on_request {
            return None;
        }
        let mut ctx = CallCtx::new(
            Hook::Request,
            Arc::clone(host),
            mem::take(req),
            ResponseView::default(),
        );
        if policy.memo.is_some() {
            ctx.recording = Some(Box::default());
        }
        let (mut ctx, result) = policy.run(ctx).await;
        match result {
            Ok(()) => {
                if let (Some(memo), Some(recording)) = (&policy.memo, ctx.recording.take()) {
                    let answer = ctx
                        .answer
                        .as_ref()
                        .map(|(s, b)| (*s, &ctx.answer_headers, b));
                    memo.keep(&ctx.req_backup.original(&ctx.req), *recording, answer);
                }
                *req = ctx.req;
                if let Some((status, body)) = ctx.answer {
                    return Some(RequestOutcome::Respond(DirectResponse {
                        status,
                        headers: ctx.answer_headers,
                        body,
                    }));
                }
            }
            Err(failure) => {
                let mut restored = ctx.req;
                ctx.req_backup.restore(&mut restored);
                *req = restored;
                log_failure(policy, Hook::Request, &failure);
                if policy.settings.on_error == OnError::Deny {
                    return Some(RequestOutcome::Respond(denied()));
                }
            }
        }
        None
    }

    /// Runs `on_response` of each policy in order, letting each edit `resp`
    /// and merging their cache decisions. `req` is only read; it is `&mut`
    /// so it can be lent to the guest without a copy. A failed `deny` policy
    /// sets [`ResponseDecision::deny`] and stops the chain. Blocks the
    /// calling thread (for tests and tools): the proxy awaits
    /// [`PolicyChain::run_on_response`].
    pub fn on_response(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
        resp: &mut ResponseView,
    ) -> ResponseDecision {
        block_on(self.response_chain(host, req, resp))
    }

    async fn response_chain(
        &self,
        host: &Arc<dyn PolicyHost>,
        req: &mut RequestView,
        resp: &mut ResponseView,
    ) -> ResponseDecision {
        let mut decision = ResponseDecision::default();
        for policy in self.policies.iter().filter(|p| p.settings.has_on_response) {
            let ctx = CallCtx::new(
                Hook::Response,
                Arc::clone(host),
                mem::take(req),
                mem::take(resp),
            );
            let (ctx, result) = policy.run(ctx).await;
            *req = ctx.req;
            match result {
                Ok(()) => {
                    *resp = ctx.resp;
                    let cache = ctx.cache;
                    decision.uncacheable |= cache.uncacheable;
                    decision.immutable |= cache.immutable;
                    decision.ttl = cache.ttl.or(decision.ttl);
                    decision.ttl_cap = match (decision.ttl_cap, cache.ttl_cap) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Err(failure) => {
                    resp.status = ctx.resp.status;
                    resp.headers = ctx.resp_backup.unwrap_or(ctx.resp.headers);
                    log_failure(policy, Hook::Response, &failure);
                    if policy.settings.on_error == OnError::Deny {
                        decision.deny = true;
                        break;
                    }
                }
            }
        }
        decision
    }
}
