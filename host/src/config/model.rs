//! The typed configuration. Every value here has been validated: code that
//! holds a [`Config`] never re-checks it. These structs double as the
//! reference for `config.kdl` (see `docs/config.md`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;

/// One validated configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this snapshot was read from; `None` for the built-in default.
    pub source: Option<PathBuf>,
    /// Plaintext proxy listeners. Never empty.
    pub listeners: Vec<Listener>,
    /// Where and how the replica is kept.
    pub store: StoreConfig,
    /// Forward-proxy behaviour (absolute-form requests, CONNECT, transparent).
    pub forward: ForwardConfig,
    /// Mirror blocks, in file order. Prefixes are unique.
    pub mirrors: Vec<MirrorConfig>,
    /// Rate limits.
    pub limits: LimitsConfig,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Whether to revalidate and whether to connect at all.
    pub mode: CacheMode,
    /// Trust for upstream TLS connections.
    pub upstream_tls: UpstreamTls,
    /// WebAssembly policies declared once (`policy NAME path=… { … }`), used
    /// by name from the forward proxy and mirror blocks.
    pub policies: Vec<PolicyDecl>,
    /// Named rate limiters that policies may ask for a verdict.
    pub limiters: Vec<NamedLimiter>,
    /// TLS-terminated sites (`site NAME { … }`), in file order. Names are
    /// unique.
    pub sites: Vec<SiteConfig>,
    /// The site whose certificate answers a TLS client that names a host no
    /// site serves (`default-site NAME`); without one such a handshake fails.
    pub default_site: Option<String>,
    /// The admin listener (web UI, metrics, JSON API).
    pub admin: AdminConfig,
    /// Names the plaintext listeners answer to besides their addresses,
    /// `localhost` and the loopback literals (`server-name`): a request
    /// for one of them is served locally, never proxied.
    pub server_names: Vec<ServerName>,
    /// This Cistern's id in `Via` (`node-id`), checked to be token
    /// characters; `None` gives a random one at start.
    pub node_id: Option<String>,
    /// Cistern's own targeted cache-control field (`targeted-field`,
    /// RFC 9213), read before `CDN-Cache-Control` and `Cache-Control` and
    /// never forwarded downstream; lower case.
    pub targeted_field: http::HeaderName,
    /// The fleet this Cistern belongs to (`cluster { … }`), if any.
    pub cluster: Option<ClusterConfig>,
}

/// A fleet of Cisterns acting as one cache (`cluster { … }`): each cache
/// key has one owner among the nodes, and the others fill from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name (`node`).
    pub node: String,
    /// The other nodes (`peer NAME URL`); this node's own entry may be
    /// among them, so one list serves every node.
    pub peers: Vec<PeerConfig>,
    /// The secret every peer request carries (`secret`).
    pub secret: String,
    /// How long a failing peer is skipped (`peer-down`).
    pub peer_down: Duration,
    /// Which nodes keep a copy of what they fill from the owner
    /// (`store-on`).
    pub store_on: StoreOn,
    /// Where the fleet's shared state lives (`redis "redis://…"`): the
    /// digest index, fleet-wide limiters and counters; `None` keeps all of
    /// it in this process (see `crate::shared`).
    pub redis: Option<RedisUrl>,
}

/// A Redis server's URL (`redis://[user:password@]host[:port][/db]`),
/// checked to be one the client can connect to.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl RedisUrl {
    /// `text` if the Redis client can use it (`redis://` or
    /// `redis+unix://`), else why not.
    pub fn parse(text: &str) -> Result<RedisUrl, String> {
        let url = RedisUrl(text.to_owned());
        match redis::Client::open(text) {
            Ok(_) if text.starts_with("redis://") || text.starts_with("redis+unix://") => Ok(url),
            Ok(_) => Err(format!(
                "{:?}: only redis:// and redis+unix:// URLs are supported",
                url.redacted()
            )),
            Err(e) => Err(format!("{:?} is not a Redis URL: {e}", url.redacted())),
        }
    }

    /// The URL with its password, if any, replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return self.0.clone();
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((user, host)) => {
                let user = user.split_once(':').map_or(user, |(u, _)| u);
                format!("{scheme}://{user}:***@{host}{path}")
            }
            None => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    /// Without a password the URL may carry.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

