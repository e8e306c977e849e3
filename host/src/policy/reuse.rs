//! Kept outcomes of `on_request` calls (ABI version 3, `reuse_outcome`).
//!
//! A policy whose decision is a function of the request values it reads
//! (store-id maps a URL to a key; a deny list maps a path to a 403) says so
//! by calling `reuse_outcome` in its hook. The host records which request
//! values the call read ([`Reads`]) and what it changed ([`Outcome`]), and
//! keeps the pair in the policy's [`OutcomeMemo`]. A later request with the
//! same values gets the same edits without a guest call: on a 1 KiB hit a
//! call is a third of the work, a lookup a few hundred instructions.
//!
//! The record is sound because guests are deterministic functions of what
//! they read (the ABI gives them no clock and no randomness) plus their
//! parameters (fixed for the policy's life: a reload builds a new policy
//! and a new memo). What a guest keeps in its own memory between calls is
//! the one thing the host cannot see, so reuse is the guest's promise, not
//! the host's guess. A call that asked the replica store or a rate limiter
//! anything read state that changes by itself, and is never kept.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use lru::LruCache;

use super::abi::{
    FIELD_CACHE_KEY, FIELD_CLIENT_ADDR, FIELD_CLIENT_IP, FIELD_HOST, FIELD_METHOD, FIELD_PATH,
    FIELD_QUERY, FIELD_UPSTREAM_URL, FIELD_URL,
};
use super::{DirectResponse, RequestView};
use crate::store::CacheKey;

/// Outcomes kept per policy: enough for the hot files of a mirror.
const MAX_KEPT: usize = 4096;
/// Bytes of keys and edits kept per policy, so long URLs cannot make the
/// memo large: 4096 outcomes of typical package URLs take about 1 MiB.
const MAX_KEPT_BYTES: usize = 4 * 1024 * 1024;
/// Distinct sets of inputs one policy may read before new ones are not
/// kept (a guest reads the same values for nearly every request).
const MAX_SHAPES: usize = 8;
/// One outcome's key and edits larger than this are not kept.
const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// A request value a call read, as the ABI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// A `request_get` field selector.
    Field(i32),
    /// Every value of a request header (`header_get(REQUEST, …)`).
    Header(HeaderName),
}

impl Input {
    /// Whether the value is the same for every request of one method and
    /// URL: the URL's parts, the method, and what earlier policies made
    /// of them (their outcomes were kept for that URL too). A header or
    /// the client's address is not.
    fn is_of_the_url(&self) -> bool {
        match self {
            Input::Field(f) => *f != FIELD_CLIENT_ADDR && *f != FIELD_CLIENT_IP,
            Input::Header(_) => false,
        }
    }
}

/// What one call read of its request, in the order it first read it.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    inputs: Vec<Input>,
    /// The call read something no key holds (the replica store, a limiter,
    /// the list of header names): its outcome is never kept.
    opaque: bool,
}

impl Reads {
    /// Notes a read of `input`.
    pub(crate) fn read(&mut self, input: Input) {
        if !self.inputs.contains(&input) {
            self.inputs.push(input);
        }
    }

    /// Notes a read whose value no key can hold.
    pub(crate) fn opaque(&mut self) {
        self.opaque = true;
    }
}

/// One edit of the request a call made, as the host applied it.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// `request_set(URL, …)`.
    Url(Uri),
    /// `request_set(CACHE_KEY, …)`, with the key parsed when it was kept.
    CacheKey(Option<Arc<KeyHint>>),
    /// `request_set(UPSTREAM_URL, …)`.
    UpstreamUrl(Option<Uri>),
    /// `cache_set(UNCACHEABLE)`.
    Bypass,
    /// `header_set(REQUEST, …)` or `header_add`.
    SetHeader(HeaderName, HeaderValue, bool),
    /// `header_remove(REQUEST, …)`.
    RemoveHeader(HeaderName),
}

