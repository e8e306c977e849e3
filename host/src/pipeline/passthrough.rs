//! Responses that are not stored: other methods (streamed both ways, and
//! invalidating the URL's replica on success) and GETs that cannot be
//! shared, each fetched for its client alone.

use std::sync::Arc;

use crate::body::ClientBody;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::answers::error_response;
use super::cached::upstream_headers;
use super::{Answer, Proxy};
use crate::body::{self, ProxyBody};
use crate::cache;
use crate::fetch::{HeadHook, Upstreams};
use crate::observe::{CacheOutcome, NoCacheReason};
use crate::snapshot::Snapshot;
use crate::store::CacheKey;

impl Proxy {
    /// Fetches for this client only, storing nothing, for `reason`.
    pub(super) async fn uncached(
        &self,
        reason: NoCacheReason,
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
            Ok(resp) => passed(resp, hook, reason).await,
            Err(e) => Answer::local(error_response(&e)),
        }
    }

    /// Other methods: streamed both ways; a success invalidates the replica
    /// of the URL (RFC 9111 §4.4).
    pub(super) async fn pass(
        &self,
        req: Request<ClientBody>,
        key: CacheKey,
        upstreams: Upstreams,
        hook: Option<Arc<dyn HeadHook>>,
        snap: &Snapshot,
    ) -> Answer {
        let (parts, body) = req.into_parts();
        let headers = upstream_headers(&parts.headers, false);
        let body = body
            .map_err(|e| -> crate::body::BoxError { Box::new(e) })
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
                passed(resp, hook.as_deref(), NoCacheReason::Method).await
            }
            Err(e) => Answer::local(error_response(&e)),
        }
    }
}

/// An uncached upstream response, after the policies' `on_response`.
pub(super) async fn passed(
    mut resp: Response<Incoming>,
    hook: Option<&dyn HeadHook>,
    reason: NoCacheReason,
) -> Answer {
    if let Some(hook) = hook {
        let status = resp.status();
        if hook.on_head(status, resp.headers_mut()).await.deny {
            return Answer::local(body::text(
                StatusCode::BAD_GATEWAY,
                "a policy refused the upstream response",
            ));
        }
    }
    Answer {
        response: passthrough_response(resp),
        outcome: CacheOutcome::Pass(reason),
    }
}

pub(super) fn passthrough_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    cache::strip_hop_by_hop(&mut parts.headers);
    cache::strip_targeted(&mut parts.headers);
    let body = body
        .map_err(|e| -> crate::body::BoxError { Box::new(e) })
        .boxed_unsync();
    Response::from_parts(parts, body)
}
