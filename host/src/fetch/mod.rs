//! The coalescing fetch engine: one upstream fetch per cache key, however
//! many clients ask at once.
//!
//! The first request for a key starts a [`Fill`]: a task of its own that
//! fetches from the upstream (failing over along a mirror set), writes the
//! body into the key's partial file while hashing it, and commits it to the
//! replica store. Every client of that key, the first one included, is a
//! reader of the growing file (see [`crate::serve`]), so no client's
//! disconnect can cancel the fill for the others. A fill nobody reads any
//! more keeps going for `orphan-fill` and then stops, keeping its partial
//! for a later resume.
//!
//! A fill moves through [`FillState`]: `Waiting` → `Streaming` →
//! `Complete`, or ends `Unverified` (a body that ended with the upstream
//! connection and no digest to prove it whole: served, not stored),
//! `Revalidated` (a 304 refreshed the replica),
//! `Unshared` (the response may not be shared: each client fetches on its
//! own) or `Failed` (followers see a failed transfer, never a short body).

pub mod confine;
pub mod mirror;
pub mod upstream;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use crate::cache::{self, CacheRequest};
use crate::clock::Clock;
use crate::config::CacheMode;
use crate::limit::Limits;
use crate::observe::{Metrics, NoCacheReason};
use crate::store::meta::unix_secs;
use crate::store::{
    CacheKey, ObjectMeta, PartialFile, PartialMeta, Replica, ReplicaStore, StoreError,
};

pub use mirror::MirrorSet;
pub use upstream::{BoxError, UpstreamBody, UpstreamClient};

/// Which side of the proxy an error came from (pingora-error's
/// `ErrorSource`): decides the status the client sees and the wording of
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The upstream misbehaved or could not be reached.
    Upstream,
    /// The clients: every one of them went away.
    Downstream,
    /// Cistern itself (disk, configuration, policies).
    Internal,
}

impl Side {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Upstream => "upstream",
            Side::Downstream => "downstream",
            Side::Internal => "internal",
        }
    }
}

/// Whether trying the same request again can help (pingora-error's
/// `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryType {
    /// A transient failure (connection refused, reset or closed, timeout):
    /// another attempt may succeed, and a fill may resume its partial.
    Retryable,
    /// Trying again gives the same answer (a wrong length or digest, a
    /// policy's refusal, a full disk).
    Final,
}

/// What kind of failure a [`FetchError`] is, without its details: for
/// logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection or no response head.
    Connect,
    /// Inactivity past the timeout.
    Timeout,
    /// The connection broke in the middle of the body.
    BodyCut,
    /// The body's length or digest is not what the upstream announced.
    Integrity,
    /// A resume was answered with other content than the partial's.
    ResumeMismatch,
    /// Offline mode.
    Offline,
    /// Nobody reads the fill any more.
    Orphaned,
    /// The replica store failed.
    Store,
    /// A policy refused the response.
    Policy,
    /// The target is one of Cistern's own listeners.
    SelfTarget,
    /// A bug: a task ended without saying how.
    Vanished,
}

impl ErrorKind {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BodyCut => "body-cut",
            ErrorKind::Integrity => "integrity",
            ErrorKind::ResumeMismatch => "resume-mismatch",
            ErrorKind::Offline => "offline",
            ErrorKind::Orphaned => "orphaned",
            ErrorKind::Store => "store",
            ErrorKind::Policy => "policy",
            ErrorKind::SelfTarget => "self-target",
            ErrorKind::Vanished => "vanished",
        }
    }
}

/// Why a fetch failed. The causes are kept typed (`source()`);
/// [`error_chain`] renders them on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No upstream could be reached, or it gave no response head.
    #[error("upstream {url} unreachable")]
    Connect {
        /// The last URL tried.
        url: String,
        /// The client's error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The upstream set had no URL to try.
    #[error("no upstream to ask for {url}")]
    NoUpstream {
        /// The primary URL.
        url: String,
    },
    /// The upstream is one of Cistern's own listeners: never connected to.
    #[error("{0}")]
    SelfTarget(crate::ours::SelfTarget),
    /// The upstream did not answer or stalled past the inactivity timeout.
    #[error("upstream {url} timed out after {after:?} of inactivity")]
    Timeout {
        /// The URL being fetched.
        url: String,
        /// The inactivity timeout.
        after: Duration,
    },
    /// The upstream connection broke in the middle of the body.
    #[error("upstream {url} failed after {written} bytes")]
    Body {
        /// The URL being fetched.
        url: String,
        /// Bytes of the body received (and kept in the partial file).
        written: u64,
        /// The transport error.
        #[source]
        source: hyper::Error,
    },
    /// Resuming a partial was answered with bytes that may not continue it.
    #[error("cannot resume {url} at byte {written}: {why}")]
    ResumeMismatch {
        /// The URL being fetched.
        url: String,
        /// Bytes in the partial file.
        written: u64,
        /// What did not match.
        why: &'static str,
    },
    /// The body is shorter or longer than the upstream announced.
    #[error("upstream {url} sent {written} bytes of {expected}")]
    Length {
        /// The URL being fetched.
        url: String,
        /// Bytes received.
        written: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The body does not match the digest the upstream sent.
    #[error(
        "upstream {url} body has SHA-256 {actual}, but the upstream announced {announced}; not stored"
    )]
    DigestMismatch {
        /// The URL fetched.
        url: String,
        /// Hex SHA-256 announced by `Repr-Digest`/`Digest`.
        announced: String,
        /// Hex SHA-256 of what arrived.
        actual: String,
    },
    /// Offline mode: nothing may be fetched.
    #[error("offline mode: {url} is not in the replica")]
    Offline {
        /// The URL asked for.
        url: String,
    },
    /// Every client left and the fill ran past `orphan-fill`; the partial
    /// is kept for a later resume.
    #[error("no client left for {url} after {after:?}; partial kept")]
    Orphaned {
        /// The URL being fetched.
        url: String,
        /// The orphan-fill limit.
        after: Duration,
    },
    /// The replica store failed (full disk, permissions).
    #[error("replica store: {0}")]
    Store(#[from] StoreError),
    /// A policy with `on-error="deny"` failed on the response.
    #[error("a policy refused the response from {url}")]
    PolicyDenied {
        /// The URL fetched.
        url: String,
    },
    /// A worker task died (a bug); followers are released.
    #[error("fill task ended unexpectedly")]
    Vanished,
}

