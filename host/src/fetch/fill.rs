//! The fill task: the decision tree of one key's upstream fetch
//! (revalidate, resume a partial, prepare the replica or pass an
//! unshareable response to its leader, stream the body, verify and
//! commit it, resume after a transient failure).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use headers::HeaderMapExt as _;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::cache::{self, CacheRequest};
use crate::config::CacheMode;
use crate::observe::NoCacheReason;
use crate::store::meta::unix_secs;
use crate::store::{ObjectMeta, PartialFile, PartialMeta, StoreError};

use super::failover::{build_request, empty_body};
use super::headers::{
    announced_sha256, close_delimited, content_length, content_range_start, content_range_total,
    header_str, resume_headers,
};
use super::mirror::Outcome;
use super::sink::{BodySink, WRITE_BATCH, hash_file};
use super::{
    FetchError, Fill, FillHead, FillJob, FillState, HeadDecision, Inner, RetryType, error_chain,
};

mod rewrite;

/// How many times one fill resumes its body after a transient upstream
/// failure (reset, closed connection, timeout) before its readers get a
/// failed transfer.
pub const RESUME_ATTEMPTS: u32 = 3;
/// The pause before the first resume; the n-th waits n times as long.
const RESUME_PAUSE: Duration = Duration::from_millis(200);

/// How a fill's body is being written.
struct Writing {
    partial: PartialFile,
    head: Arc<FillHead>,
    /// Where the first new byte goes (non-zero when resuming).
    start: u64,
    url: Uri,
    meta: ObjectMeta,
    /// The body comes as 206 parts: when one ends short of the whole, the
    /// next is asked for.
    parts: bool,
    /// The SHA-256 the URL names ([`FillJob::sha256`]), unless a policy
    /// replaced the body: what the stored bytes must hash to.
    content_address: Option<[u8; 32]>,
}

