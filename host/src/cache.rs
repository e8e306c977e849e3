//! The RFC 9111 rules: may a response be stored, is a stored one fresh for
//! this request, and what a 304 does to it.
//!
//! The rules themselves come from `http-cache-semantics` (shared-cache mode),
//! a maintained port of the widely used JavaScript library of the same name:
//! `no-store`, `private`, `Authorization`, `s-maxage`/`max-age`/`Expires`,
//! the heuristic, `Vary`, `no-cache`, `must-revalidate` and the request's own
//! directives are all its job. This module adds what is Cistern's: static
//! and offline modes, policy overrides (immutable, TTL), and the key under
//! which several URLs share one replica.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy, RequestLike};

use crate::config::{CacheMode, StaleRules};
use crate::store::ObjectMeta;
use crate::store::meta::{RfcInputs, STATUSES_THE_RULES_KNOW, status_for_rules};
use crate::store::meta::{from_unix_secs, unix_secs};

/// A request as the cache rules see it: its URI is the cache key, so that
/// mirrors and store-ids that share a replica also share its policy.
#[derive(Debug, Clone, Copy)]
pub struct CacheRequest<'a> {
    /// The cache key as a URI.
    pub key: &'a Uri,
    /// The client's method.
    pub method: &'a Method,
    /// The client's headers.
    pub headers: &'a HeaderMap,
}

impl RequestLike for CacheRequest<'_> {
    fn uri(&self) -> Uri {
        self.key.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        self.key == other
    }
    fn method(&self) -> &Method {
        self.method
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// What the cache can do for a request with a stored replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Serve the replica as is.
    Fresh,
    /// Ask the upstream first, with these validators (may be empty: then a
    /// full fetch).
    Stale(HeaderMap),
    /// The replica is another variant (Vary) or otherwise unusable for
    /// this request: fetch without touching it.
    Mismatch,
}

/// The shared-cache options Cistern uses everywhere.
pub fn options() -> CacheOptions {
    crate::store::meta::cache_options()
}

/// The RFC 9111 state for a fresh upstream response. A request that
/// carried `Authorization` makes it storable only when the response allows
/// a shared cache to (`public`, `s-maxage`, `must-revalidate`: RFC 9111
/// §3.5); the credentials themselves are not kept (see `kept_request`).
pub fn new_policy(
    req: CacheRequest<'_>,
    resp: &http::response::Parts,
    now: SystemTime,
) -> CachePolicy {
    let headers = kept_request(req.headers);
    let req = CacheRequest {
        headers: &headers,
        ..req
    };
    CachePolicy::new_options(&req, &for_rules(resp), now, options())
}

/// Cistern's own targeted field, as `targeted-field` names it: set at
/// start and by every reload ([`use_targeted_field`]). One per process,
/// like the cache it addresses; read with one atomic load.
static OWN_TARGETED: LazyLock<ArcSwap<HeaderName>> = LazyLock::new(|| {
    ArcSwap::from_pointee(HeaderName::from_static(
        crate::config::DEFAULT_TARGETED_FIELD,
    ))
});

/// The targeted field every CDN reads (RFC 9213).
const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Makes `name` Cistern's own targeted cache-control field for responses
/// from now on (`targeted-field` in config).
pub fn use_targeted_field(name: &HeaderName) {
    if **OWN_TARGETED.load() != *name {
        OWN_TARGETED.store(Arc::new(name.clone()));
    }
}

/// The response fields that steer Cistern in place of `Cache-Control`,
/// first match wins: our own targeted field, then the one every CDN reads
/// (RFC 9213). Never forwarded downstream: they address this cache only.
pub fn targeted_fields() -> [HeaderName; 2] {
    [(**OWN_TARGETED.load()).clone(), CDN_CACHE_CONTROL]
}

/// A response head as the RFC 9111 rules of `http-cache-semantics` should
/// read it. A correction layer rather than a fork: the crate is maintained
/// and its rules are right once its inputs are normalised, so a fork would
/// mean carrying its whole code for a few parsers. It corrects:
/// - hop-by-hop fields and those `Connection` names are dropped;
/// - a targeted field ([`targeted_fields`]) with a value replaces
///   `Cache-Control` and hides `Expires` (RFC 9213 §2.2);
/// - `Cache-Control` directive names are lowercased (RFC 9111 §5.2: they
///   are case-insensitive; the crate matches them exactly);
/// - `Age` keeps its first value; an invalid one is dropped, not 0 (§5.1);
/// - `Date`, `Expires` and `Last-Modified` in RFC 850 or asctime form are
///   rewritten as IMF-fixdate (the crate reads only RFC 2822 dates, so a
///   valid `Expires` was taken as already expired); an invalid `Expires`
///   stays invalid, which the crate rightly reads as expired (§5.3);
/// - a status the crate does not know is shown as one with the same
///   RFC 9111 rules ([`status_for_rules`]): the crate never stored a 503
///   or a 429, even with `max-age`.
pub fn for_rules(resp: &http::response::Parts) -> http::response::Parts {
    let mut out = http::Response::new(()).into_parts().0;
    out.status = status_for_rules(resp.status);
    out.version = resp.version;
    out.headers = corrected_headers(&resp.headers);
    out
}

