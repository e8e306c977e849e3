//! The coalescing fetch engine: one upstream fetch per cache key, however
//! many clients ask at once.
//!
//! The first request for a key starts a [`Fill`]: a task of its own that
//! fetches from the upstream (failing over along a mirror set), writes the
//! body into the key's partial file while hashing it, and commits it to the
//! replica store. Every client of that key, the first one included, is a
//! reader of the growing file (see [`crate::serve`]), so no client's
//! disconnect can cancel the fill for the others. A fill nobody reads any
//! more keeps going only if it is nearly done (`orphan-finish-left`,
//! `orphan-finish-done`), and then for at most `orphan-fill`; otherwise it
//! stops at once, keeping its partial for a later resume. Each fill holds
//! a place under `max-fills` (see `permits`) until its task ends.
//!
//! A fill moves through [`FillState`]: `Waiting` → `Streaming` →
//! `Complete`, or ends `Unverified` (a body that ended with the upstream
//! connection and no digest to prove it whole: served, not stored),
//! `Revalidated` (a 304 refreshed the replica),
//! `Unshared` (the response may not be shared: each client fetches on its
//! own) or `Failed` (followers see a failed transfer, never a short body).
//!
//! This file is the facade: [`FetchEngine`], [`FillJob`], [`Upstreams`],
//! [`FetchSettings`] and the policy hook's types. The work is done in
//! `coalesce` (fills, their states and the in-flight registry), `fill`
//! (the fill task's decision tree), `failover` (sending along the
//! upstreams), `mirror` (choosing and healing them), `redirect` (what a
//! redirecting mirror keeps serving itself), `probe` (their
//! health probes), `sink` (writing and hashing the body), `headers` (response
//! header parsers) and `error` ([`FetchError`]).

mod coalesce;
pub mod confine;
mod error;
mod failover;
mod fill;
pub mod ftp;
mod headers;
pub mod mirror;
pub mod peer;
mod permits;
mod probe;
pub mod redirect;
mod sink;
mod upgrade;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::config::CacheMode;
use crate::limit::Limits;
use crate::observe::Metrics;
use crate::store::{CacheKey, Replica, ReplicaStore, StoreError};

pub use coalesce::{Fill, FillHead, FillState, FillTicket};
pub use error::{ErrorKind, FetchError, RetryType, Side, error_chain};
pub use fill::RESUME_ATTEMPTS;
pub use headers::announced_sha256;
pub use mirror::MirrorSet;
pub use permits::{FillCaps, FillGateStats, FillRefused};
pub use upstream::{BoxError, UpstreamBody, UpstreamClient};

use coalesce::{FillGuard, Inflight};
use permits::FillGate;

/// Where a key's bytes can come from.
#[derive(Debug, Clone)]
pub enum Upstreams {
    /// One URL (forward and transparent proxying).
    Single(Uri),
    /// A path on a mirror set (the part after the mirror's prefix, with query).
    Mirror {
        /// The set.
        set: Arc<MirrorSet>,
        /// Path and query below the mirror prefix.
        rest: String,
        /// The `Host` to send instead of the upstream URL's authority (a
        /// site's `preserve-host`).
        host: Option<http::HeaderValue>,
    },
}

impl Upstreams {
    /// The `Host` to send instead of the upstream URL's authority.
    pub fn host(&self) -> Option<&http::HeaderValue> {
        match self {
            Upstreams::Mirror { host, .. } => host.as_ref(),
            Upstreams::Single(_) => None,
        }
    }

    /// The primary URL, for logs and errors.
    pub fn primary(&self) -> String {
        match self {
            Upstreams::Single(uri) => uri.to_string(),
            Upstreams::Mirror { set, rest, .. } => {
                set.url(0, rest).map(|u| u.to_string()).unwrap_or_default()
            }
        }
    }
}

/// A policy's say on an upstream response head (the `on_response` hook).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadDecision {
    /// Never store this response.
    pub uncacheable: bool,
    /// Store it as immutable: never revalidated.
    pub immutable: bool,
    /// Time to live to use instead of the HTTP freshness.
    pub ttl: Option<Duration>,
    /// Upper bound on the time to live.
    pub ttl_cap: Option<Duration>,
    /// A policy that must not fail open failed: answer 502 instead.
    pub deny: bool,
    /// Set by the fill, not the hook: the stored body is a policy's
    /// rewrite, so its partial is never resumed with the original's
    /// validators.
    pub rewritten: bool,
}

/// What a chain's body hook did with a response body
/// ([`HeadHook::on_body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRewrite {
    /// Store and serve the body as it came.
    Unchanged,
    /// Store and serve this instead.
    Replaced(bytes::Bytes),
    /// A policy that must not fail open failed: answer 502 instead.
    Deny,
}

