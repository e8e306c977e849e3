//! The fleet's shared state (`cluster { redis "redis://…" }`): embedded
//! by default, Redis by choice.
//!
//! Without `redis` everything stays in this process, as it always has:
//! the digest index is the store's, the named limiters are governor's,
//! the counters are the admin's. With it, three things are shared through
//! one Redis server:
//! - the **digest index**: every complete replica's SHA-256 → the nodes
//!   that hold it, with their key and size ([`SharedState::holders`]);
//! - **fleet-wide limiters**: each named limiter a policy asks
//!   (`limiter_check`, ABI unchanged) counts in a fixed window in Redis
//!   that every node adds to (`window`);
//! - **counters**: redirects per mirror, upstream and file and the mirror
//!   upstreams' fetches and failures, added up over the fleet
//!   ([`counters`], `/api/fleet/counters`).
//!
//! Redis is never on a request's path: nothing here waits on it while a
//! request does, except [`SharedState::holders`], which is async and
//! bounded by [`OP_TIMEOUT`]. Writes go out from background tasks
//! (`link`); the limiters decide from what the last write answered.
//! When Redis cannot be reached (down, slow, refusing), every part falls
//! back to this node's own state, one warning is logged (not one per
//! request), `cistern_redis_up` drops to 0, `cistern_redis_errors_total`
//! counts, and the connection is retried in the background; once it is
//! back, this node's digests are written again in full (a Redis restarted
//! empty is refilled) and the counters carry on from where they were.
//!
//! Crate: `redis` (redis-rs) with only `tokio-comp`: its multiplexed
//! connection carries every task's commands over one socket, with the
//! reconnecting done here, so the up/down state, the single warning and
//! the resync are ours to see.

pub mod counters;
pub(crate) mod link;
pub(crate) mod window;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::AsyncCommands as _;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};

use crate::clock::Clock;
use crate::config::{ClusterConfig, RedisUrl};
use crate::store::{CacheKey, DigestWatch};

pub use counters::{CounterSample, FleetCounters, SampleSource};

/// The longest any one Redis command may take before Redis counts as
/// down: far above a healthy round trip, far below what a client would
/// notice behind [`SharedState::holders`].
pub const OP_TIMEOUT: Duration = Duration::from_millis(250);

/// The longest a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Digest changes waiting to be written; past this many (Redis slow, a
/// burst of commits) they are dropped and the next write is a full
/// resync instead.
const DIGEST_QUEUE: usize = 4096;

/// The prefix of every key Cistern writes in Redis.
pub const PREFIX: &str = "cistern:";

/// The Redis key of the digest index entry for `digest`: a hash of node
/// name → `{"key": URL, "size": bytes}`.
pub fn digest_key(digest: &[u8; 32]) -> String {
    format!("{PREFIX}digest:{}", hex::encode(digest))
}

/// The Redis key of the set of digests `node` holds (to take back, at a
/// resync, what it no longer has).
pub fn node_key(node: &str) -> String {
    format!("{PREFIX}node:{node}:digests")
}

/// One node that holds a digest, as the fleet's digest index has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Holder {
    /// The node's name (`cluster { node }`).
    pub node: String,
    /// The replica's cache key there (an absolute URL; asked through that
    /// node, it is a hit).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The Redis key that says `node` is alive: set with a time to live of
/// [`ALIVE_FOR`] at every ping, so a node that stopped drops out of
/// [`SharedState::holders`] within seconds though its entries stay.
pub fn alive_key(node: &str) -> String {
    format!("{PREFIX}node:{node}:alive")
}

/// How long a node counts as alive after its last ping.
pub const ALIVE_FOR: Duration = Duration::from_secs(3);

