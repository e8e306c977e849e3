//! `mirror NAME { … }`: a path prefix served from a set of upstreams.

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::top::Top;
use super::upstream_block::{HasUpstreamBlock, UpstreamBlock, UpstreamHints, upstream_rules};
use super::walker::{Cx, Rule, Shape, many, once};
use crate::config::model::*;

/// A `mirror` block as read.
struct MirrorDraft {
    prefix: Option<(String, SourceSpan)>,
    query: QueryMode,
    upstream: UpstreamBlock,
    /// `serve-locally` patterns, and the first such node (an error
    /// without `mode="redirect"`).
    serve_locally: Vec<String>,
    serve_locally_span: Option<SourceSpan>,
}

impl HasUpstreamBlock for MirrorDraft {
    fn upstream_block(&mut self) -> &mut UpstreamBlock {
        &mut self.upstream
    }
}

/// A mirror's own nodes; the upstream block's follow them.
const MIRROR: &[Rule<MirrorDraft>] = &[
    once("prefix", mirror_prefix),
    once("query", mirror_query),
    many("serve-locally", serve_locally),
];

/// How a mirror's upstreams read in messages.
const MIRROR_HINTS: UpstreamHints = UpstreamHints {
    block: "mirror",
    usage: "upstream \"http://deb.debian.org/debian/\"",
    example: "http://deb.debian.org/debian/",
    missing: "https://mirror.example.org/path/",
};

pub(super) fn mirror(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            props: &["mode"],
            ..Shape::named_block(
                "mirror \"debian\" mode=\"proxy\" { upstream \"http://deb.debian.org/debian/\" }",
            )
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let redirect = e.prop("mode").map(|m| mirror_mode(cx, m));
    let mut d = MirrorDraft {
        prefix: None,
        query: QueryMode::default(),
        upstream: UpstreamBlock::new(&MIRROR_HINTS),
        serve_locally: Vec::new(),
        serve_locally_span: None,
    };
    cx.children_with(node, MIRROR, &upstream_rules(), &mut d);
    let redirect = match (redirect, d.serve_locally_span) {
        (Some(Some(true)), _) => Some(RedirectConfig {
            serve_locally: std::mem::take(&mut d.serve_locally),
        }),
        (Some(None), _) => return,
        (_, Some(span)) => {
            cx.error(
                span,
                "`serve-locally` applies only to a mirror in mode=\"redirect\"",
            )
            .help =
                Some("write `mirror \"NAME\" mode=\"redirect\" { … }`, or remove it".to_owned());
            return;
        }
        _ => None,
    };
    let Some(name) = name else { return };
    let name_span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if !cx.declare(&mut top.mirror_names, "mirror", name, name_span) {
        return;
    }
    d.upstream.require_upstream(cx, name, name_span);
    // The default prefix is the name, so `mirror "debian"` serves /debian/.
    let (prefix, prefix_span) = d.prefix.unwrap_or_else(|| (format!("/{name}/"), name_span));
    if let Some(first) = top.mirror_prefixes.get(&prefix) {
        let line = cx.line_of(*first);
        cx.error(
            prefix_span,
            format!("prefix {prefix:?} is already served by the mirror on line {line}"),
        );
    } else {
        top.mirror_prefixes.insert(prefix.clone(), prefix_span);
    }
    let u = d.upstream.finish(&mut top.policy_refs);
    top.mirrors.push(MirrorConfig {
        name: name.to_owned(),
        prefix,
        upstreams: u.upstreams,
        policies: u.policies,
        stale: u.stale,
        forwarded_for: u.forwarded_for,
        weights: u.weights,
        health: u.health,
        query: d.query,
        redirect,
    });
}

/// `mode="proxy" | "redirect"` on a mirror: `Some(true)` for redirect,
/// `None` after an error.
fn mirror_mode(cx: &mut Cx<'_>, entry: &KdlEntry) -> Option<bool> {
    match cx.string("mode", entry)? {
        "proxy" => Some(false),
        "redirect" => Some(true),
        other => {
            cx.error(
                entry.span(),
                format!("`mode`: unknown mirror mode {other:?}"),
            )
            .help = Some(
                "use \"proxy\" (Cistern fetches and serves) or \"redirect\" (302 to a mirror)"
                    .to_owned(),
            );
            None
        }
    }
}

/// `serve-locally "InRelease" "Packages*" …`: file-name patterns (`*`,
/// `?`) served by Cistern itself in redirect mode.
fn serve_locally(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    d.serve_locally_span.get_or_insert(node.name().span());
    let e = cx.entries(
        node,
        &Shape::leaf((1, usize::MAX), "serve-locally \"InRelease\" \"Packages*\""),
    );
    for arg in &e.args {
        let Some(text) = cx.string(e.name, arg) else {
            continue;
        };
        let problem = if text.is_empty() {
            Some("is empty")
        } else if text.contains('/') {
            Some("holds a '/': patterns match a file's name, not its path")
        } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("holds spaces or control characters")
        } else {
            None
        };
        match problem {
            Some(why) => {
                cx.error(
                    arg.span(),
                    format!("`serve-locally` pattern {text:?} {why}"),
                )
                .help = Some("write a file name with `*` and `?`, like \"Packages*\"".to_owned());
            }
            None => d.serve_locally.push(text.to_owned()),
        }
    }
}

/// `query "ignore" | "key" | "pass"`.
fn mirror_query(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "query \"ignore\"  // or \"key\", \"pass\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    d.query = match text {
        "ignore" => QueryMode::Ignore,
        "key" => QueryMode::Key,
        "pass" => QueryMode::Pass,
        other => {
            cx.error(arg.span(), format!("`query`: unknown mode {other:?}"))
                .help = Some(
                "use \"ignore\" (dropped), \"key\" (cached per query) or \"pass\" (not cached)"
                    .to_owned(),
            );
            return;
        }
    };
}

fn mirror_prefix(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "prefix \"/debian/\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    let problem = if !text.starts_with('/') {
        Some("must start with '/'")
    } else if text.contains(['?', '#']) || text.chars().any(char::is_whitespace) {
        Some("is a path: it cannot hold '?', '#' or spaces")
    } else if text.contains("//") {
        Some("has an empty segment (\"//\")")
    } else if text.split('/').any(|seg| seg == "." || seg == "..") {
        Some("cannot hold '.' or '..' segments")
    } else {
        None
    };
    if let Some(why) = problem {
        cx.error(arg.span(), format!("`prefix` {text:?} {why}"))
            .help = Some("write it as a path, like \"/debian/\"".to_owned());
        return;
    }
    // A prefix is a directory: "/debian" must not also match "/debian-security".
    let mut prefix = text.to_owned();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    d.prefix = Some((prefix, arg.span()));
}
