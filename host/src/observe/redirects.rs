//! Redirect counters of the mirrors in `mode="redirect"`: per mirror set,
//! per upstream and per file, for each of the last [`DAYS_KEPT`] days
//! (UTC), plus totals per upstream since start for `/metrics`.
//!
//! Memory is bounded: a day tracks at most [`FILES_PER_DAY`] files per
//! mirror set. When a new file would pass that cap, the less-requested
//! half of the tracked files is dropped; their counts move to the day's
//! `other_files`, so per-upstream and per-day totals stay exact while the
//! per-file table keeps the most requested files. A file dropped (or first
//! seen after the table filled) counts again from its next redirect.
//!
//! One short lock per redirect, never held across an `.await`; a file
//! already tracked costs no allocation. The maps hash with foldhash, not
//! std's SipHash: a redirect looks up its mirror twice and its file once,
//! and SipHash of those short names was most of the counters' cost. Its
//! seed is random per map, so clients choosing file names cannot aim
//! collisions at a day's table (which is bounded anyway).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// A map of these counters (see the module docs for the hasher).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How many days of counts are kept, today included.
pub const DAYS_KEPT: usize = 7;
/// How many files one mirror set tracks per day at most.
pub const FILES_PER_DAY: usize = 1000;

/// The redirect counters; process-wide, they outlive config reloads.
#[derive(Debug, Default)]
pub struct RedirectCounts {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// Oldest first; at most [`DAYS_KEPT`].
    days: VecDeque<Day>,
    /// Mirror set → upstream base → redirects since start.
    totals: Map<String, Vec<(String, u64)>>,
}

#[derive(Debug)]
struct Day {
    /// Days since 1970-01-01 (UTC).
    day: u64,
    sets: Map<String, SetDay>,
}

#[derive(Debug, Default)]
struct SetDay {
    /// Upstream bases in the order first seen that day, with their counts;
    /// files' counts are indexed by this order.
    upstreams: Vec<(String, u64)>,
    files: Map<String, FileDay>,
    /// Redirects of files no longer (or not yet) in `files`.
    other_files: u64,
}

#[derive(Debug, Default)]
struct FileDay {
    total: u64,
    /// Indexed like [`SetDay::upstreams`].
    per_upstream: Vec<u64>,
}

/// One day of counts (`/api/redirects`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DayReport {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    /// Each mirror set with redirects that day, by name.
    pub mirrors: Vec<MirrorReport>,
}

/// One mirror set's redirects of one day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MirrorReport {
    /// The mirror block's name.
    pub mirror: String,
    /// All redirects of that day.
    pub redirects: u64,
    /// Per upstream, most redirects first.
    pub upstreams: Vec<UpstreamCount>,
    /// The tracked files, most redirects first.
    pub files: Vec<FileReport>,
    /// Redirects of files the bounded table does not hold.
    pub other_files: u64,
}

/// Redirects to one upstream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UpstreamCount {
    /// The upstream's base URL.
    pub upstream: String,
    /// Redirects to it.
    pub redirects: u64,
}

/// One file's redirects of one day.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileReport {
    /// The path below the mirror's prefix.
    pub file: String,
    /// Its redirects.
    pub redirects: u64,
    /// Per upstream, most first (upstreams it never went to left out).
    pub upstreams: Vec<UpstreamCount>,
}

/// `(mirror, upstream, redirects since start)`, for `/metrics`.
pub type Total = (String, String, u64);

impl RedirectCounts {
    /// Counts one redirect of `file` (below the prefix of mirror set
    /// `mirror`) to the upstream `upstream` at `now`.
    pub fn record(&self, now: SystemTime, mirror: &str, upstream: &str, file: &str) {
        let today = day_of(now);
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        // One hash of each name for a mirror and file already counted:
        // the key is copied (and hashed again) only when it is new.
        match book.totals.get_mut(mirror) {
            Some(list) => {
                bump(list, upstream);
            }
            None => {
                book.totals
                    .insert(mirror.to_owned(), vec![(upstream.to_owned(), 1)]);
            }
        }
        if book.days.back().is_none_or(|d| d.day != today) {
            // A clock set back keeps counting into the latest day.
            if book.days.back().is_none_or(|d| d.day < today) {
                book.days.push_back(Day {
                    day: today,
                    sets: Map::default(),
                });
                while book.days.len() > DAYS_KEPT {
                    book.days.pop_front();
                }
            }
        }
        let day = book.days.back_mut().expect("a day was pushed");
        match day.sets.get_mut(mirror) {
            Some(set) => set.count(upstream, file),
            None => {
                let mut set = SetDay::default();
                set.count(upstream, file);
                day.sets.insert(mirror.to_owned(), set);
            }
        }
    }

    /// The kept days, newest first.
    pub fn report(&self) -> Vec<DayReport> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        book.days
            .iter()
            .rev()
            .map(|d| {
                let mut mirrors: Vec<MirrorReport> =
                    d.sets.iter().map(|(name, s)| set_report(name, s)).collect();
                mirrors.sort_by(|a, b| a.mirror.cmp(&b.mirror));
                DayReport {
                    date: date_of(d.day),
                    mirrors,
                }
            })
            .collect()
    }

    /// Redirects per mirror set and upstream since start, sorted.
    pub fn totals(&self) -> Vec<Total> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Total> = book
            .totals
            .iter()
            .flat_map(|(m, ups)| ups.iter().map(|(u, n)| (m.clone(), u.clone(), *n)))
            .collect();
        out.sort();
        out
    }
}