/// The digest's entries whose node is alive, by node name.
async fn live_holders(conn: &Conn, digest: &[u8; 32]) -> redis::RedisResult<Vec<Holder>> {
    let mut c = conn.conn.clone();
    let fields: Vec<(String, String)> = c.hgetall(digest_key(digest)).await?;
    if fields.is_empty() {
        return Ok(Vec::new());
    }
    let alive: Vec<Option<String>> = redis::cmd("MGET")
        .arg(fields.iter().map(|(n, _)| alive_key(n)).collect::<Vec<_>>())
        .query_async(&mut c)
        .await?;
    let mut out: Vec<Holder> = fields
        .into_iter()
        .zip(alive)
        .filter(|(_, alive)| alive.is_some())
        .filter_map(|((node, v), _)| {
            let held: HeldAs = serde_json::from_str(&v).ok()?;
            Some(Holder {
                node,
                key: held.key,
                size: held.size,
            })
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// The stored value of a digest index entry.
#[derive(Serialize, serde::Deserialize)]
struct HeldAs {
    key: String,
    size: u64,
}

/// The shared state's health, for `/metrics` and the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct RedisStatus {
    /// A `redis` URL is configured (password hidden).
    pub url: Option<String>,
    /// Connected, and the last command succeeded.
    pub up: bool,
    /// Commands and connection attempts that failed.
    pub errors: u64,
    /// Digest index entries written (held and dropped).
    pub digests_written: u64,
}

/// Where the shared state lives now: this process, or a Redis server for
/// one node name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) url: RedisUrl,
    pub(crate) node: Arc<str>,
}

/// A change to the digests this node holds, on its way to Redis.
#[derive(Debug)]
pub(crate) enum DigestEvent {
    Held {
        digest: [u8; 32],
        key: String,
        size: u64,
    },
    Dropped([u8; 32]),
}

/// The fleet's shared state: local, or Redis when configured. Cheap to
/// clone; one per process (it outlives reloads, which only retarget it).
#[derive(Clone, Debug)]
pub struct SharedState {
    inner: Arc<Inner>,
}

/// A live connection and the node it writes for.
pub(crate) struct Conn {
    pub(crate) conn: redis::aio::MultiplexedConnection,
    pub(crate) node: Arc<str>,
    /// Which connection this is: a failure reported on an older one does
    /// not take a newer one down.
    pub(crate) generation: u64,
}

pub(crate) struct Inner {
    clock: Clock,
    /// What the config asks for; the link task follows it.
    target: watch::Sender<Option<Target>>,
    /// Set while connected and healthy.
    conn: ArcSwapOption<Conn>,
    generation: AtomicU64,
    errors: AtomicU64,
    digests_written: AtomicU64,
    /// A warning was logged for the current outage: the next is logged
    /// only after Redis was up again.
    warned: AtomicBool,
    /// Woken when a task saw Redis fail, so the link reconnects.
    broken: Notify,
    digests: mpsc::Sender<DigestEvent>,
    digest_rx: std::sync::Mutex<Option<mpsc::Receiver<DigestEvent>>>,
    /// The digest index in Redis must be rewritten in full (a reconnect,
    /// a dropped event).
    resync: AtomicBool,
    resync_wake: Notify,
    windows: window::Windows,
    counters: counters::Counters,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl SharedState {
    /// Local state, until [`SharedState::configure`] names a Redis.
    pub fn new(clock: Clock) -> SharedState {
        let (digests, rx) = mpsc::channel(DIGEST_QUEUE);
        SharedState {
            inner: Arc::new(Inner {
                clock,
                target: watch::Sender::new(None),
                conn: ArcSwapOption::empty(),
                generation: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                digests_written: AtomicU64::new(0),
                warned: AtomicBool::new(false),
                broken: Notify::new(),
                digests,
                digest_rx: std::sync::Mutex::new(Some(rx)),
                resync: AtomicBool::new(true),
                resync_wake: Notify::new(),
                windows: window::Windows::default(),
                counters: counters::Counters::default(),
            }),
        }
    }

    /// Follows a configuration: Redis for `cluster { redis }`, local
    /// otherwise. Called when a snapshot goes live; cheap when nothing
    /// changed.
    pub fn configure(&self, cluster: Option<&ClusterConfig>) {
        let want = cluster.and_then(|c| {
            c.redis.as_ref().map(|url| Target {
                url: url.clone(),
                node: Arc::from(c.node.as_str()),
            })
        });
        self.inner.target.send_if_modified(|t| {
            if *t == want {
                return false;
            }
            *t = want;
            true
        });
    }

    /// Starts the background tasks (connection, digest writer, limiter
    /// and counter flushers); they stop when `shutdown` turns true.
    /// `store` lists this node's replicas for a full resync; `samples`
    /// reads this node's counters.
    pub fn start(
        &self,
        store: Arc<crate::store::ReplicaStore>,
        samples: counters::SampleSource,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let watch: Arc<dyn DigestWatch> = Arc::new(self.clone());
        store.watch_digests(watch);
        let rx = self
            .inner
            .digest_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut tasks = vec![tokio::spawn(link::supervise(
            self.inner.clone(),
            shutdown.clone(),
        ))];
        if let Some(rx) = rx {
            tasks.push(tokio::spawn(link::write_digests(
                self.inner.clone(),
                store,
                rx,
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(window::flush(
            self.inner.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(counters::flush(
            self.inner.clone(),
            samples,
            shutdown,
        )));
        tasks
    }

    /// Whether the state is in Redis now (configured and reachable).
    pub fn is_shared(&self) -> bool {
        self.inner.conn.load().is_some()
    }

    /// The nodes whose replica stores hold content with SHA-256 `digest`,
    /// from the fleet's digest index (this node included when it holds
    /// it; nodes that stopped pinging Redis for [`ALIVE_FOR`] left out),
    /// by node name, or `None` when the index cannot say: no Redis configured,
    /// Redis down, or no answer within [`OP_TIMEOUT`]. `Some(vec![])`
    /// means no node holds it. Never waits longer than `OP_TIMEOUT`; a
    /// failure counts as Redis down (the background task reconnects).
    pub async fn holders(&self, digest: &[u8; 32]) -> Option<Vec<Holder>> {
        let conn = self.inner.conn.load_full()?;
        match tokio::time::timeout(OP_TIMEOUT, live_holders(&conn, digest)).await {
            Ok(Ok(out)) => Some(out),
            Ok(Err(e)) => {
                self.inner.failed(conn.generation, &e.to_string());
                None
            }
            Err(_) => {
                let why = format!("no answer within {OP_TIMEOUT:?}");
                self.inner.failed(conn.generation, &why);
                None
            }
        }
    }

    /// Asks the fleet-wide window of limiter `name` about `key`: `None`
    /// when the state is local now (the caller asks its own limiter),
    /// else whether the request is allowed (and counted), or how long
    /// until the window ends. Never waits: the count is the last one
    /// Redis answered plus what this node allowed since.
    pub fn check_fleet(
        &self,
        name: &str,
        key: &str,
        count: u32,
        period: Duration,
    ) -> Option<Result<(), Duration>> {
        self.inner.conn.load().as_ref()?;
        let verdict = self
            .inner
            .windows
            .check(name, key, count, period, self.inner.clock.now());
        if verdict.is_ok() {
            self.inner.windows.wake.notify_one();
        }
        Some(verdict)
    }

    /// Fleet-wide counter totals from Redis, or this node's own when the
    /// state is local (see [`FleetCounters::source`]).
    pub async fn fleet_counters(&self) -> FleetCounters {
        counters::fleet(&self.inner).await
    }

    /// The shared state's health.
    pub fn status(&self) -> RedisStatus {
        self.inner.status()
    }
}

impl Inner {
    fn status(&self) -> RedisStatus {
        RedisStatus {
            url: self.target.borrow().as_ref().map(|t| t.url.redacted()),
            up: self.conn.load().is_some(),
            errors: self.errors.load(Ordering::Relaxed),
            digests_written: self.digests_written.load(Ordering::Relaxed),
        }
    }

    /// The live connection, if any.
    pub(crate) fn conn(&self) -> Option<Arc<Conn>> {
        self.conn.load_full()
    }

    /// A command on connection `generation` failed with `why`: the state
    /// is local until the link reconnects. Logs once per outage.
    pub(crate) fn failed(&self, generation: u64, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let current = self.conn.load();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            self.conn.store(None);
            self.broken.notify_one();
        }
        self.warn_once(why);
    }

    /// A connection attempt failed.
    pub(crate) fn unreachable(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.warn_once(why);
    }

    fn warn_once(&self, why: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            let url = self
                .target
                .borrow()
                .as_ref()
                .map(|t| t.url.redacted())
                .unwrap_or_default();
            tracing::warn!(target: "cistern::shared",
                "Redis at {url} is unreachable ({why}): the digest index, fleet limiters and counters are local to this node until it is back; retrying in the background");
        }
    }

    /// Connected: the state is shared again.
    pub(crate) fn connected(&self, conn: redis::aio::MultiplexedConnection, node: Arc<str>) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.conn.store(Some(Arc::new(Conn {
            conn,
            node,
            generation,
        })));
        self.resync.store(true, Ordering::Relaxed);
        self.resync_wake.notify_one();
        if self.warned.swap(false, Ordering::Relaxed) {
            tracing::info!(target: "cistern::shared", "Redis is reachable again: the state is shared with the fleet");
        } else {
            tracing::info!(target: "cistern::shared", "shared state in Redis");
        }
        generation
    }

    /// The config dropped Redis: local state, no warning.
    pub(crate) fn disconnected(&self) {
        self.conn.store(None);
        self.warned.store(false, Ordering::Relaxed);
    }
}

impl DigestWatch for SharedState {
    fn held(&self, digest: &[u8; 32], key: &CacheKey, size: u64) {
        self.send(DigestEvent::Held {
            digest: *digest,
            key: key.to_string(),
            size,
        });
    }

    fn dropped(&self, digest: &[u8; 32]) {
        self.send(DigestEvent::Dropped(*digest));
    }
}

impl SharedState {
    /// Queues a digest change without waiting: while Redis is down (or
    /// the queue full) it is dropped and the next connection resyncs.
    fn send(&self, event: DigestEvent) {
        if self.inner.conn.load().is_none() {
            return;
        }
        if self.inner.digests.try_send(event).is_err() {
            self.inner.resync.store(true, Ordering::Relaxed);
            self.inner.resync_wake.notify_one();
        }
    }
}
