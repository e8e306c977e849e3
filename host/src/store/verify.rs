//! `cistern verify`: reads every replica (and every body kept aside, see
//! `aside`) and checks it against the SHA-256 its metadata recorded, without changing anything on disk (so it may run
//! beside a running Cistern).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::meta::decode_object;
use super::{ReplicaPath, StoreError, io_err};
use crate::config::StoreConfig;

/// What is wrong with one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The metadata file cannot be read (Cistern quarantines it on start).
    Unreadable(String),
    /// The replica file named by the metadata is not there.
    Missing,
    /// The file holds another number of bytes than recorded.
    Length {
        /// Recorded.
        expected: u64,
        /// On disk.
        actual: u64,
    },
    /// The file's content is not what was stored.
    Digest {
        /// Recorded SHA-256, hex.
        expected: String,
        /// SHA-256 of the file now, hex.
        actual: String,
    },
    /// The file could not be read.
    Io(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Unreadable(why) => write!(f, "metadata unreadable: {why}"),
            Problem::Missing => f.write_str("file missing"),
            Problem::Length { expected, actual } => {
                write!(f, "{actual} bytes, stored with {expected}")
            }
            Problem::Digest { expected, actual } => {
                write!(
                    f,
                    "content changed: sha-256 {actual}, stored with {expected}"
                )
            }
            Problem::Io(e) => write!(f, "cannot read: {e}"),
        }
    }
}

/// One replica that failed the check.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The replica file (or, for unreadable metadata, the metadata file).
    pub path: PathBuf,
    /// Its key, when the metadata could be read.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: Problem,
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct Report {
    /// Replicas whose content was read and matched.
    pub good: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Replicas that did not match, and unreadable metadata.
    pub findings: Vec<Finding>,
}

/// Checks every replica of the store configured by `config` against its
/// recorded length and SHA-256. Blocking; reads every byte.
///
/// A replica replaced by a running Cistern while it is read would look
/// wrong, so a mismatch counts only if its metadata is still the same
/// when the check is repeated.
pub fn verify(config: &StoreConfig) -> Result<Report, StoreError> {
    let objects = config.state.join("objects");
    let mut report = Report::default();
    let mut files = Vec::new();
    let subs = match fs::read_dir(&objects) {
        Ok(s) => s,
        // Nothing stored yet.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(io_err("read metadata directory", &objects)(e)),
    };
    for sub in subs {
        let sub = sub
            .map_err(io_err("read metadata directory", &objects))?
            .path();
        if !sub.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&sub).map_err(io_err("read metadata directory", &sub))? {
            let path = entry
                .map_err(io_err("read metadata directory", &sub))?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    for meta_path in files {
        let mut outcome = check(&config.root, &meta_path);
        if matches!(&outcome, Checked::Bad(..)) {
            // Settle races with a commit under way: only a repeatable
            // mismatch is reported.
            outcome = check(&config.root, &meta_path);
        }
        match outcome {
            Checked::Gone => {}
            Checked::Good(bytes) => {
                report.good += 1;
                report.bytes += bytes;
            }
            Checked::Bad(path, key, problem) => {
                report.findings.push(Finding { path, key, problem })
            }
        }
    }
    Ok(report)
}

enum Checked {
    /// The metadata went away meanwhile (eviction, replacement).
    Gone,
    Good(u64),
    Bad(PathBuf, Option<String>, Problem),
}

fn check(root: &Path, meta_path: &Path) -> Checked {
    let bytes = match fs::read(meta_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Checked::Gone,
        Err(e) => {
            return Checked::Bad(
                meta_path.to_owned(),
                None,
                Problem::Unreadable(e.to_string()),
            );
        }
    };
    let meta = match decode_object(&bytes) {
        Ok((m, _)) => m,
        Err(e) => {
            return Checked::Bad(
                meta_path.to_owned(),
                None,
                Problem::Unreadable(e.to_string()),
            );
        }
    };
    let key = Some(meta.key.clone());
    let path = if meta.in_tree() {
        let Ok(rel) = ReplicaPath::from_relative(meta.replica.as_str()) else {
            let why = format!("unsafe replica path {:?}", meta.replica);
            return Checked::Bad(meta_path.to_owned(), key, Problem::Unreadable(why));
        };
        root.join(rel.as_path())
    } else {
        // A response kept aside: its body is beside its metadata.
        meta_path.with_extension("body")
    };
    let bad = |problem| Checked::Bad(path.clone(), key.clone(), problem);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return bad(Problem::Missing),
        Err(e) => return bad(Problem::Io(e.to_string())),
    };
    let stat = match file.metadata() {
        Ok(s) => s,
        Err(e) => return bad(Problem::Io(e.to_string())),
    };
    if stat.len() != meta.length {
        return bad(Problem::Length {
            expected: meta.length,
            actual: stat.len(),
        });
    }
    let mut hasher = Sha256::new();
    if let Err(e) = io::copy(&mut file, &mut hasher) {
        return bad(Problem::Io(e.to_string()));
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&meta.sha256) {
        return bad(Problem::Digest {
            expected: meta.sha256,
            actual,
        });
    }
    Checked::Good(meta.length)
}
