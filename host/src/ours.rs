//! What is Cistern's own: the sockets it listens on and the names it
//! answers to.
//!
//! Two questions are answered here. *Does this URL name Cistern?* Then the
//! request is served locally (a mirror path, the status page, the admin
//! UI), and a name that is not ours is refused by the admin listener (a
//! DNS-rebinding page names its own host) or proxied by the forward proxy.
//! *Is this address one of Cistern's listening sockets?* Asked at connect
//! time, after the name is resolved, for every connection the proxy opens
//! on a client's behalf: a forward proxy that reaches its own admin
//! listener hands the admin API to every proxy client, and one that reaches
//! its own proxy port is a loop. Checking the resolved address, not the
//! name, also catches names and spellings that resolve to us (`127.1`,
//! `2130706433`, a DNS name pointing at this machine).

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::ServerName;

/// What one of Cistern's listening sockets is for (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A plaintext proxy listener (`listen`).
    Proxy,
    /// A TLS site listener (`site { listen … }`).
    TlsSite,
    /// The admin listener.
    Admin,
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketKind::Proxy => "proxy",
            SocketKind::TlsSite => "TLS site",
            SocketKind::Admin => "admin",
        })
    }
}

/// One of Cistern's listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnSocket {
    /// The address as bound (port 0 already replaced by the real port; the
    /// IP may be a wildcard).
    pub addr: SocketAddr,
    /// What it serves.
    pub kind: SocketKind,
}

impl OwnSocket {
    /// Whether a connection to `target` would reach this socket. A wildcard
    /// socket is reached through every local address of the machine; a
    /// connection to `0.0.0.0` or `::` goes to the machine itself.
    pub fn reached_by(&self, target: SocketAddr) -> bool {
        if target.port() != self.addr.port() {
            return false;
        }
        let ip = canonical(target.ip());
        if self.addr.ip().is_unspecified() {
            is_local_ip(ip)
        } else {
            ip == canonical(self.addr.ip()) || ip.is_unspecified()
        }
    }
}

/// The sockets Cistern listens on now. Written when listeners come and go
/// (start-up, reloads), read on every upstream connection without a lock.
#[derive(Debug, Default)]
pub struct OwnSockets {
    /// The writers' view, by source; serialises the (rare) updates.
    parts: Mutex<Parts>,
    /// The union of `parts`, for readers.
    current: ArcSwap<Vec<OwnSocket>>,
}

#[derive(Debug, Default)]
struct Parts {
    listeners: Vec<OwnSocket>,
    admin: Option<OwnSocket>,
}

impl OwnSockets {
    /// Replaces the proxy and TLS site listeners with `listeners`.
    pub fn set_listeners(&self, listeners: impl IntoIterator<Item = OwnSocket>) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.listeners = listeners.into_iter().collect();
        self.publish(&parts);
    }

    /// Records the admin listener's bound address.
    pub fn set_admin(&self, addr: SocketAddr) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.admin = Some(OwnSocket {
            addr,
            kind: SocketKind::Admin,
        });
        self.publish(&parts);
    }

    fn publish(&self, parts: &Parts) {
        let all = parts
            .listeners
            .iter()
            .chain(&parts.admin)
            .copied()
            .collect();
        self.current.store(std::sync::Arc::new(all));
    }

    /// The socket of ours that a connection to `target` would reach.
    pub fn reached_by(&self, target: SocketAddr) -> Option<OwnSocket> {
        self.current
            .load()
            .iter()
            .find(|s| s.reached_by(target))
            .copied()
    }

    /// Resolves `host:port` (a name or an IP literal, IPv6 with or without
    /// brackets) within `within`, and refuses it if any of its addresses is
    /// one of ours. The caller connects to exactly the addresses returned,
    /// so a name cannot resolve to something else between check and use.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        within: Duration,
    ) -> Result<Vec<SocketAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let target = || match bare.contains(':') {
            true => format!("[{bare}]:{port}"),
            false => format!("{bare}:{port}"),
        };
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                match tokio::time::timeout(within, tokio::net::lookup_host((bare, port))).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(source)) => {
                        return Err(ResolveError::Lookup {
                            target: target(),
                            source,
                        });
                    }
                    Err(_) => {
                        return Err(ResolveError::TimedOut {
                            target: target(),
                            after: within,
                        });
                    }
                }
            }
        };
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress { target: target() });
        }
        // Any of them: a name that resolves to us and elsewhere is refused
        // whole rather than tried address by address.
        for addr in &addrs {
            if let Some(own) = self.reached_by(*addr) {
                return Err(ResolveError::SelfTarget(SelfTarget {
                    target: target(),
                    addr: *addr,
                    own,
                }));
            }
        }
        Ok(addrs)
    }
}

