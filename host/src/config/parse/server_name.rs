//! `server-name "…" …` and the admin block's `host "…"`: the names Cistern
//! answers to as itself.

use std::net::IpAddr;

use http::uri::Authority;
use kdl::KdlNode;

use super::walker::{Cx, Shape};
use crate::config::model::*;

/// The names of a `server-name` or admin `host` node: host names or IP
/// literals, each with an optional port (`"cache.lan"`, `"[::1]:80"`).
pub(super) fn server_names(
    cx: &mut Cx<'_>,
    node: &KdlNode,
    usage: &'static str,
) -> Vec<ServerName> {
    let e = cx.entries(node, &Shape::leaf((1, usize::MAX), usage));
    let mut out = Vec::new();
    for arg in &e.args {
        let Some(text) = cx.string(e.name, arg) else {
            continue;
        };
        match server_name(text) {
            Ok(name) => out.push(name),
            Err(why) => {
                cx.error(arg.span(), format!("`{}`: {text:?} {why}", e.name))
                    .help = Some(
                    "write a host name or an IP address, optionally with a port: \"cache.lan\", \"192.168.1.7\", \"cache.example.org:80\""
                        .to_owned(),
                );
            }
        }
    }
    out
}

/// One name of [`server_names`], or why it is not one.
fn server_name(text: &str) -> Result<ServerName, &'static str> {
    if text.contains("://") || text.contains('/') {
        return Err("is a URL, not a host name");
    }
    if text.contains('@') {
        return Err("holds user information; a host name has none");
    }
    let authority: Authority = text.parse().map_err(|_| "is not a host name")?;
    let host = authority.host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let is_ip = bare.parse::<IpAddr>().is_ok();
    let name_ok = !bare.trim_end_matches('.').is_empty()
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !is_ip && !name_ok {
        return Err("is not a host name");
    }
    if authority.port_u16() == Some(0) {
        return Err("names port 0");
    }
    Ok(ServerName::new(host, authority.port_u16()))
}
