//! Mapping a cache key to a safe path under the replica root.
//!
//! The replica is meant to be browsed, so the mapping follows HTTP
//! Replicator and `wget -r`: `http://deb.debian.org/debian/dists/` becomes
//! `deb.debian.org:80/debian/dists/index.html`. `docs/replica.md` is the
//! user-facing version of these rules.
//!
//! # Rules
//! 1. **First directory**: `host:port`, the port always written (80 for
//!    http, 443 for https), IPv6 hosts in brackets: `[::1]:8080`. The flat
//!    layout ([`Layout::Flat`]) keeps only the last component (file name and
//!    query) and puts it directly in the root.
//! 2. **Decoding**: every path segment (and the query) is percent-decoded,
//!    so `%C3%A9t%C3%A9` is stored as `été` and `libstdc%2B%2B6.deb` as
//!    `libstdc++6.deb`. A decoded byte that cannot or should not appear in a
//!    file name is written back as `%XX` (upper-case hex):
//!    `/` (`%2F`, which never splits a directory), NUL, the other control
//!    bytes (`0x01`–`0x1F`, `0x7F`), `\`, `%` itself (so the escape stays
//!    unambiguous: `%252F` → `%252F`, `%2F` → `%2F`), `?` in a path segment
//!    (it is reserved for the query, rule 4), and every byte of an invalid
//!    UTF-8 sequence.
//! 3. **Dot segments**: `.` and `..` (however encoded, `%2e%2e` included)
//!    are resolved, and `..` never climbs above the host directory. Keys are
//!    already normalised this way; the mapping resolves them again so that
//!    the guarantee does not depend on the key.
//! 4. **Query**: kept in the file name after a literal `?`:
//!    `/search?q=a%20b` → `search?q=a b`. Since a path segment's own `?` is
//!    stored as `%3F`, the first `?` of a name always starts the query.
//! 5. **Directories**: a path ending in `/` (or `/.`, `/..`) is stored as
//!    `index.html` in that directory; `/a/?x=1` is `a/index.html?x=1`.
//!    Empty segments in the middle (`/a//b`) are dropped: `a/b`.
//! 6. **Long names**: a name longer than 255 bytes is cut to at most 238
//!    bytes (at a character boundary, never inside an escape) followed by
//!    `~` and 16 hex digits of the SHA-256 of the whole name, so that two
//!    long names still differ. The whole relative path is limited to
//!    [`MAX_PATH_LEN`] bytes.
//! 7. **Result**: every component is non-empty, never `.` or `..`, holds
//!    no `/` or NUL, and is at most 255 bytes; a key that cannot satisfy
//!    this is refused with a [`PathError`]. The path is always valid UTF-8.
//!
//! # Collisions
//! The mapping is deliberately readable rather than one-to-one:
//! `/a/` and `/a/index.html`, `/a%26b` and `/a&b`, `/a//b` and `/a/b`, and in
//! the flat layout any two keys with the same file name share a path. The
//! store resolves that at commit time: the newer replica takes the path and
//! the older key is dropped from the index (a miss next time), so a path
//! never serves another key's bytes.
//!
//! A file and a directory can also want the same name (`/a` and `/a/b`).
//! At commit time, in the store:
//! - a file whose path is an existing directory is stored as
//!   `index.html` inside it (`/a` → `a/index.html`, repeated if that is a
//!   directory too);
//! - a directory needed where a file is moves that file into the new
//!   directory as `index.html` (committing `/a/b` when `/a` is the file `a`
//!   moves it to `a/index.html`), and its metadata follows.
//!
//! The metadata records where each replica really is
//! ([`super::ObjectMeta::replica`]), so lookups never recompute the path.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

// Paths are derived from keys, never the other way round: this module
// depends on `key` (including the error type both share), `key` on nothing here.
use super::key::{self, CacheKey, hex_val, push_escaped};
pub use super::key::{MAX_PATH_LEN, PathError};
use crate::config::Layout;

/// Longest file name component most filesystems accept.
pub const MAX_NAME_LEN: usize = 255;

/// Name used for a directory's own content (rule 5).
pub const INDEX_NAME: &str = "index.html";

/// Bytes kept of an over-long name before its hash suffix.
const TRUNCATED_LEN: usize = MAX_NAME_LEN - 17;

/// A path relative to the replica root that is known to stay inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaPath(PathBuf);