/// `store-on` of a cluster: where a file filled from its owner is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreOn {
    /// Every node that serves it keeps its own copy (`"every"`): the next
    /// request there is a local hit.
    #[default]
    Every,
    /// Only the owner keeps it (`"owner"`): the others stream it through
    /// and ask the owner again next time, so the fleet's disks hold each
    /// file once.
    Owner,
}

/// One `peer "name" "http://host:port"` of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node name.
    pub name: String,
    /// Its proxy listener, `http://host:port`.
    pub url: http::Uri,
}

/// The default of [`ClusterConfig::peer_down`].
pub const DEFAULT_PEER_DOWN: Duration = Duration::from_secs(30);

/// The default of [`Config::targeted_field`].
pub const DEFAULT_TARGETED_FIELD: &str = "cistern-cache-control";

/// A host name or address Cistern answers to (`server-name`,
/// `admin { host … }`), with the port it is reached on when that differs
/// from the listener's (a port mapping in front of Cistern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    /// Lower case, without a trailing dot or IPv6 brackets.
    pub host: String,
    /// The host as an address, when it is one (compared as addresses).
    pub ip: Option<IpAddr>,
    /// `None`: the port of the listener asked.
    pub port: Option<u16>,
}

impl ServerName {
    /// `host` (a name or an IP literal, already validated) on `port`.
    pub fn new(host: &str, port: Option<u16>) -> ServerName {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok().map(canonical_ip);
        ServerName { host, ip, port }
    }

    /// Whether a request for `host` (trimmed like [`ServerName::host`],
    /// any case; `ip` when it is an address) on `port` names this, on a
    /// listener whose port is `listener_port`.
    pub fn matches(&self, host: &str, ip: Option<IpAddr>, port: u16, listener_port: u16) -> bool {
        let same_host = match (self.ip, ip) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.host.eq_ignore_ascii_case(host),
            _ => false,
        };
        same_host && port == self.port.unwrap_or(listener_port)
    }
}

/// The admin listener: web UI, `/metrics`, `/healthz` and the JSON API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to bind; `None` turns the admin listener off.
    pub listen: Option<SocketAddr>,
    /// The file asked for this listener explicitly (`admin { … }`): failing
    /// to bind it stops start-up. The implicit default only logs a warning,
    /// so a second Cistern on the same machine still starts.
    pub required: bool,
    /// Names the admin listener answers to besides its own address,
    /// `localhost` and the loopback literals (`admin { host … }`); any
    /// other `Host` is refused, so a DNS-rebinding page cannot read it.
    pub hosts: Vec<ServerName>,
    /// Who may read it; open to anyone who reaches it when empty, which is
    /// only allowed on a loopback address.
    pub auth: AdminAuth,
}

impl AdminConfig {
    /// No admin listener (the built-in forward-proxy defaults).
    pub const DISABLED: AdminConfig = AdminConfig {
        listen: None,
        required: false,
        hosts: Vec::new(),
        auth: AdminAuth::NONE,
    };
}

/// The admin's credentials (`admin { token-sha256 …; user … }`), kept as
/// SHA-256 digests only, so the config file holds no secret in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdminAuth {
    /// Digests of the bearer tokens accepted (`Authorization: Bearer T`).
    pub tokens: Vec<[u8; 32]>,
    /// Users for basic authentication, each with its password's digest.
    pub users: Vec<AdminUser>,
}

impl AdminAuth {
    /// No credentials: the admin asks for none.
    pub const NONE: AdminAuth = AdminAuth {
        tokens: Vec::new(),
        users: Vec::new(),
    };

    /// Whether any credential is configured.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty() || !self.users.is_empty()
    }
}

/// A `user "NAME" password-sha256="…"` of the admin block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUser {
    /// The user name (basic authentication).
    pub name: String,
    /// SHA-256 of the password.
    pub password_sha256: [u8; 32],
}

