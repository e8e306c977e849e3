//! The KDL document → [`Config`] walk.
//!
//! Every block is a table of [`Rule`]s: a child node name, whether it may
//! repeat, and the function that reads it. Adding a node kind (a later
//! `site` or `admin` block) is one function and one table line. Problems are
//! collected in [`Cx`] and never stop the walk, so one run reports them all.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use ipnet::IpNet;
use kdl::{KdlDocument, KdlEntry, KdlNode};
use miette::{NamedSource, SourceSpan};

use super::error::{ConfigError, Problem};
use super::model::*;

mod site;
mod walker;

use walker::{
    BLOCK, Cx, PATH_ARG, Rule, Shape, bool_node, duration_node, many, once, suggest, syntax_problem,
};

/// Default policy wall-clock budget per hook call.
const DEFAULT_POLICY_DEADLINE: Duration = Duration::from_millis(50);
/// Default cap on a policy's linear memory.
const DEFAULT_POLICY_MEMORY: u64 = 16 << 20;
/// One WebAssembly page: no module can run with less.
const WASM_PAGE: u64 = 64 << 10;
/// The listener used when the file names none.
pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The admin listener used when the file has no `admin` block.
pub(super) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// Parses and validates `text`, read from `name`. Relative paths resolve
/// against `name`'s directory. With `check_files`, files the config names
/// (CA files, policy modules) must exist.
pub(super) fn parse(text: &str, name: &Path, check_files: bool) -> Result<Config, ConfigError> {
    let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
        src: NamedSource::new(name.display().to_string(), Arc::from(text)).with_language("kdl"),
        problems,
    };
    let doc = match KdlDocument::parse_v2(text) {
        Ok(doc) => doc,
        Err(e) => {
            let mut problems: Vec<Problem> = e
                .diagnostics
                .iter()
                .map(|d| syntax_problem(text, d))
                .collect();
            if problems.is_empty() {
                problems.push(Problem::new(text, (0, 0).into(), "invalid KDL"));
            }
            problems.sort_by_key(|p| p.span.offset());
            return Err(invalid(problems));
        }
    };
    let base = name.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut cx = Cx {
        text,
        base,
        check_files,
        problems: Vec::new(),
    };
    let mut top = Top::default();
    cx.block(&doc, TOP_LEVEL, &mut top);
    let config = top.finish(&mut cx, name);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        // Cross-checks run after the walk; report in file order regardless.
        cx.problems.sort_by_key(|p| p.span.offset());
        Err(invalid(cx.problems))
    }
}

// ---------------------------------------------------------------------------
// Top level

/// The top-level draft: the config's parts as read, plus what the
/// cross-checks in [`Top::finish`] need.
#[derive(Default)]
struct Top {
    listeners: Vec<Listener>,
    listen_seen: HashMap<SocketAddr, SourceSpan>,
    store: Option<StoreConfig>,
    forward: Option<ForwardConfig>,
    mirrors: Vec<MirrorConfig>,
    mirror_names: HashMap<String, SourceSpan>,
    mirror_prefixes: HashMap<String, SourceSpan>,
    limits: LimitsConfig,
    timeouts: Timeouts,
    mode: CacheMode,
    upstream_tls: UpstreamTls,
    policies: Vec<PolicyDecl>,
    policy_names: HashMap<String, SourceSpan>,
    limiters: Vec<NamedLimiter>,
    limiter_names: HashMap<String, SourceSpan>,
    /// `site` blocks and `default-site` (see [`site`]).
    sites: site::Sites,
    /// Every policy name used by a route, checked against the declarations
    /// once the whole file is read (declarations may come later).
    policy_refs: Vec<(String, SourceSpan)>,
    /// The `admin` block, if the file has one, with the span of its
    /// `listen` address for the cross-check against proxy listeners.
    admin: Option<(AdminConfig, Option<SourceSpan>)>,
    /// `server-name` nodes.
    server_names: Vec<ServerName>,
}

const TOP_LEVEL: &[Rule<Top>] = &[
    many("listen", listen),
    once("store", store),
    once("forward", forward),
    many("mirror", mirror),
    once("limit", limit),
    many("limiter", limiter),
    once("timeouts", timeouts),
    once("mode", mode),
    once("upstream-tls", upstream_tls),
    many("policy", policy),
    many("site", site::site),
    once("default-site", site::default_site),
    once("admin", admin),
    many("server-name", |cx, n, top| {
        let names = server_names(cx, n, "server-name \"cache.lan\" \"cache.example.org:80\"");
        top.server_names.extend(names);
    }),
];

