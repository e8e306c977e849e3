//! The request pipeline: limit, route, look in the replica, join or start
//! a fill, serve, and log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::accesslog::{AccessRecord, CacheOutcome, LoggedBody};
use crate::cache::{self, CacheRequest, Freshness};
use crate::clock::Clock;
use crate::config::{CacheMode, Config, StaleRules};
use crate::fetch::{
    FetchEngine, FetchError, FetchSettings, FillJob, FillState, FillTicket, HeadHook, Side,
    Upstreams, error_chain,
};
use crate::gate::ConnGate;
use crate::limit::Limits;
use crate::policy::bridge::{PolicyHook, ProxyPolicyHost};
use crate::policy::{
    DirectResponse, PolicyChain, PolicyEngine, PolicyError, PolicyHost, PolicySet, RequestOutcome,
    RequestView,
};
use crate::reload::ReloadStatus;
use crate::route::{Route, Router};
use crate::serve::{self, ProxyBody, ServeError, Source};
use crate::store::{CacheKey, Replica};
use crate::tls::{CertTable, TlsError};
use crate::tunnel;

/// Everything derived from one configuration; swapped whole on reload so a
/// request finishes on the snapshot it started with.
pub struct Snapshot {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Its routing table.
    pub router: Router,
    /// Its limiters.
    pub limits: Arc<Limits>,
    /// Fetch settings derived from it.
    pub settings: FetchSettings,
    /// Log request and response headers (`-v`).
    pub log_headers: bool,
    /// Its compiled policies.
    pub policies: PolicySet,
    forward_chain: PolicyChain,
    /// Policy chains of the mirrors, by mirror name.
    mirror_chains: HashMap<String, PolicyChain>,
    /// Policy chains of the sites, by site name.
    site_chains: HashMap<String, PolicyChain>,
    /// The sites' certificates, picked by SNI on TLS listeners.
    pub certs: CertTable,
    no_policies: PolicyChain,
    policy_host: Arc<dyn PolicyHost>,
}

/// Why a snapshot could not be built from a valid config.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A policy could not be loaded or compiled.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A site's certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Snapshot {
    /// Derives a snapshot from a validated config, compiling its policies
    /// and loading the sites' certificates. Blocking (compilation, file
    /// reads): call it from `spawn_blocking`.
    pub fn build(
        config: Config,
        policy_engine: &PolicyEngine,
        fetch: &FetchEngine,
        log_headers: bool,
    ) -> Result<Snapshot, SnapshotError> {
        // Certificates first: cheap to check, and a bad one should not wait
        // for every policy to compile.
        let certs = CertTable::load(&config, std::time::SystemTime::now())?;
        let policies = policy_engine.load(&config.policies)?;
        let forward_chain = policies.chain(&config.forward.policies)?;
        let mut mirror_chains = HashMap::new();
        for m in &config.mirrors {
            mirror_chains.insert(m.name.clone(), policies.chain(&m.policies)?);
        }
        let mut site_chains = HashMap::new();
        for site in &config.sites {
            site_chains.insert(site.name.clone(), policies.chain(&site.policies)?);
        }
        let limits = Arc::new(Limits::new(&config));
        let settings = FetchSettings {
            idle: config.timeouts.idle,
            orphan: config.timeouts.orphan_fill,
            mode: config.mode,
            limits: limits.clone(),
        };
        let policy_host: Arc<dyn PolicyHost> =
            Arc::new(ProxyPolicyHost::new(fetch.clone(), limits.clone()));
        Ok(Snapshot {
            router: Router::new(&config, fetch.clock()),
            config: Arc::new(config),
            limits,
            settings,
            log_headers,
            policies,
            forward_chain,
            mirror_chains,
            site_chains,
            certs,
            no_policies: PolicyChain::default(),
            policy_host,
        })
    }
}

/// Facts about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub client: SocketAddr,
    /// Our address on this connection.
    pub local: SocketAddr,
    /// For a connection on a TLS site listener, that listener's address as
    /// configured (it picks the sites the request may reach); `None` on a
    /// plaintext listener.
    pub site_listener: Option<SocketAddr>,
}

