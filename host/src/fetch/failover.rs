//! Sending requests upstream: building them, trying the candidate
//! upstreams in order and reporting each one's health to its mirror set.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;

use super::mirror::Outcome;
use super::{FetchError, FillJob, Inner, UpstreamBody, Upstreams, error_chain};

/// The body of a request that has none.
pub(super) fn empty_body() -> UpstreamBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A request for `url` with the client's end-to-end headers, framed by
/// its body.
pub(super) fn build_request(
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

/// Whether `req` may be sent again after its connection failed under it:
/// an idempotent method (RFC 9110 §9.2.2) and no body to replay.
fn replayable(req: &Request<UpstreamBody>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    ) && http_body::Body::is_end_stream(req.body())
}

/// One upstream to try for a request.
pub(super) struct Candidate {
    /// Its index in the mirror set, to report health to.
    pub(super) index: Option<usize>,
    /// The request's URL there.
    pub(super) url: Uri,
    /// It answered 404 for this file recently.
    pub(super) known_missing: bool,
}

impl Upstreams {
    /// Candidate URLs in the order to try (see [`super::mirror`]).
    pub(super) fn candidates(&self) -> Vec<Candidate> {
        match self {
            Upstreams::Single(uri) => vec![Candidate {
                index: None,
                url: uri.clone(),
                known_missing: false,
            }],
            Upstreams::Mirror { set, rest, .. } => set
                .order(rest)
                .into_iter()
                .filter_map(|c| {
                    set.url(c.index, rest).ok().map(|url| Candidate {
                        index: Some(c.index),
                        url,
                        known_missing: c.known_missing,
                    })
                })
                .collect(),
        }
    }

    /// Tells a mirror set how its upstream `index` did.
    pub(super) fn report(&self, index: Option<usize>, outcome: Outcome<'_>) {
        if let (Upstreams::Mirror { set, .. }, Some(i)) = (self, index) {
            set.report(i, outcome);
        }
    }

    /// Tells a mirror set how the upstream `url` was sent to did: a
    /// request that failed, or its body after the head (cut short,
    /// stalled, failing its digest, or whole).
    pub(super) fn report_url(&self, url: &Uri, outcome: Outcome<'_>) {
        if let Upstreams::Mirror { set, .. } = self
            && let Some(i) = set.index_of(url)
        {
            set.report(i, outcome);
        }
    }

    /// Remembers that the upstream `url` was sent to has a bad copy of
    /// this file (its body failed its digest): like its 404, the next
    /// request for the file goes to the next upstream.
    pub(super) fn remember_bad_copy(&self, url: &Uri) {
        if let Upstreams::Mirror { set, rest, .. } = self
            && let Some(i) = set.index_of(url)
        {
            set.remember_missing(i, rest);
        }
    }

    /// Where a fill whose body from `current` failed may fetch the rest:
    /// with `other_mirrors` (the partial is provably identifiable: a known
    /// length and a strong ETag or an announced SHA-256) the set's other
    /// upstreams in their order for this file, known-missing ones left
    /// out, then `current`; else `current` alone.
    pub(super) fn resume_targets(&self, current: &Uri, other_mirrors: bool) -> Vec<Uri> {
        let mut out = Vec::new();
        if let Upstreams::Mirror { set, rest, .. } = self
            && other_mirrors
        {
            let here = set.index_of(current);
            out.extend(
                set.order(rest)
                    .into_iter()
                    .filter(|c| Some(c.index) != here && !c.known_missing)
                    .filter_map(|c| set.url(c.index, rest).ok()),
            );
        }
        out.push(current.clone());
        out
    }

    /// Remembers that upstream `index` has no such file.
    fn remember_missing(&self, index: Option<usize>) {
        if let (Upstreams::Mirror { set, rest, .. }, Some(i)) = (self, index) {
            set.remember_missing(i, rest);
        }
    }
}

