//! Requests between the nodes of a fleet (`cluster`): a node that misses
//! a key it does not own asks the owner at `/_cistern/peer/<target>` with
//! the cluster secret. Here the owner checks the secret and turns the
//! request back into the client's, marked [`FromPeer`] so it is served as
//! owner (from the replica or the upstream, never from another peer).

use crate::body::ClientBody;
use http::{HeaderValue, Request, StatusCode, Uri};

use super::{Answer, ConnInfo};
use crate::body;
use crate::fetch::peer::{PEER_PATH, REFUSED_HEADER, SECRET_HEADER};
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

fn refused(status: StatusCode, why: &'static str) -> Answer {
    let mut resp = body::text(status, why);
    resp.headers_mut()
        .insert(REFUSED_HEADER, HeaderValue::from_static("1"));
    Answer::local(resp)
}