/// The header half of [`for_rules`]. Idempotent, so stored inputs can be
/// corrected again after a 304 merged new fields into them.
fn corrected_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    let targeted = targeted_fields().iter().find_map(|name| {
        let joined = joined(&h, name.as_str());
        (!joined.trim().is_empty()).then_some(joined)
    });
    let cache_control = match targeted {
        Some(value) => {
            h.remove(header::EXPIRES);
            Some(value)
        }
        None => h
            .contains_key(header::CACHE_CONTROL)
            .then(|| joined(&h, header::CACHE_CONTROL.as_str())),
    };
    if let Some(cc) = cache_control {
        let lowered = cc
            .split(',')
            .map(|directive| match directive.split_once('=') {
                Some((name, value)) => format!("{}={value}", name.trim().to_ascii_lowercase()),
                None => directive.trim().to_ascii_lowercase(),
            })
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        match HeaderValue::from_str(&lowered) {
            Ok(v) => {
                h.insert(header::CACHE_CONTROL, v);
            }
            Err(_) => {
                h.remove(header::CACHE_CONTROL);
            }
        }
    }
    if h.contains_key(header::AGE) {
        let first = joined(&h, header::AGE.as_str())
            .split(',')
            .next()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        // Too many digits for u64 is still a valid age: it saturates.
        let secs = first.map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
        match secs.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            Some(v) => {
                h.insert(header::AGE, v);
            }
            None => {
                h.remove(header::AGE);
            }
        }
    }
    for name in [header::DATE, header::EXPIRES, header::LAST_MODIFIED] {
        let parsed = h
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok());
        if let Some(t) = parsed
            && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t))
        {
            h.insert(name, v);
        }
    }
    h
}

/// Every value of a field, joined with commas as RFC 9110 §5.3 allows.
fn joined(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The RFC 9111 inputs of an exchange, as a replica's metadata keeps them
/// (the policy is rebuilt from them when the store loads it). `asked` is
/// when the fetch began asking the upstream, `received` when the head came.
pub fn rfc_inputs(
    req: CacheRequest<'_>,
    resp: &http::response::Parts,
    asked: SystemTime,
    received: SystemTime,
) -> RfcInputs {
    RfcInputs::new(
        req.method.clone(),
        req.key.clone(),
        &kept_request(req.headers),
        resp.status,
        &corrected_headers(&resp.headers),
        asked,
        received,
    )
}

/// What the placeholder for a credential says in stored metadata.
const WITHHELD: HeaderValue = HeaderValue::from_static("[withheld]");

/// The request headers as the stored RFC 9111 state keeps them (it keeps
/// the request's headers, and the metadata is a file on disk): the values
/// of `Authorization` and `Proxy-Authorization` are replaced by a
/// placeholder. Their presence still counts for storability; a response
/// that varies on them never matches a later request, so is never served
/// from the replica, which is the safe way to fail. Borrows when there is
/// nothing to replace, the common case.
fn kept_request(headers: &HeaderMap) -> std::borrow::Cow<'_, HeaderMap> {
    let secret = crate::credentials::CREDENTIAL_HEADERS;
    if !secret.iter().any(|name| headers.contains_key(name)) {
        return std::borrow::Cow::Borrowed(headers);
    }
    let mut kept = headers.clone();
    for name in secret {
        if kept.contains_key(&name) {
            kept.insert(name, WITHHELD);
        }
    }
    std::borrow::Cow::Owned(kept)
}

/// Whether a response says it varies on everything (`Vary: *`): no later
/// request can ever match it (RFC 9111 §4.1), so storing it only costs a
/// second fetch.
pub fn varies_on_everything(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*")
}

/// Whether a response may be stored: storable by RFC 9111 (§3: a final
/// status with explicit freshness, or heuristically cacheable by RFC 9110
/// §15.1, and nothing that forbids it). A 200 becomes a file in the tree,
/// any other status is kept aside ([`ObjectMeta::in_tree`]). Never stored
/// here: 206 (a part, not the response) and 304 (an answer about a stored
/// response, not one), and, with `must-understand` (§5.2.2.3), a status
/// whose rules Cistern does not implement in full.
pub fn storable(policy: &CachePolicy, status: StatusCode, headers: &HeaderMap) -> bool {
    if status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
        || !policy.is_storable()
    {
        return false;
    }
    if STATUSES_THE_RULES_KNOW.contains(&status.as_u16()) {
        return true;
    }
    // Rare: read the directives only for an unusual status.
    let rules = corrected_headers(headers);
    !rules
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim() == "must-understand")
}

/// The largest body of a response kept aside (not a 200) that is stored;
/// a bigger one is passed through unstored. Redirects, 404s and error
/// pages are small; this keeps the state directory small too.
pub const MAX_ASIDE_BODY: u64 = 64 * 1024;

