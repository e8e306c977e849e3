//! One configuration snapshot: everything derived from a validated
//! config (routing table, limiters, compiled policy chains, certificates),
//! built off the request path and swapped whole on reload, so a request
//! finishes on the snapshot it started with.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::fetch::{FetchEngine, FetchSettings};
use crate::limit::Limits;
use crate::policy::bridge::ProxyPolicyHost;
use crate::policy::{PolicyChain, PolicyEngine, PolicyError, PolicyHost, PolicySet};
use crate::route::Router;
use crate::tls::{CertTable, TlsError};

/// Policy chains by mirror or site name. The names are the config's, not a
/// client's, and every request looks one up: foldhash, not SipHash.
pub(crate) type Chains = HashMap<String, PolicyChain, foldhash::fast::RandomState>;

/// Everything derived from one configuration; swapped whole on reload so a
/// request finishes on the snapshot it started with.
pub struct Snapshot {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Its routing table.
    pub router: Router,
    /// Its limiters.
    pub limits: Arc<Limits>,
    /// Fetch settings derived from it.
    pub settings: FetchSettings,
    /// Log request and response headers (`-v`).
    pub log_headers: bool,
    /// Its compiled policies.
    pub policies: PolicySet,
    pub(crate) forward_chain: PolicyChain,
    /// Policy chains of the mirrors, by mirror name.
    pub(crate) mirror_chains: Chains,
    /// Policy chains of the sites, by site name.
    pub(crate) site_chains: Chains,
    /// The sites' certificates, picked by SNI on TLS listeners.
    pub certs: CertTable,
    pub(crate) no_policies: PolicyChain,
    pub(crate) policy_host: Arc<dyn PolicyHost>,
}

/// Why a snapshot could not be built from a valid config.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A policy could not be loaded or compiled.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A site's certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Snapshot {
    /// Derives a snapshot from a validated config, compiling its policies
    /// and loading the sites' certificates. Blocking (compilation, file
    /// reads): call it from `spawn_blocking`.
    pub fn build(
        config: Config,
        policy_engine: &PolicyEngine,
        fetch: &FetchEngine,
        log_headers: bool,
    ) -> Result<Snapshot, SnapshotError> {
        // Certificates first: cheap to check, and a bad one should not wait
        // for every policy to compile.
        let certs = CertTable::load(&config, std::time::SystemTime::now())?;
        let policies = policy_engine.load(&config.policies)?;
        let forward_chain = policies.chain(&config.forward.policies)?;
        let mut mirror_chains = Chains::default();
        for m in &config.mirrors {
            mirror_chains.insert(m.name.clone(), policies.chain(&m.policies)?);
        }
        let mut site_chains = Chains::default();
        for site in &config.sites {
            site_chains.insert(site.name.clone(), policies.chain(&site.policies)?);
        }
        let limits = Arc::new(Limits::with_shared(&config, fetch.shared()));
        let settings = FetchSettings {
            idle: config.timeouts.idle,
            orphan: config.timeouts.orphan_fill,
            mode: config.mode,
            limits: limits.clone(),
            fill_caps: crate::fetch::FillCaps::from_config(&config.limits),
            orphan_rules: config.limits.orphans,
            fleet: config
                .cluster
                .as_ref()
                .map(|c| Arc::new(crate::fetch::peer::Fleet::new(c, fetch.clock()))),
        };
        let policy_host: Arc<dyn PolicyHost> =
            Arc::new(ProxyPolicyHost::new(fetch.clone(), limits.clone()));
        let router = Router::new(&config, fetch.clock());
        for set in router.mirrors().iter().chain(router.sites()) {
            fetch.watch_health(set);
        }
        Ok(Snapshot {
            router,
            config: Arc::new(config),
            limits,
            settings,
            log_headers,
            policies,
            forward_chain,
            mirror_chains,
            site_chains,
            certs,
            no_policies: PolicyChain::default(),
            policy_host,
        })
    }
}
