//! Decides what a request is: a CONNECT tunnel, a forward-proxy request
//! (absolute-form), a transparent one (origin-form for a host that is not
//! us), a path on one of our mirrors, or a request for Cistern itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri, Version, header};

use crate::config::{Config, ForwardConfig};
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
}

impl Router {
    /// Builds the table for `config`.
    pub fn new(config: &Config) -> Router {
        let mut mirrors: Vec<Arc<MirrorSet>> = config
            .mirrors
            .iter()
            .map(|m| Arc::new(MirrorSet::new(m)))
            .collect();
        mirrors.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        Router {
            mirrors,
            forward: config.forward.clone(),
        }
    }

    /// The mirror sets, for the admin UI.
    pub fn mirrors(&self) -> &[Arc<MirrorSet>] {
        &self.mirrors
    }

    /// Whether `client` may use the forward proxy, CONNECT and transparent mode.
    pub fn forward_allowed(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.forward.enabled && self.forward.allow.iter().any(|net| net.contains(&client))
    }

    /// Whether a CONNECT may reach `port`.
    pub fn connect_port_allowed(&self, port: u16) -> bool {
        self.forward.connect_ports.contains(&port)
    }

    /// Classifies `req`, received on a connection whose local address is `local`.
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
            .is_none_or(|a| is_ours(a, &scheme, local));
        if ours {
            return self.local_route(uri);
        }
        let Some(authority) = authority else {
            return Route::Invalid("no host");
        };
        if absolute_form {
            if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
                return Route::Invalid("only http and https URLs can be proxied");
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

/// IPv4-mapped IPv6 addresses compare as IPv4 against the ACL.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `authority` names this listener: its port is the listener's and
/// the host is `localhost`, a name (clients reach us by many names), or one
/// of our addresses. A transparent request redirected from port 80 keeps
/// its original `Host`, whose port is not ours.
fn is_ours(authority: &Authority, scheme: &Scheme, local: SocketAddr) -> bool {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let port = authority.port_u16().unwrap_or(default_port);
    if port != local.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            canonical(ip) == canonical(local.ip())
                || ip.is_loopback()
                || local.ip().is_unspecified()
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MirrorConfig, Timeouts};

    fn config(transparent: bool) -> Config {
        let mut c = Config::forward_default(std::path::Path::new("/tmp"));
        c.forward.transparent = transparent;
        c.timeouts = Timeouts::default();
        c.mirrors = vec![MirrorConfig {
            name: "debian".into(),
            prefix: "/debian/".into(),
            upstreams: vec!["http://deb.example/debian/".parse().unwrap()],
            policies: vec![],
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
        let r = Router::new(&config(true));
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
            (
                Method::GET,
                "/other",
                Some("cache.lan:8080"),
                Version::HTTP_11,
                "local",
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
                "invalid",
            ),
        ];
        for (m, uri, host, v, want) in cases {
            let got = r.route(&req(m.clone(), uri, *host, *v), local);
            assert_eq!(got.as_str(), *want, "{m} {uri} host={host:?}");
        }
        let no_transparent = Router::new(&config(false));
        let got = no_transparent.route(
            &req(Method::GET, "/x", Some("example.org"), Version::HTTP_11),
            local,
        );
        assert_eq!(got.as_str(), "local");
    }

    #[test]
    fn mirror_rest_keeps_the_query() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r = Router::new(&config(false));
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
    fn forward_acl_is_loopback_by_default() {
        let r = Router::new(&config(false));
        assert!(r.forward_allowed("127.0.0.1".parse().unwrap()));
        assert!(r.forward_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!r.forward_allowed("192.0.2.7".parse().unwrap()));
        assert!(r.connect_port_allowed(443));
        assert!(!r.connect_port_allowed(25));
    }
}
