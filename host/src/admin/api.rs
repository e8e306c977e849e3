//! The JSON API's documents, built from the engines' state. The HTML pages
//! render the same structs, so the UI never shows something the API hides.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::CacheMode;
use crate::fetch::{Fill, FillState};
use crate::pipeline::Proxy;
use crate::reload::ReloadStatus;
use crate::snapshot::Snapshot;
use crate::store::meta::unix_secs;
use crate::store::{Replica, ReplicaPath};

use crate::observe::MetricsSnapshot;

/// Directory entries per page when the request does not say.
pub const DEFAULT_PAGE: usize = 500;
/// The most entries one page may ask for.
pub const MAX_PAGE: usize = 5000;

/// `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Cistern's version.
    pub version: &'static str,
    /// When the process started, seconds since the Unix epoch.
    pub started_at: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// The config file, if Cistern runs from one.
    pub config_source: Option<String>,
    /// 1 at start, +1 per successful reload.
    pub config_generation: u64,
    /// Why the last reload was refused; `None` when it succeeded (or none
    /// was tried).
    pub last_reload_error: Option<String>,
    /// When the current generation began or the last reload was tried,
    /// seconds since the Unix epoch.
    pub last_reload_at: u64,
    /// Reloads refused so far.
    pub reload_failures: u64,
    /// `normal`, `static` or `offline`.
    pub mode: &'static str,
    /// The replica root directory.
    pub replica_root: String,
    /// Complete files in the replica.
    pub replica_files: u64,
    /// Their bytes.
    pub replica_bytes: u64,
    /// Fills under way.
    pub downloads_in_progress: usize,
    /// The request counters.
    pub counters: MetricsSnapshot,
}

/// Builds `/api/status`.
pub fn status(proxy: &Proxy, started: SystemTime, reload: &ReloadStatus) -> Status {
    let snap = proxy.snapshot();
    let engine = proxy.engine();
    let stats = engine.store().stats();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        started_at: unix_secs(started),
        uptime_secs: SystemTime::now()
            .duration_since(started)
            .map_or(0, |d| d.as_secs()),
        config_source: snap.config.source.as_ref().map(|p| p.display().to_string()),
        config_generation: reload.generation,
        last_reload_error: reload.last_error.as_ref().map(ToString::to_string),
        last_reload_at: unix_secs(
            reload
                .last_error
                .as_ref()
                .map_or(reload.loaded_at, |e| e.at),
        ),
        reload_failures: reload.attempts.saturating_sub(reload.generation - 1),
        mode: match snap.config.mode {
            CacheMode::Normal => "normal",
            CacheMode::Static => "static",
            CacheMode::Offline => "offline",
        },
        replica_root: engine.store().root().display().to_string(),
        replica_files: stats.files,
        replica_bytes: stats.bytes,
        downloads_in_progress: engine.in_progress().len(),
        counters: engine.metrics().snapshot(),
    }
}

/// One fill under way (`/api/downloads`).
#[derive(Debug, Clone, Serialize)]
pub struct Download {
    /// The cache key.
    pub key: String,
    /// The upstream URL, once the upstream answered.
    pub url: Option<String>,
    /// Where the file lands in the replica, relative to the root.
    pub path: Option<String>,
    /// `waiting` (no answer yet) or `streaming`.
    pub state: &'static str,
    /// Bytes in the partial file.
    pub written: u64,
    /// The full length, if the upstream announced it.
    pub length: Option<u64>,
    /// `written / length`, 0–100, when the length is known.
    pub percent: Option<f64>,
    /// Clients reading along.
    pub readers: usize,
    /// Seconds since the fill started.
    pub elapsed_secs: f64,
    /// Average bytes per second of this fill (bytes resumed from an earlier
    /// fill are left out).
    pub rate_bytes_per_sec: f64,
}

