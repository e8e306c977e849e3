//! What the cache did for one request: the word the access log, the
//! `Cache-Status` header and the request counters all use.

/// What the log line says about the cache, as in `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the replica without asking upstream.
    Hit,
    /// Fetched from upstream and stored; this client started the fetch.
    Miss,
    /// Read along another client's fetch of the same key.
    Coalesced,
    /// The replica was stale; the upstream confirmed it (304).
    Revalidated,
    /// The replica was stale and the upstream failed (connect error,
    /// timeout, 5xx): served stale, as `stale-if-error` allows.
    StaleOnError,
    /// The replica was stale and served at once while a background fetch
    /// revalidates it, as `stale-while-revalidate` allows.
    StaleRevalidating,
    /// Passed through without storing (other methods, unshareable responses,
    /// another Vary variant).
    Pass,
    /// A CONNECT tunnel.
    Tunnel,
    /// Answered by Cistern itself (status page, errors, limits).
    Local,
}

impl CacheOutcome {
    /// The word used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::StaleOnError => "stale",
            CacheOutcome::StaleRevalidating => "stale-revalidating",
            CacheOutcome::Pass => "pass",
            CacheOutcome::Tunnel => "tunnel",
            CacheOutcome::Local => "local",
        }
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "cistern; hit",
            CacheOutcome::Miss => "cistern; fwd=miss; stored",
            CacheOutcome::Coalesced => "cistern; fwd=miss; collapsed",
            CacheOutcome::Revalidated => "cistern; hit; fwd=stale; fwd-status=304",
            CacheOutcome::StaleOnError => "cistern; hit; fwd=stale; detail=stale-if-error",
            CacheOutcome::StaleRevalidating => {
                "cistern; hit; fwd=stale; detail=stale-while-revalidate"
            }
            CacheOutcome::Pass => "cistern; fwd=bypass",
            CacheOutcome::Tunnel | CacheOutcome::Local => "cistern; detail=local",
        }
    }
}
