//! WebAssembly policies: the wasmtime runtime and the host side of the guest
//! ABI (`guest-sdk/ABI.md`, versions 1 to 3).
//!
//! One [`PolicyEngine`] per process compiles the policies of a config
//! snapshot into a [`PolicySet`] ([`PolicyEngine::load`] checks everything
//! before anything goes live). A route asks the set for its ordered
//! [`PolicyChain`] and runs [`PolicyChain::run_on_request`] and
//! [`PolicyChain::run_on_response`]: each runs the whole chain inline, in
//! the request's own future (`call_async` on a fiber stack). A hook still
//! running at an epoch tick yields the worker and resumes when polled
//! again (`instance`), so a hook that runs to its deadline stalls no other
//! request, and one that returns before a tick costs a plain call. Hooks
//! cost about a microsecond when instances are reused, and a deadline
//! bounds a misbehaving one.
//!
//! Guests are untrusted. Every pointer they pass is bounds-checked, every
//! host cap is an error code, and their edits are buffered and applied only
//! when a hook returns normally. A trap, a timeout, a memory-limit hit or an
//! error returned by the guest follows the policy's `on-error`, is logged
//! with the policy's name and counted in [`PolicyStats`].

mod abi;
pub mod bridge;
mod engine;
mod instance;
mod reuse;

pub use engine::{PolicyChain, PolicyEngine, PolicySet};
pub use reuse::{ChainTrace, KeptChain, KeptDecision, KeptRequest};

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

/// The newest ABI version this host speaks; guests export the one they
/// were built for as `cistern_abi_version`.
pub const ABI_VERSION: i32 = 3;

/// The oldest ABI version this host still runs: version-1 guests work
/// unchanged (version 2 only adds the opt-in `on_body` hook, version 3
/// `reuse_outcome`).
pub const MIN_ABI_VERSION: i32 = 1;

/// Largest body a policy may answer with directly.
pub const MAX_DIRECT_BODY: usize = 64 * 1024;

/// Largest linear memory a policy may declare (`memory=`); the pooling
/// allocator reserves slots of this size.
pub const MAX_MEMORY_LIMIT: u64 = 512 * 1024 * 1024;

/// The request as policies see and edit it.
#[derive(Debug, Clone)]
pub struct RequestView {
    /// The method.
    pub method: Method,
    /// The absolute URL (`http://host/path?query`); policies may rewrite it.
    pub url: Uri,
    /// The request headers; policies may edit them in `on_request`.
    pub headers: HeaderMap,
    /// The client's address.
    pub client: SocketAddr,
    /// The replica key, when a policy (e.g. `store-id`) set one; `None` means
    /// the URL is the key.
    pub cache_key: Option<String>,
    /// Fetch from this absolute URL instead of `url` (the replica still keeps
    /// `url` or `cache_key`).
    pub upstream_url: Option<Uri>,
    /// A policy asked to bypass the cache: neither serve from nor store into
    /// the replica.
    pub bypass_cache: bool,
    /// `cache_key` already parsed, when a kept outcome set it: the proxy
    /// uses it only while its text is still `cache_key`.
    pub(crate) key_hint: Option<std::sync::Arc<reuse::KeyHint>>,
}

impl RequestView {
    /// A view of a request with no policy effects yet.
    pub fn new(method: Method, url: Uri, headers: HeaderMap, client: SocketAddr) -> RequestView {
        RequestView {
            method,
            url,
            headers,
            client,
            cache_key: None,
            upstream_url: None,
            bypass_cache: false,
            key_hint: None,
        }
    }
}

impl Default for RequestView {
    /// A placeholder, left behind while a view is lent to a guest.
    fn default() -> RequestView {
        RequestView::new(
            Method::GET,
            Uri::default(),
            HeaderMap::new(),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        )
    }
}

/// The upstream response head as policies see and edit it in `on_response`.
#[derive(Debug, Clone)]
pub struct ResponseView {
    /// The upstream status.
    pub status: StatusCode,
    /// The response headers; policies may edit them (e.g. rewrite
    /// `Location`).
    pub headers: HeaderMap,
}