fn download(fill: &Fill, snap: &Snapshot) -> Option<Download> {
    let elapsed = fill.started().elapsed().as_secs_f64();
    let path = ReplicaPath::for_key(&fill.key, snap.config.store.layout)
        .ok()
        .map(|p| p.as_str().to_owned());
    let (state, url, written, length, start) = match fill.state() {
        FillState::Waiting => ("waiting", None, 0, None, 0),
        FillState::Streaming { head, written } => (
            "streaming",
            Some(head.url.clone()),
            written,
            head.length,
            head.start,
        ),
        // Finished a moment ago; the engine drops it from the list next.
        _ => return None,
    };
    let rate = if elapsed > 0.0 {
        written.saturating_sub(start) as f64 / elapsed
    } else {
        0.0
    };
    Some(Download {
        key: fill.key.to_string(),
        url,
        path,
        state,
        written,
        length,
        percent: length.map(|l| {
            if l == 0 {
                100.0
            } else {
                written as f64 * 100.0 / l as f64
            }
        }),
        readers: fill.readers(),
        elapsed_secs: elapsed,
        rate_bytes_per_sec: rate,
    })
}

/// Builds `/api/downloads`: fills under way, oldest first.
pub fn downloads(proxy: &Proxy) -> Vec<Download> {
    let snap = proxy.snapshot();
    let mut fills = proxy.engine().in_progress();
    fills.sort_by_key(|f| f.started());
    fills.iter().filter_map(|f| download(f, &snap)).collect()
}

/// The fleet (`/api/peers`).
#[derive(Debug, Clone, Serialize)]
pub struct Peers {
    /// This node's name, `None` without a `cluster` block.
    pub node: Option<String>,
    /// The other nodes' state, in config order.
    pub peers: Vec<crate::fetch::peer::PeerHealth>,
}

/// Builds `/api/peers`.
pub fn peers(snap: &Snapshot) -> Peers {
    match &snap.settings.fleet {
        Some(f) => Peers {
            node: Some(f.node().to_owned()),
            peers: f.health(),
        },
        None => Peers {
            node: None,
            peers: Vec::new(),
        },
    }
}

/// The admin's Fleet page: the nodes, their health, the share of keys
/// each owns and where this node's fill bytes came from.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    /// This node's name.
    pub node: String,
    /// This node first, then its peers in config order.
    pub nodes: Vec<FleetNode>,
    /// Complete replicas on this node counted for the shares (at most
    /// [`FLEET_SAMPLE`]).
    pub sampled_keys: u64,
    /// Body bytes this node's fills received from peers.
    pub peer_bytes: u64,
    /// Body bytes this node's fills received from upstreams.
    pub upstream_bytes: u64,
}

/// One node on the Fleet page.
#[derive(Debug, Clone, Serialize)]
pub struct FleetNode {
    /// Its node name.
    pub name: String,
    /// Its base URL (`None` for this node).
    pub url: Option<String>,
    /// This node, not a peer.
    pub this_node: bool,
    /// Skipped after a failure (never for this node).
    pub down: bool,
    /// Fill requests this node sent it.
    pub asked: u64,
    /// Those that failed.
    pub failed: u64,
    /// Its last failure.
    pub last_error: Option<String>,
    /// Keys of this node's replica that it owns by the rendezvous hash.
    pub owned_keys: u64,
}

/// At most this many of the replica's keys are counted for the shares:
/// enough for a share to the percent, and a page that stays quick.
const FLEET_SAMPLE: usize = 100_000;

/// Builds the Fleet page's data; `None` without a `cluster` block.
pub fn fleet(proxy: &Proxy) -> Option<FleetView> {
    let snap = proxy.snapshot();
    let fleet = snap.settings.fleet.as_ref()?;
    let entries = proxy.engine().store().entries();
    let sample = &entries[..entries.len().min(FLEET_SAMPLE)];
    let shares = fleet.shares(sample.iter().map(|r| r.meta.key.as_str()));
    let health = fleet.health();
    let nodes = shares
        .into_iter()
        .enumerate()
        .map(
            |(i, (name, owned_keys))| match i.checked_sub(1).and_then(|p| health.get(p)) {
                None => FleetNode {
                    name,
                    url: None,
                    this_node: true,
                    down: false,
                    asked: 0,
                    failed: 0,
                    last_error: None,
                    owned_keys,
                },
                Some(p) => FleetNode {
                    name,
                    url: Some(p.url.clone()),
                    this_node: false,
                    down: p.down,
                    asked: p.asked,
                    failed: p.failed,
                    last_error: p.last_error.clone(),
                    owned_keys,
                },
            },
        )
        .collect();
    let m = proxy.engine().metrics().snapshot();
    Some(FleetView {
        node: fleet.node().to_owned(),
        nodes,
        sampled_keys: sample.len() as u64,
        peer_bytes: m.peer_bytes,
        upstream_bytes: m.upstream_bytes,
    })
}

