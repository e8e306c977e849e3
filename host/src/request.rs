//! Checks that a client's request is well-formed before it is routed:
//! exactly one valid `Host` (RFC 9112 §3.2, RFC 9113 §8.3.1) and no body on
//! a GET or HEAD. Both are about the request meaning one thing to every
//! party: a `Host` the router reads one way and the origin another, or a
//! body the cache ignores but an upstream connection would frame, lets one
//! client's request decide what another receives.

use http::uri::Scheme;
use http::{HeaderValue, Method, Request, Version, header};
use http_body::Body;

/// Why a request is refused with 400 before it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// HTTP/1.1 makes `Host` mandatory (RFC 9112 §3.2).
    #[error("bad request: an HTTP/1.1 request needs a Host header")]
    MissingHost,
    /// More than one `Host` line: which one names the target is ambiguous.
    #[error("bad request: more than one Host header")]
    DuplicateHost,
    /// `Host` is not `host[:port]`.
    #[error("bad request: the Host header is not a valid host[:port]")]
    InvalidHost,
    /// HTTP/2: `Host` names another entity than `:authority`.
    #[error("bad request: the Host header disagrees with :authority")]
    HostMismatch,
    /// A GET or HEAD with content. The cache keys a GET on its URL, so a
    /// body would be either dropped (and its framing header left for the
    /// upstream connection to misread) or silently part of the answer.
    #[error(
        "bad request: a {0} request must not carry a body (a shared cache cannot key on it); send no body, or Content-Length: 0"
    )]
    BodyOnSafeMethod(&'static str),
}

/// Checks `req` as received from a client; on `Err` the caller answers 400
/// with the error's text. Allocates nothing.
pub fn check<B: Body>(req: &Request<B>) -> Result<(), RequestError> {
    check_host(req)?;
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => return Ok(()),
    };
    // Covers every framing: a Content-Length above 0 or chunked on
    // HTTP/1, DATA frames on HTTP/2. `Content-Length: 0` is no body and
    // passes; the header itself is never sent upstream (the fetch engine
    // frames upstream requests from the body it sends).
    if req.body().is_end_stream() {
        Ok(())
    } else {
        Err(RequestError::BodyOnSafeMethod(method))
    }
}

fn check_host<B>(req: &Request<B>) -> Result<(), RequestError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(RequestError::DuplicateHost);
    }
    let Some(host) = host else {
        // HTTP/1.0 may omit Host; HTTP/2 names the target in :authority.
        // A CONNECT's target is an authority already, and clients that
        // leave Host out of it exist (Go's server makes the same
        // exception).
        return if req.version() == Version::HTTP_11 && req.method() != Method::CONNECT {
            Err(RequestError::MissingHost)
        } else {
            Ok(())
        };
    };
    let (name, port) = split_host(host).ok_or(RequestError::InvalidHost)?;
    // HTTP/1 absolute-form: the proxy ignores Host and uses the target's
    // authority (RFC 9112 §3.2.2), which the router does. HTTP/2: the two
    // must name one entity (RFC 9113 §8.3.1).
    if req.version() == Version::HTTP_2
        && let Some(authority) = req.uri().authority()
    {
        let default = if req.uri().scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        };
        let same_name = authority
            .host()
            .as_bytes()
            .eq_ignore_ascii_case(name.as_bytes());
        let same_port = authority.port_u16().unwrap_or(default) == port.unwrap_or(default);
        if !(same_name && same_port) {
            return Err(RequestError::HostMismatch);
        }
    }
    Ok(())
}

/// The pieces `uri`'s `Display` writes, in order (empty where it has no
/// scheme, authority or query): the one definition of a URL's text that
/// [`push_uri`], [`push_uri_bytes`] and [`uri_len`] share.
#[inline]
fn uri_parts(uri: &http::Uri) -> [&str; 6] {
    let scheme = uri.scheme_str();
    let query = uri.query();
    [
        scheme.unwrap_or(""),
        if scheme.is_some() { "://" } else { "" },
        uri.authority().map_or("", |a| a.as_str()),
        uri.path(),
        if query.is_some() { "?" } else { "" },
        query.unwrap_or(""),
    ]
}

