//! A fleet of Cisterns acting as one cache (`cluster { … }`): every cache
//! key has one owner among the nodes, chosen by rendezvous hashing of the
//! key over the node names; a node that misses a key it does not own
//! fills from the owner instead of the upstream, so the owner's fill
//! engine fetches each object once for the whole fleet.
//!
//! Peer requests go to `/_cistern/peer/<target>` on the owner's proxy
//! listener (`target` is the client's request target: an absolute URL
//! for the forward proxy, a path for a mirror) and carry the cluster's
//! secret in `Cistern-Peer-Secret`; the owner serves them as owner and
//! never asks another node, so a peer request cannot loop. A peer that
//! fails (no connection, a timeout, a 5xx) is skipped for `peer-down` and
//! its keys go to the next node in their order, or to the upstream when
//! that is this node.
//!
//! A fill whose SHA-256 is known before anything is asked (a
//! content-addressed URL, see [`content_address`]) first asks the live
//! peers that hold it (those the fleet's digest index in Redis names, or
//! every live peer without one), in the key's rendezvous order, for any
//! complete replica with
//! that digest at `/_cistern/peer/by-sha256/<hex>`: a peer that holds the
//! content under another name (another suite, another mirror, the
//! canonical `Packages.xz` of a `by-hash` file) serves it without the
//! upstream being asked. The bytes are checked against the digest as
//! they are written; a peer whose bytes do not match is marked down like
//! a failed one, nothing is committed, and the next fill goes on to the
//! owner or the upstream.
//!
//! An owner answering a peer request with a 5xx that is its upstream's
//! (passed on, or its own 502/504 about the upstream) says so in
//! [`UPSTREAM_FAILED_HEADER`]: the asking node passes the answer on and
//! keeps the owner up, since the owner itself works.
//!
//! The rendezvous hash is the mirror sets' (FNV-1a and SplitMix64, see
//! [`super::mirror`]): a few lines, stable across builds and restarts, so
//! every node computes the same owner without a crate.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Uri};

use crate::clock::Clock;
use crate::config::{ClusterConfig, StoreOn};

use super::mirror::{hash, mix};

/// The path prefix of peer requests.
pub const PEER_PATH: &str = "/_cistern/peer/";

/// The header that carries the cluster secret on peer requests (kept in
/// `credentials`, which redacts it in logs).
pub use crate::credentials::PEER_SECRET_HEADER as SECRET_HEADER;

/// The header on a refusal of a peer request, so the asking node tells
/// it from an upstream's own 403.
pub const REFUSED_HEADER: HeaderName = HeaderName::from_static("cistern-peer-refused");

/// The path prefix of requests for content by its SHA-256 (hex follows).
pub const BY_SHA256_PATH: &str = "/_cistern/peer/by-sha256/";

/// The header an owner sets on a 5xx answer to a peer request when the
/// failure is its upstream's, not its own.
pub const UPSTREAM_FAILED_HEADER: HeaderName =
    HeaderName::from_static("cistern-peer-upstream-failed");

/// The SHA-256 a URL path names, for content-addressed files: the last
/// two segments `by-hash/SHA256/<64 hex>` (Debian and Ubuntu repositories
/// publish every index file so, and apt fetches them so by default:
/// `Acquire-By-Hash`). `None` for any other path.
pub fn content_address(path: &str) -> Option<[u8; 32]> {
    let mut segments = path.rsplit('/');
    let hex = segments.next()?;
    let algorithm = segments.next()?;
    let by_hash = segments.next()?;
    if by_hash != "by-hash" || algorithm != "SHA256" || hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex, &mut digest).ok()?;
    Some(digest)
}

/// This node's fleet: its name, its peers and their health; built per
/// config snapshot.
#[derive(Debug)]
pub struct Fleet {
    node: Box<str>,
    /// The rendezvous seed of this node's name.
    seed: u64,
    secret: HeaderValue,
    peers: Vec<Peer>,
    down_for: Duration,
    store_on: StoreOn,
    clock: Clock,
}

