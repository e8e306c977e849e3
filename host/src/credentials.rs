//! Credentials in a request's URL (`http://user:pass@host/…`, as an
//! `http_proxy=` client may send it): taken out of the request target
//! before anything logs, keys, stores or shows it, and kept aside so that a
//! forward-proxied request can send them upstream as `Authorization: Basic`,
//! as curl and wget do when given such a URL.

use std::fmt;

use base64::Engine as _;
use http::uri::{Authority, Parts};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, header};

/// The userinfo of a request's URL, as the `Authorization: Basic` value it
/// stands for. Kept in the request's extensions between [`take`] and
/// [`apply`]; its `Debug` never shows the value.
#[derive(Clone)]
pub struct UrlCredentials(HeaderValue);

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UrlCredentials([redacted])")
    }
}

impl UrlCredentials {
    /// The `Authorization` value for `userinfo` (`user[:password]`, still
    /// percent-encoded): user and password decoded, joined with `:`, in
    /// base64 (RFC 7617). `None` for an empty userinfo (`http://@host/`),
    /// which names nobody.
    fn from_userinfo(userinfo: &str) -> Option<UrlCredentials> {
        if userinfo.is_empty() {
            return None;
        }
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let mut plain = percent_decode(user);
        plain.push(b':');
        plain.extend(percent_decode(password));
        let mut value = String::from("Basic ");
        base64::engine::general_purpose::STANDARD.encode_string(&plain, &mut value);
        let mut value = HeaderValue::try_from(value).ok()?;
        value.set_sensitive(true);
        Some(UrlCredentials(value))
    }
}

/// A target whose URL could not be rebuilt without its userinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request: the URL's host is not valid without its user information")]
pub struct UnusableUrl;

/// Removes the userinfo from `req`'s target, whatever the route, so that
/// logs, cache keys, metadata and policies only ever see the URL without
/// it; the credentials go into the request's extensions for [`apply`].
/// On `Err` the target is `/` (the caller answers 400; nothing of the URL
/// is left to log). Allocates only when there is userinfo.
pub fn take<B>(req: &mut Request<B>) -> Result<(), UnusableUrl> {
    let Some((userinfo, host_port)) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().rsplit_once('@'))
    else {
        return Ok(());
    };
    // The `http` crate splits the userinfo off at the last `@`, as here.
    let credentials = UrlCredentials::from_userinfo(userinfo);
    let authority = Authority::try_from(host_port).ok();
    let mut parts = Parts::from(std::mem::take(req.uri_mut()));
    parts.authority = authority;
    // What follows the `@` was part of a valid authority, so it parses
    // alone; should it not, nothing of the URL is kept.
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| UnusableUrl)?;
    if let Some(c) = credentials {
        req.extensions_mut().insert(c);
    }
    Ok(())
}

/// For a request Cistern forwards to the host its URL named: turns the
/// URL's credentials (see [`take`]) into `Authorization: Basic`, unless the
/// request already carries an `Authorization` header, which wins (curl
/// does the same with `-H`).
pub fn apply<B>(req: &mut Request<B>) {
    let Some(UrlCredentials(value)) = req.extensions_mut().remove::<UrlCredentials>() else {
        return;
    };
    if !req.headers().contains_key(header::AUTHORIZATION) {
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
}

/// The request headers that carry credentials: never written to a log,
/// nor into stored metadata.
pub const CREDENTIAL_HEADERS: [HeaderName; 2] =
    [header::AUTHORIZATION, header::PROXY_AUTHORIZATION];

/// The header that carries a fleet's secret on peer requests (`cluster`).
pub const PEER_SECRET_HEADER: HeaderName = HeaderName::from_static("cistern-peer-secret");

/// Headers whose values are secrets: never written to a log.
fn is_secret(name: &HeaderName) -> bool {
    CREDENTIAL_HEADERS.contains(name)
        || name == header::COOKIE
        || name == header::SET_COOKIE
        || name == PEER_SECRET_HEADER
}

/// A header map for the log: like its `Debug`, but the values of
/// `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie` and
/// `Cistern-Peer-Secret` are replaced by `[redacted]`.
pub struct Redacted<'a>(pub &'a HeaderMap);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// One value as the log shows it.
        enum Shown<'v> {
            Value(&'v HeaderValue),
            Hidden,
        }
        impl fmt::Debug for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    Shown::Value(v) => fmt::Debug::fmt(v, f),
                    Shown::Hidden => f.write_str("[redacted]"),
                }
            }
        }
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let shown = if is_secret(name) {
                    Shown::Hidden
                } else {
                    Shown::Value(value)
                };
                (name, shown)
            }))
            .finish()
    }
}