/// One mirror set (`/api/mirrors`).
#[derive(Debug, Clone, Serialize)]
pub struct Mirror {
    /// The block's name.
    pub name: String,
    /// Our path prefix.
    pub prefix: String,
    /// `proxy`, or `redirect` for a mirror that answers 302s.
    pub mode: &'static str,
    /// Its upstreams in config order.
    pub upstreams: Vec<Upstream>,
}

/// One upstream of a mirror set.
#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    /// Base URL.
    pub base: String,
    /// `up`, or `down` while disabled by failures (clients reach it only
    /// when every enabled upstream failed).
    pub state: &'static str,
    /// `weight=` from the config.
    pub weight: u32,
    /// Its share of new files now, 0 to 1: weight cut by latency and
    /// recent errors, 0 while down.
    pub share: f64,
    /// Moving average time to a response head, in milliseconds.
    pub latency_ms: Option<f64>,
    /// Requests sent to it.
    pub fetches: u64,
    /// Of which failed.
    pub failures: u64,
    /// Failures (requests or probes) since its last success.
    pub consecutive_failures: u32,
    /// The last failure's reason.
    pub last_error: Option<String>,
    /// The last health probe, when the set has a `probe`.
    pub last_probe: Option<Probe>,
}

/// One health probe's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// When it was sent, Unix seconds.
    pub at: u64,
    /// A 2xx within the timeout.
    pub ok: bool,
    /// `status 200`, or why it failed.
    pub detail: String,
    /// How long it took, in milliseconds.
    pub took_ms: f64,
}

