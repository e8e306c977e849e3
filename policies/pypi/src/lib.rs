//! `pypi`: a PyPI mirror whose files come through Cistern too.
//!
//! PyPI's simple index (PEP 503 HTML, PEP 691 JSON) names every file by an
//! absolute URL on the file host (`https://files.pythonhosted.org/…`), so
//! a mirror of the index alone sends pip around the cache for the files.
//! This policy rewrites those URLs (`on_body`, ABI version 2) to a Cistern
//! mirror of the file host, and marks the files immutable (`on_response`):
//! a wheel or sdist never changes under its name, while simple pages keep
//! revalidating as their headers say.
//!
//! Only the URL's prefix changes: the `#sha256=…` fragment, and the
//! `data-dist-info-metadata` / `data-core-metadata` / `data-requires-python`
//! attributes (HTML) or `hashes` / `core-metadata` keys (JSON) are left
//! byte for byte, so pip's hash checks pass against the mirrored files.
//!
//! Parameters:
//! - `files` (repeatable, at least one): `"FROM=TO"`: a URL prefix on the
//!   file host and what replaces it, e.g.
//!   `"https://files.pythonhosted.org/=/pypi-files/"` (a path on the
//!   Cistern the client asked, or an absolute URL).
//! - `immutable-suffix` (repeatable): more file-name suffixes of files that
//!   never change.

use cistern_guest::{self as cistern, Error, Level, Result, body, cache, request, response};

/// File names of distributions (and their PEP 658 metadata), which never
/// change once uploaded.
const IMMUTABLE_SUFFIXES: &[&str] = &[
    ".whl",
    ".whl.metadata",
    ".tar.gz",
    ".tar.gz.metadata",
    ".zip",
    ".zip.metadata",
    ".tar.bz2",
    ".egg",
];

/// `FROM=TO` pairs of the `files` parameter.
fn prefixes() -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for value in cistern::params("files")? {
        match value.split_once('=') {
            Some((from, to)) if !from.is_empty() => pairs.push((from.to_owned(), to.to_owned())),
            _ => {
                cistern::log(
                    Level::Error,
                    &format!("param \"files\" {value:?}: expected \"FROM=TO\", e.g. \"https://files.pythonhosted.org/=/pypi-files/\""),
                );
                return Err(Error::Invalid);
            }
        }
    }
    if pairs.is_empty() {
        cistern::log(
            Level::Error,
            "no param \"files\": name the file host's prefix and its Cistern mirror, e.g. param \"files\" \"https://files.pythonhosted.org/=/pypi-files/\"",
        );
        return Err(Error::NotFound);
    }
    Ok(pairs)
}

/// Rewrites every quoted value (an HTML attribute or a JSON string) that
/// starts with a `FROM` prefix. Text that merely mentions the host is not a
/// link and stays.
fn rewrite(doc: &[u8], pairs: &[(String, String)]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(doc.len() + doc.len() / 8);
    let mut changed = false;
    let mut i = 0;
    while i < doc.len() {
        let c = doc[i];
        out.push(c);
        i += 1;
        if c != b'"' && c != b'\'' {
            continue;
        }
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
    if IMMUTABLE_SUFFIXES
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .any(|s| name.ends_with(s))
    {
        cache::immutable()?;
    }
    Ok(())
}

cistern::policy!(on_response => on_response, on_body => on_body);

#[cfg(test)]
mod tests {
    use super::rewrite;

    fn pairs() -> Vec<(String, String)> {
        vec![(
            "https://files.pythonhosted.org/".into(),
            "/pypi-files/".into(),
        )]
    }

    #[test]
    fn pep503_links_move_and_hashes_stay() {
        let html = br#"<a href="https://files.pythonhosted.org/packages/ab/x-1.0-py3-none-any.whl#sha256=00ff" data-dist-info-metadata="sha256=11ee" data-core-metadata="sha256=11ee">x-1.0-py3-none-any.whl</a> see https://files.pythonhosted.org/"#;
        let out = String::from_utf8(rewrite(html, &pairs()).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"<a href="/pypi-files/packages/ab/x-1.0-py3-none-any.whl#sha256=00ff" data-dist-info-metadata="sha256=11ee" data-core-metadata="sha256=11ee">x-1.0-py3-none-any.whl</a> see https://files.pythonhosted.org/"#
        );
    }

    #[test]
    fn pep691_urls_move() {
        let json = br#"{"files":[{"url":"https://files.pythonhosted.org/packages/x.whl","hashes":{"sha256":"00ff"}}]}"#;
        let out = String::from_utf8(rewrite(json, &pairs()).unwrap()).unwrap();
        assert!(out.contains(r#""url":"/pypi-files/packages/x.whl""#), "{out}");
        assert!(out.contains(r#""sha256":"00ff""#));
        assert!(rewrite(br#"{"url":"/other"}"#, &pairs()).is_none());
    }
}
