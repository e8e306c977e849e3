//! Normalising URLs into cache keys (RFC 3986 section 6.2.2).
//!
//! A key is `scheme://host:port/path?query` where
//! - the scheme is `http`, `https` or `ftp` (the forward proxy's FTP
//!   gateway), lower case;
//! - the host is lower case (IPv6 literals keep their brackets); user
//!   information is dropped, it is never part of what a server sees as the
//!   resource;
//! - the port is always written (80 for http, 443 for https, 21 for ftp by
//!   default);
//! - in the path and query, `%xx` escapes use upper-case hex, escapes of
//!   unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, a `%` that
//!   starts no escape becomes `%25`, and any byte that is neither unreserved
//!   nor a reserved delimiter is escaped;
//! - dot segments are removed (RFC 3986 `remove_dot_segments`, which never
//!   climbs above `/`); an empty path becomes `/`;
//! - an empty query (`?` alone) is dropped, a fragment never reaches a key.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};

/// Identifies one cached object: a normalized absolute URL
/// (`scheme://host:port/path?query`), possibly chosen by a policy so that
/// many mirror URLs share one replica (store-id).
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct CacheKey(pub(super) Arc<str>);

impl CacheKey {
    /// Builds the key for an absolute URL: lower-case scheme and host, the
    /// port always explicit, dot segments removed, the query kept.
    pub fn from_uri(uri: &http::Uri) -> Result<CacheKey, PathError> {
        normalize(uri).map(|k| CacheKey(k.into()))
    }

    /// Parses a key given as text (a policy's store-id); it must be an
    /// absolute http(s) URL.
    pub fn parse(text: &str) -> Result<CacheKey, PathError> {
        let uri = text
            .parse::<http::Uri>()
            .map_err(|e| PathError::Invalid(e.to_string()))?;
        CacheKey::from_uri(&uri)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lower-case hex SHA-256 of the key: the name of its metadata and
    /// partial files.
    pub fn hash_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

/// The key of a base URL (a mirror's upstream, ending in `/`) that plain
/// rests extend without building and parsing a URL: see [`KeyBase::join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBase(String);

impl KeyBase {
    /// The base's key, or `None` for a base whose path a rest could not
    /// simply follow: one with a query, without a final `/`, or whose path
    /// the key would rewrite (an escape, a dot segment).
    pub fn of(base: &http::Uri) -> Option<KeyBase> {
        let path = base.path();
        if base.query().is_some() || !path.ends_with('/') || !is_plain_path(path) {
            return None;
        }
        normalize(base).ok().map(KeyBase)
    }

    /// The key of the base joined with `rest` (leading `/`s dropped, as a
    /// mirror joins it), when `rest` is a plain path: only bytes a key
    /// keeps as they are (no `%`, no `?`, nothing to escape) and no dot
    /// segment. Such a rest parses, joined to the base, to the same text,
    /// and the key adds it unchanged. `None`: build the URL and take
    /// [`CacheKey::from_uri`].
    pub fn join(&self, rest: &str) -> Option<CacheKey> {
        let rest = rest.trim_start_matches('/');
        // A long rest is left to the URL parser's length limit.
        if rest.len() > MAX_PLAIN_REST || !is_plain_path(rest) {
            return None;
        }
        let mut key = String::with_capacity(self.0.len() + rest.len());
        key.push_str(&self.0);
        key.push_str(rest);
        Some(CacheKey(key.into()))
    }
}

/// The longest rest [`KeyBase::join`] takes; far below what `http`
/// refuses as too long.
const MAX_PLAIN_REST: usize = 8 * 1024;

/// Whether `path` holds only bytes a key keeps literal and no `.` or `..`
/// segment: its key is itself.
fn is_plain_path(path: &str) -> bool {
    path.bytes().all(is_path_literal) && !path.split('/').any(|s| s == "." || s == "..")
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest relative replica path, leaving room for the root under Linux's
/// It bounds what a key may map to, so it is defined with the key's error
/// type ([`PathError::TooLong`]); [`super::path`] re-exports it.
pub const MAX_PATH_LEN: usize = 3072;

/// Why a key has no safe replica path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The URL is not absolute http(s).
    #[error("not an absolute http(s) URL")]
    NotAbsolute,
    /// The URL's scheme is neither `http` nor `https`.
    #[error("unsupported scheme {0:?}, only http, https and ftp are cached")]
    Scheme(String),
    /// The host is empty or holds characters no host name has.
    #[error("invalid host {0:?}")]
    Host(String),
    /// The text is not a URI at all.
    #[error("invalid URL: {0}")]
    Invalid(String),
    /// The mapped path would be longer than [`MAX_PATH_LEN`] bytes.
    #[error("replica path longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// A path read back from metadata is absolute or leaves the root.
    #[error("unsafe replica path {0:?}")]
    Unsafe(String),
}

/// The parts of a normalised key, borrowed from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyParts<'a> {
    /// Host as in the key (lower case, IPv6 in brackets).
    pub host: &'a str,
    /// Port, always present in a key.
    pub port: u16,
    /// Path, starting with `/`.
    pub path: &'a str,
    /// Query without its `?`.
    pub query: Option<&'a str>,
}

/// The normalised key text for an absolute URI.
pub(crate) fn normalize(uri: &http::Uri) -> Result<String, PathError> {
    let scheme = uri.scheme_str().ok_or(PathError::NotAbsolute)?;
    let (scheme, default_port) = if scheme.eq_ignore_ascii_case("http") {
        ("http", 80)
    } else if scheme.eq_ignore_ascii_case("https") {
        ("https", 443)
    } else if scheme.eq_ignore_ascii_case("ftp") {
        // ftp:// through the forward proxy's FTP gateway (fetch/ftp.rs).
        ("ftp", 21)
    } else {
        return Err(PathError::Scheme(scheme.to_ascii_lowercase()));
    };
    let authority = uri.authority().ok_or(PathError::NotAbsolute)?;
    let (host, port) = crate::request::host_port(authority);
    let port = port.unwrap_or(default_port);
    let path = uri.path();
    let query = uri.query().filter(|q| !q.is_empty());

    // Every request builds its key: the parts are written straight into
    // one buffer, sized for the common case of nothing to escape.
    let mut key = String::with_capacity(
        scheme.len() + 3 + host.len() + 6 + path.len() + query.map_or(0, |q| 1 + q.len()),
    );
    key.push_str(scheme);
    key.push_str("://");
    let host_at = key.len();
    key.push_str(host);
    key[host_at..].make_ascii_lowercase();
    check_host(&key[host_at..])?;
    key.push(':');
    key.push_str(itoa::Buffer::new().format(port));

    let path_at = key.len();
    push_normalized_pct(&mut key, path, is_path_literal);
    if key.len() == path_at {
        key.push('/');
    } else if !key[path_at..].starts_with('/') {
        // Only `*` (OPTIONS) or an authority-form target lack the leading
        // slash; neither names a cacheable resource.
        return Err(PathError::NotAbsolute);
    } else if key.as_bytes()[path_at..].windows(2).any(|w| w == b"/.")
        && key[path_at..].split('/').any(|s| s == "." || s == "..")
    {
        // (A dot segment follows a `/`: the path starts with one.)
        let resolved = remove_dot_segments(&key[path_at..]);
        key.truncate(path_at);
        key.push_str(&resolved);
    }

    if let Some(query) = query {
        key.push('?');
        push_normalized_pct(&mut key, query, is_query_literal);
    }
    Ok(key)
}

/// Splits a normalised key into its parts.
pub(crate) fn split(key: &str) -> Result<KeyParts<'_>, PathError> {
    let rest = key
        .strip_prefix("http://")
        .or_else(|| key.strip_prefix("https://"))
        .or_else(|| key.strip_prefix("ftp://"))
        .ok_or(PathError::NotAbsolute)?;
    let slash = rest.find('/').ok_or(PathError::NotAbsolute)?;
    let (authority, path_query) = rest.split_at(slash);
    let colon = authority.rfind(':').ok_or(PathError::NotAbsolute)?;
    let host = &authority[..colon];
    let port = authority[colon + 1..]
        .parse::<u16>()
        .map_err(|_| PathError::NotAbsolute)?;
    check_host(host)?;
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    Ok(KeyParts {
        host,
        port,
        path,
        query,
    })
}

