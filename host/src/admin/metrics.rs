//! Process-wide counters and their Prometheus text rendering.
//!
//! [`Metrics`] is a handful of atomics owned by the fetch engine, so it
//! outlives config reloads; the request path only does relaxed adds on it.
//! Everything else `/metrics` shows (replica size, policies, mirrors,
//! reloads) is read from its owner when scraped. The text format is written
//! by hand: the metric set is fixed and small, and a registry crate would
//! add a dependency and a lock for no gain.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::accesslog::CacheOutcome;
use crate::gate::GateStats;

/// Every cache outcome, in the order of [`Metrics::requests`].
pub const OUTCOMES: [CacheOutcome; 9] = [
    CacheOutcome::Hit,
    CacheOutcome::Miss,
    CacheOutcome::Coalesced,
    CacheOutcome::Revalidated,
    CacheOutcome::StaleOnError,
    CacheOutcome::StaleRevalidating,
    CacheOutcome::Pass,
    CacheOutcome::Tunnel,
    CacheOutcome::Local,
];

fn outcome_index(outcome: CacheOutcome) -> usize {
    match outcome {
        CacheOutcome::Hit => 0,
        CacheOutcome::Miss => 1,
        CacheOutcome::Coalesced => 2,
        CacheOutcome::Revalidated => 3,
        CacheOutcome::StaleOnError => 4,
        CacheOutcome::StaleRevalidating => 5,
        CacheOutcome::Pass => 6,
        CacheOutcome::Tunnel => 7,
        CacheOutcome::Local => 8,
    }
}

/// Counters of the request path. All monotonic; reads are relaxed, so a
/// scrape may see one counter a request ahead of another.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; OUTCOMES.len()],
    client_bytes: AtomicU64,
    upstream_bytes: AtomicU64,
    upstream_requests: AtomicU64,
    upstream_failures: AtomicU64,
    fills: AtomicU64,
    fills_failed: AtomicU64,
    coalesced_followers: AtomicU64,
    limited: AtomicU64,
    store_refusals: AtomicU64,
}