impl Default for ResponseView {
    /// A placeholder, left behind while a view is lent to a guest.
    fn default() -> ResponseView {
        ResponseView {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
        }
    }
}

/// What the request chain decided.
#[derive(Debug, Clone)]
pub enum RequestOutcome {
    /// Go on with the (possibly edited) request.
    Continue,
    /// Answer the client with this and do nothing else: a policy's direct
    /// answer or redirect, or 503 from a failed `on-error="deny"` policy.
    Respond(DirectResponse),
}

/// What [`PolicyChain::reuse_on_request`] could settle without a call.
#[derive(Debug)]
pub enum Reuse {
    /// Every `on_request` hook's outcome was kept and applied: the chain
    /// is done, with this decision.
    Kept(RequestOutcome),
    /// The chain's policy at this index must run (and those after it):
    /// [`PolicyChain::run_on_request_from`].
    From(usize),
}

/// A complete, small answer produced without going upstream.
#[derive(Debug, Clone)]
pub struct DirectResponse {
    /// Status code.
    pub status: StatusCode,
    /// Headers set by the policy (e.g. `Location`).
    pub headers: HeaderMap,
    /// Body, at most [`MAX_DIRECT_BODY`] bytes.
    pub body: Bytes,
}

/// The response chain's cache decisions, merged over every policy that
/// returned normally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDecision {
    /// Do not store this response.
    pub uncacheable: bool,
    /// Freshness lifetime overriding the response's headers (the last policy
    /// to set one wins).
    pub ttl: Option<Duration>,
    /// Upper bound on the freshness lifetime (the smallest cap wins).
    pub ttl_cap: Option<Duration>,
    /// Never revalidate.
    pub immutable: bool,
    /// A policy with `on-error="deny"` failed: the proxy answers 502 instead
    /// of this response.
    pub deny: bool,
}

/// What a chain's `on_body` hooks did with a response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyOutcome {
    /// No policy replaced it (none matched, each left it, or each failed
    /// with `on-error="pass"`).
    Unchanged,
    /// The body to store and serve instead.
    Replaced(Bytes),
    /// A policy with `on-error="deny"` failed: answer 502.
    Deny,
}

/// Whether the replica store holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Not stored.
    Absent,
    /// Being filled, or an interrupted partial.
    Partial,
    /// Complete.
    Complete,
}

/// A rate limiter's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitVerdict {
    /// Allowed (and counted).
    Allow,
    /// Over the limit.
    Deny {
        /// When a retry may succeed.
        retry_after: Duration,
    },
}

/// The host engines a policy may question. The proxy implements it over the
/// replica store and the named limiters; calls must be quick and must not
/// block on I/O (they run inside a hook, on the request's async worker).
pub trait PolicyHost: Send + Sync {
    /// The state of the replica for `key` (a cache key or an absolute URL).
    fn replica_state(&self, key: &str) -> ReplicaState;
    /// The URL of a complete replica whose content has this SHA-256.
    fn url_by_sha256(&self, digest: &[u8; 32]) -> Option<String>;
    /// Asks the limiter named `limiter` about `key`; `None` when no limiter
    /// has that name.
    fn limiter_check(&self, limiter: &str, key: &str) -> Option<LimitVerdict>;
}

/// Counters for one policy, for the admin UI and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStats {
    /// The policy's name.
    pub name: String,
    /// Hook calls started.
    pub calls: u64,
    /// Calls that failed for any reason (the next four, and instantiation).
    pub failures: u64,
    /// Calls stopped by the deadline.
    pub timeouts: u64,
    /// Calls that trapped (including stack overflow).
    pub traps: u64,
    /// Calls that failed after the memory cap refused to grow memory.
    pub memory_limits: u64,
    /// Calls whose hook returned an error code.
    pub guest_errors: u64,
    /// `on_request` calls not made because a kept outcome of an earlier
    /// call applied (`reuse_outcome`, ABI version 3).
    pub reused: u64,
    /// Total time spent in calls.
    pub total_time: Duration,
    /// The slowest call.
    pub max_time: Duration,
}

