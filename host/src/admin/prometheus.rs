//! The Prometheus text rendering of `/metrics`: the request-path counters
//! ([`crate::observe::Metrics`]) and everything else `/metrics` shows
//! (replica size, policies, mirrors, reloads, connections), read from its
//! owner when scraped. The text format is written
//! by hand: the metric set is fixed and small, and a registry crate would
//! add a dependency and a lock for no gain.

use crate::gate::GateStats;
use crate::observe::MetricsSnapshot;
use std::fmt::Write as _;

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

/// Writes the state of the fleet's peers (`cluster`).
pub fn write_peers(w: &mut PromWriter, peers: &[crate::fetch::peer::PeerHealth]) {
    if peers.is_empty() {
        return;
    }
    w.family(
        "cistern_peer_up",
        Kind::Gauge,
        "1 while a peer of the fleet is asked for the keys it owns, 0 while it is skipped after a failure (`peer-down`).",
    );
    for p in peers {
        w.sample("cistern_peer_up", &[("peer", &p.name)], u64::from(!p.down));
    }
    w.family(
        "cistern_peer_requests_total",
        Kind::Counter,
        "Fill requests sent to a peer of the fleet.",
    );
    for p in peers {
        w.sample("cistern_peer_requests_total", &[("peer", &p.name)], p.asked);
    }
    w.family(
        "cistern_peer_failures_total",
        Kind::Counter,
        "Fill requests to a peer that failed (no connection, timeout, 5xx, refused); each fill then went to the upstream.",
    );
    for p in peers {
        w.sample(
            "cistern_peer_failures_total",
            &[("peer", &p.name)],
            p.failed,
        );
    }
}

/// Writes the shared state's health, with `cluster { redis }` only.
pub fn write_redis(w: &mut PromWriter, r: &crate::shared::RedisStatus) {
    if r.url.is_none() {
        return;
    }
    w.single(
        "cistern_redis_up",
        Kind::Gauge,
        "1 while the fleet's shared state is in Redis, 0 while Redis is unreachable and this node uses its own (digest index, limiters, counters).",
        u64::from(r.up),
    );
    w.single(
        "cistern_redis_errors_total",
        Kind::Counter,
        "Redis commands and connection attempts that failed or took too long.",
        r.errors,
    );
    w.single(
        "cistern_redis_digests_written_total",
        Kind::Counter,
        "Digest index entries this node wrote to Redis (held or dropped, resyncs included).",
        r.digests_written,
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
    w.family(
        "cistern_passes_total",
        Kind::Counter,
        "Responses passed to their client without being stored, by reason.",
    );
    for (reason, n) in &m.passes {
        w.sample("cistern_passes_total", &[("reason", reason)], n);
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
        "cistern_peer_bytes_total",
        Kind::Counter,
        "Body bytes received by fills from the key's owner in the fleet (`cluster`) instead of an upstream.",
        m.peer_bytes,
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
    w.family(
        "cistern_orphan_fills_stopped_total",
        Kind::Counter,
        "Fills whose clients had all gone, cut before their end (the partial is kept for a resume), by why: not-worth-finishing (orphan-finish-left, orphan-finish-done) or orphan-fill (ran past it).",
    );
    for (why, n) in [
        ("not-worth-finishing", m.orphans_abandoned),
        ("orphan-fill", m.orphans_timed_out),
    ] {
        w.sample("cistern_orphan_fills_stopped_total", &[("reason", why)], n);
    }
    w.single(
        "cistern_mirror_queries_dropped_total",
        Kind::Counter,
        "Mirror requests whose query string was dropped before the cache key and the upstream (query \"ignore\").",
        m.queries_dropped,
    );
}

/// Writes the fill caps' counts (`max-fills`, `max-fills-per-client`).
pub fn write_fill_caps(w: &mut PromWriter, f: &crate::fetch::FillGateStats) {
    w.single(
        "cistern_fill_permits_in_use",
        Kind::Gauge,
        "Fills holding a place under max-fills now (followers of a fill take none).",
        f.in_flight,
    );
    w.family(
        "cistern_fills_refused_total",
        Kind::Counter,
        "Requests answered 503 because their miss would have started a fill over a cap, by cap.",
    );
    for (cap, n) in [
        ("max-fills", f.refused_total),
        ("max-fills-per-client", f.refused_per_client),
    ] {
        w.sample("cistern_fills_refused_total", &[("cap", cap)], n);
    }
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
    w.family(
        "cistern_connections_stalled_closed_total",
        Kind::Counter,
        "Connections closed because their client took none of the data sent to it for the send timeout (a slow or stuck reader), by what stalled: the socket, or an HTTP/2 stream left without flow-control window.",
    );
    for (listener, g) in gates {
        for (reason, n) in [("socket", g.stalled), ("stream", g.stalled_streams)] {
            w.sample(
                "cistern_connections_stalled_closed_total",
                &[("listener", listener), ("reason", reason)],
                n,
            );
        }
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
}
