//! Fleet-wide counters: every second, what this node's counters gained
//! since the last flush is added to hashes in Redis (`HINCRBY
//! cistern:count:<set> <field> <delta>`), so each hash holds the fleet's
//! total. Nothing is sent per request: the flusher reads the counters the
//! admin already keeps and sends their growth. A counter that went down
//! (a reload rebuilt it, the per-file table dropped a file) counts from
//! zero again.
//!
//! Sets: `redirects` (mirror, upstream), `fetches` and `failures`
//! (mirror, upstream: requests a mirror set sent its upstreams) and
//! `files:<YYYY-MM-DD>` (mirror, file: that day's redirects of the files
//! the bounded per-file table tracks; kept in Redis for eight days).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::{Inner, OP_TIMEOUT, PREFIX, link};

/// How often counters are flushed to Redis.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How long a day's per-file hash is kept in Redis.
const FILES_KEPT: Duration = Duration::from_secs(8 * 24 * 3600);

/// One counter of this node: its set, its labels and its value since
/// start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSample {
    /// `redirects`, `fetches`, `failures` or `files:YYYY-MM-DD`.
    pub set: String,
    /// `[mirror, upstream]`, or `[mirror, file]` for `files:…`.
    pub labels: [String; 2],
    /// The count since start.
    pub value: u64,
}

/// Reads this node's counters (the admin's redirect book and the mirror
/// sets' health).
pub type SampleSource = Arc<dyn Fn() -> Vec<CounterSample> + Send + Sync>;

/// What the flusher last sent.
#[derive(Default)]
pub(crate) struct Counters {
    source: std::sync::Mutex<Option<SampleSource>>,
}

/// `/api/fleet/counters`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct FleetCounters {
    /// `"redis"`: totals over every node that flushed into the fleet's
    /// Redis (this node's last second may be missing); `"local"`: this
    /// node's own, Redis being off or down.
    pub source: &'static str,
    /// Redirects per mirror and upstream.
    pub redirects: Vec<RedirectTotal>,
    /// Requests to each mirror upstream, and failures.
    pub upstreams: Vec<UpstreamTotal>,
    /// Redirects per file, per day, newest day first.
    pub files: Vec<FileTotal>,
}

/// Redirects of one mirror set to one upstream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RedirectTotal {
    /// The mirror block's name.
    pub mirror: String,
    /// The upstream's base URL.
    pub upstream: String,
    /// Redirects.
    pub redirects: u64,
}

/// Requests of one mirror set to one upstream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamTotal {
    /// The mirror block's name.
    pub mirror: String,
    /// The upstream's base URL.
    pub upstream: String,
    /// Requests sent to it.
    pub fetches: u64,
    /// Of which failed.
    pub failures: u64,
}

/// One file's redirects of one day.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileTotal {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// The mirror block's name.
    pub mirror: String,
    /// The path below the mirror's prefix.
    pub file: String,
    /// Redirects.
    pub redirects: u64,
}

fn field(labels: &[String; 2]) -> String {
    serde_json::to_string(labels).unwrap_or_default()
}

fn hash_key(set: &str) -> String {
    format!("{PREFIX}count:{set}")
}

