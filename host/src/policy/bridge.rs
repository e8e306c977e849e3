//! The proxy's side of the seam: the engines a guest may question
//! ([`PolicyHost`] over the replica store, the fills in progress and the
//! named limiters) and the response hook the fetch engine calls.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, StatusCode, header};

use bytes::Bytes;

use super::{
    BodyOutcome, LimitVerdict, PolicyChain, PolicyHost, ReplicaState, RequestView,
    ResponseDecision, ResponseView,
};
use crate::fetch::{BodyRewrite, FetchEngine, HeadDecision, HeadHook};
use crate::limit::Limits;
use crate::store::CacheKey;

/// [`PolicyHost`] over the live store and one snapshot's limiters.
pub struct ProxyPolicyHost {
    engine: FetchEngine,
    limits: Arc<Limits>,
}

impl ProxyPolicyHost {
    /// A host answering from `engine`'s store and fills and from `limits`.
    pub fn new(engine: FetchEngine, limits: Arc<Limits>) -> ProxyPolicyHost {
        ProxyPolicyHost { engine, limits }
    }
}

impl PolicyHost for ProxyPolicyHost {
    fn replica_state(&self, key: &str) -> ReplicaState {
        let Ok(key) = CacheKey::parse(key) else {
            return ReplicaState::Absent;
        };
        let store = self.engine.store();
        // A stored 404 or redirect (kept aside) is not the resource.
        if store.peek(&key).is_some_and(|r| r.meta.in_tree()) {
            ReplicaState::Complete
        } else if self.engine.find(&key).is_some() || store.has_partial(&key) {
            // A fill under way, or an interrupted partial on disk (a cut
            // download, a crash) that a later fill resumes (ABI.md §11).
            // Both answers come from memory: a hook holds its worker.
            ReplicaState::Partial
        } else {
            ReplicaState::Absent
        }
    }

    fn url_by_sha256(&self, digest: &[u8; 32]) -> Option<String> {
        // The key is an absolute URL that, asked through Cistern, is a hit.
        self.engine
            .store()
            .by_sha256(digest)
            .map(|r| r.meta.key.clone())
    }

    fn limiter_check(&self, limiter: &str, key: &str) -> Option<LimitVerdict> {
        self.limits.check_named(limiter, key).map(|r| match r {
            Ok(()) => LimitVerdict::Allow,
            Err(retry) => LimitVerdict::Deny {
                retry_after: retry.0,
            },
        })
    }
}

/// Runs a chain's `on_response` on an upstream response head, for the
/// request that started the fetch.
pub struct PolicyHook {
    chain: PolicyChain,
    host: Arc<dyn PolicyHost>,
    /// The request as the chain left it; taken out for the call and put
    /// back after it (the lock is never held across the wait).
    request: Mutex<RequestView>,
}

impl PolicyHook {
    /// A hook running `chain` with `request`.
    pub fn new(chain: PolicyChain, host: Arc<dyn PolicyHost>, request: RequestView) -> PolicyHook {
        PolicyHook {
            chain,
            host,
            request: Mutex::new(request),
        }
    }

    async fn decide(&self, status: StatusCode, headers: &mut HeaderMap) -> HeadDecision {
        // The body that follows is the upstream's, unchanged: its length is
        // kept as the upstream sent it, whatever a policy does, so a client
        // is never told a length the body lacks.
        let length = headers.get(header::CONTENT_LENGTH).cloned();
        // So is its framing: the fill tells a chunked body from one that
        // ends with the connection by this header, and a chunked body read
        // as close-delimited is never stored.
        let framing: Vec<_> = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .cloned()
            .collect();
        let response = ResponseView {
            status,
            headers: std::mem::take(headers),
        };
        let request = std::mem::take(&mut *self.request.lock().unwrap_or_else(|p| p.into_inner()));
        let (request, response, decision): (_, _, ResponseDecision) = self
            .chain
            .run_on_response(&self.host, request, response)
            .await;
        *self.request.lock().unwrap_or_else(|p| p.into_inner()) = request;
        *headers = response.headers;
        // Transfer-Encoding is hop-by-hop: a policy's edit of it means
        // nothing; the upstream's stays, as without policies.
        headers.remove(header::TRANSFER_ENCODING);
        for value in framing {
            headers.append(header::TRANSFER_ENCODING, value);
        }
        match length {
            Some(len) => headers.insert(header::CONTENT_LENGTH, len),
            None => headers.remove(header::CONTENT_LENGTH),
        };
        HeadDecision {
            uncacheable: decision.uncacheable,
            immutable: decision.immutable,
            ttl: decision.ttl,
            ttl_cap: decision.ttl_cap,
            deny: decision.deny,
            rewritten: false,
        }
    }

    async fn rewrite(&self, status: StatusCode, headers: &HeaderMap, body: Bytes) -> BodyRewrite {
        let response = ResponseView {
            status,
            headers: headers.clone(),
        };
        let request = std::mem::take(&mut *self.request.lock().unwrap_or_else(|p| p.into_inner()));
        let (request, outcome) = self
            .chain
            .run_on_body(&self.host, request, response, body)
            .await;
        *self.request.lock().unwrap_or_else(|p| p.into_inner()) = request;
        match outcome {
            BodyOutcome::Unchanged => BodyRewrite::Unchanged,
            BodyOutcome::Replaced(body) => BodyRewrite::Replaced(body),
            BodyOutcome::Deny => BodyRewrite::Deny,
        }
    }
}

impl HeadHook for PolicyHook {
    fn on_head<'a>(
        &'a self,
        status: StatusCode,
        headers: &'a mut HeaderMap,
    ) -> Pin<Box<dyn Future<Output = HeadDecision> + Send + 'a>> {
        Box::pin(self.decide(status, headers))
    }

    fn wants_bodies(&self) -> bool {
        self.chain.has_on_body()
    }

    fn body_limit(&self, status: StatusCode, headers: &HeaderMap) -> Option<u64> {
        // Only a whole 200 is a document to rewrite; a redirect or an error
        // page is stored (or not) as it came.
        if status != StatusCode::OK || !self.chain.has_on_body() {
            return None;
        }
        let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
        self.chain.body_limit(content_type)
    }

    fn on_body<'a>(
        &'a self,
        status: StatusCode,
        headers: &'a HeaderMap,
        body: Bytes,
    ) -> Pin<Box<dyn Future<Output = BodyRewrite> + Send + 'a>> {
        Box::pin(self.rewrite(status, headers, body))
    }
}
