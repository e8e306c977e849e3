//! Keeping a request inside its upstream's base path.
//!
//! A mirror or site maps our prefix onto an upstream base
//! (`/debian/` → `http://mirror.example/debian/`). The rest of the request
//! path is joined below that base, so a `..` in it would climb out: a real
//! upstream (nginx, Apache) resolves `/debian/../secret` to `/secret` and
//! the mirror would expose its whole upstream host. Upstreams also decode
//! before resolving: nginx turns `%2e` into `.` and `%2f` into `/` first,
//! and merges `//` into `/`. So the rest is resolved here the same way, and
//! a rest that climbs above the base is refused.
//!
//! The rules, for the path part of the rest (the query is left alone):
//! - segments are separated by `/` or an encoded slash `%2f`/`%2F`, as
//!   nginx sees them; empty segments are ignored (nginx `merge_slashes`);
//! - a segment that is `.` or `..`, with any of its dots written `%2e` or
//!   `%2E`, is a dot segment and is resolved;
//! - a `..` with nothing left to remove climbs above the base: refused,
//!   even if later segments would come back into it;
//! - the same check also runs with `\` and `%5c` as separators, because
//!   some servers (IIS, anything on Windows) split there; on nginx under
//!   Unix they are ordinary characters, so they are never rewritten;
//! - a rest without dot segments is passed on byte for byte, so encoded
//!   slashes that upstreams rely on (npm's `@scope%2fname`) keep working.

use std::borrow::Cow;

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the path climbs above {prefix} with a `..` segment (also when written `%2e%2e` or after an encoded slash `%2f`); refused"
)]
pub struct EscapeError {
    /// Our prefix whose base the path would leave.
    pub prefix: String,
}

/// `rest` (path and query below a base, without its leading `/`) with its
/// dot segments resolved, or an error if it climbs above the base.
/// Borrows `rest` when there is nothing to resolve (the common case).
pub fn confine<'a>(rest: &'a str, prefix: &str) -> Result<Cow<'a, str>, EscapeError> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if without_dot_segments(path) {
        return Ok(Cow::Borrowed(rest));
    }
    walk(rest, path, query, prefix)
}

/// Whether one pass over `path`'s bytes shows it has no dot segment: a dot
/// segment starts with `.` or with `%` (`%2e`), and without a `%` only `/`
/// and `\` separate segments, so a path with no `%` and no `.` starting a
/// segment (most, `pool/x_1.0.deb`) has none. `false` means "walk it".
fn without_dot_segments(path: &str) -> bool {
    let mut prev = b'/';
    path.bytes().all(|b| {
        let plain = b != b'%' && !(b == b'.' && matches!(prev, b'/' | b'\\'));
        prev = b;
        plain
    })
}

/// [`confine`] by walking every segment: `rest` split into `path` and
/// `query` at its first `?`.
fn walk<'a>(
    rest: &'a str,
    path: &str,
    query: Option<&str>,
    prefix: &str,
) -> Result<Cow<'a, str>, EscapeError> {
    let escape = || EscapeError {
        prefix: prefix.to_owned(),
    };
    // With the most separators every dot segment shows, so this one walk
    // both decides whether there is anything to do and catches climbs that
    // only a server splitting at `\` would make.
    let mut depth = 0usize;
    let mut dotted = false;
    for seg in segments(path, true) {
        match dots(seg) {
            Some(0) => {}
            Some(1) => dotted = true,
            Some(_) => {
                dotted = true;
                depth = depth.checked_sub(1).ok_or_else(escape)?;
            }
            None => depth += 1,
        }
    }
    if !dotted {
        return Ok(Cow::Borrowed(rest));
    }
    // Resolve the way nginx does: `/` and `%2f` split, `\` does not.
    let mut kept: Vec<&str> = Vec::new();
    let mut ends_in_dir = false;
    for seg in segments(path, false) {
        ends_in_dir = true;
        match dots(seg) {
            Some(0) | Some(1) => {}
            Some(_) => {
                kept.pop().ok_or_else(escape)?;
            }
            None => {
                kept.push(seg);
                ends_in_dir = false;
            }
        }
    }
    let mut out = String::with_capacity(rest.len());
    for (i, seg) in kept.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(seg);
    }
    if ends_in_dir && !kept.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(Cow::Owned(out))
}