impl Inner {
    /// For a fill whose SHA-256 is known, asks the live peers that hold
    /// it (by the fleet's digest index when there is one, else all of
    /// them) in the key's rendezvous order for a complete replica with
    /// that digest (see
    /// [`super::peer`]); the first `200` is the fill's answer, its bytes
    /// checked against the digest as they are written. A `404` (the peer
    /// holds no such content) moves on to the next peer; a failure marks
    /// the peer down as on the owner path. Not for a revalidation or a
    /// resume (a range of a partial): those go on to the owner or the
    /// upstream. `None`: no peer had it.
    async fn ask_by_hash(
        &self,
        job: &FillJob,
        headers: &HeaderMap,
    ) -> Option<(Response<Incoming>, Uri)> {
        let digest = job.sha256.as_ref()?;
        let fleet = job.settings.fleet.as_ref()?;
        // A peer's own request is served as owner, never passed on.
        job.peer_target.as_ref()?;
        if job.revalidate.is_some() || headers.contains_key(header::RANGE) {
            return None;
        }
        // With the fleet's digest index (`cluster { redis }`) only the
        // nodes it names as holders are asked, and none when it names
        // none; without it (or with Redis down) every live peer is.
        let holders = self.shared.holders(digest).await;
        let peers = fleet.live_peers(job.key.as_str());
        let peers = peers.into_iter().filter(|p| {
            holders
                .as_ref()
                .is_none_or(|h| h.iter().any(|holder| *holder.node == *p.name))
        });
        for peer in peers {
            let url = peer.by_sha256_url(digest);
            match self.ask_peer(fleet, peer, &url, headers, job).await {
                Some(resp) if resp.status() == http::StatusCode::OK => {
                    tracing::debug!(target: "cistern::fetch", peer = %peer.name, key = %job.key,
                        "filling from a peer that holds the content by its SHA-256");
                    return Some((resp, url));
                }
                Some(resp) if resp.status() == http::StatusCode::NOT_FOUND => {}
                Some(resp) => {
                    fleet.failed(
                        peer,
                        &format!("status {} for content by digest", resp.status()),
                    );
                }
                None => {}
            }
        }
        None
    }

    /// `GET url` of a fleet `peer`, carrying the fleet's secret. `None`
    /// when the peer refused the secret or could not be reached; it is
    /// then marked down, so the next fills skip it.
    async fn ask_peer(
        &self,
        fleet: &super::peer::Fleet,
        peer: &super::peer::Peer,
        url: &Uri,
        headers: &HeaderMap,
        job: &FillJob,
    ) -> Option<Response<Incoming>> {
        let mut req = build_request(Method::GET, url, headers, empty_body());
        req.headers_mut()
            .insert(super::peer::SECRET_HEADER, fleet.secret().clone());
        match self.send(req, url, job.settings.idle).await {
            Ok(resp) if resp.headers().contains_key(super::peer::REFUSED_HEADER) => {
                fleet.failed(peer, "it refused the peer request (check `secret`)");
                None
            }
            Ok(resp) => Some(resp),
            Err(e) => {
                fleet.failed(peer, &error_chain(&e));
                None
            }
        }
    }

    /// Asks the key's owner in the fleet, when that is a live peer; `None`
    /// sends the fill to the upstream: no fleet, this node owns the key,
    /// or the owner failed (marked down, so the next fills skip it). A 5xx
    /// the owner marks as its upstream's is the fill's answer.
    async fn ask_owner(
        &self,
        job: &FillJob,
        headers: &HeaderMap,
    ) -> Option<(Response<Incoming>, Uri)> {
        let fleet = job.settings.fleet.as_ref()?;
        let target = job.peer_target.as_deref()?;
        let super::peer::Owner::Peer(peer) = fleet.owner(job.key.as_str()) else {
            return None;
        };
        let url = match peer.url(target) {
            Ok(url) => url,
            Err(e) => {
                tracing::info!(target: "cistern::fetch", peer = %peer.name,
                    "cannot ask the owner for {target:?}: {e}; filling from the upstream");
                return None;
            }
        };
        match self.ask_peer(fleet, peer, &url, headers, job).await? {
            resp if !resp.status().is_server_error() => Some((resp, url)),
            resp if resp
                .headers()
                .contains_key(super::peer::UPSTREAM_FAILED_HEADER) =>
            {
                // The owner works; its upstream failed, and this node's
                // would be asked the same: the answer is passed on and
                // the owner stays up.
                tracing::info!(target: "cistern::fetch", peer = %peer.name, status = %resp.status(),
                    "the owner's upstream failed; passing its answer on");
                Some((resp, url))
            }
            resp => {
                fleet.failed(peer, &format!("status {}", resp.status()));
                None
            }
        }
    }

