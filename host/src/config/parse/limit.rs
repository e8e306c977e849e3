//! `limit { … }` (per-client request rates, the download cap, connection
//! and fill caps, the quick-abort rules of orphaned fills) and `limiter NAME …` (named rates for policies).

use kdl::{KdlEntry, KdlNode};

use super::top::Top;
use super::walker::{BLOCK, Cx, Rule, Shape, once};
use crate::config::model::*;

const LIMIT: &[Rule<LimitsConfig>] = &[
    once("requests-per-client", limit_requests),
    once("download", limit_download),
    once("max-connections", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-connections 10000") {
            l.max_connections = v;
        }
    }),
    once("max-connections-per-client", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-connections-per-client 256") {
            l.max_connections_per_client = v;
        }
    }),
    once("max-fills", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-fills 256") {
            l.max_fills = v;
        }
    }),
    once("max-fills-per-client", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-fills-per-client 32") {
            l.max_fills_per_client = v;
        }
    }),
    once("orphan-finish-left", |cx, n, l| {
        let e = cx.entries(n, &Shape::leaf((1, 1), "orphan-finish-left \"1MiB\""));
        if let Some(v) = e.arg(0).and_then(|a| cx.size(e.name, a)) {
            l.orphans.finish_left = v;
        }
    }),
    once("orphan-finish-done", orphan_finish_done),
    once("http2-max-streams", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "http2-max-streams 100") {
            l.http2_max_streams = v;
        }
    }),
    once("http2-max-resets", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "http2-max-resets 20") {
            l.http2_max_resets = v;
        }
    }),
];

/// `orphan-finish-done "90%"`: a percentage from 0 to 100.
fn orphan_finish_done(cx: &mut Cx<'_>, node: &KdlNode, l: &mut LimitsConfig) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "orphan-finish-done \"90%\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match text
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<u8>().ok())
    {
        Some(pct) if pct <= 100 => l.orphans.finish_done_pct = pct,
        _ => {
            cx.error(
                arg.span(),
                format!("`orphan-finish-done`: {text:?} is not a percentage from 0% to 100%"),
            )
            .help = Some(
                "write it like \"90%\"; \"0%\" lets every orphaned fill go on for orphan-fill"
                    .to_owned(),
            );
        }
    }
}

/// A leaf with one whole number of at least 1.
fn count_node(cx: &mut Cx<'_>, node: &KdlNode, usage: &'static str) -> Option<u32> {
    let e = cx.entries(node, &Shape::leaf((1, 1), usage));
    let arg = e.arg(0)?;
    cx.integer::<u32>(e.name, arg, 1)
}

pub(super) fn limit(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    cx.children(node, LIMIT, &mut top.limits);
}

fn limit_requests(cx: &mut Cx<'_>, node: &KdlNode, l: &mut LimitsConfig) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["per", "burst"],
            children: false,
            usage: "requests-per-client 100 per=\"1s\" burst=200",
        },
    );
    l.requests_per_client = cx.rate(e.name, e.arg(0), &e);
}

fn limit_download(cx: &mut Cx<'_>, node: &KdlNode, l: &mut LimitsConfig) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "download \"10MiB\"  // bytes per second"),
    );
    let Some(arg) = e.arg(0) else { return };
    match cx.size(e.name, arg) {
        Some(0) => {
            cx.error(
                arg.span(),
                "`download` must be more than zero bytes per second",
            )
            .help = Some("leave `download` out for no cap".to_owned());
        }
        Some(n) => l.download_bytes_per_sec = Some(n),
        None => {}
    }
}

pub(super) fn limiter(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["rate", "per", "burst"],
            children: false,
            usage: "limiter \"per-path\" rate=10 per=\"1m\" burst=10",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let rate_entry = e.prop("rate");
    if rate_entry.is_none() {
        cx.error(node.name().span(), "`limiter` needs rate=N").help =
            Some("usage: limiter \"per-path\" rate=10 per=\"1m\" burst=10".to_owned());
    }
    let rate = cx.rate(e.name, rate_entry, &e);
    let (Some(name), Some(rate)) = (name, rate) else {
        return;
    };
    let span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if !cx.declare(&mut top.limiter_names, "limiter", name, span) {
        return;
    }
    top.limiters.push(NamedLimiter {
        name: name.to_owned(),
        rate,
    });
}