impl Inner {
    /// The fill task: ask upstream, then either refresh, stream into the
    /// replica, or hand an unshareable response to the leader.
    pub(super) async fn run(
        &self,
        fill: &Fill,
        job: &FillJob,
        leader: oneshot::Sender<Response<Incoming>>,
    ) -> Result<(), FetchError> {
        if job.settings.mode == CacheMode::Offline {
            return Err(FetchError::Offline {
                url: job.upstreams.primary(),
            });
        }
        let key = job.key.clone();
        // An interrupted fill of this key is resumed rather than restarted.
        let partial = if job.revalidate.is_none() {
            let k = key.clone();
            self.blocking(move |s| s.find_partial(&k)).await?
        } else {
            None
        };
        let resume = partial
            .as_ref()
            .and_then(|(meta, len)| resume_headers(meta, *len));
        // The job's headers as they are, unless this first request adds
        // validators or a range: a plain miss copies none of them.
        let mut headers = Cow::Borrowed(&job.headers);
        if let Some((_, validators)) = &job.revalidate {
            headers.to_mut().extend(validators.clone());
        }
        if let Some((range, if_range)) = &resume {
            let h = headers.to_mut();
            h.insert(header::RANGE, range.clone());
            h.insert(header::IF_RANGE, if_range.clone());
        }
        if job.hook.as_ref().is_some_and(|h| h.wants_bodies()) {
            // A policy rewrites some bodies of this route: it gets them
            // plain (`fill/rewrite.rs`).
            let identity = HeaderValue::from_static("identity");
            headers.to_mut().insert(header::ACCEPT_ENCODING, identity);
        }

        let asked = self.clock.now();
        let (mut resp, url) = self.ask(job, &headers).await?;
        let received = self.clock.now();

        if let Some((replica, _)) = &job.revalidate
            && resp.status() == StatusCode::NOT_MODIFIED
        {
            let req_headers = job.headers.clone();
            let creq = CacheRequest {
                key: &job.key_uri,
                method: &Method::GET,
                headers: &req_headers,
            };
            let (parts, _) = Response::new(()).into_parts();
            let mut parts = parts;
            parts.status = resp.status();
            parts.headers = resp.headers().clone();
            if let Some(updated) = cache::revalidated(&replica.meta, creq, &parts, asked, received)
            {
                let k = key.clone();
                let replica = self.blocking(move |s| s.refresh(&k, updated)).await?;
                fill.state.send_replace(FillState::Revalidated(replica));
                return Ok(());
            }
            // A 304 naming another validator than the replica's: what the
            // upstream holds is not what we hold, so fetch it whole.
            tracing::info!(target: "cistern::fetch", %key, %url,
                "the upstream's 304 names another validator than the replica's; fetching the object again");
            let (resp2, _) = self.ask(job, &job.headers).await?;
            resp = resp2;
        }

        // Told from the upstream's head, before a policy edits it.
        let mut framed = !close_delimited(&resp);
        let mut decision = match &job.hook {
            Some(hook) => {
                let status = resp.status();
                hook.on_head(status, resp.headers_mut()).await
            }
            None => HeadDecision::default(),
        };
        if decision.deny {
            return Err(FetchError::PolicyDenied {
                url: url.to_string(),
            });
        }

        let resumed_from = match (&partial, resp.status()) {
            (Some((_, len)), StatusCode::PARTIAL_CONTENT) if resume.is_some() => {
                match content_range_start(resp.headers()) {
                    Some(start) if start == *len => Some(*len),
                    // The upstream answered another range than we asked for.
                    _ => None,
                }
            }
            _ => None,
        };
        if resp.status() == StatusCode::PARTIAL_CONTENT
            && resumed_from.is_none()
            && resume.is_some()
        {
            // Another range than the resume asked for: start over without one.
            let k = key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            let (resp2, _) = self.ask(job, &job.headers).await?;
            resp = resp2;
        }
        let mut resumed_from = resumed_from;
        // The body starts with a 206 nobody asked for (see below).
        let mut unasked_part = false;
        if resp.status() == StatusCode::PARTIAL_CONTENT && resumed_from.is_none() {
            // A 206 nobody asked for (some CDNs answer every GET so).
            if first_part(resp.headers()) {
                // The beginning of the whole: kept as a partial from byte
                // 0, the rest asked for as it ends (see `stream`).
                if partial.is_some() {
                    let k = key.clone();
                    self.blocking(move |s| s.discard_partial(&k)).await?;
                }
                resumed_from = Some(0);
                unasked_part = true;
            } else {
                // A part the store cannot hold (not from byte 0, or short
                // with no validator to join the rest safely): this client
                // gets it as it came, and the upstream is not asked again.
                tracing::info!(target: "cistern::fetch", %key, %url,
                    "not stored: the upstream answered with a part that is not the start of the whole");
                fill.state
                    .send_replace(FillState::Unshared(NoCacheReason::NotStorable));
                let _ = leader.send(resp);
                return Ok(());
            }
        }

        if resumed_from.is_some()
            && !unasked_part
            && job
                .hook
                .as_ref()
                .is_some_and(|h| h.body_limit(StatusCode::OK, resp.headers()).is_some())
        {
            // A partial of a document a policy now rewrites (kept from
            // before the policy was configured) holds the original's bytes:
            // the document is fetched whole and goes through the hook.
            tracing::info!(target: "cistern::fetch", %key, %url,
                "not resuming: a policy rewrites this document; fetching it whole");
            let k = key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            let mut whole = job.headers.clone();
            whole.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            resp = self.ask(job, &whole).await?.0;
            framed = !close_delimited(&resp);
            resumed_from = None;
        }
        let rewrite = match resumed_from {
            None => {
                self.rewrite_body(job, &mut resp, &url, framed, &decision, received)
                    .await?
            }
            Some(_) => rewrite::Rewrite::Stream,
        };
        decision.rewritten = matches!(rewrite, rewrite::Rewrite::Replaced(_));
        let policy_uncacheable = decision.uncacheable;
        let mut writing = match self
            .prepare(fill, job, &resp, &url, received, decision, resumed_from)
            .await
        {
            Ok(Some(w)) => w,
            Ok(None) if !matches!(rewrite, rewrite::Rewrite::Stream) => {
                // The body hook checks storability first; this is a refusal
                // it could not foresee, and the body is already read.
                return Err(FetchError::RewriteUnstored {
                    url: url.to_string(),
                });
            }
            Ok(None) => {
                let reason = if policy_uncacheable {
                    NoCacheReason::PolicyUncacheable
                } else {
                    NoCacheReason::NotStorable
                };
                fill.state.send_replace(FillState::Unshared(reason));
                let _ = leader.send(resp);
                return Ok(());
            }
            Err(FetchError::Store(e)) if !matches!(rewrite, rewrite::Rewrite::Stream) => {
                tracing::warn!(target: "cistern::fetch", key = %key, "not caching a body read for the body hook: {e}");
                self.metrics.store_refusal();
                return Err(FetchError::RewriteUnstored {
                    url: url.to_string(),
                });
            }
            Err(e @ FetchError::Store(_)) => {
                // The disk refuses the replica: this client is still served,
                // uncached, and the reason is logged.
                tracing::warn!(target: "cistern::fetch", key = %key, "not caching: {e}");
                self.metrics.store_refusal();
                if resumed_from.is_some() {
                    // The 206 continues our partial, but the client asked
                    // for the whole body; the partial cannot be finished.
                    let k = key.clone();
                    self.blocking(move |s| s.discard_partial(&k)).await?;
                    if !unasked_part {
                        // (An upstream that answers in parts would only
                        // send the same part again: it goes as it came.)
                        resp = self.ask(job, &job.headers).await?.0;
                    }
                }
                fill.state
                    .send_replace(FillState::Unshared(NoCacheReason::NoRoom));
                let _ = leader.send(resp);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        writing.meta.rfc.request_time = asked;
        match rewrite {
            rewrite::Rewrite::Stream => {}
            rewrite::Rewrite::Prefix(read) => {
                writing = self
                    .write_prefix(fill, writing, read, is_peer(job, &url))
                    .await?
            }
            rewrite::Rewrite::Replaced(body) => {
                writing = self
                    .write_prefix(fill, writing, vec![body], is_peer(job, &url))
                    .await?;
            }
        }
        let streamed = self.stream(fill, job, resp, writing).await;
        if let Err(e @ (FetchError::DigestMismatch { url, .. } | FetchError::Length { url, .. })) =
            &streamed
        {
            self.blame_peer(job, url, e);
        }
        streamed
    }

    /// A fill from a peer of the fleet brought wrong bytes (another digest
    /// than the content's, or more bytes than announced): the peer is
    /// marked down like a failed one, so the next fill of the key goes on
    /// to the owner or the upstream instead of asking it again.
    fn blame_peer(&self, job: &FillJob, url: &str, e: &FetchError) {
        let (Some(fleet), Ok(url)) = (job.settings.fleet.as_ref(), url.parse::<Uri>()) else {
            return;
        };
        if let Some(peer) = fleet.peer_of(&url) {
            fleet.failed(peer, &format!("it sent wrong bytes: {e}"));
        }
    }

    /// Decides whether the response becomes a replica and, if so, opens its
    /// partial file and publishes the head to readers.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        fill: &Fill,
        job: &FillJob,
        resp: &Response<Incoming>,
        url: &Uri,
        received: SystemTime,
        decision: HeadDecision,
        resumed_from: Option<u64>,
    ) -> Result<Option<Writing>, FetchError> {
        // The stored form is the full 200 response, even when resuming.
        let mut parts = Response::new(()).into_parts().0;
        parts.status = if resumed_from.is_some() {
            StatusCode::OK
        } else {
            resp.status()
        };
        parts.headers = resp.headers().clone();
        let length = match resumed_from {
            Some(_) => content_range_total(resp.headers()),
            None => content_length(resp.headers()),
        };
        parts.headers.remove(header::CONTENT_RANGE);
        let creq = CacheRequest {
            key: &job.key_uri,
            method: &Method::GET,
            headers: &job.headers,
        };
        let policy = cache::new_policy(creq, &parts, received);
        let refusal = if decision.uncacheable
            || !cache::storable(&policy, parts.status, &parts.headers)
            || cache::varies_on_everything(&parts.headers)
        {
            Some(None)
        } else {
            self.status_refusal(job, parts.status, length, &policy, received, &decision)
                .map(Some)
        };
        if let Some(why) = refusal {
            if let Some(why) = why {
                tracing::info!(target: "cistern::fetch", key = %job.key, %url, status = parts.status.as_u16(),
                    "not stored: {why}");
            }
            self.superseded(job, parts.status).await?;
            return Ok(None);
        }
        let stored = cache::stored_headers(&parts.headers);
        let mut client_headers = HeaderMap::with_capacity(stored.len());
        for (k, v) in &stored {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                client_headers.append(k, v);
            }
        }
        let ttl_override = ttl_override(&decision, &policy, received);
        let meta = ObjectMeta {
            key: job.key.to_string(),
            url: url.to_string(),
            replica: String::new(),
            status: parts.status.as_u16(),
            headers: stored,
            policy: policy.clone(),
            rfc: cache::rfc_inputs(creq, &parts, received, received),
            file: None,
            length: 0,
            sha256: String::new(),
            stored_at: unix_secs(received),
            validated_at: unix_secs(received),
            immutable: decision.immutable,
            ttl_override: ttl_override.map(|d| d.as_secs()),
        };
        // Only a 200 is ever resumed with a range: a partial of a small
        // 404 or redirect is fetched again whole.
        // Nor a policy's rewrite: the original's validators name other bytes.
        let resumable = parts.status == StatusCode::OK && !decision.rewritten;
        let partial_meta = PartialMeta {
            key: job.key.to_string(),
            url: url.to_string(),
            total_length: length,
            etag: header_str(&parts.headers, header::ETAG).filter(|_| resumable),
            last_modified: header_str(&parts.headers, header::LAST_MODIFIED).filter(|_| resumable),
            started_at: unix_secs(received),
        };
        let k = job.key.clone();
        let resume = resumed_from.is_some();
        let partial = self
            .blocking(move |s| s.begin_partial(&k, partial_meta, resume))
            .await?;
        let start = if resume { partial.len } else { 0 };
        if resumed_from.is_some_and(|from| from != start) {
            // The partial changed under us; never splice mismatched bytes.
            return Err(FetchError::ResumeMismatch {
                url: url.to_string(),
                written: start,
                why: "the partial file changed during the resume",
            });
        }
        let head = Arc::new(FillHead {
            status: parts.status,
            url: url.to_string(),
            headers: client_headers,
            length,
            file: partial.file.clone(),
            policy,
            received,
            start,
        });
        fill.state.send_replace(FillState::Streaming {
            head: head.clone(),
            written: start,
        });
        if start > 0 {
            tracing::info!(target: "cistern::fetch", key = %job.key, from = start, "resuming partial download");
        }
        Ok(Some(Writing {
            partial,
            head,
            start,
            url: url.clone(),
            meta,
            parts: resumed_from.is_some(),
            content_address: job.sha256.filter(|_| !decision.rewritten),
        }))
    }

