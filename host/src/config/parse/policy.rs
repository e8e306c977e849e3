//! `policy NAME path=… { param … }` (the declarations) and `policies …`
//! (a route's references to them, checked once the file is read).

use std::time::Duration;

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::top::Top;
use super::walker::{Cx, Rule, Shape, many, once};
use crate::config::model::*;

/// Default policy wall-clock budget per hook call.
const DEFAULT_POLICY_DEADLINE: Duration = Duration::from_millis(50);
/// Default cap on a policy's linear memory.
const DEFAULT_POLICY_MEMORY: u64 = 16 << 20;
/// One WebAssembly page: no module can run with less.
const WASM_PAGE: u64 = 64 << 10;

/// Default `body-max`: a large PyPI simple page or npm packument fits.
const DEFAULT_BODY_MAX: u64 = 32 << 20;

/// What a `policy` block's children declare.
#[derive(Default)]
struct PolicyChildren {
    params: Vec<(String, String)>,
    body_types: Option<Vec<String>>,
    body_max: Option<(u64, SourceSpan)>,
}

const POLICY: &[Rule<PolicyChildren>] = &[
    many("param", policy_param),
    once("body-types", policy_body_types),
    once("body-max", policy_body_max),
];

pub(super) fn policy(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["path", "on-error", "isolation", "deadline", "memory"],
            children: true,
            usage: "policy \"distro\" path=\"builtin:distro\" on-error=\"pass\" { param \"key\" \"value\" }",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let source = match e.prop("path") {
        None => {
            cx.error(node.name().span(), "`policy` needs path=\"…\"")
                .help = Some(
                "name a module file (path=\"policies/mine.wasm\") or a built-in (path=\"builtin:distro\")"
                    .to_owned(),
            );
            None
        }
        Some(p) => policy_source(cx, p),
    };
    let on_error = match e.prop("on-error") {
        None => Some(OnError::default()),
        Some(v) => match cx.string("on-error", v) {
            Some("pass") => Some(OnError::Pass),
            Some("deny") => Some(OnError::Deny),
            Some(other) => {
                cx.error(v.span(), format!("`on-error`: unknown value {other:?}"))
                    .help =
                    Some("use \"pass\" (fail open) or \"deny\" (fail closed, 503)".to_owned());
                None
            }
            None => None,
        },
    };
    let isolation = match e.prop("isolation") {
        None => Some(Isolation::default()),
        Some(v) => match cx.string("isolation", v) {
            Some("reuse") => Some(Isolation::Reuse),
            Some("fresh") => Some(Isolation::Fresh),
            Some(other) => {
                cx.error(v.span(), format!("`isolation`: unknown value {other:?}"))
                    .help = Some("use \"reuse\" or \"fresh\"".to_owned());
                None
            }
            None => None,
        },
    };
    let deadline = match e.prop("deadline") {
        None => Some(DEFAULT_POLICY_DEADLINE),
        Some(v) => cx.positive_duration("deadline", v),
    };
    let memory_limit = match e.prop("memory") {
        None => Some(DEFAULT_POLICY_MEMORY),
        Some(v) => {
            match cx.size("memory", v) {
                Some(n) if n < WASM_PAGE => {
                    cx.error(
                    v.span(),
                    format!("`memory` must be at least 64KiB (one WebAssembly page), found {n} bytes"),
                );
                    None
                }
                other => other,
            }
        }
    };
    let mut children = PolicyChildren::default();
    cx.children(node, POLICY, &mut children);
    let PolicyChildren {
        params,
        body_types,
        body_max,
    } = children;
    let body = match (body_types, body_max) {
        (Some(types), max) => Some(BodyRule {
            types,
            max: max.map_or(DEFAULT_BODY_MAX, |(n, _)| n),
        }),
        (None, Some((_, span))) => {
            cx.error(span, "`body-max` without `body-types` has nothing to cap")
                .help = Some(
                "name the media types whose bodies the policy rewrites: body-types \"text/html\""
                    .to_owned(),
            );
            None
        }
        (None, None) => None,
    };
    let Some(name) = name else { return };
    let span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if !cx.declare(&mut top.policy_names, "policy", name, span) {
        return;
    }
    let (Some(source), Some(on_error), Some(isolation), Some(deadline), Some(memory_limit)) =
        (source, on_error, isolation, deadline, memory_limit)
    else {
        return;
    };
    top.policies.push(PolicyDecl {
        name: name.to_owned(),
        source,
        on_error,
        isolation,
        deadline,
        memory_limit,
        params,
        body,
    });
}

