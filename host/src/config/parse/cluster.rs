//! `cluster { … }`: the fleet this Cistern belongs to: its own node name,
//! its peers and the secret their requests to each other carry.

use http::Uri;
use kdl::KdlNode;

use super::top::Top;
use super::walker::{BLOCK, Cx, Rule, Shape, duration_node, many, once};
use crate::config::model::*;

/// The cluster block as read.
#[derive(Default)]
struct ClusterDraft {
    node: Option<String>,
    peers: Vec<PeerConfig>,
    secret: Option<String>,
    peer_down: Option<std::time::Duration>,
    store_on: StoreOn,
    redis: Option<RedisUrl>,
    /// A `node` or `secret` node was there, valid or not: a bad one is
    /// reported already and must not also read as missing.
    saw_node: bool,
    saw_secret: bool,
    /// `peer` nodes seen, valid or not.
    peer_nodes: usize,
}

const CLUSTER: &[Rule<ClusterDraft>] = &[
    once("node", cluster_node),
    many("peer", cluster_peer),
    once("secret", cluster_secret),
    once("peer-down", |cx, n, d| {
        d.peer_down = duration_node(cx, n, false)
    }),
    once("store-on", cluster_store_on),
    once("redis", cluster_redis),
];

/// The shortest secret accepted: it is all that keeps clients off the
/// peer path.
const MIN_SECRET: usize = 16;

/// `cluster { node "a"; peer "b" "http://127.0.0.2:8080"; secret "…" }`.
pub(super) fn cluster(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = ClusterDraft::default();
    cx.children(node, CLUSTER, &mut d);
    let at = node.name().span();
    let Some(name) = d.node else {
        if d.saw_node {
            return;
        }
        cx.error(
            at,
            "`cluster` needs `node \"NAME\"`: this Cistern's name in the fleet",
        )
        .help = Some("add node \"a\" (the name other nodes list it under with `peer`)".to_owned());
        return;
    };
    let Some(secret) = d.secret else {
        if d.saw_secret {
            return;
        }
        cx.error(
            at,
            "`cluster` needs `secret \"…\"`: peers prove themselves with it",
        )
        .help = Some(format!(
            "add secret \"…\" (the same random string of at least {MIN_SECRET} characters on every node)"
        ));
        return;
    };
    if d.peer_nodes == d.peers.len() && d.peers.iter().all(|p| p.name == name) {
        cx.error(at, "`cluster` lists no peer besides this node")
            .help = Some("add peer \"b\" \"http://10.0.0.2:8080\"".to_owned());
        return;
    }
    top.cluster = Some(ClusterConfig {
        node: name,
        peers: d.peers,
        secret,
        peer_down: d.peer_down.unwrap_or(DEFAULT_PEER_DOWN),
        store_on: d.store_on,
        redis: d.redis,
    });
}

fn cluster_node(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ClusterDraft) {
    d.saw_node = true;
    let e = cx.entries(node, &Shape::leaf((1, 1), "node \"a\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match crate::via::check_node_id(text) {
        Ok(()) => d.node = Some(text.to_owned()),
        Err(why) => {
            cx.error(arg.span(), format!("`node`: {why}"));
        }
    }
}

fn cluster_peer(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ClusterDraft) {
    d.peer_nodes += 1;
    let usage = "peer \"b\" \"http://10.0.0.2:8080\"";
    let e = cx.entries(node, &Shape::leaf((2, 2), usage));
    let (Some(n), Some(u)) = (e.arg(0), e.arg(1)) else {
        return;
    };
    let (Some(name), Some(url)) = (cx.string(e.name, n), cx.string(e.name, u)) else {
        return;
    };
    if let Err(why) = crate::via::check_node_id(name) {
        cx.error(n.span(), format!("`peer`: {why}"));
        return;
    }
    if d.peers.iter().any(|p| p.name == name) {
        cx.error(n.span(), format!("peer {name:?} is listed twice"));
        return;
    }
    match peer_url(url) {
        Ok(url) => d.peers.push(PeerConfig {
            name: name.to_owned(),
            url,
        }),
        Err(why) => {
            cx.error(u.span(), format!("`peer` {name:?}: {why}")).help =
                Some(format!("usage: {usage}"));
        }
    }
}

/// A peer's base URL: `http://host:port`, nothing after the authority
/// (peer requests go to a fixed path of their own).
fn peer_url(text: &str) -> Result<Uri, String> {
    let url: Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if url.scheme_str() != Some("http") {
        return Err(format!("{text:?}: a peer is reached over http://"));
    }
    if url.authority().is_none() {
        return Err(format!("{text:?} names no host"));
    }
    if url.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!(
            "{text:?}: give the peer's address only, without a path"
        ));
    }
    Ok(url)
}

fn cluster_secret(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ClusterDraft) {
    d.saw_secret = true;
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "secret \"a long random string\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    if text.len() < MIN_SECRET || !text.bytes().all(|b| b.is_ascii_graphic()) {
        cx.error(
            arg.span(),
            format!("`secret` must be at least {MIN_SECRET} visible characters"),
        )
        .help = Some("for example the output of `openssl rand -hex 32`".to_owned());
        return;
    }
    d.secret = Some(text.to_owned());
}

/// `store-on "every" | "owner"`.
fn cluster_store_on(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ClusterDraft) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "store-on \"every\"  // or \"owner\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    d.store_on = match text {
        "every" => StoreOn::Every,
        "owner" => StoreOn::Owner,
        other => {
            cx.error(arg.span(), format!("`store-on`: unknown value {other:?}"))
                .help =
                Some("store-on \"every\" (every node keeps a copy) or \"owner\"".to_owned());
            return;
        }
    };
}

/// `redis "redis://host:port/"`: where the fleet's shared state lives.
fn cluster_redis(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ClusterDraft) {
    let usage = "redis \"redis://127.0.0.1:6379/\"";
    let e = cx.entries(node, &Shape::leaf((1, 1), usage));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match RedisUrl::parse(text) {
        Ok(url) => d.redis = Some(url),
        Err(why) => {
            cx.error(arg.span(), format!("`redis`: {why}")).help = Some(format!("usage: {usage}"));
        }
    }
}
