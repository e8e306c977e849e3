//! The host side of the guest ABI: the `cistern` import module.
//!
//! Every function here treats the guest as hostile: pointer ranges are
//! checked against the guest's memory before any access, inputs are parsed
//! into owned values, outputs are written only when they fit, and every
//! growth of host-side state is charged to a per-call budget. Functions
//! return the ABI's negative codes; none of them traps.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, Uri};
use wasmtime::{Caller, Linker, Memory};

use super::reuse::{Edit, Input, KeyHint, Original, Recording};
use super::{LimitVerdict, MAX_DIRECT_BODY, PolicyHost, ReplicaState, RequestView, ResponseView};

/// No such header, parameter, field value or digest.
pub(crate) const ERR_NOT_FOUND: i32 = -1;
/// A pointer range lies outside the guest's memory.
pub(crate) const ERR_OUT_OF_BOUNDS: i32 = -2;
/// A malformed argument.
pub(crate) const ERR_INVALID: i32 = -3;
/// Not available in the current hook.
pub(crate) const ERR_WRONG_HOOK: i32 = -4;
/// Over a host cap.
pub(crate) const ERR_TOO_LARGE: i32 = -5;
/// No limiter of that name.
pub(crate) const ERR_UNKNOWN_LIMITER: i32 = -6;

pub(super) const FIELD_METHOD: i32 = 0;
pub(super) const FIELD_URL: i32 = 1;
pub(super) const FIELD_PATH: i32 = 2;
pub(super) const FIELD_QUERY: i32 = 3;
pub(super) const FIELD_HOST: i32 = 4;
pub(super) const FIELD_CLIENT_ADDR: i32 = 5;
pub(super) const FIELD_CLIENT_IP: i32 = 6;
pub(super) const FIELD_CACHE_KEY: i32 = 7;
pub(super) const FIELD_UPSTREAM_URL: i32 = 8;

const TARGET_REQUEST: i32 = 0;
const TARGET_RESPONSE: i32 = 1;

const CACHE_UNCACHEABLE: i32 = 0;
const CACHE_TTL: i32 = 1;
const CACHE_TTL_CAP: i32 = 2;
const CACHE_IMMUTABLE: i32 = 3;

const REPLICA_ABSENT: i32 = 0;
const REPLICA_PARTIAL: i32 = 1;
const REPLICA_COMPLETE: i32 = 2;

const LOG_ERROR: i32 = 0;
const LOG_WARN: i32 = 1;
const LOG_INFO: i32 = 2;
const LOG_DEBUG: i32 = 3;

/// Bytes of headers, keys and URLs one call may add to host state. Bounds
/// what a looping guest can make the host allocate before its deadline.
pub(crate) const EDIT_BUDGET: usize = 256 * 1024;
/// Longest log line kept; longer ones are cut.
const MAX_LOG_LINE: usize = 1024;
/// Log lines one call may write; later ones are refused.
const MAX_LOG_LINES: u32 = 32;

/// Which hook is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    /// `on_request`.
    Request,
    /// `on_response`.
    Response,
    /// `on_body` (ABI version 2): the whole body of a declared response.
    Body,
}

impl Hook {
    /// The export's name.
    pub(crate) fn export(self) -> &'static str {
        match self {
            Hook::Request => "on_request",
            Hook::Response => "on_response",
            Hook::Body => "on_body",
        }
    }
}

/// Cache effects of one call.
#[derive(Debug, Clone, Default)]
pub(crate) struct CacheEffects {
    pub(crate) uncacheable: bool,
    pub(crate) ttl: Option<Duration>,
    pub(crate) ttl_cap: Option<Duration>,
    pub(crate) immutable: bool,
}

/// Everything one hook call may read and change. The views are moved in for
/// the call and moved back out; the backups taken before the first edit
/// restore them when the call fails, so a failed call never half-applies.
pub(crate) struct CallCtx {
    pub(crate) hook: Hook,
    pub(crate) host: Arc<dyn PolicyHost>,
    pub(crate) req: RequestView,
    pub(crate) req_backup: RequestBackup,
    pub(crate) resp: ResponseView,
    pub(crate) resp_backup: Option<HeaderMap>,
    /// Headers of a direct answer (`on_request`'s response target).
    pub(crate) answer_headers: HeaderMap,
    /// A direct answer, set by `respond`.
    pub(crate) answer: Option<(StatusCode, Bytes)>,
    pub(crate) cache: CacheEffects,
    /// `on_body`: the body as the previous policy left it.
    pub(crate) body: Bytes,
    /// `on_body`: the replacement set by `body_set`, if any.
    pub(crate) body_out: Option<Vec<u8>>,
    /// `on_body`: the largest replacement `body_set` accepts.
    pub(crate) body_out_cap: usize,
    /// What the call reads and edits of its request, for a policy that
    /// may keep outcomes (it imports `reuse_outcome`, ABI version 3).
    pub(crate) recording: Option<Box<Recording>>,
    budget: usize,
    log_lines: u32,
}