/// Why a storable response of `status` is nevertheless not stored over
/// what the key holds now (`current`), or `None` when it may be:
/// - a file in the tree (a 200) is replaced only by another 200: a 404,
///   a redirect or an error for a package that was there goes to the
///   client, and the file stays (stale: the next request asks again), so
///   a mirror's passing 404 during a sync never costs a good file;
/// - an error (5xx) never replaces anything stored: the stale response
///   may still answer (`stale-if-error`) and is asked about again next.
pub fn kept_over(current: Option<&ObjectMeta>, status: StatusCode) -> Option<&'static str> {
    let current = current?;
    if current.in_tree() && status != StatusCode::OK {
        Some("a stored file is replaced only by a 200; the file is kept")
    } else if status.is_server_error() {
        Some("an error never replaces a stored response")
    } else {
        None
    }
}

/// The common case decided without building the full RFC 9111 answer: a
/// request with no cache directives of its own, for a stored response with
/// no `Vary`. `None` means "ask [`evaluate`]".
///
/// `fresh_until` caches when `meta`'s HTTP freshness ends: set from the
/// first answer that found it fresh (`now` plus its time to live, which
/// is the moment `is_stale` turns true while the clock runs forward); a
/// time before it is fresh without asking the policy again, and any other
/// is decided by the policy as before, so the answer never differs.
pub fn evaluate_fast(
    meta: &ObjectMeta,
    headers: &HeaderMap,
    now: SystemTime,
    mode: CacheMode,
    fresh_until: &std::sync::OnceLock<SystemTime>,
) -> Option<Freshness> {
    let mode = mode_for(meta, mode);
    if headers.contains_key(header::CACHE_CONTROL)
        || headers.contains_key(header::PRAGMA)
        || meta
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("vary"))
    {
        return None;
    }
    let fresh = match mode {
        CacheMode::Static | CacheMode::Offline => true,
        CacheMode::Normal if meta.immutable => true,
        CacheMode::Normal => match meta.ttl_override {
            Some(ttl) => now < from_unix_secs(meta.validated_at) + Duration::from_secs(ttl),
            None if fresh_until.get().is_some_and(|until| now < *until) => true,
            None => {
                let ttl = meta.policy.time_to_live(now);
                if !ttl.is_zero()
                    && let Some(until) = now.checked_add(ttl)
                {
                    let _ = fresh_until.set(until);
                }
                !ttl.is_zero()
            }
        },
    };
    // Stale: the full rules work out the validators.
    fresh.then_some(Freshness::Fresh)
}

/// Decides whether `meta` may answer `req` at `now`.
pub fn evaluate(
    meta: &ObjectMeta,
    req: CacheRequest<'_>,
    now: SystemTime,
    mode: CacheMode,
) -> Freshness {
    let mode = mode_for(meta, mode);
    let verdict = meta.policy.before_request(&req, now);
    let (fresh_by_rfc, matches, conditional) = match verdict {
        BeforeRequest::Fresh(_) => (true, true, HeaderMap::new()),
        BeforeRequest::Stale { request, matches } => {
            (false, matches, validators_only(&request.headers))
        }
    };
    if !matches {
        return Freshness::Mismatch;
    }
    let client_forbids_stored = no_cache_requested(req.headers);
    let fresh = match mode {
        // Static and offline serve whatever the replica holds.
        CacheMode::Static | CacheMode::Offline => true,
        CacheMode::Normal if client_forbids_stored => false,
        CacheMode::Normal if meta.immutable => true,
        CacheMode::Normal => match meta.ttl_override {
            Some(ttl) => now < from_unix_secs(meta.validated_at) + Duration::from_secs(ttl),
            None => fresh_by_rfc,
        },
    };
    if fresh {
        Freshness::Fresh
    } else if conditional.is_empty() {
        Freshness::Stale(validators(meta))
    } else {
        Freshness::Stale(conditional)
    }
}

/// The mode a stored response is judged in: `static` serves the tree's
/// files as they are, but a response kept aside (a 404, a redirect) keeps
/// its own freshness, or a file published after its 404 was stored would
/// never be fetched.
fn mode_for(meta: &ObjectMeta, mode: CacheMode) -> CacheMode {
    if mode == CacheMode::Static && !meta.in_tree() {
        CacheMode::Normal
    } else {
        mode
    }
}

/// What a stale replica may still be used for, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StaleUse {
    /// It may answer when the upstream fails (connect error, timeout, 5xx).
    pub if_error: bool,
    /// It may answer at once while a background fetch revalidates it.
    pub while_revalidate: bool,
}