/// Decodes `%XX` escapes; a `%` that starts no escape stays as it is.
fn percent_decode(text: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(text).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(target: &str) -> Request<()> {
        let mut req = Request::builder().uri(target).body(()).unwrap();
        take(&mut req).unwrap();
        req
    }

    fn basic(req: &Request<()>) -> Option<String> {
        req.extensions()
            .get::<UrlCredentials>()
            .map(|c| c.0.to_str().unwrap().to_owned())
    }

    #[test]
    fn userinfo_leaves_the_url_and_becomes_basic() {
        let req = taken("http://alice:s3cret@example.org:8080/a/b?q=1");
        assert_eq!(req.uri(), "http://example.org:8080/a/b?q=1");
        assert_eq!(basic(&req).as_deref(), Some("Basic YWxpY2U6czNjcmV0"));
        // A user without password, as curl sends it: `user:`.
        let req = taken("http://bob@example.org/");
        assert_eq!(req.uri(), "http://example.org/");
        assert_eq!(basic(&req).as_deref(), Some("Basic Ym9iOg=="));
        // Percent-encoded user and password are decoded first.
        let req = taken("http://a%40b:p%3aw%25@example.org/");
        assert_eq!(basic(&req).as_deref(), Some("Basic YUBiOnA6dyU="));
        // An empty userinfo names nobody, but still leaves the URL.
        let req = taken("http://@example.org/x");
        assert_eq!(req.uri(), "http://example.org/x");
        assert_eq!(basic(&req), None);
        // The last `@` ends the userinfo; CONNECT's authority-form too.
        let req = taken("http://a@b:c@example.org/");
        assert_eq!(req.uri(), "http://example.org/");
        assert_eq!(basic(&req).as_deref(), Some("Basic YUBiOmM="));
        let req = taken("u:p@example.org:443");
        assert_eq!(req.uri(), "example.org:443");
    }

    #[test]
    fn urls_without_userinfo_are_untouched() {
        for target in ["http://example.org/a@b", "/path", "http://[::1]:80/"] {
            let req = taken(target);
            assert_eq!(req.uri(), target);
            assert_eq!(basic(&req), None);
        }
    }

    #[test]
    fn an_authorization_header_wins_over_the_url() {
        let mut req = taken("http://u:p@example.org/");
        req.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        apply(&mut req);
        assert_eq!(req.headers()[header::AUTHORIZATION], "Bearer t");
        let mut req = taken("http://u:p@example.org/");
        apply(&mut req);
        assert_eq!(req.headers()[header::AUTHORIZATION], "Basic dTpw");
        assert!(req.extensions().get::<UrlCredentials>().is_none());
    }

    #[test]
    fn secrets_are_redacted_in_logs() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("sid=42"));
        h.insert(PEER_SECRET_HEADER, HeaderValue::from_static("fleet-42"));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let text = format!("{:?}", Redacted(&h));
        assert!(!text.contains("dTpw") && !text.contains("sid"), "{text}");
        assert!(!text.contains("fleet-42"), "{text}");
        assert!(text.contains("\"authorization\": [redacted]"), "{text}");
        assert!(text.contains("\"accept\": \"text/plain\""), "{text}");
    }
}