impl Top {
    /// Cross-checks and defaults that need the whole file.
    fn finish(self, cx: &mut Cx<'_>, name: &Path) -> Config {
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
        }
    }
}

/// Forward-proxy defaults: on, loopback clients only, CONNECT to 443.
pub(super) fn default_forward() -> ForwardConfig {
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
    }
}

/// `stale-if-error "1d"` (zero turns it off).
fn stale_if_error(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.if_error = d;
    }
}

/// `stale-while-revalidate "30s"` (zero turns it off).
fn stale_while_revalidate(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.while_revalidate = d;
    }
}

/// `root` with `.cistern` appended (`/srv/replica` → `/srv/replica.cistern`),
/// or `root/.cistern` when the root has no last component to extend (`/`).
pub(super) fn default_state(root: &Path) -> PathBuf {
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

/// `listen "ADDR:PORT"`
fn listen(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
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

// ---------------------------------------------------------------------------
// store { … }

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

fn store(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
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

// ---------------------------------------------------------------------------
// forward { … }

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
];

fn forward(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
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

/// `policies "a" "b"`: names with their spans, duplicates refused.
fn policy_list(cx: &mut Cx<'_>, node: &KdlNode) -> Vec<(String, SourceSpan)> {
    let e = cx.entries(
        node,
        &Shape::leaf((1, usize::MAX), "policies \"store-id\" \"distro\""),
    );
    let mut out: Vec<(String, SourceSpan)> = Vec::new();
    for arg in &e.args {
        let Some(name) = cx.ident(e.name, arg) else {
            continue;
        };
        if out.iter().any(|(n, _)| n == name) {
            cx.error(arg.span(), format!("`policies`: {name:?} is listed twice"));
            continue;
        }
        out.push((name.to_owned(), arg.span()));
    }
    out
}

// ---------------------------------------------------------------------------
// mirror NAME { … }

struct MirrorDraft {
    prefix: Option<(String, SourceSpan)>,
    /// Any `upstream` node at all, valid or not: a bad one is already
    /// reported and must not also read as "no upstream".
    upstream_given: bool,
    upstreams: Vec<Uri>,
    refs: Vec<(String, SourceSpan)>,
    stale: StaleRules,
}

const MIRROR: &[Rule<MirrorDraft>] = &[
    once("prefix", mirror_prefix),
    many("upstream", mirror_upstream),
    once("policies", |cx, n, d| d.refs = policy_list(cx, n)),
    once("stale-if-error", |cx, n, d| {
        stale_if_error(cx, n, &mut d.stale)
    }),
    once("stale-while-revalidate", |cx, n, d| {
        stale_while_revalidate(cx, n, &mut d.stale)
    }),
];

fn mirror(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &[],
            children: true,
            usage: "mirror \"debian\" { upstream \"http://deb.debian.org/debian/\" }",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let mut d = MirrorDraft {
        prefix: None,
        upstream_given: false,
        upstreams: Vec::new(),
        refs: Vec::new(),
        stale: StaleRules::default(),
    };
    cx.children(node, MIRROR, &mut d);
    let Some(name) = name else { return };
    let name_span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if let Some(first) = top.mirror_names.get(name) {
        let line = cx.line_of(*first);
        cx.error(
            name_span,
            format!("mirror {name:?} is declared twice (first on line {line})"),
        );
        return;
    }
    top.mirror_names.insert(name.to_owned(), name_span);
    if !d.upstream_given {
        cx.error(name_span, format!("mirror {name:?} has no upstream"))
            .help =
            Some("add at least one: upstream \"https://mirror.example.org/path/\"".to_owned());
    }
    // The default prefix is the name, so `mirror "debian"` serves /debian/.
    let (prefix, prefix_span) = d.prefix.unwrap_or_else(|| (format!("/{name}/"), name_span));
    if let Some(first) = top.mirror_prefixes.get(&prefix) {
        let line = cx.line_of(*first);
        cx.error(
            prefix_span,
            format!("prefix {prefix:?} is already served by the mirror on line {line}"),
        );
    } else {
        top.mirror_prefixes.insert(prefix.clone(), prefix_span);
    }
    top.policy_refs.extend(d.refs.iter().cloned());
    top.mirrors.push(MirrorConfig {
        name: name.to_owned(),
        prefix,
        upstreams: d.upstreams,
        policies: d.refs.into_iter().map(|(n, _)| n).collect(),
        stale: d.stale,
    });
}

fn mirror_prefix(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    let e = cx.entries(node, &Shape::leaf((1, 1), "prefix \"/debian/\""));
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    let problem = if !text.starts_with('/') {
        Some("must start with '/'")
    } else if text.contains(['?', '#']) || text.chars().any(char::is_whitespace) {
        Some("is a path: it cannot hold '?', '#' or spaces")
    } else if text.contains("//") {
        Some("has an empty segment (\"//\")")
    } else if text.split('/').any(|seg| seg == "." || seg == "..") {
        Some("cannot hold '.' or '..' segments")
    } else {
        None
    };
    if let Some(why) = problem {
        cx.error(arg.span(), format!("`prefix` {text:?} {why}"))
            .help = Some("write it as a path, like \"/debian/\"".to_owned());
        return;
    }
    // A prefix is a directory: "/debian" must not also match "/debian-security".
    let mut prefix = text.to_owned();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    d.prefix = Some((prefix, arg.span()));
}

fn mirror_upstream(cx: &mut Cx<'_>, node: &KdlNode, d: &mut MirrorDraft) {
    d.upstream_given = true;
    upstream_entry(
        cx,
        node,
        "upstream \"http://deb.debian.org/debian/\"",
        "http://deb.debian.org/debian/",
        &mut d.upstreams,
    );
}

/// One `upstream "URL"` child of a mirror or a site, added to `upstreams`
/// unless it is invalid or listed twice. `usage` and `example` are shown in
/// messages.
fn upstream_entry(
    cx: &mut Cx<'_>,
    node: &KdlNode,
    usage: &'static str,
    example: &str,
    upstreams: &mut Vec<Uri>,
) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &[],
            children: false,
            usage,
        },
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    match upstream_url(text) {
        Ok(uri) if upstreams.contains(&uri) => {
            cx.error(arg.span(), format!("upstream {uri} is listed twice"));
        }
        Ok(uri) => upstreams.push(uri),
        Err(why) => {
            cx.error(arg.span(), format!("`upstream` {text:?} {why}"))
                .help = Some(format!("write a base URL, like \"{example}\""));
        }
    }
}

/// Validates an upstream base URL and makes its path end with `/`, so
/// joining a request's rest-of-path never glues two segments together.
fn upstream_url(text: &str) -> Result<Uri, String> {
    if !text.contains("://") {
        return Err("has no scheme: start it with http:// or https://".to_owned());
    }
    let uri: Uri = text.parse().map_err(|e| format!("is not a URL ({e})"))?;
    let scheme = match uri.scheme() {
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
        Some(s) => return Err(format!("uses {s}: only http and https are supported")),
        None => return Err("has no scheme: start it with http:// or https://".to_owned()),
    };
    let authority: Authority = match uri.authority() {
        Some(a) if !a.host().is_empty() => a.clone(),
        _ => return Err("has no host".to_owned()),
    };
    if authority.as_str().contains('@') {
        return Err(
            "carries credentials (user@host); they would end up in logs and replica paths"
                .to_owned(),
        );
    }
    if uri.port_u16() == Some(0) {
        return Err("has port 0".to_owned());
    }
    if uri.query().is_some() {
        return Err("has a query; a base URL cannot carry one".to_owned());
    }
    let mut path = uri.path().to_owned();
    if !path.ends_with('/') {
        path.push('/');
    }
    let path: PathAndQuery = path.parse().map_err(|e| format!("has a bad path ({e})"))?;
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| format!("is not a URL ({e})"))
}

