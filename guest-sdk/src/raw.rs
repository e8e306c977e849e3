//! The raw imports of the `cistern` module, exactly as `ABI.md` describes
//! them. Prefer the safe wrappers in the crate root.

#[link(wasm_import_module = "cistern")]
unsafe extern "C" {
    /// Copies a request field (`FIELD_*`) into `out`; returns its length.
    pub fn request_get(field: i32, out_ptr: *mut u8, out_cap: i32) -> i32;
    /// Sets a request field (`FIELD_URL`, `FIELD_CACHE_KEY`, `FIELD_UPSTREAM_URL`).
    pub fn request_set(field: i32, ptr: *const u8, len: i32) -> i32;
    /// The upstream response's status code.
    pub fn response_status() -> i32;
    /// Copies the `index`-th value of header `name` into `out`.
    pub fn header_get(
        target: i32,
        name_ptr: *const u8,
        name_len: i32,
        index: i32,
        out_ptr: *mut u8,
        out_cap: i32,
    ) -> i32;
    /// Copies the distinct header names, each followed by `\n`, into `out`.
    pub fn header_names(target: i32, out_ptr: *mut u8, out_cap: i32) -> i32;
    /// Replaces every value of header `name` with one value.
    pub fn header_set(
        target: i32,
        name_ptr: *const u8,
        name_len: i32,
        value_ptr: *const u8,
        value_len: i32,
    ) -> i32;
    /// Appends a value to header `name`.
    pub fn header_add(
        target: i32,
        name_ptr: *const u8,
        name_len: i32,
        value_ptr: *const u8,
        value_len: i32,
    ) -> i32;
    /// Removes header `name`; returns how many values were removed.
    pub fn header_remove(target: i32, name_ptr: *const u8, name_len: i32) -> i32;
    /// Records a cache decision (`CACHE_*`).
    pub fn cache_set(op: i32, value: i64) -> i32;
    /// Answers the request directly with `status` and a small body.
    pub fn respond(status: i32, body_ptr: *const u8, body_len: i32) -> i32;
    /// Whether the replica store holds `key`: `REPLICA_*`.
    pub fn replica_state(key_ptr: *const u8, key_len: i32) -> i32;
    /// Copies the URL of a complete replica whose SHA-256 is `digest` into `out`.
    pub fn url_by_sha256(
        digest_ptr: *const u8,
        digest_len: i32,
        out_ptr: *mut u8,
        out_cap: i32,
    ) -> i32;
    /// Asks limiter `name` for a verdict on `key`: 0 allowed, > 0 seconds to wait.
    pub fn limiter_check(
        name_ptr: *const u8,
        name_len: i32,
        key_ptr: *const u8,
        key_len: i32,
    ) -> i32;
    /// Copies the `index`-th value of parameter `name` into `out`.
    pub fn param_get(
        name_ptr: *const u8,
        name_len: i32,
        index: i32,
        out_ptr: *mut u8,
        out_cap: i32,
    ) -> i32;
    /// Logs a message at `level` (`LOG_*`).
    pub fn log(level: i32, ptr: *const u8, len: i32) -> i32;
    /// Version 2, `on_body` only: copies the response body into `out`.
    pub fn body_get(out_ptr: *mut u8, out_cap: i32) -> i32;
    /// Version 2, `on_body` only: replaces the response body.
    pub fn body_set(ptr: *const u8, len: i32) -> i32;
    /// Version 3, `on_request` only: this call's effects may be reused for
    /// `seconds` on requests with the same values of what it read.
    pub fn reuse_outcome(seconds: i32) -> i32;
}

/// The ABI version this SDK speaks (2 added `on_body`, 3
/// `reuse_outcome`).
pub const ABI_VERSION: i32 = 3;

/// `request_get`: the method.
pub const FIELD_METHOD: i32 = 0;
/// `request_get`/`request_set`: the absolute URL.
pub const FIELD_URL: i32 = 1;
/// `request_get`: the path.
pub const FIELD_PATH: i32 = 2;
/// `request_get`: the query, without `?`.
pub const FIELD_QUERY: i32 = 3;
/// `request_get`: the host (authority) of the URL.
pub const FIELD_HOST: i32 = 4;
/// `request_get`: the client address, `ip:port`.
pub const FIELD_CLIENT_ADDR: i32 = 5;
/// `request_get`: the client IP.
pub const FIELD_CLIENT_IP: i32 = 6;
/// `request_get`/`request_set`: the cache key.
pub const FIELD_CACHE_KEY: i32 = 7;
/// `request_get`/`request_set`: the upstream URL override.
pub const FIELD_UPSTREAM_URL: i32 = 8;

/// Header target: the request.
pub const TARGET_REQUEST: i32 = 0;
/// Header target: the response (the upstream's, or the direct answer's in `on_request`).
pub const TARGET_RESPONSE: i32 = 1;

/// `cache_set`: do not store the response (or, in `on_request`, bypass the cache).
pub const CACHE_UNCACHEABLE: i32 = 0;
/// `cache_set`: freshness lifetime in seconds.
pub const CACHE_TTL: i32 = 1;
/// `cache_set`: upper bound on the freshness lifetime in seconds.
pub const CACHE_TTL_CAP: i32 = 2;
/// `cache_set`: the content never changes; never revalidate.
pub const CACHE_IMMUTABLE: i32 = 3;

/// `replica_state`: not in the replica.
pub const REPLICA_ABSENT: i32 = 0;
/// `replica_state`: being filled, or an interrupted partial.
pub const REPLICA_PARTIAL: i32 = 1;
/// `replica_state`: complete.
pub const REPLICA_COMPLETE: i32 = 2;

/// `log` level: error.
pub const LOG_ERROR: i32 = 0;
/// `log` level: warning.
pub const LOG_WARN: i32 = 1;
/// `log` level: info.
pub const LOG_INFO: i32 = 2;
/// `log` level: debug.
pub const LOG_DEBUG: i32 = 3;

/// Error: no such header, parameter, field value or digest.
pub const ERR_NOT_FOUND: i32 = -1;
/// Error: a pointer range lies outside the guest's memory.
pub const ERR_OUT_OF_BOUNDS: i32 = -2;
/// Error: a malformed argument.
pub const ERR_INVALID: i32 = -3;
/// Error: not available in the current hook.
pub const ERR_WRONG_HOOK: i32 = -4;
/// Error: over a host cap.
pub const ERR_TOO_LARGE: i32 = -5;
/// Error: no limiter of that name is declared.
pub const ERR_UNKNOWN_LIMITER: i32 = -6;
