//! Decides what a request is: a CONNECT tunnel, a forward-proxy request
//! (absolute-form), a transparent one (origin-form for a host that is not
//! us), a path on one of our mirrors, or a request for Cistern itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri, Version, header};

use crate::clock::Clock;
use crate::config::{Config, ForwardConfig, MirrorConfig, ServerName, canonical_ip};
use crate::fetch::MirrorSet;

/// What a request is.
#[derive(Debug)]
pub enum Route {
    /// `CONNECT host:port`.
    Connect(Authority),
    /// An absolute-form request for another host, as `http_proxy=` clients send.
    Forward(Uri),
    /// An origin-form request whose `Host` is not us (iptables REDIRECT).
    Transparent(Uri),
    /// A path below one of our mirrors' prefixes.
    Mirror {
        /// The mirror set.
        set: Arc<MirrorSet>,
        /// The path and query below the prefix.
        rest: String,
    },
    /// A request on a TLS listener for one of its sites.
    Site {
        /// The site's upstreams, as a mirror set rooted at `/`.
        set: Arc<MirrorSet>,
        /// The path and query, without the leading `/`.
        rest: String,
    },
    /// A request on a TLS listener for a host none of its sites serves
    /// (421 Misdirected Request).
    Misdirected,
    /// A request for Cistern itself (its status page, or nothing: 404).
    Local,
    /// Malformed: no usable host, a bad URL.
    Invalid(&'static str),
}

impl Route {
    /// A short name for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Connect(_) => "connect",
            Route::Forward(_) => "forward",
            Route::Transparent(_) => "transparent",
            Route::Mirror { .. } => "mirror",
            Route::Site { .. } => "site",
            Route::Misdirected => "misdirected",
            Route::Local => "local",
            Route::Invalid(_) => "invalid",
        }
    }
}

/// The routing table of one configuration snapshot.
#[derive(Debug)]
pub struct Router {
    /// Mirror sets, longest prefix first so the most specific one wins.
    mirrors: Vec<Arc<MirrorSet>>,
    forward: ForwardConfig,
    sites: Vec<SiteRoute>,
    /// Index in `sites` of `default-site`.
    default_site: Option<usize>,
    /// `server-name`: names that are ours besides our addresses.
    server_names: Vec<ServerName>,
}

/// A site as the router sees it.
#[derive(Debug)]
struct SiteRoute {
    name: String,
    listen: Vec<SocketAddr>,
    set: Arc<MirrorSet>,
}

impl Router {
    /// Builds the table for `config`; the mirror sets measure upstream
    /// health on `clock`.
    pub fn new(config: &Config, clock: &Clock) -> Router {
        let mut mirrors: Vec<Arc<MirrorSet>> = config
            .mirrors
            .iter()
            .map(|m| Arc::new(MirrorSet::new(m, clock)))
            .collect();
        mirrors.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        let sites: Vec<SiteRoute> = config
            .sites
            .iter()
            .map(|s| SiteRoute {
                name: s.name.clone(),
                listen: s.listen.clone(),
                // A site is a mirror of its upstreams rooted at `/`: the
                // same failover, coalescing and replica layout.
                set: Arc::new({
                    let mut set = MirrorSet::new(
                        &MirrorConfig {
                            name: s.name.clone(),
                            prefix: "/".to_owned(),
                            upstreams: s.upstreams.clone(),
                            policies: s.policies.clone(),
                            stale: s.stale,
                            forwarded_for: s.forwarded_for,
                            weights: s.weights.clone(),
                            health: s.health.clone(),
                            // Sites keep today's rule: a query is part of
                            // the resource.
                            query: crate::config::QueryMode::Key,
                            redirect: None,
                        },
                        clock,
                    );
                    set.preserve_host = s.preserve_host;
                    // A site's upstreams are its backends, never shown
                    // to clients as alternatives.
                    set.advertise = false;
                    set
                }),
            })
            .collect();
        let default_site = config
            .default_site
            .as_ref()
            .and_then(|d| sites.iter().position(|s| &s.name == d));
        Router {
            mirrors,
            forward: config.forward.clone(),
            sites,
            default_site,
            server_names: config.server_names.clone(),
        }
    }

