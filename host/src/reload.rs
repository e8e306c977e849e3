//! Hot reload: `config.kdl` and every file it names (policy modules, site
//! certificates and keys) are watched; a change, a SIGHUP or a call to
//! [`Reloader::reload`] rebuilds the whole configuration off to the side —
//! parse and validate, compile the policies, load the certificates, bind
//! new listeners — and only then swaps it in as one snapshot. Requests in
//! flight finish on the snapshot they started with; the replica store, the
//! fetch engine and its coalescing table are not part of a snapshot and
//! carry on untouched.
//!
//! A reload that fails changes nothing: the problems (file, line, column,
//! reason) go to the log and to [`ReloadStatus::last_error`], and the next
//! change to any watched file tries again.
//!
//! Reloads run one at a time on one task, so two triggers never race.
//! File events are debounced: a reload starts once the watched files have
//! been quiet for [`DEBOUNCE`].

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::pipeline::Proxy;
use crate::server::{ListenerSpec, Server};
use crate::snapshot::{Snapshot, SnapshotError};

/// How long watched files must be quiet before a reload starts: editors
/// and `cp` write a file in several steps.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file changed.
    Files,
    /// SIGHUP.
    Signal,
    /// [`Reloader::reload`] (the admin UI, tests).
    Request,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Files => "a watched file changed",
            Trigger::Signal => "SIGHUP",
            Trigger::Request => "a reload request",
        })
    }
}

/// One reason a reload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadProblem {
    /// The file at fault: the config, a policy module, a certificate or key.
    pub file: PathBuf,
    /// 1-based line, or 0 when the problem is not at a place in the file
    /// (unreadable, a bad certificate, a policy that does not compile).
    pub line: usize,
    /// 1-based column, or 0 like `line`.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ReloadProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// A reload that was refused; the previous configuration kept serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// When it was tried.
    pub at: SystemTime,
    /// What started it.
    pub trigger: Trigger,
    /// Every problem found, in file order for the config file.
    pub problems: Vec<ReloadProblem>,
    /// The full report as logged: for config errors, with the offending
    /// lines quoted and underlined.
    pub report: String,
}

impl fmt::Display for ReloadFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reload ({}) refused", self.trigger)?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Where configuration reloads stand, for logs and the admin UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Generation of the configuration serving now: 1 at start-up, one more
    /// for each successful reload.
    pub generation: u64,
    /// When the configuration serving now went live.
    pub loaded_at: SystemTime,
    /// Reloads tried since start-up, successful or not.
    pub attempts: u64,
    /// The last reload's problems if it failed; cleared by a success.
    pub last_error: Option<ReloadFailure>,
}

impl ReloadStatus {
    /// The status of a configuration that just started.
    pub(crate) fn started(now: SystemTime) -> ReloadStatus {
        ReloadStatus {
            generation: 1,
            loaded_at: now,
            attempts: 0,
            last_error: None,
        }
    }
}

/// The reload status, shared by the reload engine (its only writer) and
/// the admin listener; outside the request path, which never reads it.
#[derive(Debug)]
pub struct ReloadLog {
    status: std::sync::Mutex<ReloadStatus>,
}

impl ReloadLog {
    /// The log of a configuration that went live at `now`.
    pub fn new(now: SystemTime) -> ReloadLog {
        ReloadLog {
            status: std::sync::Mutex::new(ReloadStatus::started(now)),
        }
    }

    /// Where reloads stand now.
    pub fn status(&self) -> ReloadStatus {
        self.lock().clone()
    }

