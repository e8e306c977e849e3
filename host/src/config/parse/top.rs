//! The top level of `config.kdl`: the draft every block writes into
//! ([`Top`]), the table of top-level nodes, `mode`, and the cross-checks
//! and defaults that need the whole file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use kdl::KdlNode;
use miette::SourceSpan;

use super::admin::{admin, admin_finish};
use super::cluster::cluster;
use super::forward::{default_forward, forward};
use super::limit::{limit, limiter};
use super::listen::{DEFAULT_LISTEN, listen};
use super::mirror::mirror;
use super::policy::policy;
use super::server_name::server_names;
use super::site;
use super::store::{default_state, store};
use super::timeouts::timeouts;
use super::upstream_tls::upstream_tls;
use super::walker::{Cx, Rule, Shape, many, once, suggest};
use crate::config::model::*;

/// The top-level draft: the config's parts as read, plus what the
/// cross-checks in [`Top::finish`] need.
#[derive(Default)]
pub(super) struct Top {
    pub(super) listeners: Vec<Listener>,
    pub(super) listen_seen: HashMap<SocketAddr, SourceSpan>,
    pub(super) store: Option<StoreConfig>,
    pub(super) forward: Option<ForwardConfig>,
    pub(super) mirrors: Vec<MirrorConfig>,
    pub(super) mirror_names: HashMap<String, SourceSpan>,
    pub(super) mirror_prefixes: HashMap<String, SourceSpan>,
    pub(super) limits: LimitsConfig,
    pub(super) timeouts: Timeouts,
    pub(super) mode: CacheMode,
    pub(super) upstream_tls: UpstreamTls,
    pub(super) policies: Vec<PolicyDecl>,
    pub(super) policy_names: HashMap<String, SourceSpan>,
    pub(super) limiters: Vec<NamedLimiter>,
    pub(super) limiter_names: HashMap<String, SourceSpan>,
    /// `site` blocks and `default-site` (see [`site`]).
    pub(super) sites: site::Sites,
    /// Every policy name used by a route, checked against the declarations
    /// once the whole file is read (declarations may come later).
    pub(super) policy_refs: Vec<(String, SourceSpan)>,
    /// The `admin` block, if the file has one, with the span of its
    /// `listen` address for the cross-check against proxy listeners.
    pub(super) admin: Option<(AdminConfig, Option<SourceSpan>)>,
    /// `server-name` nodes.
    pub(super) server_names: Vec<ServerName>,
    /// `node-id`.
    pub(super) node_id: Option<String>,
    /// `targeted-field`.
    pub(super) targeted_field: Option<http::HeaderName>,
    /// `cluster`.
    pub(super) cluster: Option<ClusterConfig>,
}

/// The nodes a file may hold at the top level.
pub(super) const TOP_LEVEL: &[Rule<Top>] = &[
    many("listen", listen),
    once("store", store),
    once("forward", forward),
    many("mirror", mirror),
    once("limit", limit),
    many("limiter", limiter),
    once("timeouts", timeouts),
    once("mode", mode),
    once("node-id", node_id),
    once("targeted-field", targeted_field),
    once("upstream-tls", upstream_tls),
    many("policy", policy),
    many("site", site::site),
    once("default-site", site::default_site),
    once("admin", admin),
    once("cluster", cluster),
    many("server-name", |cx, n, top| {
        let names = server_names(cx, n, "server-name \"cache.lan\" \"cache.example.org:80\"");
        top.server_names.extend(names);
    }),
];

