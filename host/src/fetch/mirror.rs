//! Mirror sets: the upstreams of a `mirror` (or `site`) block, the choice
//! of one per file and the health that takes a failing one out.
//!
//! # Choice
//! Each file (the request's path below the prefix, with its query) goes to
//! the enabled upstream with the highest weighted rendezvous score
//! `w / -ln(u)`, where `u` in (0, 1) is a hash of the file and the
//! upstream's base URL and `w` its effective weight. So an upstream gets a
//! share `w / Σw` of the files, the same file keeps going to the same
//! upstream while the set's health is unchanged (its replica can be
//! resumed there, where its validators came from), and when an upstream
//! leaves or comes back only its own files move. The others follow in
//! score order as failover, then the disabled ones (a last resort when
//! every enabled one failed), then those that answered 404 for this file.
//!
//! The effective weight is `weight × 2^-(latency steps + error steps)`:
//! - latency steps: `⌊log2(L / Lmin)⌋` capped at 3, where `L` is the
//!   upstream's moving average time to a response head (each new sample
//!   counts 1/8) and `Lmin` the lowest among the enabled upstreams, both
//!   floored at 50 ms (so loopback and LAN jitter moves nothing);
//! - error steps: its consecutive failures, capped at 3.
//!
//! Both are whole steps, so the shares change only when an upstream gets
//! twice as slow or fails again, not with every sample.
//!
//! # Health
//! `fail-after` consecutive failures (connect errors, timeouts, 5xx, a
//! body cut short; or failed probes) disable an upstream. Bodies are
//! counted apart from heads: a mirror whose heads come fine but whose
//! bodies are cut short or fail their digest (`Repr-Digest`/`Digest`)
//! counts [`Outcome::BadBody`] strikes that its next head does not
//! clear; only a whole body ([`Outcome::Delivered`]) or a re-enabling
//! probe does, and `fail-after` of them disable it too. It is tried
//! again after `retry`, doubling after each failed retry up to
//! `retry-max`. Without a `probe` the retry is one client request: the
//! first one after the retry time tries it first, and a success
//! re-enables it. With a `probe` only probes retry it, and `ok-after`
//! successful probes in a row re-enable it: a client never lands on a
//! mirror that has not proved itself (unless every enabled one failed).
//!
//! A 404 from one upstream is remembered for that file (for
//! [`MISSING_FOR`], at most [`MISSING_CAP`] files per set) and the next
//! upstream is asked; the upstream is not disabled for it. So is a body
//! from one upstream that failed its digest: that mirror's copy of the
//! file is bad, and the next request for it goes to the next mirror.
//!
//! In redirect mode no request for a redirected file reaches a mirror,
//! so nothing would learn its 404s: a redirect to a mirror that has no
//! memory for the file yet claims a background `HEAD` of it there
//! ([`MirrorSet::claim_check`]: once per file and mirror for
//! [`MISSING_FOR`], at most [`CHECKS_PER_SECOND`] per set), whose 404
//! fills the memory for the next client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::Uri;

use crate::clock::Clock;
use crate::config::{ForwardedFor, HealthConfig, MirrorConfig, QueryMode, StaleRules};
use crate::store::CacheKey;

use super::confine::{EscapeError, confine};

mod alternatives;

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

/// How long a 404 from one upstream for one file is remembered.
pub const MISSING_FOR: Duration = Duration::from_secs(300);
/// How many (file, upstream) 404s a set remembers at most.
pub const MISSING_CAP: usize = 10_000;
/// The most background checks of redirected files (see the module
/// docs) a set sends per second of its clock; the rest wait for a later
/// request of the same file.
pub const CHECKS_PER_SECOND: u32 = 20;
/// The longest rest [`MirrorSet::push_url`] joins without the `Uri`
/// parser: far below `http`'s limit on a whole URI (64 KiB), so no base
/// can take a joined one past it.
const PLAIN_REST_MAX: usize = 8 * 1024;

/// Whether `http` takes byte `b` as it is both in a URI's path and in its
/// query: `!`, `$` to `;`, `=`, `?` to `_`, `a` to `z`, `|`, `~` (its
/// path and query tables' common part, `?` included since it starts the
/// query or belongs to it). Such a rest after a base parses to the same
/// text.
fn plain_url_byte(b: u8) -> bool {
    matches!(b, b'!' | b'$'..=b';' | b'=' | b'?'..=b'_' | b'a'..=b'z' | b'|' | b'~')
}

/// Sets of up to this many upstreams weigh them without allocating.
const INLINE_UPSTREAMS: usize = 8;
/// Latencies below this count as this (see the module docs).
const LATENCY_FLOOR_US: u64 = 50_000;
/// The most halvings of a share for latency, and for errors.
const MAX_STEPS: u32 = 3;

/// One upstream of a mirror set and what we know about its health.
#[derive(Debug)]
pub struct MirrorUpstream {
    /// Base URL, ending with `/`.
    pub base: Uri,
    /// `base` as text, joined with each request's path without re-rendering.
    base_text: String,
    /// `weight=` from the config.
    pub weight: u32,
    /// The base URL's hash, mixed with each file's for the rendezvous score.
    seed: u64,
    fetches: AtomicU64,
    failures: AtomicU64,
    health: Mutex<Health>,
}

/// The changing part of an upstream's health; its lock is never held
/// across an `.await`.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    /// Bodies cut short or failing their digest since the last whole one
    /// (or the probe that re-enabled it); a good head does not reset it.
    bad_bodies: u32,
    /// `Some` while disabled.
    down: Option<Down>,
    last_error: Option<String>,
    /// Moving average of the time to a response head, in microseconds.
    latency_us: Option<u64>,
    last_probe: Option<ProbeRecord>,
    /// Milliseconds after the set's epoch when the next probe is due.
    next_probe_ms: u64,
}

/// A disabled upstream's retry schedule.
#[derive(Debug, Clone, Copy)]
struct Down {
    /// When it may be tried again (milliseconds after the set's epoch).
    retry_at_ms: u64,
    /// The current wait between retries.
    backoff: Duration,
    /// Successful probes in a row since it was disabled.
    probes_ok: u32,
}