    /// Why a response that the RFC lets Cistern store is still not stored
    /// (`None`: it is): what the key holds is kept ([`cache::kept_over`]),
    /// or, for a response kept aside (not a 200), its body is larger than
    /// [`cache::MAX_ASIDE_BODY`] or it has no freshness at all (stored, it
    /// would only be fetched again at its next use; in `static` mode it
    /// would hide a file published later).
    fn status_refusal(
        &self,
        job: &FillJob,
        status: StatusCode,
        length: Option<u64>,
        policy: &http_cache_semantics::CachePolicy,
        received: SystemTime,
        decision: &HeadDecision,
    ) -> Option<String> {
        let current = self.store.peek(&job.key);
        if let Some(why) = cache::kept_over(current.as_deref().map(|r| &*r.meta), status) {
            return Some(why.to_owned());
        }
        if status == StatusCode::OK {
            return None;
        }
        if let Some(len) = length.filter(|l| *l > cache::MAX_ASIDE_BODY) {
            return Some(format!(
                "its body ({len} bytes) is larger than the {} bytes a response other than 200 may keep",
                cache::MAX_ASIDE_BODY
            ));
        }
        let lifetime = ttl_override(decision, policy, received)
            .unwrap_or_else(|| policy.time_to_live(received));
        let fresh_for_some_time = decision.immutable || !lifetime.is_zero();
        (!fresh_for_some_time)
            .then(|| "a response other than 200 without freshness is not kept".to_owned())
    }

    /// A revalidation of a response kept aside got another answer that is
    /// not stored: the old one is superseded and goes (a stored file in the
    /// tree stays, and so does anything when the answer is an error).
    async fn superseded(&self, job: &FillJob, status: StatusCode) -> Result<(), FetchError> {
        let Some((replica, _)) = &job.revalidate else {
            return Ok(());
        };
        if replica.meta.in_tree() || status.is_server_error() {
            return Ok(());
        }
        let k = job.key.clone();
        self.blocking(move |s| s.remove(&k)).await
    }

