//! Metadata kept beside each replica (in the state directory, as JSON).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Metadata of a complete replica. Everything needed to answer a request
/// from the file without asking the upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The cache key (see [`super::CacheKey`]).
    pub key: String,
    /// The upstream URL the bytes came from (may differ from the key for
    /// mirrors and store-ids).
    pub url: String,
    /// Path of the replica file relative to the root, as committed.
    pub replica: String,
    /// Upstream status; always 200 for replicas.
    pub status: u16,
    /// End-to-end response headers as stored (hop-by-hop and `Set-Cookie`
    /// removed), in upstream order.
    pub headers: Vec<(String, String)>,
    /// The RFC 9111 state: freshness, Vary, validators.
    pub policy: http_cache_semantics::CachePolicy,
    /// Body length in bytes.
    pub length: u64,
    /// SHA-256 of the body, lower-case hex.
    pub sha256: String,
    /// When the body was stored, seconds since the Unix epoch.
    pub stored_at: u64,
    /// Last successful (re)validation with the upstream, seconds since the
    /// Unix epoch.
    pub validated_at: u64,
    /// A policy marked the object immutable: never revalidated.
    #[serde(default)]
    pub immutable: bool,
    /// A policy capped or set the time to live, in seconds from
    /// `validated_at`; overrides the HTTP freshness.
    #[serde(default)]
    pub ttl_override: Option<u64>,
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