impl ReplicaPath {
    /// The replica path of `key` in `layout`, following the module's rules.
    pub fn for_key(key: &CacheKey, layout: Layout) -> Result<ReplicaPath, PathError> {
        let parts = key::split(key.as_str())?;
        let mut components: Vec<String> = Vec::new();
        if layout == Layout::HostPort {
            let mut host = String::new();
            encode_into(
                &mut host,
                format!("{}:{}", parts.host, parts.port).as_bytes(),
                false,
            );
            components.push(host);
        }

        let segments: Vec<&str> = parts
            .path
            .strip_prefix('/')
            .unwrap_or(parts.path)
            .split('/')
            .collect();
        let mut dirs: Vec<Vec<u8>> = Vec::new();
        let mut is_dir = false;
        let last = segments.len().saturating_sub(1);
        for (i, seg) in segments.iter().enumerate() {
            let decoded = pct_decode(seg);
            is_dir = i == last;
            match decoded.as_slice() {
                b"" | b"." => {}
                b".." => {
                    dirs.pop();
                }
                _ => {
                    dirs.push(decoded);
                    is_dir = false;
                }
            }
        }
        let file = if is_dir {
            INDEX_NAME.as_bytes().to_vec()
        } else {
            dirs.pop().unwrap_or_else(|| INDEX_NAME.as_bytes().to_vec())
        };

        if layout == Layout::HostPort {
            for dir in &dirs {
                let mut name = String::new();
                encode_into(&mut name, dir, false);
                components.push(name);
            }
        }
        let mut name = String::new();
        encode_into(&mut name, &file, false);
        if let Some(query) = parts.query {
            name.push('?');
            encode_into(&mut name, &pct_decode(query), true);
        }
        components.push(name);

        let mut path = PathBuf::new();
        let mut total = 0;
        for component in &mut components {
            shorten(component);
            total += component.len() + 1;
            path.push(component.as_str());
        }
        if total > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        ReplicaPath::from_relative(path)
    }

    /// Checks a relative path read back from metadata: it must consist of
    /// plain components only (no root, no `.`/`..`, no NUL).
    pub fn from_relative(path: impl Into<PathBuf>) -> Result<ReplicaPath, PathError> {
        let path = path.into();
        let unsafe_path = || PathError::Unsafe(path.to_string_lossy().into_owned());
        let text = path.to_str().ok_or_else(unsafe_path)?;
        if text.is_empty() || text.contains('\0') || text.len() > MAX_PATH_LEN + 64 {
            return Err(unsafe_path());
        }
        for component in text.split('/') {
            if component.is_empty()
                || component == "."
                || component == ".."
                || component.len() > MAX_NAME_LEN
            {
                return Err(unsafe_path());
            }
        }
        if !path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(unsafe_path());
        }
        Ok(ReplicaPath(path))
    }

    /// The path, relative to the replica root.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The path as text (always valid UTF-8, `/`-separated).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    /// This path with `name` appended as a new last component.
    pub(crate) fn join(&self, name: &str) -> ReplicaPath {
        ReplicaPath(self.0.join(name))
    }

    /// The path of each ancestor directory, shortest first (excluding the
    /// path itself).
    pub(crate) fn ancestors(&self) -> Vec<ReplicaPath> {
        let mut out: Vec<ReplicaPath> = self
            .0
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| ReplicaPath(p.to_path_buf()))
            .collect();
        out.reverse();
        out
    }
}

impl std::fmt::Display for ReplicaPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Percent-decodes every valid `%XX`; anything else is kept as is.
fn pct_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|&b| hex_val(b)),
                bytes.get(i + 2).and_then(|&b| hex_val(b)),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Appends the file-name form of decoded bytes (rule 2); a `?` stays
/// literal only inside the query.
fn encode_into(out: &mut String, bytes: &[u8], in_query: bool) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let escape = match u8::try_from(c) {
                Ok(b) => {
                    b.is_ascii_control()
                        || matches!(b, b'/' | b'\\' | b'%')
                        || (b == b'?' && !in_query)
                }
                Err(_) => false,
            };
            if escape {
                push_escaped(out, c as u8);
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            push_escaped(out, b);
        }
    }
}

