//! `forward { … }`: the forward proxy (and transparent mode): who may use
//! it, where CONNECT may go, its policies and stale rules.

use std::net::IpAddr;

use ipnet::IpNet;
use kdl::KdlNode;
use miette::SourceSpan;

use super::policy::policy_list;
use super::top::Top;
use super::upstream_block::{forwarded_for, stale_if_error, stale_while_revalidate};
use super::walker::{BLOCK, Cx, Rule, Shape, bool_node, many, once};
use crate::config::model::*;

/// Forward-proxy defaults: on, loopback clients only, CONNECT to 443.
pub(in crate::config) fn default_forward() -> ForwardConfig {
    ForwardConfig {
        enabled: true,
        transparent: false,
        allow: vec![
            "127.0.0.0/8".parse().expect("valid net"),
            "::1/128".parse().expect("valid net"),
        ],
        connect_ports: vec![443],
        policies: Vec::new(),
        stale: StaleRules::default(),
        forwarded_for: ForwardedFor::Off,
    }
}

/// The forward block as read: `allow` and `connect-ports` replace their
/// defaults only when given, and policy references go to the cross-check.
struct ForwardDraft {
    config: ForwardConfig,
    allow_given: bool,
    ports_given: bool,
    refs: Vec<(String, SourceSpan)>,
}

const FORWARD: &[Rule<ForwardDraft>] = &[
    once("enabled", |cx, n, d| {
        if let Some(b) = bool_node(cx, n) {
            d.config.enabled = b;
        }
    }),
    once("transparent", |cx, n, d| {
        if let Some(b) = bool_node(cx, n) {
            d.config.transparent = b;
        }
    }),
    many("allow", forward_allow),
    many("connect-ports", forward_connect_ports),
    once("policies", |cx, n, d| d.refs = policy_list(cx, n)),
    once("stale-if-error", |cx, n, d| {
        stale_if_error(cx, n, &mut d.config.stale)
    }),
    once("stale-while-revalidate", |cx, n, d| {
        stale_while_revalidate(cx, n, &mut d.config.stale)
    }),
    once("forwarded-for", |cx, n, d| {
        forwarded_for(cx, n, &mut d.config.forwarded_for)
    }),
];

pub(super) fn forward(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = ForwardDraft {
        config: ForwardConfig {
            allow: Vec::new(),
            connect_ports: Vec::new(),
            ..default_forward()
        },
        allow_given: false,
        ports_given: false,
        refs: Vec::new(),
    };
    cx.children(node, FORWARD, &mut d);
    let defaults = default_forward();
    if !d.allow_given {
        d.config.allow = defaults.allow;
    }
    if !d.ports_given {
        d.config.connect_ports = defaults.connect_ports;
    }
    d.config.policies = d.refs.iter().map(|(n, _)| n.clone()).collect();
    top.policy_refs.extend(d.refs);
    top.forward = Some(d.config);
}

fn forward_allow(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ForwardDraft) {
    d.allow_given = true;
    let e = cx.entries(
        node,
        &Shape::leaf(
            (1, usize::MAX),
            "allow \"127.0.0.0/8\" \"::1/128\" \"192.168.1.7\"",
        ),
    );
    for arg in &e.args {
        let Some(text) = cx.string(e.name, arg) else {
            continue;
        };
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            // A bare address means that one host.
            Err(_) => match text.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    cx.error(
                        arg.span(),
                        format!("`allow`: {text:?} is not a network (CIDR) or an IP address"),
                    )
                    .help = Some(
                        "write e.g. \"192.168.0.0/16\", \"10.1.2.3\" or \"fd00::/8\"".to_owned(),
                    );
                    continue;
                }
            },
        };
        if net.trunc() != net {
            // "10.0.0.1/8" is a typo for either a host or a network; the
            // reader cannot tell which was meant, so neither do we.
            cx.error(arg.span(), format!("`allow`: {text:?} has host bits set"))
                .help = Some(format!(
                "write the network {} or the single host {}",
                net.trunc(),
                net.addr()
            ));
            continue;
        }
        d.config.allow.push(net);
    }
}

fn forward_connect_ports(cx: &mut Cx<'_>, node: &KdlNode, d: &mut ForwardDraft) {
    d.ports_given = true;
    let e = cx.entries(
        node,
        &Shape::leaf((1, usize::MAX), "connect-ports 443 8443"),
    );
    for arg in &e.args {
        if let Some(port) = cx.integer::<u16>(e.name, arg, 1)
            && !d.config.connect_ports.contains(&port)
        {
            d.config.connect_ports.push(port);
        }
    }
}
