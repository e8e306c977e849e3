//! The body hook of a fill (policy ABI version 2, `on_body`): a response
//! a policy declared (by `Content-Type`, up to its `body-max`) is read
//! whole, handed to the policy chain, and its replacement is what the
//! replica stores and every reader gets, with its own length and SHA-256.
//!
//! Only declared responses are buffered, and never more than the cap: a
//! `Content-Length` above it streams as usual, and a body of unknown length
//! that grows past it is written out as read and streams on unchanged.
//! Readers of the key wait for the rewrite: the fill publishes its head
//! only after it, so nobody sees the original's bytes or length.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::super::sink::BodySink;
use super::super::{BodyRewrite, FetchError, Fill, FillJob, HeadDecision, Inner};
use super::Writing;
use crate::cache::{self, CacheRequest};

/// What the body hook left for the fill to write.
pub(super) enum Rewrite {
    /// Nothing was read: the body streams as usual.
    Stream,
    /// These bytes were read (the original's, unchanged) and go first; the
    /// rest of the body, if any, streams after them.
    Prefix(Vec<Bytes>),
    /// A policy's replacement of the whole body; the head's length and
    /// digests were updated to it.
    Replaced(Bytes),
}

/// Digest fields that describe the upstream's bytes, not a replacement.
const ORIGINAL_DIGESTS: &[&str] = &["repr-digest", "content-digest", "digest", "content-md5"];

impl Inner {
    /// Runs the chain's body hook on `resp` if a policy declared it. `framed`:
    /// the upstream framed the body (a length or chunks), so reading it to
    /// its end proves it whole.
    pub(super) async fn rewrite_body(
        &self,
        job: &FillJob,
        resp: &mut Response<Incoming>,
        url: &Uri,
        framed: bool,
        decision: &HeadDecision,
        received: SystemTime,
    ) -> Result<Rewrite, FetchError> {
        let Some(hook) = &job.hook else {
            return Ok(Rewrite::Stream);
        };
        let Some(cap) = hook.body_limit(resp.status(), resp.headers()) else {
            return Ok(Rewrite::Stream);
        };
        let key = &job.key;
        let pass = |why: &str| {
            tracing::info!(target: "cistern::fetch", %key, %url, "body passes through unchanged: {why}");
            Ok(Rewrite::Stream)
        };
        let encoded = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return pass("the upstream sent it content-encoded, and policies rewrite plain bodies");
        }
        if !framed {
            return pass("it ends with the upstream connection, so nothing proves it whole");
        }
        // A rewrite is only worth its buffer if the replica takes it; the
        // fill's own checks come after the body is read, too late to pass
        // it on as it came.
        let mut parts = Response::new(()).into_parts().0;
        parts.status = resp.status();
        parts.headers = resp.headers().clone();
        let creq = CacheRequest {
            key: &job.key_uri,
            method: &Method::GET,
            headers: &job.headers,
        };
        let policy = cache::new_policy(creq, &parts, received);
        if decision.uncacheable
            || !cache::storable(&policy, parts.status, &parts.headers)
            || cache::varies_on_everything(&parts.headers)
        {
            return pass("the response is not stored");
        }
        if let Some(len) = super::content_length(resp.headers())
            && len > cap
        {
            return pass(&format!("{len} bytes is over the body-max of {cap} bytes"));
        }
        let idle = job.settings.idle;
        let url_s = url.to_string();
        let mut chunks = Vec::new();
        let mut read = 0u64;
        loop {
            let frame = match tokio::time::timeout(idle, resp.body_mut().frame()).await {
                Err(_) => {
                    return Err(FetchError::Timeout {
                        url: url_s,
                        after: idle,
                    });
                }
                Ok(None) => break,
                Ok(Some(Err(source))) => {
                    return Err(FetchError::Body {
                        url: url_s,
                        written: 0,
                        source,
                    });
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                read += data.len() as u64;
                chunks.push(data);
                if read > cap {
                    tracing::info!(target: "cistern::fetch", %key, %url,
                        "body passes through unchanged: more than the body-max of {cap} bytes");
                    return Ok(Rewrite::Prefix(chunks));
                }
            }
        }
        let whole = if chunks.len() == 1 {
            chunks.pop().unwrap_or_default()
        } else {
            let mut all = Vec::with_capacity(usize::try_from(read).unwrap_or(0));
            for c in &chunks {
                all.extend_from_slice(c);
            }
            Bytes::from(all)
        };
        match hook
            .on_body(resp.status(), resp.headers(), whole.clone())
            .await
        {
            BodyRewrite::Unchanged => Ok(Rewrite::Prefix(vec![whole])),
            BodyRewrite::Deny => Err(FetchError::PolicyDenied { url: url_s }),
            BodyRewrite::Replaced(body) => {
                let headers = resp.headers_mut();
                for name in ORIGINAL_DIGESTS {
                    headers.remove(*name);
                }
                headers.remove(header::TRANSFER_ENCODING);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                tracing::debug!(target: "cistern::fetch", %key, %url, from = read, to = body.len(), "body rewritten by policy");
                Ok(Rewrite::Replaced(body))
            }
        }
    }

    /// Writes the bytes the body hook read or made at the start of the
    /// partial, so the stream goes on after them; `from_peer` counts them
    /// as bytes from a fleet peer rather than the upstream.
    pub(super) async fn write_prefix(
        &self,
        fill: &Fill,
        w: Writing,
        prefix: Vec<Bytes>,
        from_peer: bool,
    ) -> Result<Writing, FetchError> {
        let batch_len = prefix.iter().map(Bytes::len).sum();
        let mut sink = BodySink {
            partial: w.partial,
            batch: prefix,
            batch_len,
            written: w.start,
            // The stream hashes the whole file at its end (its start is
            // not 0 any more).
            hasher: None,
            from_peer,
        };
        self.flush(fill, &mut sink).await?;
        Ok(Writing {
            partial: sink.partial,
            start: sink.written,
            ..w
        })
    }
}