/// Appends `uri` as its `Display` writes it, without the formatting
/// machinery: a guest reading the URL does it on every request.
pub fn push_uri(out: &mut String, uri: &http::Uri) {
    for part in uri_parts(uri) {
        out.push_str(part);
    }
}

/// [`push_uri`] for bytes: the access log's line, a kept policy
/// outcome's key.
pub fn push_uri_bytes(out: &mut Vec<u8>, uri: &http::Uri) {
    let parts = uri_parts(uri);
    out.reserve(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.extend_from_slice(part.as_bytes());
    }
}

/// The length of `uri`'s text.
pub fn uri_len(uri: &http::Uri) -> usize {
    uri_parts(uri).iter().map(|p| p.len()).sum()
}

/// `uri.to_string()` by [`push_uri`], in a string of exactly its length.
pub fn uri_text(uri: &http::Uri) -> String {
    let mut text = String::with_capacity(uri_len(uri));
    push_uri(&mut text, uri);
    text
}

/// `authority.host()` and `authority.port_u16()` at once, as `http`
/// computes them, with byte scans instead of its `char` searches (the
/// router and the cache key ask both of every request).
pub fn host_port(authority: &http::uri::Authority) -> (&str, Option<u16>) {
    let text = authority.as_str();
    let bytes = text.as_bytes();
    let from = bytes
        .iter()
        .rposition(|&b| b == b'@')
        .map_or(0, |at| at + 1);
    let rest = &bytes[from..];
    let host_end = if rest.first() == Some(&b'[') {
        rest.iter()
            .position(|&b| b == b']')
            .map_or(rest.len(), |at| at + 1)
    } else {
        rest.iter().position(|&b| b == b':').unwrap_or(rest.len())
    };
    let host = &text[from..from + host_end];
    let port = bytes
        .iter()
        .rposition(|&b| b == b':')
        .and_then(|at| text[at + 1..].parse::<u16>().ok());
    (host, port)
}

/// The host and port a request names: its URI's authority, else its
/// `Host` (as [`check`] accepts it); `None` when neither names a host (no
/// `Host`, an empty one, or one [`check`] refuses).
pub fn target_host<B>(req: &Request<B>) -> Option<(&str, Option<u16>)> {
    match req.uri().authority() {
        Some(a) => Some(host_port(a)),
        None => {
            let (name, port) = split_host(req.headers().get(header::HOST)?)?;
            (!name.is_empty()).then_some((name, port))
        }
    }
}