/// A plaintext listener for proxy traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Address to bind; port 0 picks a free port (tests use this).
    pub addr: SocketAddr,
}

/// How the replica is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `root/host:port/path`, like HTTP Replicator and `wget -r`.
    HostPort,
    /// Every file directly in `root/`; files with the same name replace each
    /// other (HTTP Replicator's `--flat`).
    Flat,
}

/// Where the replica lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The browsable replica tree. Created if missing.
    pub root: PathBuf,
    /// Metadata, partial files and the index, kept out of the browsable tree.
    /// Defaults to the root's path with `.cistern` appended
    /// (`./replica` → `./replica.cistern`).
    pub state: PathBuf,
    /// Replica layout.
    pub layout: Layout,
    /// Upper bound on the bytes of complete replicas; least recently used
    /// files are evicted past it. `None` means unbounded.
    pub max_size: Option<u64>,
    /// Bytes always left free on the replica's filesystem: a response that
    /// would eat into them is served without being stored.
    pub min_free: u64,
}

/// `min-free` when the config leaves it out.
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

/// Forward-proxy settings.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// Serve absolute-form requests (`GET http://host/path`) and CONNECT.
    pub enabled: bool,
    /// Serve origin-form requests whose `Host` is not ours by fetching from
    /// that host (iptables REDIRECT set-ups).
    pub transparent: bool,
    /// Client networks allowed to use the forward proxy, CONNECT and
    /// transparent mode. Defaults to loopback only, so Cistern is never an
    /// open proxy by accident.
    pub allow: Vec<IpNet>,
    /// Ports a CONNECT may reach. Defaults to 443.
    pub connect_ports: Vec<u16>,
    /// Policies run, in order, on forward and transparent requests (names of
    /// [`PolicyDecl`]s).
    pub policies: Vec<String>,
    /// When a stale replica may still answer a forward request.
    pub stale: StaleRules,
    /// What upstreams learn of the client (`forwarded-for`); off by
    /// default: a forward proxy would otherwise tell every web site the
    /// LAN addresses behind it.
    pub forwarded_for: ForwardedFor,
}

/// What Cistern tells an upstream about the client (`forwarded-for`):
/// `X-Forwarded-For` and `Forwarded: for=` (RFC 7239).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// Drop whatever the client sent in those headers (anyone can write
    /// them) and send its address: the default for mirrors and sites.
    Replace,
    /// The client is trusted (a load balancer in front): keep its values
    /// and append its address.
    Append,
    /// Add nothing; the headers go on as the client sent them: the
    /// default for the forward proxy.
    Off,
}

/// When a replica past its freshness may still be served (RFC 5861,
/// RFC 9111 §4.2.4): `stale-if-error` and `stale-while-revalidate` in a
/// `mirror`, `site` or `forward` block. A response's own directives of the
/// same names take precedence; `must-revalidate`, `proxy-revalidate`,
/// `no-cache` and `s-maxage` in a response forbid the config's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleRules {
    /// How long past its freshness a replica may answer when the upstream
    /// fails (connect error, timeout, 5xx).
    pub if_error: Duration,
    /// How long past its freshness a replica may answer at once while it
    /// is revalidated in the background.
    pub while_revalidate: Duration,
}

impl Default for StaleRules {
    /// A day of stale-if-error, so a package cache keeps serving its
    /// indexes while every mirror is down; no stale-while-revalidate, so an
    /// index is never served stale while the upstream answers.
    fn default() -> StaleRules {
        StaleRules {
            if_error: Duration::from_secs(24 * 3600),
            while_revalidate: Duration::ZERO,
        }
    }
}

