//! The on-disk form of [`ObjectMeta`], owned by Cistern and versioned.
//!
//! Version 2 (current) records the RFC 9111 inputs (request method, URI
//! and selecting headers; response status and headers; request and
//! response times) and rebuilds the `http-cache-semantics` policy from them
//! on load, so that an upgrade of that crate can never make the index
//! unreadable. Its `replica` is `null` for a response kept aside (any
//! status but 200: the body is `<hash>.body` beside the metadata file).
//! Version 1 is the same layout from before responses were kept aside: a
//! `replica` path always, status 200; it is read as is and rewritten as
//! version 2. Version 0 (no `version` field) was that crate's own serde
//! layout of its `CachePolicy`; it is read through a copy of that layout
//! kept here, so it stays readable whatever the crate does next, and the
//! store rewrites it as version 1. `docs/replica.md` describes the fields.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};

use super::{FileStamp, ObjectMeta, RfcInputs};

/// The metadata version this build writes.
pub const META_VERSION: u32 = 2;

/// Why a metadata file cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// Not JSON, or not the layout its version promises.
    #[error("not readable as version {version} metadata: {source}")]
    Syntax {
        /// The version the file claims (0 when it names none).
        version: u64,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// Written by a newer Cistern: kept aside rather than guessed at.
    #[error("metadata version {found} is newer than this build reads (up to {META_VERSION})")]
    Unsupported {
        /// The version in the file.
        found: u64,
    },
    /// A field does not hold what it must (a method, a URI, a header…).
    #[error("invalid {field}: {value:?}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// Metadata about to be written cannot be encoded.
    #[error("cannot encode metadata: {0}")]
    Encode(serde_json::Error),
}

/// Versions 1 and 2 as they are written (version 1 always has a
/// `replica` and status 200).
#[derive(Debug, Serialize, Deserialize)]
struct V1 {
    version: u32,
    key: String,
    url: String,
    /// `None` (written as `null`, version 2 only) for a response kept aside.
    replica: Option<String>,
    length: u64,
    sha256: String,
    file: Option<FileStamp>,
    stored_at: u64,
    validated_at: u64,
    #[serde(default)]
    immutable: bool,
    #[serde(default)]
    ttl_override: Option<u64>,
    /// Headers as served.
    headers: Vec<(String, String)>,
    /// The validators in `response.headers`, written for people and tools
    /// that read the file; Cistern reads them from the headers.
    validators: Validators,
    request: Request,
    response: Response,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch.
    time_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch.
    time_ms: u64,
}

