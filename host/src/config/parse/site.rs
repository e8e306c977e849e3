//! `site NAME { … }` and `default-site NAME`: TLS-terminated host names.
//!
//! Kept apart from the other node kinds so the site syntax can grow
//! without touching them; it uses the same [`Cx`] helpers, so its problems
//! carry file, line and column like every other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use kdl::{KdlEntry, KdlNode};
use miette::SourceSpan;

use super::top::Top;
use super::upstream_block::{HasUpstreamBlock, UpstreamBlock, UpstreamHints, upstream_rules};
use super::walker::{Cx, Rule, Shape, bool_node, many, once, suggest};
use crate::config::model::{Listener, SiteConfig};

/// Where a site listens when its block names no address: loopback, like
/// the plaintext default, on the usual unprivileged HTTPS port.
pub(in crate::config) const DEFAULT_SITE_LISTEN: &str = "127.0.0.1:8443";

/// The sites as read, with what the cross-checks need.
#[derive(Default)]
pub(super) struct Sites {
    sites: Vec<SiteConfig>,
    names: HashMap<String, SourceSpan>,
    /// Each TLS address with the first place it was named.
    listens: Vec<(SocketAddr, SourceSpan)>,
    default_site: Option<(String, SourceSpan)>,
}

impl Sites {
    /// Whether the file declares no site.
    pub(super) fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

/// A `site` block as read.
struct SiteDraft {
    listen: Vec<(SocketAddr, SourceSpan)>,
    tls: Option<(PathBuf, PathBuf)>,
    tls_given: bool,
    upstream: UpstreamBlock,
    preserve_host: bool,
}

impl HasUpstreamBlock for SiteDraft {
    fn upstream_block(&mut self) -> &mut UpstreamBlock {
        &mut self.upstream
    }
}

/// A site's own nodes; the upstream block's follow them.
const SITE: &[Rule<SiteDraft>] = &[
    many("listen", site_listen),
    once("tls", site_tls),
    once("preserve-host", |cx, n, d| {
        if let Some(b) = bool_node(cx, n) {
            d.preserve_host = b;
        }
    }),
];

/// How a site's upstreams read in messages.
const SITE_HINTS: UpstreamHints = UpstreamHints {
    block: "site",
    usage: "upstream \"https://origin.example.org/\"",
    example: "https://origin.example.org/",
    missing: "https://origin.example.org/",
};

/// `site "example.org" { listen …; tls cert=… key=…; upstream …; policies … }`
pub(super) fn site(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape::named_block("site \"example.org\" { tls cert=\"example.org.pem\" key=\"example.org.key\"; upstream \"https://origin.example.org/\" }"),
    );
    let name_span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    let name = e.arg(0).and_then(|a| host_name(cx, a));
    let mut d = SiteDraft {
        listen: Vec::new(),
        tls: None,
        tls_given: false,
        upstream: UpstreamBlock::new(&SITE_HINTS),
        preserve_host: false,
    };
    cx.children_with(node, SITE, &upstream_rules(), &mut d);
    let Some(name) = name else { return };
    if !cx.declare(&mut top.sites.names, "site", &name, name_span) {
        return;
    }
    if !d.tls_given {
        cx.error(name_span, format!("site {name:?} has no `tls`"))
            .help = Some(
            "name its certificate and key: tls cert=\"example.org.pem\" key=\"example.org.key\""
                .to_owned(),
        );
    }
    d.upstream.require_upstream(cx, &name, name_span);
    if d.listen.is_empty() {
        let addr = DEFAULT_SITE_LISTEN.parse().expect("valid default address");
        d.listen.push((addr, name_span));
    }
    for (addr, span) in &d.listen {
        if !top.sites.listens.iter().any(|(a, _)| a == addr) {
            top.sites.listens.push((*addr, *span));
        }
    }
    let u = d.upstream.finish(&mut top.policy_refs);
    let Some((cert, key)) = d.tls else { return };
    top.sites.sites.push(SiteConfig {
        name,
        listen: d.listen.into_iter().map(|(a, _)| a).collect(),
        cert,
        key,
        upstreams: u.upstreams,
        policies: u.policies,
        stale: u.stale,
        forwarded_for: u.forwarded_for,
        weights: u.weights,
        health: u.health,
        preserve_host: d.preserve_host,
    });
}

