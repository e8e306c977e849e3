//! Metalink for the complete files of a mirror set: the Metalink/HTTP
//! headers (RFC 6249) on answers from the replica, and the `FILE.meta4`
//! document (RFC 5854).
//!
//! # How fresh the alternatives are
//! The `Link: rel=duplicate` list is built once per replica and kept on it
//! ([`Replica::links`]) with a stamp of the set's health: it is rebuilt on
//! the first answer after any upstream of the set is disabled or
//! re-enabled (so a client is never pointed at a mirror Cistern itself
//! has taken out), and at least every [`LINKS_REFRESH`] otherwise, so the
//! priorities follow the set's choice order as latency and errors move it
//! and a mirror whose 404 for the file is forgotten comes back. A hit
//! between two rebuilds costs one atomic load and a clone of a few values.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};

use crate::fetch::MirrorSet;
use crate::store::{Replica, StampedHeaders};

/// The media type of a Metalink 4 document (RFC 5854 §4.1).
pub const META4_TYPE: &str = "application/metalink4+xml";
/// The suffix that names a file's Metalink document.
pub const META4_SUFFIX: &str = ".meta4";
/// The longest a replica's list of alternatives is kept between health
/// changes.
pub const LINKS_REFRESH: Duration = Duration::from_secs(10);
/// The most `rel=duplicate` links on one answer: the best few are what a
/// client uses, every hit copies them, and `FILE.meta4` lists them all.
pub const MAX_DUPLICATES: usize = 8;

/// The stamp of the set's state that the links describe: its health
/// generation and the current [`LINKS_REFRESH`] period.
fn stamp(set: &MirrorSet) -> u64 {
    let period = set.now_ms() / LINKS_REFRESH.as_millis() as u64;
    (set.health_generation() << 32) | (period & 0xffff_ffff)
}

/// `rest` (path below the prefix, with its query) split into its path and
/// its query (with the `?`, or empty).
fn split_query(rest: &str) -> (&str, &str) {
    match rest.find('?') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    }
}

/// Adds the Metalink/HTTP headers to an answer from `replica`, the file
/// `rest` of `set`: `Link: <url>; rel=duplicate; pri=N` for each healthy
/// upstream that should have it, best first, and `Link: <FILE.meta4>;
/// rel=describedby`. Nothing for a site (its upstreams are private) or a
/// response kept aside (not a file).
pub fn add_links(replica: &Replica, set: &MirrorSet, rest: &str, headers: &mut HeaderMap) {
    if !set.advertise || !replica.meta.in_tree() {
        return;
    }
    let stamp = stamp(set);
    let cached = replica.links.load();
    let links = match &*cached {
        Some(links) if links.stamp == stamp => Arc::clone(links),
        _ => {
            let built = Arc::new(StampedHeaders {
                stamp,
                values: build_links(set, rest),
            });
            replica.links.store(Some(Arc::clone(&built)));
            built
        }
    };
    for (name, value) in &links.values {
        headers.append(name.clone(), value.clone());
    }
}

fn build_links(set: &MirrorSet, rest: &str) -> Vec<(http::HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    let best = set
        .alternatives(rest, false)
        .into_iter()
        .take(MAX_DUPLICATES);
    for (pri, index) in best.enumerate() {
        // A URL that does not join or would not fit in a header is left
        // out rather than advertised wrong.
        let Ok(url) = set.url(index, rest) else {
            continue;
        };
        let pri = pri + 1;
        if let Ok(v) = HeaderValue::try_from(format!("<{url}>; rel=duplicate; pri={pri}")) {
            out.push((header::LINK, v));
        }
    }
    let (path, query) = split_query(rest);
    if !path.is_empty() {
        let prefix = &set.prefix;
        let described = format!(
            "<{prefix}{path}{META4_SUFFIX}{query}>; rel=describedby; type=\"{META4_TYPE}\""
        );
        if let Ok(v) = HeaderValue::try_from(described) {
            out.push((header::LINK, v));
        }
    }
    out
}