impl FetchError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FetchError::Connect { .. } | FetchError::NoUpstream { .. } => ErrorKind::Connect,
            FetchError::Timeout { .. } => ErrorKind::Timeout,
            FetchError::Body { .. } => ErrorKind::BodyCut,
            FetchError::ResumeMismatch { .. } => ErrorKind::ResumeMismatch,
            FetchError::Length { .. } | FetchError::DigestMismatch { .. } => ErrorKind::Integrity,
            FetchError::Offline { .. } => ErrorKind::Offline,
            FetchError::Orphaned { .. } => ErrorKind::Orphaned,
            FetchError::Store(_) => ErrorKind::Store,
            FetchError::PolicyDenied { .. } => ErrorKind::Policy,
            FetchError::SelfTarget(_) => ErrorKind::SelfTarget,
            FetchError::Vanished => ErrorKind::Vanished,
        }
    }

    /// The side the error came from.
    pub fn side(&self) -> Side {
        match self {
            FetchError::Store(_)
            | FetchError::Vanished
            | FetchError::Offline { .. }
            | FetchError::NoUpstream { .. }
            | FetchError::SelfTarget(_)
            | FetchError::PolicyDenied { .. } => Side::Internal,
            FetchError::Orphaned { .. } => Side::Downstream,
            _ => Side::Upstream,
        }
    }

    /// Whether another attempt can help.
    pub fn retry(&self) -> RetryType {
        match self {
            FetchError::Connect { .. } | FetchError::Timeout { .. } => RetryType::Retryable,
            // A reset or closed connection is transient; a body that does
            // not parse (bad chunking) comes back the same.
            FetchError::Body { source, .. } if !source.is_parse() && !source.is_user() => {
                RetryType::Retryable
            }
            _ => RetryType::Final,
        }
    }

    /// The status a client sees when nothing was sent yet.
    pub fn status(&self) -> StatusCode {
        match self {
            FetchError::Timeout { .. } | FetchError::Offline { .. } => StatusCode::GATEWAY_TIMEOUT,
            FetchError::Store(_) | FetchError::Vanished | FetchError::NoUpstream { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            FetchError::SelfTarget(_) => StatusCode::LOOP_DETECTED,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

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
    },
}

impl Upstreams {
    /// Candidate URLs in the order to try, with the mirror index to report
    /// health to.
    fn candidates(&self) -> Vec<(Option<usize>, Uri)> {
        match self {
            Upstreams::Single(uri) => vec![(None, uri.clone())],
            Upstreams::Mirror { set, rest } => set
                .order()
                .into_iter()
                .filter_map(|i| set.url(i, rest).ok().map(|u| (Some(i), u)))
                .collect(),
        }
    }

    fn report(&self, index: Option<usize>, failure: Option<&str>) {
        if let (Upstreams::Mirror { set, .. }, Some(i)) = (self, index) {
            set.report(i, failure);
        }
    }

    /// The primary URL, for logs and errors.
    pub fn primary(&self) -> String {
        match self {
            Upstreams::Single(uri) => uri.to_string(),
            Upstreams::Mirror { set, rest } => {
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
}

/// Called on every upstream response head before anything is decided;
/// may edit the headers (e.g. rewrite `Location`).
pub trait HeadHook: Send + Sync {
    /// Inspects and edits the head; returns the policy's decision.
    fn on_head(&self, status: StatusCode, headers: &mut HeaderMap) -> HeadDecision;
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
}

/// What readers need to serve a fill's bytes.
#[derive(Debug)]
pub struct FillHead {
    /// The upstream URL.
    pub url: String,
    /// Headers to send to clients (stored form: no hop-by-hop, no cookies).
    pub headers: HeaderMap,
    /// Full body length, if announced.
    pub length: Option<u64>,
    /// The partial file, read with positioned reads.
    pub file: Arc<File>,
    /// The RFC 9111 state of the response (Vary checks for joiners).
    pub policy: http_cache_semantics::CachePolicy,
    /// When the head arrived (for `Age`).
    pub received: SystemTime,
    /// Bytes already in the partial file when this fill began (a resume);
    /// zero otherwise. The admin UI's transfer rate leaves them out.
    pub start: u64,
}

/// The state of a fill, published to its readers.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Asking the upstream; no head yet.
    Waiting,
    /// Writing the body; `written` bytes are in the file.
    Streaming {
        /// The response head.
        head: Arc<FillHead>,
        /// Bytes in the partial file so far.
        written: u64,
    },
    /// The body is complete, verified and committed.
    Complete {
        /// The response head.
        head: Arc<FillHead>,
        /// The committed replica.
        replica: Arc<Replica>,
    },
    /// The body ended with the upstream connection and nothing proves it
    /// complete: readers get all `length` bytes, nothing is stored.
    Unverified {
        /// The response head.
        head: Arc<FillHead>,
        /// Bytes of the body, all in the (no longer stored) partial file.
        length: u64,
    },
    /// The upstream said 304: the stored replica is good again.
    Revalidated(Arc<Replica>),
    /// The response is not stored, for the reason given; every client
    /// fetches on its own.
    Unshared(NoCacheReason),
    /// The fill failed; readers abort their transfers.
    Failed(Arc<FetchError>),
}

impl FillState {
    /// A short name for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            FillState::Waiting => "waiting",
            FillState::Streaming { .. } => "streaming",
            FillState::Complete { .. } => "complete",
            FillState::Unverified { .. } => "unverified",
            FillState::Revalidated(_) => "revalidated",
            FillState::Unshared(_) => "unshared",
            FillState::Failed(_) => "failed",
        }
    }
}

/// The one upstream fetch of a key.
#[derive(Debug)]
pub struct Fill {
    /// The key being filled.
    pub key: CacheKey,
    state: watch::Sender<FillState>,
    started: Instant,
}

impl Fill {
    /// Subscribes to the fill's progress.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Clients currently reading.
    pub fn readers(&self) -> usize {
        self.state.receiver_count()
    }

    /// When the fill started.
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// The answer to [`FetchEngine::fill`].
pub enum FillTicket {
    /// A complete replica appeared meanwhile: serve it.
    Ready(Arc<Replica>),
    /// This request started the fill. If the response turns out not to be
    /// shareable, its head and body arrive on `passthrough`.
    Leader {
        /// The fill.
        fill: Arc<Fill>,
        /// The unshareable response, for this client only.
        passthrough: oneshot::Receiver<Response<Incoming>>,
    },
    /// Another request's fill is under way: read along.
    Follower(Arc<Fill>),
}

/// The coalescing fetch engine; cheap to clone.
#[derive(Clone)]
pub struct FetchEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<ReplicaStore>,
    client: UpstreamClient,
    clock: Clock,
    inflight: Mutex<HashMap<CacheKey, Arc<Fill>>>,
    metrics: Arc<Metrics>,
}

/// How many times one fill resumes its body after a transient upstream
/// failure (reset, closed connection, timeout) before its readers get a
/// failed transfer.
pub const RESUME_ATTEMPTS: u32 = 3;
/// The pause before the first resume; the n-th waits n times as long.
const RESUME_PAUSE: Duration = Duration::from_millis(200);

/// Bytes accepted from the upstream per positioned write; frames are
/// gathered up to this size so a fast upstream costs few blocking hops.
const WRITE_BATCH: usize = 256 * 1024;

impl FetchEngine {
    /// An engine writing into `store`, fetching with `client`.
    pub fn new(store: Arc<ReplicaStore>, client: UpstreamClient, clock: Clock) -> FetchEngine {
        FetchEngine {
            inner: Arc::new(Inner {
                store,
                client,
                clock,
                inflight: Mutex::new(HashMap::new()),
                metrics: Arc::default(),
            }),
        }
    }

    /// Cistern's own sockets, which no upstream connection may reach.
    pub fn own_sockets(&self) -> &Arc<crate::ours::OwnSockets> {
        self.inner.client.own_sockets()
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
        let map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// The fill of a key in progress, if any (HEAD requests join one but
    /// never start one).
    pub fn find(&self, key: &CacheKey) -> Option<Arc<Fill>> {
        let map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    /// Joins the fill of `job.key`, or starts it.
    pub fn fill(&self, job: FillJob) -> FillTicket {
        let (fill, passthrough) = {
            let mut map = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
                let url = job.upstreams.primary();
                if let Err(error) = inner.run(&task_fill, job, tx).await {
                    tracing::warn!(target: "cistern::fetch", key = %task_fill.key, %url,
                        kind = error.kind().as_str(), side = error.side().as_str(),
                        "fill failed: {}", error_chain(&error));
                    inner.metrics.fill_failed();
                    task_fill
                        .state
                        .send_replace(FillState::Failed(Arc::new(error)));
                }
                drop(guard);
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

/// Releases a fill's key and its readers however the fill task ends
/// (return, error or panic): readers never wait on a vanished writer.
struct FillGuard {
    inner: Arc<Inner>,
    fill: Arc<Fill>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.fill.state.send_if_modified(|state| match state {
            FillState::Waiting | FillState::Streaming { .. } => {
                *state = FillState::Failed(Arc::new(FetchError::Vanished));
                true
            }
            _ => false,
        });
        let mut map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.fill.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            map.remove(&self.fill.key);
        }
    }
}

fn empty_body() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn build_request(
    method: Method,
    url: &Uri,
    headers: &HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = url.clone();
    *req.headers_mut() = headers.clone();
    // The Host header must name the upstream, not us.
    req.headers_mut().remove(header::HOST);
    frame_by_body(&mut req);
    req
}

/// Makes the request's framing headers describe the body actually sent.
/// A client's `Content-Length` (or one a policy set) with no body behind
/// it would make a reused upstream connection take the next request's
/// first bytes as this one's body: request smuggling into the cache. So
/// the headers are dropped and hyper frames the request from the body
/// (its exact length, else chunked). An empty body on a method that
/// defines content says `Content-Length: 0` (RFC 9110 §8.6), so an origin
/// that wants a length does not answer 411.
fn frame_by_body(req: &mut Request<UpstreamBody>) {
    let headers = req.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    let defines_content = !matches!(
        *req.method(),
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    );
    if defines_content && http_body::Body::is_end_stream(req.body()) {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
}

/// How a fill's body is being written.
struct Writing {
    partial: PartialFile,
    head: Arc<FillHead>,
    /// Where the first new byte goes (non-zero when resuming).
    start: u64,
    url: Uri,
    meta: ObjectMeta,
}

impl Inner {
    async fn send(
        &self,
        req: Request<UpstreamBody>,
        url: &Uri,
        idle: Duration,
    ) -> Result<Response<Incoming>, FetchError> {
        let sent = tokio::time::timeout(idle, self.client.send(req)).await;
        let failed = !matches!(&sent, Ok(Ok(resp)) if !resp.status().is_server_error());
        self.metrics.upstream_request(failed);
        match sent {
            Err(_) => Err(FetchError::Timeout {
                url: url.to_string(),
                after: idle,
            }),
            Ok(Err(source)) => match crate::ours::self_target_in(&source) {
                Some(refused) => Err(FetchError::SelfTarget(refused.clone())),
                None => Err(FetchError::Connect {
                    url: url.to_string(),
                    source,
                }),
            },
            Ok(Ok(resp)) => Ok(resp),
        }
    }

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

    /// The fill task: ask upstream, then either refresh, stream into the
    /// replica, or hand an unshareable response to the leader.
    async fn run(
        &self,
        fill: &Fill,
        job: FillJob,
        leader: oneshot::Sender<Response<Incoming>>,
    ) -> Result<(), FetchError> {
        if job.settings.mode == CacheMode::Offline {
            return Err(FetchError::Offline {
                url: job.upstreams.primary(),
            });
        }
        let key = job.key.clone();
        // An interrupted fill of this key is resumed rather than restarted.
        let partial = if job.revalidate.is_none() {
            let k = key.clone();
            self.blocking(move |s| s.find_partial(&k)).await?
        } else {
            None
        };
        let mut headers = job.headers.clone();
        if let Some((_, validators)) = &job.revalidate {
            headers.extend(validators.clone());
        }
        let resume = partial
            .as_ref()
            .and_then(|(meta, len)| resume_headers(meta, *len));
        if let Some((range, if_range)) = &resume {
            headers.insert(header::RANGE, range.clone());
            headers.insert(header::IF_RANGE, if_range.clone());
        }

        let asked = self.clock.now();
        let (mut resp, url) = self.ask(&job, headers).await?;
        let received = self.clock.now();

        if let Some((replica, _)) = &job.revalidate
            && resp.status() == StatusCode::NOT_MODIFIED
        {
            let req_headers = job.headers.clone();
            let creq = CacheRequest {
                key: &job.key_uri,
                method: &Method::GET,
                headers: &req_headers,
            };
            let (parts, _) = Response::new(()).into_parts();
            let mut parts = parts;
            parts.status = resp.status();
            parts.headers = resp.headers().clone();
            if let Some(updated) = cache::revalidated(&replica.meta, creq, &parts, asked, received)
            {
                let k = key.clone();
                let replica = self.blocking(move |s| s.refresh(&k, updated)).await?;
                fill.state.send_replace(FillState::Revalidated(replica));
                return Ok(());
            }
            // A 304 that does not match what we hold: fetch it whole.
            let (resp2, _) = self.ask(&job, job.headers.clone()).await?;
            resp = resp2;
        }

        let decision = match &job.hook {
            Some(hook) => {
                let status = resp.status();
                hook.on_head(status, resp.headers_mut())
            }
            None => HeadDecision::default(),
        };
        if decision.deny {
            return Err(FetchError::PolicyDenied {
                url: url.to_string(),
            });
        }

        let resumed_from = match (&partial, resp.status()) {
            (Some((_, len)), StatusCode::PARTIAL_CONTENT) if resume.is_some() => {
                match content_range_start(resp.headers()) {
                    Some(start) if start == *len => Some(*len),
                    // The upstream answered another range than we asked for.
                    _ => None,
                }
            }
            _ => None,
        };
        if resp.status() == StatusCode::PARTIAL_CONTENT && resumed_from.is_none() {
            // Unusable partial answer: start over without a range.
            let k = key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            let (resp2, _) = self.ask(&job, job.headers.clone()).await?;
            resp = resp2;
        }

        let policy_uncacheable = decision.uncacheable;
        let mut writing = match self
            .prepare(fill, &job, &resp, &url, received, decision, resumed_from)
            .await
        {
            Ok(Some(w)) => w,
            Ok(None) => {
                let reason = if policy_uncacheable {
                    NoCacheReason::PolicyUncacheable
                } else {
                    NoCacheReason::NotStorable
                };
                fill.state.send_replace(FillState::Unshared(reason));
                let _ = leader.send(resp);
                return Ok(());
            }
            Err(e @ FetchError::Store(_)) => {
                // The disk refuses the replica: this client is still served,
                // uncached, and the reason is logged.
                tracing::warn!(target: "cistern::fetch", key = %key, "not caching: {e}");
                self.metrics.store_refusal();
                if resumed_from.is_some() {
                    // The 206 continues our partial, but the client asked
                    // for the whole body; the partial cannot be finished.
                    let k = key.clone();
                    self.blocking(move |s| s.discard_partial(&k)).await?;
                    resp = self.ask(&job, job.headers.clone()).await?.0;
                }
                fill.state
                    .send_replace(FillState::Unshared(NoCacheReason::NoRoom));
                let _ = leader.send(resp);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        writing.meta.rfc.request_time = asked;
        self.stream(fill, &job, resp, writing).await
    }

    /// Sends a GET for a fill along the job's upstreams.
    async fn ask(
        &self,
        job: &FillJob,
        headers: HeaderMap,
    ) -> Result<(Response<Incoming>, Uri), FetchError> {
        self.failover(
            Method::GET,
            &job.upstreams,
            &headers,
            None,
            job.settings.idle,
        )
        .await
    }

    /// Sends the request to each candidate upstream until one answers
    /// without a connect error or a 5xx; the last one's 5xx is passed on.
    /// With a request body only the first candidate is tried: a streamed
    /// body cannot be sent twice.
    async fn failover(
        &self,
        method: Method,
        upstreams: &Upstreams,
        headers: &HeaderMap,
        body: Option<UpstreamBody>,
        idle: Duration,
    ) -> Result<(Response<Incoming>, Uri), FetchError> {
        let retryable = body.is_none();
        let mut body = body;
        let candidates = upstreams.candidates();
        let count = candidates.len();
        let mut last = None;
        for (n, (index, url)) in candidates.into_iter().enumerate() {
            let req_body = body.take().unwrap_or_else(empty_body);
            let req = build_request(method.clone(), &url, headers, req_body);
            match self.send(req, &url, idle).await {
                Ok(resp) if resp.status().is_server_error() && retryable && n + 1 < count => {
                    tracing::info!(target: "cistern::fetch", %url, status = %resp.status(), "upstream error, trying the next mirror");
                    upstreams.report(index, Some(&format!("status {}", resp.status())));
                }
                Ok(resp) => {
                    let failure = resp
                        .status()
                        .is_server_error()
                        .then(|| format!("status {}", resp.status()));
                    upstreams.report(index, failure.as_deref());
                    return Ok((resp, url));
                }
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::info!(target: "cistern::fetch", %url, kind = e.kind().as_str(), "upstream failed: {why}");
                    upstreams.report(index, Some(&why));
                    last = Some(e);
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or(FetchError::NoUpstream {
            url: upstreams.primary(),
        }))
    }

    /// Decides whether the response becomes a replica and, if so, opens its
    /// partial file and publishes the head to readers.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        fill: &Fill,
        job: &FillJob,
        resp: &Response<Incoming>,
        url: &Uri,
        received: SystemTime,
        decision: HeadDecision,
        resumed_from: Option<u64>,
    ) -> Result<Option<Writing>, FetchError> {
        // The stored form is the full 200 response, even when resuming.
        let mut parts = Response::new(()).into_parts().0;
        parts.status = if resumed_from.is_some() {
            StatusCode::OK
        } else {
            resp.status()
        };
        parts.headers = resp.headers().clone();
        let length = match resumed_from {
            Some(_) => content_range_total(resp.headers()),
            None => content_length(resp.headers()),
        };
        parts.headers.remove(header::CONTENT_RANGE);
        let creq = CacheRequest {
            key: &job.key_uri,
            method: &Method::GET,
            headers: &job.headers,
        };
        let policy = cache::new_policy(creq, &parts, received);
        if decision.uncacheable || !cache::storable(&policy, parts.status) {
            return Ok(None);
        }
        let stored = cache::stored_headers(&parts.headers);
        let mut client_headers = HeaderMap::with_capacity(stored.len());
        for (k, v) in &stored {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                client_headers.append(k, v);
            }
        }
        let ttl_override = match (decision.ttl, decision.ttl_cap) {
            (Some(ttl), cap) => Some(cap.map_or(ttl, |c| ttl.min(c))),
            (None, Some(cap)) => Some(policy.time_to_live(received).min(cap)),
            (None, None) => None,
        };
        let meta = ObjectMeta {
            key: job.key.to_string(),
            url: url.to_string(),
            replica: String::new(),
            status: 200,
            headers: stored,
            policy: policy.clone(),
            rfc: cache::rfc_inputs(creq, &parts, received, received),
            file: None,
            length: 0,
            sha256: String::new(),
            stored_at: unix_secs(received),
            validated_at: unix_secs(received),
            immutable: decision.immutable,
            ttl_override: ttl_override.map(|d| d.as_secs()),
        };
        let partial_meta = PartialMeta {
            key: job.key.to_string(),
            url: url.to_string(),
            total_length: length,
            etag: header_str(&parts.headers, header::ETAG),
            last_modified: header_str(&parts.headers, header::LAST_MODIFIED),
            started_at: unix_secs(received),
        };
        let k = job.key.clone();
        let resume = resumed_from.is_some();
        let partial = self
            .blocking(move |s| s.begin_partial(&k, partial_meta, resume))
            .await?;
        let start = if resume { partial.len } else { 0 };
        if resumed_from.is_some_and(|from| from != start) {
            // The partial changed under us; never splice mismatched bytes.
            return Err(FetchError::ResumeMismatch {
                url: url.to_string(),
                written: start,
                why: "the partial file changed during the resume",
            });
        }
        let head = Arc::new(FillHead {
            url: url.to_string(),
            headers: client_headers,
            length,
            file: partial.file.clone(),
            policy,
            received,
            start,
        });
        fill.state.send_replace(FillState::Streaming {
            head: head.clone(),
            written: start,
        });
        if start > 0 {
            tracing::info!(target: "cistern::fetch", key = %job.key, from = start, "resuming partial download");
        }
        Ok(Some(Writing {
            partial,
            head,
            start,
            url: url.clone(),
            meta,
        }))
    }

    /// Copies the body into the partial file, then verifies and commits it.
    async fn stream(
        &self,
        fill: &Fill,
        job: &FillJob,
        resp: Response<Incoming>,
        w: Writing,
    ) -> Result<(), FetchError> {
        let Writing {
            partial,
            head,
            start,
            url,
            mut meta,
        } = w;
        let url_s = url.to_string();
        let announced = announced_sha256(resp.headers());
        let mut ends_at_close = close_delimited(&resp);
        let idle = job.settings.idle;
        let mut body = resp.into_body();
        let mut sink = BodySink {
            partial,
            batch: Vec::new(),
            batch_len: 0,
            written: start,
            // Hash while streaming; a resumed fill hashes the whole file at the end.
            hasher: (start == 0).then(Sha256::new),
        };
        // The full length: announced by the head, or learnt from a resume's
        // `Content-Range`.
        let mut total = head.length;
        let mut resumes = 0u32;
        let mut orphan_since: Option<Instant> = None;
        let mut ended = false;
        while !ended {
            // Gather frames that are already there, up to one batch.
            let failure = loop {
                let next = if sink.batch.is_empty() {
                    match tokio::time::timeout(idle, body.frame()).await {
                        Ok(f) => f,
                        Err(_) => {
                            break Some(FetchError::Timeout {
                                url: url_s.clone(),
                                after: idle,
                            });
                        }
                    }
                } else {
                    match futures_util::FutureExt::now_or_never(body.frame()) {
                        Some(f) => f,
                        None => break None,
                    }
                };
                match next {
                    None => {
                        ended = true;
                        break None;
                    }
                    Some(Err(source)) => {
                        // Keep what arrived: it is a valid prefix for a resume.
                        self.flush(fill, &mut sink).await?;
                        break Some(FetchError::Body {
                            url: url_s.clone(),
                            written: sink.written,
                            source,
                        });
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            sink.batch_len += data.len();
                            sink.batch.push(data);
                            if sink.batch_len >= WRITE_BATCH {
                                break None;
                            }
                        }
                    }
                }
            };
            if let Some(error) = failure {
                // The readers still waiting get the rest from a resume of
                // the partial; they only see a pause.
                let rest = self
                    .resume_body(fill, job, &url, &sink, &mut total, &mut resumes, &error)
                    .await;
                match rest {
                    Some(resp) => {
                        ends_at_close = close_delimited(&resp);
                        body = resp.into_body();
                        continue;
                    }
                    None => return Err(error),
                }
            }
            if let Some(bw) = job.settings.limits.download() {
                bw.acquire(sink.batch_len).await;
            }
            self.flush(fill, &mut sink).await?;
            let written = sink.written;
            if let Some(total) = total
                && written > total
            {
                return Err(FetchError::Length {
                    url: url_s,
                    written,
                    expected: total,
                });
            }
            if fill.readers() == 0 {
                let since = *orphan_since.get_or_insert_with(Instant::now);
                if since.elapsed() > job.settings.orphan {
                    return Err(FetchError::Orphaned {
                        url: url_s,
                        after: job.settings.orphan,
                    });
                }
            } else {
                orphan_since = None;
            }
        }
        let BodySink {
            partial,
            written,
            hasher,
            ..
        } = sink;
        if let Some(total) = total
            && written != total
        {
            return Err(FetchError::Length {
                url: url_s,
                written,
                expected: total,
            });
        }
        if ends_at_close && announced.is_none() {
            // A FIN ends such a body whether it is complete or cut: served to
            // the readers, never kept as a complete replica.
            tracing::warn!(target: "cistern::fetch", key = %job.key, url = %url_s, bytes = written,
                "not stored: the body ended with the upstream connection (no Content-Length, \
                 no chunked encoding) and no Repr-Digest or Digest proves it complete");
            self.metrics.store_refusal();
            drop(partial);
            let k = job.key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            fill.state.send_replace(FillState::Unverified {
                head,
                length: written,
            });
            return Ok(());
        }
        let digest: [u8; 32] = match hasher {
            Some(h) => h.finalize().into(),
            None => {
                let file = partial.file.clone();
                match tokio::task::spawn_blocking(move || hash_file(&file, written)).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        return Err(FetchError::Store(StoreError::Io {
                            op: "hash partial file",
                            path: partial.path.clone(),
                            source: e,
                        }));
                    }
                    Err(_) => return Err(FetchError::Vanished),
                }
            }
        };
        let actual = hex::encode(digest);
        if let Some(announced) = announced
            && announced != digest
        {
            let k = job.key.clone();
            // A corrupt body is useless for resuming too.
            let _ = self.blocking(move |s| s.discard_partial(&k)).await;
            return Err(FetchError::DigestMismatch {
                url: url_s,
                announced: hex::encode(announced),
                actual,
            });
        }
        meta.length = written;
        meta.sha256 = actual;
        let replica = self.blocking(move |s| s.commit(partial, meta)).await?;
        tracing::debug!(target: "cistern::fetch", key = %job.key, bytes = written, elapsed = ?fill.started.elapsed(), "fill complete");
        fill.state
            .send_replace(FillState::Complete { head, replica });
        Ok(())
    }

    /// After `error` cut a fill's body, asks the same upstream URL for the
    /// rest of it (`Range` from the bytes written, `If-Range` with the
    /// partial's strong validator), up to [`RESUME_ATTEMPTS`] times per
    /// fill, pausing a little longer each time. Only a `206` that provably
    /// continues the partial is used (same start, same total, same
    /// validator); otherwise `None` and the fill fails with `error`,
    /// keeping its partial for a later request.
    #[allow(clippy::too_many_arguments)]
    async fn resume_body(
        &self,
        fill: &Fill,
        job: &FillJob,
        url: &Uri,
        sink: &BodySink,
        total: &mut Option<u64>,
        resumes: &mut u32,
        error: &FetchError,
    ) -> Option<Response<Incoming>> {
        let key = &job.key;
        let written = sink.written;
        let give_up = |why: &str| {
            tracing::info!(target: "cistern::fetch", %key, %url, written, "not resuming: {why}");
            None
        };
        if error.retry() == RetryType::Final {
            return give_up("the failure is not one a retry can help");
        }
        if fill.readers() == 0 {
            return give_up("no client is waiting; the partial is kept for the next one");
        }
        let Some((range, if_range)) = resume_headers(&sink.partial.meta, written) else {
            return give_up(
                "the upstream sent no strong validator, so a resume could splice two versions",
            );
        };
        while *resumes < RESUME_ATTEMPTS {
            *resumes += 1;
            tokio::time::sleep(RESUME_PAUSE * *resumes).await;
            tracing::info!(target: "cistern::fetch", %key, %url, from = written, attempt = *resumes,
                "resuming after {}: {}", error.kind().as_str(), error_chain(error));
            let mut headers = job.headers.clone();
            headers.insert(header::RANGE, range.clone());
            headers.insert(header::IF_RANGE, if_range.clone());
            let req = build_request(Method::GET, url, &headers, empty_body());
            let resp = match self.send(req, url, job.settings.idle).await {
                Ok(resp) => resp,
                Err(e) if e.retry() == RetryType::Retryable => {
                    tracing::info!(target: "cistern::fetch", %key, %url, "resume failed: {}", error_chain(&e));
                    continue;
                }
                Err(e) => return give_up(&error_chain(&e)),
            };
            return match continues(&resp, written, *total, &sink.partial.meta) {
                Ok(announced) => {
                    *total = total.or(announced);
                    Some(resp)
                }
                Err(why) => give_up(why),
            };
        }
        give_up(&format!(
            "{RESUME_ATTEMPTS} resumes did not finish the body"
        ))
    }

    /// Writes the gathered frames at the end of the partial file and tells
    /// the readers how far the file goes.
    async fn flush(&self, fill: &Fill, sink: &mut BodySink) -> Result<(), FetchError> {
        if sink.batch.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut sink.batch);
        let file = sink.partial.file.clone();
        let offset = sink.written;
        let mut h = sink.hasher.take();
        let result = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            for chunk in &chunks {
                file.write_all_at(chunk, at)?;
                if let Some(h) = h.as_mut() {
                    h.update(chunk);
                }
                at += chunk.len() as u64;
            }
            Ok::<_, std::io::Error>((h, at))
        })
        .await;
        match result {
            Ok(Ok((h, at))) => {
                self.metrics.upstream_bytes(at - offset);
                sink.partial.wrote(at - offset);
                sink.hasher = h;
                sink.written = at;
                sink.batch_len = 0;
                publish_written(fill, at);
                Ok(())
            }
            Ok(Err(e)) if crate::store::room::is_no_space(&e) => {
                self.metrics.store_refusal();
                let (key, path) = (sink.partial.key.clone(), sink.partial.path.clone());
                self.blocking(move |s| Err(s.ran_full(&key, path, offset)))
                    .await
            }
            Ok(Err(e)) => Err(FetchError::Store(StoreError::Io {
                op: "write partial file",
                path: sink.partial.path.clone(),
                source: e,
            })),
            Err(_) => Err(FetchError::Vanished),
        }
    }
}