/// What a failed call must put back in the request: only the parts the
/// guest edited were saved.
#[derive(Debug, Default)]
pub(crate) struct RequestBackup {
    headers: Option<HeaderMap>,
    fields: Option<RequestFields>,
}

#[derive(Debug)]
struct RequestFields {
    url: http::Uri,
    cache_key: Option<String>,
    key_hint: Option<Arc<KeyHint>>,
    upstream_url: Option<http::Uri>,
    bypass_cache: bool,
}

impl RequestBackup {
    /// Undoes the call's edits on `req`.
    pub(crate) fn restore(self, req: &mut RequestView) {
        if let Some(headers) = self.headers {
            req.headers = headers;
        }
        if let Some(f) = self.fields {
            req.url = f.url;
            req.cache_key = f.cache_key;
            req.key_hint = f.key_hint;
            req.upstream_url = f.upstream_url;
            req.bypass_cache = f.bypass_cache;
        }
    }

    /// The request as it was before the call that edited `req`.
    pub(crate) fn original<'a>(&'a self, req: &'a RequestView) -> Original<'a> {
        let mut original = Original::of(req);
        if let Some(headers) = &self.headers {
            original.headers = headers;
        }
        if let Some(f) = &self.fields {
            original.url = &f.url;
            original.cache_key = f.cache_key.as_deref();
            original.upstream_url = f.upstream_url.as_ref();
        }
        original
    }
}

impl CallCtx {
    /// A context for `hook` around the given views.
    pub(crate) fn new(
        hook: Hook,
        host: Arc<dyn PolicyHost>,
        req: RequestView,
        resp: ResponseView,
    ) -> CallCtx {
        CallCtx {
            hook,
            host,
            req,
            req_backup: RequestBackup::default(),
            resp,
            resp_backup: None,
            answer_headers: HeaderMap::new(),
            answer: None,
            cache: CacheEffects::default(),
            body: Bytes::new(),
            body_out: None,
            body_out_cap: 0,
            recording: None,
            budget: EDIT_BUDGET,
            log_lines: 0,
        }
    }

    fn charge(&mut self, bytes: usize) -> Result<(), i32> {
        self.budget = self.budget.checked_sub(bytes).ok_or(ERR_TOO_LARGE)?;
        Ok(())
    }

    /// The request headers, backed up before their first edit.
    fn req_headers_mut(&mut self) -> &mut HeaderMap {
        if self.req_backup.headers.is_none() {
            self.req_backup.headers = Some(self.req.headers.clone());
        }
        &mut self.req.headers
    }

    /// The request's other fields, backed up before their first edit
    /// (cheap: no headers are copied for a store-id or a URL rewrite).
    fn req_fields_mut(&mut self) -> &mut RequestView {
        if self.req_backup.fields.is_none() {
            self.req_backup.fields = Some(RequestFields {
                url: self.req.url.clone(),
                cache_key: self.req.cache_key.clone(),
                key_hint: self.req.key_hint.clone(),
                upstream_url: self.req.upstream_url.clone(),
                bypass_cache: self.req.bypass_cache,
            });
        }
        &mut self.req
    }

    /// Notes a read of `input`, when the call is recorded.
    fn read(&mut self, input: Input) {
        if let Some(recording) = self.recording.as_mut() {
            recording.reads.read(input);
        }
    }

    /// Notes a read of state no outcome key holds (the replica store, a
    /// limiter), when the call is recorded.
    fn read_opaque(&mut self) {
        if let Some(recording) = self.recording.as_mut() {
            recording.reads.opaque();
        }
    }

    /// Notes an edit of the request, when the call is recorded.
    fn edited(&mut self, edit: impl FnOnce() -> Edit) {
        if let Some(recording) = self.recording.as_mut() {
            recording.edits.push(edit());
        }
    }

