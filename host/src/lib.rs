//! Cistern: a caching edge proxy that keeps a plain, browsable replica on
//! disk, merges concurrent downloads of one file into one upstream fetch, and
//! lets WebAssembly policies steer its decisions.
//!
//! # Layout
//! One engine per module. Dependencies run one way, in the order below: a
//! module uses only those listed before it (the leaves first), so the
//! request path reads top to bottom and nothing imports back.
//!
//! Shared vocabulary (leaves):
//! - [`body`]: the response body type, its error type and the small bodies
//!   Cistern makes (empty, in-memory, plain-text messages).
//! - [`clock`]: wall-clock and monotonic time behind a seam, so freshness,
//!   mirror health and orphaned fills can be tested without sleeping.
//! - [`observe`]: what the cache did ([`observe::CacheOutcome`], with a
//!   [`observe::NoCacheReason`] for every pass), the request counters,
//!   the redirect counters (`redirects`) and the access log; the admin renders them, the engines report into them.
//! - [`credentials`]: user and password in a request's URL: taken out
//!   before anything logs or stores the URL, sent upstream as
//!   `Authorization: Basic` for forward-proxied requests; secret headers
//!   redacted in logs.
//! - [`request`]: checks a client's request before routing: one valid
//!   `Host`, no body on GET or HEAD.
//! - [`via`]: this Cistern's `Via` hop (`cistern-<node id>`) and loop
//!   detection by it, so Cisterns in series pass each other's requests.
//!
//! The engines:
//! - [`config`]: `config.kdl` → a typed, validated [`config::Config`], with
//!   diagnostics that name file, line and column. `model` is the typed
//!   config, `error` the problems, `units` sizes and durations; `parse`
//!   walks the KDL: `parse/walker.rs` is the generic walker (rule tables,
//!   node shapes, value readers, suggestions), and every block has its
//!   own file of rules (`top`, `listen`, `store`, `forward`, `mirror`,
//!   `site`, `policy`, `limit`, `timeouts`, `upstream_tls`, `admin`,
//!   `server_name`), with `upstream_block` the rule set `mirror` and
//!   `site` share.
//! - [`gate`]: connection admission: caps on open connections, the accept
//!   back-off, the descriptor limit and the send deadline on a
//!   connection's writes (`gate/send.rs`) and on its HTTP/2 responses
//!   (`gate/stream.rs`).
//! - [`ours`]: what is Cistern's own: the names it answers to and the
//!   sockets it listens on, which it never connects to on a client's behalf.
//! - [`store`]: the replica tree, its metadata (a versioned format of its
//!   own, with migration and quarantine), partial files, the index rebuilt
//!   from disk, the digest index, LRU eviction and `cistern verify`.
//!   `store/mod.rs` is the [`store::ReplicaStore`] facade (open, lookup,
//!   refresh, remove); `key` (URL → [`store::CacheKey`]) ← `path` (key →
//!   replica path, one way); `commit` (atomic commit of a fill), `aside`
//!   (responses other than 200, kept in the state directory), `partial`
//!   (partial files and their metadata), `recovery` (rebuilding the index at
//!   open, quarantine), `evict` (LRU order and eviction), `index` (the maps),
//!   `meta` (+ `meta/format`), `room` (disk room), `ram`, `verify`.
//! - [`cache`]: the RFC 9111 rules (freshness, storability, revalidation,
//!   serving stale), on top of `http-cache-semantics`.
//! - [`shared`]: the fleet's shared state, in this process or, with
//!   `cluster { redis }`, in Redis: the digest index of every node
//!   (`holders`), fleet-wide windows of the named limiters and the
//!   counters' fleet totals, written from background tasks (`link`,
//!   `window`, `counters`) and local again while Redis is unreachable.
//! - [`limit`]: per-client request limits and the upstream bandwidth cap;
//!   the named limiters count fleet-wide through `shared` when it is.
//! - [`fetch`]: the coalescing fetch engine: `mod.rs` the facade,
//!   `coalesce` (one fill per key, its states, the in-flight registry),
//!   `fill` (the fill task: revalidate, resume, prepare, stream, commit),
//!   `failover` (sending along a mirror set, reporting health), `sink`
//!   (writing and hashing the body), `headers` (response-header parsers),
//!   `error` (kinds, sides, retryability), `mirror` (mirror sets: the
//!   weighted choice per file and the health; `mirror/alternatives` the
//!   order described to Metalink clients), `redirect` (the files a
//!   redirecting mirror keeps serving), `probe` (active health
//!   probes on the engine clock), `peer` (the fleet of `cluster`: key owners
//!   by rendezvous hash, peer health, content asked of peers by its
//!   SHA-256), `upstream` (the HTTP client), `ftp`
//!   (the gateway that answers the client's `ftp://` requests over FTP),
//!   `confine` (keeping paths below
//!   an upstream's base).
//! - [`serve`]: answers a request from a replica file (complete or still
//!   filling): ranges, conditionals, `Age`, digests; `serve/metalink.rs`
//!   the Metalink links and `FILE.meta4` documents of mirror sets.
//! - [`policy`]: WebAssembly policies: the wasmtime runtime, the host side
//!   of the guest ABI (`guest-sdk/ABI.md`) and the built-in policies.
//! - [`route`]: decides what a request is: forward proxy, CONNECT tunnel,
//!   transparent, a mirror path, a site, or local.
//! - [`tls`]: the sites' certificates and keys, checked before use, and
//!   the table that picks one by SNI.
//! - [`snapshot`]: one configuration's derived state (router, limiters,
//!   policy chains, certificates), swapped whole on reload.
//! - [`tunnel`]: CONNECT tunnelling, closed when idle.
//! - [`pipeline`]: the request pipeline: validate, route, run policies,
//!   then a tunnel (`connect`), a cacheable request (`cached`: lookup,
//!   then hit, stale, or the key's fill) or a pass-through
//!   (`passthrough`); a redirecting mirror's 302s, JSON and mirror lists
//!   (`redirect`); Cistern's own answers and error pages (`answers`);
//!   `FILE.meta4` below a mirror (`metalink`).
//! - [`server`]: listeners (plaintext and TLS), HTTP/1.1 and HTTP/2
//!   connections, timeouts and graceful drain; listeners come and go with
//!   reloads.
//! - [`reload`]: watches the config and the files it names, rebuilds and
//!   swaps the snapshot; keeps the reload log.
//! - [`app`]: assembles the engines and listeners from a config.
//! - [`admin`]: the admin listener: web UI, Prometheus `/metrics`,
//!   `/healthz` and a JSON API; it only renders what the others own.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod fetch;
pub mod gate;
pub mod limit;
pub mod observe;
pub mod ours;
pub mod pipeline;
pub mod policy;
pub mod reload;
pub mod request;
pub mod route;
pub mod serve;
pub mod server;
pub mod shared;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod via;
