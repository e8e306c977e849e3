//! Write Cistern policies in Rust.
//!
//! A policy is a `cdylib` built for `wasm32-unknown-unknown`. It reads and
//! edits the request and response in front of it through the functions of
//! this crate, which wrap the raw imports described in `ABI.md` (see
//! [`raw`]). Register the hooks with [`policy!`]:
//!
//! ```ignore
//! use cistern_guest::{self as cistern, Result};
//!
//! fn on_request() -> Result<()> {
//!     if cistern::request::query().is_some() {
//!         cistern::cache::uncacheable()?;
//!     }
//!     Ok(())
//! }
//!
//! cistern::policy!(on_request => on_request);
//! ```
//!
//! Everything here is synchronous and cheap: no call does I/O in the guest.
//! Effects are buffered by the host and applied only when the hook returns
//! `Ok`; returning `Err` (or panicking) discards them and applies the
//! policy's `on-error` setting.

pub mod raw;

use std::fmt;

/// The ABI version this SDK speaks; exported by [`policy!`].
pub const ABI_VERSION: i32 = raw::ABI_VERSION;

/// An error code returned by a host function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No such header, parameter, field value or digest.
    NotFound,
    /// A pointer range lies outside the guest's memory (an SDK bug).
    OutOfBounds,
    /// A malformed argument: not UTF-8, an invalid header, an unparsable URL.
    Invalid,
    /// The call is not available in the current hook.
    WrongHook,
    /// Over a host cap (body size, edit budget).
    TooLarge,
    /// No limiter of that name is declared in `config.kdl`.
    UnknownLimiter,
    /// A code this SDK does not know (a newer host).
    Other(i32),
}

impl Error {
    fn from_code(code: i32) -> Error {
        match code {
            raw::ERR_NOT_FOUND => Error::NotFound,
            raw::ERR_OUT_OF_BOUNDS => Error::OutOfBounds,
            raw::ERR_INVALID => Error::Invalid,
            raw::ERR_WRONG_HOOK => Error::WrongHook,
            raw::ERR_TOO_LARGE => Error::TooLarge,
            raw::ERR_UNKNOWN_LIMITER => Error::UnknownLimiter,
            other => Error::Other(other),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound => f.write_str("not found"),
            Error::OutOfBounds => f.write_str("pointer out of bounds"),
            Error::Invalid => f.write_str("invalid argument"),
            Error::WrongHook => f.write_str("not available in this hook"),
            Error::TooLarge => f.write_str("too large"),
            Error::UnknownLimiter => f.write_str("unknown limiter"),
            Error::Other(code) => write!(f, "host error {code}"),
        }
    }
}

/// The result of a host call or a hook.
pub type Result<T> = std::result::Result<T, Error>;

fn check(code: i32) -> Result<i32> {
    if code < 0 {
        Err(Error::from_code(code))
    } else {
        Ok(code)
    }
}

fn len_i32(bytes: &[u8]) -> i32 {
    // Guest memory is at most 4 GiB and the host caps every input far below
    // 2 GiB, so a longer slice can only be refused.
    i32::try_from(bytes.len()).unwrap_or(i32::MAX)
}

/// Runs a host call that fills a caller buffer, growing the buffer once when
/// the host says it needs more: the ABI's "needed length" convention.
fn read_bytes(mut call: impl FnMut(*mut u8, i32) -> i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        let needed = check(call(buf.as_mut_ptr(), len_i32(&buf)))? as usize;
        if needed <= buf.len() {
            buf.truncate(needed);
            return Ok(buf);
        }
        buf = vec![0u8; needed];
    }
}

fn read_string(call: impl FnMut(*mut u8, i32) -> i32) -> Result<String> {
    let bytes = read_bytes(call)?;
    String::from_utf8(bytes).map_err(|_| Error::Invalid)
}

fn optional(result: Result<String>) -> Result<Option<String>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(Error::NotFound) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Which message a header call works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The client's request (read-only in `on_response`).
    Request,
    /// In `on_response`, the upstream response; in `on_request`, the headers
    /// of the direct answer sent by [`respond`].
    Response,
}

impl Target {
    fn code(self) -> i32 {
        match self {
            Target::Request => raw::TARGET_REQUEST,
            Target::Response => raw::TARGET_RESPONSE,
        }
    }
}

/// Header access shared by [`request`] and [`response`].
pub mod headers {
    use super::*;

    /// The first value of header `name`, if any.
    pub fn get(target: Target, name: &str) -> Result<Option<String>> {
        optional(nth(target, name, 0))
    }

    /// The `index`-th value of header `name`, as text; [`Error::Invalid`]
    /// if it is not UTF-8 (values are bytes: see [`nth_bytes`]).
    pub fn nth(target: Target, name: &str, index: i32) -> Result<String> {
        String::from_utf8(nth_bytes(target, name, index)?).map_err(|_| Error::Invalid)
    }

