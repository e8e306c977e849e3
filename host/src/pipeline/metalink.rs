//! `FILE.meta4` below a mirror: the RFC 5854 document of a file the
//! replica holds complete, made by Cistern from its metadata and the
//! mirror set (see [`crate::serve::metalink`]).

use crate::body::ClientBody;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use super::{Answer, Proxy};
use crate::body;
use crate::fetch::MirrorSet;
use crate::serve::metalink::{META4_TYPE, meta4_document};
use crate::store::CacheKey;

impl Proxy {
    /// Answers a GET or HEAD of `file` + `.meta4` on `set`: the document
    /// when the replica holds `file` complete, else 404 (Cistern describes
    /// only what it can vouch for: the size and digest of its own copy).
    pub(super) fn meta4(&self, req: &Request<ClientBody>, set: &MirrorSet, file: &str) -> Answer {
        let key = match set.url(0, file).map(|u| CacheKey::from_uri(&u)) {
            Ok(Ok(key)) => key,
            Ok(Err(e)) => {
                return Answer::local(body::text(StatusCode::BAD_REQUEST, format!("bad URL: {e}")));
            }
            Err(e) => return Answer::local(body::text(StatusCode::BAD_REQUEST, e.to_string())),
        };
        let Some(replica) = self.engine.store().peek(&key).filter(|r| r.meta.in_tree()) else {
            return Answer::local(body::text(
                StatusCode::NOT_FOUND,
                format!(
                    "no Metalink for {file}: the replica does not hold it complete (fetch it first)"
                ),
            ));
        };
        // Cistern's own URL of the file, by the name the client used.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("localhost");
        let own = format!("http://{host}{}{file}", set.prefix);
        let doc = meta4_document(&replica, set, file, &own);
        let len = doc.len();
        let mut resp = Response::new(if req.method() == Method::HEAD {
            body::empty()
        } else {
            body::full(doc)
        });
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(META4_TYPE));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        // The mirrors listed follow their health: clients and caches ask again.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Answer::local(resp)
    }
}
