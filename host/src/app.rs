//! Assembles a running Cistern from a validated config: the store (index
//! rebuilt from disk), the upstream client, the fetch engine, the proxy,
//! its listeners and the reload engine. `main` and the in-process tests
//! both start it this way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Admin};
use crate::clock::Clock;
use crate::config::{AdminConfig, Config};
use crate::fetch::upstream::ClientBuildError;
use crate::fetch::{FetchEngine, UpstreamClient};
use crate::ours::OwnSockets;
use crate::pipeline::{DRAIN, Proxy};
use crate::policy::{PolicyEngine, PolicyError};
use crate::reload::{
    self, ConfigAdjust, ReloadFailure, ReloadLog, ReloadStatus, Reloader, Trigger, Triggers,
};
use crate::server::{BindError, ListenerInfo, ListenerSpec, Server};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::store::{ReplicaStore, StoreError};

/// Why Cistern could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The replica store could not be opened.
    #[error("opening the replica store: {0}")]
    Store(#[from] StoreError),
    /// The upstream TLS trust could not be set up.
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    /// The policy engine could not be created.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A policy or a site's certificate could not be loaded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A listener could not be set up.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// Start-up options that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Log request and response headers (`-v`).
    pub log_headers: bool,
    /// The clock for freshness and the store's full-disk pause; the system
    /// clock when `None`.
    pub clock: Option<Clock>,
    /// What reloads the config file besides [`Running::reload`]: watching
    /// it and the files it names, SIGHUP. Nothing when the config has no
    /// file.
    pub reload: Triggers,
    /// Applied to the config read at every reload (command-line overrides).
    pub adjust: Option<ConfigAdjust>,
}

/// A running Cistern.
pub struct Running {
    /// The addresses bound at start-up, in config order: plaintext
    /// listeners, then TLS site listeners. [`Running::listeners`] tells
    /// the ones serving now.
    pub addrs: Vec<SocketAddr>,
    /// The proxy (snapshot swaps, engine, store).
    pub proxy: Arc<Proxy>,
    /// The admin listener's address, when it runs.
    pub admin_addr: Option<SocketAddr>,
    server: Arc<Server>,
    reloader: Option<Reloader>,
    reload_log: Arc<ReloadLog>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The listeners serving now (reloads add and remove them).
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.server.listeners()
    }

    /// Where reloads stand: the generation serving, the last error.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_log.status()
    }

    /// The handle that asks for reloads (for the admin UI); `None` when
    /// the config has no file to reload from.
    pub fn reloader(&self) -> Option<&Reloader> {
        self.reloader.as_ref()
    }

    /// Reloads the config file now; the new generation, or why the running
    /// configuration was kept.
    pub async fn reload(&self) -> Result<u64, ReloadFailure> {
        match &self.reloader {
            Some(r) => r.reload().await,
            None => Err(ReloadFailure {
                at: std::time::SystemTime::now(),
                trigger: Trigger::Request,
                problems: Vec::new(),
                report: "there is no config file to reload (built-in defaults)".to_owned(),
            }),
        }
    }

    /// Stops accepting, drains connections, and returns when done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // The reload task first: a reload under way finishes (it may bind
        // listeners) before the listeners are closed.
        for t in self.tasks {
            let _ = t.await;
        }
        self.server.shutdown().await;
    }
}