    /// The first value of header `name` as the bytes received, if any.
    pub fn get_bytes(target: Target, name: &str) -> Result<Option<Vec<u8>>> {
        match nth_bytes(target, name, 0) {
            Ok(value) => Ok(Some(value)),
            Err(Error::NotFound) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The `index`-th value of header `name` as the bytes received.
    pub fn nth_bytes(target: Target, name: &str, index: i32) -> Result<Vec<u8>> {
        read_bytes(|out, cap| unsafe {
            raw::header_get(
                target.code(),
                name.as_ptr(),
                len_i32(name.as_bytes()),
                index,
                out,
                cap,
            )
        })
    }

    /// Every value of header `name`, in order.
    pub fn all(target: Target, name: &str) -> Result<Vec<String>> {
        let mut values = Vec::new();
        loop {
            match nth(target, name, values.len() as i32) {
                Ok(value) => values.push(value),
                Err(Error::NotFound) => return Ok(values),
                Err(other) => return Err(other),
            }
        }
    }

    /// The distinct header names, lower case.
    pub fn names(target: Target) -> Result<Vec<String>> {
        let joined = read_string(|out, cap| unsafe { raw::header_names(target.code(), out, cap) })?;
        Ok(joined.lines().map(str::to_owned).collect())
    }

    /// Replaces every value of `name` with `value`.
    pub fn set(target: Target, name: &str, value: &str) -> Result<()> {
        set_bytes(target, name, value.as_bytes())
    }

    /// Replaces every value of `name` with `value`, bytes that need not be
    /// UTF-8 (but no NUL, CR, LF or other controls than tab).
    pub fn set_bytes(target: Target, name: &str, value: &[u8]) -> Result<()> {
        check(unsafe {
            raw::header_set(
                target.code(),
                name.as_ptr(),
                len_i32(name.as_bytes()),
                value.as_ptr(),
                len_i32(value),
            )
        })
        .map(drop)
    }

    /// Appends `value` to header `name`.
    pub fn add(target: Target, name: &str, value: &str) -> Result<()> {
        check(unsafe {
            raw::header_add(
                target.code(),
                name.as_ptr(),
                len_i32(name.as_bytes()),
                value.as_ptr(),
                len_i32(value.as_bytes()),
            )
        })
        .map(drop)
    }

    /// Removes header `name`; returns how many values were removed.
    pub fn remove(target: Target, name: &str) -> Result<u32> {
        check(unsafe { raw::header_remove(target.code(), name.as_ptr(), len_i32(name.as_bytes())) })
            .map(|n| n as u32)
    }
}

/// The client's request.
pub mod request {
    use super::*;

    fn field(field: i32) -> Result<String> {
        read_string(|out, cap| unsafe { raw::request_get(field, out, cap) })
    }

    fn set_field(field: i32, value: &str) -> Result<()> {
        check(unsafe { raw::request_set(field, value.as_ptr(), len_i32(value.as_bytes())) })
            .map(drop)
    }

    /// The method, e.g. `GET`.
    pub fn method() -> Result<String> {
        field(raw::FIELD_METHOD)
    }

    /// The absolute URL, including any rewrite by an earlier policy.
    pub fn url() -> Result<String> {
        field(raw::FIELD_URL)
    }

    /// The path, without the query.
    pub fn path() -> Result<String> {
        field(raw::FIELD_PATH)
    }

    /// The query without `?`, if there is one.
    pub fn query() -> Result<Option<String>> {
        optional(field(raw::FIELD_QUERY))
    }

    /// The URL's host (authority).
    pub fn host() -> Result<String> {
        field(raw::FIELD_HOST)
    }

    /// The client's address, `ip:port`.
    pub fn client_addr() -> Result<String> {
        field(raw::FIELD_CLIENT_ADDR)
    }

    /// The client's IP address.
    pub fn client_ip() -> Result<String> {
        field(raw::FIELD_CLIENT_IP)
    }

    /// The cache key, if a policy set one.
    pub fn cache_key() -> Result<Option<String>> {
        optional(field(raw::FIELD_CACHE_KEY))
    }

    /// The upstream URL override, if a policy set one.
    pub fn upstream_url() -> Result<Option<String>> {
        optional(field(raw::FIELD_UPSTREAM_URL))
    }

    /// Rewrites the request's absolute URL (`on_request` only).
    pub fn set_url(url: &str) -> Result<()> {
        set_field(raw::FIELD_URL, url)
    }

    /// Sets the cache key: requests with one key share one replica.
    pub fn set_cache_key(key: &str) -> Result<()> {
        set_field(raw::FIELD_CACHE_KEY, key)
    }

    /// Fetches from this absolute URL instead (the replica keeps the
    /// request's URL or cache key).
    pub fn set_upstream_url(url: &str) -> Result<()> {
        set_field(raw::FIELD_UPSTREAM_URL, url)
    }

    /// The first value of a request header.
    pub fn header(name: &str) -> Result<Option<String>> {
        headers::get(Target::Request, name)
    }

    /// Replaces a request header.
    pub fn set_header(name: &str, value: &str) -> Result<()> {
        headers::set(Target::Request, name, value)
    }

    /// Removes a request header.
    pub fn remove_header(name: &str) -> Result<u32> {
        headers::remove(Target::Request, name)
    }

    /// Promises that this `on_request` call's decision depends only on the
    /// request values it read (fields, headers by name) and the policy's
    /// parameters: for `max_age` (at least a second; a reload forgets
    /// sooner) the host applies the same edits and answer to a request
    /// with the same values without calling the hook. Logging is not
    /// repeated. A call that asks the replica store or a limiter is never
    /// reused (ABI.md §18).
    pub fn reuse_outcome(max_age: std::time::Duration) -> Result<()> {
        let seconds = i32::try_from(max_age.as_secs().max(1)).unwrap_or(i32::MAX);
        check(unsafe { raw::reuse_outcome(seconds) }).map(drop)
    }
}

/// The upstream response (`on_response`), or the direct answer's headers
/// (`on_request`).
pub mod response {
    use super::*;

    /// The upstream response's status code (`on_response` only).
    pub fn status() -> Result<u16> {
        check(unsafe { raw::response_status() }).map(|s| s as u16)
    }

    /// The first value of a response header.
    pub fn header(name: &str) -> Result<Option<String>> {
        headers::get(Target::Response, name)
    }

    /// Replaces a response header.
    pub fn set_header(name: &str, value: &str) -> Result<()> {
        headers::set(Target::Response, name, value)
    }

    /// Appends a response header value.
    pub fn add_header(name: &str, value: &str) -> Result<()> {
        headers::add(Target::Response, name, value)
    }

    /// Removes a response header.
    pub fn remove_header(name: &str) -> Result<u32> {
        headers::remove(Target::Response, name)
    }
}

/// Cache decisions.
pub mod cache {
    use super::*;

    fn set(op: i32, value: i64) -> Result<()> {
        check(unsafe { raw::cache_set(op, value) }).map(drop)
    }

    /// Do not store this response; in `on_request`, bypass the cache for the
    /// request altogether.
    pub fn uncacheable() -> Result<()> {
        set(raw::CACHE_UNCACHEABLE, 0)
    }

    /// Sets the freshness lifetime, overriding the response's headers.
    pub fn set_ttl(seconds: u64) -> Result<()> {
        set(raw::CACHE_TTL, seconds.min(i64::MAX as u64) as i64)
    }

    /// Caps the freshness lifetime.
    pub fn cap_ttl(seconds: u64) -> Result<()> {
        set(raw::CACHE_TTL_CAP, seconds.min(i64::MAX as u64) as i64)
    }

    /// The content never changes: never revalidate it.
    pub fn immutable() -> Result<()> {
        set(raw::CACHE_IMMUTABLE, 0)
    }
}

/// Answers the request directly (`on_request` only); headers come from
/// [`response::set_header`]. Later policies in the chain do not run.
pub fn respond(status: u16, body: &[u8]) -> Result<()> {
    check(unsafe { raw::respond(i32::from(status), body.as_ptr(), len_i32(body)) }).map(drop)
}

/// Answers with a redirect to `location` (`on_request` only).
pub fn redirect(status: u16, location: &str) -> Result<()> {
    response::set_header("location", location)?;
    respond(status, b"")
}

/// Whether the replica store holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Not stored.
    Absent,
    /// Being filled, or an interrupted partial.
    Partial,
    /// Complete.
    Complete,
}

/// Questions to the replica store.
pub mod replica {
    use super::*;