/// Flushes the counters' growth every [`FLUSH_EVERY`] while Redis is up.
pub(crate) async fn flush(
    inner: Arc<Inner>,
    source: SampleSource,
    mut shutdown: watch::Receiver<bool>,
) {
    *inner
        .counters
        .source
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(source.clone());
    let mut sent: HashMap<(String, String), u64> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut target = inner.target.subscribe();
    loop {
        if target.borrow_and_update().is_none() {
            // No fleet configured: nothing to flush to, and no reason to
            // wake an idle process every second. The growth so far goes
            // with the first flush once a config names a Redis.
            tokio::select! {
                // The guard `wait_for` returns is not Send: not in the output.
                () = async { let _ = target.wait_for(Option::is_some).await; } => {}
                _ = shutdown.changed() => return,
            }
            tick.reset();
            continue;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some(conn) = inner.conn() else { continue };
        let mut pipe = redis::pipe();
        // What `sent` becomes once this flush is through: the counters as
        // they are now, so those no longer kept (a day gone by, a file
        // dropped from the table) leave it too.
        let mut now: HashMap<(String, String), u64> = HashMap::new();
        for s in source() {
            let k = (s.set, field(&s.labels));
            let last = sent.get(&k).copied().unwrap_or(0);
            let delta = if s.value >= last {
                s.value - last
            } else {
                s.value
            };
            if delta > 0 {
                let key = hash_key(&k.0);
                pipe.hincr(&key, &k.1, delta).ignore();
                if k.0.starts_with("files:") {
                    pipe.expire(&key, FILES_KEPT.as_secs() as i64).ignore();
                }
            }
            now.insert(k, s.value);
        }
        if pipe.is_empty() {
            sent = now;
            continue;
        }
        let mut c = conn.conn.clone();
        match link::run_pipe::<()>(&mut c, &pipe, OP_TIMEOUT).await {
            Ok(()) => sent = now,
            // Not sent: the growth goes with the next flush.
            Err(why) => inner.failed(conn.generation, &why),
        }
    }
}

/// The fleet's totals, or this node's own.
pub(crate) async fn fleet(inner: &Inner) -> FleetCounters {
    let local: Vec<CounterSample> = {
        let source = inner
            .counters
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        source.map(|s| s()).unwrap_or_default()
    };
    if let Some(conn) = inner.conn() {
        match read(&conn, &local, inner.clock.now()).await {
            Ok(samples) => return totals("redis", samples),
            Err(why) => inner.failed(conn.generation, &why),
        }
    }
    totals("local", local)
}

/// Reads the fleet's hashes: the fixed sets, and a per-file hash for each
/// of the last days.
async fn read(
    conn: &super::Conn,
    local: &[CounterSample],
    now: std::time::SystemTime,
) -> Result<Vec<CounterSample>, String> {
    let mut sets: Vec<String> = ["redirects", "fetches", "failures"]
        .map(String::from)
        .to_vec();
    let today = now
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    for back in 0..crate::observe::redirects::DAYS_KEPT as u64 {
        sets.push(format!(
            "files:{}",
            crate::observe::redirects::date_of(today.saturating_sub(back))
        ));
    }
    // Days this node knows of (a clock behind the others').
    for s in local {
        if !sets.contains(&s.set) {
            sets.push(s.set.clone());
        }
    }
    let mut pipe = redis::pipe();
    for s in &sets {
        pipe.hgetall(hash_key(s));
    }
    let mut c = conn.conn.clone();
    let hashes: Vec<Vec<(String, u64)>> = link::run_pipe(&mut c, &pipe, OP_TIMEOUT).await?;
    Ok(sets
        .into_iter()
        .zip(hashes)
        .flat_map(|(set, fields)| {
            fields.into_iter().filter_map(move |(f, value)| {
                let labels: [String; 2] = serde_json::from_str(&f).ok()?;
                Some(CounterSample {
                    set: set.clone(),
                    labels,
                    value,
                })
            })
        })
        .collect())
}

fn totals(source: &'static str, samples: Vec<CounterSample>) -> FleetCounters {
    let mut out = FleetCounters {
        source,
        ..FleetCounters::default()
    };
    let mut upstreams: HashMap<[String; 2], (u64, u64)> = HashMap::new();
    for s in samples {
        let [a, b] = s.labels;
        match s.set.as_str() {
            "redirects" => out.redirects.push(RedirectTotal {
                mirror: a,
                upstream: b,
                redirects: s.value,
            }),
            "fetches" => upstreams.entry([a, b]).or_default().0 += s.value,
            "failures" => upstreams.entry([a, b]).or_default().1 += s.value,
            set => {
                if let Some(date) = set.strip_prefix("files:") {
                    out.files.push(FileTotal {
                        date: date.to_owned(),
                        mirror: a,
                        file: b,
                        redirects: s.value,
                    });
                }
            }
        }
    }
    out.upstreams = upstreams
        .into_iter()
        .map(|([mirror, upstream], (fetches, failures))| UpstreamTotal {
            mirror,
            upstream,
            fetches,
            failures,
        })
        .collect();
    out.redirects
        .sort_by(|x, y| (&x.mirror, &x.upstream).cmp(&(&y.mirror, &y.upstream)));
    out.upstreams
        .sort_by(|x, y| (&x.mirror, &x.upstream).cmp(&(&y.mirror, &y.upstream)));
    out.files.sort_by(|x, y| {
        y.date
            .cmp(&x.date)
            .then(x.mirror.cmp(&y.mirror))
            .then(y.redirects.cmp(&x.redirects))
            .then(x.file.cmp(&y.file))
    });
    out
}