/// The proxy: the current snapshot plus the engines that outlive reloads.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    engine: FetchEngine,
    policy_engine: PolicyEngine,
    clock: Clock,
    /// Written by the reload engine only; read by the admin UI.
    reload: Mutex<ReloadStatus>,
    /// Open client connections of every proxy listener, against the caps.
    connections: ConnGate,
}

/// What the pipeline decided, before the access log wraps the body.
struct Answer {
    response: Response<ProxyBody>,
    outcome: CacheOutcome,
}

impl Answer {
    fn local(response: Response<ProxyBody>) -> Answer {
        Answer {
            response,
            outcome: CacheOutcome::Local,
        }
    }
}

impl Proxy {
    /// A proxy serving `snapshot` with `engine`; `policy_engine` compiles
    /// the policies of later snapshots.
    pub fn new(
        snapshot: Snapshot,
        engine: FetchEngine,
        policy_engine: PolicyEngine,
        clock: Clock,
    ) -> Proxy {
        Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            engine,
            policy_engine,
            clock,
            reload: Mutex::new(ReloadStatus::started(SystemTime::now())),
            connections: ConnGate::new(),
        }
    }

    /// The connection caps' counts, shared by every proxy listener.
    pub fn connections(&self) -> &ConnGate {
        &self.connections
    }

    /// The reload status: the generation serving, when it was loaded, and
    /// the last failed reload's problems (for logs and the admin UI).
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Updates the reload status (the reload engine's, under its own
    /// serialisation).
    pub(crate) fn update_reload_status(&self, update: impl FnOnce(&mut ReloadStatus)) {
        update(&mut self.reload.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The policy engine (one per process).
    pub fn policy_engine(&self) -> &PolicyEngine {
        &self.policy_engine
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Makes `snapshot` current for new requests.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The fetch engine.
    pub fn engine(&self) -> &FetchEngine {
        &self.engine
    }

    /// Handles one request end to end.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        // Before anything logs, keys or stores the URL.
        let unusable = crate::credentials::take(&mut req).err();
        let snap = self.snapshot.load_full();
        let method = req.method().clone();
        let url = req.uri().to_string();
        let req_headers = snap.log_headers.then(|| req.headers().clone());
        let Answer {
            mut response,
            outcome,
        } = match unusable {
            Some(bad) => Answer::local(serve::text(StatusCode::BAD_REQUEST, bad.to_string())),
            None => self.dispatch(req, conn, &snap).await,
        };
        let metrics = self.engine.metrics();
        metrics.request(outcome);
        let h = response.headers_mut();
        h.append(header::VIA, crate::fetch::upstream::VIA);
        h.insert(
            http::HeaderName::from_static("cache-status"),
            HeaderValue::from_static(outcome.cache_status()),
        );
        let record = AccessRecord {
            client: conn.client,
            method,
            url,
            status: response.status(),
            outcome,
            started,
            headers: req_headers.map(|r| (r, response.headers().clone())),
            expected: response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        };
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, LoggedBody::wrap(body, record, metrics.clone()))
    }

    async fn dispatch(&self, req: Request<Incoming>, conn: ConnInfo, snap: &Snapshot) -> Answer {
        if let Err(retry) = snap.limits.check_client(conn.client.ip()) {
            self.engine.metrics().limited();
            let mut resp = serve::text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry.header_secs()));
            return Answer::local(resp);
        }
        if let Err(bad) = crate::request::check(&req) {
            return Answer::local(serve::text(StatusCode::BAD_REQUEST, bad.to_string()));
        }
        if looped(req.headers()) {
            return Answer::local(serve::text(
                StatusCode::LOOP_DETECTED,
                "request loop: this request already passed through Cistern",
            ));
        }
        let route = match conn.site_listener {
            Some(listener) => snap.router.route_site(&req, listener),
            None => snap.router.route(&req, conn.local),
        };
        match route {
            Route::Invalid(why) => Answer::local(serve::text(StatusCode::BAD_REQUEST, why)),
            Route::Local => Answer::local(self.local_page(&req, snap)),
            Route::Misdirected => Answer::local(serve::text(
                StatusCode::MISDIRECTED_REQUEST,
                "no site on this listener serves that host",
            )),
            Route::Site { set, rest } => {
                let url = match set.url(0, &rest) {
                    Ok(url) => url,
                    Err(e) => {
                        return Answer::local(serve::text(StatusCode::BAD_REQUEST, e.to_string()));
                    }
                };
                let chain = snap.site_chains.get(&set.name).unwrap_or(&snap.no_policies);
                let stale = set.stale;
                let upstreams = Upstreams::Mirror { set, rest };
                self.proxied(req, conn, url, upstreams, chain, stale, snap)
                    .await
            }
            Route::Connect(authority) => {
                if !snap.router.forward_allowed(conn.client.ip()) {
                    return Answer::local(forbidden());
                }
                let port = authority.port_u16().unwrap_or(0);
                if !snap.router.connect_port_allowed(port) {
                    return Answer::local(serve::text(
                        StatusCode::FORBIDDEN,
                        format!("CONNECT to port {port} is not allowed"),
                    ));
                }
                if snap.config.mode == CacheMode::Offline {
                    return Answer::local(serve::text(
                        StatusCode::GATEWAY_TIMEOUT,
                        "offline mode: no tunnels",
                    ));
                }
                let own = self.engine.own_sockets();
                match tunnel::connect(own, &authority, snap.config.timeouts.connect).await {
                    Ok(upstream) => {
                        let mut req = req;
                        tunnel::splice(
                            &mut req,
                            upstream,
                            authority.to_string(),
                            snap.config.timeouts.idle,
                        );
                        Answer {
                            response: Response::new(serve::empty()),
                            outcome: CacheOutcome::Tunnel,
                        }
                    }
                    Err(e) => match crate::ours::self_target_in(&e) {
                        Some(refused) => Answer::local(serve::text(
                            StatusCode::LOOP_DETECTED,
                            refused.to_string(),
                        )),
                        None => Answer::local(serve::text(
                            StatusCode::BAD_GATEWAY,
                            format!("cannot reach {authority}: {e}"),
                        )),
                    },
                }
            }
            Route::Forward(url) | Route::Transparent(url) => {
                if !snap.router.forward_allowed(conn.client.ip()) {
                    return Answer::local(forbidden());
                }
                // The URL's credentials are for the host it names, and
                // only that route goes there.
                let mut req = req;
                crate::credentials::apply(&mut req);
                self.proxied(
                    req,
                    conn,
                    url.clone(),
                    Upstreams::Single(url),
                    &snap.forward_chain,
                    snap.config.forward.stale,
                    snap,
                )
                .await
            }
            Route::Mirror { set, rest } => {
                // The replica lives under the first upstream's host:port, so
                // failover between mirrors never duplicates a file.
                let url = match set.url(0, &rest) {
                    Ok(url) => url,
                    Err(e) => {
                        return Answer::local(serve::text(StatusCode::BAD_REQUEST, e.to_string()));
                    }
                };
                // Every mirror has an entry; the empty chain is a safe default.
                let chain = snap
                    .mirror_chains
                    .get(&set.name)
                    .unwrap_or(&snap.no_policies);
                let stale = set.stale;
                let upstreams = Upstreams::Mirror { set, rest };
                self.proxied(req, conn, url, upstreams, chain, stale, snap)
                    .await
            }
        }
    }

    /// Runs the route's policies on a request for `url`, then proxies it.
    #[allow(clippy::too_many_arguments)]
    async fn proxied(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        url: Uri,
        mut upstreams: Upstreams,
        chain: &PolicyChain,
        stale: StaleRules,
        snap: &Snapshot,
    ) -> Answer {
        let mut key_url = url;
        let mut policy = None;
        let mut bypass = false;
        let mut store_id = None;
        if !chain.is_empty() {
            let headers = std::mem::take(req.headers_mut());
            let mut view =
                RequestView::new(req.method().clone(), key_url.clone(), headers, conn.client);
            if let RequestOutcome::Respond(direct) = chain.on_request(&snap.policy_host, &mut view)
            {
                return Answer::local(direct_response(direct));
            }
            *req.headers_mut() = std::mem::take(&mut view.headers);
            if view.url != key_url {
                key_url = view.url.clone();
                upstreams = Upstreams::Single(view.url.clone());
            }
            if let Some(up) = &view.upstream_url {
                upstreams = Upstreams::Single(up.clone());
            }
            store_id = view.cache_key.clone();
            bypass = view.bypass_cache;
            policy = Some(PolicyRun {
                chain: chain.clone(),
                host: snap.policy_host.clone(),
                view,
            });
        }
        let key = match store_id {
            Some(id) => CacheKey::parse(&id).map_err(|e| format!("policy store-id {id:?}: {e}")),
            None => CacheKey::from_uri(&key_url).map_err(|e| format!("bad URL: {e}")),
        };
        match key {
            Ok(key) => {
                let route = RouteCache {
                    upstreams,
                    policy,
                    bypass,
                    stale,
                };
                self.http(req, key, route, snap).await
            }
            Err(why) => Answer::local(serve::text(StatusCode::BAD_REQUEST, why)),
        }
    }

    /// A proxied HTTP request: cached for GET and HEAD, passed through otherwise.
    async fn http(
        &self,
        req: Request<Incoming>,
        key: CacheKey,
        route: RouteCache,
        snap: &Snapshot,
    ) -> Answer {
        let RouteCache {
            upstreams,
            policy,
            bypass,
            stale,
        } = route;
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            let hook = policy.map(|p| p.hook(req.headers()));
            return self.pass(req, key, upstreams, hook, snap).await;
        }
        if bypass {
            let (parts, _) = req.into_parts();
            let hook = policy.map(|p| p.hook(&parts.headers));
            return self
                .uncached(&method, parts.headers, &upstreams, hook.as_deref(), snap)
                .await;
        }
        let (parts, _body) = req.into_parts();
        let mut headers = parts.headers;
        // The key names the resource; which name the client used to reach
        // us (Host) must not make the cache rules see another request.
        headers.remove(header::HOST);
        let now = self.clock.now();
        let mut revalidate = None;
        // A stale replica that may answer if the upstream fails.
        let mut fallback = None;
        if let Some(replica) = self.engine.store().lookup(&key) {
            // The common case is decided without building the RFC 9111 answer
            // (nor parsing the key): see `cache::evaluate_fast`.
            let freshness =
                match cache::evaluate_fast(&replica.meta, &headers, now, snap.config.mode) {
                    Some(fresh) => fresh,
                    None => match key.as_str().parse::<Uri>() {
                        // A stored GET answers HEAD too (RFC 9110 §9.3.2): the
                        // rules see GET.
                        Ok(key_uri) => {
                            let creq = CacheRequest {
                                key: &key_uri,
                                method: &Method::GET,
                                headers: &headers,
                            };
                            cache::evaluate(&replica.meta, creq, now, snap.config.mode)
                        }
                        Err(_) => {
                            return Answer::local(serve::text(StatusCode::BAD_REQUEST, "bad URL"));
                        }
                    },
                };
            match freshness {
                Freshness::Fresh => {
                    match self
                        .serve_replica(&method, &headers, replica, CacheOutcome::Hit)
                        .await
                    {
                        Ok(a) => return a,
                        // Evicted or replaced under us: fetch it like a miss.
                        Err(ServeError::Gone(_)) => {}
                        Err(e) => return Answer::local(internal(&e)),
                    }
                }
                Freshness::Stale(validators) => {
                    let allowed = cache::stale_use(&replica.meta, now, stale);
                    if allowed.while_revalidate && method == Method::GET {
                        return self
                            .serve_while_revalidating(
                                &method, &headers, &key, replica, validators, upstreams, policy,
                                snap,
                            )
                            .await;
                    }
                    if allowed.if_error {
                        fallback = Some(replica.clone());
                    }
                    revalidate = Some((replica, validators));
                }
                Freshness::Mismatch => {
                    let hook = policy.map(|p| p.hook(&headers));
                    return self
                        .uncached(&method, headers, &upstreams, hook.as_deref(), snap)
                        .await;
                }
            }
        }
        let Ok(key_uri) = key.as_str().parse::<Uri>() else {
            return Answer::local(serve::text(StatusCode::BAD_REQUEST, "bad URL"));
        };
        if snap.config.mode == CacheMode::Offline && revalidate.is_none() {
            return Answer::local(serve::text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("offline mode: {key} is not in the replica"),
            ));
        }
        if method == Method::HEAD && revalidate.is_none() {
            // A HEAD joins a fill under way but never starts a download.
            return match self.engine.find(&key) {
                Some(fill) => {
                    self.follow(
                        &method,
                        &headers,
                        &key_uri,
                        fill,
                        None,
                        CacheOutcome::Coalesced,
                        &upstreams,
                        None,
                        snap,
                    )
                    .await
                }
                None => {
                    let hook = policy.map(|p| p.hook(&headers));
                    self.uncached(&method, headers, &upstreams, hook.as_deref(), snap)
                        .await
                }
            };
        }
        let job = FillJob {
            key: key.clone(),
            key_uri: key_uri.clone(),
            upstreams: upstreams.clone(),
            headers: upstream_headers(&headers, true),
            revalidate,
            settings: snap.settings.clone(),
            hook: policy.map(|p| p.hook(&headers)),
        };
        let (fill, passthrough, outcome) = match self.engine.fill(job) {
            FillTicket::Ready(replica) => {
                return match self
                    .serve_replica(&method, &headers, replica, CacheOutcome::Hit)
                    .await
                {
                    Ok(a) => a,
                    Err(e) => Answer::local(internal(&e)),
                };
            }
            FillTicket::Leader { fill, passthrough } => {
                (fill, Some(passthrough), CacheOutcome::Miss)
            }
            FillTicket::Follower(fill) => (fill, None, CacheOutcome::Coalesced),
        };
        self.follow(
            &method,
            &headers,
            &key_uri,
            fill,
            passthrough,
            outcome,
            &upstreams,
            fallback,
            snap,
        )
        .await
    }

    /// Serves a stale replica at once and revalidates it in the
    /// background (`stale-while-revalidate`): the fill runs on its own,
    /// joined by any client that needs the fresh copy.
    #[allow(clippy::too_many_arguments)]
    async fn serve_while_revalidating(
        &self,
        method: &Method,
        headers: &HeaderMap,
        key: &CacheKey,
        replica: Arc<Replica>,
        validators: HeaderMap,
        upstreams: Upstreams,
        policy: Option<PolicyRun>,
        snap: &Snapshot,
    ) -> Answer {
        if let Ok(key_uri) = key.as_str().parse::<Uri>() {
            let job = FillJob {
                key: key.clone(),
                key_uri,
                upstreams,
                headers: upstream_headers(headers, true),
                revalidate: Some((replica.clone(), validators)),
                settings: snap.settings.clone(),
                hook: policy.map(|p| p.hook(headers)),
            };
            // Nobody waits for this ticket: the fill task outlives it, and
            // an unshareable answer is simply dropped.
            drop(self.engine.fill(job));
        }
        match self
            .serve_replica(method, headers, replica, CacheOutcome::StaleRevalidating)
            .await
        {
            Ok(a) => a,
            Err(e) => Answer::local(internal(&e)),
        }
    }

    /// The stale replica instead of an upstream failure, where
    /// `stale-if-error` allows; `None` when there is none to serve.
    async fn stale_on_error(
        &self,
        method: &Method,
        headers: &HeaderMap,
        fallback: Option<Arc<Replica>>,
        why: &(dyn std::fmt::Display + Sync),
    ) -> Option<Answer> {
        let replica = fallback?;
        tracing::info!(target: "cistern::cache", key = %replica.meta.key, "upstream failed ({why}); serving the stale replica (stale-if-error)");
        self.serve_replica(method, headers, replica, CacheOutcome::StaleOnError)
            .await
            .ok()
    }

    /// Waits for a fill's head, then reads along it. `fallback` is the
    /// stale replica to serve if the upstream fails before a body starts.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        method: &Method,
        headers: &HeaderMap,
        key_uri: &Uri,
        fill: Arc<crate::fetch::Fill>,
        passthrough: Option<tokio::sync::oneshot::Receiver<Response<Incoming>>>,
        outcome: CacheOutcome,
        upstreams: &Upstreams,
        fallback: Option<Arc<Replica>>,
        snap: &Snapshot,
    ) -> Answer {
        let mut progress = fill.subscribe();
        loop {
            let state = progress.borrow_and_update().clone();
            match state {
                FillState::Waiting => {
                    if progress.changed().await.is_err() {
                        return Answer::local(error_response(&FetchError::Vanished));
                    }
                }
                FillState::Streaming { head, .. }
                | FillState::Complete { head, .. }
                | FillState::Unverified { head, .. } => {
                    let creq = CacheRequest {
                        key: key_uri,
                        method: &Method::GET,
                        headers,
                    };
                    if !variant_matches(&head.policy, creq, self.clock.now()) {
                        drop(progress);
                        return self
                            .uncached(method, headers.clone(), upstreams, None, snap)
                            .await;
                    }
                    let age = serve::fill_age(&head, self.clock.now());
                    let source = Source::Fill { head, progress };
                    return match serve::respond(method, headers, source, age).await {
                        Ok(response) => Answer { response, outcome },
                        Err(e) => Answer::local(internal(&e)),
                    };
                }
                FillState::Revalidated(replica) => {
                    drop(progress);
                    return match self
                        .serve_replica(method, headers, replica, CacheOutcome::Revalidated)
                        .await
                    {
                        Ok(a) => a,
                        Err(e) => Answer::local(internal(&e)),
                    };
                }
                FillState::Unshared => {
                    drop(progress);
                    if let Some(rx) = passthrough
                        && let Ok(resp) = rx.await
                    {
                        let status = resp.status();
                        if status.is_server_error()
                            && let Some(stale) = self
                                .stale_on_error(method, headers, fallback, &status)
                                .await
                        {
                            return stale;
                        }
                        return Answer {
                            response: passthrough_response(resp),
                            outcome: CacheOutcome::Pass,
                        };
                    }
                    let answer = self
                        .uncached(method, headers.clone(), upstreams, None, snap)
                        .await;
                    let status = answer.response.status();
                    if status.is_server_error()
                        && let Some(stale) = self
                            .stale_on_error(method, headers, fallback, &status)
                            .await
                    {
                        return stale;
                    }
                    return answer;
                }
                FillState::Failed(e) => {
                    if e.side() == Side::Upstream
                        && let Some(stale) =
                            self.stale_on_error(method, headers, fallback, &e).await
                    {
                        return stale;
                    }
                    return Answer::local(error_response(&e));
                }
            }
        }
    }

    async fn serve_replica(
        &self,
        method: &Method,
        headers: &HeaderMap,
        replica: Arc<Replica>,
        outcome: CacheOutcome,
    ) -> Result<Answer, ServeError> {
        let age = cache::age(&replica.meta, self.clock.now());
        let source = Source::Replica(replica, self.engine.store().clone());
        let response = serve::respond(method, headers, source, age).await?;
        Ok(Answer { response, outcome })
    }

    /// Fetches for this client only, storing nothing.
    async fn uncached(
        &self,
        method: &Method,
        headers: HeaderMap,
        upstreams: &Upstreams,
        hook: Option<&dyn HeadHook>,
        snap: &Snapshot,
    ) -> Answer {
        let up = upstream_headers(&headers, false);
        match self
            .engine
            .direct(method.clone(), upstreams, up, None, &snap.settings)
            .await
        {
            Ok(resp) => passed(resp, hook),
            Err(e) => Answer::local(error_response(&e)),
        }
    }

    /// Other methods: streamed both ways; a success invalidates the replica
    /// of the URL (RFC 9111 §4.4).
    async fn pass(
        &self,
        req: Request<Incoming>,
        key: CacheKey,
        upstreams: Upstreams,
        hook: Option<Arc<dyn HeadHook>>,
        snap: &Snapshot,
    ) -> Answer {
        let (parts, body) = req.into_parts();
        let headers = upstream_headers(&parts.headers, false);
        let body = body
            .map_err(|e| -> crate::fetch::BoxError { Box::new(e) })
            .boxed_unsync();
        let unsafe_method = !matches!(parts.method, Method::OPTIONS | Method::TRACE);
        match self
            .engine
            .direct(
                parts.method.clone(),
                &upstreams,
                headers,
                Some(body),
                &snap.settings,
            )
            .await
        {
            Ok(resp) => {
                if unsafe_method
                    && !resp.status().is_server_error()
                    && !resp.status().is_client_error()
                {
                    // Done before answering, so the client's next GET already
                    // goes upstream.
                    let store = self.engine.store().clone();
                    let removed = tokio::task::spawn_blocking(move || match store.peek(&key) {
                        Some(_) => store.remove(&key).map_err(|e| (key, e)),
                        None => Ok(()),
                    })
                    .await;
                    if let Ok(Err((key, e))) = removed {
                        tracing::warn!(target: "cistern::store", %key, "invalidation failed: {e}");
                    }
                }
                passed(resp, hook.as_deref())
            }
            Err(e) => Answer::local(error_response(&e)),
        }
    }

    fn local_page(&self, req: &Request<Incoming>, snap: &Snapshot) -> Response<ProxyBody> {
        if req.uri().path() != "/" {
            return serve::text(
                StatusCode::NOT_FOUND,
                "not found: no mirror serves this path",
            );
        }
        let mut page = String::from("Cistern caching proxy\n\nMirrors:\n");
        for m in snap.router.mirrors() {
            let ups: Vec<String> = m.upstreams.iter().map(|u| u.base.to_string()).collect();
            page.push_str(&format!("  {} -> {}\n", m.prefix, ups.join(", ")));
        }
        if !snap.config.sites.is_empty() {
            page.push_str("\nSites (TLS):\n");
            for site in &snap.config.sites {
                let listen: Vec<String> = site.listen.iter().map(ToString::to_string).collect();
                page.push_str(&format!(
                    "  https://{} on {}\n",
                    site.name,
                    listen.join(", ")
                ));
            }
        }
        if snap.config.forward.enabled {
            page.push_str("\nForward proxy: on (set http_proxy to this address)\n");
        }
        serve::text(StatusCode::OK, page)
    }
}