/// Called on every upstream response head before anything is decided;
/// may edit the headers (e.g. rewrite `Location`).
pub trait HeadHook: Send + Sync {
    /// Inspects and edits the head; returns the policy's decision. A
    /// future, because a policy runs off the async workers and the fill
    /// waits for it without holding one.
    fn on_head<'a>(
        &'a self,
        status: StatusCode,
        headers: &'a mut HeaderMap,
    ) -> std::pin::Pin<Box<dyn Future<Output = HeadDecision> + Send + 'a>>;

    /// Some response of this route may go through [`HeadHook::on_body`]:
    /// the fill then asks the upstream for an unencoded body.
    fn wants_bodies(&self) -> bool {
        false
    }

    /// The largest body the hook takes for a response with this head
    /// (after [`HeadHook::on_head`]); `None`: the body streams as usual.
    fn body_limit(&self, _status: StatusCode, _headers: &HeaderMap) -> Option<u64> {
        None
    }

    /// Receives the whole body of a response [`HeadHook::body_limit`]
    /// accepted and says what to store instead.
    fn on_body<'a>(
        &'a self,
        _status: StatusCode,
        _headers: &'a HeaderMap,
        _body: bytes::Bytes,
    ) -> std::pin::Pin<Box<dyn Future<Output = BodyRewrite> + Send + 'a>> {
        Box::pin(std::future::ready(BodyRewrite::Unchanged))
    }
}

/// Per-request settings of a fetch, from the config snapshot.
#[derive(Clone)]
pub struct FetchSettings {
    /// Inactivity timeout for the upstream.
    pub idle: Duration,
    /// How long a fill continues with no reader.
    pub orphan: Duration,
    /// Static / offline / normal.
    pub mode: CacheMode,
    /// Limits of the snapshot (bandwidth cap).
    pub limits: Arc<Limits>,
    /// Caps on the fills in flight (`max-fills`, `max-fills-per-client`).
    pub fill_caps: FillCaps,
    /// Which fills with no reader left are worth finishing.
    pub orphan_rules: crate::config::OrphanRules,
    /// The fleet this node fills from (`cluster`), if any.
    pub fleet: Option<Arc<peer::Fleet>>,
}

/// A request for the fill of one key.
pub struct FillJob {
    /// The cache key.
    pub key: CacheKey,
    /// The key as a URI (for the RFC 9111 rules).
    pub key_uri: Uri,
    /// Where to fetch from.
    pub upstreams: Upstreams,
    /// End-to-end request headers to send (the first client's, without
    /// conditionals, ranges and hop-by-hop headers).
    pub headers: HeaderMap,
    /// A stale replica to revalidate, with its validators.
    pub revalidate: Option<(Arc<Replica>, HeaderMap)>,
    /// Settings from the config snapshot.
    pub settings: FetchSettings,
    /// The policy chain's response hook, if any.
    pub hook: Option<Arc<dyn HeadHook>>,
    /// The address of the client whose request starts the fill, counted
    /// against `max-fills-per-client`.
    pub client: std::net::IpAddr,
    /// Nobody waits for this fill (a `stale-while-revalidate` refresh):
    /// having no reader is not a client leaving it, so the quick-abort
    /// rules do not apply; `orphan-fill` still does.
    pub background: bool,
    /// The client's request target, to ask the key's owner in the fleet
    /// for (`None`: not a peerable route, or a request from a peer, which
    /// is served as owner and never forwarded again).
    pub peer_target: Option<Box<str>>,
    /// The SHA-256 the body must have, known before anything is asked (a
    /// content-addressed URL, [`peer::content_address`]): the fleet's
    /// peers are asked for that content first, and whatever source the
    /// bytes come from, bytes that do not match are never committed.
    pub sha256: Option<[u8; 32]>,
}

/// The coalescing fetch engine; cheap to clone.
#[derive(Clone)]
pub struct FetchEngine {
    inner: Arc<Inner>,
}

/// What the clones of one engine share.
struct Inner {
    store: Arc<ReplicaStore>,
    client: UpstreamClient,
    clock: Clock,
    inflight: Inflight,
    /// Permits of the fills in flight, against the snapshot's caps.
    permits: FillGate,
    metrics: Arc<Metrics>,
    /// The fleet's shared state (local, or Redis with `cluster { redis }`).
    shared: crate::shared::SharedState,
}

impl FetchEngine {
    /// An engine writing into `store`, fetching with `client`.
    pub fn new(store: Arc<ReplicaStore>, client: UpstreamClient, clock: Clock) -> FetchEngine {
        let shared = crate::shared::SharedState::new(clock.clone());
        FetchEngine {
            inner: Arc::new(Inner {
                store,
                client,
                clock,
                inflight: Inflight::default(),
                permits: FillGate::default(),
                metrics: Arc::default(),
                shared,
            }),
        }
    }

