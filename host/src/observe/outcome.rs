//! What the cache did for one request (in the spirit of Pingora's
//! `CachePhase`): the one value the access log, the `Cache-Status` header
//! and the request counters all read, so the three never disagree. A pass
//! says why nothing was stored ([`NoCacheReason`]).

/// What the log line says about the cache, as in `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the replica without asking upstream.
    Hit,
    /// Fetched from upstream and stored; this client started the fetch.
    Miss,
    /// The replica was stale and the upstream sent a new response, which
    /// replaced it; this client started the fetch (RFC 9211 `fwd=stale`).
    Refreshed,
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
    /// Passed through without storing, for the reason given.
    Pass(NoCacheReason),
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
            CacheOutcome::Refreshed => "refreshed",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::StaleOnError => "stale",
            CacheOutcome::StaleRevalidating => "stale-revalidating",
            CacheOutcome::Pass(reason) => reason.log_word(),
            CacheOutcome::Tunnel => "tunnel",
            CacheOutcome::Local => "local",
        }
    }

    /// The outcome without its detail (`pass` for every pass): the
    /// `cache` label of the request counters.
    pub fn kind(self) -> &'static str {
        match self {
            CacheOutcome::Pass(_) => "pass",
            other => other.as_str(),
        }
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "cistern; hit",
            CacheOutcome::Miss => "cistern; fwd=miss; stored",
            CacheOutcome::Refreshed => "cistern; fwd=stale; stored",
            CacheOutcome::Coalesced => "cistern; fwd=miss; collapsed",
            CacheOutcome::Revalidated => "cistern; hit; fwd=stale; fwd-status=304",
            CacheOutcome::StaleOnError => "cistern; hit; fwd=stale; detail=stale-if-error",
            CacheOutcome::StaleRevalidating => {
                "cistern; hit; fwd=stale; detail=stale-while-revalidate"
            }
            CacheOutcome::Pass(reason) => reason.cache_status(),
            CacheOutcome::Tunnel | CacheOutcome::Local => "cistern; detail=local",
        }
    }
}

/// Why a response went to its client without being stored: what operators
/// ask when a file they expected in the replica is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCacheReason {
    /// The method is not cached (only GET and HEAD are).
    Method,
    /// A policy asked to bypass the cache for this request.
    PolicyBypass,
    /// A policy marked the response uncacheable.
    PolicyUncacheable,
    /// The replica holds another variant of this URL (`Vary`).
    OtherVariant,
    /// A HEAD for something not stored: answered upstream, never stored
    /// (a HEAD starts no download).
    HeadOnly,
    /// The response forbids a shared cache to keep it (`no-store`,
    /// `private`, `Authorization`, `Vary: *`), its status is not one
    /// that is stored, or it is a response other than 200 that is not
    /// kept (too big, no freshness, or it would replace what is stored).
    NotStorable,
    /// The replica's disk has no room for it beside `min-free`.
    NoRoom,
    /// The request switches protocols (`Upgrade`, e.g. WebSocket): its
    /// connection becomes a tunnel to the upstream.
    Upgrade,
    /// A query string on a mirror with `query "pass"`.
    Query,
}

impl NoCacheReason {
    /// Every reason, in the order of the counters.
    pub const ALL: [NoCacheReason; 9] = [
        NoCacheReason::Method,
        NoCacheReason::PolicyBypass,
        NoCacheReason::PolicyUncacheable,
        NoCacheReason::OtherVariant,
        NoCacheReason::HeadOnly,
        NoCacheReason::NotStorable,
        NoCacheReason::NoRoom,
        NoCacheReason::Upgrade,
        NoCacheReason::Query,
    ];

    /// A short name, as in metrics labels and `Cache-Status` details.
    pub fn as_str(self) -> &'static str {
        match self {
            NoCacheReason::Method => "method",
            NoCacheReason::PolicyBypass => "policy-bypass",
            NoCacheReason::PolicyUncacheable => "policy-uncacheable",
            NoCacheReason::OtherVariant => "other-variant",
            NoCacheReason::HeadOnly => "head",
            NoCacheReason::NotStorable => "not-storable",
            NoCacheReason::NoRoom => "no-room",
            NoCacheReason::Upgrade => "upgrade",
            NoCacheReason::Query => "query",
        }
    }

    /// The access log's word: `pass:` and the reason.
    fn log_word(self) -> &'static str {
        match self {
            NoCacheReason::Method => "pass:method",
            NoCacheReason::PolicyBypass => "pass:policy-bypass",
            NoCacheReason::PolicyUncacheable => "pass:policy-uncacheable",
            NoCacheReason::OtherVariant => "pass:other-variant",
            NoCacheReason::HeadOnly => "pass:head",
            NoCacheReason::NotStorable => "pass:not-storable",
            NoCacheReason::NoRoom => "pass:no-room",
            NoCacheReason::Upgrade => "pass:upgrade",
            NoCacheReason::Query => "pass:query",
        }
    }

    /// The RFC 9211 `Cache-Status`: `fwd=` names what sent the request
    /// upstream, `detail=` Cistern's reason; no `stored`.
    fn cache_status(self) -> &'static str {
        match self {
            NoCacheReason::Method => "cistern; fwd=method",
            NoCacheReason::PolicyBypass => "cistern; fwd=bypass; detail=policy-bypass",
            NoCacheReason::PolicyUncacheable => "cistern; fwd=uri-miss; detail=policy-uncacheable",
            NoCacheReason::OtherVariant => "cistern; fwd=vary-miss",
            NoCacheReason::HeadOnly => "cistern; fwd=uri-miss; detail=head",
            NoCacheReason::NotStorable => "cistern; fwd=uri-miss; detail=not-storable",
            NoCacheReason::NoRoom => "cistern; fwd=uri-miss; detail=no-room",
            NoCacheReason::Upgrade => "cistern; fwd=method; detail=upgrade",
            NoCacheReason::Query => "cistern; fwd=bypass; detail=query",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_counters_in_order() {
        for (i, r) in NoCacheReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let pass = CacheOutcome::Pass(NoCacheReason::NoRoom);
        assert_eq!(pass.kind(), "pass");
        assert_eq!(pass.as_str(), "pass:no-room");
        assert!(pass.cache_status().ends_with("detail=no-room"));
    }
}
