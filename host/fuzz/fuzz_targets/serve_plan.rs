//! Conditional and range requests against a stored response: whatever the
//! headers say, the answer is 200, a 206 inside the body, a 416, or a 304
//! or 412 that the request's own conditionals asked for.
#![no_main]

use arbitrary::Arbitrary;
use cistern::serve::{Plan, plan};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Case {
    head: bool,
    range: Option<Vec<u8>>,
    if_range: Option<Vec<u8>>,
    if_none_match: Option<Vec<u8>>,
    if_modified_since: Option<Vec<u8>>,
    if_match: Option<Vec<u8>>,
    if_unmodified_since: Option<Vec<u8>>,
    etag: Option<Vec<u8>>,
    last_modified: Option<Vec<u8>>,
    len: Option<u64>,
}

fn put(map: &mut HeaderMap, name: HeaderName, value: &Option<Vec<u8>>) {
    if let Some(v) = value
        && let Ok(v) = HeaderValue::from_bytes(v)
    {
        map.insert(name, v);
    }
}

fuzz_target!(|case: Case| {
    let mut req = HeaderMap::new();
    put(&mut req, header::RANGE, &case.range);
    put(&mut req, header::IF_RANGE, &case.if_range);
    put(&mut req, header::IF_NONE_MATCH, &case.if_none_match);
    put(&mut req, header::IF_MODIFIED_SINCE, &case.if_modified_since);
    put(&mut req, header::IF_MATCH, &case.if_match);
    put(&mut req, header::IF_UNMODIFIED_SINCE, &case.if_unmodified_since);
    let mut stored = HeaderMap::new();
    put(&mut stored, header::ETAG, &case.etag);
    put(&mut stored, header::LAST_MODIFIED, &case.last_modified);
    let method = if case.head { Method::HEAD } else { Method::GET };
    match plan(&method, &req, &stored, case.len) {
        Plan::Full => {}
        Plan::Range(start, end) => {
            let len = case.len.expect("a range of a body of unknown length");
            assert!(start <= end && end < len, "{start}-{end} of {len}");
            assert!(req.contains_key(header::RANGE));
        }
        Plan::Unsatisfiable => {
            assert!(case.len.is_some() && req.contains_key(header::RANGE));
        }
        Plan::Status(StatusCode::NOT_MODIFIED) => {
            assert!(
                req.contains_key(header::IF_NONE_MATCH)
                    || req.contains_key(header::IF_MODIFIED_SINCE)
            );
        }
        Plan::Status(StatusCode::PRECONDITION_FAILED) => {
            assert!(
                req.contains_key(header::IF_MATCH)
                    || req.contains_key(header::IF_UNMODIFIED_SINCE)
            );
        }
        Plan::Status(other) => panic!("a plan answered {other}"),
    }
});