/// Accepts a lower-case registered name or IPv4 address, or a bracketed
/// IPv6 literal. Anything else (empty, `/`, `\`, `@`, spaces) is refused so
/// that a key's host can be used as a directory name after escaping.
fn check_host(host: &str) -> Result<(), PathError> {
    let bad = || PathError::Host(host.to_owned());
    if host.is_empty() {
        return Err(bad());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(bad)?;
        let ok = !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'%' | b'v'));
        return if ok { Ok(()) } else { Err(bad()) };
    }
    let ok = host.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || crate::request::reg_name_symbol(b)
    });
    // No `%` in a name: RFC 3986 allows escapes in a reg-name, but the
    // URI parser refuses them there (it lets `%` through only in user
    // information), and every key must read back as a URL. A request
    // could still reach this with a host such as `tp%((t0` in
    // `http://[8@tp%((t0:]`, which the parser splits oddly.
    if ok && !host.contains('%') {
        Ok(())
    } else {
        Err(bad())
    }
}

/// RFC 3986 unreserved characters: escaping them changes nothing.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Bytes a normalised path keeps literal (`pchar` and `/`).
fn is_path_literal(b: u8) -> bool {
    is_unreserved(b) || is_sub_delim(b) || matches!(b, b':' | b'@' | b'/')
}

/// Bytes a normalised query keeps literal (`pchar`, `/` and `?`).
fn is_query_literal(b: u8) -> bool {
    is_path_literal(b) || b == b'?'
}

/// Value of an ASCII hex digit.
pub(crate) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `%XX` (upper-case hex) for `b`.
pub(crate) fn push_escaped(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xF)] as char);
}