    /// The headers a write to `target` changes in this hook.
    fn headers_mut(&mut self, target: i32) -> Result<&mut HeaderMap, i32> {
        match (target, self.hook) {
            (TARGET_REQUEST, Hook::Request) => Ok(self.req_headers_mut()),
            (TARGET_REQUEST, Hook::Response) => Err(ERR_WRONG_HOOK),
            (TARGET_RESPONSE, Hook::Request) => Ok(&mut self.answer_headers),
            (TARGET_RESPONSE, Hook::Response) => {
                if self.resp_backup.is_none() {
                    self.resp_backup = Some(self.resp.headers.clone());
                }
                Ok(&mut self.resp.headers)
            }
            // The head was decided in `on_response`; the body hook changes
            // only the body.
            (TARGET_REQUEST | TARGET_RESPONSE, Hook::Body) => Err(ERR_WRONG_HOOK),
            _ => Err(ERR_INVALID),
        }
    }

    fn headers(&self, target: i32) -> Result<&HeaderMap, i32> {
        match (target, self.hook) {
            (TARGET_REQUEST, _) => Ok(&self.req.headers),
            (TARGET_RESPONSE, Hook::Request) => Ok(&self.answer_headers),
            (TARGET_RESPONSE, Hook::Response | Hook::Body) => Ok(&self.resp.headers),
            _ => Err(ERR_INVALID),
        }
    }
}

/// The deadline bookkeeping of the call in progress (see
/// `instance::on_epoch`).
#[derive(Debug)]
pub(crate) struct Clock {
    /// When the call started (the hard wall cap counts from here).
    pub(crate) started: Instant,
    /// Wall time the guest ran in the slices that ended in a yield (time
    /// spent waiting to be polled again is not counted).
    pub(crate) ran: Duration,
    /// CPU time counted since the guest ran half its deadline; `None`
    /// before.
    pub(crate) cpu_used: Option<Duration>,
    /// Yields so far: the slice in progress started at `resume` when
    /// non-zero, at `started` otherwise.
    pub(crate) yields: u32,
    pub(crate) timed_out: bool,
    /// Where the yield future notes when the guest was resumed: it runs
    /// outside the store, which the call holds.
    pub(crate) resume: Arc<Resume>,
}

/// When a yielded call was resumed, written by its yield future.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    /// Nanoseconds after [`Clock::started`].
    pub(crate) at_ns: AtomicU64,
    /// The resuming thread's CPU clock (nanoseconds), when CPU is counted.
    pub(crate) cpu_ns: AtomicU64,
}

/// Caps the guest's linear memory and tables, and remembers a refusal so a
/// following trap is reported as a memory-limit failure.
pub(crate) struct Limits {
    pub(crate) memory: usize,
    pub(crate) hit: bool,
}

/// Table elements a guest may have: function pointers only, a few hundred in
/// practice.
const MAX_TABLE_ELEMENTS: usize = 10_000;

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// A store's data: one per instance.
pub(crate) struct HostState {
    pub(crate) policy: Arc<str>,
    pub(crate) params: Arc<[(String, String)]>,
    pub(crate) memory: Option<Memory>,
    pub(crate) limits: Limits,
    pub(crate) deadline: Duration,
    pub(crate) clock: Clock,
    pub(crate) call: Option<CallCtx>,
}

impl HostState {
    fn call(&mut self) -> Result<&mut CallCtx, i32> {
        self.call.as_mut().ok_or(ERR_WRONG_HOOK)
    }
}

/// Converts a guest (pointer, length) pair into a checked range.
fn range(mem_len: usize, ptr: i32, len: i32) -> Result<std::ops::Range<usize>, i32> {
    // Guest pointers are unsigned 32-bit offsets; a "negative" i32 is just a
    // large offset and fails the bounds check like any other.
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(ERR_OUT_OF_BOUNDS)?;
    if end > mem_len {
        return Err(ERR_OUT_OF_BOUNDS);
    }
    Ok(start..end)
}

/// Splits the caller into its memory and state; no memory means the module
/// did not export one, which loading rejects, so this only happens from a
/// start function.
fn split<'a>(
    caller: &'a mut Caller<'_, HostState>,
) -> Result<(&'a mut [u8], &'a mut HostState), i32> {
    let memory = caller.data().memory.ok_or(ERR_WRONG_HOOK)?;
    Ok(memory.data_and_store_mut(caller))
}

fn read_bytes(mem: &[u8], ptr: i32, len: i32) -> Result<&[u8], i32> {
    Ok(&mem[range(mem.len(), ptr, len)?])
}

fn read_str(mem: &[u8], ptr: i32, len: i32) -> Result<&str, i32> {
    std::str::from_utf8(read_bytes(mem, ptr, len)?).map_err(|_| ERR_INVALID)
}

