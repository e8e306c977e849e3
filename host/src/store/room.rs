//! Disk room for fills: a fill starts writing only when the filesystem of
//! the replica has room for its body plus `min-free`, counting what fills
//! already under way will still write. A response that does not fit is
//! served to its client without being stored, instead of being cut off
//! when the disk runs out halfway.
//!
//! A body of unknown length cannot be checked up front. When a write does
//! run out of space ([`is_no_space`]), the store remembers it for
//! [`FULL_PAUSE`] and stores no body of unknown length meanwhile. The pause
//! is timed on the store's [`Clock`], so tests move past it without
//! sleeping.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::config::units::format_size;

/// How long after running out of space bodies of unknown length are not
/// stored.
pub const FULL_PAUSE: Duration = Duration::from_secs(60);

/// The store's account of free space.
#[derive(Debug)]
pub struct Room {
    /// Bytes always left free on the replica's filesystem.
    min_free: u64,
    /// Bytes that fills under way announced and have not written yet.
    reserved: Arc<AtomicU64>,
    /// When a write last ran out of space.
    full_at: Mutex<Option<SystemTime>>,
    /// What times the pause after a full disk.
    clock: Clock,
}

/// Why a fill may not write: what the filesystem has and what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    /// Bytes available on the filesystem.
    pub available: u64,
    /// Bytes the body still needs (`None`: unknown length while the disk
    /// was recently full).
    pub needed: Option<u64>,
    /// Bytes other fills under way will still write.
    pub reserved: u64,
    /// The `min-free` setting.
    pub min_free: u64,
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.needed {
            Some(n) => write!(
                f,
                "{} free, the body needs {}, fills under way {} more, min-free {}",
                format_size(self.available),
                format_size(n),
                format_size(self.reserved),
                format_size(self.min_free)
            ),
            None => write!(
                f,
                "{} free and the disk ran full less than {}s ago; a body of unknown length is not stored",
                format_size(self.available),
                FULL_PAUSE.as_secs()
            ),
        }
    }
}

/// Room held for the part of one fill's body not written yet, until the
/// fill ends (commit, discard or failure).
#[derive(Debug)]
pub struct Reservation {
    /// Bytes still held.
    left: u64,
    reserved: Arc<AtomicU64>,
}

impl Reservation {
    /// Gives back the room of `n` bytes just written: they now show in the
    /// filesystem's free space, and must not be counted twice.
    pub fn wrote(&mut self, n: u64) {
        let n = n.min(self.left);
        self.left -= n;
        self.reserved.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.left, Ordering::Relaxed);
    }
}

impl Room {
    /// An account keeping `min_free` bytes free, timing the pause after a
    /// full disk on `clock`.
    pub fn new(min_free: u64, clock: Clock) -> Room {
        Room {
            min_free,
            reserved: Arc::default(),
            full_at: Mutex::new(None),
            clock,
        }
    }

    /// Reserves room for a body of `needed` bytes (`None`: unknown) on the
    /// filesystems holding `dirs` (the partial is written in the state
    /// directory, then moved or copied into the root). Blocking (`statvfs`).
    pub fn reserve(
        &self,
        dirs: &[&Path],
        needed: Option<u64>,
    ) -> io::Result<Result<Reservation, NoRoom>> {
        let mut least = u64::MAX;
        for dir in dirs {
            least = least.min(available(dir)?);
        }
        Ok(self.decide(least, needed))
    }