/// Starts Cistern with `config`.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let clock = options.clock.unwrap_or_default();
    let store_config = config.store.clone();
    let store_clock = clock.clone();
    let store = tokio::task::spawn_blocking(move || {
        ReplicaStore::open_with_clock(&store_config, store_clock)
    })
    .await
    .expect("store open task panicked")?;
    let stats = store.stats();
    tracing::info!(
        target: "cistern::store",
        root = %store.root().display(),
        files = stats.files,
        bytes = stats.bytes,
        "replica index rebuilt"
    );
    let own = Arc::new(OwnSockets::default());
    let via = Arc::new(crate::via::ViaHop::new(config.node_id.as_deref()));
    tracing::info!(target: "cistern::app", "Via names this node {}", via.pseudonym());
    let client = UpstreamClient::new(&config.upstream_tls, &config.timeouts, own.clone(), via)?;
    let engine = FetchEngine::new(Arc::new(store), client, clock.clone());

    let source = config.source.clone();
    let specs = ListenerSpec::all(&config);
    let (snapshot, policy_engine) = {
        let engine = engine.clone();
        let log_headers = options.log_headers;
        tokio::task::spawn_blocking(move || {
            let policy_engine = PolicyEngine::new()?;
            let snapshot = Snapshot::build(config, &policy_engine, &engine, log_headers)?;
            Ok::<_, StartError>((snapshot, policy_engine))
        })
        .await
        .expect("policy compile task panicked")?
    };
    let proxy = Arc::new(Proxy::new(snapshot, engine, policy_engine, clock));
    let server = Server::new(proxy.clone(), DRAIN);
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // The reload engine (and its SIGHUP handler) is in place before any
    // port is open: a client that sees the port may signal at once.
    let reload_log = Arc::new(ReloadLog::new(std::time::SystemTime::now()));
    let reloader = source.map(|source| {
        let engine = reload::Engine {
            proxy: proxy.clone(),
            log: reload_log.clone(),
            server: server.clone(),
            source,
            adjust: options.adjust.clone(),
            log_headers: options.log_headers,
        };
        let (reloader, task) = reload::spawn(engine, options.reload, rx.clone());
        tasks.push(task);
        reloader
    });
    let bound = match server.bind(&specs).await {
        Ok(b) => b,
        Err(e) => {
            let _ = shutdown.send(true);
            return Err(e.into());
        }
    };
    let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.local_addr()).collect();
    let admin_config = proxy.snapshot().config.admin.clone();
    let admin_addr = match admin_config {
        AdminConfig { listen: None, .. } => None,
        AdminConfig {
            listen: Some(addr),
            required,
            ..
        } => match admin::bind(addr).await {
            Ok(listener) => {
                let local = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind(BindError::Bind { addr, source }))?;
                tracing::info!(target: "cistern::admin", "admin UI on http://{local}/");
                own.set_admin(local);
                let admin = Arc::new(Admin::new(proxy.clone(), local, reload_log.clone()));
                tasks.push(tokio::spawn(admin::serve(listener, admin, rx.clone())));
                Some(local)
            }
            Err(source) if required => {
                let _ = shutdown.send(true);
                return Err(StartError::Bind(BindError::Bind { addr, source }));
            }
            // The implicit default port may be taken (a second Cistern, a
            // test run): the proxy matters more than its dashboard.
            Err(e) => {
                tracing::warn!(
                    target: "cistern::admin",
                    "admin UI not started: cannot bind {addr}: {e}; set `admin {{ listen \"…\" }}` in the config"
                );
                None
            }
        },
    };
    server.serve(bound);

    // The fleet's shared state: local, or Redis once configured.
    tasks.extend(proxy.engine().shared().start(
        proxy.engine().store().clone(),
        counter_samples(proxy.clone()),
        rx.clone(),
    ));

    // Keyed limiters forget idle clients now and then.
    let housekeeping = proxy.clone();
    let mut hk_stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => housekeeping.snapshot().limits.housekeeping(),
                _ = hk_stop.changed() => break,
            }
        }
    }));

    Ok(Running {
        addrs,
        proxy,
        admin_addr,
        server,
        reloader,
        reload_log,
        shutdown,
        tasks,
    })
}

/// This node's counters that the fleet adds up (`crate::shared::counters`):
/// redirects per mirror and upstream, per file and day, and the mirror
/// upstreams' fetches and failures.
fn counter_samples(proxy: Arc<Proxy>) -> crate::shared::counters::SampleSource {
    use crate::shared::CounterSample;
    Arc::new(move || {
        let mut out = Vec::new();
        let redirects = proxy.engine().metrics().redirects();
        for (mirror, upstream, value) in redirects.totals() {
            out.push(CounterSample {
                set: "redirects".to_owned(),
                labels: [mirror, upstream],
                value,
            });
        }
        for day in redirects.report() {
            for m in day.mirrors {
                for f in m.files {
                    out.push(CounterSample {
                        set: format!("files:{}", day.date),
                        labels: [m.mirror.clone(), f.file],
                        value: f.redirects,
                    });
                }
            }
        }
        for set in proxy.snapshot().router.mirrors() {
            for u in set.health() {
                for (name, value) in [("fetches", u.fetches), ("failures", u.failures)] {
                    out.push(CounterSample {
                        set: name.to_owned(),
                        labels: [set.name.clone(), u.base.clone()],
                        value,
                    });
                }
            }
        }
        out
    })
}