/// Version 0: `ObjectMeta` with `http-cache-semantics` 3's `CachePolicy`
/// serialised in place (its fields as that crate named them).
#[derive(Debug, Deserialize)]
struct V0 {
    key: String,
    url: String,
    replica: String,
    headers: Vec<(String, String)>,
    policy: V0Policy,
    length: u64,
    sha256: String,
    stored_at: u64,
    validated_at: u64,
    #[serde(default)]
    immutable: bool,
    #[serde(default)]
    ttl_override: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct V0Policy {
    req: BTreeMap<String, OneOrMany>,
    res: BTreeMap<String, OneOrMany>,
    uri: String,
    status: u16,
    method: String,
    response_time: V0Time,
}

/// `http-serde`'s header map: one string, or a list for repeated headers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// serde's `SystemTime`.
#[derive(Debug, Deserialize)]
struct V0Time {
    secs_since_epoch: u64,
    nanos_since_epoch: u32,
}

/// Only the `version` field, to pick the layout.
#[derive(Debug, Deserialize)]
struct Probe {
    version: Option<u64>,
}

/// Encodes `meta` as the current version (pretty JSON: people read these
/// files when in doubt).
pub fn encode_object(meta: &ObjectMeta) -> Result<Vec<u8>, MetaError> {
    let rfc = &meta.rfc;
    let header = |name: http::HeaderName| {
        rfc.response_headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let file = V1 {
        version: META_VERSION,
        key: meta.key.clone(),
        url: meta.url.clone(),
        replica: meta.in_tree().then(|| meta.replica.clone()),
        length: meta.length,
        sha256: meta.sha256.clone(),
        file: meta.file,
        stored_at: meta.stored_at,
        validated_at: meta.validated_at,
        immutable: meta.immutable,
        ttl_override: meta.ttl_override,
        headers: meta.headers.clone(),
        validators: Validators {
            etag: header(http::header::ETAG),
            last_modified: header(http::header::LAST_MODIFIED),
        },
        request: Request {
            method: rfc.method.as_str().to_owned(),
            uri: rfc.uri.to_string(),
            headers: pairs(&rfc.request_headers),
            time_ms: unix_ms(rfc.request_time),
        },
        response: Response {
            status: rfc.status.as_u16(),
            headers: pairs(&rfc.response_headers),
            time_ms: unix_ms(rfc.response_time),
        },
    };
    serde_json::to_vec_pretty(&file).map_err(MetaError::Encode)
}

/// Decodes metadata of any version this build reads; returns it and the
/// version it was written in (older than [`META_VERSION`]: rewrite it).
pub fn decode_object(bytes: &[u8]) -> Result<(ObjectMeta, u32), MetaError> {
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|source| MetaError::Syntax { version: 0, source })?;
    match probe.version {
        None => {
            let v0: V0 = serde_json::from_slice(bytes)
                .map_err(|source| MetaError::Syntax { version: 0, source })?;
            Ok((from_v0(v0)?, 0))
        }
        Some(version @ (1 | 2)) => {
            let v1: V1 = serde_json::from_slice(bytes)
                .map_err(|source| MetaError::Syntax { version, source })?;
            if u64::from(v1.version) != version {
                return Err(invalid("version", &v1.version.to_string()));
            }
            Ok((from_v1(v1)?, version as u32))
        }
        Some(found) => Err(MetaError::Unsupported { found }),
    }
}

fn from_v1(v: V1) -> Result<ObjectMeta, MetaError> {
    let rfc = RfcInputs {
        method: method(&v.request.method)?,
        uri: uri(&v.request.uri)?,
        request_headers: header_map(v.request.headers.iter().map(|(k, v)| (k, v)))?,
        status: status(v.response.status)?,
        response_headers: header_map(v.response.headers.iter().map(|(k, v)| (k, v)))?,
        request_time: from_unix_ms(v.request.time_ms),
        response_time: from_unix_ms(v.response.time_ms),
    };
    // Where the body is follows from the status; a file that says
    // otherwise (or a version 1 file with another status) was not written
    // by Cistern.
    let replica = match (v.replica, rfc.status == StatusCode::OK) {
        (Some(path), true) => path,
        (None, false) if v.version >= 2 => String::new(),
        (Some(path), false) => return Err(invalid("replica of a response kept aside", &path)),
        (None, _) => return Err(invalid("replica", "null")),
    };
    Ok(ObjectMeta {
        key: v.key,
        url: v.url,
        replica,
        status: rfc.status.as_u16(),
        headers: v.headers,
        policy: rfc.policy(),
        rfc,
        length: v.length,
        sha256: v.sha256,
        file: v.file,
        stored_at: v.stored_at,
        validated_at: v.validated_at,
        immutable: v.immutable,
        ttl_override: v.ttl_override,
    })
}

fn from_v0(v: V0) -> Result<ObjectMeta, MetaError> {
    let flatten = |map: &BTreeMap<String, OneOrMany>| -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, values) in map {
            match values {
                OneOrMany::One(value) => out.push((name.clone(), value.clone())),
                OneOrMany::Many(values) => {
                    out.extend(values.iter().map(|value| (name.clone(), value.clone())));
                }
            }
        }
        out
    };
    let p = &v.policy;
    let request_headers = header_map(flatten(&p.req).iter().map(|(k, v)| (k, v)))?;
    let response_headers = header_map(flatten(&p.res).iter().map(|(k, v)| (k, v)))?;
    let response_time = UNIX_EPOCH
        + Duration::new(
            p.response_time.secs_since_epoch,
            p.response_time.nanos_since_epoch.min(999_999_999),
        );
    // Version 0 kept every request header (credentials too); only the ones
    // that select the response are carried over. It did not record when
    // the request was sent: the response time stands in for it.
    if p.status != 200 {
        return Err(invalid(
            "status of version 0 metadata",
            &p.status.to_string(),
        ));
    }
    let rfc = RfcInputs::new(
        method(&p.method)?,
        uri(&p.uri)?,
        &request_headers,
        status(p.status)?,
        &response_headers,
        response_time,
        response_time,
    );
    Ok(ObjectMeta {
        key: v.key,
        url: v.url,
        replica: v.replica,
        status: rfc.status.as_u16(),
        headers: v.headers,
        policy: rfc.policy(),
        rfc,
        length: v.length,
        sha256: v.sha256,
        file: None,
        stored_at: v.stored_at,
        validated_at: v.validated_at,
        immutable: v.immutable,
        ttl_override: v.ttl_override,
    })
}

fn method(text: &str) -> Result<Method, MetaError> {
    Method::from_bytes(text.as_bytes()).map_err(|_| invalid("request method", text))
}

fn uri(text: &str) -> Result<Uri, MetaError> {
    text.parse().map_err(|_| invalid("request URI", text))
}

fn status(code: u16) -> Result<StatusCode, MetaError> {
    StatusCode::from_u16(code).map_err(|_| invalid("response status", &code.to_string()))
}

fn invalid(field: &'static str, value: &str) -> MetaError {
    MetaError::Invalid {
        field,
        value: value.to_owned(),
    }
}

fn header_map<'a>(
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<HeaderMap, MetaError> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("header name", name))?;
        let value = HeaderValue::from_str(value).map_err(|_| invalid("header value", value))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Header pairs in map order; values that are not text are left out (they
/// could not be written back as the same bytes).
fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Milliseconds since the Unix epoch (0 before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
