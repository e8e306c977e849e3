//! Metadata kept beside each replica (in the state directory, as JSON).
//! The in-memory types are here; their on-disk form, its versions and the
//! migration of older ones are in [`format`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, StatusCode, Uri};
use http_cache_semantics::{CacheOptions, CachePolicy};
use serde::{Deserialize, Serialize};

pub use format::{META_VERSION, MetaError, decode_object, encode_object};

pub mod format;

/// Metadata of a complete replica. Everything needed to answer a request
/// from the file without asking the upstream.
///
/// On disk it is Cistern's own versioned format ([`encode_object`],
/// [`decode_object`], documented in `docs/replica.md`), never a third-party
/// crate's serde layout: `policy` is rebuilt from `rfc` when it is read.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// The cache key (see [`super::CacheKey`]).
    pub key: String,
    /// The upstream URL the bytes came from (may differ from the key for
    /// mirrors and store-ids).
    pub url: String,
    /// Path of the replica file relative to the root, as committed; empty
    /// for a response kept aside (any status but 200, see
    /// [`ObjectMeta::in_tree`]).
    pub replica: String,
    /// Upstream status: 200 for a file in the tree, any other storable
    /// status for a response kept aside.
    pub status: u16,
    /// End-to-end response headers as served (hop-by-hop and `Set-Cookie`
    /// removed), in upstream order.
    pub headers: Vec<(String, String)>,
    /// The RFC 9111 inputs the freshness rules are computed from.
    pub rfc: RfcInputs,
    /// The RFC 9111 state (freshness, Vary, validators), built from `rfc`.
    pub policy: CachePolicy,
    /// Body length in bytes.
    pub length: u64,
    /// SHA-256 of the body, lower-case hex.
    pub sha256: String,
    /// Size and modification time of the replica file as committed; `None`
    /// until the store commits it (or for metadata from before they were
    /// recorded, until the next load records them).
    pub file: Option<FileStamp>,
    /// When the body was stored, seconds since the Unix epoch.
    pub stored_at: u64,
    /// Last successful (re)validation with the upstream, seconds since the
    /// Unix epoch.
    pub validated_at: u64,
    /// A policy marked the object immutable: never revalidated.
    pub immutable: bool,
    /// A policy capped or set the time to live, in seconds from
    /// `validated_at`; overrides the HTTP freshness.
    pub ttl_override: Option<u64>,
}

impl ObjectMeta {
    /// Whether the body is a file in the browsable tree. Only a 200 is: a
    /// redirect, a 404 or an error page is kept aside, its body beside its
    /// metadata in the state directory (`objects/ab/<hash>.body`), so the
    /// tree only ever holds the resources themselves and a 404 never takes
    /// the place where the real file will go.
    pub fn in_tree(&self) -> bool {
        self.status == 200
    }

    /// The stored response headers as a map (room left for the few a hit
    /// adds: `Age`, `Cache-Status`, `Via`, digests).
    pub fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::with_capacity(self.headers.len() + 6);
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                map.append(k, v);
            }
        }
        map
    }
}

/// The request and response a replica's freshness is computed from
/// (RFC 9111 §4): what `http-cache-semantics` needs to rebuild its
/// [`CachePolicy`] exactly, and nothing that identifies a client.
#[derive(Debug, Clone)]
pub struct RfcInputs {
    /// The request method (GET for every fill).
    pub method: Method,
    /// The request URI: the cache key.
    pub uri: Uri,
    /// The request headers that decide whether a stored response matches a
    /// later request: `Host` and those the response's `Vary` names.
    pub request_headers: HeaderMap,
    /// The response status as stored.
    pub status: StatusCode,
    /// The response headers as received (policy edits included), without
    /// hop-by-hop headers; `Set-Cookie` is kept with an empty value because
    /// its presence changes freshness but its value must not be stored.
    pub response_headers: HeaderMap,
    /// When the fetch began asking the upstream for this response.
    pub request_time: SystemTime,
    /// When the response head arrived (the base of `Age`).
    pub response_time: SystemTime,
}