/// The segments of `path`, split at `/` and `%2f` (and at `\` and `%5c`
/// when `backslash`).
fn segments(path: &str, backslash: bool) -> impl Iterator<Item = &str> {
    let bytes = path.as_bytes();
    let mut start = 0;
    let mut i = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        while i < bytes.len() {
            let sep_len = match bytes[i] {
                b'/' => 1,
                b'\\' if backslash => 1,
                b'%' if i + 2 < bytes.len() => {
                    match (bytes[i + 1], bytes[i + 2].to_ascii_lowercase()) {
                        (b'2', b'f') => 3,
                        (b'5', b'c') if backslash => 3,
                        _ => 0,
                    }
                }
                _ => 0,
            };
            if sep_len > 0 {
                let seg = &path[start..i];
                i += sep_len;
                start = i;
                return Some(seg);
            }
            i += 1;
        }
        if done {
            return None;
        }
        done = true;
        Some(&path[start..])
    })
}

/// How many dots `seg` is made of (`.` or `%2e`), or `None` if it holds
/// anything else. `Some(0)` is an empty segment; three or more dots are an
/// ordinary name.
fn dots(seg: &str) -> Option<usize> {
    let b = seg.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b[i] == b'%'
            && b.get(i + 1) == Some(&b'2')
            && matches!(b.get(i + 2), Some(b'e' | b'E'))
        {
            i += 3;
        } else {
            return None;
        }
        n += 1;
        if n > 2 {
            return None;
        }
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(rest: &str) -> String {
        confine(rest, "/m/").unwrap().into_owned()
    }

    fn refused(rest: &str) -> bool {
        confine(rest, "/m/").is_err()
    }

    #[test]
    fn plain_paths_are_borrowed_untouched() {
        for rest in [
            "pool/main/x_1.0.deb",
            "a//b",
            "@scope%2fname",
            "...",
            "a/.hidden/b..c?x=../..",
            "",
        ] {
            assert!(
                matches!(confine(rest, "/m/"), Ok(Cow::Borrowed(r)) if r == rest),
                "{rest}"
            );
        }
    }

    #[test]
    fn dot_segments_inside_the_base_are_resolved() {
        assert_eq!(ok("a/./b"), "a/b");
        assert_eq!(ok("a/x/../b"), "a/b");
        assert_eq!(ok("a/x/%2e%2E/b?q=1"), "a/b?q=1");
        assert_eq!(ok("a/x%2f..%2fb"), "a/b");
        assert_eq!(ok("a/b/.."), "a/");
        assert_eq!(ok("a/."), "a/");
        assert_eq!(ok("./"), "");
        assert_eq!(ok("a\\..\\b/./c"), "a\\..\\b/c");
    }

    /// The one-pass shortcut gives what the full walk gives, for every
    /// path of up to five pieces drawn from the spellings that matter
    /// (dots, both slashes, their encodings, a stray or cut-off `%`, the
    /// query mark): 271 453 paths.
    #[test]
    fn the_shortcut_agrees_with_the_full_walk() {
        const PIECES: [&str; 12] = [
            "a", ".", "/", "\\", "%2e", "%2E", "%2f", "%5c", "%", "%2", "?", "e",
        ];
        let as_text = |r: Result<Cow<'_, str>, EscapeError>| r.map(Cow::into_owned);
        let mut checked = 0usize;
        let mut shortcut = 0usize;
        let mut picks = Vec::new();
        for len in 0..=5u32 {
            for n in 0..PIECES.len().pow(len) {
                picks.clear();
                let mut k = n;
                for _ in 0..len {
                    picks.push(PIECES[k % PIECES.len()]);
                    k /= PIECES.len();
                }
                let rest = picks.concat();
                let (path, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest.as_str(), None),
                };
                let walked = walk(&rest, path, query, "/m/");
                if without_dot_segments(path) {
                    shortcut += 1;
                    assert!(
                        matches!(&walked, Ok(Cow::Borrowed(r)) if *r == rest),
                        "the shortcut passes {rest:?} untouched, the walk gives {walked:?}"
                    );
                }
                assert_eq!(as_text(confine(&rest, "/m/")), as_text(walked), "{rest:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 271_453);
        // Both branches were taken many times.
        assert!(
            shortcut > 10_000 && checked - shortcut > 10_000,
            "{shortcut}"
        );
    }

    #[test]
    fn climbing_above_the_base_is_refused_in_every_spelling() {
        for rest in [
            "../secret",
            "%2e%2e/secret",
            "%2E%2e/secret",
            ".%2e/secret",
            "%2e./secret",
            "..%2fsecret",
            "..%2Fsecret",
            "a%2f..%2f..%2fsecret",
            "a/../../secret",
            "a//../../secret",
            "..",
            "../m/x",
            "..%5csecret",
            "a\\..\\..\\secret",
        ] {
            assert!(refused(rest), "{rest}");
        }
        let e = confine("../x", "/debian/").unwrap_err();
        assert!(e.to_string().contains("/debian/"), "{e}");
    }
}