/// The outcome of one health probe, for the admin UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRecord {
    /// When it was sent (wall clock of the engine).
    pub at: SystemTime,
    /// Whether it succeeded (a 2xx within the timeout).
    pub ok: bool,
    /// `status 200`, or why it failed.
    pub detail: String,
    /// How long the answer took (real time).
    pub took: Duration,
}

/// How a request to an upstream went, for its health.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// It answered (anything but a 5xx) after this long.
    Answered(Duration),
    /// It failed before or at its head: connect error, timeout, 5xx.
    Failed(&'a str),
    /// Its body failed after a good head: cut short, stalled, or not the
    /// bytes its digest announced.
    BadBody(&'a str),
    /// A whole body arrived from it (and matched its digest, if one was
    /// announced).
    Delivered,
}

/// One place to try, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index in [`MirrorSet::upstreams`].
    pub index: usize,
    /// It answered 404 for this file recently.
    pub known_missing: bool,
}

/// An upstream's place in a redirector's order (see
/// [`MirrorSet::redirect_order`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Index in [`MirrorSet::upstreams`].
    pub index: usize,
    /// Whether a client may be sent there.
    pub state: RankedState,
    /// Its share of new files now, 0 to 1 (0 while disabled).
    pub share: f64,
}

/// The hash of a file (the rest of a request below the prefix, without
/// its query) that keys the set's 404 memory and its checks, and picks
/// its upstream: a redirect computes it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey(u64);

impl FileKey {
    /// The key of `rest`.
    pub fn of(rest: &str) -> FileKey {
        FileKey(hash(rest.as_bytes()))
    }
}

/// What a redirect of one file does ([`MirrorSet::redirect_choice`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Redirection {
    /// Send the client to this upstream (index in [`MirrorSet::upstreams`]).
    To(usize),
    /// Every enabled upstream answered 404 for it recently.
    Missing,
    /// No upstream is enabled.
    Down,
}

/// Whether a redirector may send a client to an upstream, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RankedState {
    /// Enabled, and not known to lack the file.
    Usable,
    /// Enabled, but it answered 404 for this file recently.
    Missing,
    /// Disabled by failures.
    Down,
}

impl RankedState {
    /// `up`, `missing` or `down`, for JSON and HTML.
    pub fn as_str(self) -> &'static str {
        match self {
            RankedState::Usable => "up",
            RankedState::Missing => "missing",
            RankedState::Down => "down",
        }
    }
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
    /// Probes and thresholds.
    pub health: HealthConfig,
    /// What a request's query string does (`query`).
    pub query: QueryMode,
    /// `mode="redirect"`: GET and HEAD answer 302 to the chosen upstream.
    pub redirect: Option<super::redirect::Redirect>,
    /// The engine's clock: marks are measured on its monotonic reading,
    /// so tests move them with the manual clock.
    clock: Clock,
    /// The clock's reading when the set was made; marks count from it.
    epoch: Instant,
    /// (file hash, upstream index) → when its 404 is forgotten (ms after
    /// the epoch).
    missing: Mutex<FileMap>,
    /// Background checks of redirected files (see the module docs).
    checks: Mutex<Checks>,
    /// Bumped whenever an upstream is disabled or re-enabled, so what is
    /// derived from the set's health (the Metalink links) knows when to
    /// rebuild.
    generation: AtomicU64,
    /// Its upstreams are public mirrors that clients may be pointed at
    /// (Metalink): true for a `mirror` block, false for a site, whose
    /// upstreams are its private backends.
    pub advertise: bool,
    /// The first upstream's key, which plain rests extend (see
    /// [`MirrorSet::plain_key`]).
    key_base: Option<crate::store::KeyBase>,
}

/// (file key, upstream index) → a time (ms after the set's epoch): the
/// 404 memory and the checks' memory. Hashed with foldhash, seeded at
/// random per map: a redirect looks one up on every request, where
/// SipHash cost more than the rest of the claim; the key is a hash of a
/// client's path, so the seed keeps clients from aiming collisions.
type FileMap = HashMap<(u64, usize), u64, foldhash::fast::RandomState>;

/// The background checks a redirecting set has sent: which (file,
/// upstream) pairs, until when they are not checked again, and this
/// second's count for the rate limit.
#[derive(Debug, Default)]
struct Checks {
    /// (file hash, upstream index) → when it may be checked again (ms
    /// after the epoch).
    until: FileMap,
    /// The second of the set's clock `sent` counts in.
    second: u64,
    /// Checks sent in that second.
    sent: u32,
}

/// A snapshot of one upstream's health, for logs and the admin UI.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealth {
    /// Base URL.
    pub base: String,
    /// Disabled: clients reach it only when every enabled upstream failed.
    pub down: bool,
    /// `up` or `down`.
    pub state: &'static str,
    /// `weight=` from the config.
    pub weight: u32,
    /// Its share of new files now, 0 to 1 (0 while disabled).
    pub share: f64,
    /// Moving average time to a response head.
    pub latency: Option<Duration>,
    /// Requests sent to it.
    pub fetches: u64,
    /// Requests that failed (connect error, timeout, 5xx, a cut body, a
    /// body that failed its digest).
    pub failures: u64,
    /// Failures (requests or probes) since its last success: the larger
    /// of the failed heads in a row and the bad bodies since the last
    /// whole one.
    pub consecutive_failures: u32,
    /// The last failure's reason.
    pub last_error: Option<String>,
    /// The last probe, if probes are on.
    pub last_probe: Option<ProbeRecord>,
}

