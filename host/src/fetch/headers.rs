//! Parsers of upstream response headers that the fill relies on: lengths,
//! `Content-Range`, announced digests, close-delimited framing and the
//! `Range`/`If-Range` pair that resumes a partial.

use base64::Engine as _;
use headers::HeaderMapExt;
use http::{HeaderMap, HeaderValue, Response, header};

use crate::store::PartialMeta;

/// `Range` and `If-Range` to resume a partial, when it has a validator that
/// makes resuming safe.
pub(super) fn resume_headers(meta: &PartialMeta, len: u64) -> Option<(HeaderValue, HeaderValue)> {
    if len == 0 {
        return None;
    }
    let validator = meta
        .etag
        .as_deref()
        .filter(|e| !e.starts_with("W/"))
        .or(meta.last_modified.as_deref())?;
    let range = HeaderValue::from_str(&format!("bytes={len}-")).ok()?;
    let if_range = HeaderValue::from_str(validator).ok()?;
    Some((range, if_range))
}

/// Whether the body of `resp` ends only when the connection closes: an
/// HTTP/1.x response with neither `Content-Length` nor chunked
/// `Transfer-Encoding` (RFC 9112 section 6.3, rule 8). hyper reads such a
/// body to EOF and reports a normal end, so only the head can tell.
pub(super) fn close_delimited<B>(resp: &Response<B>) -> bool {
    let h1 = resp.version() <= http::Version::HTTP_11;
    let chunked = resp
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
        });
    h1 && !chunked && !resp.headers().contains_key(header::CONTENT_LENGTH)
}

/// A header's value as text, if it is text.
pub(super) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The `Content-Length` the upstream announced.
pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes START-END/TOTAL` → START.
pub(super) fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let range = headers.typed_get::<headers::ContentRange>()?;
    range.bytes_range().map(|(start, _)| start)
}

/// `Content-Range: bytes START-END/TOTAL` → TOTAL (none for `*`).
pub(super) fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    headers.typed_get::<headers::ContentRange>()?.bytes_len()
}

/// The SHA-256 an upstream announced in `Repr-Digest` (RFC 9530,
/// `sha-256=:BASE64:`) or `Digest` (RFC 3230, `SHA-256=BASE64`).
pub fn announced_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    repr_digest_sha256(headers).or_else(|| legacy_digest_sha256(headers))
}

/// `Repr-Digest: sha-256=:BASE64:` (RFC 9530): a structured-field
/// dictionary, parsed by `sfv`; several field lines are one dictionary.
fn repr_digest_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    let mut lines = headers.get_all("repr-digest").iter();
    let first = lines.next()?;
    let mut joined = String::from(first.to_str().ok()?);
    for more in lines {
        joined.push_str(", ");
        joined.push_str(more.to_str().ok()?);
    }
    let dict: sfv::Dictionary = sfv::Parser::new(&joined).parse().ok()?;
    match dict.get("sha-256")? {
        sfv::ListEntry::Item(item) => match &item.bare_item {
            sfv::BareItem::ByteSequence(bytes) => bytes.as_slice().try_into().ok(),
            _ => None,
        },
        sfv::ListEntry::InnerList(_) => None,
    }
}

/// The obsolete `Digest: SHA-256=BASE64` (RFC 3230): not a structured
/// field, a comma-separated list of `algorithm=value`.
fn legacy_digest_sha256(headers: &HeaderMap) -> Option<[u8; 32]> {
    let b64 = base64::engine::general_purpose::STANDARD;
    headers
        .get_all("digest")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| item.trim().split_once('='))
        .filter(|(alg, _)| alg.trim().eq_ignore_ascii_case("sha-256"))
        .find_map(|(_, val)| <[u8; 32]>::try_from(b64.decode(val.trim()).ok()?).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn announced_digests_parse_in_both_syntaxes() {
        let sum: [u8; 32] = Sha256::digest(b"hello").into();
        let b64 = base64::engine::general_purpose::STANDARD.encode(sum);
        let mut h = HeaderMap::new();
        h.insert(
            "repr-digest",
            format!("sha-512=:AAAA:, sha-256=:{b64}:").parse().unwrap(),
        );
        assert_eq!(announced_sha256(&h), Some(sum));
        // Two field lines are one dictionary (RFC 9651 §4.2).
        let mut h = HeaderMap::new();
        h.append("repr-digest", "sha-512=:AAAA:".parse().unwrap());
        h.append("repr-digest", format!("sha-256=:{b64}:").parse().unwrap());
        assert_eq!(announced_sha256(&h), Some(sum));
        // A malformed field is no digest at all, not a half-read one.
        let mut h = HeaderMap::new();
        h.insert("repr-digest", format!("sha-256=:{b64}").parse().unwrap());
        assert_eq!(announced_sha256(&h), None);
        let mut h = HeaderMap::new();
        h.insert("digest", format!("MD5=xyz, SHA-256={b64}").parse().unwrap());
        assert_eq!(announced_sha256(&h), Some(sum));
        assert_eq!(announced_sha256(&HeaderMap::new()), None);
    }

    #[test]
    fn close_delimited_bodies_are_told_by_their_head() {
        let resp = |headers: &[(&str, &str)], version| {
            let mut b = Response::builder().version(version);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        use http::Version;
        assert!(close_delimited(&resp(&[], Version::HTTP_11)));
        assert!(close_delimited(&resp(&[], Version::HTTP_10)));
        assert!(!close_delimited(&resp(
            &[("content-length", "5")],
            Version::HTTP_11
        )));
        assert!(!close_delimited(&resp(
            &[("transfer-encoding", "gzip, Chunked")],
            Version::HTTP_11
        )));
        assert!(!close_delimited(&resp(&[], Version::HTTP_2)));
    }

    #[test]
    fn content_range_parts() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_RANGE, "bytes 100-199/1000".parse().unwrap());
        assert_eq!(content_range_start(&h), Some(100));
        assert_eq!(content_range_total(&h), Some(1000));
        // An unknown total, an unsatisfied range, garbage.
        h.insert(header::CONTENT_RANGE, "bytes 100-199/*".parse().unwrap());
        assert_eq!(content_range_start(&h), Some(100));
        assert_eq!(content_range_total(&h), None);
        h.insert(header::CONTENT_RANGE, "bytes */1000".parse().unwrap());
        assert_eq!(content_range_start(&h), None);
        h.insert(header::CONTENT_RANGE, "bytes 9-x/10".parse().unwrap());
        assert_eq!(content_range_start(&h), None);
        assert_eq!(content_range_total(&h), None);
    }

    #[test]
    fn resume_needs_a_strong_validator() {
        let mut meta = PartialMeta {
            key: "k".into(),
            url: "u".into(),
            total_length: Some(10),
            etag: Some("W/\"weak\"".into()),
            last_modified: None,
            started_at: 0,
        };
        assert!(resume_headers(&meta, 5).is_none());
        meta.etag = Some("\"strong\"".into());
        let (range, if_range) = resume_headers(&meta, 5).unwrap();
        assert_eq!(range, "bytes=5-");
        assert_eq!(if_range, "\"strong\"");
        assert!(resume_headers(&meta, 0).is_none());
    }
}
