//! A cacheable request (GET, HEAD): look the key up in the replica, then
//! serve a hit, revalidate a stale replica (serving it stale where
//! `stale-if-error` or `stale-while-revalidate` allow), or start or join
//! the key's fill and read along it.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::body::ClientBody;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;

use super::answers::{error_response, fill_refused, internal};
use super::passthrough::passthrough_response;
use super::{Answer, PolicyRun, Proxy, RouteCache, forwarded, upgrade};
use crate::body;
use crate::cache::{self, CacheRequest, Freshness, StaleUse};
use crate::config::{CacheMode, StaleRules};
use crate::fetch::{FetchError, FillJob, FillState, FillTicket, Side, Upstreams};
use crate::observe::{CacheOutcome, NoCacheReason};
use crate::serve::{self, ServeError, Source};
use crate::snapshot::Snapshot;
use crate::store::{CacheKey, Replica};

impl Proxy {
    /// A proxied HTTP request: cached for GET and HEAD, passed through
    /// otherwise. Two phases: the replica lookup decides (hit, stale,
    /// another variant, nothing), then a miss or a revalidation goes
    /// through the key's fill.
    pub(super) async fn http(
        &self,
        req: Request<ClientBody>,
        key: CacheKey,
        route: RouteCache,
        snap: &Snapshot,
    ) -> Answer {
        let RouteCache {
            upstreams,
            policy,
            bypass,
            stale,
            forwarded: (forwarded_for, client),
            peer_target,
        } = route;
        let method = req.method().clone();
        if method == Method::GET
            && let Some(protocols) = upgrade::requested(req.version(), req.headers())
        {
            let hook = policy.map(|p| p.hook(req.headers()));
            let forwarded = (forwarded_for, client);
            return self
                .upgrade(req, protocols, upstreams, hook, forwarded, snap)
                .await;
        }
        if method != Method::GET && method != Method::HEAD {
            let mut req = req;
            forwarded::apply(req.headers_mut(), forwarded_for, client);
            let hook = policy.map(|p| p.hook(req.headers()));
            return self.pass(req, key, upstreams, hook, snap).await;
        }
        let (parts, _body) = req.into_parts();
        let mut headers = parts.headers;
        let reason = if let Some(reason) = bypass {
            forwarded::apply(&mut headers, forwarded_for, client);
            reason
        } else {
            // The key names the resource; which name the client used to
            // reach us (Host) must not make the cache rules see another
            // request.
            headers.remove(header::HOST);
            let key_uri = KeyUri::new(&key);
            let found = match self.lookup(&key_uri, &headers, stale, snap) {
                Lookup::Fresh(replica) => {
                    match self
                        .serve_replica(&method, &headers, replica, CacheOutcome::Hit, &upstreams)
                        .await
                    {
                        Ok(a) => return a,
                        // Evicted or replaced under us: fetch it like a miss.
                        Err(ServeError::Gone(_)) => Lookup::Absent,
                        Err(e) => return Answer::local(internal(&e)),
                    }
                }
                other => other,
            };
            // From here on the request goes upstream (a hit never pays for
            // this): tell the upstream who the client is, as the route says.
            forwarded::apply(&mut headers, forwarded_for, client);
            match found {
                Lookup::Stale {
                    replica,
                    validators,
                    allowed,
                } if allowed.while_revalidate && method == Method::GET => {
                    return self
                        .serve_while_revalidating(
                            &method, &headers, &key_uri, replica, validators, upstreams, policy,
                            client, snap,
                        )
                        .await;
                }
                Lookup::Stale {
                    replica,
                    validators,
                    allowed,
                } => {
                    let stale = Revalidation {
                        fallback: allowed.if_error.then(|| replica.clone()),
                        replica,
                        validators,
                    };
                    let route = (upstreams, policy, peer_target);
                    return self
                        .miss(&method, headers, &key_uri, Some(stale), route, client, snap)
                        .await;
                }
                Lookup::Fresh(_) | Lookup::Absent => {
                    let route = (upstreams, policy, peer_target);
                    return self
                        .miss(&method, headers, &key_uri, None, route, client, snap)
                        .await;
                }
                Lookup::OtherVariant => NoCacheReason::OtherVariant,
                Lookup::BadKey => {
                    return Answer::local(body::text(StatusCode::BAD_REQUEST, "bad URL"));
                }
            }
        };
        let hook = policy.map(|p| p.hook(&headers));
        self.uncached(reason, &method, headers, &upstreams, hook.as_deref(), snap)
            .await
    }