impl SetDay {
    /// Counts one redirect of `file` to `upstream`.
    fn count(&mut self, upstream: &str, file: &str) {
        let slot = bump(&mut self.upstreams, upstream);
        if let Some(f) = self.files.get_mut(file) {
            f.add(slot);
            return;
        }
        if self.files.len() >= FILES_PER_DAY {
            self.other_files += halve(&mut self.files);
        }
        let mut f = FileDay::default();
        f.add(slot);
        self.files.insert(file.to_owned(), f);
    }
}

impl FileDay {
    /// Counts one redirect to the upstream at `slot`.
    fn add(&mut self, slot: usize) {
        self.total += 1;
        if self.per_upstream.len() <= slot {
            self.per_upstream.resize(slot + 1, 0);
        }
        self.per_upstream[slot] += 1;
    }
}

/// Adds one to `upstream`'s count in `list`, returning its position.
fn bump(list: &mut Vec<(String, u64)>, upstream: &str) -> usize {
    match list.iter().position(|(u, _)| u == upstream) {
        Some(i) => {
            list[i].1 += 1;
            i
        }
        None => {
            list.push((upstream.to_owned(), 1));
            list.len() - 1
        }
    }
}

/// Drops the less-requested half of `files`, returning their redirects.
fn halve(files: &mut Map<String, FileDay>) -> u64 {
    let mut counts: Vec<u64> = files.values().map(|f| f.total).collect();
    let mid = counts.len() / 2;
    let (_, &mut cut, _) = counts.select_nth_unstable(mid);
    let above = files.values().filter(|f| f.total > cut).count();
    // Keep the files above the median, then ties at it until half are left.
    let mut ties = (files.len() - mid).saturating_sub(above);
    let mut dropped = 0;
    files.retain(|_, f| {
        if f.total > cut {
            return true;
        }
        if f.total == cut && ties > 0 {
            ties -= 1;
            return true;
        }
        dropped += f.total;
        false
    });
    dropped
}

fn set_report(name: &str, s: &SetDay) -> MirrorReport {
    let counts = |per: &mut dyn Iterator<Item = (usize, u64)>| {
        let mut v: Vec<UpstreamCount> = per
            .filter(|(_, n)| *n > 0)
            .map(|(i, n)| UpstreamCount {
                upstream: s.upstreams[i].0.clone(),
                redirects: n,
            })
            .collect();
        v.sort_by(|a, b| {
            b.redirects
                .cmp(&a.redirects)
                .then(a.upstream.cmp(&b.upstream))
        });
        v
    };
    let mut files: Vec<FileReport> = s
        .files
        .iter()
        .map(|(file, f)| FileReport {
            file: file.clone(),
            redirects: f.total,
            upstreams: counts(&mut f.per_upstream.iter().copied().enumerate()),
        })
        .collect();
    files.sort_by(|a, b| b.redirects.cmp(&a.redirects).then(a.file.cmp(&b.file)));
    MirrorReport {
        mirror: name.to_owned(),
        redirects: s.upstreams.iter().map(|(_, n)| n).sum(),
        upstreams: counts(&mut s.upstreams.iter().map(|(_, n)| *n).enumerate()),
        files,
        other_files: s.other_files,
    }
}

/// Days since 1970-01-01 UTC (a clock before 1970 counts as that day).
fn day_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

/// `YYYY-MM-DD` of a day number (Howard Hinnant's civil-from-days).
pub fn date_of(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(19_723), "2024-01-01");
        assert_eq!(date_of(19_782), "2024-02-29");
        assert_eq!(date_of(20_790), "2026-12-03");
    }

    #[test]
    fn counts_per_day_mirror_upstream_and_file() {
        let c = RedirectCounts::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(20_790 * 86_400 + 5);
        c.record(t, "vlc", "http://a/", "x.iso");
        c.record(t, "vlc", "http://b/", "x.iso");
        c.record(t, "vlc", "http://a/", "x.iso");
        c.record(t, "vlc", "http://a/", "y.iso");
        c.record(t + Duration::from_secs(86_400), "vlc", "http://b/", "y.iso");
        let r = c.report();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].date, "2026-12-04");
        let day1 = &r[1].mirrors[0];
        assert_eq!(r[1].date, "2026-12-03");
        assert_eq!(day1.redirects, 4);
        assert_eq!(day1.upstreams[0].upstream, "http://a/");
        assert_eq!(day1.upstreams[0].redirects, 3);
        assert_eq!(day1.files[0].file, "x.iso");
        assert_eq!(day1.files[0].redirects, 3);
        assert_eq!(day1.files[0].upstreams[1].redirects, 1);
        assert_eq!(
            c.totals(),
            vec![
                ("vlc".into(), "http://a/".into(), 3),
                ("vlc".into(), "http://b/".into(), 2)
            ]
        );
    }

    #[test]
    fn the_file_table_is_bounded_and_keeps_the_busy_files() {
        let c = RedirectCounts::default();
        let t = SystemTime::UNIX_EPOCH;
        for _ in 0..5 {
            c.record(t, "m", "http://a/", "hot");
        }
        for i in 0..3 * FILES_PER_DAY {
            c.record(t, "m", "http://a/", &format!("cold{i}"));
        }
        let m = &c.report()[0].mirrors[0];
        assert!(m.files.len() <= FILES_PER_DAY);
        assert_eq!(m.files[0].file, "hot");
        assert_eq!(m.files[0].redirects, 5);
        let tracked: u64 = m.files.iter().map(|f| f.redirects).sum();
        assert_eq!(tracked + m.other_files, m.redirects, "nothing lost");
        assert_eq!(m.redirects, 5 + 3 * FILES_PER_DAY as u64);
        // Days beyond DAYS_KEPT are forgotten.
        for d in 1..=DAYS_KEPT as u64 {
            c.record(t + Duration::from_secs(d * 86_400), "m", "http://a/", "f");
        }
        assert_eq!(c.report().len(), DAYS_KEPT);
    }
}