/// FNV-1a over `bytes`, then a SplitMix64 finalizer so that nearby inputs
/// land far apart; stable across builds and restarts (unlike std's
/// hasher), so a file maps to the same upstream after a restart.
pub(super) fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finalizer.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weighted rendezvous score of an upstream for a file: `w / -ln(u)`
/// with `u` uniform in (0, 1). The highest score wins; an upstream wins a
/// share `w / Σw` of all files.
fn score(seed: u64, file: u64, weight: f64) -> f64 {
    let h = mix(seed ^ file);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// Latency halvings for an average of `us` against the set's best `min`.
fn latency_steps(us: Option<u64>, min: u64) -> u32 {
    let Some(us) = us else { return 0 };
    let ratio = us.max(LATENCY_FLOOR_US) / min.max(LATENCY_FLOOR_US);
    // ⌊log2(ratio)⌋, ratio ≥ 1.
    (u64::BITS - 1 - ratio.max(1).leading_zeros()).min(MAX_STEPS)
}

impl Health {
    /// Failures in a row: failed heads since the last good one, or bad
    /// bodies since the last whole one, whichever is more.
    fn strikes(&self) -> u32 {
        self.consecutive_failures.max(self.bad_bodies)
    }

    /// Without probes: claims the retry of a disabled upstream whose
    /// retry is due, for the request being ordered. The next retry is
    /// pushed a backoff away, so a claimed retry that never reports back
    /// cannot leave the upstream out for good.
    fn claim_retry(&mut self, now_ms: u64) -> bool {
        match &mut self.down {
            Some(d) if now_ms >= d.retry_at_ms => {
                d.retry_at_ms = now_ms + d.backoff.as_millis() as u64;
                true
            }
            _ => false,
        }
    }

    /// Disables the upstream, first retry after `retry`.
    fn disable(&mut self, now_ms: u64, config: &HealthConfig) {
        let retry_at_ms = now_ms + config.retry.as_millis() as u64;
        self.down = Some(Down {
            retry_at_ms,
            backoff: config.retry,
            probes_ok: 0,
        });
        self.next_probe_ms = retry_at_ms;
    }

    /// A retry failed: wait twice as long, up to `retry-max`.
    fn back_off(&mut self, now_ms: u64, config: &HealthConfig) {
        if let Some(d) = &mut self.down {
            d.backoff = (d.backoff * 2).min(config.retry_max);
            d.retry_at_ms = now_ms + d.backoff.as_millis() as u64;
            d.probes_ok = 0;
            self.next_probe_ms = d.retry_at_ms;
        }
    }
}

impl MirrorUpstream {
    /// The base URL as text, ending with `/`.
    pub fn base_str(&self) -> &str {
        &self.base_text
    }
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
                .enumerate()
                .map(|(i, base)| {
                    let base_text = base.to_string();
                    MirrorUpstream {
                        base: base.clone(),
                        seed: hash(base_text.as_bytes()),
                        base_text,
                        weight: config.weights.get(i).copied().unwrap_or(1).max(1),
                        fetches: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                        health: Mutex::new(Health::default()),
                    }
                })
                .collect(),
            stale: config.stale,
            forwarded_for: config.forwarded_for,
            preserve_host: false,
            health: config.health.clone(),
            query: config.query,
            redirect: config.redirect.as_ref().map(super::redirect::Redirect::new),
            clock: clock.clone(),
            epoch: clock.monotonic(),
            missing: Mutex::new(FileMap::default()),
            checks: Mutex::new(Checks::default()),
            generation: AtomicU64::new(0),
            advertise: true,
            key_base: config.upstreams.first().and_then(crate::store::KeyBase::of),
        }
    }

    /// The engine's clock the set measures health on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Time since the set was made, on its clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.clock
            .monotonic()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
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
        // From the String itself: `parse` would copy it into a new buffer.
        Ok(Uri::try_from(url)?)
    }

    /// The cache key of `rest` below the first upstream, as
    /// `CacheKey::from_uri(&self.url(0, rest)?)` gives it, made without
    /// the URL when `rest` is a plain path (see
    /// [`crate::store::KeyBase::join`]); `None` otherwise.
    pub fn plain_key(&self, rest: &str) -> Option<CacheKey> {
        self.key_base.as_ref()?.join(rest)
    }

    /// Appends the text of [`MirrorSet::url`]`(index, rest)` to `out`, as
    /// [`crate::request::uri_text`] would render that `Uri`, without
    /// building it (a redirect's `Location` needs only the text). A rest
    /// made only of bytes that `http` takes as they are in both a path
    /// and a query is joined as it is; anything else (spaces, quotes,
    /// braces, bytes above ASCII, a fragment, a very long rest) goes
    /// through the `Uri` parser for its verdict and its rendering, so the
    /// answer and the errors are the same as `url`'s. `out` is left as it
    /// was on an error.
    pub fn push_url(
        &self,
        index: usize,
        rest: &str,
        out: &mut String,
    ) -> Result<(), MirrorPathError> {
        let base = &self.upstreams[index].base_text;
        let confined = confine(rest.trim_start_matches('/'), &self.prefix)?;
        if confined.len() <= PLAIN_REST_MAX && confined.bytes().all(plain_url_byte) {
            out.reserve(base.len() + confined.len());
            out.push_str(base);
            out.push_str(&confined);
            return Ok(());
        }
        let url = self.url(index, rest)?;
        crate::request::push_uri(out, &url);
        Ok(())
    }

    /// The index of the upstream `url` was sent to (the longest base that
    /// starts it).
    pub fn index_of(&self, url: &Uri) -> Option<usize> {
        let text = url.to_string();
        (0..self.upstreams.len())
            .filter(|&i| text.starts_with(&self.upstreams[i].base_text))
            .max_by_key(|&i| self.upstreams[i].base_text.len())
    }

    /// Each upstream's effective weight now, 0 when disabled (see the
    /// module docs for the formula).
    fn effective_weights(&self) -> Vec<f64> {
        self.with_weights(<[f64]>::to_vec)
    }

    /// Calls `f` with [`MirrorSet::effective_weights`], kept on the stack
    /// for a set of up to [`INLINE_UPSTREAMS`] (a redirect asks on every
    /// request).
    fn with_weights<R>(&self, f: impl FnOnce(&[f64]) -> R) -> R {
        let n = self.upstreams.len();
        if n <= INLINE_UPSTREAMS {
            let mut healths = [(false, 0, None); INLINE_UPSTREAMS];
            let mut weights = [0.0; INLINE_UPSTREAMS];
            self.weights_into(&mut healths[..n], &mut weights[..n]);
            f(&weights[..n])
        } else {
            let mut healths = vec![(false, 0, None); n];
            let mut weights = vec![0.0; n];
            self.weights_into(&mut healths, &mut weights);
            f(&weights)
        }
    }

    /// Fills `out` (one slot per upstream) with the effective weights,
    /// `healths` (as long) being room for what each health lock gave:
    /// whether it is enabled, its strikes, its latency.
    fn weights_into(&self, healths: &mut [(bool, u32, Option<u64>)], out: &mut [f64]) {
        for (slot, u) in healths.iter_mut().zip(&self.upstreams) {
            let h = lock(&u.health);
            *slot = (h.down.is_none(), h.strikes(), h.latency_us);
        }
        let min = healths
            .iter()
            .filter(|(enabled, _, _)| *enabled)
            .filter_map(|(_, _, l)| *l)
            .min()
            .unwrap_or(LATENCY_FLOOR_US);
        for ((w, u), &(enabled, failures, latency)) in
            out.iter_mut().zip(&self.upstreams).zip(healths.iter())
        {
            *w = if enabled {
                let steps = latency_steps(latency, min) + failures.min(MAX_STEPS);
                f64::from(u.weight) / f64::from(1u32 << steps)
            } else {
                0.0
            };
        }
    }

    /// Upstreams in the order to try them for `rest` (the path below the
    /// prefix, with its query): a disabled one whose retry is due (without
    /// probes), the enabled ones by weighted rendezvous score, then the
    /// disabled ones, then those that said 404 for it.
    pub fn order(&self, rest: &str) -> Vec<Choice> {
        let now = self.now_ms();
        let file = hash(rest.as_bytes());
        let weights = self.effective_weights();
        let retry = if self.health.probe.is_none() {
            self.upstreams
                .iter()
                .position(|u| lock(&u.health).claim_retry(now))
        } else {
            None
        };
        let mut ranked = self.rank(file, &weights);
        if let Some(r) = retry
            && let Some(at) = ranked.iter().position(|c| c.0 == r)
        {
            let tried = ranked.remove(at);
            ranked.insert(0, tried);
        }
        let mut out: Vec<Choice> = {
            let missing = lock(&self.missing);
            ranked
                .into_iter()
                .map(|(index, _, _)| Choice {
                    index,
                    known_missing: missing.get(&(file, index)).is_some_and(|&t| t > now),
                })
                .collect()
        };
        // Stable: the known-missing keep their order, at the end.
        out.sort_by_key(|c| c.known_missing);
        out
    }

    /// `(index, enabled, score)` of every upstream for `file`: the enabled
    /// ones by score, then the disabled ones, ordered among themselves by
    /// their own weight.
    fn rank(&self, file: u64, weights: &[f64]) -> Vec<(usize, bool, f64)> {
        let mut ranked: Vec<(usize, bool, f64)> = self
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let enabled = weights[i] > 0.0;
                let w = if enabled {
                    weights[i]
                } else {
                    f64::from(u.weight)
                };
                (i, enabled, score(u.seed, file, w))
            })
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
        ranked
    }

    /// The upstreams for `rest` as a redirector sees them: the order of
    /// [`MirrorSet::order`] without claiming a disabled upstream's retry
    /// (a redirect sends the client, not us, so it proves nothing), with
    /// each one's state and share of new files. The first `Usable` one is
    /// the choice.
    pub fn redirect_order(&self, rest: &str) -> Vec<Ranked> {
        let now = self.now_ms();
        let file = hash(rest.as_bytes());
        let weights = self.effective_weights();
        let total: f64 = weights.iter().sum();
        let missing = lock(&self.missing);
        let mut out: Vec<Ranked> = self
            .rank(file, &weights)
            .into_iter()
            .map(|(index, enabled, _)| {
                let known_missing = missing.get(&(file, index)).is_some_and(|&t| t > now);
                Ranked {
                    index,
                    state: match (enabled, known_missing) {
                        (false, _) => RankedState::Down,
                        (true, true) => RankedState::Missing,
                        (true, false) => RankedState::Usable,
                    },
                    share: if total > 0.0 {
                        weights[index] / total
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        drop(missing);
        // Stable: usable first in score order, then known-missing, then down.
        out.sort_by_key(|r| r.state);
        out
    }

    /// What a redirect of the file `file` does: the first `Usable`
    /// upstream of [`MirrorSet::redirect_order`] (the enabled one with
    /// the highest score among those not known to lack the file), else
    /// whether some enabled one lacks it, found without ordering them
    /// all: no allocation for a set of up to [`INLINE_UPSTREAMS`], and no
    /// lookup in the 404 memory while it is empty.
    pub fn redirect_choice(&self, file: FileKey) -> Redirection {
        let now = self.now_ms();
        self.with_weights(|weights| {
            let missing = lock(&self.missing);
            let lacks = |index: usize| {
                !missing.is_empty() && missing.get(&(file.0, index)).is_some_and(|&t| t > now)
            };
            let mut best: Option<(usize, f64)> = None;
            let mut lacking = false;
            for (index, (u, &w)) in self.upstreams.iter().zip(weights).enumerate() {
                if w <= 0.0 {
                    continue;
                }
                if lacks(index) {
                    lacking = true;
                    continue;
                }
                let score = score(u.seed, file.0, w);
                // Strictly higher: on a tie the first in config order
                // wins, as in `rank`'s stable sort.
                if best.is_none_or(|(_, top)| score.total_cmp(&top).is_gt()) {
                    best = Some((index, score));
                }
            }
            match best {
                Some((index, _)) => Redirection::To(index),
                None if lacking => Redirection::Missing,
                None => Redirection::Down,
            }
        })
    }

    /// How long until the first disabled upstream may be tried again (at
    /// least a second), for a `Retry-After` when none is enabled.
    pub fn retry_in(&self) -> Duration {
        let now = self.now_ms();
        let at = self
            .upstreams
            .iter()
            .filter_map(|u| lock(&u.health).down.map(|d| d.retry_at_ms))
            .min()
            .unwrap_or(now);
        Duration::from_millis(at.saturating_sub(now)).max(Duration::from_secs(1))
    }

    /// Remembers that upstream `index` answered 404 for `rest`.
    pub fn remember_missing(&self, index: usize, rest: &str) {
        let now = self.now_ms();
        let mut missing = lock(&self.missing);
        if missing.len() >= MISSING_CAP {
            missing.retain(|_, &mut until| until > now);
            if missing.len() >= MISSING_CAP {
                // All still fresh: forgetting them costs one more 404 each.
                missing.clear();
            }
        }
        missing.insert(
            (hash(rest.as_bytes()), index),
            now + MISSING_FOR.as_millis() as u64,
        );
    }

    /// Whether a redirect of `rest` (the path below the prefix) to
    /// upstream `index` should be followed by a background check of the
    /// file there (see the module docs), claiming it if so: not when its
    /// 404 is remembered already, not twice within [`MISSING_FOR`], and at
    /// most [`CHECKS_PER_SECOND`] per second of the set's clock.
    pub fn claim_check(&self, index: usize, rest: &str) -> bool {
        self.claim_check_of(index, FileKey::of(rest))
    }

    /// [`MirrorSet::claim_check`] for the file whose key the request has
    /// already computed.
    pub fn claim_check_of(&self, index: usize, file: FileKey) -> bool {
        let now = self.now_ms();
        let key = (file.0, index);
        if lock(&self.missing).get(&key).is_some_and(|&t| t > now) {
            return false;
        }
        let mut checks = lock(&self.checks);
        if checks.until.get(&key).is_some_and(|&t| t > now) {
            return false;
        }
        let second = now / 1000;
        if checks.second != second {
            checks.second = second;
            checks.sent = 0;
        }
        if checks.sent >= CHECKS_PER_SECOND {
            return false;
        }
        checks.sent += 1;
        if checks.until.len() >= MISSING_CAP {
            checks.until.retain(|_, &mut until| until > now);
            if checks.until.len() >= MISSING_CAP {
                // All recent: forgetting them costs one more HEAD each.
                checks.until.clear();
            }
        }
        checks
            .until
            .insert(key, now + MISSING_FOR.as_millis() as u64);
        true
    }

    /// Records the outcome of a client's request to upstream `index`.
    pub fn report(&self, index: usize, outcome: Outcome<'_>) {
        let up = &self.upstreams[index];
        if matches!(outcome, Outcome::Answered(_) | Outcome::Failed(_)) {
            // (A body's outcome is the same request's.)
            up.fetches.fetch_add(1, Ordering::Relaxed);
        }
        let now = self.now_ms();
        let probing = self.health.probe.is_some();
        let mut h = lock(&up.health);
        let was_down = h.down.is_some();
        match outcome {
            Outcome::Answered(took) => {
                let sample = took.as_micros() as u64;
                h.latency_us = Some(match h.latency_us {
                    None => sample,
                    Some(avg) => avg - avg / 8 + sample / 8,
                });
                h.consecutive_failures = 0;
                // Without probes a client's request is the retry.
                if !probing && h.down.is_some() {
                    h.down = None;
                    tracing::info!(target: "cistern::fetch", mirror = %self.name,
                        upstream = %up.base_text, "upstream re-enabled: a retry succeeded");
                }
            }
            Outcome::Delivered => h.bad_bodies = 0,
            Outcome::Failed(reason) | Outcome::BadBody(reason) => {
                up.failures.fetch_add(1, Ordering::Relaxed);
                if matches!(outcome, Outcome::BadBody(_)) {
                    // The head before it reset the other count; this one
                    // only a whole body resets.
                    h.bad_bodies = h.bad_bodies.saturating_add(1);
                } else {
                    h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                }
                h.last_error = Some(reason.to_owned());
                match h.down {
                    None if h.strikes() >= self.health.fail_after => {
                        h.disable(now, &self.health);
                        tracing::warn!(target: "cistern::fetch", mirror = %self.name,
                            upstream = %up.base_text, failures = h.strikes(),
                            retry_in = ?self.health.retry, "upstream disabled: {reason}");
                    }
                    // A client's retry failed; with probes they decide.
                    Some(_) if !probing => h.back_off(now, &self.health),
                    _ => {}
                }
            }
        }
        self.note_change(was_down, h.down.is_some());
    }

    /// Upstreams whose probe is due at `now_ms`, or none when probes are off.
    pub fn due_probes(&self, now_ms: u64) -> Vec<usize> {
        if self.health.probe.is_none() {
            return Vec::new();
        }
        (0..self.upstreams.len())
            .filter(|&i| lock(&self.upstreams[i].health).next_probe_ms <= now_ms)
            .collect()
    }

    /// How long until the next probe is due.
    pub fn next_probe_in(&self, now_ms: u64) -> Duration {
        let next = self
            .upstreams
            .iter()
            .map(|u| lock(&u.health).next_probe_ms)
            .min()
            .unwrap_or(now_ms);
        Duration::from_millis(next.saturating_sub(now_ms))
    }

    /// Records a probe of upstream `index`: `Ok` for a 2xx, else why not.
    pub fn probed(
        &self,
        index: usize,
        at: SystemTime,
        took: Duration,
        result: Result<u16, String>,
    ) {
        let up = &self.upstreams[index];
        let now = self.now_ms();
        let config = &self.health;
        let mut h = lock(&up.health);
        let was_down = h.down.is_some();
        let (ok, detail) = match &result {
            Ok(status) => (true, format!("status {status}")),
            Err(why) => (false, why.clone()),
        };
        h.last_probe = Some(ProbeRecord {
            at,
            ok,
            detail: detail.clone(),
            took,
        });
        let interval = now + config.interval.as_millis() as u64;
        match (h.down, ok) {
            (None, true) => {
                h.consecutive_failures = 0;
                h.next_probe_ms = interval;
            }
            (None, false) => {
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                h.last_error = Some(format!("probe: {detail}"));
                h.next_probe_ms = interval;
                if h.strikes() >= config.fail_after {
                    h.disable(now, config);
                    tracing::warn!(target: "cistern::fetch", mirror = %self.name,
                        upstream = %up.base_text, retry_in = ?config.retry,
                        "upstream disabled: probe {detail}");
                }
            }
            (Some(mut d), true) => {
                d.probes_ok += 1;
                if d.probes_ok >= config.ok_after {
                    h.down = None;
                    h.consecutive_failures = 0;
                    // Probes decide: it starts with a clean slate.
                    h.bad_bodies = 0;
                    tracing::info!(target: "cistern::fetch", mirror = %self.name,
                        upstream = %up.base_text, probes = d.probes_ok,
                        "upstream re-enabled after successful probes");
                } else {
                    h.down = Some(d);
                }
                h.next_probe_ms = interval;
            }
            (Some(_), false) => {
                h.last_error = Some(format!("probe: {detail}"));
                h.back_off(now, config);
            }
        }
        self.note_change(was_down, h.down.is_some());
    }

    /// Health of every upstream, in config order.
    pub fn health(&self) -> Vec<UpstreamHealth> {
        let weights = self.effective_weights();
        let total: f64 = weights.iter().sum();
        self.upstreams
            .iter()
            .zip(&weights)
            .map(|(u, w)| {
                let h = lock(&u.health);
                let state = if h.down.is_some() { "down" } else { "up" };
                UpstreamHealth {
                    base: u.base_text.clone(),
                    down: h.down.is_some(),
                    state,
                    weight: u.weight,
                    share: if total > 0.0 { w / total } else { 0.0 },
                    latency: h.latency_us.map(Duration::from_micros),
                    fetches: u.fetches.load(Ordering::Relaxed),
                    failures: u.failures.load(Ordering::Relaxed),
                    consecutive_failures: h.strikes(),
                    last_error: h.last_error.clone(),
                    last_probe: h.last_probe.clone(),
                }
            })
            .collect()
    }
}

/// Locks a health mutex; a panic elsewhere leaves plain data behind, still
/// usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> MirrorSet {
        set_on(&Clock::default(), HealthConfig::default())
    }

    fn set_on(clock: &Clock, health: HealthConfig) -> MirrorSet {
        MirrorSet::new(&config(health), clock)
    }

    fn config(health: HealthConfig) -> MirrorConfig {
        MirrorConfig {
            name: "debian".into(),
            prefix: "/debian/".into(),
            upstreams: vec![
                "http://a.example/debian/".parse().unwrap(),
                "http://b.example/d/".parse().unwrap(),
            ],
            policies: vec![],
            stale: StaleRules::default(),
            forwarded_for: ForwardedFor::Replace,
            weights: vec![1, 1],
            health,
            query: crate::config::QueryMode::Ignore,
            redirect: None,
        }
    }

    /// A plain rest's key, made without a URL, is the key of the URL
    /// `url` builds, for bases of every shape and every rest of up to three
    /// pieces drawn from names, slashes, dots, escapes, queries and bytes
    /// a URL or a key would rewrite; and anything else is left to the URL.
    #[test]
    fn a_plain_key_is_the_key_of_the_url() {
        const PIECES: [&str; 16] = [
            "a", "Z", "/", ".", "..", "-", "~", "%41", "%2e", "?", "q=1", "\\", " ", "é", "@", ":",
        ];
        let mut plain = 0;
        for base in [
            "http://A.Example/debian/",
            "https://h.test:8443/x/y/",
            "http://[::1]:8080/",
            "http://h.test:80/m/",
        ] {
            let mut c = config(HealthConfig::default());
            c.upstreams = vec![base.parse().unwrap()];
            let s = MirrorSet::new(&c, &Clock::default());
            for len in 0..=3u32 {
                for n in 0..PIECES.len().pow(len) {
                    let mut k = n;
                    let mut rest = String::new();
                    for _ in 0..len {
                        rest.push_str(PIECES[k % PIECES.len()]);
                        k /= PIECES.len();
                    }
                    let Some(key) = s.plain_key(&rest) else {
                        continue;
                    };
                    plain += 1;
                    let url = s
                        .url(0, &rest)
                        .unwrap_or_else(|e| panic!("{base} {rest:?}: {e}"));
                    let by_url = CacheKey::from_uri(&url).unwrap();
                    assert_eq!(key, by_url, "{base} {rest:?}");
                }
            }
        }
        assert!(plain > 4 * 1000, "{plain}");
        // Bases a rest cannot simply follow take the URL's way.
        for base in [
            "http://h.test/m",
            "http://h.test/%7Em/",
            "http://h.test/a/../m/",
        ] {
            let mut c = config(HealthConfig::default());
            c.upstreams = vec![base.parse().unwrap()];
            let s = MirrorSet::new(&c, &Clock::default());
            assert_eq!(s.plain_key("x"), None, "{base}");
        }
        assert_eq!(set().plain_key("pool/../x"), None);
        assert_eq!(set().plain_key("a?b"), None);
    }

    fn first(s: &MirrorSet, rest: &str) -> usize {
        s.order(rest)[0].index
    }

    /// A file whose first choice is upstream `i`.
    fn file_of(s: &MirrorSet, i: usize) -> String {
        (0..1000)
            .map(|n| format!("pool/f{n}.deb"))
            .find(|f| first(s, f) == i)
            .expect("some file maps to each upstream")
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
        assert_eq!(s.index_of(&s.url(1, "x").unwrap()), Some(1));
    }

    #[test]
    fn url_text_is_the_parsed_urls_text() {
        let s = set();
        let long = "a".repeat(70_000);
        for rest in [
            "pool/x.deb",
            "/pool/x.deb",
            "dists/InRelease?x=1&y=%20z?w",
            "pool/x/../y.deb?q=a/../b",
            "a%2fb/./c",
            "sp ace",
            "quo\"te?q=\"",
            "br{ace}s",
            "caf\u{e9}.iso?\u{e9}",
            "x#frag",
            "x?y#frag",
            "ctl\u{7f}",
            "tick`<>^[]@:",
            "",
            long.as_str(),
            "../secret",
            "%2e%2e/secret",
        ] {
            for i in 0..2 {
                let mut text = String::from("kept ");
                let pushed = s.push_url(i, rest, &mut text);
                match s.url(i, rest) {
                    Ok(url) => {
                        assert!(pushed.is_ok(), "{rest}");
                        assert_eq!(text, format!("kept {url}"), "{rest}");
                    }
                    Err(e) => {
                        let got = pushed.expect_err(rest);
                        assert_eq!(got.to_string(), e.to_string(), "{rest}");
                        assert_eq!(text, "kept ", "{rest}");
                    }
                }
            }
        }
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
    fn files_spread_by_weight_and_each_sticks_to_its_upstream() {
        let mut s = set();
        s.upstreams[1].weight = 3;
        let n = 20_000;
        let to_b = (0..n)
            .filter(|i| first(&s, &format!("pool/{i}.deb")) == 1)
            .count();
        // 3/4 of the files, within 1 % (the standard deviation is 0.3 %).
        assert!((to_b as f64 / n as f64 - 0.75).abs() < 0.01, "{to_b}");
        assert_eq!(s.order("pool/7.deb"), s.order("pool/7.deb"));
    }

    #[test]
    fn slow_and_failing_upstreams_lose_share_in_whole_steps() {
        assert_eq!(latency_steps(Some(1_000), 200), 0, "below the floor");
        assert_eq!(latency_steps(Some(99_000), 50_000), 0);
        assert_eq!(latency_steps(Some(100_000), 50_000), 1);
        assert_eq!(latency_steps(Some(250_000), 60_000), 2);
        assert_eq!(latency_steps(Some(10_000_000), 50_000), MAX_STEPS);
        let s = set();
        s.report(0, Outcome::Answered(Duration::from_millis(400)));
        s.report(1, Outcome::Answered(Duration::from_millis(100)));
        let h = s.health();
        // a: 4× slower, two halvings: 0.25 against 1.
        assert!((h[0].share - 0.2).abs() < 1e-9, "{h:?}");
        s.report(1, Outcome::Failed("status 503"));
        let h = s.health();
        // b: one failure, one halving: 0.25 against 0.5.
        assert!((h[0].share - 1.0 / 3.0).abs() < 1e-9, "{h:?}");
    }

    #[test]
    fn without_probes_a_failing_upstream_is_disabled_then_retried_with_backoff() {
        let clock = Clock::manual(SystemTime::now());
        let s = set_on(&clock, HealthConfig::default());
        let f = file_of(&s, 0);
        let other = file_of(&s, 1);
        for _ in 0..3 {
            s.report(0, Outcome::Failed("connection refused"));
        }
        assert_eq!(first(&s, &f), 1);
        assert!(s.health()[0].down);
        assert_eq!(s.health()[0].state, "down");
        assert_eq!(
            s.health()[0].last_error.as_deref(),
            Some("connection refused")
        );
        clock.advance(Duration::from_secs(30) - Duration::from_millis(1));
        assert_eq!(first(&s, &f), 1);
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            first(&s, &other),
            0,
            "its retry is due: one request tries it first"
        );
        assert_eq!(first(&s, &other), 1, "only one");
        // The retry fails: twice as long to wait.
        s.report(0, Outcome::Failed("connection refused"));
        clock.advance(Duration::from_secs(59));
        assert_eq!(first(&s, &f), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(first(&s, &other), 0);
        s.report(0, Outcome::Answered(Duration::from_millis(5)));
        assert_eq!(s.health()[0].state, "up");
        assert_eq!(first(&s, &f), 0, "its files are back");
    }

    #[test]
    fn with_probes_only_successful_probes_re_enable() {
        let clock = Clock::manual(SystemTime::now());
        let health = HealthConfig {
            probe: Some("trace".into()),
            ..HealthConfig::default()
        };
        let s = set_on(&clock, health);
        let f = file_of(&s, 0);
        let now = SystemTime::now();
        let ms = Duration::from_millis(1);
        assert_eq!(s.due_probes(s.now_ms()), vec![0, 1], "probed at once");
        for _ in 0..3 {
            s.probed(0, now, ms, Err("status 503".into()));
        }
        s.probed(1, now, ms, Ok(200));
        assert!(s.health()[0].down);
        assert_eq!(s.next_probe_in(s.now_ms()), Duration::from_secs(10));
        // Past its retry time a client still does not get it.
        clock.advance(Duration::from_secs(31));
        assert_eq!(first(&s, &f), 1);
        s.report(0, Outcome::Answered(ms));
        assert!(s.health()[0].down, "a client's success is no probe");
        assert!(s.due_probes(s.now_ms()).contains(&0));
        s.probed(0, now, ms, Err("status 503".into()));
        // Backed off to 60 s.
        clock.advance(Duration::from_secs(59));
        assert!(!s.due_probes(s.now_ms()).contains(&0));
        clock.advance(Duration::from_secs(1));
        assert!(s.due_probes(s.now_ms()).contains(&0));
        s.probed(0, now, ms, Ok(200));
        assert!(s.health()[0].down, "one probe of ok-after 2");
        clock.advance(Duration::from_secs(10));
        assert!(s.due_probes(s.now_ms()).contains(&0));
        s.probed(0, now, ms, Ok(200));
        assert!(!s.health()[0].down);
        assert_eq!(first(&s, &f), 0);
        assert_eq!(
            s.health()[0].last_probe.as_ref().unwrap().detail,
            "status 200"
        );
    }

    #[test]
    fn a_redirector_skips_known_missing_and_down_upstreams_and_claims_no_retry() {
        let clock = Clock::manual(SystemTime::now());
        let s = set_on(&clock, HealthConfig::default());
        let f = file_of(&s, 0);
        let r = s.redirect_order(&f);
        assert_eq!((r[0].index, r[0].state), (0, RankedState::Usable));
        assert_eq!(r[0].index, s.order(&f)[0].index, "the proxy's choice");
        assert!((r[0].share + r[1].share - 1.0).abs() < 1e-9);
        s.remember_missing(0, &f);
        let r = s.redirect_order(&f);
        assert_eq!((r[0].index, r[1].state), (1, RankedState::Missing));
        for _ in 0..3 {
            s.report(1, Outcome::Failed("connection refused"));
        }
        let r = s.redirect_order(&f);
        assert_eq!(r[0].state, RankedState::Missing, "nothing usable");
        assert_eq!(
            (r[1].index, r[1].state, r[1].share),
            (1, RankedState::Down, 0.0)
        );
        assert_eq!(s.retry_in(), Duration::from_secs(30));
        // Past the retry time a redirect does not take the retry: the next
        // proxied request still does.
        clock.advance(Duration::from_secs(30));
        assert_eq!(s.redirect_order(&f)[1].state, RankedState::Down);
        let g = (0..1000)
            .map(|n| format!("pool/g{n}.deb"))
            .find(|g| s.redirect_order(g)[0].index == 0)
            .unwrap();
        assert_eq!(s.order(&g)[0].index, 1, "its retry is still due");
    }

    #[test]
    fn a_redirect_choice_is_the_first_usable_of_the_redirect_order() {
        let clock = Clock::manual(SystemTime::now());
        // Four mirrors, one weighted up.
        let s = MirrorSet::new(
            &MirrorConfig {
                upstreams: ["http://a.example/", "http://b.example/d/"]
                    .into_iter()
                    .chain(["http://c.example/", "http://d.example/x/"])
                    .map(|b| b.parse().unwrap())
                    .collect(),
                weights: vec![1, 1, 3, 1],
                ..config(HealthConfig::default())
            },
            &clock,
        );
        let files: Vec<String> = (0..300).map(|n| format!("pool/h{n}.deb")).collect();
        let expect = |s: &MirrorSet, f: &str| {
            let order = s.redirect_order(f);
            match order.iter().find(|r| r.state == RankedState::Usable) {
                Some(r) => Redirection::To(r.index),
                None if order.iter().any(|r| r.state == RankedState::Missing) => {
                    Redirection::Missing
                }
                None => Redirection::Down,
            }
        };
        let check = |s: &MirrorSet, what: &str| {
            let mut seen = std::collections::HashSet::new();
            for f in &files {
                let got = s.redirect_choice(FileKey::of(f));
                assert_eq!(got, expect(s, f), "{what}: {f}");
                seen.insert(got);
            }
            seen
        };
        assert_eq!(check(&s, "all up").len(), 4, "each mirror chosen");
        for f in files.iter().step_by(3) {
            if let Redirection::To(i) = expect(&s, f) {
                s.remember_missing(i, f);
            }
        }
        for f in files.iter().step_by(7) {
            for i in 0..4 {
                s.remember_missing(i, f);
            }
        }
        assert!(check(&s, "some missing").contains(&Redirection::Missing));
        s.report(1, Outcome::Answered(Duration::from_millis(400)));
        s.report(0, Outcome::Answered(Duration::from_millis(100)));
        for _ in 0..3 {
            s.report(2, Outcome::Failed("connection refused"));
        }
        check(&s, "one slow, one down");
        for i in [0, 1, 3] {
            for _ in 0..3 {
                s.report(i, Outcome::Failed("connection refused"));
            }
        }
        assert_eq!(check(&s, "all down").len(), 1);
        assert_eq!(s.redirect_choice(FileKey::of("x")), Redirection::Down);
        clock.advance(MISSING_FOR);
        s.report(3, Outcome::Answered(Duration::from_millis(5)));
        assert_eq!(check(&s, "forgotten, one back").len(), 1);
    }

    #[test]
    fn bad_bodies_count_though_their_heads_were_good_and_only_a_whole_body_clears_them() {
        let s = set();
        let ms = Duration::from_millis(5);
        for _ in 0..2 {
            s.report(0, Outcome::Answered(ms));
            s.report(0, Outcome::BadBody("SHA-256 mismatch"));
        }
        let h = &s.health()[0];
        assert!(!h.down);
        assert_eq!((h.consecutive_failures, h.failures, h.fetches), (2, 2, 2));
        // A whole body clears them; a good head alone did not.
        s.report(0, Outcome::Answered(ms));
        s.report(0, Outcome::Delivered);
        assert_eq!(s.health()[0].consecutive_failures, 0);
        for _ in 0..3 {
            s.report(0, Outcome::Answered(ms));
            s.report(0, Outcome::BadBody("SHA-256 mismatch"));
        }
        let h = &s.health()[0];
        assert!(h.down, "{h:?}");
        assert_eq!(h.last_error.as_deref(), Some("SHA-256 mismatch"));
        assert_eq!(h.fetches, 6, "a body's outcome is no request of its own");
    }

    #[test]
    fn a_redirected_file_is_checked_once_per_mirror_and_so_many_a_second() {
        let clock = Clock::manual(SystemTime::now());
        let s = set_on(&clock, HealthConfig::default());
        assert!(s.claim_check(0, "pool/a.deb"));
        assert!(!s.claim_check(0, "pool/a.deb"), "once");
        assert!(s.claim_check(1, "pool/a.deb"), "per mirror");
        s.remember_missing(0, "pool/b.deb");
        assert!(!s.claim_check(0, "pool/b.deb"), "its 404 is known");
        let claimed = (0..100)
            .filter(|n| s.claim_check(0, &format!("pool/f{n}.deb")))
            .count();
        assert_eq!(claimed as u32, CHECKS_PER_SECOND - 2);
        clock.advance(Duration::from_secs(1));
        assert!(s.claim_check(0, "pool/f99.deb"), "the next second");
        clock.advance(MISSING_FOR);
        assert!(
            s.claim_check(0, "pool/a.deb"),
            "checked again after a while"
        );
    }

    #[test]
    fn a_404_is_remembered_per_file_and_forgotten_after_a_while() {
        let clock = Clock::manual(SystemTime::now());
        let s = set_on(&clock, HealthConfig::default());
        let f = file_of(&s, 0);
        s.remember_missing(0, &f);
        let order = s.order(&f);
        assert_eq!(order[0].index, 1);
        assert_eq!(
            order[1],
            Choice {
                index: 0,
                known_missing: true
            }
        );
        assert!(!s.health()[0].down, "a 404 does not disable");
        let other = (0..1000)
            .map(|n| format!("pool/g{n}.deb"))
            .find(|g| first(&s, g) == 0)
            .unwrap();
        assert_eq!(first(&s, &other), 0, "only that file");
        clock.advance(MISSING_FOR);
        assert_eq!(first(&s, &f), 0, "forgotten");
    }
}
