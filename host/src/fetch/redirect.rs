//! Redirect mode of a mirror set (`mode="redirect"`): which files Cistern
//! keeps serving itself because they change in place, so a client is
//! never sent to a mirror that may still have yesterday's copy.
//!
//! The choice of a mirror for the other files is the set's own
//! ([`super::MirrorSet::redirect_choice`] for a 302,
//! [`super::MirrorSet::redirect_order`] for the listings); the answers
//! are the pipeline's.

use crate::config::RedirectConfig;

/// File names that change in place on distribution mirrors: Debian and
/// Ubuntu indices, RPM repodata, Arch databases, checksum lists. Served
/// by Cistern (proxied and cached, revalidated like any mirror file),
/// never redirected.
pub const BUILTIN_LOCAL: &[&str] = &[
    "InRelease",
    "Release",
    "Release.gpg",
    "Packages*",
    "Sources*",
    "Contents-*",
    "Translation-*",
    "Index",
    "repomd.xml*",
    "*.db",
    "*.db.sig",
    "*.files",
    "*.files.sig",
    "SHA256SUMS*",
    "MD5SUMS*",
];

/// The redirect settings of one mirror set, ready for the request path.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// The built-in patterns, then the `serve-locally` ones.
    local: Vec<Pattern>,
}

/// A file name pattern, sorted once by shape: every built-in one is a
/// name, a prefix or a suffix, which a comparison of that many bytes
/// decides where the general matcher walks the name.
#[derive(Debug, Clone)]
enum Pattern {
    /// No wildcard: the name itself.
    Exact(String),
    /// `TEXT*`, no other wildcard.
    Prefix(String),
    /// `*TEXT`, no other wildcard.
    Suffix(String),
    /// Anything else, for [`glob`].
    Glob(String),
}

impl Pattern {
    fn new(pattern: &str) -> Pattern {
        let wild = |s: &str| s.contains(['*', '?']);
        if !wild(pattern) {
            Pattern::Exact(pattern.to_owned())
        } else if let Some(p) = pattern.strip_suffix('*')
            && !wild(p)
        {
            Pattern::Prefix(p.to_owned())
        } else if let Some(s) = pattern.strip_prefix('*')
            && !wild(s)
        {
            Pattern::Suffix(s.to_owned())
        } else {
            Pattern::Glob(pattern.to_owned())
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(p) => name == p,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
            Pattern::Suffix(s) => name.ends_with(s.as_str()),
            Pattern::Glob(p) => glob(p.as_bytes(), name.as_bytes()),
        }
    }
}

impl Redirect {
    /// From the mirror's validated config.
    pub fn new(config: &RedirectConfig) -> Redirect {
        let local = BUILTIN_LOCAL
            .iter()
            .copied()
            .chain(config.serve_locally.iter().map(String::as_str))
            .map(Pattern::new)
            .collect();
        Redirect { local }
    }

    /// Whether `path` (below the mirror's prefix, without its query) is
    /// served by Cistern itself: a directory (empty or ending with `/`:
    /// listings differ between mirrors), or a file whose name matches a
    /// local pattern.
    pub fn serves_locally(&self, path: &str) -> bool {
        if path.is_empty() || path.ends_with('/') {
            return true;
        }
        let name = path
            .as_bytes()
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(path, |at| &path[at + 1..]);
        self.local.iter().any(|p| p.matches(name))
    }
}

/// Whether `text` matches `pattern`, where `*` is any run of bytes and `?`
/// one byte; linear in the lengths (one backtrack point, the last `*`).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        for (p, t, m) in [
            ("Packages*", "Packages", true),
            ("Packages*", "Packages.xz", true),
            ("Packages*", "XPackages", false),
            ("*.db", "core.db", true),
            ("*.db", "core.db.sig", false),
            ("InRelease", "InRelease", true),
            ("InRelease", "InRelease2", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b", "xaxxab", true),
            ("*a*b", "xaxxa", false),
            ("*", "", true),
            ("*", "x", true),
            ("a*", "a", true),
            ("", "", true),
            ("", "a", false),
            ("**", "a", true),
            ("*a?", "xab", true),
            ("?b*", "ab", true),
        ] {
            assert_eq!(glob(p.as_bytes(), t.as_bytes()), m, "{p} ~ {t}");
            assert_eq!(Pattern::new(p).matches(t), m, "{p} ~ {t}");
        }
    }

    #[test]
    fn indices_and_directories_stay_local_and_files_do_not() {
        let r = Redirect::new(&RedirectConfig {
            serve_locally: vec!["*.iso.sha256".into()],
        });
        for local in [
            "",
            "dists/",
            "dists/stable/InRelease",
            "dists/stable/main/binary-amd64/Packages.xz",
            "repodata/repomd.xml",
            "core/os/x86_64/core.db",
            "images/x.iso.sha256",
        ] {
            assert!(r.serves_locally(local), "{local}");
        }
        for redirected in [
            "pool/main/h/hello/hello_2.10-3_amd64.deb",
            "dists/stable/main/binary-amd64/by-hash/SHA256/ab12",
            "images/x.iso",
            "vlc/3.0/vlc-3.0.tar.xz",
        ] {
            assert!(!r.serves_locally(redirected), "{redirected}");
        }
    }
}
