//! What the blocks backed by upstreams (`mirror`, `site`) share: the
//! `upstream` URLs and the stale rules.

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use kdl::KdlNode;

use super::walker::{Cx, Shape, duration_node};
use crate::config::model::*;

/// `stale-if-error "1d"` (zero turns it off).
pub(super) fn stale_if_error(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.if_error = d;
    }
}

/// `stale-while-revalidate "30s"` (zero turns it off).
pub(super) fn stale_while_revalidate(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.while_revalidate = d;
    }
}

/// One `upstream "URL"` child of a mirror or a site, added to `upstreams`
/// unless it is invalid or listed twice. `usage` and `example` are shown in
/// messages.
pub(super) fn upstream_entry(
    cx: &mut Cx<'_>,
    node: &KdlNode,
    usage: &'static str,
    example: &str,
    upstreams: &mut Vec<Uri>,
) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &[],
            children: false,
            usage,
        },
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match upstream_url(text) {
        Ok(uri) if upstreams.contains(&uri) => {
            cx.error(arg.span(), format!("upstream {uri} is listed twice"));
        }
        Ok(uri) => upstreams.push(uri),
        Err(why) => {
            cx.error(arg.span(), format!("`upstream` {text:?} {why}"))
                .help = Some(format!("write a base URL, like \"{example}\""));
        }
    }
}

/// Validates an upstream base URL and makes its path end with `/`, so
/// joining a request's rest-of-path never glues two segments together.
fn upstream_url(text: &str) -> Result<Uri, String> {
    if !text.contains("://") {
        return Err("has no scheme: start it with http:// or https://".to_owned());
    }
    let uri: Uri = text.parse().map_err(|e| format!("is not a URL ({e})"))?;
    let scheme = match uri.scheme() {
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
        Some(s) => return Err(format!("uses {s}: only http and https are supported")),
        None => return Err("has no scheme: start it with http:// or https://".to_owned()),
    };
    let authority: Authority = match uri.authority() {
        Some(a) if !a.host().is_empty() => a.clone(),
        _ => return Err("has no host".to_owned()),
    };
    if authority.as_str().contains('@') {
        return Err(
            "carries credentials (user@host); they would end up in logs and replica paths"
                .to_owned(),
        );
    }
    if uri.port_u16() == Some(0) {
        return Err("has port 0".to_owned());
    }
    if uri.query().is_some() {
        return Err("has a query; a base URL cannot carry one".to_owned());
    }
    let mut path = uri.path().to_owned();
    if !path.ends_with('/') {
        path.push('/');
    }
    let path: PathAndQuery = path.parse().map_err(|e| format!("has a bad path ({e})"))?;
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| format!("is not a URL ({e})"))
}
