//! `mirror NAME { … }`: a path prefix served from a set of upstreams.

use http::Uri;
use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::policy::policy_list;
use super::top::Top;
use super::upstream_block::{stale_if_error, stale_while_revalidate, upstream_entry};
use super::walker::{Cx, Rule, Shape, many, once};
use crate::config::model::*;

struct MirrorDraft {
    prefix: Option<(String, SourceSpan)>,
    /// Any `upstream` node at all, valid or not: a bad one is already
    /// reported and must not also read as "no upstream".
    upstream_given: bool,
    upstreams: Vec<Uri>,
    refs: Vec<(String, SourceSpan)>,
    stale: StaleRules,
}

const MIRROR: &[Rule<MirrorDraft>] = &[
    once("prefix", mirror_prefix),
    many("upstream", mirror_upstream),
    once("policies", |cx, n, d| d.refs = policy_list(cx, n)),
    once("stale-if-error", |cx, n, d| {
        stale_if_error(cx, n, &mut d.stale)
    }),
    once("stale-while-revalidate", |cx, n, d| {
        stale_while_revalidate(cx, n, &mut d.stale)
    }),
];

pub(super) fn mirror(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &[],
            children: true,
            usage: "mirror \"debian\" { upstream \"http://deb.debian.org/debian/\" }",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let mut d = MirrorDraft {
        prefix: None,
        upstream_given: false,
        upstreams: Vec::new(),
        refs: Vec::new(),
        stale: StaleRules::default(),
    };
    cx.children(node, MIRROR, &mut d);
    let Some(name) = name else { return };
    let name_span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if let Some(first) = top.mirror_names.get(name) {
        let line = cx.line_of(*first);
        cx.error(
            name_span,
            format!("mirror {name:?} is declared twice (first on line {line})"),
        );
        return;
    }
    top.mirror_names.insert(name.to_owned(), name_span);
    if !d.upstream_given {
        cx.error(name_span, format!("mirror {name:?} has no upstream"))
            .help =
            Some("add at least one: upstream \"https://mirror.example.org/path/\"".to_owned());
    }
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
    top.policy_refs.extend(d.refs.iter().cloned());
    top.mirrors.push(MirrorConfig {
        name: name.to_owned(),
        prefix,
        upstreams: d.upstreams,
        policies: d.refs.into_iter().map(|(n, _)| n).collect(),
        stale: d.stale,
    });
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

fn mirror_upstream(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    d.upstream_given = true;
    upstream_entry(
        cx,
        node,
        "upstream \"http://deb.debian.org/debian/\"",
        "http://deb.debian.org/debian/",
        &mut d.upstreams,
    );
}