/// A site name: a DNS host name, the form SNI carries, kept in lower case
/// so matching is case-insensitive like DNS.
fn host_name(cx: &mut Cx<'_>, entry: &KdlEntry) -> Option<String> {
    let text = cx.string("site", entry)?;
    let name = text.to_ascii_lowercase();
    let problem = if name.starts_with("*.") {
        Some("is a wildcard; wildcard sites are not supported, list each name in its own `site`")
    } else if name.parse::<std::net::IpAddr>().is_ok() {
        Some(
            "is an IP address; TLS clients never send one in SNI, so name the site by its host name",
        )
    } else if name.is_empty() || name.len() > 253 {
        Some("is not a host name (1 to 253 characters)")
    } else if !name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    }) {
        Some("is not a host name (letters, digits and '-' in dot-separated labels)")
    } else {
        None
    };
    if let Some(why) = problem {
        cx.error(entry.span(), format!("`site` {text:?} {why}"))
            .help = Some("write the host name clients use, like \"www.example.org\"".to_owned());
        return None;
    }
    Some(name)
}

fn site_listen(cx: &mut Cx<'_>, node: &KdlNode, d: &mut SiteDraft) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "listen \"127.0.0.1:8443\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(addr) = cx.socket_addr(e.name, arg, "\"0.0.0.0:443\", \"[::]:443\"") else {
        return;
    };
    if d.listen.iter().any(|(a, _)| *a == addr) {
        cx.error(arg.span(), format!("`listen` {addr} is listed twice"));
    } else {
        d.listen.push((addr, arg.span()));
    }
}

fn site_tls(cx: &mut Cx<'_>, node: &KdlNode, d: &mut SiteDraft) {
    let e = cx.entries(
        node,
        &Shape {
            args: (0, 0),
            props: &["cert", "key"],
            children: false,
            usage: "tls cert=\"example.org.pem\" key=\"example.org.key\"",
        },
    );
    d.tls_given = true;
    let mut file = |prop: &str| {
        let Some(entry) = e.prop(prop) else {
            cx.error(node.name().span(), format!("`tls` needs {prop}=\"…\""))
                .help =
                Some("usage: tls cert=\"example.org.pem\" key=\"example.org.key\"".to_owned());
            return None;
        };
        let path = cx.path(prop, entry)?;
        cx.existing_file(prop, entry, &path);
        Some(path)
    };
    let cert = file("cert");
    let key = file("key");
    if let (Some(cert), Some(key)) = (cert, key) {
        d.tls = Some((cert, key));
    }
}

/// `default-site "example.org"`
pub(super) fn default_site(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "default-site \"example.org\""));
    let Some(arg) = e.arg(0) else { return };
    if let Some(name) = cx.string(e.name, arg) {
        top.sites.default_site = Some((name.to_ascii_lowercase(), arg.span()));
    }
}