    /// The state of the replica for `key` (a cache key or absolute URL).
    pub fn state(key: &str) -> Result<ReplicaState> {
        match check(unsafe { raw::replica_state(key.as_ptr(), len_i32(key.as_bytes())) })? {
            raw::REPLICA_COMPLETE => Ok(ReplicaState::Complete),
            raw::REPLICA_PARTIAL => Ok(ReplicaState::Partial),
            _ => Ok(ReplicaState::Absent),
        }
    }

    /// The URL of a complete replica whose content has this SHA-256.
    pub fn url_by_sha256(digest: &[u8; 32]) -> Result<Option<String>> {
        optional(read_string(|out, cap| unsafe {
            raw::url_by_sha256(digest.as_ptr(), 32, out, cap)
        }))
    }
}

/// A rate limiter's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Over the limit; retry after this many seconds.
    Deny {
        /// Seconds until a retry may succeed, at least 1.
        retry_after: u32,
    },
}

/// Asks the limiter `name` (declared in `config.kdl`) about `key`, counting
/// this request against it when allowed.
pub fn limiter_check(name: &str, key: &str) -> Result<Verdict> {
    let code = check(unsafe {
        raw::limiter_check(
            name.as_ptr(),
            len_i32(name.as_bytes()),
            key.as_ptr(),
            len_i32(key.as_bytes()),
        )
    })?;
    Ok(if code == 0 {
        Verdict::Allow
    } else {
        Verdict::Deny {
            retry_after: code as u32,
        }
    })
}

