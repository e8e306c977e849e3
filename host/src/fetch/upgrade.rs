//! Requests that switch protocols (`Upgrade`, RFC 9110 §7.8), such as a
//! WebSocket handshake through a site: sent over HTTP/1.1 on a connection
//! of their own, along the route's upstreams until one answers.

use http::{HeaderMap, Method, Response, header};
use hyper::body::Incoming;

use super::failover::{Candidate, build_request, empty_body};
use super::mirror::Outcome;
use super::{FetchEngine, FetchError, FetchSettings, Upstreams, error_chain};
use crate::config::CacheMode;

impl FetchEngine {
    /// Sends a GET asking to switch protocols with the end-to-end
    /// `headers` plus its `Connection: upgrade` and `Upgrade`; the first
    /// upstream that answers at all (a `101` or a refusal) is the one
    /// the client talks to. Nothing of it is stored.
    pub async fn upgrade(
        &self,
        upstreams: &Upstreams,
        headers: &HeaderMap,
        settings: &FetchSettings,
    ) -> Result<Response<Incoming>, FetchError> {
        if settings.mode == CacheMode::Offline {
            return Err(FetchError::Offline {
                url: upstreams.primary(),
            });
        }
        let inner = &self.inner;
        let mut last = None;
        for Candidate { index, url, .. } in upstreams.candidates() {
            let asked = std::time::Instant::now();
            let mut req = build_request(Method::GET, &url, headers, empty_body());
            if let Some(host) = upstreams.host() {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            let sent = tokio::time::timeout(settings.idle, inner.client.send_upgrade(req)).await;
            let error = match sent {
                Ok(Ok(resp)) => {
                    inner
                        .metrics
                        .upstream_request(resp.status().is_server_error());
                    let status = resp.status();
                    if status.is_server_error() {
                        upstreams.report(index, Outcome::Failed(&format!("status {status}")));
                    } else {
                        upstreams.report(index, Outcome::Answered(asked.elapsed()));
                    }
                    return Ok(resp);
                }
                Err(_) => FetchError::Timeout {
                    url: url.to_string(),
                    after: settings.idle,
                },
                Ok(Err(source)) => match crate::ours::self_target_in(&source) {
                    Some(refused) => FetchError::SelfTarget(refused.clone()),
                    None => FetchError::Connect {
                        url: url.to_string(),
                        source,
                    },
                },
            };
            inner.metrics.upstream_request(true);
            let why = error_chain(&error);
            tracing::info!(target: "cistern::fetch", %url, kind = error.kind().as_str(), "upgrade request failed: {why}");
            upstreams.report(index, Outcome::Failed(&why));
            // Never through ourselves, on any mirror.
            if matches!(error, FetchError::SelfTarget(_)) {
                return Err(error);
            }
            last = Some(error);
        }
        Err(last.unwrap_or(FetchError::NoUpstream {
            url: upstreams.primary(),
        }))
    }
}