/// A `mirror NAME { … }` block: a path prefix on our side served from an
/// ordered set of upstreams.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// The block's name, used in logs and the admin UI.
    pub name: String,
    /// Path prefix on our side; starts and ends with `/`.
    pub prefix: String,
    /// Upstream base URLs (http or https), each ending with `/`, chosen by
    /// weight and health per file (see [`HealthConfig`]). Never empty. The first one names the
    /// replica directory (`root/host:port/...`).
    pub upstreams: Vec<Uri>,
    /// Policies run, in order, on this mirror's requests (names of
    /// [`PolicyDecl`]s).
    pub policies: Vec<String>,
    /// When a stale replica may still answer.
    pub stale: StaleRules,
    /// What the upstream learns of the client (`forwarded-for`).
    pub forwarded_for: ForwardedFor,
    /// Each upstream's `weight=`, in the order of `upstreams` (default 1).
    pub weights: Vec<u32>,
    /// How the upstreams' health is checked (`health { … }`).
    pub health: HealthConfig,
    /// What a request's query string does (`query`); sites keep it in the
    /// key ([`QueryMode::Key`]).
    pub query: QueryMode,
    /// `mode="redirect"`: GET and HEAD answer 302 to the chosen upstream
    /// instead of proxying; `None` is `mode="proxy"`.
    pub redirect: Option<RedirectConfig>,
}

/// A `mirror` block in `mode="redirect"` (see `docs/config.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// `serve-locally` patterns, added to the built-in ones: files that
    /// change in place, proxied and cached by Cistern, never redirected.
    pub serve_locally: Vec<String>,
}

/// `health { … }` of a mirror set: active probes and the thresholds that
/// disable and re-enable an upstream (see `docs/config.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Path probed on every upstream, joined to its base like a client's
    /// path; `None` turns active probes off.
    pub probe: Option<String>,
    /// Time between probes of an enabled upstream.
    pub interval: Duration,
    /// How long a probe may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive failures (requests or probes) that disable an upstream.
    pub fail_after: u32,
    /// Consecutive successful probes that re-enable a disabled upstream.
    pub ok_after: u32,
    /// First wait before a disabled upstream is tried again; doubled after
    /// every failed retry.
    pub retry: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            probe: None,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            fail_after: 3,
            ok_after: 2,
            retry: Duration::from_secs(30),
            retry_max: Duration::from_secs(600),
        }
    }
}

/// What a query string on a mirror request does (`query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryMode {
    /// Dropped: neither in the cache key nor sent upstream, so the replica
    /// holds what the path names and `?x=1…N` is one file, one fill. The
    /// default for mirrors, whose files are named by their paths.
    #[default]
    Ignore,
    /// Part of the cache key and sent upstream: each query is a file of
    /// its own (signed URLs, dynamic upstreams). Sites always do this.
    Key,
    /// A request with a query is sent upstream as is and never stored;
    /// without one it is cached as usual.
    Pass,
}

/// Rate limits (governor) and connection caps.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Requests per client address; excess requests get 429 + Retry-After.
    pub requests_per_client: Option<RequestRate>,
    /// Cap on upstream download bandwidth in bytes per second, shared by all
    /// fetches.
    pub download_bytes_per_sec: Option<u64>,
    /// Client connections open at once over all proxy listeners; one more
    /// is closed as soon as it is accepted. At least 1.
    pub max_connections: u32,
    /// Client connections open at once from one address. At least 1.
    pub max_connections_per_client: u32,
    /// Fills (upstream downloads into the replica) in flight at once; a
    /// request that would start one more gets 503 with `Retry-After`.
    /// Followers of a fill under way do not count. At least 1.
    pub max_fills: u32,
    /// Fills in flight at once started by one client address. At least 1.
    pub max_fills_per_client: u32,
    /// HTTP/2 streams a client may have open at once on one connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`). At least 1.
    pub http2_max_streams: u32,
    /// HTTP/2 streams a client may reset before Cistern has accepted them,
    /// per connection, before it is closed (rapid reset). At least 1.
    pub http2_max_resets: u32,
    /// Which fills with no reader left go on (Squid's `quick_abort`).
    pub orphans: OrphanRules,
}

/// When a fill whose clients have all gone is worth finishing
/// (`orphan-finish-left`, `orphan-finish-done`, like Squid's
/// `quick_abort_min` and `quick_abort_pct`). One that is not is cut at
/// once, its partial kept for a later resume; one that is goes on for at
/// most `orphan-fill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrphanRules {
    /// Finish when at most this many bytes are left.
    pub finish_left: u64,
    /// Finish when at least this percentage (0 to 100) of the body is in;
    /// 0 finishes every orphan, of known length or not.
    pub finish_done_pct: u8,
}

