//! `store { … }`: where the replica and Cistern's state live, their
//! layout and size bounds.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kdl::KdlNode;
use miette::SourceSpan;

use super::top::Top;
use super::walker::{BLOCK, Cx, PATH_ARG, Rule, Shape, once};
use crate::config::model::*;

/// `root` with `.cistern` appended (`/srv/replica` → `/srv/replica.cistern`),
/// or `root/.cistern` when the root has no last component to extend (`/`).
pub(in crate::config) fn default_state(root: &Path) -> PathBuf {
    // Collecting components drops a trailing slash, which would otherwise
    // put the state inside the root ("replica/" + ".cistern").
    let root: PathBuf = root.components().collect();
    if root.file_name().is_none() {
        return root.join(".cistern");
    }
    let mut s: OsString = root.into_os_string();
    s.push(".cistern");
    PathBuf::from(s)
}

#[derive(Default)]
struct StoreDraft {
    root: Option<PathBuf>,
    root_span: Option<SourceSpan>,
    state: Option<PathBuf>,
    state_span: Option<SourceSpan>,
    layout: Option<Layout>,
    max_size: Option<u64>,
    min_free: Option<u64>,
}

const STORE: &[Rule<StoreDraft>] = &[
    once("root", store_root),
    once("state", store_state),
    once("layout", store_layout),
    once("max-size", store_max_size),
    once("min-free", store_min_free),
];

pub(super) fn store(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = StoreDraft::default();
    cx.children(node, STORE, &mut d);
    let root = d.root.unwrap_or_else(|| cx.base.join("replica"));
    let state = d.state.unwrap_or_else(|| default_state(&root));
    // Metadata inside the browsable tree would show up as mirrored files,
    // and the replica inside the state would be swept as partials.
    let (r, s): (PathBuf, PathBuf) = (root.components().collect(), state.components().collect());
    if s.starts_with(&r) || r.starts_with(&s) {
        let span = d.state_span.or(d.root_span).unwrap_or(node.name().span());
        cx.error(
            span,
            format!(
                "`store`: the state directory {} and the replica root {} must not contain each other",
                s.display(),
                r.display()
            ),
        )
        .help = Some("put them side by side, e.g. root \"replica\" and state \"replica.cistern\"".to_owned());
    }
    top.store = Some(StoreConfig {
        root,
        state,
        layout: d.layout.unwrap_or(Layout::HostPort),
        max_size: d.max_size,
        min_free: d.min_free.unwrap_or(DEFAULT_MIN_FREE),
    });
}

fn store_root(cx: &mut Cx<'_>, node: &KdlNode, d: &mut StoreDraft) {
    let e = cx.entries(node, &PATH_ARG);
    if let Some(arg) = e.arg(0) {
        d.root = cx.path(e.name, arg);
        d.root_span = Some(arg.span());
    }
}

fn store_state(cx: &mut Cx<'_>, node: &KdlNode, d: &mut StoreDraft) {
    let e = cx.entries(node, &PATH_ARG);
    if let Some(arg) = e.arg(0) {
        d.state = cx.path(e.name, arg);
        d.state_span = Some(arg.span());
    }
}

fn store_layout(cx: &mut Cx<'_>, node: &KdlNode, d: &mut StoreDraft) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "layout \"host-port\"  // or \"flat\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match text {
        "host-port" => d.layout = Some(Layout::HostPort),
        "flat" => d.layout = Some(Layout::Flat),
        other => {
            cx.error(arg.span(), format!("`layout`: unknown layout {other:?}"))
                .help = Some("use \"host-port\" or \"flat\"".to_owned());
        }
    }
}

const SIZE_ARG: Shape = Shape::leaf((1, 1), "NAME \"20GiB\"");

fn store_max_size(cx: &mut Cx<'_>, node: &KdlNode, d: &mut StoreDraft) {
    let e = cx.entries(node, &SIZE_ARG);
    let Some(arg) = e.arg(0) else { return };
    match cx.size(e.name, arg) {
        Some(0) => {
            cx.error(arg.span(), "`max-size` must be more than zero")
                .help = Some("leave `max-size` out for an unbounded replica".to_owned());
        }
        Some(n) => d.max_size = Some(n),
        None => {}
    }
}

fn store_min_free(cx: &mut Cx<'_>, node: &KdlNode, d: &mut StoreDraft) {
    let e = cx.entries(node, &SIZE_ARG);
    let Some(arg) = e.arg(0) else { return };
    d.min_free = cx.size(e.name, arg);
}