    /// Copies the body into the partial file, then verifies and commits it.
    async fn stream(
        &self,
        fill: &Fill,
        job: &FillJob,
        resp: Response<Incoming>,
        w: Writing,
    ) -> Result<(), FetchError> {
        let Writing {
            partial,
            head,
            start,
            mut url,
            mut meta,
            parts,
            content_address,
        } = w;
        let mut url_s = url.to_string();
        // A content-addressed URL names its digest, which wins over what
        // any source announces (unless the body is encoded: its bytes are
        // not the content's then).
        let announced = match content_address {
            Some(d) if !resp.headers().contains_key(header::CONTENT_ENCODING) => Some(d),
            _ => announced_sha256(resp.headers()),
        };
        let mut ends_at_close = close_delimited(&resp);
        let idle = job.settings.idle;
        let mut body = resp.into_body();
        let mut sink = BodySink {
            partial,
            batch: Vec::new(),
            batch_len: 0,
            written: start,
            // Hash while streaming; a resumed fill hashes the whole file at the end.
            hasher: (start == 0).then(Sha256::new),
            from_peer: is_peer(job, &url),
        };
        // The full length: announced by the head, or learnt from a resume's
        // `Content-Range`.
        let mut total = head.length;
        // The upstreams whose bytes are in this body, in order: the one
        // that answered, then each another mirror continued it on.
        let mut sources = vec![url.clone()];
        let mut resumes = 0u32;
        let mut orphan_since: Option<Instant> = None;
        let mut ended = false;
        // Where the last part asked for began: a part that brings nothing
        // ends the fill rather than asking forever.
        let mut part_from = start;
        while !ended {
            // Gather frames that are already there, up to one batch.
            let failure = loop {
                let next = if sink.batch.is_empty() {
                    match tokio::time::timeout(idle, body.frame()).await {
                        Ok(f) => f,
                        Err(_) => {
                            break Some(FetchError::Timeout {
                                url: url_s.clone(),
                                after: idle,
                            });
                        }
                    }
                } else {
                    match futures_util::FutureExt::now_or_never(body.frame()) {
                        Some(f) => f,
                        None => break None,
                    }
                };
                match next {
                    None => {
                        ended = true;
                        break None;
                    }
                    Some(Err(source)) => {
                        // Keep what arrived: it is a valid prefix for a resume.
                        self.flush(fill, &mut sink).await?;
                        break Some(FetchError::Body {
                            url: url_s.clone(),
                            written: sink.written,
                            source,
                        });
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            sink.batch_len += data.len();
                            sink.batch.push(data);
                            if sink.batch_len >= WRITE_BATCH {
                                break None;
                            }
                        }
                    }
                }
            };
            if let Some(error) = failure {
                // A body cut short or stalled counts against its mirror.
                job.upstreams
                    .report_url(&url, Outcome::BadBody(&error_chain(&error)));
                // The readers still waiting get the rest from a resume of
                // the partial; they only see a pause.
                let rest = self
                    .resume_body(
                        fill,
                        job,
                        &url,
                        &sink,
                        &mut total,
                        &mut resumes,
                        &error,
                        announced,
                    )
                    .await;
                match rest {
                    Some((resp, from)) => {
                        if from != url {
                            url_s = from.to_string();
                            sink.from_peer = is_peer(job, &from);
                            sources.push(from.clone());
                            url = from;
                        }
                        ends_at_close = close_delimited(&resp);
                        body = resp.into_body();
                        continue;
                    }
                    None => return Err(error),
                }
            }
            if let Some(bw) = job.settings.limits.download() {
                bw.acquire(sink.batch_len).await;
            }
            self.flush(fill, &mut sink).await?;
            let written = sink.written;
            if let Some(total) = total
                && written > total
            {
                return Err(FetchError::Length {
                    url: url_s,
                    written,
                    expected: total,
                });
            }
            // Whether the fill has been without readers for orphan-fill, or
            // is not worth finishing at all, is decided here, after each
            // write, on the engine's clock. No timer is needed: with no
            // bytes coming the idle timeout ends the fill, and without
            // readers a failure is not resumed. Returning drops the upstream
            // body, which closes its connection.
            if fill.readers() == 0 {
                let now = self.clock.monotonic();
                let since = *orphan_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= job.settings.orphan {
                    self.metrics.orphan_stopped(false);
                    return Err(FetchError::Orphaned {
                        url: url_s,
                        after: job.settings.orphan,
                    });
                }
                if !job.background && !worth_finishing(job.settings.orphan_rules, written, total) {
                    self.metrics.orphan_stopped(true);
                    return Err(FetchError::Abandoned {
                        url: url_s,
                        written,
                        total: total
                            .map_or_else(|| "an unknown number of".to_owned(), |t| t.to_string()),
                    });
                }
            } else {
                orphan_since = None;
            }
            if ended
                && parts
                && let Some(total) = total
                && written < total
                && written > part_from
            {
                part_from = written;
                let resp = self.next_part(job, &url, &sink, total).await?;
                ends_at_close = close_delimited(&resp);
                body = resp.into_body();
                ended = false;
            }
        }
        let BodySink {
            partial,
            written,
            hasher,
            from_peer,
            ..
        } = sink;
        if let Some(total) = total
            && written != total
        {
            let error = FetchError::Length {
                url: url_s,
                written,
                expected: total,
            };
            self.bad_body(job, &sources, start, &error);
            return Err(error);
        }
        if meta.status != 200 && written > cache::MAX_ASIDE_BODY {
            // Its length was not announced, so this shows only now: served
            // to the readers, not kept aside.
            tracing::info!(target: "cistern::fetch", key = %job.key, url = %url_s, status = meta.status, bytes = written,
                "not stored: the body of a response kept aside may be up to {} bytes", cache::MAX_ASIDE_BODY);
            self.metrics.store_refusal();
            drop(partial);
            let k = job.key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            fill.state.send_replace(FillState::Unverified {
                head,
                length: written,
            });
            return Ok(());
        }
        if from_peer
            && job
                .settings
                .fleet
                .as_ref()
                .is_some_and(|f| !f.stores_peer_fills())
        {
            // `store-on "owner"`: the owner keeps the file; this node
            // served it through and asks the owner again next time.
            drop(partial);
            let k = job.key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            fill.state.send_replace(FillState::Unverified {
                head,
                length: written,
            });
            return Ok(());
        }
        if ends_at_close && announced.is_none() {
            // A FIN ends such a body whether it is complete or cut: served to
            // the readers, never kept as a complete replica.
            tracing::warn!(target: "cistern::fetch", key = %job.key, url = %url_s, bytes = written,
                "not stored: the body ended with the upstream connection (no Content-Length, \
                 no chunked encoding) and no Repr-Digest or Digest proves it complete");
            self.metrics.store_refusal();
            drop(partial);
            let k = job.key.clone();
            self.blocking(move |s| s.discard_partial(&k)).await?;
            fill.state.send_replace(FillState::Unverified {
                head,
                length: written,
            });
            return Ok(());
        }
        let digest: [u8; 32] = match hasher {
            Some(h) => h.finalize().into(),
            None => {
                let file = partial.file.clone();
                match tokio::task::spawn_blocking(move || hash_file(&file, written)).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        return Err(FetchError::Store(StoreError::Io {
                            op: "hash partial file",
                            path: partial.path.clone(),
                            source: e,
                        }));
                    }
                    Err(_) => return Err(FetchError::Vanished),
                }
            }
        };
        let actual = hex::encode(digest);
        if let Some(announced) = announced
            && announced != digest
        {
            let k = job.key.clone();
            // A corrupt body is useless for resuming too.
            let _ = self.blocking(move |s| s.discard_partial(&k)).await;
            let error = FetchError::DigestMismatch {
                url: url_s,
                announced: hex::encode(announced),
                actual,
            };
            self.bad_body(job, &sources, start, &error);
            return Err(error);
        }
        meta.length = written;
        meta.sha256 = actual;
        let replica = self.blocking(move |s| s.commit(partial, meta)).await?;
        job.upstreams.report_url(&url, Outcome::Delivered);
        tracing::debug!(target: "cistern::fetch", key = %job.key, bytes = written, elapsed = ?fill.started.elapsed(), "fill complete");
        fill.state
            .send_replace(FillState::Complete { head, replica });
        Ok(())
    }

    /// A body that arrived whole but wrong (another length, or not the
    /// bytes its digest announced) counts against the mirrors it came from
    /// (`sources`), like a body cut short. When one mirror sent all of it
    /// (no splice in this fill, no partial from before, `start` 0) its copy
    /// of the file is bad: the next request for it goes to the next mirror.
    fn bad_body(&self, job: &FillJob, sources: &[Uri], start: u64, error: &FetchError) {
        let why = error_chain(error);
        tracing::warn!(target: "cistern::fetch", key = %job.key, mirrors = sources.len(),
            "a body failed its check: {why}");
        for url in sources {
            job.upstreams.report_url(url, Outcome::BadBody(&why));
        }
        if let [only] = sources
            && start == 0
        {
            job.upstreams.remember_bad_copy(only);
        }
    }

    /// Asks for the part of a body that follows the `sink.written` bytes
    /// of the parts so far (`Range` and `If-Range`, as a resume), for an
    /// upstream that answers with parts (a 206 it was not asked for).
    /// Only a 206 that provably continues the partial is used.
    async fn next_part(
        &self,
        job: &FillJob,
        url: &Uri,
        sink: &BodySink,
        total: u64,
    ) -> Result<Response<Incoming>, FetchError> {
        let written = sink.written;
        let mismatch = |why| FetchError::ResumeMismatch {
            url: url.to_string(),
            written,
            why,
        };
        let (range, if_range) = resume_headers(&sink.partial.meta, written)
            .ok_or_else(|| mismatch("the parts carry no strong validator to join them by"))?;
        let mut headers = job.headers.clone();
        headers.insert(header::RANGE, range);
        headers.insert(header::IF_RANGE, if_range);
        let mut req = build_request(Method::GET, url, &headers, empty_body());
        if let Some(host) = job.upstreams.host() {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        tracing::debug!(target: "cistern::fetch", key = %job.key, %url, from = written, total, "asking for the next part");
        let resp = self.send(req, url, job.settings.idle).await?;
        continues(&resp, written, Some(total), &sink.partial.meta).map_err(mismatch)?;
        Ok(resp)
    }

    /// After `error` cut a fill's body, asks the same upstream URL for the
    /// rest of it (`Range` from the bytes written, `If-Range` with the
    /// partial's strong validator), up to [`RESUME_ATTEMPTS`] times per
    /// fill. On a mirror set whose partial is provably identifiable (a
    /// known length, and a strong ETag or the SHA-256 the first answer
    /// announced, `announced`) the other mirrors are asked first, at once,
    /// and the one that failed last after a pause; otherwise only the same
    /// upstream, pausing a little longer each time. Only a `206` that
    /// provably continues the partial is used (same start, same total, and
    /// the same file: see [`proves_same_file`]); otherwise `None` and the
    /// fill fails with `error` (its readers have only bytes of one
    /// version), keeping its partial for a later request, which starts
    /// over if the file changed. Returns the answer and the URL it came
    /// from.
    ///
    /// Real mirrors rarely share ETags (each one's web server makes its
    /// own from mtime and size), so with a digest another mirror is asked
    /// for the `Range` without `If-Range` (its `If-Range` would only turn
    /// the answer into a whole 200), its 206 must announce that same
    /// digest, and the SHA-256 of the spliced file is checked against it
    /// before the commit: a mirror that lies fails the transfer, nothing
    /// is committed.
    #[allow(clippy::too_many_arguments)]
    async fn resume_body(
        &self,
        fill: &Fill,
        job: &FillJob,
        url: &Uri,
        sink: &BodySink,
        total: &mut Option<u64>,
        resumes: &mut u32,
        error: &FetchError,
        announced: Option<[u8; 32]>,
    ) -> Option<(Response<Incoming>, Uri)> {
        let key = &job.key;
        let written = sink.written;
        let give_up = |why: &str| {
            tracing::info!(target: "cistern::fetch", %key, %url, written, "not resuming: {why}");
            None
        };
        if error.retry() == RetryType::Final {
            return give_up("the failure is not one a retry can help");
        }
        if fill.readers() == 0 {
            return give_up("no client is waiting; the partial is kept for the next one");
        }
        if written == 0 {
            return give_up("nothing arrived to resume from; the next request starts over");
        }
        let validators = resume_headers(&sink.partial.meta, written);
        // A digest proves identity only with the length to check it by.
        let digest = announced.filter(|_| total.is_some());
        if validators.is_none() && digest.is_none() {
            return give_up(
                "the upstream sent no strong validator and no digest, so a resume could splice two versions",
            );
        }
        let Ok(range) = HeaderValue::from_str(&format!("bytes={written}-")) else {
            return give_up("no Range header for the offset");
        };
        // Another mirror's bytes are spliced on only when its copy is
        // provably the same file: the same length and strong ETag, or the
        // same length and announced SHA-256.
        let strong_etag = sink
            .partial
            .meta
            .etag
            .as_deref()
            .filter(|e| !e.starts_with("W/"));
        let mut targets = job.upstreams.resume_targets(
            url,
            total.is_some() && (strong_etag.is_some() || digest.is_some()),
        );
        if let super::Upstreams::Single(upstream) = &job.upstreams
            && is_peer(job, url)
        {
            // A peer that died mid-body: the forward proxy's upstream has
            // the same URL's bytes, joined on only when they are provably
            // the same file (as for another mirror, below); a mirror set's
            // upstreams are in `targets` already.
            targets.insert(0, upstream.clone());
        }
        let mut next = 0usize;
        while *resumes < RESUME_ATTEMPTS {
            *resumes += 1;
            let target = &targets[next % targets.len()];
            next += 1;
            let elsewhere = target != url;
            // Another server can be asked at once; the one that just
            // failed gets a moment.
            if !elsewhere {
                tokio::time::sleep(RESUME_PAUSE * *resumes).await;
            }
            tracing::info!(target: "cistern::fetch", %key, url = %target, from = written, attempt = *resumes,
                "resuming after {}: {}", error.kind().as_str(), error_chain(error));
            let mut headers = job.headers.clone();
            headers.insert(header::RANGE, range.clone());
            // Another mirror's validators are its own: with a digest to
            // prove the file by, its If-Range would only fail.
            if let Some((_, if_range)) = &validators
                && !(elsewhere && digest.is_some())
            {
                headers.insert(header::IF_RANGE, if_range.clone());
            }
            let mut req = build_request(Method::GET, target, &headers, empty_body());
            if let Some(host) = job.upstreams.host() {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            let resp = match self.send(req, target, job.settings.idle).await {
                Ok(resp) => resp,
                Err(e) if elsewhere || e.retry() == RetryType::Retryable => {
                    tracing::info!(target: "cistern::fetch", %key, url = %target, "resume failed: {}", error_chain(&e));
                    job.upstreams
                        .report_url(target, Outcome::Failed(&error_chain(&e)));
                    continue;
                }
                Err(e) => return give_up(&error_chain(&e)),
            };
            let spliced = continues_range(&resp, written, *total).and_then(|a| {
                proves_same_file(
                    resp.headers(),
                    &sink.partial.meta,
                    strong_etag,
                    digest,
                    elsewhere,
                )
                .map(|by| (a, by))
            });
            match spliced {
                Ok((announced_total, by)) => {
                    *total = total.or(announced_total);
                    if elsewhere {
                        tracing::info!(target: "cistern::fetch", %key, from = %url, to = %target, written,
                            proof = by.as_str(), "the fill continues on another mirror");
                    }
                    return Some((resp, target.clone()));
                }
                // That mirror has another version: try the next.
                Err(why) if elsewhere => {
                    tracing::info!(target: "cistern::fetch", %key, url = %target, "not resuming there: {why}");
                }
                Err(why) => return give_up(why),
            }
        }
        give_up(&format!(
            "{RESUME_ATTEMPTS} resumes did not finish the body"
        ))
    }
}

/// Whether a 206 that was not asked for is the start of the whole
/// representation that the store can take as a partial from byte 0: its
/// `Content-Range` starts at 0 and names the full length, and either it
/// is the whole or a strong validator lets the rest be joined to it.
/// Whether `url` is a peer request of the job's fleet (for the byte
/// counters).
fn is_peer(job: &FillJob, url: &Uri) -> bool {
    job.settings
        .fleet
        .as_ref()
        .is_some_and(|f| f.is_peer_url(url))
}

fn first_part(headers: &HeaderMap) -> bool {
    let Some(range) = headers.typed_get::<headers::ContentRange>() else {
        return false;
    };
    let (Some((0, end)), Some(total)) = (range.bytes_range(), range.bytes_len()) else {
        return false;
    };
    let strong = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|e| !e.starts_with("W/"))
        || headers.contains_key(header::LAST_MODIFIED);
    end + 1 == total || (end + 1 < total && strong)
}

