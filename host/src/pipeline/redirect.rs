//! Redirect mode (`mirror "NAME" mode="redirect"`): a GET or HEAD for a
//! file answers `302 Found` to the file on the mirror the set chooses
//! (healthy, weighted, sticky per file, not known to lack it), or, with
//! `Accept: application/json` or `?json`, that choice and the
//! alternatives as JSON, or with `?mirrorlist` an HTML page of them. No
//! upstream request is made on the way: the answer is the set's choice.
//! Afterwards a `HEAD` of the file on the chosen mirror may go out in the
//! background (once per file and mirror for a while, rate-limited: see
//! [`crate::fetch::mirror`]), so a partial mirror's 404 is learnt and the
//! next client is sent elsewhere. Files that change in place and
//! directories are not redirected: they take the proxy path like any
//! mirror's.
//!
//! When no mirror is enabled the answer is `503` with `Retry-After` (the
//! time to the first retry): sending clients to a mirror that failed
//! would fail them anyway, and proxying every file instead would turn a
//! redirector sized for 302s into a proxy of all its traffic. When every
//! enabled mirror is known to lack the file the answer is `404`.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use percent_encoding::percent_decode_str;
use serde::Serialize;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use super::{Answer, Proxy};
use crate::body::html_escape as esc;
use crate::body::{self, ProxyBody};
use crate::config::QueryMode;
use crate::fetch::MirrorSet;
use crate::fetch::mirror::{FileKey, Ranked, RankedState, Redirection};

/// What a client asked a redirecting mirror for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// The file: a 302.
    Redirect,
    /// `Accept: application/json` or `?json`.
    Json,
    /// `?mirrorlist`.
    MirrorList,
}

/// The JSON answer (`?json`), like Mirrorbits' `?json`.
#[derive(Debug, Serialize)]
struct Choice<'a> {
    /// The mirror block's name.
    mirror: &'a str,
    /// The file's path on Cistern, decoded.
    file: String,
    /// The chosen mirror, or `null` when none can serve it.
    chosen: Option<Alternative>,
    /// The others, in the order they would be chosen.
    alternatives: Vec<Alternative>,
}

/// One mirror for a file.
#[derive(Debug, Serialize)]
struct Alternative {
    /// Its base URL.
    upstream: String,
    /// The file's URL there.
    url: String,
    /// `weight=` from the config.
    weight: u32,
    /// Its share of new files now, 0 to 1.
    share: f64,
    /// `up`, `missing` (answered 404 for this file recently) or `down`.
    state: &'static str,
}

/// What a mirror request becomes in [`Proxy::redirect`].
pub(super) enum Redirected {
    /// Answered here: a 302, JSON, a mirror list, or why there is none.
    Answered(Answer),
    /// Proxied as on any mirror (the path below the prefix, given back):
    /// the mirror proxies, or this request is one Cistern serves itself.
    Proxy(String),
}

impl Proxy {
    /// Answers a GET or HEAD for `rest` below a redirecting mirror, or
    /// gives `rest` back when Cistern serves that request itself.
    pub(super) fn redirect(
        &self,
        method: &Method,
        headers: &HeaderMap,
        set: &Arc<MirrorSet>,
        rest: String,
    ) -> Redirected {
        let Some(redirect) = &set.redirect else {
            return Redirected::Proxy(rest);
        };
        if *method != Method::GET && *method != Method::HEAD {
            return Redirected::Proxy(rest);
        }
        let (path, query) = rest.split_once('?').unwrap_or((&rest, ""));
        if redirect.serves_locally(path) {
            return Redirected::Proxy(rest);
        }
        let mut form = if wants_json(headers) {
            Form::Json
        } else {
            Form::Redirect
        };
        // Our own parameters are read here, before `query "ignore"` would
        // drop them; the others follow the mirror's query mode.
        let mut kept = String::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split('=').next() {
                Some("json") => form = Form::Json,
                Some("mirrorlist") => form = Form::MirrorList,
                _ => {
                    kept.push(if kept.is_empty() { '?' } else { '&' });
                    kept.push_str(param);
                }
            }
        }
        if !kept.is_empty() && set.query == QueryMode::Ignore {
            kept.clear();
            self.engine.metrics().query_dropped();
        }
        let file = FileKey::of(path);
        // Most redirects keep no query: the path itself, not a copy.
        let target: Cow<'_, str> = if kept.is_empty() {
            Cow::Borrowed(path)
        } else {
            let mut t = String::with_capacity(path.len() + kept.len());
            t.push_str(path);
            t.push_str(&kept);
            Cow::Owned(t)
        };
        let bad = |e: crate::fetch::mirror::MirrorPathError| {
            Redirected::Answered(Answer::local(body::text(
                StatusCode::BAD_REQUEST,
                e.to_string(),
            )))
        };
        let response = if form == Form::Redirect {
            // The choice alone: the others' order is the listings'.
            match set.redirect_choice(file) {
                Redirection::To(index) => {
                    self.check(set, index, file, path, &target);
                    let up = &set.upstreams[index];
                    // The body is `Found: URL`; `Location` is a slice of it.
                    let mut text =
                        String::with_capacity(FOUND.len() + up.base_str().len() + target.len() + 1);
                    text.push_str(FOUND);
                    if let Err(e) = set.push_url(index, &target, &mut text) {
                        return bad(e);
                    }
                    self.engine.metrics().redirects().record(
                        self.clock.now(),
                        &set.name,
                        up.base_str(),
                        path,
                    );
                    found(text)
                }
                Redirection::Missing => body::text(
                    StatusCode::NOT_FOUND,
                    "no enabled mirror has this file (each answered 404 recently)",
                ),
                Redirection::Down => {
                    let mut resp = body::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no mirror is available: every one is disabled after failures",
                    );
                    resp.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(set.retry_in().as_secs()),
                    );
                    resp
                }
            }
        } else {
            let order = set.redirect_order(path);
            let chosen = order.iter().position(|r| r.state == RankedState::Usable);
            if let Some(at) = chosen {
                self.check(set, order[at].index, file, path, &target);
            }
            let urls: Vec<String> = match order
                .iter()
                .map(|r| set.url(r.index, &target).map(|u| u.to_string()))
                .collect()
            {
                Ok(urls) => urls,
                Err(e) => return bad(e),
            };
            if form == Form::Json {
                json(set, path, &order, &urls, chosen)
            } else {
                mirror_list(set, path, &order, &urls, chosen)
            }
        };
        Redirected::Answered(Answer::local(vary(response)))
    }
}

