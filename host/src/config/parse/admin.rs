//! `admin { … }`: the admin listener, on by default on loopback, the host
//! names it answers to and its credentials (required off loopback).

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
    auth: AdminAuth,
}

const ADMIN: &[Rule<AdminDraft>] = &[
    once("enabled", |cx, n, d| d.enabled = bool_node(cx, n)),
    once("listen", admin_listen),
    many("host", |cx, n, d| {
        let names = server_names(cx, n, "host \"cistern.lan\" \"cistern.example.org:443\"");
        d.hosts.extend(names);
    }),
    many("token-sha256", admin_token),
    many("user", admin_user),
];

/// `admin { listen "127.0.0.1:9090" }`, `admin { enabled #false }`.
pub(super) fn admin(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = AdminDraft {
        enabled: None,
        listen: None,
        hosts: Vec::new(),
        auth: AdminAuth::NONE,
    };
    cx.children(node, ADMIN, &mut d);
    let (listen, span) = match (d.enabled, d.listen) {
        (Some(false), _) => (None, None),
        (_, Some((addr, span))) => (Some(addr), Some(span)),
        (_, None) => (Some(default_admin_listen()), None),
    };
    if let Some(addr) = listen
        && !addr.ip().to_canonical().is_loopback()
        && !d.auth.required()
    {
        // Anyone who can reach the port would read every URL in the replica.
        let at = span.unwrap_or(node.name().span());
        cx.error(
            at,
            format!("`admin` listens on {addr}, which is not a loopback address, without authentication"),
        )
        .help = Some(
            "add `token-sha256 \"…\"` (the SHA-256 of a long random token: `printf %s TOKEN | sha256sum`) or `user \"NAME\" password-sha256=\"…\"`, or listen on 127.0.0.1"
                .to_owned(),
        );
    }
    top.admin = Some((
        AdminConfig {
            listen,
            required: true,
            hosts: d.hosts,
            auth: d.auth,
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
            auth: AdminAuth::NONE,
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
    let hint = "\"127.0.0.1:9090\" (loopback unless `token-sha256` or `user` protects it)";
    if let Some(addr) = cx.socket_addr(e.name, arg, hint) {
        d.listen = Some((addr, arg.span()));
    }
}

/// A SHA-256 digest written as 64 hex digits (either case).
fn sha256_hex(cx: &mut Cx<'_>, node: &str, entry: &kdl::KdlEntry) -> Option<[u8; 32]> {
    let text = cx.string(node, entry)?;
    let mut out = [0u8; 32];
    match hex::decode_to_slice(text, &mut out) {
        Ok(()) => Some(out),
        Err(_) => {
            cx.error(
                entry.span(),
                format!("`{node}`: {text:?} is not a SHA-256 digest (64 hex digits)"),
            )
            .help =
                Some("write the digest, not the secret: `printf %s SECRET | sha256sum`".to_owned());
            None
        }
    }
}

/// `token-sha256 "…"`: a bearer token's digest.
fn admin_token(cx: &mut Cx<'_>, node: &KdlNode, d: &mut AdminDraft) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "token-sha256 \"<64 hex digits>\""),
    );
    if let Some(digest) = e.arg(0).and_then(|a| sha256_hex(cx, e.name, a)) {
        d.auth.tokens.push(digest);
    }
}

/// `user "NAME" password-sha256="…"`: a basic-authentication user.
fn admin_user(cx: &mut Cx<'_>, node: &KdlNode, d: &mut AdminDraft) {
    let usage = "user \"ops\" password-sha256=\"<64 hex digits>\"";
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["password-sha256"],
            children: false,
            usage,
        },
    );
    let name = e.arg(0).and_then(|a| {
        let name = cx.string(e.name, a)?;
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
            cx.error(
                a.span(),
                format!("`user`: {name:?} cannot be a user name (empty, or holds ':' or a control character)"),
            );
            return None;
        }
        Some(name.to_owned())
    });
    let Some(prop) = e.prop("password-sha256") else {
        cx.error(node.name().span(), "`user` needs password-sha256=\"…\"")
            .help = Some(format!("usage: {usage}"));
        return;
    };
    let digest = sha256_hex(cx, "password-sha256", prop);
    if let (Some(name), Some(password_sha256)) = (name, digest) {
        if d.auth.users.iter().any(|u| u.name == name) {
            cx.error(
                node.name().span(),
                format!("`user` {name:?} is given twice"),
            );
            return;
        }
        d.auth.users.push(AdminUser {
            name,
            password_sha256,
        });
    }
}
