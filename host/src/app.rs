//! Assembles a running Cistern from a validated config: the store (index
//! rebuilt from disk), the upstream client, the fetch engine, the proxy and
//! its listeners. `main` and the in-process tests both start it this way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Admin};
use crate::clock::Clock;
use crate::config::Config;
use crate::fetch::upstream::ClientBuildError;
use crate::fetch::{FetchEngine, UpstreamClient};
use crate::policy::{PolicyEngine, PolicyError};
use crate::proxy::{DRAIN, Proxy, Snapshot};
use crate::server::{self, BoundListener};
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
    /// A policy could not be loaded.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address in config.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Start-up options that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Log request and response headers (`-v`).
    pub log_headers: bool,
    /// The clock for freshness; the system clock when `None`.
    pub clock: Option<Clock>,
}

/// A running Cistern.
pub struct Running {
    /// The addresses actually bound, in config order.
    pub addrs: Vec<SocketAddr>,
    /// The proxy (snapshot swaps, engine, store).
    pub proxy: Arc<Proxy>,
    /// The admin listener's address, when it runs.
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    admin_task: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains connections, and returns when done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        if let Some(t) = self.admin_task {
            let _ = t.await;
        }
    }
}

/// Starts Cistern with `config`.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let clock = options.clock.unwrap_or_default();
    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || ReplicaStore::open(&store_config))
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
    let client = UpstreamClient::new(&config.upstream_tls, &config.timeouts)?;
    let engine = FetchEngine::new(Arc::new(store), client, clock.clone());

    let mut listeners = Vec::new();
    for l in &config.listeners {
        let bound = BoundListener::bind(l.addr)
            .await
            .map_err(|source| StartError::Bind { addr: l.addr, source })?;
        listeners.push(bound);
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();
    let admin_listener = match config.admin.listen {
        None => None,
        Some(addr) => match admin::bind(addr).await {
            Ok(l) => Some((addr, l)),
            Err(source) if config.admin.required => return Err(StartError::Bind { addr, source }),
            // The implicit default port may be taken (a second Cistern, a
            // test run): the proxy matters more than its dashboard.
            Err(e) => {
                tracing::warn!(target: "cistern::admin", "admin UI not started: cannot bind {addr}: {e}; set `admin {{ listen \"…\" }}` in the config");
                None
            }
        },
    };
    let idle = config.timeouts.idle;
    let (snapshot, policy_engine) = {
        let engine = engine.clone();
        let log_headers = options.log_headers;
        tokio::task::spawn_blocking(move || {
            let policy_engine = PolicyEngine::new()?;
            let snapshot = Snapshot::build(config, &policy_engine, &engine, log_headers)?;
            Ok::<_, PolicyError>((snapshot, policy_engine))
        })
        .await
        .expect("policy compile task panicked")?
    };
    let proxy = Arc::new(Proxy::new(snapshot, engine, policy_engine, clock));
    let (shutdown, rx) = watch::channel(false);

    // Keyed limiters forget idle clients now and then.
    let housekeeping = proxy.clone();
    let mut hk_stop = rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => housekeeping.snapshot().limits.housekeeping(),
                _ = hk_stop.changed() => break,
            }
        }
    });

    let mut admin_addr = None;
    let mut admin_task = None;
    if let Some((configured, listener)) = admin_listener {
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: configured, source })?;
        tracing::info!(target: "cistern::admin", "admin UI on http://{addr}/");
        admin_addr = Some(addr);
        admin_task = Some(tokio::spawn(admin::serve(listener, Arc::new(Admin::new(proxy.clone())), rx.clone())));
    }
    let task = tokio::spawn(server::serve(listeners, proxy.clone(), idle, rx, DRAIN));
    for a in &addrs {
        tracing::info!(target: "cistern::server", "listening on http://{a}");
    }
    Ok(Running {
        addrs,
        proxy,
        admin_addr,
        shutdown,
        task,
        admin_task,
    })
}