/// A connection the proxy would open to one of Cistern's own sockets.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "refusing to connect to {target}: {addr} is Cistern's own {} listener ({}); Cistern never proxies to itself",
    own.kind,
    own.addr
)]
pub struct SelfTarget {
    /// The host and port asked for.
    pub target: String,
    /// The address it resolved to.
    pub addr: SocketAddr,
    /// Our socket it would reach.
    pub own: OwnSocket,
}

/// Why [`OwnSockets::resolve`] gave no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The target is Cistern itself.
    #[error(transparent)]
    SelfTarget(#[from] SelfTarget),
    /// The name could not be resolved.
    #[error("cannot resolve {target}: {source}")]
    Lookup {
        /// The host and port asked for.
        target: String,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// The name resolved to nothing.
    #[error("{target} resolves to no address")]
    NoAddress {
        /// The host and port asked for.
        target: String,
    },
    /// The resolver did not answer in time.
    #[error("resolving {target} timed out after {after:?}")]
    TimedOut {
        /// The host and port asked for.
        target: String,
        /// The time allowed.
        after: Duration,
    },
}

/// The [`SelfTarget`] refusal somewhere in `error`'s chain of causes
/// (through `io::Error`s too, whose `source` skips the error they wrap).
pub fn self_target_in<'e>(error: &'e (dyn StdError + 'static)) -> Option<&'e SelfTarget> {
    let mut next = Some(error);
    // Bounded: a cyclic chain (a bug elsewhere) must not hang a request.
    for _ in 0..16 {
        let e = next?;
        if let Some(t) = self_target_at(e) {
            return Some(t);
        }
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(t) = wrapped.and_then(|inner| self_target_at(inner)) {
            return Some(t);
        }
        next = e.source();
    }
    None
}

/// The refusal if `e` itself is one.
fn self_target_at<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e SelfTarget> {
    match e.downcast_ref::<ResolveError>() {
        Some(ResolveError::SelfTarget(t)) => Some(t),
        _ => e.downcast_ref::<SelfTarget>(),
    }
}

/// Whether `host` and `port` (from a request's `Host`, `:authority` or
/// absolute URL) name the listener bound at `bound`: a name in `names`
/// (see [`ServerName`]), or, on the listener's port, `localhost`, the
/// loopback literals `127.0.0.1` and `[::1]`, the listener's own address,
/// or for a wildcard listener any address of this machine.
pub fn names_listener(host: &str, port: u16, bound: SocketAddr, names: &[ServerName]) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.');
    let ip = host.parse::<IpAddr>().ok().map(canonical);
    if names
        .iter()
        .any(|n| n.matches(host, ip, port, bound.port()))
    {
        return true;
    }
    if port != bound.port() {
        return false;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match ip {
        Some(ip) if bound.ip().is_unspecified() => is_local_ip(ip),
        Some(ip) => {
            ip == canonical(bound.ip())
                || ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
        }
        None => false,
    }
}

pub use crate::config::canonical_ip as canonical;

/// Whether `ip` is an address of this machine: loopback, unspecified, or
/// one the kernel lets us bind (the cheapest exact test, with no interface
/// list to go stale; a bind is one quick syscall, never a wait). Asked
/// only for IP literals on the port of a wildcard listener.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockets(addrs: &[(&str, SocketKind)]) -> OwnSockets {
        let own = OwnSockets::default();
        {
            let mut parts = own.parts.lock().unwrap();
            parts.listeners = addrs
                .iter()
                .map(|(a, kind)| OwnSocket {
                    addr: a.parse().unwrap(),
                    kind: *kind,
                })
                .collect();
            own.publish(&parts);
        }
        own
    }

    #[test]
    fn specific_and_wildcard_sockets() {
        let own = sockets(&[
            ("127.0.0.1:8080", SocketKind::Proxy),
            ("0.0.0.0:9090", SocketKind::Admin),
        ]);
        let hit = |a: &str| own.reached_by(a.parse().unwrap()).map(|s| s.kind);
        assert_eq!(hit("127.0.0.1:8080"), Some(SocketKind::Proxy));
        assert_eq!(hit("[::ffff:127.0.0.1]:8080"), Some(SocketKind::Proxy));
        assert_eq!(hit("0.0.0.0:8080"), Some(SocketKind::Proxy));
        // Another loopback address is another socket.
        assert_eq!(hit("127.0.0.2:8080"), None);
        assert_eq!(hit("127.0.0.1:8081"), None);
        // A wildcard is reached through any local address.
        assert_eq!(hit("127.0.0.2:9090"), Some(SocketKind::Admin));
        assert_eq!(hit("[::1]:9090"), Some(SocketKind::Admin));
        assert_eq!(hit("192.0.2.1:9090"), None);
    }

    #[tokio::test]
    async fn resolve_refuses_names_and_spellings_of_ours() {
        let own = sockets(&[("127.0.0.1:8080", SocketKind::Proxy)]);
        let t = Duration::from_secs(5);
        for host in [
            "127.0.0.1",
            "localhost",
            "127.1",
            "2130706433",
            "[::ffff:127.0.0.1]",
        ] {
            match own.resolve(host, 8080, t).await {
                Err(ResolveError::SelfTarget(s)) => assert_eq!(s.own.kind, SocketKind::Proxy),
                // `localhost` may resolve to ::1 only on some machines.
                Ok(addrs) if host == "localhost" => assert!(addrs.iter().all(|a| a.is_ipv6())),
                other => panic!("{host}: {other:?}"),
            }
        }
        assert_eq!(
            own.resolve("127.0.0.2", 8080, t).await.unwrap(),
            vec!["127.0.0.2:8080".parse::<SocketAddr>().unwrap()]
        );
        let e = own.resolve("127.0.0.1", 8080, t).await.unwrap_err();
        let io = std::io::Error::other(e);
        assert!(self_target_in(&io).is_some());
    }

    #[test]
    fn names_of_a_listener() {
        let names = vec![
            ServerName::new("cache.lan", None),
            ServerName::new("cache.example", Some(80)),
        ];
        let bound: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let ours = |h: &str, p: u16| names_listener(h, p, bound, &names);
        assert!(ours("localhost", 8080));
        assert!(ours("LOCALHOST.", 8080));
        assert!(ours("127.0.0.1", 8080));
        assert!(ours("[::1]", 8080));
        assert!(ours("cache.lan", 8080));
        assert!(ours("Cache.Lan.", 8080));
        assert!(!ours("cache.lan", 80));
        assert!(ours("cache.example", 80));
        assert!(!ours("cache.example", 8080));
        assert!(!ours("127.0.0.2", 8080));
        assert!(!ours("other.lan", 8080));
        assert!(!ours("localhost", 8081));
        let wild: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(names_listener("127.0.0.2", 8080, wild, &[]));
        assert!(!names_listener("192.0.2.1", 8080, wild, &[]));
    }
}
