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
}
