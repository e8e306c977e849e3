//! Wall-clock time behind a seam.
//!
//! Freshness (RFC 9111) is computed from `SystemTime`; how long a mirror
//! stays marked down and how long a fill runs without readers are measured
//! on [`Clock::monotonic`]. Production uses the system clocks; tests use
//! [`Clock::manual`] and move time forward without sleeping, so TTL,
//! revalidation and health tests are exact and instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time; cheap to clone. `Clock::default()` is the
/// system clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: time set by a test.
    manual: Option<Arc<Manual>>,
}

/// The time of a manual clock.
#[derive(Debug)]
struct Manual {
    /// Milliseconds since the epoch now.
    now_ms: AtomicU64,
    /// Milliseconds since the epoch when the clock was made.
    start_ms: u64,
    /// The monotonic instant the clock was made, which `advance` moves
    /// [`Clock::monotonic`] away from.
    start: Instant,
    /// Bumped by every `advance`, so [`Clock::sleep`] wakes to look again.
    advanced: tokio::sync::watch::Sender<u64>,
}

impl Clock {
    /// A clock that stands still at `start` until [`Clock::advance`] moves it.
    pub fn manual(start: SystemTime) -> Clock {
        let ms = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            manual: Some(Arc::new(Manual {
                now_ms: AtomicU64::new(ms),
                start_ms: ms,
                start: Instant::now(),
                advanced: tokio::sync::watch::Sender::new(0),
            })),
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(m) => UNIX_EPOCH + Duration::from_millis(m.now_ms.load(Ordering::Relaxed)),
        }
    }

    /// A monotonic reading, for measuring how long something lasts: the
    /// system's `Instant` (wall-clock jumps do not move it), or for a manual
    /// clock its start moved forward by every [`Clock::advance`].
    pub fn monotonic(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => {
                let advanced = m.now_ms.load(Ordering::Relaxed).saturating_sub(m.start_ms);
                m.start + Duration::from_millis(advanced)
            }
        }
    }

    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.now_ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
            m.advanced.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Waits until [`Clock::monotonic`] has moved on by `by` from now (the
    /// call, not the first poll): a tokio sleep on the system clock; on a
    /// manual clock, until tests have advanced it that far (timed work
    /// such as health probes then runs when a test moves time, never on
    /// its own).
    pub fn sleep(&self, by: Duration) -> impl Future<Output = ()> + Send + 'static {
        let deadline = self.monotonic() + by;
        let clock = self.clone();
        async move {
            match &clock.manual {
                None => tokio::time::sleep_until(deadline.into()).await,
                Some(m) => {
                    // Subscribed before the first look, so an advance
                    // between the look and the wait is not missed.
                    let mut advanced = m.advanced.subscribe();
                    while clock.monotonic() < deadline {
                        if advanced.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_both_readings_only_when_advanced() {
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1000));
        let (wall, mono) = (clock.now(), clock.monotonic());
        assert_eq!(clock.monotonic(), mono);
        clock.advance(Duration::from_secs(31));
        assert_eq!(clock.now(), wall + Duration::from_secs(31));
        assert_eq!(clock.monotonic() - mono, Duration::from_secs(31));
    }

    #[tokio::test]
    async fn a_sleep_on_a_manual_clock_ends_when_time_is_advanced_past_it() {
        let clock = Clock::manual(UNIX_EPOCH + Duration::from_secs(1000));
        let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke before its time");
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the sleep ends once the clock passes it")
            .unwrap();
    }
}