/// The ABI's output convention: check the whole buffer, write only when the
/// value fits, and always return the value's length.
fn write_out(mem: &mut [u8], ptr: i32, cap: i32, value: &[u8]) -> i32 {
    let dest = match range(mem.len(), ptr, cap) {
        Ok(dest) => dest,
        Err(code) => return code,
    };
    let Ok(len) = i32::try_from(value.len()) else {
        return ERR_TOO_LARGE;
    };
    if value.len() <= dest.len() {
        mem[dest.start..dest.start + value.len()].copy_from_slice(value);
    }
    len
}

fn code(result: Result<i32, i32>) -> i32 {
    result.unwrap_or_else(|code| code)
}

/// An absolute `http(s)` URL a policy sets. Credentials (`user:pass@`)
/// are refused: the URL is logged, stored in metadata and shown by the
/// admin; a policy that authenticates upstream sets `Authorization`.
fn parse_absolute(text: &str) -> Result<Uri, i32> {
    let uri: Uri = text.parse().map_err(|_| ERR_INVALID)?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(a)) if !a.as_str().contains('@') => Ok(uri),
        _ => Err(ERR_INVALID),
    }
}

fn header_name(mem: &[u8], ptr: i32, len: i32) -> Result<HeaderName, i32> {
    HeaderName::from_bytes(read_bytes(mem, ptr, len)?).map_err(|_| ERR_INVALID)
}

fn request_get(
    caller: &mut Caller<'_, HostState>,
    field: i32,
    out: i32,
    cap: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let call = state.call()?;
    if (FIELD_METHOD..=FIELD_UPSTREAM_URL).contains(&field) {
        call.read(Input::Field(field));
    }
    let req = &call.req;
    let owned;
    let value: &str = match field {
        FIELD_METHOD => req.method.as_str(),
        FIELD_URL => {
            owned = crate::request::uri_text(&req.url);
            &owned
        }
        FIELD_PATH => req.url.path(),
        FIELD_QUERY => req.url.query().ok_or(ERR_NOT_FOUND)?,
        FIELD_HOST => req
            .url
            .authority()
            .map(|a| a.as_str())
            .ok_or(ERR_NOT_FOUND)?,
        FIELD_CLIENT_ADDR => {
            owned = req.client.to_string();
            &owned
        }
        FIELD_CLIENT_IP => {
            owned = req.client.ip().to_string();
            &owned
        }
        FIELD_CACHE_KEY => req.cache_key.as_deref().ok_or(ERR_NOT_FOUND)?,
        FIELD_UPSTREAM_URL => {
            owned = req.upstream_url.as_ref().ok_or(ERR_NOT_FOUND)?.to_string();
            &owned
        }
        _ => return Err(ERR_INVALID),
    };
    Ok(write_out(mem, out, cap, value.as_bytes()))
}

fn request_set(
    caller: &mut Caller<'_, HostState>,
    field: i32,
    ptr: i32,
    len: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let call = state.call()?;
    if call.hook != Hook::Request {
        return Err(ERR_WRONG_HOOK);
    }
    let value = read_str(mem, ptr, len)?;
    call.charge(value.len())?;
    match field {
        FIELD_URL => {
            let uri = parse_absolute(value)?;
            call.edited(|| Edit::Url(uri.clone()));
            call.req_fields_mut().url = uri;
        }
        FIELD_CACHE_KEY => {
            let key = (!value.is_empty()).then(|| value.to_owned());
            call.edited(|| {
                Edit::CacheKey(
                    key.clone()
                        .map(|text| Arc::new(KeyHint { text, key: None })),
                )
            });
            let req = call.req_fields_mut();
            req.cache_key = key;
            req.key_hint = None;
        }
        FIELD_UPSTREAM_URL => {
            let uri = if value.is_empty() {
                None
            } else {
                Some(parse_absolute(value)?)
            };
            call.edited(|| Edit::UpstreamUrl(uri.clone()));
            call.req_fields_mut().upstream_url = uri;
        }
        _ => return Err(ERR_INVALID),
    }
    Ok(0)
}

fn response_status(caller: &mut Caller<'_, HostState>) -> Result<i32, i32> {
    let call = caller.data_mut().call()?;
    match call.hook {
        Hook::Response | Hook::Body => Ok(i32::from(call.resp.status.as_u16())),
        Hook::Request => Err(ERR_WRONG_HOOK),
    }
}

