//! `cargo`: a crates.io sparse-index mirror whose `.crate` files come
//! through Cistern too.
//!
//! A sparse registry's `config.json` names where crates are downloaded
//! (`dl`) and its web API (`api`), both on other hosts, so a mirror of the
//! index alone sends cargo around the cache for every `.crate`. This policy
//! rewrites the prefix of those two values in `config.json` (`on_body`,
//! ABI version 2), and marks `.crate` files (and `…/download` URLs)
//! immutable (`on_response`): a published version never changes. Index
//! entries keep revalidating as their headers say: a new version appends
//! a line to its crate's file.
//!
//! Parameters:
//! - `dl` (repeatable, at least one): `"FROM=TO"`, a prefix of the
//!   `dl`/`api` values and the absolute URL that replaces it, e.g.
//!   `"https://static.crates.io/crates=http://cistern.lan:8080/crates-files"`.

use cistern_guest::{self as cistern, Error, Level, Result, body, cache, request, response};

fn prefixes() -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for value in cistern::params("dl")? {
        match value.split_once('=') {
            Some((from, to)) if !from.is_empty() && to.contains("://") => {
                pairs.push((from.to_owned(), to.to_owned()))
            }
            _ => {
                cistern::log(
                    Level::Error,
                    &format!("param \"dl\" {value:?}: expected \"FROM=TO\" with an absolute TO, e.g. \"https://static.crates.io/crates=http://cistern.lan:8080/crates-files\""),
                );
                return Err(Error::Invalid);
            }
        }
    }
    if pairs.is_empty() {
        cistern::log(
            Level::Error,
            "no param \"dl\": name the download prefix and its Cistern mirror, e.g. param \"dl\" \"https://static.crates.io/crates=http://cistern.lan:8080/crates-files\"",
        );
        return Err(Error::NotFound);
    }
    Ok(pairs)
}

/// Rewrites the prefix of the values of the `"dl"` and `"api"` keys.
fn rewrite(doc: &[u8], pairs: &[(String, String)]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(doc.len() + 256);
    let mut changed = false;
    let mut i = 0;
    while i < doc.len() {
        let Some(key) = [&b"\"dl\""[..], &b"\"api\""[..]]
            .into_iter()
            .find(|k| doc[i..].starts_with(k))
        else {
            out.push(doc[i]);
            i += 1;
            continue;
        };
        out.extend_from_slice(key);
        i += key.len();
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
    // Only the registry's configuration names other hosts; index entries
    // (also JSON) are left as they are.
    if !request::path()?.ends_with("/config.json") {
        return Ok(());
    }
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
    if path.ends_with(".crate") || path.ends_with("/download") {
        cache::immutable()?;
    }
    Ok(())
}

cistern::policy!(on_response => on_response, on_body => on_body);

#[cfg(test)]
mod tests {
    use super::rewrite;

    #[test]
    fn dl_and_api_move() {
        let pairs = vec![
            (
                "https://static.crates.io/crates".to_owned(),
                "http://c.lan/crates-files".to_owned(),
            ),
            ("https://crates.io".to_owned(), "http://c.lan/crates-api".to_owned()),
        ];
        let doc = br#"{"dl": "https://static.crates.io/crates","api":"https://crates.io"}"#;
        let out = String::from_utf8(rewrite(doc, &pairs).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"dl": "http://c.lan/crates-files","api":"http://c.lan/crates-api"}"#
        );
    }
}
