//! `distro`: cache rules for package repositories.
//!
//! Package files are named by version or by content hash, so a given URL
//! never changes: they are marked immutable and never revalidated. Index
//! files (`InRelease`, `Packages.xz`, `repomd.xml`, …) change in place at
//! every repository update, so they always revalidate (TTL 0) — a stale
//! index pointing at deleted packages is the classic apt-cacher failure.
//!
//! Parameters (repeatable):
//! - `immutable-suffix`: extra file-name suffixes to treat as immutable.
//! - `revalidate-name`: extra file-name prefixes to always revalidate.

use cistern_guest::{self as cistern, Result, cache, request, response};

/// File-name suffixes of versioned package files.
const IMMUTABLE_SUFFIXES: &[&str] = &[
    ".deb",
    ".udeb",
    ".ddeb",
    ".dsc",
    ".rpm",
    ".drpm",
    ".apk",
    ".pkg.tar.zst",
    ".pkg.tar.xz",
    ".pkg.tar.gz",
    ".pkg.tar.zst.sig",
    ".pkg.tar.xz.sig",
    ".whl",
    ".crate",
    ".gem",
    ".nupkg",
];

/// File-name prefixes of index files that change in place.
const REVALIDATE_PREFIXES: &[&str] = &[
    "InRelease",
    "Release",
    "Packages",
    "Sources",
    "Contents-",
    "Translation-",
    "Components-",
    "icons-",
    "Index",
    "repomd.xml",
    "APKINDEX",
    "mirrorlist",
    "metalink",
];

/// File-name suffixes of index files that change in place.
const REVALIDATE_SUFFIXES: &[&str] = &[".db", ".db.sig", ".files", ".files.sig"];

#[derive(Debug, PartialEq, Eq)]
enum Class {
    Immutable,
    Revalidate,
    Other,
}

fn classify(path: &str, extra_immutable: &[String], extra_revalidate: &[String]) -> Class {
    let name = path.rsplit('/').next().unwrap_or(path);
    // Content-addressed: Debian's by-hash/SHA256/<hex>, and RPM repodata
    // files other than repomd.xml (named <checksum>-primary.xml.gz).
    if path.contains("/by-hash/") {
        return Class::Immutable;
    }
    if path.contains("/repodata/") && name != "repomd.xml" && !name.starts_with("repomd.xml") {
        return Class::Immutable;
    }
    if REVALIDATE_PREFIXES.iter().any(|p| name.starts_with(p))
        || REVALIDATE_SUFFIXES.iter().any(|s| name.ends_with(s))
        || extra_revalidate
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    {
        return Class::Revalidate;
    }
    if IMMUTABLE_SUFFIXES.iter().any(|s| name.ends_with(s))
        || extra_immutable.iter().any(|s| name.ends_with(s.as_str()))
    {
        return Class::Immutable;
    }
    Class::Other
}

fn on_response() -> Result<()> {
    let path = request::path()?;
    let status = response::status()?;
    match classify(
        &path,
        &cistern::params("immutable-suffix")?,
        &cistern::params("revalidate-name")?,
    ) {
        // Only a full, successful body is a version worth keeping forever.
        Class::Immutable if status == 200 => cache::immutable(),
        Class::Revalidate => cache::set_ttl(0),
        _ => Ok(()),
    }
}

cistern::policy!(on_response => on_response);
