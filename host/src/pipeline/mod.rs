//! The request pipeline: limit, validate, route, run the route's policies,
//! then one of: a tunnel (`connect`), a cacheable GET or HEAD
//! (`cached`: look in the replica, join or start a fill, serve stale when
//! allowed), or a pass-through (`passthrough`); a redirecting mirror's
//! 302s and mirror lists are `redirect`; every answer Cistern makes
//! itself is in `answers`; `peer` admits the requests of the fleet's
//! other nodes (`cluster`). `handle` wraps each response for the access
//! log and the counters.

mod answers;
mod cached;
mod connect;
mod forwarded;
mod metalink;
mod passthrough;
mod peer;
mod redirect;
mod upgrade;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::ClientBody;
use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};

use crate::body::{self, ProxyBody};
use crate::clock::Clock;
use crate::config::{ForwardedFor, QueryMode, StaleRules};
use crate::fetch::{FetchEngine, HeadHook, MirrorSet, Upstreams};
use crate::gate::ConnGate;
use crate::observe::accesslog::{AccessRecord, LoggedBody};
use crate::observe::{CacheOutcome, NoCacheReason};
use crate::policy::bridge::PolicyHook;
use crate::policy::{
    ChainTrace, KeptChain, KeptDecision, KeptRequest, PolicyChain, PolicyEngine, PolicyHost,
    RequestOutcome, RequestView, Reuse,
};
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::store::CacheKey;
use answers::{direct_response, forbidden};

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
        crate::cache::use_targeted_field(&snapshot.config.targeted_field);
        engine.shared().configure(snapshot.config.cluster.as_ref());
        Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            engine,
            policy_engine,
            clock,
            connections: ConnGate::new(),
        }
    }

    /// The connection caps' counts, shared by every proxy listener.
    pub fn connections(&self) -> &ConnGate {
        &self.connections
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
        crate::cache::use_targeted_field(&snapshot.config.targeted_field);
        self.engine
            .shared()
            .configure(snapshot.config.cluster.as_ref());
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The fetch engine.
    pub fn engine(&self) -> &FetchEngine {
        &self.engine
    }

    /// Handles one request end to end; the body logs the request's access
    /// line when it ends.
    pub async fn handle(
        &self,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
    ) -> Response<LoggedBody> {
        let started = Instant::now();
        // Before anything logs, keys or stores the URL.
        let unusable = crate::credentials::take(&mut req).err();
        let snap = self.snapshot.load_full();
        let method = req.method().clone();
        // A clone of the Uri shares its bytes; it is formatted only if the
        // access line is written.
        let url = req.uri().clone();
        let req_headers = snap.log_headers.then(|| req.headers().clone());
        let Answer {
            mut response,
            outcome,
        } = match unusable {
            Some(bad) => Answer::local(body::text(StatusCode::BAD_REQUEST, bad.to_string())),
            None => self.dispatch(req, conn, &snap).await,
        };
        let metrics = self.engine.metrics();
        metrics.request(outcome);
        let h = response.headers_mut();
        h.append(header::VIA, self.engine.via().value());
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

    async fn dispatch(
        &self,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
        snap: &Snapshot,
    ) -> Answer {
        // A peer's request stands for its clients, already limited there.
        match peer::admit(&mut req, &conn, snap) {
            peer::Sender::Client => self.dispatch_admitted(req, conn, snap, false).await,
            peer::Sender::Peer => {
                let mut answer = self.dispatch_admitted(req, conn, snap, true).await;
                peer::mark_upstream_failure(&mut answer);
                answer
            }
            peer::Sender::BySha256(digest) => self.by_sha256(&req, digest).await,
            peer::Sender::Refused(answer) => answer,
        }
    }

    /// [`Proxy::dispatch`] once the sender is known: `from_peer` for a
    /// peer's request, served as owner.
    async fn dispatch_admitted(
        &self,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
        snap: &Snapshot,
        from_peer: bool,
    ) -> Answer {
        if !from_peer && let Err(retry) = snap.limits.check_client(conn.client.ip()) {
            self.engine.metrics().limited();
            let mut resp = body::text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this address",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry.header_secs()));
            return Answer::local(resp);
        }
        if let Err(bad) = crate::request::check(&req) {
            return Answer::local(body::text(StatusCode::BAD_REQUEST, bad.to_string()));
        }
        if self.engine.via().looped(req.headers()) {
            return Answer::local(body::text(
                StatusCode::LOOP_DETECTED,
                "request loop: this request already passed through this Cistern",
            ));
        }
        let route = match conn.site_listener {
            Some(listener) => snap.router.route_site(&req, listener),
            None => snap.router.route(&req, conn.local),
        };
        match route {
            Route::Invalid(why) => Answer::local(body::text(StatusCode::BAD_REQUEST, why)),
            Route::Local => Answer::local(self.local_page(&req, snap)),
            Route::Misdirected => Answer::local(body::text(
                StatusCode::MISDIRECTED_REQUEST,
                "no site on this listener serves that host",
            )),
            Route::Site { set, rest } => {
                let host = set.preserve_host.then(|| site_host(&req, &set.name));
                let chain = snap.site_chains.get(&set.name);
                self.mirrored(req, conn, set, rest, host, chain, snap).await
            }
            Route::Connect(authority) => self.connect(req, authority, conn, snap).await,
            Route::Forward(url) | Route::Transparent(url) => {
                if !from_peer && !snap.router.forward_allowed(conn.client.ip()) {
                    return Answer::local(forbidden());
                }
                // The URL's credentials are for the host it names, and
                // only that route goes there.
                crate::credentials::apply(&mut req);
                let rules = RouteRules {
                    stale: snap.config.forward.stale,
                    forwarded_for: snap.config.forward.forwarded_for,
                    query_pass: false,
                };
                self.proxied(
                    req,
                    conn,
                    url.clone(),
                    Upstreams::Single(url),
                    &snap.forward_chain,
                    rules,
                    snap,
                )
                .await
            }
            Route::Mirror { set, rest } => {
                // A redirecting mirror answers most files itself; the rest
                // (files that change in place) take the proxy path.
                let rest = match self.redirect(req.method(), req.headers(), &set, rest) {
                    redirect::Redirected::Answered(answer) => return answer,
                    redirect::Redirected::Proxy(rest) => rest,
                };
                let chain = snap.mirror_chains.get(&set.name);
                self.mirrored(req, conn, set, rest, None, chain, snap).await
            }
        }
    }

    /// A request for `rest` below a mirror set (a mirror, or a site rooted
    /// at `/`), sent with `host` as its `Host` when the site keeps the
    /// client's. The replica lives under the first upstream's host:port,
    /// so failover between mirrors never duplicates a file.
    #[allow(clippy::too_many_arguments)]
    async fn mirrored(
        &self,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
        set: Arc<MirrorSet>,
        rest: String,
        host: Option<HeaderValue>,
        chain: Option<&PolicyChain>,
        snap: &Snapshot,
    ) -> Answer {
        let mut rest = rest;
        if set.query == QueryMode::Ignore
            && let Some(at) = rest.find('?')
        {
            // Before the key, the policies and the upstream see it: the
            // replica holds what the path names.
            rest.truncate(at);
            self.engine.metrics().query_dropped();
        }
        if set.advertise
            && (req.method() == http::Method::GET || req.method() == http::Method::HEAD)
            && let Some(file) = crate::serve::metalink::described_file(&rest)
        {
            return self.meta4(&req, &set, &file);
        }
        // Every mirror and site has an entry; the empty chain is a safe
        // default.
        let chain = chain.unwrap_or(&snap.no_policies);
        let rules = RouteRules {
            stale: set.stale,
            forwarded_for: set.forwarded_for,
            query_pass: set.query == QueryMode::Pass && rest.contains('?'),
        };
        // Without policies, which see the URL, a plain path's key is the
        // upstream's with the path after it: no URL to build and parse.
        if chain.is_empty()
            && let Some(key) = set.plain_key(&rest)
        {
            let upstreams = Upstreams::Mirror { set, rest, host };
            let peer_target = peer_target(&req, None, &upstreams, &conn, snap);
            let route = rules.cache(upstreams, None, false, conn.client.ip(), peer_target);
            return self.http(req, key, route, snap).await;
        }
        // A chain that kept its whole decision for this path applies it
        // as it is: no URL to build, no view, no lookup per policy.
        if let Some(kept) = chain.kept_whole(req.method(), &rest) {
            let request = match &kept.decision {
                KeptDecision::Respond(direct) => {
                    return Answer::local(direct_response(direct.clone()));
                }
                KeptDecision::Proceed(request) => Arc::clone(request),
            };
            let upstreams = Upstreams::Mirror { set, rest, host };
            let (key, route) = kept_route(
                &kept, request, &mut req, upstreams, chain, rules, &conn, snap,
            );
            return self.http(req, key, route, snap).await;
        }
        let url = match set.url(0, &rest) {
            Ok(url) => url,
            Err(e) => return Answer::local(body::text(StatusCode::BAD_REQUEST, e.to_string())),
        };
        let upstreams = Upstreams::Mirror { set, rest, host };
        self.proxied(req, conn, url, upstreams, chain, rules, snap)
            .await
    }

    /// Runs the route's policies on a request for `url`, then proxies it.
    #[allow(clippy::too_many_arguments)]
    async fn proxied(
        &self,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
        url: Uri,
        mut upstreams: Upstreams,
        chain: &PolicyChain,
        rules: RouteRules,
        snap: &Snapshot,
    ) -> Answer {
        let peer_target = peer_target(&req, Some(&url), &upstreams, &conn, snap);
        let mut key_url = url;
        let mut policy = None;
        let mut bypass = false;
        let mut store_id = None;
        let mut parsed_key = None;
        // The URL the chain sent the fetch to instead, and the chain's
        // decision to keep whole when it came from kept outcomes alone.
        let mut fetch_from = None;
        let mut keep = None;
        if !chain.is_empty() {
            let headers = std::mem::take(req.headers_mut());
            let mut view =
                RequestView::new(req.method().clone(), key_url.clone(), headers, conn.client);
            // A mirror's URL is a function of its path: a decision made of
            // outcomes keyed by the URL alone is one of the path.
            let mut trace = (matches!(upstreams, Upstreams::Mirror { .. }) && chain.keeps_whole())
                .then(ChainTrace::default);
            // Kept outcomes first, with no future at all; the calls, when
            // some hook must run, in a boxed one, so this future stays the
            // size it is without policies (it is moved on every request).
            // A kept outcome leaves the view where it is: moving it in and
            // out of a tuple cost two copies of it per request.
            let outcome = match chain.reuse_on_request(&mut view, trace.as_mut()) {
                Reuse::Kept(outcome) => outcome,
                Reuse::From(i) => {
                    trace = None;
                    let lent = std::mem::take(&mut view);
                    let (back, outcome) =
                        Box::pin(chain.run_on_request_from(&snap.policy_host, lent, i)).await;
                    view = back;
                    outcome
                }
            };
            if let RequestOutcome::Respond(direct) = outcome {
                if let (Some(trace), Upstreams::Mirror { rest, .. }) = (trace, &upstreams) {
                    let decision = KeptDecision::Respond(direct.clone());
                    chain.keep_whole(req.method(), rest, trace, decision);
                }
                return Answer::local(direct_response(direct));
            }
            *req.headers_mut() = std::mem::take(&mut view.headers);
            if !same_uri(&view.url, &key_url) {
                key_url = view.url.clone();
                fetch_from = Some(view.url.clone());
            }
            if let Some(up) = &view.upstream_url {
                fetch_from = Some(up.clone());
            }
            // A kept outcome carries its store-id parsed once.
            parsed_key = view
                .key_hint
                .take()
                .filter(|hint| view.cache_key.as_deref() == Some(hint.text.as_str()))
                .and_then(|hint| hint.key.clone());
            if parsed_key.is_none() {
                store_id = view.cache_key.clone();
            }
            bypass = view.bypass_cache;
            keep = trace.map(|trace| (trace, view.clone()));
            // A chain without `on_response` (store-id alone) needs no
            // response hook, nor the copy of the headers that makes one.
            policy = (chain.has_on_response() || chain.has_on_body()).then(|| PolicyRun {
                chain: chain.clone(),
                host: snap.policy_host.clone(),
                view: RanView::Built(view),
            });
        }
        let key = match (parsed_key, store_id) {
            (Some(key), _) => Ok(key),
            (None, Some(id)) => {
                CacheKey::parse(&id).map_err(|e| format!("policy store-id {id:?}: {e}"))
            }
            (None, None) => CacheKey::from_uri(&key_url).map_err(|e| format!("bad URL: {e}")),
        };
        match key {
            Ok(key) => {
                if let (Some((trace, view)), Upstreams::Mirror { rest, .. }) = (keep, &upstreams) {
                    let request = KeptRequest {
                        view,
                        key: key.clone(),
                        fetch_from: fetch_from.clone(),
                    };
                    let decision = KeptDecision::Proceed(Arc::new(request));
                    chain.keep_whole(req.method(), rest, trace, decision);
                }
                if let Some(url) = fetch_from {
                    upstreams = Upstreams::Single(url);
                }
                let route = rules.cache(upstreams, policy, bypass, conn.client.ip(), peer_target);
                self.http(req, key, route, snap).await
            }
            Err(why) => Answer::local(body::text(StatusCode::BAD_REQUEST, why)),
        }
    }
}

/// The key and route of a request for a mirror's `upstreams` that a
/// chain's kept whole decision (`kept`, whose request is `request`)
/// settles: its header edits made on `req`, its fetch sent where the
/// chain sent it, and its view kept for `on_response` on a miss.
#[allow(clippy::too_many_arguments)]
fn kept_route(
    kept: &KeptChain,
    request: Arc<KeptRequest>,
    req: &mut Request<ClientBody>,
    upstreams: Upstreams,
    chain: &PolicyChain,
    rules: RouteRules,
    conn: &ConnInfo,
    snap: &Snapshot,
) -> (CacheKey, RouteCache) {
    // Of the mirror's path, as `proxied` asks before the policies run.
    let peer_target = peer_target(req, None, &upstreams, conn, snap);
    kept.edit_headers(req.headers_mut());
    let upstreams = match &request.fetch_from {
        Some(url) => Upstreams::Single(url.clone()),
        None => upstreams,
    };
    let bypass = request.view.bypass_cache;
    let key = request.key.clone();
    let policy = (chain.has_on_response() || chain.has_on_body()).then(|| PolicyRun {
        chain: chain.clone(),
        host: snap.policy_host.clone(),
        view: RanView::Kept(request, conn.client),
    });
    let route = rules.cache(upstreams, policy, bypass, conn.client.ip(), peer_target);
    (key, route)
}

/// Whether two URLs are equal, at once when one is a clone of the other
/// (the URL no policy rewrote): `Uri`'s own comparison folds the case of
/// scheme and host byte by byte.
fn same_uri(a: &Uri, b: &Uri) -> bool {
    fn shares(x: &str, y: &str) -> bool {
        x.as_ptr() == y.as_ptr() && x.len() == y.len()
    }
    fn authority(u: &Uri) -> &str {
        u.authority().map_or("", |a| a.as_str())
    }
    fn rest(u: &Uri) -> &str {
        u.path_and_query().map_or("", |p| p.as_str())
    }
    (a.scheme() == b.scheme() && shares(authority(a), authority(b)) && shares(rest(a), rest(b)))
        || a == b
}

/// What the route decided for a cacheable request, besides its key.
struct RouteCache {
    /// Where its bytes come from.
    upstreams: Upstreams,
    /// The policy chain that ran, for `on_response`.
    policy: Option<PolicyRun>,
    /// Why the cache is bypassed, if it is: a policy asked, or a query
    /// on a `query "pass"` mirror.
    bypass: Option<NoCacheReason>,
    /// When a stale replica may still answer.
    stale: StaleRules,
    /// What to tell the upstream of the client, and its address: applied
    /// only to requests that go upstream, never on a hit.
    forwarded: (ForwardedFor, IpAddr),
    /// What to ask the key's owner in the fleet for, on a miss.
    peer_target: Option<Box<str>>,
}

/// The target a miss asks the key's owner in the fleet for: the route's
/// absolute URL for the forward proxy, the request's path for a mirror.
/// `None` without a fleet, for a TLS site (its route depends on the
/// listener) and for a request from a peer, which this node serves as
/// owner: the one rule that keeps peer requests from looping.
fn peer_target(
    req: &Request<ClientBody>,
    url: Option<&Uri>,
    upstreams: &Upstreams,
    conn: &ConnInfo,
    snap: &Snapshot,
) -> Option<Box<str>> {
    if snap.settings.fleet.is_none() || conn.site_listener.is_some() || peer::from_peer(req) {
        return None;
    }
    match upstreams {
        Upstreams::Single(_) => url.map(|u| u.to_string().into_boxed_str()),
        Upstreams::Mirror { .. } => req.uri().path_and_query().map(|p| p.as_str().into()),
    }
}

/// The rules of a route that the cached path needs besides its upstreams.
#[derive(Debug, Clone, Copy)]
struct RouteRules {
    stale: StaleRules,
    forwarded_for: ForwardedFor,
    /// The request has a query and its mirror passes such requests.
    query_pass: bool,
}

impl RouteRules {
    /// What the cached path needs to serve a request of this route from
    /// `upstreams`; `bypass`: a policy said not to cache it.
    fn cache(
        self,
        upstreams: Upstreams,
        policy: Option<PolicyRun>,
        bypass: bool,
        client: std::net::IpAddr,
        peer_target: Option<Box<str>>,
    ) -> RouteCache {
        let bypass = if bypass {
            Some(NoCacheReason::PolicyBypass)
        } else if self.query_pass {
            Some(NoCacheReason::Query)
        } else {
            None
        };
        RouteCache {
            upstreams,
            policy,
            bypass,
            stale: self.stale,
            forwarded: (self.forwarded_for, client),
            peer_target,
        }
    }
}

/// A chain that ran `on_request`, kept for `on_response` in case the
/// request goes upstream; a hit never pays for building the hook.
struct PolicyRun {
    chain: PolicyChain,
    host: Arc<dyn PolicyHost>,
    /// The request as the chain left it, without its headers (they went back
    /// to the request).
    view: RanView,
}

/// The request a chain left, as [`PolicyRun`] holds it.
// Not boxed: a box would be an allocation per request on the path that
// builds its view, and `PolicyRun` was as large before `Kept` was added.
#[allow(clippy::large_enum_variant)]
enum RanView {
    /// Made for this request.
    Built(RequestView),
    /// A kept whole decision's, shared until a miss needs its own copy,
    /// with this request's client.
    Kept(Arc<KeptRequest>, SocketAddr),
}

impl PolicyRun {
    /// The response hook for a request with `headers`.
    fn hook(self, headers: &HeaderMap) -> Arc<dyn HeadHook> {
        let mut view = match self.view {
            RanView::Built(view) => view,
            RanView::Kept(request, client) => RequestView {
                client,
                ..request.view.clone()
            },
        };
        view.headers = headers.clone();
        Arc::new(PolicyHook::new(self.chain, self.host, view))
    }
}

/// The `Host` a `preserve-host` site sends upstream: the client's, when
/// it names the site (any case, with the port the client used); the
/// site's name when the request reached it as the default site under
/// another name, so the origin never sees a host whose answers would share
/// the site's replica unasked.
fn site_host(req: &Request<ClientBody>, site: &str) -> HeaderValue {
    let client = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(client) = client {
        let name = client.rsplit_once(':').map_or(client, |(h, _)| h);
        if name.trim_end_matches('.').eq_ignore_ascii_case(site)
            && let Ok(v) = HeaderValue::from_str(client)
        {
            return v;
        }
    }
    HeaderValue::from_str(site).expect("site names are DNS names")
}

/// How long to wait for in-flight requests on shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::same_uri;

    #[test]
    fn a_url_is_the_same_as_its_clone_and_as_its_equal() {
        let url: http::Uri = "http://m.test/a?b".parse().unwrap();
        assert!(same_uri(&url, &url.clone()));
        assert!(same_uri(&url, &"http://M.test/a?b".parse().unwrap()));
        assert!(!same_uri(&url, &"http://m.test/a?c".parse().unwrap()));
        assert!(!same_uri(&url, &"https://m.test/a?b".parse().unwrap()));
    }
}