/// Cross-checks that need the whole file: `default-site` names a site, and
/// no address is both a plaintext and a TLS listener.
pub(super) fn finish(
    sites: Sites,
    cx: &mut Cx<'_>,
    listeners: &[Listener],
    listen_seen: &HashMap<SocketAddr, SourceSpan>,
) -> (Vec<SiteConfig>, Option<String>) {
    for (addr, span) in &sites.listens {
        if listeners.iter().any(|l| l.addr == *addr) {
            let place = match listen_seen.get(addr) {
                Some(first) => format!("line {}", cx.line_of(*first)),
                None => "the default when no `listen` is given".to_owned(),
            };
            cx.error(
                *span,
                format!("{addr} is already a plaintext listener ({place}); a port serves either plain HTTP or TLS"),
            )
            .help = Some("give the site its own address, like \"127.0.0.1:8443\"".to_owned());
        }
    }
    let default_site = match sites.default_site {
        None => None,
        Some((name, span)) if !sites.names.contains_key(&name) => {
            let mut names: Vec<&str> = sites.names.keys().map(String::as_str).collect();
            names.sort_unstable();
            let help = match suggest(&name, &names) {
                Some(s) => format!("did you mean {s:?}?"),
                None if names.is_empty() => "declare it with: site \"…\" { … }".to_owned(),
                None => format!("sites: {}", names.join(", ")),
            };
            cx.error(
                span,
                format!("default-site {name:?} is not a declared site"),
            )
            .help = Some(help);
            None
        }
        Some((name, _)) => Some(name),
    };
    (sites.sites, default_site)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn problems(text: &str) -> Vec<(usize, usize, String)> {
        match Config::parse(text, Path::new("/etc/cistern/config.kdl")) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn a_file_of_sites_only_opens_no_plaintext_listener() {
        let site = "site \"a.test\" {\n    tls cert=\"a.pem\" key=\"a.key\"\n    upstream \"http://o.test/\"\n}\n";
        let parse = |text: &str| Config::parse(text, Path::new("/etc/cistern/config.kdl")).unwrap();
        assert!(parse(site).listeners.is_empty());
        let with_mirror = format!(
            "{site}mirror \"m\" {{\n    prefix \"/m/\"\n    upstream \"http://o.test/\"\n}}\n"
        );
        assert_eq!(
            parse(&with_mirror).listeners.len(),
            1,
            "a mirror needs the default listener"
        );
        let with_forward = format!("{site}forward {{\n}}\n");
        assert_eq!(
            parse(&with_forward).listeners.len(),
            1,
            "so does the forward proxy"
        );
    }

    #[test]
    fn a_site_reads_with_its_defaults() {
        let text = r#"
site "WWW.Example.org" {
    tls cert="certs/a.pem" key="certs/a.key"
    upstream "https://origin.example.org"
    upstream "http://backup.example.org/b"
}
site "other.example.org" {
    listen "127.0.0.1:8443"
    listen "[::1]:9443"
    tls cert="/abs/o.pem" key="/abs/o.key"
    upstream "http://o.example.org/"
}
default-site "www.example.org"
"#;
        let c = Config::parse(text, Path::new("/etc/cistern/config.kdl")).unwrap();
        assert_eq!(c.sites.len(), 2);
        let s = &c.sites[0];
        assert_eq!(s.name, "www.example.org", "names are lower case");
        assert_eq!(s.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(s.cert, Path::new("/etc/cistern/certs/a.pem"));
        assert_eq!(s.key, Path::new("/etc/cistern/certs/a.key"));
        assert_eq!(s.upstreams[0], "https://origin.example.org/");
        assert_eq!(s.upstreams[1], "http://backup.example.org/b/");
        assert_eq!(c.default_site.as_deref(), Some("www.example.org"));
        assert_eq!(
            c.tls_listeners(),
            vec![
                "127.0.0.1:8443".parse().unwrap(),
                "[::1]:9443".parse().unwrap()
            ]
        );
        assert_eq!(
            c.named_files(),
            vec![
                Path::new("/etc/cistern/certs/a.pem"),
                Path::new("/etc/cistern/certs/a.key"),
                Path::new("/abs/o.pem"),
                Path::new("/abs/o.key"),
            ]
        );
    }

    #[test]
    fn site_mistakes_are_pinned_to_their_place() {
        let cases: &[(&str, (usize, usize), &str)] = &[
            (
                "site \"a.test\" {\n    upstream \"http://o/\"\n}\n",
                (1, 6),
                "has no `tls`",
            ),
            (
                "site \"a.test\" {\n    tls cert=\"c.pem\"\n    upstream \"http://o/\"\n}\n",
                (2, 5),
                "`tls` needs key=",
            ),
            (
                "site \"a.test\" {\n    tls cert=\"c.pem\" key=\"k.pem\"\n}\n",
                (1, 6),
                "has no upstream",
            ),
            ("site \"*.a.test\" {\n}\n", (1, 6), "wildcard"),
            ("site \"127.0.0.1\" {\n}\n", (1, 6), "IP address"),
            ("site \"a_b.test\" {\n}\n", (1, 6), "not a host name"),
            (
                "listen \"127.0.0.1:8443\"\nsite \"a.test\" {\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n}\n",
                (2, 6),
                "already a plaintext listener (line 1)",
            ),
            (
                "site \"a.test\" {\n    listen \"127.0.0.1:8080\"\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n}\nmirror \"m\" {\n    prefix \"/m/\"\n    upstream \"http://o/\"\n}\n",
                (2, 12),
                "already a plaintext listener (the default",
            ),
            (
                "site \"a.test\" {\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n}\ndefault-site \"b.test\"\n",
                (5, 14),
                "default-site \"b.test\" is not a declared site",
            ),
            (
                "site \"a.test\" {\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n}\nsite \"A.test\" {\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n}\n",
                (5, 6),
                "declared twice (first on line 1)",
            ),
            (
                "site \"a.test\" {\n    tls cert=\"c\" key=\"k\"\n    upstream \"http://o/\"\n    policies \"nope\"\n}\n",
                (4, 14),
                "policy \"nope\" is not declared",
            ),
        ];
        for (text, (line, column), message) in cases {
            let got = problems(text);
            assert!(
                got.iter()
                    .any(|(l, c, m)| (*l, *c) == (*line, *column) && m.contains(message)),
                "{text}\nwant {line}:{column} {message:?}\ngot {got:?}"
            );
        }
    }
}
