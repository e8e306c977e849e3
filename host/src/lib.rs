//! Cistern: a caching edge proxy that keeps a plain, browsable replica on
//! disk, merges concurrent downloads of one file into one upstream fetch, and
//! lets WebAssembly policies steer its decisions.
//!
//! # Layout
//! The modules follow a request through the proxy:
//!
//! - [`config`]: `config.kdl` → a typed, validated [`config::Config`], with
//!   diagnostics that name file, line and column.
//! - [`server`]: listeners (plaintext and TLS), HTTP/1.1 and HTTP/2
//!   connections, timeouts and graceful drain; listeners come and go with
//!   reloads.
//! - [`tls`]: the sites' certificates and keys, checked before use, and
//!   the table that picks one by SNI.
//! - [`request`]: checks a client's request before routing: one valid
//!   `Host`, no body on GET or HEAD.
//! - [`credentials`]: user and password in a request's URL: taken out
//!   before anything logs or stores the URL, sent upstream as
//!   `Authorization: Basic` for forward-proxied requests; secret headers
//!   redacted in logs.
//! - [`route`]: decides what a request is: forward proxy, CONNECT tunnel,
//!   transparent, a mirror path, or local.
//! - [`ours`]: what is Cistern's own: the names it answers to and the
//!   sockets it listens on, which it never connects to on a client's behalf.
//! - [`proxy`]: the request pipeline; asks the store, the fetch engine and the
//!   limiter, and writes the access log.
//! - [`policy`]: WebAssembly policies: the wasmtime runtime, the host side
//!   of the guest ABI (`guest-sdk/ABI.md`) and the built-in policies.
//! - [`serve`]: answers a request from a replica file (complete or still
//!   filling): ranges, conditionals, `Age`, `Cache-Status`, digests.
//! - [`cache`]: the RFC 9111 rules (freshness, storability, revalidation),
//!   on top of `http-cache-semantics`.
//! - [`fetch`]: the coalescing fetch engine, the upstream client and mirror
//!   sets.
//! - [`store`]: the replica tree, its metadata (a versioned format of its
//!   own, with migration and quarantine), partial files, the index rebuilt
//!   from disk, the digest index, LRU eviction and `cistern verify`.
//!   `store/mod.rs` is the [`store::ReplicaStore`] facade (open, lookup,
//!   refresh, remove); `key` (URL → [`store::CacheKey`]) ← `path` (key →
//!   replica path, one way); `commit` (atomic commit of a fill), `partial`
//!   (partial files and their metadata), `recovery` (rebuilding the index at
//!   open, quarantine), `evict` (LRU order and eviction), `index` (the maps),
//!   `meta` (+ `meta/format`), `room` (disk room), `ram`, `verify`.
//! - [`limit`]: per-client request limits and the upstream bandwidth cap.
//! - [`gate`]: connection admission: caps on open connections, the
//!   accept back-off and the descriptor limit.
//! - [`tunnel`]: CONNECT tunnelling, closed when idle.
//! - [`accesslog`]: one log line per request, written when its body ends.
//! - [`admin`]: the admin listener: web UI, Prometheus `/metrics`,
//!   `/healthz` and a JSON API; the request-path counters.
//! - [`app`]: assembles the engines and listeners from a config.
//! - [`reload`]: watches the config and the files it names, rebuilds and
//!   swaps the snapshot; keeps the reload status.
//! - [`clock`]: wall-clock time behind a seam, so freshness can be tested
//!   without sleeping.

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod fetch;
pub mod gate;
pub mod limit;
pub mod ours;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod route;
pub mod serve;
pub mod server;
pub mod store;
pub mod tls;
pub mod tunnel;