/// The time to live a policy set or capped, if it did.
fn ttl_override(
    decision: &HeadDecision,
    policy: &http_cache_semantics::CachePolicy,
    received: SystemTime,
) -> Option<Duration> {
    match (decision.ttl, decision.ttl_cap) {
        (Some(ttl), cap) => Some(cap.map_or(ttl, |c| ttl.min(c))),
        (None, Some(cap)) => Some(policy.time_to_live(received).min(cap)),
        (None, None) => None,
    }
}

/// Whether a fill with no reader left, `written` bytes into a body of
/// `total`, goes on (Squid's `quick_abort`): when at most `finish_left`
/// bytes are left, or at least `finish_done_pct` percent are in. A body of
/// unknown length is finished only under `"0%"`, which finishes every
/// orphan: nothing says how much is left.
fn worth_finishing(rules: crate::config::OrphanRules, written: u64, total: Option<u64>) -> bool {
    if rules.finish_done_pct == 0 {
        return true;
    }
    let Some(total) = total else {
        return false;
    };
    let left = total.saturating_sub(written);
    // In u128: a percentage of a body near u64::MAX must not overflow.
    left <= rules.finish_left
        || u128::from(written) * 100 >= u128::from(total) * u128::from(rules.finish_done_pct)
}

/// Whether `resp` continues a partial of `written` bytes: a `206` starting
/// exactly there, for the same total, with the same validator. Returns the
/// total it announces.
fn continues<B>(
    resp: &Response<B>,
    written: u64,
    total: Option<u64>,
    meta: &PartialMeta,
) -> Result<Option<u64>, &'static str> {
    let announced = continues_range(resp, written, total)?;
    same_validators(resp.headers(), meta)?;
    Ok(announced)
}