/// Splits a `Host` value into host and port (`uri-host [":" port]`, RFC
/// 9110 §7.2), or `None` if it is not one. An empty value is valid (a
/// target URI without authority) and gives an empty host.
fn split_host(value: &HeaderValue) -> Option<(&str, Option<u16>)> {
    // One pass over the bytes: each is checked as the port's `:` is
    // looked for, and only ASCII is let through.
    let v = value.as_bytes();
    let name_end = if v.first() == Some(&b'[') {
        // IP-literal: `[` IPv6 or IPvFuture `]`.
        let close = v.iter().position(|&b| b == b']')?;
        let inner = &v[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.'))
        {
            return None;
        }
        close + 1
    } else {
        // reg-name or IPv4: unreserved, pct-encoded and sub-delims; no
        // `@` (userinfo is not allowed in Host), no `:` but the port's.
        let mut end = v.len();
        for (i, &b) in v.iter().enumerate() {
            if b == b':' {
                end = i;
                break;
            }
            if !(b.is_ascii_alphanumeric() || reg_name_symbol(b)) {
                return None;
            }
        }
        end
    };
    let port = match &v[name_end..] {
        [] | [b':'] => None,
        [b':', digits @ ..] => {
            let mut port = 0u16;
            for &d in digits {
                if !d.is_ascii_digit() {
                    return None;
                }
                port = port.checked_mul(10)?.checked_add(u16::from(d - b'0'))?;
            }
            Some(port)
        }
        _ => return None,
    };
    let name = std::str::from_utf8(&v[..name_end]).ok()?;
    if name.is_empty() && port.is_some() {
        return None;
    }
    Some((name, port))
}

/// The bytes of an RFC 3986 `reg-name` other than letters and digits:
/// unreserved punctuation, `%` of a pct-encoding, and the sub-delims.
pub(crate) fn reg_name_symbol(b: u8) -> bool {
    matches!(
        b,
        b'-' | b'.'
            | b'_'
            | b'~'
            | b'%'
            | b'!'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b';'
            | b'='
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn uri_text_is_the_uris_display_text() {
        for url in [
            "http://mirror.test/",
            "http://mirror.test",
            "https://user@mirror.test:8443/a/b%20c?x=1&y=%2F",
            "http://[::1]:3142/debian/pool/main/h/hello_2.10.deb",
            "http://m.test/?",
            "/relative/path?q",
            "/a?b=c",
            "*",
        ] {
            let uri: http::Uri = url.parse().unwrap();
            assert_eq!(uri_text(&uri), uri.to_string(), "{url}");
            let mut appended = String::from("> ");
            push_uri(&mut appended, &uri);
            assert_eq!(appended, format!("> {uri}"), "{url}");
        }
    }
    use super::*;
    use http_body_util::{Empty, Full};

    #[test]
    fn host_port_is_https() {
        for text in [
            "a.test",
            "a.test:8080",
            "A.Test:81",
            "u:p@h.test:90",
            "u@h",
            "[::1]",
            "[::1]:443",
            "u@[fe80::1]:1",
            "h:",
            "h:+80",
            "127.0.0.1:65535",
        ] {
            let a: http::uri::Authority = text.parse().unwrap();
            assert_eq!(host_port(&a), (a.host(), a.port_u16()), "{text}");
        }
    }

    #[test]
    fn target_host_is_the_authority_else_the_host_header() {
        let target = |uri: &str, hosts: &[&str]| {
            let r = req(Version::HTTP_11, Method::GET, uri, hosts);
            target_host(&r).map(|(h, p)| (h.to_owned(), p))
        };
        let named = |h: &str, p: Option<u16>| Some((h.to_owned(), p));
        assert_eq!(target("/x", &["a.test"]), named("a.test", None));
        assert_eq!(target("/x", &["A.Test:8080"]), named("A.Test", Some(8080)));
        assert_eq!(target("/x", &["[::1]:443"]), named("[::1]", Some(443)));
        assert_eq!(
            target("http://b.test:81/x", &["a.test"]),
            named("b.test", Some(81))
        );
        assert_eq!(target("/x", &[]), None);
        assert_eq!(target("/x", &[""]), None);
        assert_eq!(target("/x", &["u@a.test"]), None);
        assert_eq!(target("/x", &["a.test:99999"]), None);
    }

    fn req(
        version: Version,
        method: Method,
        uri: &str,
        hosts: &[&str],
    ) -> Request<Empty<&'static [u8]>> {
        let mut b = Request::builder().version(version).method(method).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(Empty::new()).unwrap()
    }

    #[test]
    fn host_rules_of_http1() {
        use RequestError::*;
        let v11 = Version::HTTP_11;
        assert_eq!(check(&req(v11, Method::GET, "/", &["a.org"])), Ok(()));
        assert_eq!(check(&req(v11, Method::GET, "/", &[])), Err(MissingHost));
        assert_eq!(check(&req(Version::HTTP_10, Method::GET, "/", &[])), Ok(()));
        assert_eq!(check(&req(v11, Method::CONNECT, "a.org:443", &[])), Ok(()));
        assert_eq!(
            check(&req(Version::HTTP_10, Method::GET, "/", &["a", "a"])),
            Err(DuplicateHost)
        );
        // Absolute-form: Host is ignored, but must still be valid.
        assert_eq!(
            check(&req(v11, Method::GET, "http://a.org/", &["b.org"])),
            Ok(())
        );
        assert_eq!(
            check(&req(v11, Method::GET, "http://a.org/", &[])),
            Err(MissingHost)
        );
    }

    /// The one-pass `split_host` against the plain reading of the rules
    /// it replaced, on every value of up to four pieces drawn from names,
    /// brackets, colons, digits and bytes a host never holds.
    #[test]
    fn split_host_agrees_with_the_plain_reading() {
        fn plain(v: &HeaderValue) -> Option<(&str, Option<u16>)> {
            let v = v.to_str().ok()?;
            let (name, port) = if v.starts_with('[') {
                let close = v.find(']')?;
                let inner = &v[1..close];
                if inner.is_empty()
                    || !inner
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.'))
                {
                    return None;
                }
                (&v[..=close], &v[close + 1..])
            } else {
                let end = v.find(':').unwrap_or(v.len());
                let name = &v[..end];
                if !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || reg_name_symbol(b))
                {
                    return None;
                }
                (name, &v[end..])
            };
            let port = match port {
                "" | ":" => None,
                p => {
                    let digits = p.strip_prefix(':')?;
                    if !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    Some(digits.parse().ok()?)
                }
            };
            if name.is_empty() && port.is_some() {
                return None;
            }
            Some((name, port))
        }
        const PIECES: [&[u8]; 13] = [
            b"a",
            b"[",
            b"]",
            b":",
            b"::1",
            b"8",
            b"65535",
            b"65536",
            b".",
            b"@",
            b"%",
            b"+",
            b"\xc3\xa9",
        ];
        let mut seen = 0;
        for len in 0..=4u32 {
            for n in 0..PIECES.len().pow(len) {
                let mut k = n;
                let mut bytes = Vec::new();
                for _ in 0..len {
                    bytes.extend_from_slice(PIECES[k % PIECES.len()]);
                    k /= PIECES.len();
                }
                let Ok(v) = HeaderValue::from_bytes(&bytes) else {
                    continue;
                };
                assert_eq!(
                    split_host(&v),
                    plain(&v),
                    "{:?}",
                    String::from_utf8_lossy(&bytes)
                );
                seen += 1;
            }
        }
        assert!(seen > 30_000, "{seen}");
    }

    #[test]
    fn host_values() {
        for ok in [
            "",
            "a.org",
            "A.ORG:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:80",
            "a.org:",
        ] {
            let v = HeaderValue::from_static(ok);
            assert!(split_host(&v).is_some(), "{ok:?}");
        }
        for bad in [
            "a b",
            "u@a.org",
            "a.org:x",
            "a.org:99999",
            "[::1",
            "[]",
            ":80",
            "a:1:2",
            "a/b",
        ] {
            let v = HeaderValue::from_static(bad);
            assert!(split_host(&v).is_none(), "{bad:?}");
        }
        let v = HeaderValue::from_static("[::1]:81");
        assert_eq!(split_host(&v), Some(("[::1]", Some(81))));
    }

    #[test]
    fn http2_host_must_match_authority() {
        let h2 = Version::HTTP_2;
        let get = |host: &[&str]| check(&req(h2, Method::GET, "http://a.org/x", host));
        assert_eq!(get(&[]), Ok(()));
        assert_eq!(get(&["A.org"]), Ok(()));
        assert_eq!(get(&["a.org:80"]), Ok(()));
        assert_eq!(get(&["b.org"]), Err(RequestError::HostMismatch));
        assert_eq!(get(&["a.org:81"]), Err(RequestError::HostMismatch));
        let tls = check(&req(h2, Method::GET, "https://a.org/x", &["a.org:443"]));
        assert_eq!(tls, Ok(()));
    }

    #[test]
    fn safe_methods_carry_no_body() {
        let with_body = |m: Method| {
            Request::builder()
                .method(m)
                .header(header::HOST, "a.org")
                .body(Full::new(&b"x"[..]))
                .unwrap()
        };
        assert_eq!(
            check(&with_body(Method::GET)),
            Err(RequestError::BodyOnSafeMethod("GET"))
        );
        assert_eq!(
            check(&with_body(Method::HEAD)),
            Err(RequestError::BodyOnSafeMethod("HEAD"))
        );
        assert_eq!(check(&with_body(Method::POST)), Ok(()));
        assert_eq!(
            check(&req(Version::HTTP_11, Method::GET, "/", &["a"])),
            Ok(())
        );
    }
}
