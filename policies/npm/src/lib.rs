//! `npm`: an npm registry mirror whose tarballs come through Cistern too.
//!
//! A packument (`GET /NAME`, `application/json` or the abbreviated
//! `application/vnd.npm.install-v1+json`) names each version's tarball by
//! an absolute URL (`dist.tarball`) on the registry's or another host, so
//! a mirror of the packuments alone sends npm around the cache for the
//! tarballs. This policy rewrites `dist.tarball` (`on_body`, ABI version 2)
//! to a Cistern mirror and marks tarballs immutable (`on_response`);
//! packuments keep revalidating as their headers say.
//!
//! Only the value of a `"tarball"` key changes, and only its prefix:
//! `integrity` and `shasum` stay byte for byte, so npm's integrity check
//! runs against the mirrored file.
//!
//! Parameters:
//! - `tarballs` (repeatable, at least one): `"FROM=TO"`, a URL prefix of
//!   the tarballs and the absolute URL that replaces it (npm needs absolute
//!   tarball URLs), e.g.
//!   `"https://registry.npmjs.org/=http://cistern.lan:8080/npm/"`.
//! - `immutable-suffix` (repeatable): more file-name suffixes of files that
//!   never change (`.tgz` always is).

use cistern_guest::{self as cistern, Error, Level, Result, body, cache, request, response};

fn prefixes() -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for value in cistern::params("tarballs")? {
        match value.split_once('=') {
            Some((from, to)) if !from.is_empty() && to.contains("://") => {
                pairs.push((from.to_owned(), to.to_owned()))
            }
            _ => {
                cistern::log(
                    Level::Error,
                    &format!("param \"tarballs\" {value:?}: expected \"FROM=TO\" with an absolute TO, e.g. \"https://registry.npmjs.org/=http://cistern.lan:8080/npm/\""),
                );
                return Err(Error::Invalid);
            }
        }
    }
    if pairs.is_empty() {
        cistern::log(
            Level::Error,
            "no param \"tarballs\": name the tarballs' prefix and its Cistern mirror, e.g. param \"tarballs\" \"https://registry.npmjs.org/=http://cistern.lan:8080/npm/\"",
        );
        return Err(Error::NotFound);
    }
    Ok(pairs)
}

const KEY: &[u8] = b"\"tarball\"";

/// Rewrites the prefix of every `"tarball": "…"` value.
fn rewrite(doc: &[u8], pairs: &[(String, String)]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(doc.len() + doc.len() / 8);
    let mut changed = false;
    let mut i = 0;
    while i < doc.len() {
        if !doc[i..].starts_with(KEY) {
            out.push(doc[i]);
            i += 1;
            continue;
        }
        out.extend_from_slice(KEY);
        i += KEY.len();
        // `: "` with any JSON whitespace around the colon.
        let mut j = i;
        while j < doc.len() && b" \t\r\n".contains(&doc[j]) {
            j += 1;
        }
        if doc.get(j) != Some(&b':') {
            continue;
        }
        j += 1;
        while j < doc.len() && b" \t\r\n".contains(&doc[j]) {
            j += 1;
        }
        if doc.get(j) != Some(&b'"') {
            continue;
        }
        j += 1;
        out.extend_from_slice(&doc[i..j]);
        i = j;
        if let Some((from, to)) = pairs
            .iter()
            .find(|(from, _)| doc[i..].starts_with(from.as_bytes()))
        {
            out.extend_from_slice(to.as_bytes());
            i += from.len();
            changed = true;
        }
    }
    changed.then_some(out)
}

fn on_body() -> Result<()> {
    let pairs = prefixes()?;
    let doc = body::get()?;
    if let Some(new) = rewrite(&doc, &pairs) {
        body::set(&new)?;
    }
    Ok(())
}

fn on_response() -> Result<()> {
    if response::status()? != 200 {
        return Ok(());
    }
    let path = request::path()?;
    let name = path.rsplit('/').next().unwrap_or("");
    let extra = cistern::params("immutable-suffix")?;
    // A published version's tarball never changes (the registry refuses
    // republishing a version).
    if name.ends_with(".tgz") || extra.iter().any(|s| name.ends_with(s.as_str())) {
        cache::immutable()?;
    }
    Ok(())
}

cistern::policy!(on_response => on_response, on_body => on_body);

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn only_tarball_values_move_and_integrity_stays() {
        let pairs = vec![(
            "https://registry.npmjs.org/".to_owned(),
            "http://cistern.lan/npm/".to_owned(),
        )];
        let doc = br#"{"homepage":"https://registry.npmjs.org/x","versions":{"1.0.0":{"dist":{"tarball" : "https://registry.npmjs.org/x/-/x-1.0.0.tgz","integrity":"sha512-AA==","shasum":"ff"}}}}"#;
        let out = String::from_utf8(rewrite(doc, &pairs).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"homepage":"https://registry.npmjs.org/x","versions":{"1.0.0":{"dist":{"tarball" : "http://cistern.lan/npm/x/-/x-1.0.0.tgz","integrity":"sha512-AA==","shasum":"ff"}}}}"#
        );
        assert!(rewrite(br#"{"tarball":"https://other/x.tgz"}"#, &pairs).is_none());
    }
}
