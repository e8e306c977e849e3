//! Sending requests upstream: building them, trying the candidate
//! upstreams in order and reporting each one's health to its mirror set.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;

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

impl Upstreams {
    /// The upstreams in the order to try (the mirror index to report
    /// health to, `None` for a single URL); [`Upstreams::candidate`] builds
    /// each one's URL when it is tried, so a first mirror that answers
    /// spares building the others'.
    pub(super) fn order(&self) -> Vec<Option<usize>> {
        match self {
            Upstreams::Single(_) => vec![None],
            Upstreams::Mirror { set, .. } => set.order().into_iter().map(Some).collect(),
        }
    }

    /// The URL of an upstream of [`Upstreams::order`]; `None` if the rest
    /// does not make one below that mirror's base.
    pub(super) fn candidate(&self, index: Option<usize>) -> Option<Uri> {
        match (self, index) {
            (Upstreams::Single(uri), _) => Some(uri.clone()),
            (Upstreams::Mirror { set, rest, .. }, Some(i)) => set.url(i, rest).ok(),
            (Upstreams::Mirror { .. }, None) => None,
        }
    }

    /// Tells a mirror set how its upstream `index` did.
    pub(super) fn report(&self, index: Option<usize>, failure: Option<&str>) {
        if let (Upstreams::Mirror { set, .. }, Some(i)) = (self, index) {
            set.report(i, failure);
        }
    }
}

impl Inner {
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
    /// without a connect error or a 5xx; the last one's 5xx is passed on.
    /// With a request body only the first candidate is tried: a streamed
    /// body cannot be sent twice.
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
        let mut order = upstreams.order().into_iter();
        // Each URL is built when it is tried, or looked at to decide
        // whether there is another to try.
        let mut candidates = std::iter::from_fn(|| {
            order
                .by_ref()
                .find_map(|i| upstreams.candidate(i).map(|url| (i, url)))
        })
        .peekable();
        let mut last = None;
        while let Some((index, url)) = candidates.next() {
            let req_body = body.take().unwrap_or_else(empty_body);
            let mut req = build_request(method.clone(), &url, headers, req_body);
            if let Some(host) = upstreams.host() {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            match self.send(req, &url, idle).await {
                Ok(resp)
                    if resp.status().is_server_error()
                        && retryable
                        && candidates.peek().is_some() =>
                {
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
}
