//! The admin listener: a web UI, `/metrics` in Prometheus text format,
//! `/healthz`, and the JSON API the UI is built from.
//!
//! It is a listener of its own (loopback by default, see `docs/config.md`),
//! read-only, with an optional token or basic authentication (`auth`),
//! required off loopback: everything it answers is a view of state the
//! engines already keep. It answers only requests whose `Host` (or HTTP/2
//! `:authority`) names it: its address, `localhost`, a loopback literal or
//! an `admin { host … }` name. Anything else gets 421, so a web page whose
//! DNS name is rebound to this machine cannot read the replica's URLs. The replica tree comes from the store's index, never
//! from a walk of the disk; downloads in progress come from the fetch engine.
//!
//! | path | what |
//! | --- | --- |
//! | `/` | overview page: status, downloads, mirrors, policies |
//! | `/replica?path=DIR` | the replica tree, one directory per page |
//! | `/fleet` | the fleet (`cluster`): nodes, health, share of keys, peer vs upstream bytes |
//! | `/metrics` | Prometheus text format |
//! | `/healthz` | `ok` |
//! | `/api/status` | config generation, last reload error, totals |
//! | `/api/replica?path=DIR&offset=N&limit=N` | one directory of the replica |
//! | `/api/downloads` | fills in progress |
//! | `/api/mirrors` | mirror sets and their upstreams' health |
//! | `/api/peers` | the fleet (`cluster`): this node's name and its peers' state |
//! | `/api/policies` | policy call, failure and latency counters |
//! | `/api/redirects` | redirect-mode counters per day, mirror, upstream and file |
//! | `/api/fleet/counters` | redirect and mirror counters added up over the fleet (`cluster { redis }`), else this node's |
//! | `/api/fleet/digest?sha256=HEX` | the nodes the fleet's digest index lists for a digest |

pub mod api;
mod auth;
mod html;
pub mod prometheus;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gate::{AcceptBackoff, ConnCaps, ConnGate, SendDeadline};
use crate::ours;
use crate::pipeline::Proxy;
use crate::reload::ReloadLog;
use prometheus::{Kind, PromWriter};

/// What the admin handlers read: the proxy (snapshot, engine, store,
/// counters) and facts from start-up.
pub struct Admin {
    proxy: Arc<Proxy>,
    started: SystemTime,
    /// The admin listener's bound address: its IP and port are names it
    /// answers to.
    listen: SocketAddr,
    /// The admin listener's own connection counts: a flood of proxy
    /// connections never locks the operator out of `/metrics`.
    connections: ConnGate,
    /// The reload engine's reports.
    reload: Arc<ReloadLog>,
    /// Requests refused for missing or wrong credentials.
    auth_refused: AtomicU64,
}

/// How long open admin connections get to finish on shutdown.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);

type AdminBody = Full<Bytes>;

impl Admin {
    /// The admin view of `proxy`, served by the listener bound at
    /// `listen`; `reload` is where the reload engine reports.
    pub fn new(proxy: Arc<Proxy>, listen: SocketAddr, reload: Arc<ReloadLog>) -> Admin {
        Admin {
            proxy,
            started: SystemTime::now(),
            listen,
            connections: ConnGate::new(),
            reload,
            auth_refused: AtomicU64::new(0),
        }
    }

    /// Answers one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<AdminBody> {
        if let Some(refused) = self.host_refusal(&req) {
            return refused;
        }
        // A health check (load balancer, systemd) carries no credentials,
        // and `ok` tells nobody anything.
        if req.uri().path() != "/healthz"
            && let Some(refused) = self.auth_refusal(&req)
        {
            return refused;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "the admin interface is read-only: GET or HEAD\n",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let query = Query::parse(req.uri().query().unwrap_or(""));
        match req.uri().path() {
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/metrics" => {
                let mut resp = plain(StatusCode::OK, self.metrics_text());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/api/status" => json(&self.status()),
            "/api/downloads" => json(&api::downloads(&self.proxy)),
            "/api/mirrors" => json(&api::mirrors(&self.proxy.snapshot())),
            "/api/peers" => json(&api::peers(&self.proxy.snapshot())),
            "/api/policies" => json(&api::policies(&self.proxy.snapshot())),
            "/api/redirects" => json(&api::redirects(&self.proxy)),
            "/api/fleet/counters" => json(&self.proxy.engine().shared().fleet_counters().await),
            "/api/fleet/digest" => {
                match api::fleet_digest(&self.proxy, query.get("sha256")).await {
                    Ok(d) => json(&d),
                    Err(why) => plain(StatusCode::BAD_REQUEST, why),
                }
            }
            "/api/replica" => match self.listing(&query).await {
                Ok(l) => json(&l),
                Err(resp) => resp,
            },
            "/" => {
                let snap = self.proxy.snapshot();
                let page = html::overview(
                    &self.status(),
                    &api::downloads(&self.proxy),
                    &api::mirrors(&snap),
                    &api::policies(&snap),
                    &api::redirects(&self.proxy),
                );
                page_response(page)
            }
            "/fleet" => page_response(html::fleet(api::fleet(&self.proxy).as_ref())),
            "/replica" => match self.listing(&query).await {
                Ok(l) => page_response(html::replica(&l)),
                Err(resp) => resp,
            },
            "/static/cistern.css" => asset("text/css; charset=utf-8", html::CSS),
            "/static/cistern.js" => asset("text/javascript; charset=utf-8", html::JS),
            _ => plain(StatusCode::NOT_FOUND, "not found; try / or /metrics\n"),
        }
    }

