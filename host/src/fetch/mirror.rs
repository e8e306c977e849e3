//! Mirror sets: the ordered upstreams of a `mirror` block, with the health
//! that decides which one is tried first.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

use crate::clock::Clock;
use crate::config::{ForwardedFor, MirrorConfig, QueryMode, StaleRules};

use super::confine::{EscapeError, confine};

/// Why a request path has no URL on a mirror's upstream.
#[derive(Debug, thiserror::Error)]
pub enum MirrorPathError {
    /// The path climbs above the upstream's base.
    #[error(transparent)]
    Escape(#[from] EscapeError),
    /// The joined text is no URL (the upstream URL is left out: clients
    /// see this text).
    #[error("the path is not valid in a URL: {0}")]
    Url(#[from] http::uri::InvalidUri),
}

/// After this many consecutive failures an upstream is tried last for a while.
const FAILURES_BEFORE_DOWN: u32 = 3;
/// How long a failing upstream is tried last before it gets another chance,
/// on the engine's clock.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// One upstream of a mirror set and what we know about its health.
#[derive(Debug)]
pub struct MirrorUpstream {
    /// Base URL, ending with `/`.
    pub base: Uri,
    /// `base` as text, joined with each request's path without re-rendering.
    base_text: String,
    consecutive_failures: AtomicU32,
    /// Milliseconds after `MirrorSet::epoch` until which it is tried last.
    down_until_ms: AtomicU64,
    fetches: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The upstreams of one `mirror` block.
#[derive(Debug)]
pub struct MirrorSet {
    /// The block's name.
    pub name: String,
    /// Our path prefix, starting and ending with `/`.
    pub prefix: String,
    /// Upstreams in config order; the first one names the replica directory.
    pub upstreams: Vec<MirrorUpstream>,
    /// When a stale replica of this set may still answer.
    pub stale: StaleRules,
    /// What the upstreams learn of the client.
    pub forwarded_for: ForwardedFor,
    /// A site's `preserve-host`: its upstreams get the client's `Host`.
    /// Always off for mirrors, whose clients name Cistern.
    pub preserve_host: bool,
    /// What a request's query string does (`query`).
    pub query: QueryMode,
    /// The engine's clock: marks are measured on its monotonic reading,
    /// so tests move them with the manual clock.
    clock: Clock,
    /// The clock's reading when the set was made; marks count from it.
    epoch: Instant,
}

/// A snapshot of one upstream's health, for logs and the admin UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHealth {
    /// Base URL.
    pub base: String,
    /// Currently tried last because of repeated failures.
    pub down: bool,
    /// Requests sent to it.
    pub fetches: u64,
    /// Requests that failed (connect error, timeout, 5xx).
    pub failures: u64,
    /// The last failure's reason.
    pub last_error: Option<String>,
}

impl MirrorSet {
    /// Builds a set from its validated config block; health is measured
    /// on `clock`.
    pub fn new(config: &MirrorConfig, clock: &Clock) -> MirrorSet {
        MirrorSet {
            name: config.name.clone(),
            prefix: config.prefix.clone(),
            upstreams: config
                .upstreams
                .iter()
                .map(|base| MirrorUpstream {
                    base: base.clone(),
                    base_text: base.to_string(),
                    consecutive_failures: AtomicU32::new(0),
                    down_until_ms: AtomicU64::new(0),
                    fetches: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
                .collect(),
            stale: config.stale,
            forwarded_for: config.forwarded_for,
            preserve_host: false,
            query: config.query,
            clock: clock.clone(),
            epoch: clock.monotonic(),
        }
    }

    /// Time since the set was made, on its clock.
    fn elapsed(&self) -> Duration {
        self.clock.monotonic().saturating_duration_since(self.epoch)
    }

    /// The URL of `rest` (the request path after our prefix, with its
    /// query) on upstream `index`, with its dot segments resolved; a rest
    /// that would climb above the upstream's base is refused (see
    /// [`super::confine`]).
    pub fn url(&self, index: usize, rest: &str) -> Result<Uri, MirrorPathError> {
        let base = &self.upstreams[index].base_text;
        let rest = confine(rest.trim_start_matches('/'), &self.prefix)?;
        let mut url = String::with_capacity(base.len() + rest.len());
        url.push_str(base);
        url.push_str(&rest);
        Ok(url.parse()?)
    }

    /// Upstream indexes in the order to try them: healthy ones in config
    /// order, then the ones currently marked down.
    pub fn order(&self) -> Vec<usize> {
        let now = self.elapsed().as_millis() as u64;
        let (mut up, down): (Vec<usize>, Vec<usize>) = (0..self.upstreams.len())
            .partition(|&i| self.upstreams[i].down_until_ms.load(Ordering::Relaxed) <= now);
        up.extend(down);
        up
    }

    /// Records the outcome of a request to upstream `index`.
    pub fn report(&self, index: usize, failure: Option<&str>) {
        let up = &self.upstreams[index];
        up.fetches.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => {
                up.consecutive_failures.store(0, Ordering::Relaxed);
                up.down_until_ms.store(0, Ordering::Relaxed);
            }
            Some(reason) => {
                up.failures.fetch_add(1, Ordering::Relaxed);
                let n = up.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= FAILURES_BEFORE_DOWN {
                    let until = self.elapsed() + DOWN_FOR;
                    up.down_until_ms
                        .store(until.as_millis() as u64, Ordering::Relaxed);
                }
                if let Ok(mut last) = up.last_error.lock() {
                    *last = Some(reason.to_owned());
                }
            }
        }
    }

    /// Health of every upstream, in config order.
    pub fn health(&self) -> Vec<UpstreamHealth> {
        let now = self.elapsed().as_millis() as u64;
        self.upstreams
            .iter()
            .map(|u| UpstreamHealth {
                base: u.base.to_string(),
                down: u.down_until_ms.load(Ordering::Relaxed) > now,
                fetches: u.fetches.load(Ordering::Relaxed),
                failures: u.failures.load(Ordering::Relaxed),
                last_error: u.last_error.lock().ok().and_then(|l| l.clone()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> MirrorSet {
        set_on(&Clock::default())
    }

    fn set_on(clock: &Clock) -> MirrorSet {
        MirrorSet::new(
            &MirrorConfig {
                name: "debian".into(),
                prefix: "/debian/".into(),
                upstreams: vec![
                    "http://a.example/debian/".parse().unwrap(),
                    "http://b.example/d/".parse().unwrap(),
                ],
                policies: vec![],
                stale: StaleRules::default(),
                forwarded_for: ForwardedFor::Replace,
                query: crate::config::QueryMode::Ignore,
            },
            clock,
        )
    }

    #[test]
    fn urls_join_the_rest_onto_each_base() {
        let s = set();
        assert_eq!(
            s.url(0, "pool/x.deb").unwrap(),
            "http://a.example/debian/pool/x.deb"
        );
        assert_eq!(
            s.url(1, "dists/InRelease?x=1").unwrap(),
            "http://b.example/d/dists/InRelease?x=1"
        );
    }

    #[test]
    fn urls_stay_below_each_base() {
        let s = set();
        assert_eq!(
            s.url(1, "pool/x/../y.deb").unwrap(),
            "http://b.example/d/pool/y.deb"
        );
        for rest in ["../secret", "%2e%2e/secret", "a/..%2f..%2fsecret"] {
            assert!(
                matches!(s.url(0, rest), Err(MirrorPathError::Escape(_))),
                "{rest}"
            );
        }
    }

    #[test]
    fn a_failing_upstream_moves_to_the_back_and_recovers_on_success() {
        let s = set();
        assert_eq!(s.order(), vec![0, 1]);
        for _ in 0..FAILURES_BEFORE_DOWN {
            s.report(0, Some("connection refused"));
        }
        assert_eq!(s.order(), vec![1, 0]);
        assert!(s.health()[0].down);
        assert_eq!(
            s.health()[0].last_error.as_deref(),
            Some("connection refused")
        );
        s.report(0, None);
        assert_eq!(s.order(), vec![0, 1]);
    }

    #[test]
    fn a_mirror_marked_down_is_tried_first_again_after_down_for() {
        let clock = Clock::manual(std::time::SystemTime::now());
        let s = set_on(&clock);
        for _ in 0..FAILURES_BEFORE_DOWN {
            s.report(0, Some("status 503"));
        }
        clock.advance(DOWN_FOR - Duration::from_millis(1));
        assert_eq!(s.order(), vec![1, 0]);
        clock.advance(Duration::from_millis(1));
        assert_eq!(s.order(), vec![0, 1]);
        assert!(!s.health()[0].down);
    }
}