/// Builds `/api/mirrors`, sorted by prefix.
pub fn mirrors(snap: &Snapshot) -> Vec<Mirror> {
    let mut out: Vec<Mirror> = snap
        .router
        .mirrors()
        .iter()
        .map(|m| Mirror {
            name: m.name.clone(),
            prefix: m.prefix.clone(),
            mode: if m.redirect.is_some() {
                "redirect"
            } else {
                "proxy"
            },
            upstreams: m
                .health()
                .into_iter()
                .map(|h| Upstream {
                    base: h.base,
                    state: h.state,
                    weight: h.weight,
                    share: h.share,
                    latency_ms: h.latency.map(|l| l.as_secs_f64() * 1000.0),
                    fetches: h.fetches,
                    failures: h.failures,
                    consecutive_failures: h.consecutive_failures,
                    last_error: h.last_error,
                    last_probe: h.last_probe.map(|p| Probe {
                        at: unix_secs(p.at),
                        ok: p.ok,
                        detail: p.detail,
                        took_ms: p.took.as_secs_f64() * 1000.0,
                    }),
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    out
}

/// `/api/redirects`: the redirect counters of mirrors in redirect mode.
#[derive(Debug, Clone, Serialize)]
pub struct Redirects {
    /// The kept days, newest first (see [`crate::observe::redirects`]).
    pub days: Vec<crate::observe::redirects::DayReport>,
    /// How many files one mirror tracks per day at most.
    pub files_per_day: usize,
    /// How many days are kept.
    pub days_kept: usize,
}

/// Builds `/api/redirects`.
pub fn redirects(proxy: &Proxy) -> Redirects {
    use crate::observe::redirects::{DAYS_KEPT, FILES_PER_DAY};
    Redirects {
        days: proxy.engine().metrics().redirects().report(),
        files_per_day: FILES_PER_DAY,
        days_kept: DAYS_KEPT,
    }
}

/// `/api/fleet/digest?sha256=HEX`: which nodes hold a digest.
#[derive(Debug, Clone, Serialize)]
pub struct FleetDigest {
    /// The digest asked about, lower-case hex.
    pub sha256: String,
    /// `"redis"`: the fleet's digest index answered; `"local"`: it could
    /// not (no `cluster { redis }`, or Redis down) and only this node's
    /// store was asked.
    pub source: &'static str,
    /// The nodes that hold it, by name.
    pub holders: Vec<crate::shared::Holder>,
}

/// Builds `/api/fleet/digest`.
pub async fn fleet_digest(proxy: &Proxy, sha256: Option<&str>) -> Result<FleetDigest, String> {
    let text = sha256.unwrap_or("").to_ascii_lowercase();
    let mut digest = [0u8; 32];
    hex::decode_to_slice(&text, &mut digest)
        .map_err(|_| "give ?sha256= and 64 hex digits\n".to_owned())?;
    let engine = proxy.engine();
    if let Some(holders) = engine.shared().holders(&digest).await {
        return Ok(FleetDigest {
            sha256: text,
            source: "redis",
            holders,
        });
    }
    let node = proxy
        .snapshot()
        .config
        .cluster
        .as_ref()
        .map_or_else(String::new, |c| c.node.clone());
    let holders = engine
        .store()
        .by_sha256(&digest)
        .map(|r| crate::shared::Holder {
            node,
            key: r.meta.key.clone(),
            size: r.meta.length,
        })
        .into_iter()
        .collect();
    Ok(FleetDigest {
        sha256: text,
        source: "local",
        holders,
    })
}

/// One policy's counters (`/api/policies`).
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    /// The policy's name.
    pub name: String,
    /// Hook calls.
    pub calls: u64,
    /// Calls that failed for any reason.
    pub failures: u64,
    /// Calls stopped by the deadline.
    pub timeouts: u64,
    /// Calls that trapped.
    pub traps: u64,
    /// Calls that hit the memory cap.
    pub memory_limits: u64,
    /// Calls whose hook returned an error code.
    pub guest_errors: u64,
    /// `on_request` calls saved by a kept outcome (`reuse_outcome`).
    pub reused: u64,
    /// Time in calls, seconds.
    pub total_secs: f64,
    /// Mean call time, seconds.
    pub mean_secs: f64,
    /// Slowest call, seconds.
    pub max_secs: f64,
}

/// Builds `/api/policies`, in declaration order.
pub fn policies(snap: &Snapshot) -> Vec<Policy> {
    snap.policies
        .stats()
        .into_iter()
        .map(|p| Policy {
            mean_secs: if p.calls == 0 {
                0.0
            } else {
                p.total_time.as_secs_f64() / p.calls as f64
            },
            total_secs: p.total_time.as_secs_f64(),
            max_secs: p.max_time.as_secs_f64(),
            name: p.name,
            calls: p.calls,
            failures: p.failures,
            timeouts: p.timeouts,
            traps: p.traps,
            memory_limits: p.memory_limits,
            guest_errors: p.guest_errors,
            reused: p.reused,
        })
        .collect()
}

/// One directory of the replica (`/api/replica`).
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The directory, relative to the root (`""` for the root).
    pub path: String,
    /// Its parent, `None` for the root.
    pub parent: Option<String>,
    /// Subdirectories on this page.
    pub dirs: Vec<DirEntry>,
    /// Files on this page.
    pub files: Vec<FileEntry>,
    /// Directories and files in the whole directory (dirs first, by name).
    pub total_entries: usize,
    /// Index of this page's first entry.
    pub offset: usize,
    /// Page size.
    pub limit: usize,
    /// The next page's offset, if there is one.
    pub next_offset: Option<usize>,
}

/// A subdirectory, with totals of the complete files below it.
#[derive(Debug, Clone, Serialize)]
pub struct DirEntry {
    /// Its name.
    pub name: String,
    /// Its path, relative to the root.
    pub path: String,
    /// Complete files below it.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Downloads under way below it.
    pub partial: u64,
}

/// A file: complete (from the index) or partial (a fill under way).
#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    /// Its name.
    pub name: String,
    /// Its path, relative to the root.
    pub path: String,
    /// `complete` or `partial`.
    pub state: &'static str,
    /// The cache key.
    pub key: String,
    /// The upstream URL it came from (known for partials once the upstream
    /// answered).
    pub url: Option<String>,
    /// Bytes on disk.
    pub size: u64,
    /// Full length (for a partial, if announced).
    pub length: Option<u64>,
    /// When it was stored, seconds since the Unix epoch (complete files).
    pub stored_at: Option<u64>,
    /// Seconds since it was stored (complete files).
    pub age_secs: Option<u64>,
    /// Times served from the replica (complete files).
    pub hits: Option<u64>,
    /// SHA-256 of the content, hex (complete files).
    pub sha256: Option<String>,
}

/// The path of `full` below `dir` (`""` is the root), if it is below.
fn below<'a>(full: &'a str, dir: &str) -> Option<&'a str> {
    if dir.is_empty() {
        return Some(full);
    }
    full.strip_prefix(dir)?.strip_prefix('/')
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn complete_entry(dir: &str, name: &str, r: &Replica, now: u64) -> FileEntry {
    FileEntry {
        name: name.to_owned(),
        path: join(dir, name),
        state: "complete",
        key: r.meta.key.clone(),
        url: Some(r.meta.url.clone()),
        size: r.meta.length,
        length: Some(r.meta.length),
        stored_at: Some(r.meta.stored_at),
        age_secs: Some(now.saturating_sub(r.meta.stored_at)),
        hits: Some(r.hits()),
        sha256: Some(r.meta.sha256.clone()),
    }
}