    /// The refusal of a request that does not name the admin listener: a
    /// missing, repeated or unparsable `Host` (400), or one, like the
    /// `:authority` or absolute URL, that is not one of the admin's names
    /// (421).
    fn host_refusal<B>(&self, req: &Request<B>) -> Option<Response<AdminBody>> {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Some(plain(
                StatusCode::BAD_REQUEST,
                "more than one Host header\n",
            ));
        }
        let host = match host {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|h| h.parse::<Authority>().ok()) {
                Some(a) => Some(a),
                None => {
                    return Some(plain(
                        StatusCode::BAD_REQUEST,
                        "the Host header is not a host\n",
                    ));
                }
            },
        };
        let uri = req.uri().authority();
        if host.is_none() && uri.is_none() {
            return Some(plain(
                StatusCode::BAD_REQUEST,
                "a Host header is required\n",
            ));
        }
        let snap = self.proxy.snapshot();
        let names = &snap.config.admin.hosts;
        for authority in uri.into_iter().chain(host.as_ref()) {
            let port = authority.port_u16().unwrap_or(80);
            if !ours::names_listener(authority.host(), port, self.listen, names) {
                return Some(plain(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "this is Cistern's admin interface, and {:?} is not one of its names: it answers to its own address, localhost and the names listed in `admin {{ host … }}` in config.kdl\n",
                        authority.as_str()
                    ),
                ));
            }
        }
        None
    }

    /// The 401 for a request without a credential the config accepts
    /// (`admin { token-sha256 …; user … }`); `None` when it may go on.
    fn auth_refusal<B>(&self, req: &Request<B>) -> Option<Response<AdminBody>> {
        let snap = self.proxy.snapshot();
        let config = &snap.config.admin.auth;
        if auth::allowed(config, req.headers()) {
            return None;
        }
        self.auth_refused.fetch_add(1, Ordering::Relaxed);
        let mut resp = plain(
            StatusCode::UNAUTHORIZED,
            "this admin interface needs a token (Authorization: Bearer …) or a user and password\n",
        );
        for challenge in auth::challenges(config) {
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
            }
        }
        Some(resp)
    }

    /// `/api/status`.
    pub fn status(&self) -> api::Status {
        api::status(&self.proxy, self.started, &self.reload.status())
    }

    async fn listing(&self, query: &Query) -> Result<api::Listing, Response<AdminBody>> {
        let dir = query.get("path").unwrap_or("").trim_matches('/').to_owned();
        let offset = match query.get("offset").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return Err(plain(StatusCode::BAD_REQUEST, "offset must be a number\n"));
            }
        };
        let limit = match query.get("limit").map(str::parse::<usize>) {
            None => api::DEFAULT_PAGE,
            Some(Ok(n)) if n > 0 => n.min(api::MAX_PAGE),
            Some(_) => {
                return Err(plain(
                    StatusCode::BAD_REQUEST,
                    "limit must be a positive number\n",
                ));
            }
        };
        let proxy = self.proxy.clone();
        // Sorting a large index is CPU work: keep it off the async workers.
        tokio::task::spawn_blocking(move || api::listing(&proxy, &dir, offset, limit))
            .await
            .map_err(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "listing task failed\n"))
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let snap = self.proxy.snapshot();
        let engine = self.proxy.engine();
        let mut w = PromWriter::default();
        prometheus::write_counters(&mut w, &engine.metrics().snapshot());
        prometheus::write_connections(
            &mut w,
            &[
                ("proxy", self.proxy.connections().stats()),
                ("admin", self.connections.stats()),
            ],
        );

        let stats = engine.store().stats();
        w.single(
            "cistern_replica_files",
            Kind::Gauge,
            "Complete files in the replica.",
            stats.files,
        );
        w.single(
            "cistern_replica_bytes",
            Kind::Gauge,
            "Bytes of complete files in the replica.",
            stats.bytes,
        );
        prometheus::write_store_health(&mut w, &engine.store().health());
        w.single(
            "cistern_admin_auth_refused_total",
            Kind::Counter,
            "Admin requests refused with 401: no credential, or one the config does not accept.",
            self.auth_refused.load(Ordering::Relaxed),
        );
        w.single(
            "cistern_fills_in_progress",
            Kind::Gauge,
            "Upstream fetches under way.",
            engine.in_progress().len(),
        );
        prometheus::write_fill_caps(&mut w, &engine.fill_permits());
        prometheus::write_peers(&mut w, &api::peers(&snap).peers);
        prometheus::write_redis(&mut w, &engine.shared().status());

        let policies = snap.policies.stats();
        w.family(
            "cistern_policy_calls_total",
            Kind::Counter,
            "Policy hook calls (reset when a reload recompiles the policy).",
        );
        for p in &policies {
            w.sample(
                "cistern_policy_calls_total",
                &[("policy", &p.name)],
                p.calls,
            );
        }
        w.family(
            "cistern_policy_failures_total",
            Kind::Counter,
            "Policy hook calls that failed, by kind (trap, timeout, memory-limit, guest-error).",
        );
        for p in &policies {
            for (kind, n) in [
                ("trap", p.traps),
                ("timeout", p.timeouts),
                ("memory-limit", p.memory_limits),
                ("guest-error", p.guest_errors),
            ] {
                w.sample(
                    "cistern_policy_failures_total",
                    &[("policy", &p.name), ("kind", kind)],
                    n,
                );
            }
        }
        w.family(
            "cistern_policy_reused_total",
            Kind::Counter,
            "Policy on_request calls not made because a kept outcome applied (reuse_outcome).",
        );
        for p in &policies {
            w.sample(
                "cistern_policy_reused_total",
                &[("policy", &p.name)],
                p.reused,
            );
        }
        w.family(
            "cistern_policy_call_seconds_total",
            Kind::Counter,
            "Time spent in policy hook calls.",
        );
        for p in &policies {
            w.sample(
                "cistern_policy_call_seconds_total",
                &[("policy", &p.name)],
                p.total_time.as_secs_f64(),
            );
        }
        w.family(
            "cistern_policy_call_seconds_max",
            Kind::Gauge,
            "The slowest policy hook call.",
        );
        for p in &policies {
            w.sample(
                "cistern_policy_call_seconds_max",
                &[("policy", &p.name)],
                p.max_time.as_secs_f64(),
            );
        }

        let mirrors: Vec<_> = snap
            .router
            .mirrors()
            .iter()
            .map(|m| (m.name.clone(), m.health()))
            .collect();
        w.family(
            "cistern_mirror_upstream_up",
            Kind::Gauge,
            "1 while the upstream is enabled, 0 while failures have disabled it.",
        );
        for (name, health) in &mirrors {
            for u in health {
                w.sample(
                    "cistern_mirror_upstream_up",
                    &[("mirror", name), ("upstream", &u.base)],
                    u8::from(!u.down),
                );
            }
        }
        w.family(
            "cistern_mirror_upstream_failures_total",
            Kind::Counter,
            "Failed requests per mirror upstream (reset by a reload).",
        );
        for (name, health) in &mirrors {
            for u in health {
                w.sample(
                    "cistern_mirror_upstream_failures_total",
                    &[("mirror", name), ("upstream", &u.base)],
                    u.failures,
                );
            }
        }
        mirror_gauges(&mut w, &mirrors);
        w.family(
            "cistern_mirror_redirects_total",
            Kind::Counter,
            "302s sent per redirect-mode mirror and upstream since start (kept across reloads).",
        );
        for (mirror, upstream, n) in self.proxy.engine().metrics().redirects().totals() {
            w.sample(
                "cistern_mirror_redirects_total",
                &[("mirror", &mirror), ("upstream", &upstream)],
                n,
            );
        }

        let reload = self.reload.status();
        w.single(
            "cistern_config_generation",
            Kind::Gauge,
            "Configuration generation: 1 at start, +1 per successful reload.",
            reload.generation,
        );
        w.family(
            "cistern_config_reloads_total",
            Kind::Counter,
            "Config reloads, by result.",
        );
        w.sample(
            "cistern_config_reloads_total",
            &[("result", "ok")],
            reload.generation.saturating_sub(1),
        );
        w.sample(
            "cistern_config_reloads_total",
            &[("result", "error")],
            reload.attempts.saturating_sub(reload.generation - 1),
        );
        w.single(
            "cistern_config_last_reload_ok",
            Kind::Gauge,
            "0 while the last reload attempt was refused (the previous config keeps serving).",
            u8::from(reload.last_error.is_none()),
        );
        w.single(
            "cistern_start_time_seconds",
            Kind::Gauge,
            "When this process started, seconds since the Unix epoch.",
            crate::store::meta::unix_secs(self.started),
        );
        w.finish()
    }
}