/// Whether `resp` is a `206` for the bytes after the `written` of a
/// partial: starting exactly there, for the same total, its length what
/// its `Content-Range` says. Returns the total it announces.
fn continues_range<B>(
    resp: &Response<B>,
    written: u64,
    total: Option<u64>,
) -> Result<Option<u64>, &'static str> {
    if resp.status() == StatusCode::OK {
        return Err("the upstream's copy changed (it answered the resume with a whole 200)");
    }
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        return Err("the upstream did not answer the resume with 206 Partial Content");
    }
    if content_range_start(resp.headers()) != Some(written) {
        return Err("the upstream's 206 starts at another byte than the partial ends");
    }
    let announced = content_range_total(resp.headers());
    if total.is_some() && announced != total {
        return Err("the upstream's 206 is for another length than the first answer");
    }
    let range = resp
        .headers()
        .typed_get::<headers::ContentRange>()
        .and_then(|r| r.bytes_range());
    if let (Some((start, end)), Some(len)) = (range, content_length(resp.headers()))
        && end.checked_add(1).and_then(|e| e.checked_sub(start)) != Some(len)
    {
        return Err("the upstream's 206 is not as long as its Content-Range says");
    }
    Ok(announced)
}

/// Whether a 206's `ETag` and `Last-Modified` are the partial's where both
/// name one.
fn same_validators(headers: &HeaderMap, meta: &PartialMeta) -> Result<(), &'static str> {
    let same = |name: header::HeaderName, ours: &Option<String>| match (
        ours,
        headers.get(name).and_then(|v| v.to_str().ok()),
    ) {
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => true,
    };
    if !same(header::ETAG, &meta.etag) || !same(header::LAST_MODIFIED, &meta.last_modified) {
        return Err("the upstream's 206 carries another validator than the partial");
    }
    Ok(())
}