/// One directory of `replicas` plus the partial files of `downloads`,
/// directories first, then files, each sorted by name; `limit` entries from
/// `offset`.
pub fn list_dir(
    replicas: &[Arc<Replica>],
    downloads: &[Download],
    dir: &str,
    offset: usize,
    limit: usize,
    now: u64,
) -> Listing {
    let mut dirs: BTreeMap<&str, DirEntry> = BTreeMap::new();
    let mut files: Vec<FileEntry> = Vec::new();
    // Responses kept aside (404s, redirects) are not files of the tree.
    for r in replicas.iter().filter(|r| r.meta.in_tree()) {
        let Some(rest) = below(&r.meta.replica, dir) else {
            continue;
        };
        match rest.split_once('/') {
            Some((sub, _)) => {
                let d = dirs.entry(sub).or_insert_with(|| new_dir(dir, sub));
                d.files += 1;
                d.bytes += r.meta.length;
            }
            None => files.push(complete_entry(dir, rest, r, now)),
        }
    }
    for dl in downloads {
        let Some(path) = &dl.path else { continue };
        let Some(rest) = below(path, dir) else {
            continue;
        };
        match rest.split_once('/') {
            Some((sub, _)) => dirs.entry(sub).or_insert_with(|| new_dir(dir, sub)).partial += 1,
            None => files.push(FileEntry {
                name: rest.to_owned(),
                path: path.clone(),
                state: "partial",
                key: dl.key.clone(),
                url: dl.url.clone(),
                size: dl.written,
                length: dl.length,
                stored_at: None,
                age_secs: None,
                hits: None,
                sha256: None,
            }),
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name).then(a.state.cmp(b.state)));
    let total = dirs.len() + files.len();
    let ndirs = dirs.len();
    let page_dirs: Vec<DirEntry> = dirs.into_values().skip(offset).take(limit).collect();
    let file_skip = offset.saturating_sub(ndirs);
    let page_files: Vec<FileEntry> = files
        .into_iter()
        .skip(file_skip)
        .take(limit - page_dirs.len())
        .collect();
    let end = offset + page_dirs.len() + page_files.len();
    Listing {
        path: dir.to_owned(),
        parent: (!dir.is_empty()).then(|| {
            dir.rsplit_once('/')
                .map_or(String::new(), |(p, _)| p.to_owned())
        }),
        dirs: page_dirs,
        files: page_files,
        total_entries: total,
        offset,
        limit,
        next_offset: (end < total).then_some(end),
    }
}

fn new_dir(dir: &str, name: &str) -> DirEntry {
    DirEntry {
        name: name.to_owned(),
        path: join(dir, name),
        files: 0,
        bytes: 0,
        partial: 0,
    }
}

/// Builds `/api/replica` for directory `dir` from the store's index and the
/// fills under way. Sorts the whole index: call it off the async workers.
pub fn listing(proxy: &Proxy, dir: &str, offset: usize, limit: usize) -> Listing {
    let replicas = proxy.engine().store().entries();
    list_dir(
        &replicas,
        &downloads(proxy),
        dir,
        offset,
        limit,
        unix_secs(SystemTime::now()),
    )
}