/// The file a `.meta4` request names: `rest` without the suffix (the
/// query kept), or `None` when `rest` names no Metalink document.
pub fn described_file(rest: &str) -> Option<String> {
    let (path, query) = split_query(rest);
    let file = path.strip_suffix(META4_SUFFIX)?;
    if file.is_empty() || file.ends_with('/') {
        return None;
    }
    Some(format!("{file}{query}"))
}

/// The RFC 5854 document for `replica`, the file `rest` of `set`, which
/// Cistern serves at `own_url`: its name, size and SHA-256, Cistern's URL
/// first (priority 1), then each upstream that should have it, the healthy
/// ones in the set's choice order, then the disabled ones.
pub fn meta4_document(replica: &Replica, set: &MirrorSet, rest: &str, own_url: &str) -> String {
    let meta = &replica.meta;
    let (path, _) = split_query(rest);
    let name = file_name(path);
    let mut doc = String::with_capacity(512);
    doc.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    doc.push_str("<metalink xmlns=\"urn:ietf:params:xml:ns:metalink\">\n");
    let _ = writeln!(
        doc,
        "  <generator>cistern/{}</generator>",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(doc, "  <file name=\"{}\">", Xml(&name));
    let _ = writeln!(doc, "    <size>{}</size>", meta.length);
    let _ = writeln!(
        doc,
        "    <hash type=\"sha-256\">{}</hash>",
        Xml(&meta.sha256)
    );
    let _ = writeln!(doc, "    <url priority=\"1\">{}</url>", Xml(own_url));
    let mirrors = set
        .alternatives(rest, true)
        .into_iter()
        .filter_map(|i| set.url(i, rest).ok());
    for (n, url) in mirrors.enumerate() {
        let _ = writeln!(
            doc,
            "    <url priority=\"{}\">{}</url>",
            n + 2,
            Xml(&url.to_string())
        );
    }
    doc.push_str("  </file>\n</metalink>\n");
    doc
}

/// The file's name for `<file name>`: the last segment of its path,
/// percent-decoded; kept encoded when decoding gives something RFC 5854
/// §4.1.2.1 forbids (a `/`, `..`) or no UTF-8.
fn file_name(path: &str) -> String {
    let last = path.rsplit('/').next().unwrap_or(path);
    match percent_encoding::percent_decode_str(last).decode_utf8() {
        Ok(d) if !d.contains('/') && d != ".." && d != "." && !d.is_empty() => d.into_owned(),
        _ => last.to_owned(),
    }
}

/// Text escaped for XML character data and attribute values.
struct Xml<'a>(&'a str);

impl std::fmt::Display for Xml<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&apos;")?,
                // Not allowed in XML 1.0 at all: never produced by a URL or
                // a decoded name we keep, but never written either.
                c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                    write!(f, "%{:02X}", c as u32)?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_is_escaped() {
        assert_eq!(
            Xml("a&b<c>\"d'e\u{1}").to_string(),
            "a&amp;b&lt;c&gt;&quot;d&apos;e%01"
        );
    }

    #[test]
    fn names_and_meta4_paths() {
        assert_eq!(file_name("pool/a%20b.deb"), "a b.deb");
        assert_eq!(file_name("pool/a%2Fb"), "a%2Fb");
        assert_eq!(file_name("pool/%2e%2e"), "%2e%2e");
        assert_eq!(file_name("x%FF"), "x%FF");
        assert_eq!(
            described_file("pool/x.deb.meta4").as_deref(),
            Some("pool/x.deb")
        );
        assert_eq!(
            described_file("pool/x.deb.meta4?v=1").as_deref(),
            Some("pool/x.deb?v=1")
        );
        assert_eq!(described_file("pool/.meta4"), None);
        assert_eq!(described_file(".meta4"), None);
        assert_eq!(described_file("pool/x.deb"), None);
    }
}