/// What proved a resume's 206 to be of the partial's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Its validators are the partial's (and from another mirror, its
    /// strong ETag).
    Validator,
    /// It announces the SHA-256 the fill's first answer announced; the
    /// whole is checked against it before the commit.
    Digest,
}

impl Proof {
    fn as_str(self) -> &'static str {
        match self {
            Proof::Validator => "validator",
            Proof::Digest => "digest",
        }
    }
}

/// Whether the head of a resume's 206 (`headers`) proves it is of the
/// partial's file: when the fill knows the SHA-256 of the whole (`digest`)
/// and the 206 announces one, they must be the same, whatever the ETags
/// (each mirror has its own); otherwise the validators must be the
/// partial's, and from another mirror (`elsewhere`) carry its strong ETag
/// (`strong_etag`). A 206 that nothing proves is refused.
fn proves_same_file(
    headers: &HeaderMap,
    meta: &PartialMeta,
    strong_etag: Option<&str>,
    digest: Option<[u8; 32]>,
    elsewhere: bool,
) -> Result<Proof, &'static str> {
    if let (Some(ours), Some(theirs)) = (digest, announced_sha256(headers)) {
        return if ours == theirs {
            Ok(Proof::Digest)
        } else {
            Err("the upstream's 206 announces another SHA-256 than the fill's first answer")
        };
    }
    same_validators(headers, meta)?;
    let theirs = headers.get(header::ETAG).and_then(|v| v.to_str().ok());
    if elsewhere {
        if strong_etag.is_none() || theirs != strong_etag {
            return Err(
                "another mirror's 206 carries neither the partial's strong ETag nor its SHA-256",
            );
        }
    } else if strong_etag.is_none() && meta.last_modified.is_none() {
        return Err("nothing proves the 206 is of the same file: no validator, no digest");
    }
    Ok(Proof::Validator)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_orphan_is_finished_when_little_is_left_or_most_is_in() {
        use crate::config::OrphanRules;
        let by_size = OrphanRules {
            finish_left: 100,
            finish_done_pct: 100,
        };
        assert!(
            worth_finishing(by_size, 9_900, Some(10_000)),
            "100 bytes left"
        );
        assert!(!worth_finishing(by_size, 9_899, Some(10_000)));
        let by_share = OrphanRules {
            finish_left: 0,
            finish_done_pct: 90,
        };
        assert!(worth_finishing(by_share, 900, Some(1000)), "90 % in");
        assert!(!worth_finishing(by_share, 899, Some(1000)));
        assert!(!worth_finishing(by_share, 10, None), "unknown length");
        let all = OrphanRules {
            finish_left: 0,
            finish_done_pct: 0,
        };
        assert!(worth_finishing(all, 0, None), "0% finishes every orphan");
        assert!(worth_finishing(all, 0, Some(u64::MAX)));
        let none_by_size = OrphanRules {
            finish_left: 0,
            finish_done_pct: 100,
        };
        assert!(!worth_finishing(none_by_size, u64::MAX - 1, Some(u64::MAX)));
    }

    #[test]
    fn only_a_206_that_continues_the_partial_is_spliced() {
        let meta = PartialMeta {
            key: "k".into(),
            url: "u".into(),
            total_length: Some(10),
            etag: Some("\"v1\"".into()),
            last_modified: None,
            started_at: 0,
        };
        let resp = |status: u16, range: &str, etag: &str| {
            let mut b = Response::builder().status(status);
            if !range.is_empty() {
                b = b.header(header::CONTENT_RANGE, range);
            }
            if !etag.is_empty() {
                b = b.header(header::ETAG, etag);
            }
            b.body(()).unwrap()
        };
        let ok = resp(206, "bytes 4-9/10", "\"v1\"");
        assert_eq!(continues(&ok, 4, Some(10), &meta), Ok(Some(10)));
        assert_eq!(continues(&ok, 4, None, &meta), Ok(Some(10)));
        for bad in [
            resp(200, "", "\"v2\""),
            resp(206, "bytes 0-9/10", "\"v1\""),
            resp(206, "bytes 4-10/11", "\"v1\""),
            resp(206, "bytes 4-9/10", "\"v2\""),
            resp(416, "", ""),
        ] {
            assert!(continues(&bad, 4, Some(10), &meta).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn another_mirrors_206_is_spliced_by_strong_etag_or_by_the_same_digest() {
        use base64::Engine as _;
        let meta = PartialMeta {
            key: "k".into(),
            url: "u".into(),
            total_length: Some(10),
            etag: Some("\"a-1\"".into()),
            last_modified: Some("Wed, 01 Jan 2020 00:00:00 GMT".into()),
            started_at: 0,
        };
        let ours = [7u8; 32];
        let b64 = |d: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(d);
        let head = |pairs: &[(&str, String)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let strong = Some("\"a-1\"");
        let repr = |d| ("repr-digest", format!("sha-256=:{}:", b64(d)));
        // Its own ETag and date, the same digest: the same file.
        let theirs = head(&[
            ("etag", "\"b-9\"".into()),
            ("last-modified", "Thu, 02 Jan 2020 00:00:00 GMT".into()),
            repr(ours),
        ]);
        assert_eq!(
            proves_same_file(&theirs, &meta, strong, Some(ours), true),
            Ok(Proof::Digest)
        );
        let legacy = head(&[("digest", format!("SHA-256={}", b64(ours)))]);
        assert_eq!(
            proves_same_file(&legacy, &meta, None, Some(ours), true),
            Ok(Proof::Digest)
        );
        // Another digest, even under the same ETag: refused.
        let other = head(&[("etag", "\"a-1\"".into()), repr([8u8; 32])]);
        assert!(proves_same_file(&other, &meta, strong, Some(ours), true).is_err());
        // No digest on either side: the strong ETag decides, as before.
        let same_etag = head(&[("etag", "\"a-1\"".into())]);
        assert_eq!(
            proves_same_file(&same_etag, &meta, strong, None, true),
            Ok(Proof::Validator)
        );
        assert!(proves_same_file(&theirs, &meta, strong, None, true).is_err());
        assert!(proves_same_file(&head(&[]), &meta, strong, None, true).is_err());
        // The same mirror without any validator: only a digest proves it.
        let bare = PartialMeta {
            etag: None,
            last_modified: None,
            ..meta.clone()
        };
        assert!(proves_same_file(&head(&[]), &bare, None, Some(ours), false).is_err());
        assert_eq!(
            proves_same_file(&head(&[repr(ours)]), &bare, None, Some(ours), false),
            Ok(Proof::Digest)
        );
        // The 206's own length must be what its Content-Range says.
        let part = |range: &str, cl: &str| {
            Response::builder()
                .status(206)
                .header(header::CONTENT_RANGE, range)
                .header(header::CONTENT_LENGTH, cl)
                .body(())
                .unwrap()
        };
        assert_eq!(
            continues_range(&part("bytes 4-9/10", "6"), 4, Some(10)),
            Ok(Some(10))
        );
        assert!(continues_range(&part("bytes 4-9/10", "10"), 4, Some(10)).is_err());
        // A CDN's next part need not reach the end.
        assert_eq!(
            continues_range(&part("bytes 4-6/10", "3"), 4, Some(10)),
            Ok(Some(10))
        );
    }

    #[test]
    fn an_unasked_206_is_taken_only_when_it_starts_the_whole() {
        let head = |range: &str, etag: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_RANGE, range.parse().unwrap());
            if let Some(e) = etag {
                h.insert(header::ETAG, e.parse().unwrap());
            }
            h
        };
        assert!(first_part(&head("bytes 0-9/10", None)), "the whole");
        assert!(first_part(&head("bytes 0-3/10", Some("\"v1\""))));
        assert!(!first_part(&head("bytes 0-3/10", None)), "no validator");
        assert!(!first_part(&head("bytes 0-3/10", Some("W/\"v1\""))), "weak");
        assert!(
            !first_part(&head("bytes 4-9/10", Some("\"v1\""))),
            "not from 0"
        );
        assert!(
            !first_part(&head("bytes 0-3/*", Some("\"v1\""))),
            "no total"
        );
        assert!(!first_part(&HeaderMap::new()));
    }
}