    /// The fleet's shared state: the digest index of every node
    /// ([`crate::shared::SharedState::holders`]), fleet-wide limiters and
    /// counters.
    pub fn shared(&self) -> &crate::shared::SharedState {
        &self.inner.shared
    }

    /// Cistern's own sockets, which no upstream connection may reach.
    pub fn own_sockets(&self) -> &Arc<crate::ours::OwnSockets> {
        self.inner.client.own_sockets()
    }

    /// This Cistern's `Via` hop.
    pub fn via(&self) -> &Arc<crate::via::ViaHop> {
        self.inner.client.via()
    }

    /// The engine's clock (freshness, upstream health, orphaned fills).
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The store the engine fills.
    pub fn store(&self) -> &Arc<ReplicaStore> {
        &self.inner.store
    }

    /// The process-wide counters (they outlive config reloads, like the
    /// engine).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Fills in progress (admin UI).
    pub fn in_progress(&self) -> Vec<Arc<Fill>> {
        let map = self.inner.inflight.lock();
        map.values().cloned().collect()
    }

    /// The fill caps' counts (`/metrics`).
    pub fn fill_permits(&self) -> FillGateStats {
        self.inner.permits.stats()
    }

    /// The fill of a key in progress, if any (HEAD requests join one but
    /// never start one).
    pub fn find(&self, key: &CacheKey) -> Option<Arc<Fill>> {
        let map = self.inner.inflight.lock();
        map.get(key).cloned()
    }

    /// Joins the fill of `key` if one is under way, counted as a coalesced
    /// follower. Asking before building a [`FillJob`] spares a follower
    /// the job's copies of its request; [`FetchEngine::fill`] asks again,
    /// so a fill that starts in between is still joined.
    pub fn join(&self, key: &CacheKey) -> Option<Arc<Fill>> {
        let fill = self.find(key)?;
        self.inner.metrics.coalesced_follower();
        Some(fill)
    }

    /// Joins the fill of `job.key`, or starts it if the fill caps allow.
    pub fn fill(&self, job: FillJob) -> FillTicket {
        let (fill, passthrough) = {
            let mut map = self.inner.inflight.lock();
            if let Some(fill) = map.get(&job.key) {
                self.inner.metrics.coalesced_follower();
                return FillTicket::Follower(fill.clone());
            }
            // A fill may have committed between the caller's lookup and now.
            if job.revalidate.is_none()
                && let Some(replica) = self.inner.store.peek(&job.key)
            {
                return FillTicket::Ready(replica);
            }
            // Taken under the registry's lock, so two requests for one key
            // never both take a permit; held by the task until it ends.
            let permit = match self.inner.permits.admit(job.client, job.settings.fill_caps) {
                Ok(p) => p,
                Err(why) => return FillTicket::Refused(why),
            };
            let (state, _) = watch::channel(FillState::Waiting);
            let fill = Arc::new(Fill {
                key: job.key.clone(),
                state,
                started: Instant::now(),
            });
            map.insert(job.key.clone(), fill.clone());
            self.inner.metrics.fill_started();
            let (tx, rx) = oneshot::channel();
            let inner = self.inner.clone();
            let task_fill = fill.clone();
            tokio::spawn(async move {
                let guard = FillGuard {
                    inner: inner.clone(),
                    fill: task_fill.clone(),
                };
                if let Err(error) = inner.run(&task_fill, &job, tx).await {
                    // Built only here: a fill that succeeds never renders it.
                    let url = job.upstreams.primary();
                    tracing::warn!(target: "cistern::fetch", key = %task_fill.key, %url,
                        kind = error.kind().as_str(), side = error.side().as_str(),
                        "fill failed: {}", error_chain(&error));
                    inner.metrics.fill_failed();
                    task_fill
                        .state
                        .send_replace(FillState::Failed(Arc::new(error)));
                }
                drop(guard);
                drop(permit);
            });
            (fill, rx)
        };
        FillTicket::Leader { fill, passthrough }
    }

    /// Sends a request upstream without caching it (other methods,
    /// unshareable responses, Vary mismatches), failing over along a mirror
    /// set while no request body has been sent.
    pub async fn direct(
        &self,
        method: Method,
        upstreams: &Upstreams,
        headers: HeaderMap,
        body: Option<UpstreamBody>,
        settings: &FetchSettings,
    ) -> Result<Response<Incoming>, FetchError> {
        if settings.mode == CacheMode::Offline {
            return Err(FetchError::Offline {
                url: upstreams.primary(),
            });
        }
        let (resp, _) = self
            .inner
            .failover(method, upstreams, &headers, body, settings.idle)
            .await?;
        Ok(resp)
    }
}

impl Inner {
    /// Runs a store operation on the blocking pool, off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReplicaStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, FetchError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r.map_err(FetchError::Store),
            Err(_) => Err(FetchError::Vanished),
        }
    }
}