    /// Updates the status (the reload engine's, under its own
    /// serialisation).
    pub(crate) fn update(&self, update: impl FnOnce(&mut ReloadStatus)) {
        update(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A change applied to every configuration read from the file before it
/// is used: how command-line flags that override the file (`--port`,
/// `--root`…) survive a reload.
#[derive(Clone)]
pub struct ConfigAdjust(pub Arc<dyn Fn(&mut Config) + Send + Sync>);

impl fmt::Debug for ConfigAdjust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigAdjust(..)")
    }
}

/// A handle for asking the reload task for a reload.
#[derive(Clone, Debug)]
pub struct Reloader {
    requests: mpsc::Sender<oneshot::Sender<Result<u64, ReloadFailure>>>,
}

impl Reloader {
    /// Reloads now and waits for the outcome: the new generation, or why
    /// the configuration serving was kept.
    pub async fn reload(&self) -> Result<u64, ReloadFailure> {
        let gone = || ReloadFailure {
            at: SystemTime::now(),
            trigger: Trigger::Request,
            problems: Vec::new(),
            report: "Cistern is shutting down".to_owned(),
        };
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// What the reload task needs.
pub(crate) struct Engine {
    /// The proxy whose snapshot is swapped.
    pub proxy: Arc<Proxy>,
    /// Where the outcome of each reload is written.
    pub log: Arc<ReloadLog>,
    /// The listener registry.
    pub server: Arc<Server>,
    /// The config file.
    pub source: PathBuf,
    /// Command-line overrides.
    pub adjust: Option<ConfigAdjust>,
    /// `-v`.
    pub log_headers: bool,
}

/// Which triggers the reload task listens to besides [`Reloader::reload`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Triggers {
    /// Watch the config and the files it names.
    pub files: bool,
    /// Reload on SIGHUP (the process's handler: for the binary, not for
    /// tests that share one process).
    pub sighup: bool,
}

/// Starts the reload task; it ends when `shutdown` turns true.
/// Must be called inside the runtime: the SIGHUP handler is installed
/// before it returns, so no SIGHUP after it can kill the process.
pub(crate) fn spawn(
    engine: Engine,
    triggers: Triggers,
    shutdown: watch::Receiver<bool>,
) -> (Reloader, JoinHandle<()>) {
    let hup = if triggers.sighup {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(target: "cistern::reload", "cannot handle SIGHUP: {e}");
                None
            }
        }
    } else {
        None
    };
    // Watching starts now too, so no change after start-up is missed.
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut watch = Watch::new(triggers.files, events_tx);
    watch.set(watched_files(
        &engine.source,
        Some(&engine.proxy.snapshot().config),
    ));
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(run(engine, watch, events, hup, rx, shutdown));
    (Reloader { requests: tx }, task)
}

/// Watched files and the directories watched for them. Directories, not
/// the files: editors and `mv` replace a file with a new one, and a watch
/// on the old inode would never fire again.
struct Watch {
    watcher: Option<RecommendedWatcher>,
    files: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl Watch {
    fn new(enabled: bool, events: mpsc::UnboundedSender<notify::Result<Event>>) -> Watch {
        let watcher = if enabled {
            // Raw events, debounced by the reload task (`quiet`): the
            // watcher's thread sleeps in the kernel until a file changes,
            // where a debouncer thread would wake 20 times a second for
            // the life of the process.
            match notify::recommended_watcher(move |e| {
                let _ = events.send(e);
            }) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(target: "cistern::reload", "cannot watch files ({e}); reload with SIGHUP instead");
                    None
                }
            }
        } else {
            None
        };
        Watch {
            watcher,
            files: BTreeSet::new(),
            dirs: BTreeSet::new(),
        }
    }

    /// Watches exactly `files` from now on.
    fn set(&mut self, files: BTreeSet<PathBuf>) {
        let Some(watcher) = self.watcher.as_mut() else {
            self.files = files;
            return;
        };
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for dir in &dirs {
            if self.dirs.contains(dir) {
                watched.insert(dir.clone());
                continue;
            }
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir.clone());
                }
                Err(e) => {
                    tracing::warn!(target: "cistern::reload", "cannot watch {}: {e}; changes there need a SIGHUP", dir.display())
                }
            }
        }
        self.dirs = watched;
        self.files = files;
    }

    /// Whether an event is a change to a watched file (not a read of one,
    /// and not another file in a watched directory).
    fn concerns(&self, event: &notify::Result<Event>) -> bool {
        let event = match event {
            Ok(event) if !event.need_rescan() => event,
            // The watcher lost track (queue overflow): reload to be safe.
            _ => return true,
        };
        let change = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        change && event.paths.iter().any(|p| self.files.contains(p))
    }

    /// Returns once no watched file has changed for [`DEBOUNCE`]: an
    /// editor's save is a burst of writes, renames and chmods, and `cp`
    /// writes in several steps. Events about other files in the watched
    /// directories (a log written beside the config) do not hold it up.
    async fn quiet(&self, events: &mut Events) {
        let mut until = tokio::time::Instant::now() + DEBOUNCE;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                event = events.recv() => match event {
                    Some(event) if self.concerns(&event) => {
                        until = tokio::time::Instant::now() + DEBOUNCE;
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }
}

/// The files a reload of `config` depends on.
fn watched_files(source: &Path, config: Option<&Config>) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([source.to_path_buf()]);
    if let Some(c) = config {
        files.extend(c.named_files());
    }
    files
}