/// How a stale replica may be used at `now` (RFC 5861, RFC 9111 §4.2.4).
///
/// The response's own `stale-if-error=N` / `stale-while-revalidate=N`
/// decide where it has them; otherwise `rules` (config) do, unless the
/// response forbids serving stale (`must-revalidate`, `proxy-revalidate`,
/// `no-cache`, `s-maxage`). `must-revalidate` and `proxy-revalidate` win
/// over everything. The windows count from the end of the freshness the
/// stored headers give explicitly (`max-age`, `Expires`), or a policy's
/// TTL; a response fresh only by heuristic counts from its last validation.
pub fn stale_use(meta: &ObjectMeta, now: SystemTime, rules: StaleRules) -> StaleUse {
    let mut forbid_defaults = false;
    let mut forbid_all = false;
    let mut if_error = None;
    let mut while_revalidate = None;
    let mut max_age = None;
    for directive in stored_cache_control(meta) {
        let (name, value) = match directive.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (directive, None),
        };
        let secs = || value.and_then(|v| v.parse::<u64>().ok());
        match name.to_ascii_lowercase().as_str() {
            "must-revalidate" | "proxy-revalidate" => forbid_all = true,
            "no-cache" | "s-maxage" => forbid_defaults = true,
            "stale-if-error" => if_error = secs().map(Duration::from_secs),
            "stale-while-revalidate" => while_revalidate = secs().map(Duration::from_secs),
            "max-age" => max_age = secs(),
            _ => {}
        }
    }
    if forbid_all {
        return StaleUse::default();
    }
    let (if_error, while_revalidate) = if forbid_defaults {
        (
            if_error.unwrap_or_default(),
            while_revalidate.unwrap_or_default(),
        )
    } else {
        (
            if_error.unwrap_or(rules.if_error),
            while_revalidate.unwrap_or(rules.while_revalidate),
        )
    };
    let lifetime = match meta.ttl_override {
        Some(ttl) => ttl,
        None => max_age
            .or_else(|| expires_lifetime(meta))
            .unwrap_or(0)
            .saturating_sub(
                stored_header(meta, "age")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
            ),
    };
    let stale_since = from_unix_secs(meta.validated_at) + Duration::from_secs(lifetime);
    let stale_for = now.duration_since(stale_since).unwrap_or_default();
    StaleUse {
        if_error: !if_error.is_zero() && stale_for <= if_error,
        while_revalidate: !while_revalidate.is_zero() && stale_for <= while_revalidate,
    }
}

/// The stored response's `Cache-Control` directives as the rules read
/// them (a targeted field in its place), trimmed.
fn stored_cache_control(meta: &ObjectMeta) -> impl Iterator<Item = &str> {
    meta.rfc
        .response_headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// A stored response header's first value.
fn stored_header<'m>(meta: &'m ObjectMeta, name: &str) -> Option<&'m str> {
    meta.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `Expires` minus `Date`, in seconds, when both are there and valid.
fn expires_lifetime(meta: &ObjectMeta) -> Option<u64> {
    let expires = httpdate::parse_http_date(stored_header(meta, "expires")?).ok()?;
    let date = httpdate::parse_http_date(stored_header(meta, "date")?).ok()?;
    Some(expires.duration_since(date).unwrap_or_default().as_secs())
}

/// The age to report for a replica at `now`.
pub fn age(meta: &ObjectMeta, now: SystemTime) -> Duration {
    meta.policy.age(now)
}

/// Applies an upstream's answer to a revalidation asked at `asked`.
/// `Some(updated metadata)` when it was a matching 304 (the replica is still
/// good), `None` when the body changed and must be fetched again: a 304
/// naming another validator than the stored one's.
pub fn revalidated(
    meta: &ObjectMeta,
    req: CacheRequest<'_>,
    resp: &http::response::Parts,
    asked: SystemTime,
    now: SystemTime,
) -> Option<ObjectMeta> {
    let headers = kept_request(req.headers);
    let req = CacheRequest {
        headers: &headers,
        ..req
    };
    // A 304 that repeats no validator selects the single stored response
    // (RFC 9111 §4.3.4): Cistern keeps one per key and asked with that
    // one's own validators. http-cache-semantics only selects it when the
    // stored response has no validator either, so the 304 it is shown
    // carries the stored ones.
    let bare;
    let resp = if resp.status == StatusCode::NOT_MODIFIED
        && !resp.headers.contains_key(header::ETAG)
        && !resp.headers.contains_key(header::LAST_MODIFIED)
    {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = resp.status;
        parts.version = resp.version;
        parts.headers = resp.headers.clone();
        for name in [header::ETAG, header::LAST_MODIFIED] {
            if let Some(v) = meta.rfc.response_headers.get(&name) {
                parts.headers.insert(name, v.clone());
            }
        }
        bare = parts;
        &bare
    } else {
        resp
    };
    match meta.policy.after_response(&req, &for_rules(resp), now) {
        AfterResponse::NotModified(..) => {
            let mut updated = meta.clone();
            // The served headers are merged from the stored ones as served,
            // not from the rules' corrected view the crate returns, which would hand
            // clients a targeted field's value as their `Cache-Control`.
            let served = meta.header_map();
            updated.headers = stored_headers(&updated_by_304(&served, &resp.headers));
            // The stored response updated by the 304 (RFC 9111 §4.3.4) is
            // the new input; the policy is rebuilt from it exactly as the
            // store will rebuild it after a restart.
            let mut stored = http::Response::new(()).into_parts().0;
            stored.status = meta.rfc.status;
            stored.headers = updated_by_304(&meta.rfc.response_headers, &resp.headers);
            updated.rfc = rfc_inputs(req, &stored, asked, now);
            updated.policy = updated.rfc.policy();
            updated.validated_at = unix_secs(now);
            Some(updated)
        }
        AfterResponse::Modified(..) => None,
    }
}

