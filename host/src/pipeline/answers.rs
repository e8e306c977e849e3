//! The answers Cistern makes itself: its status page, a policy's direct
//! response, and error pages, which tell the client what went wrong
//! without naming upstream URLs or paths on disk (the log has those).

use crate::body::ClientBody;
use http::{Request, Response, StatusCode, header};

use super::Proxy;
use crate::body::{self, ProxyBody};
use crate::fetch::{FetchError, Side, error_chain};
use crate::policy::DirectResponse;
use crate::serve::ServeError;
use crate::snapshot::Snapshot;

impl Proxy {
    pub(super) fn local_page(
        &self,
        req: &Request<ClientBody>,
        snap: &Snapshot,
    ) -> Response<ProxyBody> {
        if req.uri().path() != "/" {
            return body::text(
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
        body::text(StatusCode::OK, page)
    }
}

/// A policy's direct answer.
pub(super) fn direct_response(d: DirectResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(d.body));
    *resp.status_mut() = d.status;
    *resp.headers_mut() = d.headers;
    // The body is whole in memory: hyper frames it from its length, so a
    // policy's Content-Length or Transfer-Encoding can never disagree.
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().remove(header::TRANSFER_ENCODING);
    resp
}

pub(super) fn forbidden() -> Response<ProxyBody> {
    body::text(
        StatusCode::FORBIDDEN,
        "forward proxying is not allowed for this address (see `forward { allow … }` in config.kdl)",
    )
}

/// A fetch failure as the client sees it: what went wrong, never the
/// upstream's URL or a path on our disk (the log has those: the fill or the
/// failover logged the failure where it happened).
pub(super) fn error_response(e: &FetchError) -> Response<ProxyBody> {
    let mut resp = error_text(e);
    if e.side() == Side::Upstream {
        resp.extensions_mut().insert(UpstreamFailed);
    }
    resp
}

/// Marks Cistern's own answer to a failure of the upstream (not of
/// Cistern), for a peer asking this node as owner.
#[derive(Debug, Clone, Copy)]
pub(super) struct UpstreamFailed;

fn error_text(e: &FetchError) -> Response<ProxyBody> {
    let status = e.status();
    tracing::debug!(target: "cistern::fetch", status = status.as_u16(), "answering with an error: {}", error_chain(e));
    let text = match e {
        // The client named the target itself; the message says why not.
        FetchError::SelfTarget(refused) => return body::text(status, refused.to_string()),
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
    body::text(status, text)
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
pub(super) fn internal(e: &ServeError) -> Response<ProxyBody> {
    tracing::error!(target: "cistern::serve", "{e}");
    body::text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Cistern could not read its replica of this (its log says why)",
    )
}

/// How long a client refused by a fill cap is asked to wait: long enough
/// for short downloads to finish, short enough that a package manager's
/// retry finds a free place.
pub(super) const FILL_RETRY_AFTER_SECS: u32 = 5;

/// The answer to a request whose miss would start one fill too many
/// (`max-fills`, `max-fills-per-client`): 503 with `Retry-After`. Not a
/// pass-through: an uncached download costs the upstream the same, and the
/// cap is there to bound what the upstream is asked for.
pub(super) fn fill_refused(why: &crate::fetch::FillRefused) -> Response<ProxyBody> {
    let mut resp = body::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("too many downloads at once: {why}; retry shortly"),
    );
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        http::HeaderValue::from(FILL_RETRY_AFTER_SECS),
    );
    resp
}