// ---------------------------------------------------------------------------
// limit { … } and limiter NAME …

const LIMIT: &[Rule<LimitsConfig>] = &[
    once("requests-per-client", limit_requests),
    once("download", limit_download),
    once("max-connections", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-connections 10000") {
            l.max_connections = v;
        }
    }),
    once("max-connections-per-client", |cx, n, l| {
        if let Some(v) = count_node(cx, n, "max-connections-per-client 256") {
            l.max_connections_per_client = v;
        }
    }),
];

/// A leaf with one whole number of at least 1.
fn count_node(cx: &mut Cx<'_>, node: &KdlNode, usage: &'static str) -> Option<u32> {
    let e = cx.entries(node, &Shape::leaf((1, 1), usage));
    let arg = e.arg(0)?;
    cx.integer::<u32>(e.name, arg, 1)
}

fn limit(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    cx.children(node, LIMIT, &mut top.limits);
}

fn limit_requests(cx: &mut Cx<'_>, node: &KdlNode, l: &mut LimitsConfig) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["per", "burst"],
            children: false,
            usage: "requests-per-client 100 per=\"1s\" burst=200",
        },
    );
    l.requests_per_client = cx.rate(e.name, e.arg(0), &e);
}

fn limit_download(cx: &mut Cx<'_>, node: &KdlNode, l: &mut LimitsConfig) {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "download \"10MiB\"  // bytes per second"),
    );
    let Some(arg) = e.arg(0) else { return };
    match cx.size(e.name, arg) {
        Some(0) => {
            cx.error(
                arg.span(),
                "`download` must be more than zero bytes per second",
            )
            .help = Some("leave `download` out for no cap".to_owned());
        }
        Some(n) => l.download_bytes_per_sec = Some(n),
        None => {}
    }
}

