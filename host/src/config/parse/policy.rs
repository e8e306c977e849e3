//! `policy NAME path=… { param … }` (the declarations) and `policies …`
//! (a route's references to them, checked once the file is read).

use std::time::Duration;

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::top::Top;
use super::walker::{Cx, Rule, Shape, many};
use crate::config::model::*;

/// Default policy wall-clock budget per hook call.
const DEFAULT_POLICY_DEADLINE: Duration = Duration::from_millis(50);
/// Default cap on a policy's linear memory.
const DEFAULT_POLICY_MEMORY: u64 = 16 << 20;
/// One WebAssembly page: no module can run with less.
const WASM_PAGE: u64 = 64 << 10;

const POLICY: &[Rule<Vec<(String, String)>>] = &[many("param", policy_param)];

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
    let mut params = Vec::new();
    cx.children(node, POLICY, &mut params);
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

fn policy_param(cx: &mut Cx<'_>, node: &KdlNode, params: &mut Vec<(String, String)>) {
    let e = cx.entries(node, &Shape::leaf((2, 2), "param \"key\" \"value\""));
    let key = e.arg(0).and_then(|a| cx.string(e.name, a));
    let value = e.arg(1).and_then(|a| cx.string(e.name, a));
    if let (Some(k), Some(v)) = (key, value) {
        params.push((k.to_owned(), v.to_owned()));
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
