//! Requests that switch protocols (`Upgrade`, RFC 9110 §7.8), such as a
//! WebSocket handshake to a site: sent upstream with their `Upgrade`;
//! on `101 Switching Protocols` the client's connection and the
//! upstream's become one tunnel, closed when idle. Never cached.

use std::net::IpAddr;
use std::sync::Arc;

use crate::body::ClientBody;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper_util::rt::TokioIo;

use super::answers::error_response;
use super::cached::upstream_headers;
use super::passthrough::passed;
use super::{Answer, Proxy, forwarded};
use crate::body;
use crate::cache;
use crate::config::ForwardedFor;
use crate::fetch::{HeadHook, Upstreams};
use crate::observe::{CacheOutcome, NoCacheReason};
use crate::snapshot::Snapshot;

/// The protocols an HTTP/1.1 request asks to switch to: its `Upgrade`,
/// when its `Connection` names `upgrade`. HTTP/1.0 has no upgrade and
/// HTTP/2 forbids both fields, so only HTTP/1.1 asks.
pub(super) fn requested(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let upgrade = headers.get(header::UPGRADE)?;
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    // `h2c` asks to switch this hop to HTTP/2: Cistern declines it (the
    // request is served as HTTP/1.1, which RFC 9110 allows) rather than
    // tunnel the upstream's HTTP/2 past the cache.
    let only_h2c = upgrade
        .to_str()
        .is_ok_and(|v| v.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")));
    (named && !only_h2c).then(|| upgrade.clone())
}

impl Proxy {
    /// Sends `req` upstream asking for `protocols`; a `101` answer is
    /// relayed and the two connections spliced, any other answer passed
    /// through as it is (the upstream declined the switch).
    pub(super) async fn upgrade(
        &self,
        mut req: Request<ClientBody>,
        protocols: HeaderValue,
        upstreams: Upstreams,
        hook: Option<Arc<dyn HeadHook>>,
        forwarded_for: (ForwardedFor, IpAddr),
        snap: &Snapshot,
    ) -> Answer {
        // The hop-by-hop fields are the client's to us; the upgrade is
        // asked again of the upstream, on our own connection to it.
        let mut headers = upstream_headers(req.headers(), false);
        forwarded::apply(&mut headers, forwarded_for.0, forwarded_for.1);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocols);
        let mut resp = match self
            .engine
            .upgrade(&upstreams, &headers, &snap.settings)
            .await
        {
            Ok(resp) => resp,
            Err(e) => return Answer::local(error_response(&e)),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return passed(resp, hook.as_deref(), NoCacheReason::Upgrade).await;
        }
        if let Some(hook) = &hook
            && hook.on_head(resp.status(), resp.headers_mut()).await.deny
        {
            return Answer::local(body::text(
                StatusCode::BAD_GATEWAY,
                "a policy refused the upstream response",
            ));
        }
        let Some(switched_to) = resp.headers().get(header::UPGRADE).cloned() else {
            return Answer::local(body::text(
                StatusCode::BAD_GATEWAY,
                "the upstream switched protocols without saying to which (no Upgrade)",
            ));
        };
        let upstream_io = match hyper::upgrade::on(&mut resp).await {
            Ok(io) => io,
            Err(e) => {
                tracing::info!(target: "cistern::fetch", url = %upstreams.primary(), "upstream upgrade failed: {e}");
                return Answer::local(body::text(
                    StatusCode::BAD_GATEWAY,
                    "the upstream's connection failed as it switched protocols",
                ));
            }
        };
        let mut head = Response::new(body::empty());
        *head.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let mut fields = std::mem::take(resp.headers_mut());
        cache::strip_hop_by_hop(&mut fields);
        cache::strip_targeted(&mut fields);
        *head.headers_mut() = fields;
        head.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        head.headers_mut().insert(header::UPGRADE, switched_to);
        crate::tunnel::splice(
            &mut req,
            TokioIo::new(upstream_io),
            upstreams.primary(),
            snap.config.timeouts.idle,
        );
        Answer {
            response: head,
            outcome: CacheOutcome::Pass(NoCacheReason::Upgrade),
        }
    }
}