/// A copy of the counters at one moment (JSON API, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Requests by cache outcome, as `(outcome, count)` in [`OUTCOMES`] order.
    pub requests: Vec<(&'static str, u64)>,
    /// Response body bytes sent to clients.
    pub client_bytes: u64,
    /// Body bytes that fills received from upstreams.
    pub upstream_bytes: u64,
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
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, outcome: CacheOutcome) {
        self.requests[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts body bytes sent to a client.
    pub fn client_bytes(&self, n: u64) {
        self.client_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts body bytes a fill received from an upstream.
    pub fn upstream_bytes(&self, n: u64) {
        self.upstream_bytes.fetch_add(n, Ordering::Relaxed);
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
                .map(|o| (o.as_str(), self.requests(*o)))
                .collect(),
            client_bytes: load(&self.client_bytes),
            upstream_bytes: load(&self.upstream_bytes),
            upstream_requests: load(&self.upstream_requests),
            upstream_failures: load(&self.upstream_failures),
            fills: load(&self.fills),
            fills_failed: load(&self.fills_failed),
            coalesced_followers: load(&self.coalesced_followers),
            limited: load(&self.limited),
            store_refusals: load(&self.store_refusals),
        }
    }
}

/// Writes Prometheus text exposition format (version 0.0.4).
#[derive(Default)]
pub struct PromWriter {
    out: String,
}

/// Counter or gauge.
#[derive(Clone, Copy)]
pub enum Kind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl PromWriter {
    /// Starts a metric family with its help text and type.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes what the replica store found wrong on disk since it opened.
pub fn write_store_health(w: &mut PromWriter, h: &crate::store::StoreHealth) {
    w.single(
        "cistern_metadata_quarantined_total",
        Kind::Counter,
        "Replica metadata files that could not be read and were moved into the state directory's quarantine/ folder (their files stay in the tree and are fetched again).",
        h.quarantined,
    );
    w.single(
        "cistern_replicas_changed_outside_total",
        Kind::Counter,
        "Replicas dropped because their file was deleted, resized or modified outside Cistern (they are fetched again).",
        h.changed_outside,
    );
}

/// Writes the request-path counters.
pub fn write_counters(w: &mut PromWriter, m: &MetricsSnapshot) {
    w.family(
        "cistern_requests_total",
        Kind::Counter,
        "Requests answered, by cache outcome.",
    );
    for (outcome, n) in &m.requests {
        w.sample("cistern_requests_total", &[("cache", outcome)], n);
    }
    w.single(
        "cistern_client_bytes_total",
        Kind::Counter,
        "Response body bytes sent to clients.",
        m.client_bytes,
    );
    w.single(
        "cistern_upstream_bytes_total",
        Kind::Counter,
        "Body bytes received from upstreams by fills (pass-through bodies are not counted).",
        m.upstream_bytes,
    );
    w.single(
        "cistern_upstream_requests_total",
        Kind::Counter,
        "Requests sent to upstreams, failover attempts included.",
        m.upstream_requests,
    );
    w.single(
        "cistern_upstream_failures_total",
        Kind::Counter,
        "Upstream requests that failed: no connection, timeout or 5xx.",
        m.upstream_failures,
    );
    w.single(
        "cistern_fills_total",
        Kind::Counter,
        "Upstream fetches into the replica started (one per key, however many clients).",
        m.fills,
    );
    w.single(
        "cistern_fills_failed_total",
        Kind::Counter,
        "Fills that ended in an error (the partial file is kept for resuming).",
        m.fills_failed,
    );
    w.single(
        "cistern_coalesced_followers_total",
        Kind::Counter,
        "Requests that read along a fill another request had started.",
        m.coalesced_followers,
    );
    w.single(
        "cistern_limited_requests_total",
        Kind::Counter,
        "Requests refused with 429 by the per-client rate limit.",
        m.limited,
    );
    w.single(
        "cistern_store_refusals_total",
        Kind::Counter,
        "Responses the replica could not keep (no disk room beside min-free, or a write error): passed through unstored, or cut when the disk ran full mid-body.",
        m.store_refusals,
    );
}

/// Writes the connection gates' counts, one sample per listener kind
/// (`proxy`, `admin`).
pub fn write_connections(w: &mut PromWriter, gates: &[(&str, GateStats)]) {
    w.family(
        "cistern_connections_open",
        Kind::Gauge,
        "Client connections open now (CONNECT tunnels included).",
    );
    for (listener, g) in gates {
        w.sample(
            "cistern_connections_open",
            &[("listener", listener)],
            g.open,
        );
    }
    w.family(
        "cistern_connections_refused_total",
        Kind::Counter,
        "Connections closed as soon as accepted, by the cap they hit (max-connections, max-connections-per-client).",
    );
    for (listener, g) in gates {
        for (cap, n) in [
            ("max-connections", g.refused_total),
            ("max-connections-per-client", g.refused_per_client),
        ] {
            w.sample(
                "cistern_connections_refused_total",
                &[("listener", listener), ("cap", cap)],
                n,
            );
        }
    }
    w.family(
        "cistern_connections_silent_closed_total",
        Kind::Counter,
        "Connections closed because no whole request (and TLS handshake) arrived within the idle timeout of their accept.",
    );
    for (listener, g) in gates {
        w.sample(
            "cistern_connections_silent_closed_total",
            &[("listener", listener)],
            g.silent,
        );
    }
    let tunnels: u64 = gates.iter().map(|(_, g)| g.idle_tunnels).sum();
    w.single(
        "cistern_tunnels_idle_closed_total",
        Kind::Counter,
        "CONNECT tunnels closed after the idle timeout with no byte either way.",
        tunnels,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut w = PromWriter::default();
        w.family("x", Kind::Gauge, "help");
        w.sample("x", &[("a", "q\"b\\c\nd"), ("z", "ok")], 1);
        assert_eq!(
            w.finish(),
            "# HELP x help\n# TYPE x gauge\nx{a=\"q\\\"b\\\\c\\nd\",z=\"ok\"} 1\n"
        );
    }

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