/// One other node of the fleet.
#[derive(Debug)]
pub struct Peer {
    /// Its node name.
    pub name: Box<str>,
    /// `http://host:port`, without a path.
    base: String,
    seed: u64,
    /// Until when it is skipped after a failure.
    down_until: Mutex<Option<Instant>>,
    asked: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A peer's state for the admin (JSON, `/metrics`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerHealth {
    /// Its node name.
    pub name: String,
    /// Its base URL.
    pub url: String,
    /// Skipped for now after a failure.
    pub down: bool,
    /// Fill requests sent to it.
    pub asked: u64,
    /// Those that failed (no connection, timeout, 5xx).
    pub failed: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Who fills a key: this node (from the upstream) or a peer.
pub(super) enum Owner<'a> {
    /// This node: fetch from the upstream.
    Here,
    /// A live peer that ranks above this node for the key.
    Peer(&'a Peer),
}

impl Fleet {
    /// The fleet of `config`, its health starting fresh.
    pub fn new(config: &ClusterConfig, clock: &Clock) -> Fleet {
        let secret = HeaderValue::from_str(&config.secret).map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Fleet {
            node: config.node.clone().into_boxed_str(),
            seed: hash(config.node.as_bytes()),
            secret: secret.expect("the secret is checked to be visible ASCII"),
            peers: config
                .peers
                .iter()
                .filter(|p| p.name != config.node)
                .map(|p| Peer {
                    name: p.name.clone().into_boxed_str(),
                    base: base_of(&p.url),
                    seed: hash(p.name.as_bytes()),
                    down_until: Mutex::new(None),
                    asked: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
                .collect(),
            down_for: config.peer_down,
            store_on: config.store_on,
            clock: clock.clone(),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether `presented` is the cluster secret, compared in constant
    /// time (the length aside) so a client cannot learn it byte by byte.
    pub fn admits(&self, presented: Option<&HeaderValue>) -> bool {
        let Some(p) = presented else { return false };
        let (a, b) = (p.as_bytes(), self.secret.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether a file filled from its owner is kept here too (`store-on`).
    pub(super) fn stores_peer_fills(&self) -> bool {
        self.store_on == StoreOn::Every
    }

    /// The secret, for the requests this node sends its peers.
    pub(super) fn secret(&self) -> &HeaderValue {
        &self.secret
    }

    /// Who fills `key`: the nodes ranked by their rendezvous score for it,
    /// the peers that are down left out; the first is the owner.
    pub(super) fn owner(&self, key: &str) -> Owner<'_> {
        let file = hash(key.as_bytes());
        let now = self.clock.monotonic();
        let mut ranked: Vec<(u64, Option<&Peer>)> = self
            .peers
            .iter()
            .map(|p| (mix(p.seed ^ file), Some(p)))
            .collect();
        ranked.push((mix(self.seed ^ file), None));
        ranked.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
        for (_, who) in ranked {
            match who {
                None => return Owner::Here,
                Some(p) if p.up(now) => return Owner::Peer(p),
                Some(_) => {}
            }
        }
        Owner::Here
    }

    /// The live peers in `key`'s rendezvous order (this node left out),
    /// for asking them for content by its digest.
    pub(super) fn live_peers(&self, key: &str) -> Vec<&Peer> {
        let file = hash(key.as_bytes());
        let now = self.clock.monotonic();
        let mut ranked: Vec<(u64, &Peer)> = self
            .peers
            .iter()
            .filter(|p| p.up(now))
            .map(|p| (mix(p.seed ^ file), p))
            .collect();
        ranked.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
        ranked.into_iter().map(|(_, p)| p).collect()
    }

    /// The share of `keys` each node (this one first, then the peers in
    /// config order) owns by the rendezvous hash, down peers included:
    /// what the fleet's split of those keys is meant to be.
    pub fn shares<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Vec<(String, u64)> {
        let mut counts = vec![0u64; self.peers.len() + 1];
        for key in keys {
            let file = hash(key.as_bytes());
            let mut best = (mix(self.seed ^ file), 0);
            for (i, p) in self.peers.iter().enumerate() {
                let score = mix(p.seed ^ file);
                if score > best.0 {
                    best = (score, i + 1);
                }
            }
            counts[best.1] += 1;
        }
        std::iter::once(self.node.to_string())
            .chain(self.peers.iter().map(|p| p.name.to_string()))
            .zip(counts)
            .collect()
    }

    /// The peer `url` was sent to, if it is a peer request this node sent.
    pub(super) fn peer_of(&self, url: &Uri) -> Option<&Peer> {
        if !url.path().starts_with(PEER_PATH) {
            return None;
        }
        let text = url.to_string();
        self.peers.iter().find(|p| {
            text.strip_prefix(&p.base)
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Whether `url` is a peer request this node sent.
    pub(super) fn is_peer_url(&self, url: &Uri) -> bool {
        self.peer_of(url).is_some()
    }

    /// Every peer's state, in config order.
    pub fn health(&self) -> Vec<PeerHealth> {
        let now = self.clock.monotonic();
        self.peers
            .iter()
            .map(|p| PeerHealth {
                name: p.name.to_string(),
                url: p.base.clone(),
                down: !p.up(now),
                asked: p.asked.load(Ordering::Relaxed),
                failed: p.failed.load(Ordering::Relaxed),
                last_error: lock(&p.last_error).clone(),
            })
            .collect()
    }

    /// Marks `peer` down for `peer-down` after `why`.
    pub(super) fn failed(&self, peer: &Peer, why: &str) {
        peer.failed.fetch_add(1, Ordering::Relaxed);
        *lock(&peer.down_until) = Some(self.clock.monotonic() + self.down_for);
        *lock(&peer.last_error) = Some(why.to_owned());
        tracing::warn!(target: "cistern::fetch", peer = %peer.name,
            "peer failed ({why}); skipping it for {:?} and filling from the upstream", self.down_for);
    }
}

impl Peer {
    /// The URL of the peer request for `target`, counting the request as
    /// asked of this peer.
    pub(super) fn url(&self, target: &str) -> Result<Uri, http::uri::InvalidUri> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        format!("{}{PEER_PATH}{target}", self.base).parse()
    }

    /// The URL of the request for the content whose SHA-256 is `digest`,
    /// counting the request as asked of this peer.
    pub(super) fn by_sha256_url(&self, digest: &[u8; 32]) -> Uri {
        self.asked.fetch_add(1, Ordering::Relaxed);
        format!("{}{BY_SHA256_PATH}{}", self.base, hex::encode(digest))
            .parse()
            .expect("a peer's base and a hex digest make a URI")
    }

    fn up(&self, now: Instant) -> bool {
        lock(&self.down_until).is_none_or(|until| now >= until)
    }
}

/// `http://host:port` of a peer's configured URL.
fn base_of(url: &Uri) -> String {
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    format!("http://{authority}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerConfig;

    fn fleet(node: &str) -> Fleet {
        let peers = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| PeerConfig {
                name: (*n).to_owned(),
                url: format!("http://127.0.0.{}:8080", i + 1).parse().unwrap(),
            })
            .collect();
        let config = ClusterConfig {
            node: node.to_owned(),
            peers,
            secret: "0123456789abcdef".to_owned(),
            peer_down: Duration::from_secs(30),
            store_on: StoreOn::Every,
            redis: None,
        };
        Fleet::new(&config, &Clock::default())
    }

    fn owner_name(f: &Fleet, key: &str) -> String {
        match f.owner(key) {
            Owner::Here => f.node().to_owned(),
            Owner::Peer(p) => p.name.to_string(),
        }
    }

    #[test]
    fn every_node_agrees_on_the_owner_and_keys_spread() {
        let (a, b, c) = (fleet("a"), fleet("b"), fleet("c"));
        let mut share = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("http/example.org:80/file-{i}");
            let o = owner_name(&a, &key);
            assert_eq!(o, owner_name(&b, &key));
            assert_eq!(o, owner_name(&c, &key));
            *share.entry(o).or_insert(0) += 1;
        }
        for n in ["a", "b", "c"] {
            assert!((800..1200).contains(&share[n]), "{share:?}");
        }
    }

    #[test]
    fn a_down_peers_keys_go_to_the_next_node() {
        let a = fleet("a");
        let key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| owner_name(&a, k) == "b")
            .unwrap();
        let Owner::Peer(b) = a.owner(&key) else {
            unreachable!()
        };
        a.failed(b, "refused");
        assert_ne!(owner_name(&a, &key), "b");
        assert!(a.health().iter().any(|p| p.name == "b" && p.down));
    }

    #[test]
    fn a_by_hash_path_names_its_sha256_and_nothing_else_does() {
        let hex = "0f".repeat(32);
        let path = format!("/debian/dists/stable/main/binary-amd64/by-hash/SHA256/{hex}");
        assert_eq!(content_address(&path), Some([0x0f; 32]));
        for other in [
            format!("/by-hash/SHA256/{}", &hex[..62]),
            format!("/by-hash/MD5Sum/{hex}"),
            format!("/by-hash/SHA256/{hex}/"),
            format!("/pool/SHA256/{hex}"),
            format!("/by-hash/SHA256/{}zz", &hex[..62]),
            "/dists/stable/Release".to_owned(),
        ] {
            assert_eq!(content_address(&other), None, "{other}");
        }
    }

    #[test]
    fn shares_count_every_key_once_and_agree_with_the_owner() {
        let a = fleet("a");
        let keys: Vec<String> = (0..900).map(|i| format!("http://h:80/f{i}")).collect();
        let shares = a.shares(keys.iter().map(String::as_str));
        assert_eq!(shares.iter().map(|(_, n)| n).sum::<u64>(), 900);
        assert_eq!(shares[0].0, "a");
        for (name, n) in &shares {
            let owned = keys.iter().filter(|k| owner_name(&a, k) == *name).count() as u64;
            assert_eq!(*n, owned, "{name}");
        }
    }

    #[test]
    fn only_the_secret_is_admitted() {
        let a = fleet("a");
        assert!(a.admits(Some(&HeaderValue::from_static("0123456789abcdef"))));
        assert!(!a.admits(Some(&HeaderValue::from_static("0123456789abcdeX"))));
        assert!(!a.admits(Some(&HeaderValue::from_static("0123"))));
        assert!(!a.admits(None));
    }
}