    /// The sites' upstream sets, for the admin UI.
    pub fn sites(&self) -> impl Iterator<Item = &Arc<MirrorSet>> {
        self.sites.iter().map(|s| &s.set)
    }

    /// Classifies a request that came on the TLS listener configured as
    /// `listener`: its host (`:authority` or `Host`, port ignored) picks one
    /// of the sites on that listener, else the default site if it is on
    /// that listener. The host, not the SNI, decides: HTTP/2 clients reuse a
    /// connection for every name its certificate covers.
    pub fn route_site<B>(&self, req: &Request<B>, listener: SocketAddr) -> Route {
        if req.method() == Method::CONNECT {
            return Route::Invalid("CONNECT is not served on a TLS site listener");
        }
        // Site names are lowercase in the config: compared in place, the
        // host costs no copy per request.
        let on_listener = |s: &&SiteRoute| s.listen.contains(&listener);
        let site = crate::request::target_host(req).and_then(|(host, _)| {
            let host = host.trim_end_matches('.');
            self.sites
                .iter()
                .filter(on_listener)
                .find(|s| s.name.eq_ignore_ascii_case(host))
        });
        let site = site.or_else(|| {
            self.default_site
                .map(|i| &self.sites[i])
                .filter(on_listener)
        });
        let Some(site) = site else {
            return Route::Misdirected;
        };
        let uri = req.uri();
        let mut rest = uri.path().trim_start_matches('/').to_owned();
        if let Some(q) = uri.query() {
            rest.push('?');
            rest.push_str(q);
        }
        Route::Site {
            set: site.set.clone(),
            rest,
        }
    }

    /// The mirror sets, for the admin UI.
    pub fn mirrors(&self) -> &[Arc<MirrorSet>] {
        &self.mirrors
    }

    /// Whether `client` may use the forward proxy, CONNECT and transparent mode.
    pub fn forward_allowed(&self, client: IpAddr) -> bool {
        let client = canonical_ip(client);
        self.forward.enabled && self.forward.allow.iter().any(|net| net.contains(&client))
    }

    /// Whether a CONNECT may reach `port`.
    pub fn connect_port_allowed(&self, port: u16) -> bool {
        self.forward.connect_ports.contains(&port)
    }

    /// Classifies `req`, received on the plaintext listener bound at
    /// `local` (a wildcard address for a wildcard listener).
    pub fn route<B>(&self, req: &Request<B>, local: SocketAddr) -> Route {
        if req.method() == Method::CONNECT {
            return match req.uri().authority() {
                Some(a) if a.port_u16().is_some() => Route::Connect(a.clone()),
                _ => Route::Invalid("CONNECT needs host:port"),
            };
        }
        let uri = req.uri();
        // HTTP/2 always carries :authority; only HTTP/1 absolute-form means
        // "proxy this for me".
        let absolute_form = uri.authority().is_some() && req.version() != Version::HTTP_2;
        // Whose name the request carries decides only a proxy's route: an
        // origin-form request on a listener that forwards nothing
        // transparently is ours whatever its Host says.
        if !absolute_form && !self.forward.transparent {
            return self.local_route(uri);
        }
        let authority = match uri.authority() {
            Some(a) => Some(a.clone()),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok()),
        };
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let ours = authority
            .as_ref()
            .is_none_or(|a| is_ours(a, &scheme, local, &self.server_names));
        if ours {
            return self.local_route(uri);
        }
        let Some(authority) = authority else {
            return Route::Invalid("no host");
        };
        if absolute_form {
            if scheme != Scheme::HTTP && scheme != Scheme::HTTPS && scheme.as_str() != "ftp" {
                return Route::Invalid("only http, https and ftp URLs can be proxied");
            }
            return Route::Forward(uri.clone());
        }
        if self.forward.transparent {
            let pq = uri.path_and_query().map_or("/", |p| p.as_str());
            return match Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query(pq)
                .build()
            {
                Ok(u) => Route::Transparent(u),
                Err(_) => Route::Invalid("bad URL"),
            };
        }
        self.local_route(uri)
    }

    fn local_route(&self, uri: &Uri) -> Route {
        let path = uri.path();
        for set in &self.mirrors {
            if let Some(rest) = path.strip_prefix(set.prefix.as_str()) {
                let mut rest = rest.to_owned();
                if let Some(q) = uri.query() {
                    rest.push('?');
                    rest.push_str(q);
                }
                return Route::Mirror {
                    set: set.clone(),
                    rest,
                };
            }
            // `/debian` without the slash means the mirror's root.
            if path == set.prefix.trim_end_matches('/') {
                return Route::Mirror {
                    set: set.clone(),
                    rest: String::new(),
                };
            }
        }
        Route::Local
    }
}