/// Appends `input` to `out` with its percent-encoding normalised: escapes
/// in upper case, unreserved bytes decoded, stray `%` and bytes outside
/// `literal` escaped.
fn push_normalized_pct(out: &mut String, input: &str, literal: fn(u8) -> bool) {
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let decoded = bytes
                .get(i + 1)
                .and_then(|&h| hex_val(h))
                .zip(bytes.get(i + 2).and_then(|&l| hex_val(l)))
                .map(|(h, l)| h << 4 | l);
            match decoded {
                Some(d) if is_unreserved(d) => out.push(d as char),
                Some(d) => push_escaped(out, d),
                None => {
                    push_escaped(out, b'%');
                    i += 1;
                    continue;
                }
            }
            i += 3;
        } else {
            if literal(b) {
                out.push(b as char);
            } else {
                push_escaped(out, b);
            }
            i += 1;
        }
    }
}

/// RFC 3986 section 5.2.4 for a path starting with `/`: `.` and `..`
/// segments go, `..` never climbs above the root, and a path ending in a
/// dot segment keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            _ => {
                out.push(seg);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() {
        result.push('/');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, PathError> {
        normalize(&s.parse::<http::Uri>().expect("test URI parses"))
    }

    /// Found by the `replica_path` fuzz target: the URI parser took
    /// `tp%((t0` as the host of `http://[8@tp%((t0:]`, and the key built
    /// from it did not parse back as a URL.
    #[test]
    fn every_key_reads_back_as_a_key() {
        for url in ["http://[8@tp%((t0:]", "http://[8@a%41b:]/x"] {
            if let Ok(key) = url.parse::<http::Uri>().map(|u| CacheKey::from_uri(&u)) {
                match key {
                    Ok(key) => assert_eq!(
                        CacheKey::parse(key.as_str()).expect("reads back").as_str(),
                        key.as_str()
                    ),
                    Err(e) => assert!(matches!(e, PathError::Host(_)), "{url}: {e}"),
                }
            }
        }
        // The URI parser itself refuses escapes in a host name.
        assert!("http://a%41b/x".parse::<http::Uri>().is_err());
    }

    #[test]
    fn keys_are_normalised() {
        let cases = [
            ("http://example.org", "http://example.org:80/"),
            ("HTTP://Example.ORG/", "http://example.org:80/"),
            ("https://example.org/a", "https://example.org:443/a"),
            ("http://example.org:8080/a", "http://example.org:8080/a"),
            ("http://example.org:80/a", "http://example.org:80/a"),
            ("http://user:pw@example.org/a", "http://example.org:80/a"),
            ("http://example.org/a/./b/../c", "http://example.org:80/a/c"),
            (
                "http://example.org/../../etc/passwd",
                "http://example.org:80/etc/passwd",
            ),
            ("http://example.org/a/b/..", "http://example.org:80/a/"),
            ("http://example.org/a/.", "http://example.org:80/a/"),
            ("http://example.org/%2e%2E/x", "http://example.org:80/x"),
            (
                "http://example.org/a/%2e%2e%2fb",
                "http://example.org:80/a/..%2Fb",
            ),
            (
                "http://example.org/%7euser/%41",
                "http://example.org:80/~user/A",
            ),
            (
                "http://example.org/a%2fb%3a",
                "http://example.org:80/a%2Fb%3A",
            ),
            ("http://example.org/100%", "http://example.org:80/100%25"),
            ("http://example.org/%zz", "http://example.org:80/%25zz"),
            ("http://example.org/a//b", "http://example.org:80/a//b"),
            (
                "http://example.org/a?b=1&c=%2f",
                "http://example.org:80/a?b=1&c=%2F",
            ),
            ("http://example.org/a?", "http://example.org:80/a"),
            ("http://example.org/a#frag", "http://example.org:80/a"),
            ("http://[::1]:8080/a", "http://[::1]:8080/a"),
            ("http://[FE80::1]/", "http://[fe80::1]:80/"),
            (
                "http://example.org/a\"b{c}",
                "http://example.org:80/a%22b%7Bc%7D",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref().ok(), Some(want), "{input}");
        }
    }

    #[test]
    fn non_http_is_refused() {
        assert!(matches!(
            norm("gopher://example.org/a"),
            Err(PathError::Scheme(_))
        ));
        // ftp:// is keyed like http, with its default port written.
        assert_eq!(
            norm("FTP://Example.org/pub/a").ok().as_deref(),
            Some("ftp://example.org:21/pub/a")
        );
        assert!(matches!(norm("/just/a/path"), Err(PathError::NotAbsolute)));
    }

    #[test]
    fn split_round_trips() {
        let key = norm("http://[::1]:8080/a/b?q=1").expect("normalises");
        let parts = split(&key).expect("splits");
        assert_eq!(
            parts,
            KeyParts {
                host: "[::1]",
                port: 8080,
                path: "/a/b",
                query: Some("q=1"),
            }
        );
    }
}