/// What the route decided for a cacheable request, besides its key.
struct RouteCache {
    /// Where its bytes come from.
    upstreams: Upstreams,
    /// The policy chain that ran, for `on_response`.
    policy: Option<PolicyRun>,
    /// A policy asked to bypass the cache.
    bypass: bool,
    /// When a stale replica may still answer.
    stale: StaleRules,
}

/// A chain that ran `on_request`, kept for `on_response` in case the
/// request goes upstream; a hit never pays for building the hook.
struct PolicyRun {
    chain: PolicyChain,
    host: Arc<dyn PolicyHost>,
    /// The request as the chain left it, without its headers (they went back
    /// to the request).
    view: RequestView,
}

impl PolicyRun {
    /// The response hook for a request with `headers`.
    fn hook(self, headers: &HeaderMap) -> Arc<dyn HeadHook> {
        let mut view = self.view;
        view.headers = headers.clone();
        Arc::new(PolicyHook::new(self.chain, self.host, view))
    }
}

/// Whether the stored response's Vary matches this request.
fn variant_matches(
    policy: &http_cache_semantics::CachePolicy,
    req: CacheRequest<'_>,
    now: std::time::SystemTime,
) -> bool {
    match policy.before_request(&req, now) {
        http_cache_semantics::BeforeRequest::Fresh(_) => true,
        http_cache_semantics::BeforeRequest::Stale { matches, .. } => matches,
    }
}

