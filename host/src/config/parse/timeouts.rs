//! `timeouts { … }`: idle, connect, send, orphan-fill and upstream-idle
//! times.

use kdl::KdlNode;

use super::top::Top;
use super::walker::{BLOCK, Cx, Rule, duration_node, once};
use crate::config::model::*;

const TIMEOUTS: &[Rule<Timeouts>] = &[
    once("idle", |cx, n, t| {
        if let Some(d) = duration_node(cx, n, false) {
            t.idle = d;
        }
    }),
    once("connect", |cx, n, t| {
        if let Some(d) = duration_node(cx, n, false) {
            t.connect = d;
        }
    }),
    // Zero is meaningful here: stop filling as soon as the last client goes.
    once("orphan-fill", |cx, n, t| {
        if let Some(d) = duration_node(cx, n, true) {
            t.orphan_fill = d;
        }
    }),
    once("send", |cx, n, t| {
        if let Some(d) = duration_node(cx, n, false) {
            t.send = d;
        }
    }),
    // Zero is meaningful: no upstream connection is reused.
    once("upstream-idle", |cx, n, t| {
        if let Some(d) = duration_node(cx, n, true) {
            t.upstream_idle = d;
        }
    }),
];

pub(super) fn timeouts(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    cx.children(node, TIMEOUTS, &mut top.timeouts);
}
