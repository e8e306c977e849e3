//! Wall-clock time behind a seam.
//!
//! Freshness (RFC 9111) is computed from `SystemTime`. Production uses the
//! system clock; tests use [`Clock::manual`] and move time forward without
//! sleeping, so TTL and revalidation tests are exact and instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time; cheap to clone. `Clock::default()` is the
/// system clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some`: milliseconds since the epoch, set
    /// by a test.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// A clock that stands still at `start` until [`Clock::advance`] moves it.
    pub fn manual(start: SystemTime) -> Clock {
        let ms = start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock {
            manual: Some(Arc::new(AtomicU64::new(ms))),
        }
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        match &self.manual {
            None => SystemTime::now(),
            Some(ms) => UNIX_EPOCH + Duration::from_millis(ms.load(Ordering::Relaxed)),
        }
    }

    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(ms) = &self.manual {
            ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
        }
    }
}