/// A request that already went through a Cistern (ours or another) names
/// it in `Via`; a second pass is a loop.
fn looped(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|hop| hop.trim().ends_with(" cistern")))
}

/// The headers to send upstream: end-to-end ones only. For a fill (shared
/// by every reader) the client's conditionals and ranges are dropped: the
/// fill fetches the whole body and each reader's own conditions are
/// answered from the replica.
fn upstream_headers(client: &HeaderMap, for_fill: bool) -> HeaderMap {
    let mut h = client.clone();
    cache::strip_hop_by_hop(&mut h);
    h.remove(header::HOST);
    if for_fill {
        for name in [
            header::RANGE,
            header::IF_RANGE,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
        ] {
            h.remove(name);
        }
    }
    h
}

/// An uncached upstream response, after the policies' `on_response`.
fn passed(mut resp: Response<Incoming>, hook: Option<&dyn HeadHook>) -> Answer {
    if let Some(hook) = hook {
        let status = resp.status();
        if hook.on_head(status, resp.headers_mut()).deny {
            return Answer::local(serve::text(
                StatusCode::BAD_GATEWAY,
                "a policy refused the upstream response",
            ));
        }
    }
    Answer {
        response: passthrough_response(resp),
        outcome: CacheOutcome::Pass,
    }
}

