//! `health { … }` in a `mirror` or `site` block: how its upstreams are
//! probed and when one is disabled and re-enabled.

use kdl::KdlNode;

use super::walker::{BLOCK, Cx, Rule, Shape, duration_node, once};
use crate::config::model::*;

const HEALTH: &[Rule<HealthConfig>] = &[
    once("probe", probe),
    once("interval", |cx, n, h| {
        if let Some(d) = duration_node(cx, n, false) {
            h.interval = d;
        }
    }),
    once("timeout", |cx, n, h| {
        if let Some(d) = duration_node(cx, n, false) {
            h.timeout = d;
        }
    }),
    once("fail-after", |cx, n, h| {
        if let Some(v) = count(cx, n) {
            h.fail_after = v;
        }
    }),
    once("ok-after", |cx, n, h| {
        if let Some(v) = count(cx, n) {
            h.ok_after = v;
        }
    }),
    once("retry", |cx, n, h| {
        if let Some(d) = duration_node(cx, n, false) {
            h.retry = d;
        }
    }),
    once("retry-max", |cx, n, h| {
        if let Some(d) = duration_node(cx, n, false) {
            h.retry_max = d;
        }
    }),
];

/// `health { probe "/trace"; interval "10s"; … }`.
pub(super) fn health(cx: &mut Cx<'_>, node: &KdlNode, health: &mut HealthConfig) {
    cx.entries(node, &BLOCK);
    cx.children(node, HEALTH, health);
    if health.retry_max < health.retry {
        cx.error(
            node.name().span(),
            format!(
                "`health`: retry-max ({:?}) is shorter than retry ({:?})",
                health.retry_max, health.retry
            ),
        )
        .help = Some("retry is the first wait, retry-max the longest".to_owned());
    }
}

/// `fail-after 3`: a count of at least one.
fn count(cx: &mut Cx<'_>, node: &KdlNode) -> Option<u32> {
    let e = cx.entries(node, &Shape::leaf((1, 1), "NAME 3"));
    let arg = e.arg(0)?;
    cx.integer::<u32>(e.name, arg, 1)
}

/// `probe "/project/trace/master"`: a path below each upstream's base.
fn probe(cx: &mut Cx<'_>, node: &KdlNode, health: &mut HealthConfig) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "probe \"/project/trace\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    let path = text.trim_start_matches('/');
    let problem = if path.is_empty() {
        Some("is empty: name a small file every upstream has")
    } else if text.contains(['#', '\\'])
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Some("is a path: it cannot hold '#', '\\\\', spaces or control characters")
    } else if path.split(['/', '?']).any(|seg| seg == "..") {
        Some("cannot climb above the upstream's base ('..')")
    } else if text.contains("://") {
        Some("is a path below each upstream's base, not a URL")
    } else {
        None
    };
    if let Some(why) = problem {
        cx.error(arg.span(), format!("`probe` {text:?} {why}")).help =
            Some("write a path like \"/project/trace/master\"".to_owned());
        return;
    }
    health.probe = Some(path.to_owned());
}