    /// Sends one request, bounded by the inactivity timeout, and counts it.
    /// An idempotent request without a body whose pooled connection the
    /// upstream closed before answering is sent once more on a new
    /// connection: the upstream never saw it answered, and nothing but the
    /// head has to be sent again. A request with a body is not: its body
    /// is streamed and gone, and a non-idempotent one may have been acted
    /// on (RFC 9110 §9.2.2).
    pub(super) async fn send(
        &self,
        req: Request<UpstreamBody>,
        url: &Uri,
        idle: Duration,
    ) -> Result<Response<Incoming>, FetchError> {
        let replay = replayable(&req).then(|| (req.method().clone(), req.headers().clone()));
        let mut sent = tokio::time::timeout(idle, self.client.send(req)).await;
        if let (Ok(Err(e)), Some((method, headers))) = (&sent, replay)
            && super::upstream::closed_before_answer(e)
        {
            tracing::info!(target: "cistern::fetch", %url, %method,
                "upstream closed the connection before answering ({}); sending again once on a new connection",
                error_chain(e));
            self.metrics.upstream_request(true);
            let mut again = Request::new(empty_body());
            *again.method_mut() = method;
            *again.uri_mut() = url.clone();
            *again.headers_mut() = headers;
            sent = tokio::time::timeout(idle, self.client.send_fresh(again)).await;
        }
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

    /// Sends a GET for a fill along the job's upstreams.
    pub(super) async fn ask(
        &self,
        job: &FillJob,
        headers: &HeaderMap,
    ) -> Result<(Response<Incoming>, Uri), FetchError> {
        if let Some(answer) = self.ask_by_hash(job, headers).await {
            return Ok(answer);
        }
        if let Some(answer) = self.ask_owner(job, headers).await {
            return Ok(answer);
        }
        self.failover(
            Method::GET,
            &job.upstreams,
            headers,
            None,
            job.settings.idle,
        )
        .await
    }

    /// Sends the request to each candidate upstream until one answers
    /// without a connect error, a 5xx or a 404. A 404 reaches the client
    /// only when every upstream said 404: a failure anywhere wins (the
    /// file may be there), the first 5xx answer passed on as it came.
    /// An upstream that said 404 for this file recently is asked only
    /// when no other had it. With a request body only the first candidate
    /// is tried: a streamed body cannot be sent twice.
    pub(super) async fn failover(
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
        let mut server_error: Option<(Response<Incoming>, Uri)> = None;
        let mut not_found: Option<(Response<Incoming>, Uri)> = None;
        for (n, c) in candidates.into_iter().enumerate() {
            let Candidate {
                index,
                url,
                known_missing,
            } = c;
            if known_missing && not_found.is_some() {
                // The rest said 404 already; no need to hear it again.
                break;
            }
            let req_body = body.take().unwrap_or_else(empty_body);
            let mut req = build_request(method.clone(), &url, headers, req_body);
            if let Some(host) = upstreams.host() {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            let asked = std::time::Instant::now();
            let more = retryable && n + 1 < count;
            match self.send(req, &url, idle).await {
                Ok(resp) if resp.status().is_server_error() => {
                    let status = resp.status();
                    upstreams.report(index, Outcome::Failed(&format!("status {status}")));
                    if !more {
                        return Ok((resp, url));
                    }
                    tracing::info!(target: "cistern::fetch", %url, %status, "upstream error, trying the next mirror");
                    server_error.get_or_insert((resp, url));
                }
                Ok(resp) => {
                    upstreams.report(index, Outcome::Answered(asked.elapsed()));
                    if resp.status() == http::StatusCode::NOT_FOUND && retryable && index.is_some()
                    {
                        upstreams.remember_missing(index);
                        if more {
                            tracing::info!(target: "cistern::fetch", %url, "not on this mirror (404), trying the next");
                        }
                        not_found = Some((resp, url));
                        continue;
                    }
                    return Ok((resp, url));
                }
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::info!(target: "cistern::fetch", %url, kind = e.kind().as_str(), "upstream failed: {why}");
                    upstreams.report(index, Outcome::Failed(&why));
                    last = Some(e);
                    if !retryable {
                        break;
                    }
                }
            }
        }
        if let Some(answer) = server_error {
            return Ok(answer);
        }
        if let Some(e) = last {
            return Err(e);
        }
        not_found.ok_or_else(|| FetchError::NoUpstream {
            url: upstreams.primary(),
        })
    }
}
