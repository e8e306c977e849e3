//! `mirror NAME { … }`: a path prefix served from a set of upstreams.

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::top::Top;
use super::upstream_block::{HasUpstreamBlock, UpstreamBlock, UpstreamHints, upstream_rules};
use super::walker::{Cx, Rule, Shape, once};
use crate::config::model::*;

/// A `mirror` block as read.
struct MirrorDraft {
    prefix: Option<(String, SourceSpan)>,
    query: QueryMode,
    upstream: UpstreamBlock,
}

impl HasUpstreamBlock for MirrorDraft {
    fn upstream_block(&mut self) -> &mut UpstreamBlock {
        &mut self.upstream
    }
}

/// A mirror's own nodes; the upstream block's follow them.
const MIRROR: &[Rule<MirrorDraft>] = &[once("prefix", mirror_prefix), once("query", mirror_query)];

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
        &Shape::named_block("mirror \"debian\" { upstream \"http://deb.debian.org/debian/\" }"),
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let mut d = MirrorDraft {
        prefix: None,
        query: QueryMode::default(),
        upstream: UpstreamBlock::new(&MIRROR_HINTS),
    };
    cx.children_with(node, MIRROR, &upstream_rules(), &mut d);
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
    });
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