/// The stored response headers with the fields a 304 carries replacing
/// theirs (RFC 9111 §4.3.4), except those that describe the old body.
fn updated_by_304(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    const KEEP: [header::HeaderName; 4] = [
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONTENT_RANGE,
    ];
    let mut out = HeaderMap::with_capacity(stored.len());
    for name in stored.keys() {
        let source = if not_modified.contains_key(name) && !KEEP.contains(name) {
            not_modified
        } else {
            stored
        };
        for value in source.get_all(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The validators of a stored replica, as conditional request headers.
pub fn validators(meta: &ObjectMeta) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in &meta.headers {
        let target = if name.eq_ignore_ascii_case("etag") {
            header::IF_NONE_MATCH
        } else if name.eq_ignore_ascii_case("last-modified") {
            header::IF_MODIFIED_SINCE
        } else {
            continue;
        };
        if let Ok(v) = HeaderValue::from_str(value) {
            out.insert(target, v);
        }
    }
    out
}

fn validators_only(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        if let Some(v) = headers.get(&name) {
            out.insert(name, v.clone());
        }
    }
    out
}

/// `Cache-Control: no-cache` / `max-age=0` from the client, or
/// `Pragma: no-cache`: the client wants the upstream asked.
fn no_cache_requested(headers: &HeaderMap) -> bool {
    let cc = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for directive in cc {
        if directive.eq_ignore_ascii_case("no-cache") || directive.eq_ignore_ascii_case("max-age=0")
        {
            return true;
        }
    }
    headers
        .get(header::PRAGMA)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("no-cache"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and
/// are never forwarded or stored.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is a hop-by-hop header.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Removes hop-by-hop headers, including those listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The fields `Connection` names (RFC 9110 §7.6.1), lowercased; none in
/// the common case, which allocates nothing.
fn connection_named(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Removes the fields that address Cistern alone ([`targeted_fields`])
/// from a response passed to a client.
pub fn strip_targeted(headers: &mut HeaderMap) {
    for name in targeted_fields() {
        headers.remove(name);
    }
}

/// The headers kept in a replica's metadata: end-to-end headers (neither
/// hop-by-hop nor named by `Connection`) without `Set-Cookie` (never
/// shared between clients), the targeted fields (for Cistern only) and the
/// ones Cistern computes itself when serving.
pub fn stored_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let named = connection_named(headers);
    let targeted = targeted_fields();
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !is_hop_by_hop(n)
                && !named.iter().any(|c| c == n)
                && !targeted.contains(name)
                && !matches!(
                    n,
                    "set-cookie"
                        | "set-cookie2"
                        | "age"
                        | "content-length"
                        | "content-range"
                        | "via"
                )
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_for(resp_headers: &[(&str, &str)], now: SystemTime) -> ObjectMeta {
        meta_for_request(&HeaderMap::new(), resp_headers, now)
    }

    fn meta_for_request(
        req_headers: &HeaderMap,
        resp_headers: &[(&str, &str)],
        now: SystemTime,
    ) -> ObjectMeta {
        let key: Uri = "http://example.org:80/a".parse().unwrap();
        let req = CacheRequest {
            key: &key,
            method: &Method::GET,
            headers: req_headers,
        };
        let mut resp = http::Response::new(());
        for (k, v) in resp_headers {
            resp.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (parts, ()) = resp.into_parts();
        ObjectMeta {
            key: key.to_string(),
            url: key.to_string(),
            replica: "example.org:80/a".into(),
            status: 200,
            headers: stored_headers(&parts.headers),
            policy: new_policy(req, &parts, now),
            rfc: rfc_inputs(req, &parts, now, now),
            file: None,
            length: 0,
            sha256: String::new(),
            stored_at: unix_secs(now),
            validated_at: unix_secs(now),
            immutable: false,
            ttl_override: None,
        }
    }

    fn eval(meta: &ObjectMeta, headers: &HeaderMap, now: SystemTime, mode: CacheMode) -> Freshness {
        let key: Uri = meta.key.parse().unwrap();
        evaluate(
            meta,
            CacheRequest {
                key: &key,
                method: &Method::GET,
                headers,
            },
            now,
            mode,
        )
    }

    #[test]
    fn max_age_makes_fresh_then_stale_with_validators() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let meta = meta_for(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")], t0);
        let h = HeaderMap::new();
        assert_eq!(
            eval(&meta, &h, t0 + Duration::from_secs(30), CacheMode::Normal),
            Freshness::Fresh
        );
        match eval(&meta, &h, t0 + Duration::from_secs(61), CacheMode::Normal) {
            Freshness::Stale(v) => assert_eq!(v.get(header::IF_NONE_MATCH).unwrap(), "\"v1\""),
            other => panic!("expected stale, got {other:?}"),
        }
        // Static mode never revalidates.
        assert_eq!(
            eval(&meta, &h, t0 + Duration::from_secs(9999), CacheMode::Static),
            Freshness::Fresh
        );
    }

    #[test]
    fn vary_mismatch_is_never_served() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let meta = meta_for(
            &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
            t0,
        );
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(eval(&meta, &h, t0, CacheMode::Normal), Freshness::Mismatch);
    }

    #[test]
    fn private_and_no_store_are_not_storable() {
        let t0 = SystemTime::now();
        for cc in ["private", "no-store"] {
            let meta = meta_for(&[("cache-control", cc)], t0);
            assert!(
                !storable(&meta.policy, StatusCode::OK, &HeaderMap::new()),
                "{cc}"
            );
        }
        let meta = meta_for(&[("cache-control", "max-age=5")], t0);
        assert!(storable(&meta.policy, StatusCode::OK, &HeaderMap::new()));
    }

    #[test]
    fn authenticated_requests_are_shared_only_when_the_response_allows() {
        let t0 = SystemTime::now();
        let mut auth = HeaderMap::new();
        auth.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        // RFC 9111 §3.5: only these let a shared cache store it.
        for cc in [
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60, must-revalidate",
        ] {
            let meta = meta_for_request(&auth, &[("cache-control", cc)], t0);
            assert!(
                storable(&meta.policy, StatusCode::OK, &HeaderMap::new()),
                "{cc}"
            );
        }
        for cc in ["max-age=60", "private, max-age=60"] {
            let meta = meta_for_request(&auth, &[("cache-control", cc)], t0);
            assert!(
                !storable(&meta.policy, StatusCode::OK, &HeaderMap::new()),
                "{cc}"
            );
        }
        // Fresh by heuristic only: not shareable either.
        let meta = meta_for_request(
            &auth,
            &[("last-modified", "Wed, 01 Jan 2020 00:00:00 GMT")],
            t0,
        );
        assert!(!storable(&meta.policy, StatusCode::OK, &HeaderMap::new()));
    }

    #[test]
    fn stored_state_keeps_no_credentials() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut auth = HeaderMap::new();
        auth.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        let meta = meta_for_request(
            &auth,
            &[("cache-control", "public, max-age=60"), ("etag", "\"v1\"")],
            t0,
        );
        let json = String::from_utf8(crate::store::meta::encode_object(&meta).unwrap()).unwrap();
        assert!(!json.contains("YWxpY2U6czNjcmV0"), "{json}");
        assert_eq!(
            eval(&meta, &auth, t0, CacheMode::Normal),
            Freshness::Fresh,
            "a placeholder still serves a response that does not vary on it"
        );
        // A 304 for an authenticated revalidation keeps none either.
        let key: Uri = meta.key.parse().unwrap();
        let mut resp = http::Response::new(());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut()
            .insert(header::ETAG, "\"v1\"".parse().unwrap());
        let (parts, ()) = resp.into_parts();
        let req = CacheRequest {
            key: &key,
            method: &Method::GET,
            headers: &auth,
        };
        let later = t0 + Duration::from_secs(90);
        let updated = revalidated(&meta, req, &parts, later, later).unwrap();
        let json = String::from_utf8(crate::store::meta::encode_object(&updated).unwrap()).unwrap();
        assert!(!json.contains("YWxpY2U6czNjcmV0"), "{json}");
        // Varying on the credentials: never served from the replica.
        let meta = meta_for_request(
            &auth,
            &[
                ("cache-control", "public, max-age=60"),
                ("vary", "authorization"),
            ],
            t0,
        );
        let json = String::from_utf8(crate::store::meta::encode_object(&meta).unwrap()).unwrap();
        assert!(!json.contains("YWxpY2U6czNjcmV0"), "{json}");
        assert_eq!(
            eval(&meta, &auth, t0, CacheMode::Normal),
            Freshness::Mismatch
        );
    }

    #[test]
    fn set_cookie_is_never_stored() {
        let meta = meta_for(
            &[("set-cookie", "id=1"), ("content-type", "text/plain")],
            SystemTime::now(),
        );
        assert!(meta.headers.iter().all(|(k, _)| k != "set-cookie"));
        assert!(meta.headers.iter().any(|(k, _)| k == "content-type"));
    }

    #[test]
    fn a_304_updates_the_inputs_so_a_reload_keeps_the_new_freshness() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut meta = meta_for(
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"v1\""),
                ("content-length", "5"),
            ],
            t0,
        );
        meta.sha256 = "00".repeat(32);
        let key: Uri = meta.key.parse().unwrap();
        let h = HeaderMap::new();
        let req = CacheRequest {
            key: &key,
            method: &Method::GET,
            headers: &h,
        };
        let mut resp = http::Response::new(());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        for (k, v) in [
            ("cache-control", "max-age=600"),
            ("etag", "\"v1\""),
            ("content-length", "0"),
        ] {
            resp.headers_mut().insert(k, v.parse().unwrap());
        }
        let (parts, ()) = resp.into_parts();
        let t1 = t0 + Duration::from_secs(100);
        let updated = revalidated(&meta, req, &parts, t1, t1).expect("matching 304");
        assert_eq!(updated.policy.time_to_live(t1), Duration::from_secs(600));
        // The body's own length is kept from the stored response.
        assert_eq!(updated.rfc.response_headers["content-length"], "5");
        let bytes = crate::store::meta::encode_object(&updated).unwrap();
        let (reloaded, _) = crate::store::meta::decode_object(&bytes).unwrap();
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(
            reloaded.policy.time_to_live(t2),
            updated.policy.time_to_live(t2)
        );
        assert_eq!(reloaded.policy.age(t2), Duration::from_secs(30));
    }

    #[test]
    fn client_no_cache_forces_revalidation() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut meta = meta_for(&[("cache-control", "max-age=600"), ("etag", "\"x\"")], t0);
        meta.immutable = true;
        let mut h = HeaderMap::new();
        h.insert(header::CACHE_CONTROL, "no-cache".parse().unwrap());
        assert!(matches!(
            eval(&meta, &h, t0, CacheMode::Normal),
            Freshness::Stale(_)
        ));
    }

    /// 1994-11-06 08:49:37 UTC, the RFC 9110 example date.
    fn rfc_example_date() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn age_takes_its_first_value_and_an_invalid_one_is_ignored() {
        let t0 = rfc_example_date();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        let meta = meta_for(
            &[date, ("cache-control", "max-age=3600"), ("age", "7200, 0")],
            t0,
        );
        assert_eq!(meta.policy.age(t0), Duration::from_secs(7200));
        assert!(meta.policy.is_stale(t0), "older than its max-age already");
        for invalid in ["abc", "-5", ""] {
            let meta = meta_for(
                &[date, ("cache-control", "max-age=3600"), ("age", invalid)],
                t0,
            );
            assert_eq!(meta.policy.age(t0), Duration::ZERO, "{invalid:?}");
            assert!(!meta.policy.is_stale(t0), "{invalid:?}");
            assert!(!meta.rfc.response_headers.contains_key(header::AGE));
        }
    }

    #[test]
    fn cache_control_directive_names_are_case_insensitive() {
        let t0 = rfc_example_date();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        let meta = meta_for(&[date, ("cache-control", "MAX-AGE=60")], t0);
        assert_eq!(meta.policy.time_to_live(t0), Duration::from_secs(60));
        let meta = meta_for(&[date, ("cache-control", "max-age=600, No-CaChE")], t0);
        assert!(meta.policy.is_stale(t0), "no-cache: never fresh");
        let meta = meta_for(&[date, ("cache-control", "No-Store")], t0);
        assert!(!storable(&meta.policy, StatusCode::OK, &HeaderMap::new()));
    }

    #[test]
    fn expires_in_every_http_date_format_and_an_invalid_one_is_expired() {
        let t0 = rfc_example_date();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        for expires in [
            "Sun, 06 Nov 1994 09:49:37 GMT",
            "Sunday, 06-Nov-94 09:49:37 GMT",
            "Sun Nov  6 09:49:37 1994",
        ] {
            let meta = meta_for(&[date, ("expires", expires)], t0);
            assert_eq!(
                meta.policy.time_to_live(t0),
                Duration::from_secs(3600),
                "{expires}"
            );
        }
        for invalid in ["0", "tomorrow", "-1"] {
            let meta = meta_for(&[date, ("expires", invalid)], t0);
            assert!(meta.policy.is_stale(t0), "{invalid}");
        }
    }

    #[test]
    fn a_targeted_field_steers_the_cache_and_is_never_served() {
        let t0 = rfc_example_date();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        let meta = meta_for(
            &[
                date,
                ("cache-control", "no-store"),
                ("expires", "0"),
                ("cdn-cache-control", "max-age=600"),
            ],
            t0,
        );
        assert!(storable(&meta.policy, StatusCode::OK, &HeaderMap::new()));
        assert_eq!(meta.policy.time_to_live(t0), Duration::from_secs(600));
        // Ours first, then CDN-Cache-Control, then Cache-Control.
        let meta = meta_for(
            &[
                date,
                ("cache-control", "max-age=5"),
                ("cdn-cache-control", "max-age=600"),
                ("cistern-cache-control", "Max-Age=60"),
            ],
            t0,
        );
        assert_eq!(meta.policy.time_to_live(t0), Duration::from_secs(60));
        assert!(
            meta.headers
                .iter()
                .all(|(k, _)| !targeted_fields().iter().any(|t| t == k.as_str())),
            "{:?}",
            meta.headers
        );
        assert!(
            meta.headers
                .contains(&("cache-control".into(), "max-age=5".into()))
        );
    }

    #[test]
    fn a_304_keeps_the_targeted_field_for_the_rules_and_out_of_the_served_headers() {
        let t0 = rfc_example_date();
        let meta = meta_for(
            &[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
                ("etag", "\"v1\""),
            ],
            t0,
        );
        let key: Uri = meta.key.parse().unwrap();
        let h = HeaderMap::new();
        let req = CacheRequest {
            key: &key,
            method: &Method::GET,
            headers: &h,
        };
        let mut resp = http::Response::new(());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut()
            .insert(header::ETAG, "\"v1\"".parse().unwrap());
        let (parts, ()) = resp.into_parts();
        let t1 = t0 + Duration::from_secs(90);
        let updated = revalidated(&meta, req, &parts, t1, t1).expect("matching 304");
        assert_eq!(updated.policy.time_to_live(t1), Duration::from_secs(60));
        assert!(
            updated
                .headers
                .contains(&("cache-control".into(), "no-store".into())),
            "{:?}",
            updated.headers
        );
        assert!(
            updated
                .headers
                .iter()
                .all(|(k, _)| k != "cdn-cache-control")
        );
    }

    #[test]
    fn fields_named_by_connection_are_neither_stored_nor_ruled_on() {
        let meta = meta_for(
            &[
                ("connection", "close, X-Secret-Hop"),
                ("x-secret-hop", "1"),
                ("content-type", "text/plain"),
            ],
            SystemTime::now(),
        );
        assert!(meta.headers.iter().all(|(k, _)| k != "x-secret-hop"));
        assert!(!meta.rfc.response_headers.contains_key("x-secret-hop"));
        assert!(!meta.rfc.response_headers.contains_key(header::CONNECTION));
        assert!(meta.headers.iter().any(|(k, _)| k == "content-type"));
    }

    #[test]
    fn vary_star_is_recognised_in_a_list() {
        let mut h = HeaderMap::new();
        h.append(header::VARY, "accept-encoding".parse().unwrap());
        assert!(!varies_on_everything(&h));
        h.append(header::VARY, "Accept, *".parse().unwrap());
        assert!(varies_on_everything(&h));
    }

    /// The policy and headers of a response of `status` at `t0`.
    fn policy_for(
        status: u16,
        headers: &[(&str, &str)],
        t0: SystemTime,
    ) -> (CachePolicy, HeaderMap) {
        let key: Uri = "http://example.org:80/a".parse().unwrap();
        let h = HeaderMap::new();
        let req = CacheRequest {
            key: &key,
            method: &Method::GET,
            headers: &h,
        };
        let mut resp = http::Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            resp.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (parts, ()) = resp.into_parts();
        (new_policy(req, &parts, t0), parts.headers)
    }

    #[test]
    fn every_final_status_with_explicit_freshness_is_storable() {
        let t0 = rfc_example_date();
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        for status in [
            200, 203, 204, 301, 302, 303, 307, 308, 404, 410, 429, 500, 503, 599,
        ] {
            for explicit in [
                ("cache-control", "max-age=60"),
                ("cache-control", "s-maxage=60"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ] {
                let (p, h) = policy_for(status, &[date, explicit], t0);
                assert!(storable(&p, p_status(status), &h), "{status} {explicit:?}");
                assert_eq!(
                    p.time_to_live(t0),
                    Duration::from_secs(60),
                    "{status} {explicit:?}"
                );
            }
        }
        // Never: a part, a 304, a status not understood with must-understand.
        for status in [206, 304] {
            let (p, h) = policy_for(status, &[date, ("cache-control", "max-age=60")], t0);
            assert!(!storable(&p, p_status(status), &h), "{status}");
        }
        let (p, h) = policy_for(
            599,
            &[date, ("cache-control", "max-age=60, must-understand")],
            t0,
        );
        assert!(!storable(&p, p_status(599), &h));
        let (p, h) = policy_for(
            404,
            &[date, ("cache-control", "max-age=60, must-understand")],
            t0,
        );
        assert!(storable(&p, p_status(404), &h));
    }

    fn p_status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn only_the_rfc_9110_list_is_fresh_by_heuristic() {
        let t0 = rfc_example_date();
        let headers = [
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("last-modified", "Sun, 28 Aug 1994 08:49:37 GMT"),
        ];
        // 70 days old: fresh for 10 % of it, 7 days.
        let week = Duration::from_secs(7 * 86400);
        for status in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            let (p, h) = policy_for(status, &headers, t0);
            assert!(storable(&p, p_status(status), &h), "{status}");
            assert_eq!(p.time_to_live(t0), week, "{status}");
        }
        for status in [302, 303, 307, 403, 500, 502, 503, 504] {
            let (p, h) = policy_for(status, &headers, t0);
            assert!(!storable(&p, p_status(status), &h), "{status}");
            assert_eq!(p.time_to_live(t0), Duration::ZERO, "{status}");
        }
    }

    #[test]
    fn a_file_is_replaced_only_by_a_200_and_an_error_replaces_nothing() {
        let t0 = SystemTime::now();
        let file = meta_for(&[("cache-control", "max-age=60")], t0);
        let mut kept_aside = file.clone();
        kept_aside.status = 404;
        assert_eq!(kept_over(None, StatusCode::SERVICE_UNAVAILABLE), None);
        assert_eq!(kept_over(Some(&file), StatusCode::OK), None);
        for status in [301, 404, 410, 503] {
            assert!(
                kept_over(Some(&file), p_status(status)).is_some(),
                "{status}"
            );
        }
        assert_eq!(kept_over(Some(&kept_aside), StatusCode::OK), None);
        assert_eq!(kept_over(Some(&kept_aside), StatusCode::GONE), None);
        assert!(kept_over(Some(&kept_aside), StatusCode::BAD_GATEWAY).is_some());
    }
}