fn limiter(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["rate", "per", "burst"],
            children: false,
            usage: "limiter \"per-path\" rate=10 per=\"1m\" burst=10",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let rate_entry = e.prop("rate");
    if rate_entry.is_none() {
        cx.error(node.name().span(), "`limiter` needs rate=N").help =
            Some("usage: limiter \"per-path\" rate=10 per=\"1m\" burst=10".to_owned());
    }
    let rate = cx.rate(e.name, rate_entry, &e);
    let (Some(name), Some(rate)) = (name, rate) else {
        return;
    };
    let span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if let Some(first) = top.limiter_names.get(name) {
        let line = cx.line_of(*first);
        cx.error(
            span,
            format!("limiter {name:?} is declared twice (first on line {line})"),
        );
        return;
    }
    top.limiter_names.insert(name.to_owned(), span);
    top.limiters.push(NamedLimiter {
        name: name.to_owned(),
        rate,
    });
}

// ---------------------------------------------------------------------------
// timeouts { … }

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
];

fn timeouts(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    cx.children(node, TIMEOUTS, &mut top.timeouts);
}

// ---------------------------------------------------------------------------
// upstream-tls { … }

struct TlsDraft {
    tls: UpstreamTls,
    span: SourceSpan,
}

const UPSTREAM_TLS: &[Rule<TlsDraft>] = &[
    once("system-roots", |cx, n, d| {
        if let Some(b) = bool_node(cx, n) {
            d.tls.system_roots = b;
        }
    }),
    many("ca-file", |cx, n, d| {
        let e = cx.entries(n, &PATH_ARG);
        let Some(arg) = e.arg(0) else { return };
        if let Some(path) = cx.path(e.name, arg) {
            cx.existing_file(e.name, arg, &path);
            d.tls.ca_files.push(path);
        }
    }),
];

fn upstream_tls(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    cx.entries(node, &BLOCK);
    let mut d = TlsDraft {
        tls: UpstreamTls::default(),
        span: node.name().span(),
    };
    cx.children(node, UPSTREAM_TLS, &mut d);
    if !d.tls.system_roots && d.tls.ca_files.is_empty() {
        cx.error(
            d.span,
            "`upstream-tls` trusts no certificate authority: every https upstream would fail",
        )
        .help = Some("add a `ca-file \"ca.pem\"` or set `system-roots #true`".to_owned());
    }
    top.upstream_tls = d.tls;
}

// ---------------------------------------------------------------------------
// policy NAME path=… { param … }

const POLICY: &[Rule<Vec<(String, String)>>] = &[many("param", policy_param)];