impl Top {
    /// Cross-checks and defaults that need the whole file.
    pub(super) fn finish(self, cx: &mut Cx<'_>, name: &Path) -> Config {
        for (policy, span) in &self.policy_refs {
            if !self.policy_names.contains_key(policy) {
                let names: Vec<&str> = self.policy_names.keys().map(String::as_str).collect();
                let help = match suggest(policy, &names) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => format!("declare it with: policy {policy:?} path=\"…\""),
                };
                cx.error(*span, format!("policy {policy:?} is not declared"))
                    .help = Some(help);
            }
        }
        // A file of TLS sites only has nothing to serve in plain HTTP: it
        // gets no default listener (which could also clash with another
        // program on 8080).
        let sites_only = !self.sites.is_empty()
            && self.mirrors.is_empty()
            && !self.forward.as_ref().is_some_and(|f| f.enabled);
        let listeners = if self.listeners.is_empty() && !sites_only {
            vec![Listener {
                addr: DEFAULT_LISTEN.parse().expect("valid default address"),
            }]
        } else {
            self.listeners
        };
        let admin = admin_finish(cx, self.admin, &listeners);
        let store = self.store.unwrap_or_else(|| {
            let root = cx.base.join("replica");
            StoreConfig {
                state: default_state(&root),
                root,
                layout: Layout::HostPort,
                max_size: None,
                min_free: DEFAULT_MIN_FREE,
            }
        });
        // No `forward` block: a config that does not ask for a forward proxy
        // does not get one (a mirror-only cache must not relay anything else).
        let forward = self.forward.unwrap_or_else(|| ForwardConfig {
            enabled: false,
            ..default_forward()
        });
        let (sites, default_site) = site::finish(self.sites, cx, &listeners, &self.listen_seen);
        Config {
            source: Some(name.to_path_buf()),
            listeners,
            store,
            forward,
            mirrors: self.mirrors,
            limits: self.limits,
            timeouts: self.timeouts,
            mode: self.mode,
            upstream_tls: self.upstream_tls,
            policies: self.policies,
            limiters: self.limiters,
            sites,
            default_site,
            admin,
            server_names: self.server_names,
            node_id: self.node_id,
            targeted_field: self
                .targeted_field
                .unwrap_or(http::HeaderName::from_static(DEFAULT_TARGETED_FIELD)),
            cluster: self.cluster,
        }
    }
}

/// `targeted-field "Edge-Cache-Control"`: the name of Cistern's own
/// targeted cache-control field (RFC 9213), for a fleet whose origins
/// already speak to their caches under one name.
fn targeted_field(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "targeted-field \"Cistern-Cache-Control\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    let why = match http::HeaderName::from_bytes(text.as_bytes()) {
        Err(_) => Some("not a valid header field name".to_owned()),
        Ok(name) => match name.as_str() {
            "cache-control" | "cdn-cache-control" | "expires" | "pragma" | "age" => Some(format!(
                "{text:?} is a field every cache reads already; name one of your own"
            )),
            "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer"
            | "transfer-encoding" | "upgrade" => Some(format!("{text:?} is a hop-by-hop field")),
            _ => {
                top.targeted_field = Some(name);
                None
            }
        },
    };
    if let Some(why) = why {
        cx.error(arg.span(), format!("`targeted-field`: {why}"))
            .help = Some("for example targeted-field \"Edge-Cache-Control\"".to_owned());
    }
}

/// `mode "normal" | "static" | "offline"`
fn mode(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "mode \"normal\"  // or \"static\", \"offline\""),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    top.mode = match text {
        "normal" => CacheMode::Normal,
        "static" => CacheMode::Static,
        "offline" => CacheMode::Offline,
        other => {
            cx.error(arg.span(), format!("`mode`: unknown mode {other:?}"))
                .help = Some("use \"normal\", \"static\" or \"offline\"".to_owned());
            return;
        }
    };
}

/// `node-id "edge-1"`: this Cistern's name in `Via`, by which it knows a
/// request that looped back to it.
fn node_id(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "node-id \"edge-1\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match crate::via::check_node_id(text) {
        Ok(()) => top.node_id = Some(text.to_owned()),
        Err(why) => {
            cx.error(arg.span(), format!("`node-id`: {why}"));
        }
    }
}