/// A file watcher's events.
type Events = mpsc::UnboundedReceiver<notify::Result<Event>>;

async fn run(
    engine: Engine,
    mut watch: Watch,
    mut events: Events,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut requests: mpsc::Receiver<oneshot::Sender<Result<u64, ReloadFailure>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let trigger = tokio::select! {
            // The guard `wait_for` returns must not live in the select's
            // output: it is not Send.
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            Some(reply) = requests.recv() => {
                let result = engine.reload(Trigger::Request, &mut watch).await;
                let _ = reply.send(result);
                continue;
            }
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Signal,
            Some(event) = events.recv() => {
                if !watch.concerns(&event) {
                    continue;
                }
                watch.quiet(&mut events).await;
                Trigger::Files
            }
        };
        let _ = engine.reload(trigger, &mut watch).await;
    }
}

/// A configuration built and ready to go live.
struct Prepared {
    snapshot: Snapshot,
    files: BTreeSet<PathBuf>,
}

impl Engine {
    /// One reload, start to end, with its logging and status update.
    async fn reload(&self, trigger: Trigger, watch: &mut Watch) -> Result<u64, ReloadFailure> {
        let started = Instant::now();
        let outcome = self.apply().await;
        let now = SystemTime::now();
        match outcome {
            Ok(files) => {
                watch.set(files);
                let mut generation = 0;
                self.log.update(|s| {
                    s.generation += 1;
                    s.attempts += 1;
                    s.loaded_at = now;
                    s.last_error = None;
                    generation = s.generation;
                });
                tracing::info!(
                    target: "cistern::reload",
                    "reloaded {} ({trigger}): generation {generation} is live after {:?}",
                    self.source.display(),
                    started.elapsed()
                );
                Ok(generation)
            }
            Err((problems, report, files)) => {
                if let Some(files) = files {
                    // Fixing a certificate or policy this config names is
                    // a reason to try again, even though it did not go live.
                    let mut all = watch.files.clone();
                    all.extend(files);
                    watch.set(all);
                }
                let failure = ReloadFailure {
                    at: now,
                    trigger,
                    problems,
                    report,
                };
                let mut generation = 0;
                self.log.update(|s| {
                    s.attempts += 1;
                    s.last_error = Some(failure.clone());
                    generation = s.generation;
                });
                tracing::error!(
                    target: "cistern::reload",
                    "{failure}\nstill serving generation {generation}\n{}",
                    failure.report
                );
                Err(failure)
            }
        }
    }

    /// Builds the new configuration and swaps it in. On failure nothing
    /// changed; the error carries the files the new config would watch, if
    /// it got that far.
    async fn apply(
        &self,
    ) -> Result<BTreeSet<PathBuf>, (Vec<ReloadProblem>, String, Option<BTreeSet<PathBuf>>)> {
        let prepared = self.prepare().await?;
        let wanted = ListenerSpec::all(&prepared.snapshot.config);
        let (add, remove) = self.server.plan(&wanted);
        // An address changing between plaintext and TLS must be let go of
        // before it can be bound again.
        let (clash, remove): (Vec<ListenerSpec>, Vec<ListenerSpec>) = remove
            .into_iter()
            .partition(|r| add.iter().any(|a| a.addr == r.addr));
        self.server.close(&clash);
        let bound = match self.server.bind(&add).await {
            Ok(b) => b,
            Err(e) => {
                let message = e.to_string();
                let problem = ReloadProblem {
                    file: self.source.clone(),
                    line: 0,
                    column: 0,
                    message: message.clone(),
                };
                return Err((vec![problem], message, Some(prepared.files)));
            }
        };
        self.proxy.swap(prepared.snapshot);
        self.server.serve(bound);
        self.server.close(&remove);
        Ok(prepared.files)
    }