impl Proxy {
    /// After choosing upstream `index` for `path` (whose key is `file`;
    /// `target` is it with the query kept): nothing may wait for the
    /// mirror here, so whether it has the file is learnt in the
    /// background, for the next client.
    fn check(&self, set: &Arc<MirrorSet>, index: usize, file: FileKey, path: &str, target: &str) {
        self.engine.check_redirected(set, index, file, path, target);
    }
}

/// Whether the client prefers JSON: an `Accept` entry `application/json`
/// whose `q` is not 0 (`*/*` does not count: browsers send it).
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        // Most clients send `*/*` or a browser's list: no `j`, no JSON,
        // and no list to split.
        .filter(|v| v.bytes().any(|b| b | 0x20 == b'j'))
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/json")
                && !parts.any(|p| {
                    let p = p.trim();
                    (p.starts_with("q=") || p.starts_with("Q="))
                        && p[2..].trim().parse::<f32>().is_ok_and(|q| q == 0.0)
                })
        })
}

/// What a 302's body says before the URL.
const FOUND: &str = "Found: ";

/// `302 Found` to the URL in `text` (`Found: URL`), with that text as a
/// tiny body for clients that show it.
fn found(mut text: String) -> Response<ProxyBody> {
    let end = text.len();
    text.push('\n');
    let text = bytes::Bytes::from(text);
    // `Location` shares the body's buffer: no copy.
    let location = HeaderValue::from_maybe_shared(text.slice(FOUND.len()..end));
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = location {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The headers every redirect-mode answer carries: the choice follows
/// the mirrors' health from one request to the next, so nobody keeps it
/// (a disabled mirror must stop getting clients at once; a 302 costs one
/// small round trip), and it differs by `Accept`.
fn vary(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VARY, HeaderValue::from_static("accept"));
    resp
}

/// The file's path on Cistern, percent-decoded, for people to read.
fn display_path(set: &MirrorSet, path: &str) -> String {
    let mut out = set.prefix.clone();
    out.push_str(&percent_decode_str(path).decode_utf8_lossy());
    out
}

fn alternative(set: &MirrorSet, r: &Ranked, url: &str) -> Alternative {
    let up = &set.upstreams[r.index];
    Alternative {
        upstream: up.base.to_string(),
        url: url.to_owned(),
        weight: up.weight,
        share: r.share,
        state: r.state.as_str(),
    }
}

fn json(
    set: &MirrorSet,
    path: &str,
    order: &[Ranked],
    urls: &[String],
    chosen: Option<usize>,
) -> Response<ProxyBody> {
    let choice = Choice {
        mirror: &set.name,
        file: display_path(set, path),
        chosen: chosen.map(|at| alternative(set, &order[at], &urls[at])),
        alternatives: order
            .iter()
            .zip(urls)
            .enumerate()
            .filter(|(i, _)| Some(*i) != chosen)
            .map(|(_, (r, url))| alternative(set, r, url))
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&choice).unwrap_or_default();
    text.push('\n');
    let mut resp = Response::new(body::full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn mirror_list(
    set: &MirrorSet,
    path: &str,
    order: &[Ranked],
    urls: &[String],
    chosen: Option<usize>,
) -> Response<ProxyBody> {
    let file = esc(&display_path(set, path));
    let mut b = String::with_capacity(1024);
    let _ = write!(
        b,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Mirrors of {file}</title></head><body>\n<h1>Mirrors of <code>{file}</code></h1>\n\
         <table><thead><tr><th></th><th>Mirror</th><th>State</th><th>Weight</th><th>Share</th></tr></thead><tbody>\n"
    );
    for (i, (r, url)) in order.iter().zip(urls).enumerate() {
        let up = &set.upstreams[r.index];
        let _ = writeln!(
            b,
            "<tr><td>{mark}</td><td><a href=\"{url}\">{url}</a></td><td>{state}</td>\
             <td>{weight}</td><td>{share:.0} %</td></tr>",
            mark = if Some(i) == chosen { "chosen" } else { "" },
            url = esc(url),
            state = r.state.as_str(),
            weight = up.weight,
            share = r.share * 100.0,
        );
    }
    b.push_str("</tbody></table>\n</body></html>\n");
    let mut resp = Response::new(body::full(b));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn json_is_wanted_only_when_named() {
        assert!(wants_json(&accept("application/json")));
        assert!(wants_json(&accept("text/html, Application/JSON;q=0.9")));
        assert!(!wants_json(&accept("application/json;q=0")));
        assert!(!wants_json(&accept("text/html,*/*;q=0.8")));
        assert!(!wants_json(&HeaderMap::new()));
    }
}