fn header_get(
    caller: &mut Caller<'_, HostState>,
    target: i32,
    name: (i32, i32),
    index: i32,
    out: i32,
    cap: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let name = header_name(mem, name.0, name.1)?;
    let call = state.call()?;
    if target == TARGET_REQUEST {
        call.read(Input::Header(name.clone()));
    }
    let headers = call.headers(target)?;
    let index = usize::try_from(index).map_err(|_| ERR_INVALID)?;
    let value = headers
        .get_all(&name)
        .iter()
        .nth(index)
        .ok_or(ERR_NOT_FOUND)?;
    Ok(write_out(mem, out, cap, value.as_bytes()))
}

fn header_names(
    caller: &mut Caller<'_, HostState>,
    target: i32,
    out: i32,
    cap: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let call = state.call()?;
    if target == TARGET_REQUEST {
        call.read_opaque();
    }
    let headers = call.headers(target)?;
    let mut joined = Vec::with_capacity(headers.keys_len() * 16);
    for name in headers.keys() {
        joined.extend_from_slice(name.as_str().as_bytes());
        joined.push(b'\n');
    }
    Ok(write_out(mem, out, cap, &joined))
}

fn header_write(
    caller: &mut Caller<'_, HostState>,
    target: i32,
    name: (i32, i32),
    value: (i32, i32),
    append: bool,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let name = header_name(mem, name.0, name.1)?;
    let value =
        HeaderValue::from_bytes(read_bytes(mem, value.0, value.1)?).map_err(|_| ERR_INVALID)?;
    let call = state.call()?;
    call.charge(name.as_str().len() + value.len() + 32)?;
    if (target, call.hook) == (TARGET_REQUEST, Hook::Request) {
        call.edited(|| Edit::SetHeader(name.clone(), value.clone(), append));
    }
    let headers = call.headers_mut(target)?;
    if append {
        headers.append(name, value);
    } else {
        headers.insert(name, value);
    }
    Ok(0)
}

fn header_remove(
    caller: &mut Caller<'_, HostState>,
    target: i32,
    ptr: i32,
    len: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let name = header_name(mem, ptr, len)?;
    let call = state.call()?;
    if (target, call.hook) == (TARGET_REQUEST, Hook::Request) {
        call.edited(|| Edit::RemoveHeader(name.clone()));
    }
    let headers = call.headers_mut(target)?;
    let removed = match headers.entry(name) {
        http::header::Entry::Occupied(entry) => entry.remove_entry_mult().1.count(),
        http::header::Entry::Vacant(_) => 0,
    };
    Ok(i32::try_from(removed).unwrap_or(i32::MAX))
}

fn cache_set(caller: &mut Caller<'_, HostState>, op: i32, value: i64) -> Result<i32, i32> {
    let call = caller.data_mut().call()?;
    let seconds = || {
        u64::try_from(value)
            .map(Duration::from_secs)
            .map_err(|_| ERR_INVALID)
    };
    match (call.hook, op) {
        (Hook::Request, CACHE_UNCACHEABLE) => {
            call.edited(|| Edit::Bypass);
            call.req_fields_mut().bypass_cache = true;
        }
        (Hook::Request, CACHE_TTL | CACHE_TTL_CAP | CACHE_IMMUTABLE) => return Err(ERR_WRONG_HOOK),
        (Hook::Response, CACHE_UNCACHEABLE) => call.cache.uncacheable = true,
        (Hook::Response, CACHE_TTL) => call.cache.ttl = Some(seconds()?),
        (Hook::Response, CACHE_TTL_CAP) => {
            let cap = seconds()?;
            call.cache.ttl_cap = Some(call.cache.ttl_cap.map_or(cap, |old| old.min(cap)));
        }
        (Hook::Response, CACHE_IMMUTABLE) => call.cache.immutable = true,
        (Hook::Body, CACHE_UNCACHEABLE | CACHE_TTL | CACHE_TTL_CAP | CACHE_IMMUTABLE) => {
            return Err(ERR_WRONG_HOOK);
        }
        _ => return Err(ERR_INVALID),
    }
    Ok(0)
}

fn respond(
    caller: &mut Caller<'_, HostState>,
    status: i32,
    ptr: i32,
    len: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let body = read_bytes(mem, ptr, len)?;
    let call = state.call()?;
    if call.hook != Hook::Request {
        return Err(ERR_WRONG_HOOK);
    }
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or(ERR_INVALID)?;
    if body.len() > MAX_DIRECT_BODY {
        return Err(ERR_TOO_LARGE);
    }
    call.answer = Some((status, Bytes::copy_from_slice(body)));
    Ok(0)
}