/// Rule 6: cuts a name longer than [`MAX_NAME_LEN`] and appends a hash of
/// the whole name.
fn shorten(name: &mut String) {
    if name.len() <= MAX_NAME_LEN {
        return;
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut cut = TRUNCATED_LEN;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    // Never leave half an escape (`%` or `%X`) before the suffix.
    if let Some(pos) = name[..cut].rfind('%')
        && cut - pos < 3
    {
        cut = pos;
    }
    name.truncate(cut);
    name.push('~');
    name.push_str(&hex::encode(&digest[..8]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(url: &str, layout: Layout) -> String {
        let key = CacheKey::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        ReplicaPath::for_key(&key, layout)
            .unwrap_or_else(|e| panic!("{url}: {e}"))
            .as_str()
            .to_owned()
    }

    #[test]
    fn mapping_table() {
        let cases = [
            (
                "http://deb.debian.org/debian/dists/",
                "deb.debian.org:80/debian/dists/index.html",
            ),
            ("http://deb.debian.org", "deb.debian.org:80/index.html"),
            ("https://Example.org/a/b.txt", "example.org:443/a/b.txt"),
            ("http://example.org:8080/x", "example.org:8080/x"),
            ("http://[::1]:8080/x", "[::1]:8080/x"),
            (
                "http://example.org/pool/libstdc%2b%2b6.deb",
                "example.org:80/pool/libstdc++6.deb",
            ),
            ("http://example.org/%C3%A9t%C3%A9", "example.org:80/été"),
            ("http://example.org/a%20b", "example.org:80/a b"),
            ("http://example.org/a%2Fb", "example.org:80/a%2Fb"),
            ("http://example.org/a%252Fb", "example.org:80/a%252Fb"),
            ("http://example.org/a%00b", "example.org:80/a%00b"),
            ("http://example.org/a%0Ab", "example.org:80/a%0Ab"),
            ("http://example.org/a%5Cb", "example.org:80/a%5Cb"),
            ("http://example.org/a%3Fb", "example.org:80/a%3Fb"),
            ("http://example.org/bad%FFutf8", "example.org:80/bad%FFutf8"),
            (
                "http://example.org/search?q=a%20b&x=%2F",
                "example.org:80/search?q=a b&x=%2F",
            ),
            ("http://example.org/search?q=?", "example.org:80/search?q=?"),
            (
                "http://example.org/dir/?x=1",
                "example.org:80/dir/index.html?x=1",
            ),
            ("http://example.org/a//b", "example.org:80/a/b"),
            ("http://example.org/a/b/..", "example.org:80/a/index.html"),
            (
                "http://example.org/.well-known/x",
                "example.org:80/.well-known/x",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(map(url, Layout::HostPort), want, "{url}");
        }
    }

    #[test]
    fn flat_keeps_the_file_name() {
        assert_eq!(map("http://example.org/a/b/c.deb", Layout::Flat), "c.deb");
        assert_eq!(map("http://example.org/a/", Layout::Flat), "index.html");
        assert_eq!(map("http://example.org/", Layout::Flat), "index.html");
        assert_eq!(map("http://example.org/a?x=1", Layout::Flat), "a?x=1");
        assert_eq!(
            map("http://example.org/a/%2e%2e%2fetc", Layout::Flat),
            "..%2Fetc"
        );
    }

    /// Every component of a mapped path must be a plain, bounded name.
    fn assert_contained(url: &str, path: &ReplicaPath, layout: Layout) {
        let text = path.as_str();
        assert!(!text.starts_with('/'), "{url} → {text}");
        assert!(
            !text.contains('\0') && !text.contains('\\'),
            "{url} → {text}"
        );
        let components: Vec<&str> = text.split('/').collect();
        if layout == Layout::Flat {
            assert_eq!(components.len(), 1, "{url} → {text}");
        }
        for c in components {
            assert!(!c.is_empty() && c != "." && c != "..", "{url} → {text}");
            assert!(c.len() <= MAX_NAME_LEN, "{url} → {text}");
        }
        assert!(
            path.as_path()
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "{url} → {text}"
        );
    }

    #[test]
    fn traversal_table() {
        let long = "x".repeat(1000);
        let long_utf8 = "é".repeat(300);
        let long_escapes = "%2F".repeat(200);
        let cases: Vec<(String, Option<&str>)> = vec![
            (
                "http://example.org/../../etc/passwd".into(),
                Some("example.org:80/etc/passwd"),
            ),
            (
                "http://example.org/%2e%2e/%2e%2e/etc/passwd".into(),
                Some("example.org:80/etc/passwd"),
            ),
            (
                "http://example.org/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".into(),
                Some("example.org:80/..%2F..%2Fetc%2Fpasswd"),
            ),
            (
                "http://example.org/..%2f..%2fetc".into(),
                Some("example.org:80/..%2F..%2Fetc"),
            ),
            (
                "http://example.org/a/%2e%2e%5c%2e%2e%5cetc".into(),
                Some("example.org:80/a/..%5C..%5Cetc"),
            ),
            ("http://example.org/%00".into(), Some("example.org:80/%00")),
            ("http://example.org/%2F".into(), Some("example.org:80/%2F")),
            (
                "http://example.org//etc/passwd".into(),
                Some("example.org:80/etc/passwd"),
            ),
            (
                "http://example.org/.".into(),
                Some("example.org:80/index.html"),
            ),
            (
                "http://example.org/..".into(),
                Some("example.org:80/index.html"),
            ),
            ("http://example.org/.%2e/x".into(), Some("example.org:80/x")),
            ("http://example.org/...".into(), Some("example.org:80/...")),
            (
                "http://example.org/?../../x".into(),
                Some("example.org:80/index.html?..%2F..%2Fx"),
            ),
            (
                "http://example.org/a?%2F..%2F..".into(),
                Some("example.org:80/a?%2F..%2F.."),
            ),
            ("http://..:80/x".into(), Some("..:80/x")),
            ("http://.../x".into(), Some("...:80/x")),
            (format!("http://example.org/{long}"), None),
            (
                format!("http://example.org/{long_utf8}/{long}?{long}"),
                None,
            ),
            (format!("http://example.org/{long_escapes}"), None),
        ];
        for layout in [Layout::HostPort, Layout::Flat] {
            for (url, want) in &cases {
                let key = CacheKey::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
                let path =
                    ReplicaPath::for_key(&key, layout).unwrap_or_else(|e| panic!("{url}: {e}"));
                assert_contained(url, &path, layout);
                if let (Layout::HostPort, Some(want)) = (layout, want) {
                    assert_eq!(path.as_str(), *want, "{url}");
                }
            }
        }
    }

    #[test]
    fn hosts_that_are_not_names_are_refused() {
        for url in [
            "http://exa\\mple.org/",
            "http://exa%2Fmple/",
            "http://[::1/x",
            "http:///x",
            "http://a b/x",
        ] {
            if let Ok(key) = CacheKey::parse(url) {
                // Whatever the URI parser let through must still map inside.
                let path = ReplicaPath::for_key(&key, Layout::HostPort).expect("maps");
                assert_contained(url, &path, Layout::HostPort);
                assert!(
                    !path
                        .as_str()
                        .split('/')
                        .next()
                        .unwrap_or_default()
                        .contains('/')
                );
            }
        }
    }

    #[test]
    fn long_names_stay_unique() {
        let a = map(
            &format!("http://example.org/{}a", "x".repeat(400)),
            Layout::HostPort,
        );
        let b = map(
            &format!("http://example.org/{}b", "x".repeat(400)),
            Layout::HostPort,
        );
        assert_ne!(a, b);
        let name = a.rsplit('/').next().expect("has a name");
        assert!(name.len() <= MAX_NAME_LEN);
        assert!(name.starts_with("xxxx") && name.contains('~'));

        // A cut never splits an escape.
        let c = map(
            &format!("http://example.org/{}", "%2F".repeat(200)),
            Layout::HostPort,
        );
        let name = c.rsplit('/').next().expect("has a name");
        let (prefix, _) = name.rsplit_once('~').expect("suffix");
        assert!(
            prefix.len() % 3 == 0
                && prefix
                    .chars()
                    .collect::<Vec<_>>()
                    .chunks(3)
                    .all(|c| c == ['%', '2', 'F'])
        );
    }

    #[test]
    fn too_deep_paths_are_refused() {
        let deep = "abcdefghij/".repeat(400);
        let key = CacheKey::parse(&format!("http://example.org/{deep}x")).expect("parses");
        assert!(matches!(
            ReplicaPath::for_key(&key, Layout::HostPort),
            Err(PathError::TooLong)
        ));
        // The flat layout keeps only the name, so it fits.
        assert!(ReplicaPath::for_key(&key, Layout::Flat).is_ok());
    }

    #[test]
    fn paths_from_metadata_are_checked() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/\0",
        ] {
            assert!(ReplicaPath::from_relative(bad).is_err(), "{bad:?}");
        }
        assert!(ReplicaPath::from_relative("example.org:80/a/b").is_ok());
    }
}