/// A store-id as a policy set it and, when it is a valid key, parsed: the
/// proxy skips the parse on a kept outcome when `text` is the view's key.
#[derive(Debug)]
pub(crate) struct KeyHint {
    /// The key as the policy wrote it.
    pub(crate) text: String,
    /// [`CacheKey::parse`] of `text`, when it parses.
    pub(crate) key: Option<CacheKey>,
}

/// What a kept call did: its request edits in order, and its direct answer.
#[derive(Debug)]
pub(crate) struct Outcome {
    edits: Box<[Edit]>,
    answer: Option<(StatusCode, HeaderMap, Bytes)>,
    expires: Instant,
}

/// The edits of a call in progress of a policy that may reuse outcomes.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    pub(crate) reads: Reads,
    pub(crate) edits: Vec<Edit>,
    /// Set by `reuse_outcome`: how long the outcome may be reused.
    pub(crate) reuse_for: Option<Duration>,
}

/// The request's values before a call's edits: the key of its outcome is
/// made of these, at recording and at lookup alike.
pub(crate) struct Original<'a> {
    pub(crate) method: &'a Method,
    pub(crate) url: &'a Uri,
    pub(crate) cache_key: Option<&'a str>,
    pub(crate) upstream_url: Option<&'a Uri>,
    pub(crate) client: std::net::SocketAddr,
    pub(crate) headers: &'a HeaderMap,
}

impl<'a> Original<'a> {
    /// A request no call has edited yet.
    pub(crate) fn of(view: &'a RequestView) -> Original<'a> {
        Original {
            method: &view.method,
            url: &view.url,
            cache_key: view.cache_key.as_deref(),
            upstream_url: view.upstream_url.as_ref(),
            client: view.client,
            headers: &view.headers,
        }
    }
}

/// Appends one value, length first, so no two lists of values encode
/// alike; `None` (the field is absent) has its own marker.
fn push_value(key: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            key.extend_from_slice(&(v.len() as u32).to_le_bytes());
            key.extend_from_slice(v);
        }
        None => key.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

/// Appends `uri`'s text as one value, written in place: it is the key of
/// nearly every lookup, and building it in a `String` first cost more
/// than the rest of the lookup.
fn push_uri_value(key: &mut Vec<u8>, uri: &Uri) {
    let len = crate::request::uri_len(uri);
    key.reserve(4 + len);
    key.extend_from_slice(&(len as u32).to_le_bytes());
    crate::request::push_uri_bytes(key, uri);
}

/// The key of `inputs` read from `req`, appended to `key`.
fn push_key(key: &mut Vec<u8>, inputs: &[Input], req: &Original<'_>) {
    let mut text;
    for input in inputs {
        match input {
            Input::Field(f) => {
                let value: Option<&[u8]> = match *f {
                    FIELD_METHOD => Some(req.method.as_str().as_bytes()),
                    FIELD_URL => {
                        push_uri_value(key, req.url);
                        continue;
                    }
                    FIELD_PATH => Some(req.url.path().as_bytes()),
                    FIELD_QUERY => req.url.query().map(str::as_bytes),
                    FIELD_HOST => req.url.authority().map(|a| a.as_str().as_bytes()),
                    FIELD_CLIENT_ADDR => {
                        text = req.client.to_string();
                        Some(text.as_bytes())
                    }
                    FIELD_CLIENT_IP => {
                        text = req.client.ip().to_string();
                        Some(text.as_bytes())
                    }
                    FIELD_CACHE_KEY => req.cache_key.map(str::as_bytes),
                    FIELD_UPSTREAM_URL => {
                        match req.upstream_url {
                            Some(url) => push_uri_value(key, url),
                            None => push_value(key, None),
                        }
                        continue;
                    }
                    // An unknown selector was answered ERR_INVALID: the same
                    // for every request, nothing to key.
                    _ => continue,
                };
                push_value(key, value);
            }
            Input::Header(name) => {
                let values = req.headers.get_all(name);
                let count = values.iter().count() as u32;
                key.extend_from_slice(&count.to_le_bytes());
                for value in values {
                    push_value(key, Some(value.as_bytes()));
                }
            }
        }
    }
}

/// A policy's kept outcomes, shared by its instances.
pub(crate) struct OutcomeMemo {
    inner: Mutex<Kept>,
}

struct Kept {
    /// The input lists calls have read, each keying its own outcomes by
    /// its index (the first byte of a key).
    shapes: Vec<Arc<[Input]>>,
    outcomes: Bounded<Outcome>,
    /// A buffer for lookup keys, kept to save an allocation per request.
    scratch: Vec<u8>,
}

/// Kept values by key, the least recently used dropped first beyond
/// [`MAX_KEPT`] entries or [`MAX_KEPT_BYTES`] of keys and values, so
/// neither many keys nor long ones can make a memo large.
struct Bounded<V> {
    entries: LruCache<Box<[u8]>, (Arc<V>, usize)>,
    /// The sizes of the entries, each as given to [`Bounded::push`].
    bytes: usize,
}

impl<V> Bounded<V> {
    fn new() -> Bounded<V> {
        Bounded {
            // Sparse: a memo that never keeps anything costs nothing.
            entries: LruCache::sparse(NonZeroUsize::new(MAX_KEPT).expect("MAX_KEPT > 0")),
            bytes: 0,
        }
    }

