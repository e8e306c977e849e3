//! The request path's counters: a handful of atomics owned by the fetch
//! engine, so they outlive config reloads; the request path only does
//! relaxed adds on them. The admin listener renders them (`/metrics`, the
//! JSON API); this module knows nothing of formats.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{CacheOutcome, NoCacheReason};

/// Every cache outcome, in the order of [`Metrics::requests`].
pub const OUTCOMES: [CacheOutcome; 10] = [
    CacheOutcome::Hit,
    CacheOutcome::Miss,
    CacheOutcome::Coalesced,
    CacheOutcome::Revalidated,
    CacheOutcome::StaleOnError,
    CacheOutcome::StaleRevalidating,
    CacheOutcome::Pass(NoCacheReason::Method),
    CacheOutcome::Tunnel,
    CacheOutcome::Local,
    CacheOutcome::Refreshed,
];

fn outcome_index(outcome: CacheOutcome) -> usize {
    match outcome {
        CacheOutcome::Hit => 0,
        CacheOutcome::Miss => 1,
        CacheOutcome::Coalesced => 2,
        CacheOutcome::Revalidated => 3,
        CacheOutcome::StaleOnError => 4,
        CacheOutcome::StaleRevalidating => 5,
        CacheOutcome::Pass(_) => 6,
        CacheOutcome::Tunnel => 7,
        CacheOutcome::Local => 8,
        CacheOutcome::Refreshed => 9,
    }
}

/// Counters of the request path. All monotonic; reads are relaxed, so a
/// scrape may see one counter a request ahead of another.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; OUTCOMES.len()],
    /// Passes by reason, in [`NoCacheReason::ALL`] order.
    passes: [AtomicU64; NoCacheReason::ALL.len()],
    client_bytes: AtomicU64,
    upstream_bytes: AtomicU64,
    peer_bytes: AtomicU64,
    upstream_requests: AtomicU64,
    upstream_failures: AtomicU64,
    fills: AtomicU64,
    fills_failed: AtomicU64,
    coalesced_followers: AtomicU64,
    limited: AtomicU64,
    store_refusals: AtomicU64,
    orphans_abandoned: AtomicU64,
    orphans_timed_out: AtomicU64,
    queries_dropped: AtomicU64,
    /// Redirects of the mirrors in redirect mode (behind a lock of their own).
    redirects: super::redirects::RedirectCounts,
}

/// A copy of the counters at one moment (JSON API, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Requests by cache outcome, as `(outcome, count)` in [`OUTCOMES`] order.
    pub requests: Vec<(&'static str, u64)>,
    /// Passes by reason, as `(reason, count)` in [`NoCacheReason::ALL`] order.
    pub passes: Vec<(&'static str, u64)>,
    /// Response body bytes sent to clients.
    pub client_bytes: u64,
    /// Body bytes that fills received from upstreams.
    pub upstream_bytes: u64,
    /// Body bytes that fills received from the key's owner in the fleet
    /// (`cluster`) instead of an upstream.
    pub peer_bytes: u64,
    /// Requests sent to upstreams (fills, revalidations, pass-through).
    pub upstream_requests: u64,
    /// Upstream requests that failed: no connection, timeout or 5xx.
    pub upstream_failures: u64,
    /// Fills started (one per coalesced group of clients).
    pub fills: u64,
    /// Fills that ended in an error.
    pub fills_failed: u64,
    /// Requests that joined a fill another request had started.
    pub coalesced_followers: u64,
    /// Requests refused with 429 by the per-client limit.
    pub limited: u64,
    /// Responses the replica store could not keep (no disk room, or a
    /// write error): passed through unstored, or cut when the disk ran full.
    pub store_refusals: u64,
    /// Fills with no reader left cut because they were not worth finishing
    /// (`orphan-finish-left`, `orphan-finish-done`).
    pub orphans_abandoned: u64,
    /// Fills with no reader left stopped after `orphan-fill`.
    pub orphans_timed_out: u64,
    /// Mirror requests whose query string was dropped (`query "ignore"`).
    pub queries_dropped: u64,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, outcome: CacheOutcome) {
        self.requests[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
        if let CacheOutcome::Pass(reason) = outcome {
            self.passes[reason as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts body bytes sent to a client.
    pub fn client_bytes(&self, n: u64) {
        self.client_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts body bytes a fill received from an upstream.
    pub fn upstream_bytes(&self, n: u64) {
        self.upstream_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts body bytes a fill received from a peer of the fleet.
    pub fn peer_bytes(&self, n: u64) {
        self.peer_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one request sent upstream and whether it failed.
    pub fn upstream_request(&self, failed: bool) {
        self.upstream_requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.upstream_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a fill started.
    pub fn fill_started(&self) {
        self.fills.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a fill that failed.
    pub fn fill_failed(&self) {
        self.fills_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request that joined a fill under way.
    pub fn coalesced_follower(&self) {
        self.coalesced_followers.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request refused by the per-client rate limit.
    pub fn limited(&self) {
        self.limited.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response the replica store could not keep.
    pub fn store_refusal(&self) {
        self.store_refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a fill with no reader left stopped: `abandoned` when the
    /// quick-abort rules found it not worth finishing, else after
    /// `orphan-fill`.
    pub fn orphan_stopped(&self, abandoned: bool) {
        let counter = if abandoned {
            &self.orphans_abandoned
        } else {
            &self.orphans_timed_out
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a mirror request whose query string was dropped.
    pub fn query_dropped(&self) {
        self.queries_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The redirect counters of mirrors in redirect mode.
    pub fn redirects(&self) -> &super::redirects::RedirectCounts {
        &self.redirects
    }

    /// Requests answered with `outcome` so far.
    pub fn requests(&self, outcome: CacheOutcome) -> u64 {
        self.requests[outcome_index(outcome)].load(Ordering::Relaxed)
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            requests: OUTCOMES
                .iter()
                .map(|o| (o.kind(), self.requests(*o)))
                .collect(),
            passes: NoCacheReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.passes[*r as usize].load(Ordering::Relaxed)))
                .collect(),
            client_bytes: load(&self.client_bytes),
            upstream_bytes: load(&self.upstream_bytes),
            peer_bytes: load(&self.peer_bytes),
            upstream_requests: load(&self.upstream_requests),
            upstream_failures: load(&self.upstream_failures),
            fills: load(&self.fills),
            fills_failed: load(&self.fills_failed),
            coalesced_followers: load(&self.coalesced_followers),
            limited: load(&self.limited),
            store_refusals: load(&self.store_refusals),
            orphans_abandoned: load(&self.orphans_abandoned),
            orphans_timed_out: load(&self.orphans_timed_out),
            queries_dropped: load(&self.queries_dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_land_on_their_outcome() {
        let m = Metrics::default();
        m.request(CacheOutcome::Hit);
        m.request(CacheOutcome::Hit);
        m.request(CacheOutcome::Coalesced);
        let s = m.snapshot();
        assert_eq!(s.requests[0], ("hit", 2));
        assert_eq!(s.requests[2], ("coalesced", 1));
        assert_eq!(s.requests[1], ("miss", 0));
    }
}