    /// What the replica holds for this request, by the RFC 9111 rules (a
    /// stored GET answers HEAD too, RFC 9110 §9.3.2: the rules see GET).
    fn lookup(
        &self,
        key_uri: &KeyUri<'_>,
        headers: &HeaderMap,
        stale: StaleRules,
        snap: &Snapshot,
    ) -> Lookup {
        let Some(replica) = self.engine.store().lookup(key_uri.key) else {
            return Lookup::Absent;
        };
        let now = self.clock.now();
        // The common case is decided without building the RFC 9111 answer
        // (nor parsing the key): see `cache::evaluate_fast`.
        let fast = cache::evaluate_fast(
            &replica.meta,
            headers,
            now,
            snap.config.mode,
            &replica.fresh_until,
        );
        let freshness = match fast {
            Some(fresh) => fresh,
            None => {
                let Some(uri) = key_uri.get() else {
                    return Lookup::BadKey;
                };
                let creq = CacheRequest {
                    key: uri,
                    method: &Method::GET,
                    headers,
                };
                cache::evaluate(&replica.meta, creq, now, snap.config.mode)
            }
        };
        match freshness {
            Freshness::Fresh => Lookup::Fresh(replica),
            Freshness::Stale(validators) => Lookup::Stale {
                allowed: cache::stale_use(&replica.meta, now, stale),
                replica,
                validators,
            },
            Freshness::Mismatch => Lookup::OtherVariant,
        }
    }