    fn get(&mut self, key: &[u8]) -> Option<&Arc<V>> {
        self.entries.get(key).map(|(value, _)| value)
    }

    /// Keeps `value` under `key`, counting `size` bytes for both.
    fn push(&mut self, key: Box<[u8]>, value: Arc<V>, size: usize) {
        if let Some((_, (_, old))) = self.entries.push(key, (value, size)) {
            // `push` hands back the entry it replaced or evicted.
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes += size;
        while self.bytes > MAX_KEPT_BYTES {
            match self.entries.pop_lru() {
                Some((_, (_, old))) => self.bytes = self.bytes.saturating_sub(old),
                None => {
                    self.bytes = 0;
                    break;
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

impl std::fmt::Debug for OutcomeMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeMemo").finish_non_exhaustive()
    }
}

impl Default for OutcomeMemo {
    fn default() -> OutcomeMemo {
        OutcomeMemo {
            inner: Mutex::new(Kept {
                shapes: Vec::new(),
                outcomes: Bounded::new(),
                scratch: Vec::new(),
            }),
        }
    }
}

/// What [`OutcomeMemo::replay`] found.
pub(crate) enum Replayed {
    /// No kept outcome: call the guest.
    Miss,
    /// The edits were applied to the request; go on with the chain.
    Continue,
    /// The kept call answered directly.
    Respond(StatusCode, HeaderMap, Bytes),
}

impl OutcomeMemo {
    /// Applies the kept outcome for `req`, if there is one still fresh;
    /// notes it in `trace` when the chain may keep its whole decision.
    pub(crate) fn replay(&self, req: &mut RequestView, trace: Option<&mut ChainTrace>) -> Replayed {
        let found = {
            let mut kept = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let Kept {
                shapes,
                outcomes,
                scratch,
                ..
            } = &mut *kept;
            let original = Original::of(req);
            let mut found = None;
            for (index, inputs) in shapes.iter().enumerate() {
                scratch.clear();
                scratch.push(index as u8);
                push_key(scratch, inputs, &original);
                if let Some(outcome) = outcomes.get(scratch.as_slice()) {
                    found = Some((Arc::clone(outcome), index));
                    break;
                }
            }
            found.map(|(outcome, index)| {
                let by_url = shapes[index].iter().all(Input::is_of_the_url);
                (outcome, by_url)
            })
        };
        let Some((outcome, by_url)) = found else {
            return Replayed::Miss;
        };
        if outcome.expires <= Instant::now() {
            return Replayed::Miss;
        }
        if let Some(trace) = trace {
            if by_url {
                trace.applied.push(Arc::clone(&outcome));
            } else {
                trace.beyond_url = true;
            }
        }
        for edit in outcome.edits.iter() {
            apply(req, edit);
        }
        match &outcome.answer {
            Some((status, headers, body)) => {
                Replayed::Respond(*status, headers.clone(), body.clone())
            }
            None => Replayed::Continue,
        }
    }

    /// Keeps what a successful call did, if it asked for reuse and read
    /// nothing opaque. `original` is its request before its edits.
    pub(crate) fn keep(
        &self,
        original: &Original<'_>,
        recording: Recording,
        answer: Option<(StatusCode, &HeaderMap, &Bytes)>,
    ) {
        let Some(reuse_for) = recording.reuse_for else {
            return;
        };
        if recording.reads.opaque {
            return;
        }
        let expires = Instant::now()
            .checked_add(reuse_for)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let edits: Box<[Edit]> = recording
            .edits
            .into_iter()
            .map(|edit| match edit {
                // Parse the key once here, not on every request it serves.
                Edit::CacheKey(Some(hint)) if hint.key.is_none() => {
                    let text = hint.text.clone();
                    let key = CacheKey::parse(&text).ok();
                    Edit::CacheKey(Some(Arc::new(KeyHint { text, key })))
                }
                other => other,
            })
            .collect();
        let answer = answer.map(|(s, h, b)| (s, h.clone(), b.clone()));
        let size = edits.iter().map(edit_bytes).sum::<usize>()
            + answer.as_ref().map_or(0, |(_, h, b)| answer_bytes(h, b));
        let mut kept = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inputs = recording.reads.inputs;
        let index = match kept.shapes.iter().position(|s| **s == *inputs) {
            Some(index) => index,
            None if kept.shapes.len() < MAX_SHAPES => {
                kept.shapes.push(inputs.clone().into());
                kept.shapes.len() - 1
            }
            None => return,
        };
        let mut key = vec![index as u8];
        push_key(&mut key, &inputs, original);
        let entry_bytes = key.len() + size;
        if entry_bytes > MAX_ENTRY_BYTES {
            return;
        }
        let outcome = Arc::new(Outcome {
            edits,
            answer,
            expires,
        });
        kept.outcomes
            .push(key.into_boxed_slice(), outcome, entry_bytes);
    }

    /// How many outcomes are kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outcomes
            .len()
    }
}

fn edit_bytes(edit: &Edit) -> usize {
    32 + match edit {
        Edit::Url(u) => crate::request::uri_len(u),
        Edit::CacheKey(Some(h)) => 2 * h.text.len(),
        Edit::CacheKey(None) | Edit::Bypass => 0,
        Edit::UpstreamUrl(u) => u.as_ref().map_or(0, crate::request::uri_len),
        Edit::SetHeader(n, v, _) => n.as_str().len() + v.len(),
        Edit::RemoveHeader(n) => n.as_str().len(),
    }
}

/// The bytes a kept direct answer holds: its body and its headers.
fn answer_bytes(headers: &HeaderMap, body: &Bytes) -> usize {
    body.len()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>()
}

/// Applies one kept edit as the ABI function that made it did.
fn apply(req: &mut RequestView, edit: &Edit) {
    match edit {
        Edit::Url(url) => req.url = url.clone(),
        Edit::CacheKey(hint) => {
            req.cache_key = hint.as_ref().map(|h| h.text.clone());
            req.key_hint = hint.clone();
        }
        Edit::UpstreamUrl(url) => req.upstream_url = url.clone(),
        Edit::Bypass => req.bypass_cache = true,
        Edit::SetHeader(..) | Edit::RemoveHeader(_) => edit_header(&mut req.headers, edit),
    }
}

/// Applies a kept header edit; any other edit is not one of the headers.
fn edit_header(headers: &mut HeaderMap, edit: &Edit) {
    match edit {
        Edit::SetHeader(name, value, true) => {
            headers.append(name.clone(), value.clone());
        }
        Edit::SetHeader(name, value, false) => {
            headers.insert(name.clone(), value.clone());
        }
        Edit::RemoveHeader(name) => {
            headers.remove(name);
        }
        _ => {}
    }
}

/// What the kept outcomes applied to one request add up to, collected
/// by [`OutcomeMemo::replay`] while a chain that may keep its whole
/// decision runs from kept outcomes alone.
#[derive(Debug, Default)]
pub struct ChainTrace {
    /// The outcomes applied, in chain order.
    applied: Vec<Arc<Outcome>>,
    /// An applied outcome was keyed by more than the method and the URL.
    beyond_url: bool,
}

/// A chain's whole decision for one method and path of its route
/// ([`ChainMemo`]): what its kept outcomes did, applied without building
/// the request the policies see.
#[derive(Debug)]
pub struct KeptChain {
    /// What the chain decided, with what the route made of it.
    pub decision: KeptDecision,
    /// The chain's edits of the request headers, in order.
    header_edits: Box<[Edit]>,
    /// How many of the chain's `on_request` policies it stands for, from
    /// the first (each counts a reuse when it applies).
    pub(crate) reused: usize,
    expires: Instant,
}

/// What a [`KeptChain`] decided.
#[derive(Debug)]
pub enum KeptDecision {
    /// A policy answered the request itself.
    Respond(DirectResponse),
    /// The request goes on as the chain left it.
    Proceed(Arc<KeptRequest>),
}

/// A request as a chain left it, for [`KeptDecision::Proceed`].
#[derive(Debug)]
pub struct KeptRequest {
    /// The request as the policies left it, without its headers (each
    /// request brings its own): what `on_response` sees on a miss.
    pub view: RequestView,
    /// The replica key the route made of `view`.
    pub key: CacheKey,
    /// Where the route fetches from instead of its upstreams, when the
    /// chain rewrote the URL or set an upstream URL.
    pub fetch_from: Option<Uri>,
}

impl KeptChain {
    /// Applies the chain's header edits to one request's headers.
    pub fn edit_headers(&self, headers: &mut HeaderMap) {
        for edit in self.header_edits.iter() {
            edit_header(headers, edit);
        }
    }
}

/// A chain's kept whole decisions, keyed by method and the path below the
/// route (a mirror's `rest`): the route's URL is a function of that path,
/// so when every policy's applied outcome was keyed by the URL alone, the
/// chain's decision is one too. On a hit this is the chain's whole cost:
/// one lookup, instead of building the URL, the view and a lookup per
/// policy.
pub(crate) struct ChainMemo {
    inner: Mutex<KeptChains>,
    /// Some outcome of the chain was keyed by a header or the client: its
    /// decisions are not kept as a whole (each policy's still are).
    off: AtomicBool,
}

struct KeptChains {
    entries: Bounded<KeptChain>,
    /// A buffer for lookup keys, kept to save an allocation per request.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for ChainMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainMemo").finish_non_exhaustive()
    }
}

impl Default for ChainMemo {
    fn default() -> ChainMemo {
        ChainMemo {
            inner: Mutex::new(KeptChains {
                entries: Bounded::new(),
                scratch: Vec::new(),
            }),
            off: AtomicBool::new(false),
        }
    }
}

fn chain_key(key: &mut Vec<u8>, method: &Method, rest: &str) {
    key.extend_from_slice(method.as_str().as_bytes());
    key.push(b' ');
    key.extend_from_slice(rest.as_bytes());
}

impl ChainMemo {
    /// Whether the chain's decisions may be kept whole.
    pub(crate) fn is_on(&self) -> bool {
        !self.off.load(Ordering::Relaxed)
    }

    /// The kept decision for `method` and `rest`, while it is fresh.
    pub(crate) fn get(&self, method: &Method, rest: &str) -> Option<Arc<KeptChain>> {
        if !self.is_on() {
            return None;
        }
        let kept = {
            let mut kept = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let KeptChains { entries, scratch } = &mut *kept;
            scratch.clear();
            chain_key(scratch, method, rest);
            Arc::clone(entries.get(scratch.as_slice())?)
        };
        (kept.expires > Instant::now()).then_some(kept)
    }

    /// Keeps the decision a chain reached from kept outcomes alone
    /// (`trace`) for `method` and `rest`; a trace that met an outcome keyed
    /// beyond the URL turns whole-chain keeping off for good.
    pub(crate) fn keep(
        &self,
        method: &Method,
        rest: &str,
        trace: ChainTrace,
        decision: KeptDecision,
    ) {
        if trace.beyond_url {
            self.off.store(true, Ordering::Relaxed);
            return;
        }
        let Some(expires) = trace.applied.iter().map(|o| o.expires).min() else {
            return;
        };
        let header_edits: Box<[Edit]> = trace
            .applied
            .iter()
            .flat_map(|o| o.edits.iter())
            .filter(|e| matches!(e, Edit::SetHeader(..) | Edit::RemoveHeader(_)))
            .cloned()
            .collect();
        let mut key = Vec::new();
        chain_key(&mut key, method, rest);
        let size = key.len()
            + header_edits.iter().map(edit_bytes).sum::<usize>()
            + match &decision {
                KeptDecision::Respond(d) => answer_bytes(&d.headers, &d.body),
                KeptDecision::Proceed(kept) => {
                    let view = &kept.view;
                    crate::request::uri_len(&view.url)
                        + view
                            .upstream_url
                            .as_ref()
                            .map_or(0, crate::request::uri_len)
                        + view.cache_key.as_ref().map_or(0, String::len)
                        + kept.key.as_str().len()
                        + kept.fetch_from.as_ref().map_or(0, crate::request::uri_len)
                }
            }
            + 256;
        if size > MAX_ENTRY_BYTES {
            return;
        }
        let kept = Arc::new(KeptChain {
            decision,
            header_edits,
            reused: trace.applied.len(),
            expires,
        });
        let mut chains = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        chains.entries.push(key.into_boxed_slice(), kept, size);
    }

    /// How many decisions are kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn view(url: &str, headers: &[(&'static str, &str)]) -> RequestView {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        RequestView::new(
            Method::GET,
            url.parse().unwrap(),
            map,
            SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        )
    }