    fn decide(&self, available: u64, needed: Option<u64>) -> Result<Reservation, NoRoom> {
        let reserved = self.reserved.load(Ordering::Relaxed);
        let refuse = |needed| NoRoom {
            available,
            needed,
            reserved,
            min_free: self.min_free,
        };
        let recently_full = self
            .full_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            // A clock set back past the moment is taken as the pause being
            // over: a pause must not last as long as the clock's jump.
            .is_some_and(|at| {
                self.clock
                    .now()
                    .duration_since(at)
                    .is_ok_and(|since| since < FULL_PAUSE)
            });
        if needed.is_none() && recently_full {
            return Err(refuse(None));
        }
        let bytes = needed.unwrap_or(0);
        // Two fills deciding at once must not both take the last room.
        let taken = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |reserved| {
                let wanted = bytes.saturating_add(reserved).saturating_add(self.min_free);
                (available >= wanted).then_some(reserved + bytes)
            });
        if let Err(reserved) = taken {
            return Err(NoRoom {
                reserved,
                ..refuse(Some(bytes))
            });
        }
        Ok(Reservation {
            left: bytes,
            reserved: self.reserved.clone(),
        })
    }

    /// Records that a write ran out of space.
    pub fn ran_full(&self) {
        *self.full_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.clock.now());
    }
}

/// Whether `e` means the disk (or the user's quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded
}

/// Bytes an unprivileged writer can still use on the filesystem of `dir`.
fn available(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_fits_only_beside_the_fills_under_way_and_min_free() {
        let room = Room::new(100, Clock::default());
        let first = room.decide(1_000, Some(500)).expect("fits");
        // 500 reserved + 100 min-free leave 400.
        let refused = room.decide(1_000, Some(401)).unwrap_err();
        assert_eq!(refused.reserved, 500);
        assert!(room.decide(1_000, Some(400)).is_ok());
        drop(first);
        assert!(room.decide(1_000, Some(900)).is_ok());
    }

    #[test]
    fn written_bytes_stop_counting_as_reserved() {
        let room = Room::new(0, Clock::default());
        let mut first = room.decide(1_000, Some(800)).expect("fits");
        assert!(room.decide(1_000, Some(300)).is_err());
        // 600 bytes written: the filesystem now shows 400 free, of which
        // the first fill still holds 200.
        first.wrote(600);
        let second = room.decide(400, Some(200)).expect("fits beside the rest");
        // Writing past the announced length gives back no more than held.
        first.wrote(10_000);
        drop(first);
        assert_eq!(
            room.reserved.load(Ordering::Relaxed),
            200,
            "the second fill's"
        );
        drop(second);
        assert_eq!(room.reserved.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unknown_lengths_pause_after_the_disk_ran_full() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let room = Room::new(0, clock.clone());
        assert!(room.decide(10, None).is_ok());
        room.ran_full();
        let refused = room.decide(1 << 30, None).unwrap_err();
        assert_eq!(refused.needed, None);
        assert!(refused.to_string().contains("unknown length"), "{refused}");
        // A known length is still checked against what is free.
        assert!(room.decide(1 << 30, Some(1 << 20)).is_ok());

        // The pause lasts FULL_PAUSE on the store's clock, not longer.
        clock.advance(FULL_PAUSE - Duration::from_millis(1));
        assert!(room.decide(1 << 30, None).is_err(), "still paused");
        clock.advance(Duration::from_millis(1));
        assert!(room.decide(1 << 30, None).is_ok(), "pause over");

        // Running full again starts a new pause from then.
        room.ran_full();
        assert!(room.decide(1 << 30, None).is_err());
        clock.advance(FULL_PAUSE);
        assert!(room.decide(1 << 30, None).is_ok());
    }

    #[test]
    fn the_refusal_reads_in_units() {
        let room = Room::new(64 << 20, Clock::default());
        let refused = room.decide(3 << 20, Some(5 << 20)).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "3.0 MiB free, the body needs 5.0 MiB, fills under way 0 B more, min-free 64.0 MiB"
        );
    }

    #[test]
    fn enospc_and_quota_count_as_full() {
        assert!(is_no_space(&io::Error::from_raw_os_error(28)));
        assert!(is_no_space(&io::Error::from_raw_os_error(122)));
        assert!(!is_no_space(&io::Error::from_raw_os_error(13)));
    }
}