/// The first value of parameter `name` from the policy's `config.kdl` block.
pub fn param(name: &str) -> Result<Option<String>> {
    optional(param_nth(name, 0))
}

fn param_nth(name: &str, index: i32) -> Result<String> {
    read_string(|out, cap| unsafe {
        raw::param_get(name.as_ptr(), len_i32(name.as_bytes()), index, out, cap)
    })
}

/// Every value of parameter `name`, in file order.
pub fn params(name: &str) -> Result<Vec<String>> {
    let mut values = Vec::new();
    loop {
        match param_nth(name, values.len() as i32) {
            Ok(value) => values.push(value),
            Err(Error::NotFound) => return Ok(values),
            Err(other) => return Err(other),
        }
    }
}

/// The whole response body, in `on_body` (ABI version 2) only: the
/// responses whose `Content-Type` the policy's `body-types` name.
pub mod body {
    use super::{Result, check, len_i32, raw};

    /// The body as the upstream sent it (or as an earlier policy left it).
    pub fn get() -> Result<Vec<u8>> {
        // One call for the length, one for the bytes: a body is large, and
        // the 256-byte first try of the other getters would copy nothing.
        let len = check(unsafe { raw::body_get(core::ptr::null_mut(), 0) })? as usize;
        let mut buf = vec![0u8; len];
        let got = check(unsafe { raw::body_get(buf.as_mut_ptr(), len_i32(&buf)) })? as usize;
        buf.truncate(got.min(len));
        Ok(buf)
    }

    /// Replaces the body: this is what Cistern stores and serves, with its
    /// own length and SHA-256. At most twice `body-max` plus 64 KiB.
    pub fn set(body: &[u8]) -> Result<()> {
        check(unsafe { raw::body_set(body.as_ptr(), len_i32(body)) }).map(|_| ())
    }
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something is wrong.
    Error,
    /// Something looks wrong.
    Warn,
    /// Worth knowing.
    Info,
    /// For debugging a policy.
    Debug,
}

/// Writes a line to the host's log, tagged with the policy's name.
pub fn log(level: Level, message: &str) {
    let level = match level {
        Level::Error => raw::LOG_ERROR,
        Level::Warn => raw::LOG_WARN,
        Level::Info => raw::LOG_INFO,
        Level::Debug => raw::LOG_DEBUG,
    };
    // Logging is best effort: a refused line is not worth failing a hook.
    let _ = unsafe { raw::log(level, message.as_ptr(), len_i32(message.as_bytes())) };
}

#[doc(hidden)]
pub fn __run_hook(hook: fn() -> Result<()>) -> i32 {
    match hook() {
        Ok(()) => 0,
        Err(error) => {
            log(Level::Warn, &format!("hook failed: {error}"));
            1
        }
    }
}

/// Exports the ABI version marker and the given hooks.
///
/// ```ignore
/// cistern_guest::policy!(on_request => my_request_hook, on_response => my_response_hook);
/// ```
/// Each hook is a `fn() -> cistern_guest::Result<()>`; any may be left
/// out. `on_body` (ABI version 2) runs only for the responses the policy's
/// `body-types` name in `config.kdl`.
#[macro_export]
macro_rules! policy {
    ($($hook:ident => $func:path),+ $(,)?) => {
        #[unsafe(export_name = "cistern_abi_version")]
        extern "C" fn __cistern_export_abi_version() -> i32 {
            $crate::ABI_VERSION
        }
        $( $crate::policy!(@hook $hook, $func); )+
    };
    // The exported symbols get private Rust names so they do not clash with
    // the user's functions, which are often named after the hooks.
    (@hook on_request, $func:path) => {
        #[unsafe(export_name = "on_request")]
        extern "C" fn __cistern_export_on_request() -> i32 {
            $crate::__run_hook($func)
        }
    };
    (@hook on_response, $func:path) => {
        #[unsafe(export_name = "on_response")]
        extern "C" fn __cistern_export_on_response() -> i32 {
            $crate::__run_hook($func)
        }
    };
    (@hook on_body, $func:path) => {
        #[unsafe(export_name = "on_body")]
        extern "C" fn __cistern_export_on_body() -> i32 {
            $crate::__run_hook($func)
        }
    };
}