/// Why one hook call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The call ran past its deadline.
    Timeout,
    /// The guest needed more memory than its cap and then trapped.
    MemoryLimit,
    /// The guest trapped (unreachable, division by zero, stack overflow, a
    /// panic in a Rust guest…).
    Trap(String),
    /// The hook returned this non-zero code.
    GuestError(i32),
    /// No instance could be made (pool exhausted, start function failed).
    Instantiate(String),
}

impl Failure {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::MemoryLimit => "memory-limit",
            Failure::Trap(_) => "trap",
            Failure::GuestError(_) => "guest-error",
            Failure::Instantiate(_) => "instantiate",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("deadline exceeded"),
            Failure::MemoryLimit => f.write_str("memory limit reached"),
            Failure::Trap(reason) => write!(f, "trap: {reason}"),
            Failure::GuestError(code) => write!(f, "hook returned error code {code}"),
            Failure::Instantiate(reason) => write!(f, "cannot instantiate: {reason}"),
        }
    }
}

/// A policy that cannot be loaded. Each variant names the policy and, where
/// there is one, the module's origin (file path or `builtin:NAME`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// wasmtime refused the engine configuration (should not happen on a
    /// 64-bit host).
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),
    /// Two declarations share a name.
    #[error("policy `{0}` is declared twice")]
    Duplicate(String),
    /// A chain names a policy that is not declared.
    #[error("no policy named `{0}` is declared")]
    Unknown(String),
    /// The module file could not be read.
    #[error("policy `{policy}`: cannot read {path}: {source}")]
    Read {
        /// The policy.
        policy: String,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `builtin:NAME` names no built-in policy.
    #[error("policy `{policy}`: there is no built-in policy `{name}` (built-ins: {available})")]
    UnknownBuiltin {
        /// The policy.
        policy: String,
        /// The requested built-in.
        name: String,
        /// The built-ins this binary has.
        available: String,
    },
    /// The declared memory cap is above [`MAX_MEMORY_LIMIT`].
    #[error("policy `{policy}`: memory limit {limit} bytes is above the host maximum {max} bytes")]
    MemoryLimit {
        /// The policy.
        policy: String,
        /// The declared cap.
        limit: u64,
        /// The host maximum.
        max: u64,
    },
    /// Not a valid WebAssembly (or WAT) module.
    #[error("policy `{policy}` ({origin}): not a valid WebAssembly module: {reason}")]
    Compile {
        /// The policy.
        policy: String,
        /// Its file or built-in name.
        origin: String,
        /// wasmtime's reason.
        reason: String,
    },
    /// The module does not follow the ABI: unknown imports, missing or
    /// mistyped exports, or it failed to instantiate.
    #[error("policy `{policy}` ({origin}): {reason}")]
    Abi {
        /// The policy.
        policy: String,
        /// Its file or built-in name.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The declaration's `body-types` and the module's `on_body` export
    /// disagree: one without the other would do nothing.
    #[error("policy `{policy}` ({origin}): {reason}")]
    BodyHook {
        /// The policy.
        policy: String,
        /// Its file or built-in name.
        origin: String,
        /// What is missing.
        reason: String,
    },
    /// The module was built for another ABI version.
    #[error(
        "policy `{policy}` ({origin}): built for policy ABI version {found}, but this host speaks versions {MIN_ABI_VERSION} to {expected}; rebuild it against a guest SDK for version {expected}"
    )]
    VersionMismatch {
        /// The policy.
        policy: String,
        /// Its file or built-in name.
        origin: String,
        /// The version the module exports.
        found: i32,
        /// [`ABI_VERSION`].
        expected: i32,
    },
}

/// The names of the policies built into this binary.
pub fn builtin_names() -> Vec<&'static str> {
    engine::builtins().iter().map(|(name, _)| *name).collect()
}