fn policy_source(cx: &mut Cx<'_>, entry: &KdlEntry) -> Option<PolicySource> {
    let text = cx.string("path", entry)?;
    if let Some(builtin) = text.strip_prefix("builtin:") {
        if builtin.is_empty() {
            cx.error(
                entry.span(),
                "`path`: \"builtin:\" needs a policy name after it",
            )
            .help = Some("e.g. path=\"builtin:distro\"".to_owned());
            return None;
        }
        return Some(PolicySource::Builtin(builtin.to_owned()));
    }
    let path = cx.path("path", entry)?;
    cx.existing_file("path", entry, &path);
    Some(PolicySource::File(path))
}

fn policy_param(cx: &mut Cx<'_>, node: &KdlNode, children: &mut PolicyChildren) {
    let e = cx.entries(node, &Shape::leaf((2, 2), "param \"key\" \"value\""));
    let key = e.arg(0).and_then(|a| cx.string(e.name, a));
    let value = e.arg(1).and_then(|a| cx.string(e.name, a));
    if let (Some(k), Some(v)) = (key, value) {
        children.params.push((k.to_owned(), v.to_owned()));
    }
}

/// `body-types "text/html" "application/json"`: media types, no
/// parameters, each `type/subtype`.
fn policy_body_types(cx: &mut Cx<'_>, node: &KdlNode, children: &mut PolicyChildren) {
    let e = cx.entries(
        node,
        &Shape::leaf(
            (1, usize::MAX),
            "body-types \"text/html\" \"application/json\"",
        ),
    );
    let mut types = Vec::new();
    for arg in &e.args {
        let Some(t) = cx.string(e.name, arg) else {
            continue;
        };
        let valid = t.split_once('/').is_some_and(|(a, b)| {
            let token = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
            };
            token(a) && token(b)
        });
        if !valid {
            cx.error(
                arg.span(),
                format!("`body-types`: {t:?} is not a media type (type/subtype, no parameters)"),
            );
            continue;
        }
        types.push(t.to_ascii_lowercase());
    }
    children.body_types = Some(types);
}

/// `body-max "32MiB"`: bodies above it pass through unchanged.
fn policy_body_max(cx: &mut Cx<'_>, node: &KdlNode, children: &mut PolicyChildren) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "body-max \"32MiB\""));
    let Some(arg) = e.arg(0) else { return };
    match cx.size(e.name, arg) {
        Some(0) => {
            cx.error(arg.span(), "`body-max` must be more than 0 bytes");
        }
        Some(n) => children.body_max = Some((n, arg.span())),
        None => {}
    }
}

/// `policies "a" "b"`: names with their spans, duplicates refused.
pub(super) fn policy_list(cx: &mut Cx<'_>, node: &KdlNode) -> Vec<(String, SourceSpan)> {
    let e = cx.entries(
        node,
        &Shape::leaf((1, usize::MAX), "policies \"store-id\" \"distro\""),
    );
    let mut out: Vec<(String, SourceSpan)> = Vec::new();
    for arg in &e.args {
        let Some(name) = cx.ident(e.name, arg) else {
            continue;
        };
        if out.iter().any(|(n, _)| n == name) {
            cx.error(arg.span(), format!("`policies`: {name:?} is listed twice"));
            continue;
        }
        out.push((name.to_owned(), arg.span()));
    }
    out
}