    /// Nothing usable in the replica, or a stale one to revalidate: the
    /// key's fill (a HEAD only joins one under way, it never starts a
    /// download).
    #[allow(clippy::too_many_arguments)]
    async fn miss(
        &self,
        method: &Method,
        headers: HeaderMap,
        key_uri: &KeyUri<'_>,
        revalidation: Option<Revalidation>,
        (upstreams, policy, peer_target): (Upstreams, Option<PolicyRun>, Option<Box<str>>),
        client: IpAddr,
        snap: &Snapshot,
    ) -> Answer {
        let key = key_uri.key;
        let Some(uri) = key_uri.get() else {
            return Answer::local(body::text(StatusCode::BAD_REQUEST, "bad URL"));
        };
        if revalidation.is_none() {
            if snap.config.mode == CacheMode::Offline {
                return Answer::local(body::text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("offline mode: {key} is not in the replica"),
                ));
            }
            if *method == Method::HEAD {
                let Some(fill) = self.engine.find(key) else {
                    let hook = policy.map(|p| p.hook(&headers));
                    return self
                        .uncached(
                            NoCacheReason::HeadOnly,
                            method,
                            headers,
                            &upstreams,
                            hook.as_deref(),
                            snap,
                        )
                        .await;
                };
                return self
                    .follow(
                        method,
                        &headers,
                        uri,
                        fill,
                        None,
                        CacheOutcome::Coalesced,
                        &upstreams,
                        None,
                        snap,
                    )
                    .await;
            }
        }
        // A stale replica the upstream replaces is `fwd=stale`, not a miss.
        let fresh_outcome = match revalidation {
            Some(_) => CacheOutcome::Refreshed,
            None => CacheOutcome::Miss,
        };
        let (revalidate, fallback) = match revalidation {
            Some(r) => (Some((r.replica, r.validators)), r.fallback),
            None => (None, None),
        };
        // A follower needs no job: joining first spares it copies of the
        // headers (for the upstream and for the hook) and of the route.
        if let Some(fill) = self.engine.join(key) {
            return self
                .follow(
                    method,
                    &headers,
                    uri,
                    fill,
                    None,
                    CacheOutcome::Coalesced,
                    &upstreams,
                    fallback,
                    snap,
                )
                .await;
        }
        let job = FillJob {
            key: key.clone(),
            key_uri: uri.clone(),
            upstreams: upstreams.clone(),
            headers: upstream_headers(&headers, true),
            revalidate,
            settings: snap.settings.clone(),
            hook: policy.map(|p| p.hook(&headers)),
            client,
            background: false,
            sha256: crate::fetch::peer::content_address(uri.path()),
            peer_target,
        };
        let (fill, passthrough, outcome) = match self.engine.fill(job) {
            FillTicket::Ready(replica) => {
                return match self
                    .serve_replica(method, &headers, replica, CacheOutcome::Hit, &upstreams)
                    .await
                {
                    Ok(a) => a,
                    Err(e) => Answer::local(internal(&e)),
                };
            }
            FillTicket::Leader { fill, passthrough } => (fill, Some(passthrough), fresh_outcome),
            FillTicket::Follower(fill) => (fill, None, CacheOutcome::Coalesced),
            FillTicket::Refused(why) => return Answer::local(fill_refused(&why)),
        };
        self.follow(
            method,
            &headers,
            uri,
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
        key_uri: &KeyUri<'_>,
        replica: Arc<Replica>,
        validators: HeaderMap,
        upstreams: Upstreams,
        policy: Option<PolicyRun>,
        client: IpAddr,
        snap: &Snapshot,
    ) -> Answer {
        if let Some(uri) = key_uri.get() {
            let job = FillJob {
                key: key_uri.key.clone(),
                key_uri: uri.clone(),
                upstreams: upstreams.clone(),
                headers: upstream_headers(headers, true),
                revalidate: Some((replica.clone(), validators)),
                settings: snap.settings.clone(),
                hook: policy.map(|p| p.hook(headers)),
                client,
                background: true,
                // A background refresh asks the upstream: the owner's copy
                // may be as stale as ours.
                peer_target: None,
                sha256: None,
            };
            // Nobody waits for this ticket: the fill task outlives it, and
            // an unshareable answer is simply dropped; over a fill cap the
            // stale copy is served without a revalidation this time.
            drop(self.engine.fill(job));
        }
        match self
            .serve_replica(
                method,
                headers,
                replica,
                CacheOutcome::StaleRevalidating,
                &upstreams,
            )
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
        upstreams: &Upstreams,
    ) -> Option<Answer> {
        let replica = fallback?;
        tracing::info!(target: "cistern::cache", key = %replica.meta.key, "upstream failed ({why}); serving the stale replica (stale-if-error)");
        self.serve_replica(
            method,
            headers,
            replica,
            CacheOutcome::StaleOnError,
            upstreams,
        )
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
                            .uncached(
                                NoCacheReason::OtherVariant,
                                method,
                                headers.clone(),
                                upstreams,
                                None,
                                snap,
                            )
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
                        .serve_replica(
                            method,
                            headers,
                            replica,
                            CacheOutcome::Revalidated,
                            upstreams,
                        )
                        .await
                    {
                        Ok(a) => a,
                        Err(e) => Answer::local(internal(&e)),
                    };
                }
                FillState::Unshared(reason) => {
                    drop(progress);
                    if let Some(rx) = passthrough
                        && let Ok(resp) = rx.await
                    {
                        let status = resp.status();
                        if status.is_server_error()
                            && let Some(stale) = self
                                .stale_on_error(method, headers, fallback, &status, upstreams)
                                .await
                        {
                            return stale;
                        }
                        return Answer {
                            response: passthrough_response(resp),
                            outcome: CacheOutcome::Pass(reason),
                        };
                    }
                    let answer = self
                        .uncached(reason, method, headers.clone(), upstreams, None, snap)
                        .await;
                    let status = answer.response.status();
                    if status.is_server_error()
                        && let Some(stale) = self
                            .stale_on_error(method, headers, fallback, &status, upstreams)
                            .await
                    {
                        return stale;
                    }
                    return answer;
                }
                FillState::Failed(e) => {
                    if e.side() == Side::Upstream
                        && let Some(stale) = self
                            .stale_on_error(method, headers, fallback, &e, upstreams)
                            .await
                    {
                        return stale;
                    }
                    return Answer::local(error_response(&e));
                }
            }
        }
    }

    /// Answers from a complete replica; a file of a mirror set also gets
    /// its Metalink/HTTP links (see [`serve::metalink`]).
    pub(super) async fn serve_replica(
        &self,
        method: &Method,
        headers: &HeaderMap,
        replica: Arc<Replica>,
        outcome: CacheOutcome,
        upstreams: &Upstreams,
    ) -> Result<Answer, ServeError> {
        let age = cache::age(&replica.meta, self.clock.now());
        let links = match upstreams {
            Upstreams::Mirror { set, rest, .. } => Some((replica.clone(), set, rest)),
            Upstreams::Single(_) => None,
        };
        let source = Source::Replica(replica, self.engine.store().clone());
        let mut response = serve::respond(method, headers, source, age).await?;
        if let Some((replica, set, rest)) = links
            && matches!(
                response.status(),
                StatusCode::OK | StatusCode::PARTIAL_CONTENT
            )
        {
            serve::metalink::add_links(&replica, set, rest, response.headers_mut());
        }
        Ok(Answer { response, outcome })
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

/// The headers to send upstream: end-to-end ones only. For a fill (shared
/// by every reader) the client's conditionals and ranges are dropped: the
/// fill fetches the whole body and each reader's own conditions are
/// answered from the replica.
pub(super) fn upstream_headers(client: &HeaderMap, for_fill: bool) -> HeaderMap {
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

/// What the replica lookup found for a GET or HEAD.
enum Lookup {
    /// A fresh replica: serve it.
    Fresh(Arc<Replica>),
    /// A stale one, with the validators to revalidate it and what
    /// `stale-if-error`/`stale-while-revalidate` allow now.
    Stale {
        replica: Arc<Replica>,
        validators: HeaderMap,
        allowed: StaleUse,
    },
    /// The replica holds another `Vary` variant.
    OtherVariant,
    /// Nothing stored under the key.
    Absent,
    /// The key is not a URL the cache rules can read.
    BadKey,
}

/// A stale replica to revalidate through the fill.
struct Revalidation {
    replica: Arc<Replica>,
    validators: HeaderMap,
    /// The replica again where `stale-if-error` allows serving it on an
    /// upstream failure.
    fallback: Option<Arc<Replica>>,
}

/// The cache key as a `Uri`, parsed once and only when a decision needs
/// it: a fresh hit on the fast path never does.
struct KeyUri<'k> {
    key: &'k CacheKey,
    uri: OnceLock<Option<Uri>>,
}

impl<'k> KeyUri<'k> {
    fn new(key: &'k CacheKey) -> KeyUri<'k> {
        KeyUri {
            key,
            uri: OnceLock::new(),
        }
    }

    /// The key as a `Uri`; `None` if it does not parse as one.
    fn get(&self) -> Option<&Uri> {
        self.uri
            .get_or_init(|| self.key.as_str().parse().ok())
            .as_ref()
    }
}
