//! The `store-id` policy's `*` matcher (`policies/store-id/src/glob.rs`),
//! compiled natively: the same captures as an exhaustive backtracking
//! search on every small pattern and text, and linear time on the inputs
//! that made that search run for ever.

#[path = "../policies/store-id/src/glob.rs"]
mod glob;

use std::time::{Duration, Instant};

use glob::glob;

/// The reference: tries every split, leftmost `*` shortest first, and
/// returns the first that matches (the matcher store-id had before, which
/// is exponential in the number of stars).
fn backtrack<'t>(pattern: &[u8], text: &'t str, start: usize, captures: &mut Vec<&'t str>) -> bool {
    let bytes = text.as_bytes();
    let (mut p, mut t) = (0, start);
    while p < pattern.len() {
        if pattern[p] == b'*' {
            let depth = captures.len();
            for end in t..=bytes.len() {
                if !text.is_char_boundary(end) {
                    continue;
                }
                captures.push(&text[t..end]);
                if backtrack(&pattern[p + 1..], text, end, captures) {
                    return true;
                }
                captures.truncate(depth);
            }
            return false;
        }
        if t >= bytes.len() || bytes[t] != pattern[p] {
            return false;
        }
        p += 1;
        t += 1;
    }
    t == bytes.len()
}

fn matched<'t>(pattern: &str, text: &'t str) -> Option<Vec<&'t str>> {
    let mut captures = vec!["stale"];
    glob(pattern, text, &mut captures).then_some(captures)
}

#[test]
fn captures_are_the_shortest_runs_that_let_the_rest_match() {
    let cases: &[(&str, &str, Option<&[&str]>)] = &[
        ("http://a/x", "http://a/x", Some(&[])),
        ("http://a/x", "http://a/xy", None),
        ("http://a/x", "http://a/", None),
        (
            "http://*/debian/pool/*",
            "http://deb.debian.org/debian/pool/main/h/hello.deb",
            Some(&["deb.debian.org", "main/h/hello.deb"]),
        ),
        // The first `/pool/`, not the last.
        (
            "http://*/pool/*",
            "http://a/pool/b/pool/c",
            Some(&["a", "b/pool/c"]),
        ),
        // The suffix is pinned to the end.
        ("http://h/*.deb", "http://h/a.deb.deb", Some(&["a.deb"])),
        ("http://h/*.deb", "http://h/a.deb.gz", None),
        // Prefix and suffix may not share characters.
        ("ab*ba", "aba", None),
        ("ab*ba", "abba", Some(&[""])),
        ("*ab*ab", "abab", Some(&["", ""])),
        ("*ab*ab", "ab", None),
        ("*a*", "bab", Some(&["b", "b"])),
        ("**", "xy", Some(&["", "xy"])),
        ("*", "", Some(&[""])),
        ("x*", "y", None),
        ("é*ü", "éaü", Some(&["a"])),
    ];
    for (pattern, text, want) in cases {
        let want = want.map(|w| w.to_vec());
        assert_eq!(matched(pattern, text), want, "{pattern:?} against {text:?}");
    }
}

/// Every pattern of up to five symbols over `a`, `b`, `*` against every
/// text of up to six over `a`, `b`, `é`: the same verdict and captures as
/// the exhaustive search.
#[test]
fn agrees_with_the_exhaustive_search_on_every_small_case() {
    fn all(alphabet: &[&str], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out
    }
    let patterns = all(&["a", "b", "*"], 5);
    let texts = all(&["a", "b", "é"], 6);
    let mut compared = 0;
    for pattern in &patterns {
        for text in &texts {
            let mut want = Vec::new();
            let want = backtrack(pattern.as_bytes(), text, 0, &mut want).then_some(want);
            assert_eq!(matched(pattern, text), want, "{pattern:?} against {text:?}");
            compared += 1;
        }
    }
    assert_eq!(compared, 364 * 1093);
}

#[test]
fn thirty_stars_against_a_4_kib_url_take_no_time() {
    let pattern = format!("http://h.test/{}*b", "*a".repeat(29));
    let almost = format!("http://h.test/{}", "a".repeat(4096));
    let matching = format!("{almost}b");
    let started = Instant::now();
    for _ in 0..100 {
        assert_eq!(matched(&pattern, &almost), None);
        let captures = matched(&pattern, &matching).expect("a match");
        assert_eq!(captures.len(), 30);
        assert!(captures[..29].iter().all(|c| c.is_empty()));
        assert_eq!(captures[29], "a".repeat(4096 - 29));
    }
    // Two hundred matches of a 4 KiB text: microseconds each when linear;
    // the exhaustive search would not finish one in a lifetime.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