/// The partial file a fill appends to, with the frames gathered for its
/// next write.
struct BodySink {
    partial: PartialFile,
    batch: Vec<Bytes>,
    batch_len: usize,
    /// Bytes in the file.
    written: u64,
    /// SHA-256 of the bytes so far; `None` when resuming.
    hasher: Option<Sha256>,
}

fn publish_written(fill: &Fill, now: u64) {
    fill.state.send_if_modified(|state| match state {
        FillState::Streaming { written, .. } if *written != now => {
            *written = now;
            true
        }
        _ => false,
    });
}

fn hash_file(file: &File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let want = buf.len().min((len - at) as usize);
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "partial file shrank",
            ));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hasher.finalize().into())
}

/// `Range` and `If-Range` to resume a partial, when it has a validator that
/// makes resuming safe.
fn resume_headers(meta: &PartialMeta, len: u64) -> Option<(HeaderValue, HeaderValue)> {
    if len == 0 {
        return None;
    }
    let validator = meta
        .etag
        .as_deref()
        .filter(|e| !e.starts_with("W/"))
        .or(meta.last_modified.as_deref())?;
    let range = HeaderValue::from_str(&format!("bytes={len}-")).ok()?;
    let if_range = HeaderValue::from_str(validator).ok()?;
    Some((range, if_range))
}

