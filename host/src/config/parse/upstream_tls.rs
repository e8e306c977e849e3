//! `upstream-tls { … }`: which certificate authorities https upstreams
//! are checked against.

use kdl::KdlNode;
use miette::SourceSpan;

use super::top::Top;
use super::walker::{BLOCK, Cx, PATH_ARG, Rule, bool_node, many, once};
use crate::config::model::*;

struct TlsDraft {
    tls: UpstreamTls,
    span: SourceSpan,
}

const UPSTREAM_TLS: &[Rule<TlsDraft>] = &[
    once("system-roots", |cx, n, d| {
        if let Some(b) = bool_node(cx, n) {
            d.tls.system_roots = b;
        }
    }),
    many("ca-file", |cx, n, d| {
        let e = cx.entries(n, &PATH_ARG);
        let Some(arg) = e.arg(0) else { return };
        if let Some(path) = cx.path(e.name, arg) {
            cx.existing_file(e.name, arg, &path);
            d.tls.ca_files.push(path);
        }
    }),
];

pub(super) fn upstream_tls(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = TlsDraft {
        tls: UpstreamTls::default(),
        span: node.name().span(),
    };
    cx.children(node, UPSTREAM_TLS, &mut d);
    if !d.tls.system_roots && d.tls.ca_files.is_empty() {
        cx.error(
            d.span,
            "`upstream-tls` trusts no certificate authority: every https upstream would fail",
        )
        .help = Some("add a `ca-file \"ca.pem\"` or set `system-roots #true`".to_owned());
    }
    top.upstream_tls = d.tls;
}