impl RfcInputs {
    /// Records an exchange: keeps of the request only the headers that
    /// select it (`Host`, and those the response's `Vary` names), and of
    /// the response every header, `Set-Cookie` without its value.
    pub fn new(
        method: Method,
        uri: Uri,
        request_headers: &HeaderMap,
        status: StatusCode,
        response_headers: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> RfcInputs {
        let mut selecting = HeaderMap::new();
        let vary = response_headers
            .get_all(http::header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty() && *n != "*");
        for name in std::iter::once("host").chain(vary) {
            let Ok(name) = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            else {
                continue;
            };
            if selecting.contains_key(&name) {
                continue;
            }
            for value in request_headers.get_all(&name) {
                selecting.append(name.clone(), value.clone());
            }
        }
        let mut response = HeaderMap::with_capacity(response_headers.len());
        for (name, value) in response_headers {
            let value = if *name == http::header::SET_COOKIE {
                http::HeaderValue::from_static("")
            } else {
                value.clone()
            };
            response.append(name.clone(), value);
        }
        RfcInputs {
            method,
            uri,
            request_headers: selecting,
            status,
            response_headers: response,
            request_time,
            response_time,
        }
    }

    /// The RFC 9111 state for these inputs, as at the time they were
    /// recorded: `response_time` is handed to the rules, so `Age` keeps
    /// counting from when the response arrived, not from when it was loaded.
    pub fn policy(&self) -> CachePolicy {
        let mut req = http::Request::new(()).into_parts().0;
        req.method = self.method.clone();
        req.uri = self.uri.clone();
        req.headers = self.request_headers.clone();
        let mut resp = http::Response::new(()).into_parts().0;
        resp.status = status_for_rules(self.status);
        resp.headers = self.response_headers.clone();
        CachePolicy::new_options(&req, &resp, self.response_time, cache_options())
    }
}

/// The statuses `http-cache-semantics` stores, with their own rules
/// (heuristically cacheable or not), besides 206 and 304, which Cistern
/// never keeps as a stored response.
pub const STATUSES_THE_RULES_KNOW: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// The status `http-cache-semantics` is shown for a response of `status`.
/// The crate predates RFC 9111 and never stores a status outside
/// [`STATUSES_THE_RULES_KNOW`]; RFC 9111 §3 stores any final status that
/// has explicit freshness (`max-age`, `s-maxage`, `Expires`, `public`),
/// heuristically only those of RFC 9110 §15.1. So any other final status
/// (a 503, a 429, an unknown 599) is shown as 302, whose rules are exactly
/// those: stored with explicit freshness only, never by heuristic.
pub fn status_for_rules(status: StatusCode) -> StatusCode {
    let known = STATUSES_THE_RULES_KNOW.contains(&status.as_u16())
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational();
    if known { status } else { StatusCode::FOUND }
}

/// The shared-cache options Cistern evaluates every response with.
pub fn cache_options() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

/// What the store recorded about a replica file when it committed it; a
/// file whose size or modification time differs was changed outside
/// Cistern and its recorded digest no longer vouches for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl FileStamp {
    /// The stamp of a file's metadata (from `fstat`/`lstat`).
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt as _;
        FileStamp {
            size: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }
}

/// Metadata of a partial file: enough to resume the download with
/// `Range` + `If-Range` after an upstream failure or a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartialMeta {
    /// The cache key.
    pub key: String,
    /// The upstream URL being fetched.
    pub url: String,
    /// The full length announced by the upstream, if it announced one.
    pub total_length: Option<u64>,
    /// The upstream's strong `ETag`, if any (used in `If-Range`).
    pub etag: Option<String>,
    /// The upstream's `Last-Modified`, if any (used in `If-Range` when there
    /// is no strong ETag).
    pub last_modified: Option<String>,
    /// When the fill started, seconds since the Unix epoch.
    pub started_at: u64,
}

/// Seconds since the Unix epoch for a `SystemTime` (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `SystemTime` for seconds since the Unix epoch.
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