/// A policy's direct answer.
fn direct_response(d: DirectResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(serve::full(d.body));
    *resp.status_mut() = d.status;
    *resp.headers_mut() = d.headers;
    // The body is whole in memory: hyper frames it from its length, so a
    // policy's Content-Length or Transfer-Encoding can never disagree.
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().remove(header::TRANSFER_ENCODING);
    resp
}

fn passthrough_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    cache::strip_hop_by_hop(&mut parts.headers);
    let body = body
        .map_err(|e| -> crate::fetch::BoxError { Box::new(e) })
        .boxed_unsync();
    Response::from_parts(parts, body)
}

fn forbidden() -> Response<ProxyBody> {
    serve::text(
        StatusCode::FORBIDDEN,
        "forward proxying is not allowed for this address (see `forward { allow … }` in config.kdl)",
    )
}

/// A fetch failure as the client sees it: what went wrong, never the
/// upstream's URL or a path on our disk (the log has those: the fill or the
/// failover logged the failure where it happened).
fn error_response(e: &FetchError) -> Response<ProxyBody> {
    let status = e.status();
    tracing::debug!(target: "cistern::fetch", status = status.as_u16(), "answering with an error: {}", error_chain(e));
    let text = match e {
        // The client named the target itself; the message says why not.
        FetchError::SelfTarget(refused) => return serve::text(status, refused.to_string()),
        FetchError::Offline { .. } => "offline mode: this is not in the replica",
        FetchError::PolicyDenied { .. } => "a policy refused the upstream response",
        _ if e.side() == Side::Internal => {
            "Cistern could not serve this from its replica (its log says why)"
        }
        _ if status == StatusCode::GATEWAY_TIMEOUT => "the upstream did not answer in time",
        _ if tls_refused(e) => {
            "the upstream's TLS certificate was not accepted (see upstream-tls in config.kdl)"
        }
        _ => "the upstream could not be reached or sent a broken response",
    };
    serve::text(status, text)
}

/// Whether rustls refused the upstream's TLS session somewhere in `e`'s
/// causes (an unknown CA, a name mismatch, an expired certificate).
fn tls_refused(e: &FetchError) -> bool {
    // `io::Error` hides what it wraps from `source()` (it returns the
    // wrapped error's source), so each one is opened with `get_ref`.
    fn is_tls(c: &(dyn std::error::Error + 'static)) -> bool {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => is_tls(inner),
            None => false,
        }
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if is_tls(c) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A replica that could not be read, as the client sees it: no path.
fn internal(e: &ServeError) -> Response<ProxyBody> {
    tracing::error!(target: "cistern::serve", "{e}");
    serve::text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Cistern could not read its replica of this (its log says why)",
    )
}

/// How long to wait for in-flight requests on shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);
