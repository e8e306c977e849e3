//! `admin { … }`: the admin listener, on by default on loopback, and the
//! host names it answers to.

use std::net::SocketAddr;

use kdl::KdlNode;
use miette::SourceSpan;

use super::server_name::server_names;
use super::top::Top;
use super::walker::{BLOCK, Cx, Rule, Shape, bool_node, many, once};
use crate::config::model::*;

/// The admin listener used when the file has no `admin` block.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// The admin block as read.
struct AdminDraft {
    enabled: Option<bool>,
    listen: Option<(SocketAddr, SourceSpan)>,
    hosts: Vec<ServerName>,
}

const ADMIN: &[Rule<AdminDraft>] = &[
    once("enabled", |cx, n, d| d.enabled = bool_node(cx, n)),
    once("listen", admin_listen),
    many("host", |cx, n, d| {
        let names = server_names(cx, n, "host \"cistern.lan\" \"cistern.example.org:443\"");
        d.hosts.extend(names);
    }),
];

/// `admin { listen "127.0.0.1:9090" }`, `admin { enabled #false }`.
pub(super) fn admin(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = AdminDraft {
        enabled: None,
        listen: None,
        hosts: Vec::new(),
    };
    cx.children(node, ADMIN, &mut d);
    let (listen, span) = match (d.enabled, d.listen) {
        (Some(false), _) => (None, None),
        (_, Some((addr, span))) => (Some(addr), Some(span)),
        (_, None) => (Some(default_admin_listen()), None),
    };
    top.admin = Some((
        AdminConfig {
            listen,
            required: true,
            hosts: d.hosts,
        },
        span,
    ));
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("valid default address")
}

/// The admin listener: as the block says, or the loopback default. An
/// explicit address may not be one of the proxy's listeners (the file may
/// declare `listen` after `admin`, hence a check once the file is read).
pub(super) fn admin_finish(
    cx: &mut Cx<'_>,
    block: Option<(AdminConfig, Option<SourceSpan>)>,
    listeners: &[Listener],
) -> AdminConfig {
    let Some((admin, span)) = block else {
        return AdminConfig {
            listen: Some(default_admin_listen()),
            required: false,
            hosts: Vec::new(),
        };
    };
    // Port 0 asks the OS for a free port, so two of them never clash.
    if let (Some(addr), Some(span)) = (admin.listen, span)
        && addr.port() != 0
        && listeners.iter().any(|l| l.addr == addr)
    {
        cx.error(span, format!("`admin`: {addr} is already a proxy listener"))
            .help =
            Some("give the admin listener a port of its own, e.g. \"127.0.0.1:9090\"".to_owned());
    }
    admin
}

fn admin_listen(cx: &mut Cx<'_>, node: &KdlNode, d: &mut AdminDraft) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "listen \"127.0.0.1:9090\""));
    let Some(arg) = e.arg(0) else { return };
    let hint = "\"127.0.0.1:9090\" (loopback only is the safe choice: the admin UI has no login)";
    if let Some(addr) = cx.socket_addr(e.name, arg, hint) {
        d.listen = Some((addr, arg.span()));
    }
}
