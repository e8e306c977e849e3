//! `listen "ADDR:PORT"`: the plaintext proxy listeners.

use kdl::KdlNode;

use super::top::Top;
use super::walker::{Cx, Shape};
use crate::config::model::*;

/// The listener used when the file names none.
pub(in crate::config) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// `listen "ADDR:PORT"`
pub(super) fn listen(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "listen \"127.0.0.1:8080\""));
    let Some(arg) = e.arg(0) else { return };
    let hint = "\"127.0.0.1:8080\", \"0.0.0.0:8080\", \"[::]:8080\"";
    let Some(addr) = cx.socket_addr(e.name, arg, hint) else {
        return;
    };
    // Port 0 asks for a fresh port each time, so repeats are distinct sockets.
    if let Some(first) = top.listen_seen.get(&addr).filter(|_| addr.port() != 0) {
        let line = cx.line_of(*first);
        cx.error(
            arg.span(),
            format!("`listen`: {addr} is already a listener (line {line})"),
        );
        return;
    }
    top.listen_seen.insert(addr, arg.span());
    top.listeners.push(Listener { addr });
}