fn replica_state(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let key = read_str(mem, ptr, len)?;
    let call = state.call()?;
    call.read_opaque();
    Ok(match call.host.replica_state(key) {
        ReplicaState::Absent => REPLICA_ABSENT,
        ReplicaState::Partial => REPLICA_PARTIAL,
        ReplicaState::Complete => REPLICA_COMPLETE,
    })
}

fn url_by_sha256(
    caller: &mut Caller<'_, HostState>,
    digest: (i32, i32),
    out: i32,
    cap: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let digest: [u8; 32] = read_bytes(mem, digest.0, digest.1)?
        .try_into()
        .map_err(|_| ERR_INVALID)?;
    let call = state.call()?;
    call.read_opaque();
    let url = call.host.url_by_sha256(&digest).ok_or(ERR_NOT_FOUND)?;
    Ok(write_out(mem, out, cap, url.as_bytes()))
}

fn limiter_check(
    caller: &mut Caller<'_, HostState>,
    name: (i32, i32),
    key: (i32, i32),
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let name = read_str(mem, name.0, name.1)?;
    let key = read_str(mem, key.0, key.1)?;
    let call = state.call()?;
    call.read_opaque();
    match call.host.limiter_check(name, key) {
        None => Err(ERR_UNKNOWN_LIMITER),
        Some(LimitVerdict::Allow) => Ok(0),
        Some(LimitVerdict::Deny { retry_after }) => {
            // Round up: "retry in 0 seconds" would read as "allowed".
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            Ok(i32::try_from(secs.max(1)).unwrap_or(i32::MAX))
        }
    }
}

fn param_get(
    caller: &mut Caller<'_, HostState>,
    name: (i32, i32),
    index: i32,
    out: i32,
    cap: i32,
) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let name = read_bytes(mem, name.0, name.1)?;
    let index = usize::try_from(index).map_err(|_| ERR_INVALID)?;
    let params = Arc::clone(&state.params);
    let value = params
        .iter()
        .filter(|(key, _)| key.as_bytes() == name)
        .nth(index)
        .map(|(_, value)| value)
        .ok_or(ERR_NOT_FOUND)?;
    Ok(write_out(mem, out, cap, value.as_bytes()))
}

fn log(caller: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let bytes = read_bytes(mem, ptr, len)?;
    if let Some(call) = state.call.as_mut() {
        if call.log_lines >= MAX_LOG_LINES {
            return Err(ERR_TOO_LARGE);
        }
        call.log_lines += 1;
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LOG_LINE)]);
    let policy = &*state.policy;
    match level {
        LOG_ERROR => tracing::error!(target: "cistern::policy::guest", policy, "{text}"),
        LOG_WARN => tracing::warn!(target: "cistern::policy::guest", policy, "{text}"),
        LOG_INFO => tracing::info!(target: "cistern::policy::guest", policy, "{text}"),
        LOG_DEBUG => tracing::debug!(target: "cistern::policy::guest", policy, "{text}"),
        _ => return Err(ERR_INVALID),
    }
    Ok(0)
}

fn body_get(caller: &mut Caller<'_, HostState>, out: i32, cap: i32) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let call = state.call()?;
    if call.hook != Hook::Body {
        return Err(ERR_WRONG_HOOK);
    }
    Ok(write_out(mem, out, cap, &call.body))
}