    fn recording(inputs: Vec<Input>, edits: Vec<Edit>) -> Recording {
        Recording {
            reads: Reads {
                inputs,
                opaque: false,
            },
            edits,
            reuse_for: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn two_header_values_are_not_one_value_with_a_comma() {
        let memo = OutcomeMemo::default();
        let tenant = Input::Header(HeaderName::from_static("x-tenant"));
        let one = view("http://m.test/a", &[("x-tenant", "a,b")]);
        memo.keep(
            &Original::of(&one),
            recording(vec![tenant], vec![Edit::Bypass]),
            None,
        );
        let mut two = view("http://m.test/a", &[("x-tenant", "a"), ("x-tenant", "b")]);
        assert!(matches!(memo.replay(&mut two, None), Replayed::Miss));
        let mut same = view("http://m.test/a", &[("x-tenant", "a,b")]);
        assert!(matches!(memo.replay(&mut same, None), Replayed::Continue));
        assert!(same.bypass_cache);
    }

    #[test]
    fn a_url_is_keyed_by_its_text() {
        for url in [
            "http://m.test/a?b=c",
            "https://[::1]:8443/",
            "http://m.test/",
        ] {
            let uri: Uri = url.parse().unwrap();
            let mut key = Vec::new();
            push_uri_value(&mut key, &uri);
            let text = uri.to_string();
            assert_eq!(key[..4], (text.len() as u32).to_le_bytes(), "{url}");
            assert_eq!(&key[4..], text.as_bytes(), "{url}");
        }
    }

    #[test]
    fn long_urls_cannot_grow_the_memo_past_its_byte_cap() {
        let memo = OutcomeMemo::default();
        let long = "x".repeat(8 * 1024);
        for i in 0..2000 {
            let url = format!("http://m.test/{long}/{i}");
            let req = view(&url, &[]);
            let edit = Edit::Url(url.parse().unwrap());
            memo.keep(
                &Original::of(&req),
                recording(vec![Input::Field(FIELD_URL)], vec![edit]),
                None,
            );
        }
        let kept = memo.inner.lock().unwrap();
        let bytes = kept.outcomes.bytes;
        assert!(bytes <= MAX_KEPT_BYTES, "{bytes} bytes kept");
        assert!(kept.outcomes.len() < 2000);
        assert!(kept.outcomes.len() > 100, "{} kept", kept.outcomes.len());
    }

    fn answer() -> KeptDecision {
        KeptDecision::Respond(DirectResponse {
            status: StatusCode::FORBIDDEN,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"no"),
        })
    }

    fn traced(seconds: u64, beyond_url: bool) -> ChainTrace {
        let outcome = Outcome {
            edits: Box::new([]),
            answer: None,
            expires: Instant::now() + Duration::from_secs(seconds),
        };
        ChainTrace {
            applied: vec![Arc::new(outcome)],
            beyond_url,
        }
    }

    #[test]
    fn a_chain_decision_is_kept_per_method_and_path_until_it_expires() {
        let memo = ChainMemo::default();
        memo.keep(&Method::GET, "/a", traced(60, false), answer());
        memo.keep(&Method::GET, "/b", traced(0, false), answer());
        assert!(memo.get(&Method::GET, "/a").is_some());
        assert!(
            memo.get(&Method::HEAD, "/a").is_none(),
            "the method is part of it"
        );
        assert!(memo.get(&Method::GET, "/b").is_none(), "expired");
        assert!(memo.get(&Method::GET, "/c").is_none());
    }

    #[test]
    fn an_outcome_keyed_beyond_the_url_turns_whole_keeping_off() {
        let memo = ChainMemo::default();
        memo.keep(&Method::GET, "/a", traced(60, false), answer());
        assert!(memo.is_on());
        memo.keep(&Method::GET, "/b", traced(60, true), answer());
        assert!(!memo.is_on());
        assert!(
            memo.get(&Method::GET, "/a").is_none(),
            "nothing applies once off"
        );
    }

    #[test]
    fn long_paths_cannot_grow_the_chain_memo_past_its_byte_cap() {
        let memo = ChainMemo::default();
        let long = "x".repeat(8 * 1024);
        for i in 0..2000 {
            memo.keep(
                &Method::GET,
                &format!("/{long}/{i}"),
                traced(60, false),
                answer(),
            );
        }
        let bytes = memo.inner.lock().unwrap().entries.bytes;
        assert!(bytes <= MAX_KEPT_BYTES, "{bytes} bytes kept");
        assert!(memo.len() < 2000);
        assert!(memo.len() > 100, "{} kept", memo.len());
        assert!(memo.get(&Method::GET, &format!("/{long}/1999")).is_some());
    }

    #[test]
    fn an_opaque_call_or_one_that_did_not_ask_is_not_kept() {
        let memo = OutcomeMemo::default();
        let req = view("http://m.test/a", &[]);
        let mut opaque = recording(vec![Input::Field(FIELD_URL)], vec![]);
        opaque.reads.opaque();
        memo.keep(&Original::of(&req), opaque, None);
        let mut unasked = recording(vec![Input::Field(FIELD_URL)], vec![]);
        unasked.reuse_for = None;
        memo.keep(&Original::of(&req), unasked, None);
        assert_eq!(memo.len(), 0);
    }
}