/// Whether `authority` names the listener bound at `local`: our address,
/// `localhost`, a loopback literal or a `server-name` (see
/// [`crate::ours::names_listener`]). Any other name is someone else's,
/// even on our port: a forward proxy on port 80 must still forward
/// `http://127.0.0.2/x`. A transparent request redirected from port 80
/// keeps its original `Host`, whose port is not ours.
fn is_ours(
    authority: &Authority,
    scheme: &Scheme,
    local: SocketAddr,
    names: &[ServerName],
) -> bool {
    let default_port = match scheme.as_str() {
        "https" => 443,
        "ftp" => 21,
        _ => 80,
    };
    let (host, port) = crate::request::host_port(authority);
    crate::ours::names_listener(host, port.unwrap_or(default_port), local, names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SiteConfig, Timeouts};

    fn config(transparent: bool) -> Config {
        let mut c = Config::forward_default(std::path::Path::new("/tmp"));
        c.forward.transparent = transparent;
        c.timeouts = Timeouts::default();
        c.server_names = vec![ServerName::new("named.lan", None)];
        c.mirrors = vec![MirrorConfig {
            name: "debian".into(),
            prefix: "/debian/".into(),
            upstreams: vec!["http://deb.example/debian/".parse().unwrap()],
            policies: vec![],
            stale: Default::default(),
            forwarded_for: crate::config::ForwardedFor::Replace,
            weights: vec![1],
            health: Default::default(),
            query: crate::config::QueryMode::Ignore,
            redirect: None,
        }];
        c
    }

    fn req(method: Method, uri: &str, host: Option<&str>, version: Version) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn classification_table() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r = Router::new(&config(true), &Clock::default());
        let cases: &[(Method, &str, Option<&str>, Version, &str)] = &[
            (
                Method::GET,
                "http://example.org/a",
                None,
                Version::HTTP_11,
                "forward",
            ),
            (
                Method::GET,
                "/debian/pool/x.deb",
                Some("127.0.0.1:8080"),
                Version::HTTP_11,
                "mirror",
            ),
            (
                Method::GET,
                "/debian",
                Some("localhost:8080"),
                Version::HTTP_11,
                "mirror",
            ),
            // A name on our port is not ours unless configured
            // (`server-name`): with transparent mode it is fetched.
            (
                Method::GET,
                "/other",
                Some("cache.lan:8080"),
                Version::HTTP_11,
                "transparent",
            ),
            (
                Method::GET,
                "/debian/a",
                Some("named.lan:8080"),
                Version::HTTP_11,
                "mirror",
            ),
            (
                Method::GET,
                "http://named.lan:8080/debian/a",
                None,
                Version::HTTP_11,
                "mirror",
            ),
            // Another loopback address on our port is another server.
            (
                Method::GET,
                "http://127.0.0.2:8080/x",
                None,
                Version::HTTP_11,
                "forward",
            ),
            (
                Method::GET,
                "/x",
                Some("127.0.0.2:8080"),
                Version::HTTP_11,
                "transparent",
            ),
            (
                Method::GET,
                "http://cache.lan:8080/debian/a",
                None,
                Version::HTTP_11,
                "forward",
            ),
            (
                Method::GET,
                "/debian/a",
                Some("[::1]:8080"),
                Version::HTTP_11,
                "mirror",
            ),
            (
                Method::GET,
                "/x",
                Some("example.org"),
                Version::HTTP_11,
                "transparent",
            ),
            (
                Method::CONNECT,
                "example.org:443",
                None,
                Version::HTTP_11,
                "connect",
            ),
            // h2c carries :authority; it is ours, so it is a mirror path.
            (
                Method::GET,
                "http://127.0.0.1:8080/debian/a",
                None,
                Version::HTTP_2,
                "mirror",
            ),
            // Absolute-form for ourselves is not a forward request.
            (
                Method::GET,
                "http://localhost:8080/debian/a",
                None,
                Version::HTTP_11,
                "mirror",
            ),
            (
                Method::GET,
                "ftp://example.org/a",
                None,
                Version::HTTP_11,
                "forward",
            ),
            (
                Method::GET,
                "gopher://example.org/a",
                None,
                Version::HTTP_11,
                "invalid",
            ),
        ];
        for (m, uri, host, v, want) in cases {
            let got = r.route(&req(m.clone(), uri, *host, *v), local);
            assert_eq!(got.as_str(), *want, "{m} {uri} host={host:?}");
        }
        let no_transparent = Router::new(&config(false), &Clock::default());
        for host in ["example.org", "cache.lan:8080"] {
            let got =
                no_transparent.route(&req(Method::GET, "/x", Some(host), Version::HTTP_11), local);
            // Without transparent mode an origin-form request is for us,
            // whatever name the client used.
            assert_eq!(got.as_str(), "local", "{host}");
        }
        // A forward proxy on port 80 forwards any other host on port 80.
        let on_80: SocketAddr = "127.0.0.1:80".parse().unwrap();
        for (uri, want) in [
            ("http://127.0.0.2/x", "forward"),
            ("http://example.org/x", "forward"),
            ("http://127.0.0.1/debian/x", "mirror"),
            ("http://localhost/x", "local"),
        ] {
            let got = no_transparent.route(&req(Method::GET, uri, None, Version::HTTP_11), on_80);
            assert_eq!(got.as_str(), want, "{uri}");
        }
    }

    #[test]
    fn mirror_rest_keeps_the_query() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r = Router::new(&config(false), &Clock::default());
        match r.route(
            &req(
                Method::GET,
                "/debian/dists/x?y=1",
                Some("localhost:8080"),
                Version::HTTP_11,
            ),
            local,
        ) {
            Route::Mirror { rest, .. } => assert_eq!(rest, "dists/x?y=1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sites_route_by_host_on_their_own_listener() {
        let a: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        let site = |name: &str, listen: SocketAddr| SiteConfig {
            name: name.into(),
            listen: vec![listen],
            cert: "c.pem".into(),
            key: "k.pem".into(),
            upstreams: vec![format!("https://origin.{name}/").parse().unwrap()],
            policies: vec![],
            stale: Default::default(),
            forwarded_for: crate::config::ForwardedFor::Replace,
            preserve_host: false,
            weights: vec![1],
            health: Default::default(),
        };
        let mut c = config(false);
        c.sites = vec![
            site("one.test", a),
            site("two.test", a),
            site("three.test", b),
        ];
        let r = Router::new(&c, &Clock::default());
        let on = |host: &str, listener| match r.route_site(
            &req(Method::GET, "/p/x?y=1", Some(host), Version::HTTP_11),
            listener,
        ) {
            Route::Site { set, rest } => format!("{} {rest}", set.name),
            other => other.as_str().to_owned(),
        };
        assert_eq!(on("two.test", a), "two.test p/x?y=1");
        assert_eq!(on("ONE.test:8443", a), "one.test p/x?y=1");
        // A site of another listener is not reachable through this one.
        assert_eq!(on("three.test", a), "misdirected");
        assert_eq!(on("unknown.test", a), "misdirected");
        c.default_site = Some("one.test".into());
        let r = Router::new(&c, &Clock::default());
        match r.route_site(
            &req(Method::GET, "/", Some("unknown.test"), Version::HTTP_11),
            a,
        ) {
            Route::Site { set, .. } => assert_eq!(set.name, "one.test"),
            other => panic!("{other:?}"),
        }
        // The default only applies on the listeners the default site is on.
        let got = r.route_site(
            &req(Method::GET, "/", Some("unknown.test"), Version::HTTP_11),
            b,
        );
        assert_eq!(got.as_str(), "misdirected");
    }

    #[test]
    fn forward_acl_is_loopback_by_default() {
        let r = Router::new(&config(false), &Clock::default());
        assert!(r.forward_allowed("127.0.0.1".parse().unwrap()));
        assert!(r.forward_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!r.forward_allowed("192.0.2.7".parse().unwrap()));
        assert!(r.connect_port_allowed(443));
        assert!(!r.connect_port_allowed(25));
    }
}