/// A decoded query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn with_common_headers(
    mut resp: Response<AdminBody>,
    content_type: &'static str,
) -> Response<AdminBody> {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    with_common_headers(resp, "text/plain; charset=utf-8")
}

fn json<T: serde::Serialize>(value: &T) -> Response<AdminBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => with_common_headers(
            Response::new(Full::new(Bytes::from(body))),
            "application/json",
        ),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {e}\n"),
        ),
    }
}

fn page_response(page: String) -> Response<AdminBody> {
    let mut resp = with_common_headers(
        Response::new(Full::new(Bytes::from(page))),
        "text/html; charset=utf-8",
    );
    // Pages only load their own stylesheet and script; anything injected
    // through a hostile URL or error text could not run.
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response<AdminBody> {
    let mut resp = with_common_headers(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        content_type,
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    resp
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves admin requests on `listener` until `shutdown` turns true.
///
/// Connections follow the proxy listeners' rules: the same caps (counted
/// apart), and the idle timeout from accept to a first whole request, then
/// between requests.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                let wait = backoff.failed();
                tracing::warn!(target: "cistern::admin", "accept: {e}; retrying in {wait:?}");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let config = admin.proxy.snapshot().config.clone();
        let caps = ConnCaps::from_config(&config.limits);
        let permit = match admin.connections.admit(client.ip(), caps) {
            Ok(p) => Arc::new(p),
            Err(why) => {
                tracing::debug!(target: "cistern::admin", %client, "refusing an admin connection: {why}");
                continue;
            }
        };
        // Read per connection, so a reload's idle timeout applies to the
        // next one.
        let idle = config.timeouts.idle;
        let first_by = tokio::time::Instant::now() + idle;
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(idle);
        let started = Arc::new(AtomicBool::new(false));
        let first = started.clone();
        let handler = admin.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            first.store(true, Ordering::Relaxed);
            let admin = handler.clone();
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(
                    TokioIo::new(SendDeadline::new(
                        stream,
                        config.timeouts.send,
                        permit.clone(),
                    )),
                    service,
                )
                .into_owned(),
        );
        let admin = admin.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            // The auto builder's version detection has no timeout of its
            // own: the first read gets the idle timeout (see `server`).
            let mut first_due = true;
            let result = loop {
                tokio::select! {
                    // Before hyper's header timer, which cannot fire earlier.
                    biased;
                    _ = tokio::time::sleep_until(first_by), if first_due => {
                        if !started.load(Ordering::Relaxed) {
                            admin.connections.closed_silent();
                            tracing::debug!(target: "cistern::admin", %client, "no request within the idle timeout; closing");
                            return;
                        }
                        first_due = false;
                    }
                    r = conn.as_mut() => break r,
                }
            };
            if let Err(e) = result {
                tracing::debug!(target: "cistern::admin", %client, "admin connection ended: {e}");
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(ADMIN_DRAIN) => {}
    }
}

/// The per-upstream gauges of `/metrics` beside up and failures: weight,
/// share, latency and the last probe.
fn mirror_gauges(
    w: &mut PromWriter,
    mirrors: &[(String, Vec<crate::fetch::mirror::UpstreamHealth>)],
) {
    type Value = fn(&crate::fetch::mirror::UpstreamHealth) -> Option<f64>;
    let gauges: [(&str, &str, Value); 5] = [
        (
            "cistern_mirror_upstream_weight",
            "The upstream's configured weight.",
            |u| Some(f64::from(u.weight)),
        ),
        (
            "cistern_mirror_upstream_share",
            "The upstream's share of new files, 0 to 1 (weight cut by latency and errors; 0 while down).",
            |u| Some(u.share),
        ),
        (
            "cistern_mirror_upstream_latency_seconds",
            "Moving average time to a response head.",
            |u| u.latency.map(|l| l.as_secs_f64()),
        ),
        (
            "cistern_mirror_upstream_probe_success",
            "1 if the last health probe succeeded, 0 if it failed.",
            |u| u.last_probe.as_ref().map(|p| f64::from(u8::from(p.ok))),
        ),
        (
            "cistern_mirror_upstream_probe_timestamp_seconds",
            "When the last health probe was sent, Unix seconds.",
            |u| {
                u.last_probe
                    .as_ref()
                    .map(|p| crate::store::meta::unix_secs(p.at) as f64)
            },
        ),
    ];
    for (metric, help, value) in gauges {
        w.family(metric, Kind::Gauge, help);
        for (name, health) in mirrors {
            for u in health {
                if let Some(v) = value(u) {
                    w.sample(metric, &[("mirror", name), ("upstream", &u.base)], v);
                }
            }
        }
    }
}
