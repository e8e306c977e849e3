//! Fleet-wide named limiters: a fixed window per limiter, key and period,
//! counted in Redis (`INCRBY` + `PEXPIRE` on
//! `cistern:limit:<limiter>:<window>:<key>`), windows aligned to the Unix
//! epoch so every node agrees on them.
//!
//! A policy's `limiter_check` runs inside a hook, on the request's worker,
//! and must not wait for I/O, so the verdict is made here, at once, from this node's view of
//! the window: the fleet's count as Redis last answered, plus what this
//! node allowed since. Every allowed request wakes the flusher, which
//! adds this node's new counts in one pipeline and reads back the totals.
//! The view lags the fleet by one round trip: the fleet may allow a few
//! more than the rate, as many as the other nodes allowed while this
//! node's view was behind (with one client at a time over three nodes, at
//! most two). It never allows fewer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};

use super::{Inner, OP_TIMEOUT, PREFIX, link};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WindowKey {
    limiter: Box<str>,
    key: Box<str>,
    /// The window's number: Unix time in ms / the period in ms.
    window: u64,
    period_ms: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    /// The fleet's count as Redis last answered (this node's sent counts
    /// included).
    seen: u64,
    /// Allowed here, not sent yet.
    pending: u64,
    /// Sent, no answer yet.
    inflight: u64,
}

/// This node's view of the fleet-wide windows.
#[derive(Debug, Default)]
pub(crate) struct Windows {
    counts: Mutex<HashMap<WindowKey, Count>>,
    /// Woken by an allowed request: there is something to send.
    pub(crate) wake: Notify,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Windows {
    /// Counts one request of `key` against `count` per `period` if the
    /// window has room; else the time until the window ends.
    pub(crate) fn check(
        &self,
        limiter: &str,
        key: &str,
        count: u32,
        period: Duration,
        now: SystemTime,
    ) -> Result<(), Duration> {
        let period_ms = (period.as_millis() as u64).max(1);
        let now_ms = millis(now);
        let window = now_ms / period_ms;
        let wk = WindowKey {
            limiter: limiter.into(),
            key: key.into(),
            window,
            period_ms,
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(wk).or_default();
        if c.seen + c.pending + c.inflight >= u64::from(count) {
            let ends = (window + 1) * period_ms;
            return Err(Duration::from_millis(ends.saturating_sub(now_ms)));
        }
        c.pending += 1;
        Ok(())
    }

    /// Moves the pending counts to in flight: `(window, redis key, n)`.
    fn take_pending(&self) -> Vec<(WindowKey, String, u64)> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter_mut()
            .filter(|(_, c)| c.pending > 0)
            .map(|(k, c)| {
                let n = std::mem::take(&mut c.pending);
                c.inflight += n;
                let redis_key = format!(
                    "{PREFIX}limit:{}:{}:{}:{}",
                    k.limiter, k.period_ms, k.window, k.key
                );
                (k.clone(), redis_key, n)
            })
            .collect()
    }

    /// Records Redis's answers (`None`: the counts were lost) and forgets
    /// windows that ended before `now`'s previous one.
    fn settle(
        &self,
        sent: Vec<(WindowKey, String, u64)>,
        totals: Option<Vec<u64>>,
        now: SystemTime,
    ) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (k, _, n)) in sent.into_iter().enumerate() {
            if let Some(c) = counts.get_mut(&k) {
                c.inflight = c.inflight.saturating_sub(n);
                if let Some(total) = totals.as_ref().and_then(|t| t.get(i)) {
                    c.seen = c.seen.max(*total);
                }
            }
        }
        let now_ms = millis(now);
        counts.retain(|k, _| k.window + 1 >= now_ms / k.period_ms);
    }
}

/// Sends this node's new counts as they come, one pipeline at a time.
pub(crate) async fn flush(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = inner.windows.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        let Some(conn) = inner.conn() else {
            continue;
        };
        let sent = inner.windows.take_pending();
        if sent.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (k, redis_key, n) in &sent {
            pipe.incr(redis_key, *n);
            // Kept for a period past the window's end (clock skew).
            pipe.pexpire(redis_key, (2 * k.period_ms) as i64).ignore();
        }
        let mut c = conn.conn.clone();
        let answer = link::run_pipe::<Vec<u64>>(&mut c, &pipe, OP_TIMEOUT).await;
        let now = inner.clock.now();
        match answer {
            Ok(totals) => inner.windows.settle(sent, Some(totals), now),
            Err(why) => {
                inner.windows.settle(sent, None, now);
                inner.failed(conn.generation, &why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_allows_its_count_and_says_when_it_ends() {
        let w = Windows::default();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(3600 * 1000);
        let period = Duration::from_secs(60);
        for _ in 0..3 {
            assert!(w.check("l", "k", 3, period, start).is_ok());
        }
        let later = start + Duration::from_secs(20);
        assert_eq!(
            w.check("l", "k", 3, period, later),
            Err(Duration::from_secs(40))
        );
        // Another key, and the next window, have room.
        assert!(w.check("l", "other", 3, period, later).is_ok());
        assert!(w.check("l", "k", 3, period, start + period).is_ok());
    }

    #[test]
    fn the_fleet_count_redis_answers_is_what_later_checks_see() {
        let w = Windows::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let period = Duration::from_secs(3600);
        assert!(w.check("l", "k", 5, period, now).is_ok());
        let sent = w.take_pending();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].2, 1);
        assert!(sent[0].1.starts_with("cistern:limit:l:3600000:"));
        // Other nodes had counted 3 already: 4 in all, one more fits.
        w.settle(sent, Some(vec![4]), now);
        assert!(w.check("l", "k", 5, period, now).is_ok());
        assert!(w.check("l", "k", 5, period, now).is_err());
        // Lost counts (Redis failed) free their room again.
        let sent = w.take_pending();
        w.settle(sent, None, now);
        assert!(w.check("l", "k", 5, period, now).is_ok());
    }
}
