//! One access-log line per request, written when the response body ends
//! (or is abandoned), so the line tells the bytes really sent.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::admin::metrics::Metrics;
use crate::fetch::BoxError;
use crate::serve::ProxyBody;

/// What the log line says about the cache, as in `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the replica without asking upstream.
    Hit,
    /// Fetched from upstream and stored; this client started the fetch.
    Miss,
    /// Read along another client's fetch of the same key.
    Coalesced,
    /// The replica was stale; the upstream confirmed it (304).
    Revalidated,
    /// Passed through without storing (other methods, unshareable responses,
    /// another Vary variant).
    Pass,
    /// A CONNECT tunnel.
    Tunnel,
    /// Answered by Cistern itself (status page, errors, limits).
    Local,
}

impl CacheOutcome {
    /// The word used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::Pass => "pass",
            CacheOutcome::Tunnel => "tunnel",
            CacheOutcome::Local => "local",
        }
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "cistern; hit",
            CacheOutcome::Miss => "cistern; fwd=miss; stored",
            CacheOutcome::Coalesced => "cistern; fwd=miss; collapsed",
            CacheOutcome::Revalidated => "cistern; hit; fwd=stale; fwd-status=304",
            CacheOutcome::Pass => "cistern; fwd=bypass",
            CacheOutcome::Tunnel | CacheOutcome::Local => "cistern; detail=local",
        }
    }
}

/// The fields of one access-log line.
#[derive(Debug)]
pub struct AccessRecord {
    /// Client address.
    pub client: SocketAddr,
    /// Request method.
    pub method: Method,
    /// Request URL as received.
    pub url: String,
    /// Response status.
    pub status: StatusCode,
    /// Cache outcome.
    pub outcome: CacheOutcome,
    /// When the request arrived.
    pub started: Instant,
    /// Request and response headers, when `-v` asked for them.
    pub headers: Option<(HeaderMap, HeaderMap)>,
    /// The body length announced in `Content-Length`: a server stops
    /// polling a body once that many bytes went out, so reaching it means
    /// the transfer completed.
    pub expected: Option<u64>,
}

/// Wraps a response body; logs the record when the body is done or dropped.
pub struct LoggedBody {
    inner: ProxyBody,
    metrics: Arc<Metrics>,
    bytes: u64,
    failed: bool,
    record: Option<AccessRecord>,
}

impl LoggedBody {
    /// Wraps `inner` so that `record` is logged at its end; body bytes are
    /// counted in `metrics` as they go.
    pub fn wrap(inner: ProxyBody, record: AccessRecord, metrics: Arc<Metrics>) -> ProxyBody {
        LoggedBody {
            inner,
            metrics,
            bytes: 0,
            failed: false,
            record: Some(record),
        }
        .boxed_unsync()
    }

    fn emit(&mut self, complete: bool) {
        let Some(r) = self.record.take() else { return };
        let ms = r.started.elapsed().as_secs_f64() * 1000.0;
        let end = if self.failed {
            "failed"
        } else if complete {
            "done"
        } else {
            "aborted"
        };
        match &r.headers {
            None => tracing::info!(
                target: "cistern::access",
                "{} {} {} {} {} {} {:.1}ms {}",
                r.client, r.method, r.url, r.status.as_u16(), self.bytes, r.outcome.as_str(), ms, end
            ),
            Some((req, resp)) => tracing::info!(
                target: "cistern::access",
                "{} {} {} {} {} {} {:.1}ms {} request={:?} response={:?}",
                r.client, r.method, r.url, r.status.as_u16(), self.bytes, r.outcome.as_str(), ms, end, req, resp
            ),
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    this.metrics.client_bytes(d.len() as u64);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                tracing::warn!(target: "cistern::access", "response body failed: {e}");
                this.emit(false);
            }
            Poll::Ready(None) => this.emit(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // A body with a known length is not polled past its last byte.
        let complete = self.inner.is_end_stream()
            || self.record.as_ref().and_then(|r| r.expected) == Some(self.bytes);
        self.emit(complete);
    }
}
