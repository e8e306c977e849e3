//! Requests between the nodes of a fleet (`cluster`): a node that misses
//! a key it does not own asks the owner at `/_cistern/peer/<target>` with
//! the cluster secret. Here the owner checks the secret and turns the
//! request back into the client's, marked [`FromPeer`] so it is served as
//! owner (from the replica or the upstream, never from another peer).
//! A request for content by its digest (`/_cistern/peer/by-sha256/<hex>`)
//! is answered from the store's digest index alone: a complete replica
//! with that SHA-256, whatever its key, or `404`; it never goes upstream.

use crate::body::ClientBody;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};

use super::{Answer, ConnInfo, Proxy};
use crate::body;
use crate::fetch::peer::{
    BY_SHA256_PATH, PEER_PATH, REFUSED_HEADER, SECRET_HEADER, UPSTREAM_FAILED_HEADER,
};
use crate::observe::CacheOutcome;
use crate::serve::{self, ServeError, Source};
use crate::snapshot::Snapshot;

/// Marks a request that came from a peer with the cluster secret.
#[derive(Debug, Clone, Copy)]
pub(super) struct FromPeer;

/// Who sent a request, as [`admit`] found.
pub(super) enum Sender {
    /// A client (anything off the peer path).
    Client,
    /// A peer with the secret: the request is the client's again.
    Peer,
    /// A peer with the secret asking for content by its SHA-256.
    BySha256([u8; 32]),
    /// A request on the peer path without the secret, or naming no target.
    Refused(Answer),
}

/// For a request on the peer path: the client's request rebuilt from it,
/// or the refusal of one without the secret.
pub(super) fn admit(req: &mut Request<ClientBody>, conn: &ConnInfo, snap: &Snapshot) -> Sender {
    if conn.site_listener.is_some() || !req.uri().path().starts_with(PEER_PATH) {
        return Sender::Client;
    }
    let admitted = snap
        .settings
        .fleet
        .as_ref()
        .is_some_and(|f| f.admits(req.headers().get(SECRET_HEADER)));
    if !admitted {
        tracing::info!(target: "cistern::pipeline", client = %conn.client,
            "refused a peer request without the cluster secret");
        return Sender::Refused(refused(
            StatusCode::FORBIDDEN,
            "peer requests need the cluster secret",
        ));
    }
    req.headers_mut().remove(SECRET_HEADER);
    if let Some(hex) = req.uri().path().strip_prefix(BY_SHA256_PATH) {
        let mut digest = [0u8; 32];
        return match hex::decode_to_slice(hex, &mut digest) {
            Ok(()) => Sender::BySha256(digest),
            Err(_) => Sender::Refused(refused(
                StatusCode::BAD_REQUEST,
                "a request by digest names 64 hex digits after /_cistern/peer/by-sha256/",
            )),
        };
    }
    let target = req
        .uri()
        .path_and_query()
        .map(|p| &p.as_str()[PEER_PATH.len()..])
        .unwrap_or_default();
    match target.parse::<Uri>() {
        // An absolute URL (the forward proxy's) or a path (a mirror's).
        Ok(uri) if uri.authority().is_some() || target.starts_with('/') => {
            *req.uri_mut() = uri;
            req.extensions_mut().insert(FromPeer);
            Sender::Peer
        }
        _ => Sender::Refused(refused(
            StatusCode::BAD_REQUEST,
            "a peer request names an absolute URL or a path after /_cistern/peer/",
        )),
    }
}

/// Whether `req` came from a peer (see [`admit`]).
pub(super) fn from_peer<B>(req: &Request<B>) -> bool {
    req.extensions().get::<FromPeer>().is_some()
}

/// Marks a peer's 5xx answer whose failure is the upstream's (passed on
/// from it, or Cistern's own 502/504 about it), so the asking node keeps
/// this node up (see [`crate::fetch::peer`]).
pub(super) fn mark_upstream_failure(answer: &mut Answer) {
    let resp = &mut answer.response;
    if !resp.status().is_server_error() {
        return;
    }
    let from_upstream = answer.outcome != CacheOutcome::Local
        || resp
            .extensions()
            .get::<super::answers::UpstreamFailed>()
            .is_some();
    if from_upstream {
        resp.headers_mut()
            .insert(UPSTREAM_FAILED_HEADER, HeaderValue::from_static("1"));
    }
}

impl Proxy {
    /// A peer's request for content by its SHA-256: some complete replica
    /// in the tree with that digest, whatever its key, served with its
    /// own headers (ranges and conditionals as for a hit), or `404`. A
    /// replica stored with a `Content-Encoding` is not offered: its bytes
    /// are an encoding of the content, not the content.
    pub(super) async fn by_sha256(&self, req: &Request<ClientBody>, digest: [u8; 32]) -> Answer {
        let method = req.method();
        if method != Method::GET && method != Method::HEAD {
            let mut resp = body::text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Answer::local(resp);
        }
        let store = self.engine.store();
        let replica = store.by_sha256(&digest).filter(|r| {
            !r.meta
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-encoding"))
        });
        let not_here = || {
            Answer::local(body::text(
                StatusCode::NOT_FOUND,
                "no complete replica with that SHA-256 here",
            ))
        };
        let Some(replica) = replica else {
            return not_here();
        };
        let age = crate::cache::age(&replica.meta, self.clock.now());
        let source = Source::Replica(replica, store.clone());
        match serve::respond(method, req.headers(), source, age).await {
            Ok(response) => Answer {
                response,
                outcome: CacheOutcome::Hit,
            },
            Err(ServeError::Gone(_)) => not_here(),
            Err(e) => Answer::local(super::answers::internal(&e)),
        }
    }
}

fn refused(status: StatusCode, why: &'static str) -> Answer {
    let mut resp = body::text(status, why);
    resp.headers_mut()
        .insert(REFUSED_HEADER, HeaderValue::from_static("1"));
    Answer::local(resp)
}