fn policy(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
    let e = cx.entries(
        node,
        &Shape {
            args: (1, 1),
            props: &["path", "on-error", "isolation", "deadline", "memory"],
            children: true,
            usage: "policy \"distro\" path=\"builtin:distro\" on-error=\"pass\" { param \"key\" \"value\" }",
        },
    );
    let name = e.arg(0).and_then(|a| cx.ident(e.name, a));
    let source = match e.prop("path") {
        None => {
            cx.error(node.name().span(), "`policy` needs path=\"…\"")
                .help = Some(
                "name a module file (path=\"policies/mine.wasm\") or a built-in (path=\"builtin:distro\")"
                    .to_owned(),
            );
            None
        }
        Some(p) => policy_source(cx, p),
    };
    let on_error = match e.prop("on-error") {
        None => Some(OnError::default()),
        Some(v) => match cx.string("on-error", v) {
            Some("pass") => Some(OnError::Pass),
            Some("deny") => Some(OnError::Deny),
            Some(other) => {
                cx.error(v.span(), format!("`on-error`: unknown value {other:?}"))
                    .help =
                    Some("use \"pass\" (fail open) or \"deny\" (fail closed, 503)".to_owned());
                None
            }
            None => None,
        },
    };
    let isolation = match e.prop("isolation") {
        None => Some(Isolation::default()),
        Some(v) => match cx.string("isolation", v) {
            Some("reuse") => Some(Isolation::Reuse),
            Some("fresh") => Some(Isolation::Fresh),
            Some(other) => {
                cx.error(v.span(), format!("`isolation`: unknown value {other:?}"))
                    .help = Some("use \"reuse\" or \"fresh\"".to_owned());
                None
            }
            None => None,
        },
    };
    let deadline = match e.prop("deadline") {
        None => Some(DEFAULT_POLICY_DEADLINE),
        Some(v) => cx.positive_duration("deadline", v),
    };
    let memory_limit = match e.prop("memory") {
        None => Some(DEFAULT_POLICY_MEMORY),
        Some(v) => {
            match cx.size("memory", v) {
                Some(n) if n < WASM_PAGE => {
                    cx.error(
                    v.span(),
                    format!("`memory` must be at least 64KiB (one WebAssembly page), found {n} bytes"),
                );
                    None
                }
                other => other,
            }
        }
    };
    let mut params = Vec::new();
    cx.children(node, POLICY, &mut params);
    let Some(name) = name else { return };
    let span = e.arg(0).map_or(node.name().span(), KdlEntry::span);
    if let Some(first) = top.policy_names.get(name) {
        let line = cx.line_of(*first);
        cx.error(
            span,
            format!("policy {name:?} is declared twice (first on line {line})"),
        );
        return;
    }
    top.policy_names.insert(name.to_owned(), span);
    let (Some(source), Some(on_error), Some(isolation), Some(deadline), Some(memory_limit)) =
        (source, on_error, isolation, deadline, memory_limit)
    else {
        return;
    };
    top.policies.push(PolicyDecl {
        name: name.to_owned(),
        source,
        on_error,
        isolation,
        deadline,
        memory_limit,
        params,
    });
}

fn policy_source(cx: &mut Cx<'_>, entry: &KdlEntry) -> Option<PolicySource> {
    let text = cx.string("path", entry)?;
    if let Some(builtin) = text.strip_prefix("builtin:") {
        if builtin.is_empty() {
            cx.error(
                entry.span(),
                "`path`: \"builtin:\" needs a policy name after it",
            )
            .help = Some("e.g. path=\"builtin:distro\"".to_owned());
            return None;
        }
        return Some(PolicySource::Builtin(builtin.to_owned()));
    }
    let path = cx.path("path", entry)?;
    cx.existing_file("path", entry, &path);
    Some(PolicySource::File(path))
}

fn policy_param(cx: &mut Cx<'_>, node: &KdlNode, params: &mut Vec<(String, String)>) {
    let e = cx.entries(node, &Shape::leaf((2, 2), "param \"key\" \"value\""));
    let key = e.arg(0).and_then(|a| cx.string(e.name, a));
    let value = e.arg(1).and_then(|a| cx.string(e.name, a));
    if let (Some(k), Some(v)) = (key, value) {
        params.push((k.to_owned(), v.to_owned()));
    }
}

// ---------------------------------------------------------------------------
// admin { listen …  enabled … }

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
fn admin(cx: &mut Cx<'_>, node: &KdlNode, top: &mut Top) {
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
fn admin_finish(
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

// ---------------------------------------------------------------------------
// server-name "…" …   and   admin { host "…" … }

/// The names of a `server-name` or admin `host` node: host names or IP
/// literals, each with an optional port (`"cache.lan"`, `"[::1]:80"`).
fn server_names(cx: &mut Cx<'_>, node: &KdlNode, usage: &'static str) -> Vec<ServerName> {
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
