//! `metalink`: send clients to a copy that is already cached.
//!
//! Download redirectors (MirrorBrain, Mirrorbits, SourceForge) answer with a
//! redirect whose `Location` picks some mirror, plus the file's digest
//! (`Digest: SHA-256=…`, RFC 3230; `Repr-Digest: sha-256=:…:`, RFC 9530) and
//! other mirrors (`Link: <…>; rel=duplicate`, RFC 6249). When the chosen
//! mirror's copy is not in the replica but the same bytes are, under another
//! URL, this rewrites `Location` to that URL, so the client is served from
//! the cache instead of downloading the file again. This is the design of
//! Apache Traffic Server's Metalink plugin.
//!
//! No parameters.

use cistern_guest::{self as cistern, ReplicaState, Result, replica, request, response};

fn base64_value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' | b'-' => 62,
        b'/' | b'_' => 63,
        _ => return None,
    } as u32)
}

/// Decodes base64 (standard or URL-safe, padding optional) into exactly 32
/// bytes, or `None`.
fn sha256_from_base64(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let mut len = 0;
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in text.trim().trim_end_matches('=').as_bytes() {
        acc = (acc << 6) | base64_value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if len == 32 {
                return None;
            }
            out[len] = (acc >> bits) as u8;
            len += 1;
        }
    }
    (len == 32).then_some(out)
}

/// The SHA-256 from `Digest` (`SHA-256=b64`, RFC 3230) or `Repr-Digest`
/// (`sha-256=:b64:`, RFC 9530); algorithm names are case-insensitive.
fn digest_of_response() -> Result<Option<[u8; 32]>> {
    for name in ["repr-digest", "digest"] {
        for value in cistern::headers::all(cistern::Target::Response, name)? {
            for item in value.split(',') {
                let Some((algorithm, encoded)) = item.split_once('=') else {
                    continue;
                };
                if !algorithm.trim().eq_ignore_ascii_case("sha-256") {
                    continue;
                }
                let encoded = encoded.trim().trim_matches(':');
                if let Some(digest) = sha256_from_base64(encoded) {
                    return Ok(Some(digest));
                }
            }
        }
    }
    Ok(None)
}

/// `<url>; rel=duplicate` targets from `Link` headers (RFC 6249).
fn duplicates() -> Result<Vec<String>> {
    let mut urls = Vec::new();
    for value in cistern::headers::all(cistern::Target::Response, "link")? {
        for link in value.split(',') {
            let mut parts = link.split(';');
            let Some(target) = parts.next() else { continue };
            let target = target.trim();
            let is_duplicate = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p == "rel=duplicate" || p == "rel=\"duplicate\""
            });
            if is_duplicate && target.starts_with('<') && target.ends_with('>') {
                urls.push(target[1..target.len() - 1].to_owned());
            }
        }
    }
    Ok(urls)
}

/// Resolves a `Location` against the request URL (RFC 9110 allows relative
/// references).
fn absolute(location: &str, base: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(stripped) = location.strip_prefix("//") {
        return format!("{scheme}://{stripped}");
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let path = &rest[authority.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    format!("{scheme}://{authority}{dir}{location}")
}

fn on_response() -> Result<()> {
    if !matches!(response::status()?, 301 | 302 | 303 | 307 | 308) {
        return Ok(());
    }
    let Some(location) = response::header("location")? else {
        return Ok(());
    };
    let target = absolute(&location, &request::url()?);
    if replica::state(&target)? == ReplicaState::Complete {
        return Ok(());
    }
    if let Some(digest) = digest_of_response()?
        && let Some(cached) = replica::url_by_sha256(&digest)?
        && cached != target
    {
        return response::set_header("location", &cached);
    }
    for duplicate in duplicates()? {
        if replica::state(&duplicate)? == ReplicaState::Complete {
            return response::set_header("location", &duplicate);
        }
    }
    Ok(())
}

cistern::policy!(on_response => on_response);