/// Whether the body of `resp` ends only when the connection closes: an
/// HTTP/1.x response with neither `Content-Length` nor chunked
/// `Transfer-Encoding` (RFC 9112 section 6.3, rule 8). hyper reads such a
/// body to EOF and reports a normal end, so only the head can tell.
fn close_delimited<B>(resp: &Response<B>) -> bool {
    let h1 = resp.version() <= http::Version::HTTP_11;
    let chunked = resp
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
    h1 && !chunked && !resp.headers().contains_key(header::CONTENT_LENGTH)
}

/// Whether `resp` continues a partial of `written` bytes: a `206` starting
/// exactly there, for the same total, with the same validator. Returns the
/// total it announces.
fn continues<B>(
    resp: &Response<B>,
    written: u64,
    total: Option<u64>,
    meta: &PartialMeta,
) -> Result<Option<u64>, &'static str> {
    if resp.status() == StatusCode::OK {
        return Err("the upstream's copy changed (it answered the resume with a whole 200)");
    }
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err("the upstream did not answer the resume with 206 Partial Content");
    }
    if content_range_start(resp.headers()) != Some(written) {
        return Err("the upstream's 206 starts at another byte than the partial ends");
    }
    let announced = content_range_total(resp.headers());
    if total.is_some() && announced != total {
        return Err("the upstream's 206 is for another length than the first answer");
    }
    let same = |name: header::HeaderName, ours: &Option<String>| match (
        ours,
        resp.headers().get(name).and_then(|v| v.to_str().ok()),
    ) {
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => true,
    };
    if !same(header::ETAG, &meta.etag) || !same(header::LAST_MODIFIED, &meta.last_modified) {
        return Err("the upstream's 206 carries another validator than the partial");
    }
    Ok(announced)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes START-END/TOTAL` → START.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

/// `Content-Range: bytes START-END/TOTAL` → TOTAL.
fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    v.rsplit('/').next()?.trim().parse().ok()
}

/// The SHA-256 an upstream announced in `Repr-Digest` (RFC 9530,
/// `sha-256=:BASE64:`) or `Digest` (RFC 3230, `SHA-256=BASE64`).
pub fn announced_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    repr_digest_sha256(headers).or_else(|| legacy_digest_sha256(headers))
}

/// `Repr-Digest: sha-256=:BASE64:` (RFC 9530): a structured-field
/// dictionary, parsed by `sfv`; several field lines are one dictionary.
fn repr_digest_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    let mut lines = headers.get_all("repr-digest").iter();
    let first = lines.next()?;
    let mut joined = String::from(first.to_str().ok()?);
    for more in lines {
        joined.push_str(", ");
        joined.push_str(more.to_str().ok()?);
    }
    let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
    match dict.get("sha-256")? {
        sfv::ListEntry::Item(item) => match &item.bare_item {
            sfv::BareItem::ByteSequence(bytes) => bytes.as_slice().try_into().ok(),
            _ => None,
        },
        sfv::ListEntry::InnerList(_) => None,
    }
}

/// The obsolete `Digest: SHA-256=BASE64` (RFC 3230): not a structured
/// field, a comma-separated list of `algorithm=value`.
fn legacy_digest_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    let b64 = base64::engine::general_purpose::STANDARD;
    headers
        .get_all("digest")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.trim().split_once('='))
        .filter(|(alg, _)| alg.trim().eq_ignore_ascii_case("sha-256"))
        .find_map(|(_, val)| <[u8; 32]>::try_from(b64.decode(val.trim()).ok()?).ok())
}

/// An error and its sources on one line, for logs and error pages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_digests_parse_in_both_syntaxes() {
        let sum: [u8; 32] = Sha256::digest(b"hello").into();
        let b64 = base64::engine::general_purpose::STANDARD.encode(sum);
        let mut h = HeaderMap::new();
        h.insert(
            "repr-digest",
            format!("sha-512=:AAAA:, sha-256=:{b64}:").parse().unwrap(),
        );
        assert_eq!(announced_sha256(&h), Some(sum));
        // Two field lines are one dictionary (RFC 9651 §4.2).
        let mut h = HeaderMap::new();
        h.append("repr-digest", "sha-512=:AAAA:".parse().unwrap());
        h.append("repr-digest", format!("sha-256=:{b64}:").parse().unwrap());
        assert_eq!(announced_sha256(&h), Some(sum));
        // A malformed field is no digest at all, not a half-read one.
        let mut h = HeaderMap::new();
        h.insert("repr-digest", format!("sha-256=:{b64}").parse().unwrap());
        assert_eq!(announced_sha256(&h), None);
        let mut h = HeaderMap::new();
        h.insert("digest", format!("MD5=xyz, SHA-256={b64}").parse().unwrap());
        assert_eq!(announced_sha256(&h), Some(sum));
        assert_eq!(announced_sha256(&HeaderMap::new()), None);
    }

    #[test]
    fn close_delimited_bodies_are_told_by_their_head() {
        let resp = |headers: &[(&str, &str)], version| {
            let mut b = Response::builder().version(version);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        use http::Version;
        assert!(close_delimited(&resp(&[], Version::HTTP_11)));
        assert!(close_delimited(&resp(&[], Version::HTTP_10)));
        assert!(!close_delimited(&resp(
            &[("content-length", "5")],
            Version::HTTP_11
        )));
        assert!(!close_delimited(&resp(
            &[("transfer-encoding", "gzip, Chunked")],
            Version::HTTP_11
        )));
        assert!(!close_delimited(&resp(&[], Version::HTTP_2)));
    }

    #[test]
    fn content_range_parts() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, "bytes 100-199/1000".parse().unwrap());
        assert_eq!(content_range_start(&h), Some(100));
        assert_eq!(content_range_total(&h), Some(1000));
    }

    #[test]
    fn only_a_206_that_continues_the_partial_is_spliced() {
        let meta = PartialMeta {
            key: "k".into(),
            url: "u".into(),
            total_length: Some(10),
            etag: Some("\"v1\"".into()),
            last_modified: None,
            started_at: 0,
        };
        let resp = |status: u16, range: &str, etag: &str| {
            let mut b = Response::builder().status(status);
            if !range.is_empty() {
                b = b.header(header::CONTENT_RANGE, range);
            }
            if !etag.is_empty() {
                b = b.header(header::ETAG, etag);
            }
            b.body(()).unwrap()
        };
        let ok = resp(206, "bytes 4-9/10", "\"v1\"");
        assert_eq!(continues(&ok, 4, Some(10), &meta), Ok(Some(10)));
        assert_eq!(continues(&ok, 4, None, &meta), Ok(Some(10)));
        for bad in [
            resp(200, "", "\"v2\""),
            resp(206, "bytes 0-9/10", "\"v1\""),
            resp(206, "bytes 4-10/11", "\"v1\""),
            resp(206, "bytes 4-9/10", "\"v2\""),
            resp(416, "", ""),
        ] {
            assert!(continues(&bad, 4, Some(10), &meta).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_say_their_kind_side_and_whether_to_retry() {
        let timeout = FetchError::Timeout {
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.kind(), ErrorKind::Timeout);
        assert_eq!(timeout.side(), Side::Upstream);
        assert_eq!(timeout.retry(), RetryType::Retryable);
        let digest = FetchError::DigestMismatch {
            url: "u".into(),
            announced: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(digest.kind(), ErrorKind::Integrity);
        assert_eq!(digest.retry(), RetryType::Final);
        let orphan = FetchError::Orphaned {
            url: "u".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(orphan.side(), Side::Downstream);
        assert_eq!(orphan.retry(), RetryType::Final);
    }

    #[test]
    fn resume_needs_a_strong_validator() {
        let mut meta = PartialMeta {
            key: "k".into(),
            url: "u".into(),
            total_length: Some(10),
            etag: Some("W/\"weak\"".into()),
            last_modified: None,
            started_at: 0,
        };
        assert!(resume_headers(&meta, 5).is_none());
        meta.etag = Some("\"strong\"".into());
        let (range, if_range) = resume_headers(&meta, 5).unwrap();
        assert_eq!(range, "bytes=5-");
        assert_eq!(if_range, "\"strong\"");
        assert!(resume_headers(&meta, 0).is_none());
    }
}