impl Default for OrphanRules {
    /// 1 MiB left: a fraction of a second on any link, and the next client
    /// finds a complete replica instead of a partial to resume. 90 % done:
    /// finishing costs at most a ninth of what was already fetched.
    fn default() -> OrphanRules {
        OrphanRules {
            finish_left: 1 << 20,
            finish_done_pct: 90,
        }
    }
}

/// `max-connections` when the config leaves it out.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// `max-connections-per-client` when the config leaves it out.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: u32 = 256;

/// `http2-max-streams` when the config leaves it out: RFC 9113's
/// recommended minimum, near nginx's 128.
pub const DEFAULT_HTTP2_MAX_STREAMS: u32 = 100;

/// `http2-max-resets` when the config leaves it out: the `h2` crate's own
/// default since the rapid-reset fixes (CVE-2023-44487).
pub const DEFAULT_HTTP2_MAX_RESETS: u32 = 20;

/// `max-fills` when the config leaves it out: far more than a LAN's package
/// managers start at once, few enough that upstream connections, partial
/// files and write buffers stay bounded.
pub const DEFAULT_MAX_FILLS: u32 = 256;

/// `max-fills-per-client` when the config leaves it out: apt, pip and
/// browsers download a handful of files at once; a client asking for more
/// distinct misses than this is more likely a crawler or an attack.
pub const DEFAULT_MAX_FILLS_PER_CLIENT: u32 = 32;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_client: None,
            download_bytes_per_sec: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_fills: DEFAULT_MAX_FILLS,
            max_fills_per_client: DEFAULT_MAX_FILLS_PER_CLIENT,
            orphans: OrphanRules::default(),
            http2_max_streams: DEFAULT_HTTP2_MAX_STREAMS,
            http2_max_resets: DEFAULT_HTTP2_MAX_RESETS,
        }
    }
}

/// A request rate: `count` requests per `period`, with bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    /// Requests allowed per period. Non-zero.
    pub count: u32,
    /// The period. Non-zero.
    pub period: Duration,
    /// Largest burst; at least 1. Defaults to `count`.
    pub burst: u32,
}

/// Timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Inactivity on a client or upstream connection before it is dropped
    /// (HTTP Replicator's `--timeout`, default 15 s).
    pub idle: Duration,
    /// Connecting to an upstream, default 10 s.
    pub connect: Duration,
    /// How long a fetch whose clients have all gone keeps filling the replica
    /// (default 10 min); past it the partial is kept for a later resume.
    pub orphan_fill: Duration,
    /// How long an upstream connection is kept in the pool for reuse
    /// (default 4 s): below the keep-alive timeouts servers commonly use
    /// (Apache and many load balancers 5 s), so Cistern drops a connection
    /// before the server closes it under a request.
    pub upstream_idle: Duration,
    /// How long a client may take none of the bytes Cistern has for it
    /// before its connection is closed (default 60 s, nginx's
    /// `send_timeout`).
    pub send: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(15),
            connect: Duration::from_secs(10),
            orphan_fill: Duration::from_secs(600),
            upstream_idle: Duration::from_secs(4),
            send: Duration::from_secs(60),
        }
    }
}

/// Revalidation and connection behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// RFC 9111 shared-cache behaviour.
    #[default]
    Normal,
    /// Anything in the replica is served without revalidation
    /// (HTTP Replicator's `--static`).
    Static,
    /// Never connect upstream; 504 for what is not in the replica.
    Offline,
}

/// Trust anchors for https upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Use the operating system's root certificates.
    pub system_roots: bool,
    /// Extra PEM CA files to trust (tests name their generated CA here).
    pub ca_files: Vec<PathBuf>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            system_roots: true,
            ca_files: Vec::new(),
        }
    }
}