fn body_set(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<i32, i32> {
    let (mem, state) = split(caller)?;
    let bytes = read_bytes(mem, ptr, len)?;
    let call = state.call()?;
    if call.hook != Hook::Body {
        return Err(ERR_WRONG_HOOK);
    }
    if bytes.len() > call.body_out_cap {
        return Err(ERR_TOO_LARGE);
    }
    // Reuses the allocation of an earlier `body_set` of the same call.
    let out = call.body_out.get_or_insert_with(Vec::new);
    out.clear();
    out.extend_from_slice(bytes);
    Ok(0)
}

/// Declares that this `on_request` call's effects may be applied, without
/// a call, to later requests with the same values of everything the call
/// read, for `seconds` (ABI version 3).
fn reuse_outcome(caller: &mut Caller<'_, HostState>, seconds: i32) -> Result<i32, i32> {
    let call = caller.data_mut().call()?;
    if call.hook != Hook::Request {
        return Err(ERR_WRONG_HOOK);
    }
    let seconds = u64::try_from(seconds)
        .ok()
        .filter(|s| *s > 0)
        .ok_or(ERR_INVALID)?;
    if let Some(recording) = call.recording.as_mut() {
        recording.reuse_for = Some(Duration::from_secs(seconds));
    }
    Ok(0)
}

/// The `cistern` import module, once per engine.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    const M: &str = "cistern";
    l.func_wrap(
        M,
        "request_get",
        |mut c: Caller<'_, HostState>, f: i32, o: i32, n: i32| code(request_get(&mut c, f, o, n)),
    )?;
    l.func_wrap(
        M,
        "request_set",
        |mut c: Caller<'_, HostState>, f: i32, p: i32, n: i32| code(request_set(&mut c, f, p, n)),
    )?;
    l.func_wrap(M, "response_status", |mut c: Caller<'_, HostState>| {
        code(response_status(&mut c))
    })?;
    l.func_wrap(
        M,
        "header_get",
        |mut c: Caller<'_, HostState>, t: i32, np: i32, nl: i32, i: i32, o: i32, n: i32| {
            code(header_get(&mut c, t, (np, nl), i, o, n))
        },
    )?;
    l.func_wrap(
        M,
        "header_names",
        |mut c: Caller<'_, HostState>, t: i32, o: i32, n: i32| code(header_names(&mut c, t, o, n)),
    )?;
    l.func_wrap(
        M,
        "header_set",
        |mut c: Caller<'_, HostState>, t: i32, np: i32, nl: i32, vp: i32, vl: i32| {
            code(header_write(&mut c, t, (np, nl), (vp, vl), false))
        },
    )?;
    l.func_wrap(
        M,
        "header_add",
        |mut c: Caller<'_, HostState>, t: i32, np: i32, nl: i32, vp: i32, vl: i32| {
            code(header_write(&mut c, t, (np, nl), (vp, vl), true))
        },
    )?;
    l.func_wrap(
        M,
        "header_remove",
        |mut c: Caller<'_, HostState>, t: i32, p: i32, n: i32| code(header_remove(&mut c, t, p, n)),
    )?;
    l.func_wrap(
        M,
        "cache_set",
        |mut c: Caller<'_, HostState>, op: i32, v: i64| code(cache_set(&mut c, op, v)),
    )?;
    l.func_wrap(
        M,
        "respond",
        |mut c: Caller<'_, HostState>, s: i32, p: i32, n: i32| code(respond(&mut c, s, p, n)),
    )?;
    l.func_wrap(
        M,
        "replica_state",
        |mut c: Caller<'_, HostState>, p: i32, n: i32| code(replica_state(&mut c, p, n)),
    )?;
    l.func_wrap(
        M,
        "url_by_sha256",
        |mut c: Caller<'_, HostState>, dp: i32, dl: i32, o: i32, n: i32| {
            code(url_by_sha256(&mut c, (dp, dl), o, n))
        },
    )?;
    l.func_wrap(
        M,
        "limiter_check",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, kp: i32, kl: i32| {
            code(limiter_check(&mut c, (np, nl), (kp, kl)))
        },
    )?;
    l.func_wrap(
        M,
        "param_get",
        |mut c: Caller<'_, HostState>, np: i32, nl: i32, i: i32, o: i32, n: i32| {
            code(param_get(&mut c, (np, nl), i, o, n))
        },
    )?;
    l.func_wrap(
        M,
        "log",
        |mut c: Caller<'_, HostState>, lvl: i32, p: i32, n: i32| code(log(&mut c, lvl, p, n)),
    )?;
    // ABI version 2.
    l.func_wrap(
        M,
        "body_get",
        |mut c: Caller<'_, HostState>, o: i32, n: i32| code(body_get(&mut c, o, n)),
    )?;
    l.func_wrap(
        M,
        "body_set",
        |mut c: Caller<'_, HostState>, p: i32, n: i32| code(body_set(&mut c, p, n)),
    )?;
    // ABI version 3.
    l.func_wrap(
        M,
        "reuse_outcome",
        |mut c: Caller<'_, HostState>, s: i32| code(reuse_outcome(&mut c, s)),
    )?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The host's side of every numbered constant of ABI.md, by the
    /// name the Rust SDK gives it.
    fn host_constants() -> BTreeMap<&'static str, i32> {
        BTreeMap::from([
            ("ABI_VERSION", super::super::ABI_VERSION),
            ("ERR_NOT_FOUND", ERR_NOT_FOUND),
            ("ERR_OUT_OF_BOUNDS", ERR_OUT_OF_BOUNDS),
            ("ERR_INVALID", ERR_INVALID),
            ("ERR_WRONG_HOOK", ERR_WRONG_HOOK),
            ("ERR_TOO_LARGE", ERR_TOO_LARGE),
            ("ERR_UNKNOWN_LIMITER", ERR_UNKNOWN_LIMITER),
            ("FIELD_METHOD", FIELD_METHOD),
            ("FIELD_URL", FIELD_URL),
            ("FIELD_PATH", FIELD_PATH),
            ("FIELD_QUERY", FIELD_QUERY),
            ("FIELD_HOST", FIELD_HOST),
            ("FIELD_CLIENT_ADDR", FIELD_CLIENT_ADDR),
            ("FIELD_CLIENT_IP", FIELD_CLIENT_IP),
            ("FIELD_CACHE_KEY", FIELD_CACHE_KEY),
            ("FIELD_UPSTREAM_URL", FIELD_UPSTREAM_URL),
            ("TARGET_REQUEST", TARGET_REQUEST),
            ("TARGET_RESPONSE", TARGET_RESPONSE),
            ("CACHE_UNCACHEABLE", CACHE_UNCACHEABLE),
            ("CACHE_TTL", CACHE_TTL),
            ("CACHE_TTL_CAP", CACHE_TTL_CAP),
            ("CACHE_IMMUTABLE", CACHE_IMMUTABLE),
            ("REPLICA_ABSENT", REPLICA_ABSENT),
            ("REPLICA_PARTIAL", REPLICA_PARTIAL),
            ("REPLICA_COMPLETE", REPLICA_COMPLETE),
            ("LOG_ERROR", LOG_ERROR),
            ("LOG_WARN", LOG_WARN),
            ("LOG_INFO", LOG_INFO),
            ("LOG_DEBUG", LOG_DEBUG),
        ])
    }

    /// `pub const NAME: i32 = VALUE;` lines of the Rust SDK.
    fn rust_sdk_constants() -> BTreeMap<String, i32> {
        include_str!("../../../guest-sdk/src/raw.rs")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| {
                let (name, rest) = l.split_once(": i32 = ")?;
                let value = rest.trim_end_matches(';').trim().parse().ok()?;
                Some((name.to_owned(), value))
            })
            .collect()
    }

    /// `#define CISTERN_NAME VALUE` lines of the C header, without the
    /// prefix; macros that are not numbers are left out.
    fn c_header_constants() -> BTreeMap<String, i32> {
        include_str!("../../../guest-sdk/include/cistern.h")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#define CISTERN_"))
            .filter_map(|l| {
                let (name, value) = l.split_once(char::is_whitespace)?;
                let value = value.trim().trim_start_matches('(').trim_end_matches(')');
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn the_three_copies_of_the_abi_constants_agree() {
        let host: BTreeMap<String, i32> = host_constants()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let rust = rust_sdk_constants();
        let c = c_header_constants();
        assert_eq!(rust, host, "guest-sdk/src/raw.rs differs from the host");
        assert_eq!(c, host, "guest-sdk/include/cistern.h differs from the host");
    }

    /// The numbers ABI.md's tables give: `| `NAME` | 3 |` cells in the
    /// constants table and `| `-1` | `ERR_NOT_FOUND` |` in the error table.
    fn abi_md_constants() -> BTreeMap<String, i32> {
        let mut out = BTreeMap::new();
        for line in include_str!("../../../guest-sdk/ABI.md").lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            for pair in cells.windows(2) {
                let unquote = |c: &str| c.strip_prefix('`')?.strip_suffix('`').map(str::to_owned);
                let (Some(a), b) = (unquote(pair[0]), pair[1]) else {
                    continue;
                };
                if let Ok(v) = b.parse::<i32>() {
                    out.insert(a, v);
                } else if let (Ok(v), Some(name)) = (a.parse::<i32>(), unquote(b)) {
                    out.insert(name, v);
                }
            }
        }
        out
    }

    #[test]
    fn policies_cannot_put_credentials_in_urls() {
        assert!(parse_absolute("http://mirror.example/a").is_ok());
        assert!(parse_absolute("http://mirror.example/a@b").is_ok());
        for bad in [
            "http://u:p@mirror.example/a",
            "https://u@mirror.example/",
            "/a",
        ] {
            assert_eq!(parse_absolute(bad).err(), Some(ERR_INVALID), "{bad}");
        }
    }

    #[test]
    fn abi_md_gives_the_same_numbers() {
        let spec = abi_md_constants();
        for (name, value) in host_constants() {
            if name == "ABI_VERSION" {
                continue;
            }
            // The constants table names them without their group's prefix.
            let short = ["FIELD_", "TARGET_", "CACHE_", "REPLICA_", "LOG_"]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .unwrap_or(name);
            assert_eq!(
                spec.get(short),
                Some(&value),
                "ABI.md does not give {name} ({short}) = {value}"
            );
        }
    }
}