    /// Reads, validates and builds; touches nothing that serves.
    async fn prepare(
        &self,
    ) -> Result<Prepared, (Vec<ReloadProblem>, String, Option<BTreeSet<PathBuf>>)> {
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&source))
            .await
            .expect("config load task panicked");
        let mut config =
            loaded.map_err(|e| (config_problems(&e, &self.source), e.report(), None))?;
        if let Some(adjust) = &self.adjust {
            (adjust.0)(&mut config);
        }
        keep_restart_only(&mut config, &self.proxy.snapshot().config);
        let files = watched_files(&self.source, Some(&config));
        let policy_files: Vec<(String, PathBuf)> = config
            .policies
            .iter()
            .filter_map(|p| match &p.source {
                crate::config::PolicySource::File(f) => Some((p.name.clone(), f.clone())),
                crate::config::PolicySource::Builtin(_) => None,
            })
            .collect();
        let proxy = self.proxy.clone();
        let log_headers = self.log_headers;
        let built = tokio::task::spawn_blocking(move || {
            Snapshot::build(config, proxy.policy_engine(), proxy.engine(), log_headers)
        })
        .await
        .expect("snapshot build task panicked");
        match built {
            Ok(snapshot) => Ok(Prepared { snapshot, files }),
            Err(e) => {
                let problems = snapshot_problems(&e, &self.source, &policy_files);
                Err((problems, e.to_string(), Some(files)))
            }
        }
    }
}

/// A config error as problems of the config file.
fn config_problems(e: &ConfigError, source: &Path) -> Vec<ReloadProblem> {
    e.problems()
        .into_iter()
        .map(|(line, column, message)| ReloadProblem {
            file: source.to_path_buf(),
            line,
            column,
            message,
        })
        .collect()
}

/// A snapshot error as problems of the files at fault: the certificate or
/// key, the policy module, else the config.
fn snapshot_problems(
    e: &SnapshotError,
    source: &Path,
    policy_files: &[(String, PathBuf)],
) -> Vec<ReloadProblem> {
    match e {
        SnapshotError::Tls(tls) => tls
            .problems
            .iter()
            .map(|p| ReloadProblem {
                file: p.path.clone(),
                line: 0,
                column: 0,
                message: format!("site {:?}: {}", p.site, p.reason),
            })
            .collect(),
        SnapshotError::Policy(p) => {
            let message = p.to_string();
            // Policy errors name their policy in backquotes; its module is
            // the file to look at.
            let file = policy_files
                .iter()
                .find(|(name, _)| message.contains(&format!("`{name}`")))
                .map_or_else(|| source.to_path_buf(), |(_, f)| f.clone());
            vec![ReloadProblem {
                file,
                line: 0,
                column: 0,
                message,
            }]
        }
    }
}

/// Parts of the config that only take effect at start-up: the replica
/// store (opened once, its index built from disk), upstream TLS trust and
/// the connect and upstream-idle timeouts and the `Via` node id (the shared
/// upstream client). A reload keeps the
/// running values and says so.
fn keep_restart_only(new: &mut Config, running: &Config) {
    let (s, r) = (&new.store, &running.store);
    if s.root != r.root || s.state != r.state || s.layout != r.layout || s.max_size != r.max_size {
        tracing::warn!(target: "cistern::reload", "`store` changed; it takes effect at the next restart");
    }
    new.store = running.store.clone();
    let (t, r) = (&new.upstream_tls, &running.upstream_tls);
    if t.system_roots != r.system_roots || t.ca_files != r.ca_files {
        tracing::warn!(target: "cistern::reload", "`upstream-tls` changed; it takes effect at the next restart");
    }
    new.upstream_tls = running.upstream_tls.clone();
    if new.timeouts.connect != running.timeouts.connect {
        tracing::warn!(target: "cistern::reload", "`timeouts connect` changed; it takes effect at the next restart");
    }
    new.timeouts.connect = running.timeouts.connect;
    if new.timeouts.upstream_idle != running.timeouts.upstream_idle {
        tracing::warn!(target: "cistern::reload", "`timeouts upstream-idle` changed; it takes effect at the next restart");
    }
    new.timeouts.upstream_idle = running.timeouts.upstream_idle;
    if new.node_id != running.node_id {
        tracing::warn!(target: "cistern::reload", "`node-id` changed; it takes effect at the next restart");
    }
    new.node_id = running.node_id.clone();
}