/// A `policy NAME path=… { … }` declaration.
#[derive(Debug, Clone)]
pub struct PolicyDecl {
    /// The name routes refer to.
    pub name: String,
    /// Where the module comes from.
    pub source: PolicySource,
    /// What happens when the policy traps, times out or hits a limit.
    pub on_error: OnError,
    /// Whether an instance is reused across requests.
    pub isolation: Isolation,
    /// Wall-clock budget of one hook call.
    pub deadline: Duration,
    /// Cap on the guest's linear memory, in bytes.
    pub memory_limit: u64,
    /// `param KEY VALUE` children, in file order, readable by the guest.
    pub params: Vec<(String, String)>,
    /// `body-types` and `body-max`: the responses whose whole body the
    /// policy's `on_body` hook (ABI version 2) receives; `None` for none.
    pub body: Option<BodyRule>,
}

/// Which upstream responses go through a policy's `on_body` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyRule {
    /// Media types (`text/html`), lower case, compared without parameters.
    pub types: Vec<String>,
    /// Bodies larger than this pass through unchanged.
    pub max: u64,
}

impl BodyRule {
    /// Whether a `Content-Type` value names one of the declared types.
    pub fn matches(&self, content_type: &str) -> bool {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        self.types.iter().any(|t| t.eq_ignore_ascii_case(essence))
    }
}

/// Where a policy's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A `.wasm` (or `.wat`) file, resolved relative to the config file.
    File(PathBuf),
    /// A policy built into the binary from `policies/` (`path="builtin:distro"`).
    Builtin(String),
}

/// Failure mode of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Carry on as if the policy were absent (fail open).
    #[default]
    Pass,
    /// Answer 503 (fail closed).
    Deny,
}

/// Instance reuse of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One instance per policy per worker, reused until it traps or grows.
    #[default]
    Reuse,
    /// A fresh instance for every hook call.
    Fresh,
}

/// A `limiter NAME rate=… per=… burst=…` declaration.
#[derive(Debug, Clone)]
pub struct NamedLimiter {
    /// The name policies use.
    pub name: String,
    /// The rate per key.
    pub rate: RequestRate,
}

/// A `site NAME { … }` block: a host name whose TLS Cistern terminates,
/// served from an ordered set of upstreams like a mirror rooted at `/`.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// The host name, lower case; TLS clients name it in SNI and HTTP
    /// clients in `Host`.
    pub name: String,
    /// TLS listeners serving this site; sites that name the same address
    /// share it and the certificate is picked by SNI. Never empty.
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key: PathBuf,
    /// Upstream base URLs (http or https), each ending with `/`, chosen by
    /// weight and health per file (see [`HealthConfig`]). Never empty. The first one names the
    /// replica directory (`root/host:port/...`).
    pub upstreams: Vec<Uri>,
    /// Policies run, in order, on this site's requests (names of
    /// [`PolicyDecl`]s).
    pub policies: Vec<String>,
    /// When a stale replica may still answer.
    pub stale: StaleRules,
    /// What the upstream learns of the client (`forwarded-for`).
    pub forwarded_for: ForwardedFor,
    /// Send the client's `Host` upstream instead of the upstream URL's
    /// authority (`preserve-host`).
    pub preserve_host: bool,
    /// Each upstream's `weight=`, in the order of `upstreams` (default 1).
    pub weights: Vec<u32>,
    /// How the upstreams' health is checked (`health { … }`).
    pub health: HealthConfig,
}

impl Config {
    /// The TLS listener addresses the sites name, each once, in file order.
    pub fn tls_listeners(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for addr in self.sites.iter().flat_map(|s| &s.listen) {
            if !out.contains(addr) {
                out.push(*addr);
            }
        }
        out
    }

    /// Every file this config reads besides itself: policy modules and the
    /// sites' certificates and keys. A change to any of them is a reason
    /// to reload.
    pub fn named_files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let policies = self.policies.iter().filter_map(|p| match &p.source {
            PolicySource::File(path) => Some(path.clone()),
            PolicySource::Builtin(_) => None,
        });
        let certs = self
            .sites
            .iter()
            .flat_map(|s| [s.cert.clone(), s.key.clone()]);
        for path in policies.chain(certs) {
            if !out.contains(&path) {
                out.push(path);
            }
        }
        out
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
