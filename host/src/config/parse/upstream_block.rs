//! The upstream block: the nodes `mirror` and `site` share (`upstream`,
//! `policies`, `stale-if-error`, `stale-while-revalidate`, `forwarded-for`,
//! `health`), defined once in
//! [`upstream_rules`] and read into an [`UpstreamBlock`], so an option of
//! every upstream set is added in this one place. The stale readers also
//! serve the `forward` block, which has stale rules but no upstreams.

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use kdl::KdlNode;
use miette::SourceSpan;

use super::health::health;
use super::policy::policy_list;
use super::walker::{Cx, Rule, Shape, duration_node, many, once};
use crate::config::model::*;

/// `stale-if-error "1d"` (zero turns it off).
pub(super) fn stale_if_error(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.if_error = d;
    }
}

/// `stale-while-revalidate "30s"` (zero turns it off).
pub(super) fn stale_while_revalidate(cx: &mut Cx<'_>, node: &KdlNode, rules: &mut StaleRules) {
    if let Some(d) = duration_node(cx, node, true) {
        rules.while_revalidate = d;
    }
}

/// `forwarded-for "replace" | "append" | "off"`.
pub(super) fn forwarded_for(cx: &mut Cx<'_>, node: &KdlNode, mode: &mut ForwardedFor) {
    let e = cx.entries(
        node,
        &Shape::leaf(
            (1, 1),
            "forwarded-for \"replace\"  // or \"append\", \"off\"",
        ),
    );
    let Some(arg) = e.arg(0) else { return };
    let Some(text) = cx.string(e.name, arg) else {
        return;
    };
    *mode = match text {
        "replace" => ForwardedFor::Replace,
        "append" => ForwardedFor::Append,
        "off" => ForwardedFor::Off,
        other => {
            cx.error(
                arg.span(),
                format!("`forwarded-for`: unknown mode {other:?}"),
            )
            .help = Some("use \"replace\", \"append\" or \"off\"".to_owned());
            return;
        }
    };
}

/// How one kind of upstream-backed block words its upstreams in messages.
pub(super) struct UpstreamHints {
    /// The block's node name: "mirror", "site".
    pub(super) block: &'static str,
    /// How to write an `upstream` node, for "wrong arguments" help.
    pub(super) usage: &'static str,
    /// The base URL shown when an `upstream` URL is bad.
    pub(super) example: &'static str,
    /// The URL suggested when the block has no `upstream` at all.
    pub(super) missing: &'static str,
}

/// The shared part of an upstream-backed block as read: its upstream set,
/// the policies it names and its stale rules.
pub(super) struct UpstreamBlock {
    hints: &'static UpstreamHints,
    /// Any `upstream` node at all, valid or not: a bad one is already
    /// reported and must not also read as "no upstream".
    given: bool,
    upstreams: Vec<Uri>,
    weights: Vec<u32>,
    refs: Vec<(String, SourceSpan)>,
    stale: StaleRules,
    forwarded_for: ForwardedFor,
    health: HealthConfig,
}

/// What an [`UpstreamBlock`] yields for the block's config.
pub(super) struct Upstreams {
    /// The base URLs, in the order given, without repeats.
    pub(super) upstreams: Vec<Uri>,
    /// The names in the block's `policies`.
    pub(super) policies: Vec<String>,
    /// `stale-if-error` and `stale-while-revalidate`.
    pub(super) stale: StaleRules,
    /// `forwarded-for`.
    pub(super) forwarded_for: ForwardedFor,
    /// Each upstream's `weight=`, in the order of `upstreams`.
    pub(super) weights: Vec<u32>,
    /// `health { … }`.
    pub(super) health: HealthConfig,
}

/// A block's draft that holds an [`UpstreamBlock`], so that
/// [`upstream_rules`] can read into it.
pub(super) trait HasUpstreamBlock {
    /// The draft's upstream block.
    fn upstream_block(&mut self) -> &mut UpstreamBlock;
}

/// The nodes every upstream-backed block accepts, after its own (see
/// [`Cx::children_with`]).
pub(super) const fn upstream_rules<T: HasUpstreamBlock>() -> [Rule<T>; 6] {
    [
        many("upstream", |cx, n, d| d.upstream_block().upstream(cx, n)),
        once("policies", |cx, n, d| {
            d.upstream_block().refs = policy_list(cx, n)
        }),
        once("stale-if-error", |cx, n, d| {
            stale_if_error(cx, n, &mut d.upstream_block().stale)
        }),
        once("stale-while-revalidate", |cx, n, d| {
            stale_while_revalidate(cx, n, &mut d.upstream_block().stale)
        }),
        once("forwarded-for", |cx, n, d| {
            forwarded_for(cx, n, &mut d.upstream_block().forwarded_for)
        }),
        once("health", |cx, n, d| {
            health(cx, n, &mut d.upstream_block().health)
        }),
    ]
}

impl UpstreamBlock {
    /// An empty block of the kind `hints` describes.
    pub(super) fn new(hints: &'static UpstreamHints) -> UpstreamBlock {
        UpstreamBlock {
            hints,
            given: false,
            upstreams: Vec::new(),
            weights: Vec::new(),
            refs: Vec::new(),
            stale: StaleRules::default(),
            forwarded_for: ForwardedFor::Replace,
            health: HealthConfig::default(),
        }
    }

    /// Reports a block named `name` (at `span`) that has no `upstream`.
    pub(super) fn require_upstream(&self, cx: &mut Cx<'_>, name: &str, span: SourceSpan) {
        if !self.given {
            let block = self.hints.block;
            cx.error(span, format!("{block} {name:?} has no upstream"))
                .help = Some(format!(
                "add at least one: upstream \"{}\"",
                self.hints.missing
            ));
        }
    }

    /// The block's parts, its policy references added to `policy_refs`
    /// for the check against the declarations.
    pub(super) fn finish(self, policy_refs: &mut Vec<(String, SourceSpan)>) -> Upstreams {
        policy_refs.extend(self.refs.iter().cloned());
        Upstreams {
            upstreams: self.upstreams,
            policies: self.refs.into_iter().map(|(n, _)| n).collect(),
            stale: self.stale,
            forwarded_for: self.forwarded_for,
            weights: self.weights,
            health: self.health,
        }
    }

    /// One `upstream "URL" weight=N` child, added to the set unless it is
    /// invalid or listed twice.
    fn upstream(&mut self, cx: &mut Cx<'_>, node: &KdlNode) {
        self.given = true;
        let e = cx.entries(
            node,
            &Shape {
                args: (1, 1),
                props: &["weight"],
                children: false,
                usage: self.hints.usage,
            },
        );
        // A share of the set's files: 1 unless given; zero would be a
        // mirror that is never chosen, which is no mirror at all.
        let weight = match e.prop("weight") {
            None => Some(1),
            Some(w) => cx.integer::<u32>("weight", w, 1),
        };
        let Some(arg) = e.arg(0) else { return };
        let Some(text) = cx.string(e.name, arg) else {
            return;
        };
        match upstream_url(text) {
            Ok(uri) if self.upstreams.contains(&uri) => {
                cx.error(arg.span(), format!("upstream {uri} is listed twice"));
            }
            Ok(uri) => {
                self.upstreams.push(uri);
                self.weights.push(weight.unwrap_or(1));
            }
            Err(why) => {
                cx.error(arg.span(), format!("`upstream` {text:?} {why}"))
                    .help = Some(format!("write a base URL, like \"{}\"", self.hints.example));
            }
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
        // ftp:// goes through the FTP gateway (fetch/ftp.rs), anonymously.
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS || s.as_str() == "ftp" => s.clone(),
        Some(s) => return Err(format!("uses {s}: only http, https and ftp are supported")),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/cistern/config.kdl"))
    }

    const SHARED: &str = "    upstream \"http://a.test/\"\n    upstream \"https://b.test/x\"\n    policies \"p\"\n    stale-if-error \"2h\"\n    stale-while-revalidate \"5s\"\n";

    #[test]
    fn mirror_and_site_read_the_upstream_block_alike() {
        let text = format!(
            "policy \"p\" path=\"builtin:distro\"\nmirror \"m\" {{\n{SHARED}}}\nsite \"s.test\" {{\n    tls cert=\"c\" key=\"k\"\n{SHARED}}}\n"
        );
        let c = parse(&text).unwrap_or_else(|e| panic!("{}", e.report()));
        let (m, s) = (&c.mirrors[0], &c.sites[0]);
        assert_eq!(m.upstreams, ["http://a.test/", "https://b.test/x/"]);
        assert_eq!(m.upstreams, s.upstreams);
        assert_eq!(m.policies, ["p"]);
        assert_eq!(m.policies, s.policies);
        assert_eq!(m.stale.if_error.as_secs(), 7200);
        assert_eq!(m.stale.while_revalidate.as_secs(), 5);
        assert_eq!(m.stale, s.stale);
    }

    #[test]
    fn an_unknown_node_lists_the_blocks_own_nodes_then_the_shared_ones() {
        let cases = [
            (
                "mirror \"m\" {\n    qqqqqqqqqq 1\n}\n",
                "expected one of: prefix, query, serve-locally, upstream, policies, stale-if-error,",
            ),
            (
                "site \"s.test\" {\n    qqqqqqqqqq 1\n}\n",
                "expected one of: listen, tls, preserve-host, upstream, policies, stale-if-error,",
            ),
        ];
        for (text, help) in cases {
            let report = parse(text).expect_err(text).report();
            assert!(report.contains(help), "{text}\nwant {help:?}\ngot {report}");
            assert!(report.contains("forwarded-for"), "{report}");
        }
    }

    #[test]
    fn a_shared_single_node_given_twice_is_refused_in_either_block() {
        for block in ["mirror \"m\"", "site \"s.test\""] {
            let text =
                format!("{block} {{\n    stale-if-error \"1h\"\n    stale-if-error \"2h\"\n}}\n");
            let problems = parse(&text).expect_err(&text).problems();
            assert!(
                problems.iter().any(|(l, c, m)| (*l, *c) == (3, 5)
                    && m == "`stale-if-error` is given twice (first on line 2)"),
                "{text}\n{problems:?}"
            );
        }
    }

    #[test]
    fn weights_and_health_are_read_in_mirrors_and_sites_alike() {
        let block = "    upstream \"http://a.test/\" weight=10\n    upstream \"http://b.test/\"\n    health {\n        probe \"/trace/master\"\n        interval \"5s\"\n        timeout \"1s\"\n        fail-after 4\n        ok-after 3\n        retry \"1m\"\n        retry-max \"1h\"\n    }\n";
        let text = format!(
            "mirror \"m\" {{\n{block}}}\nsite \"s.test\" {{\n    tls cert=\"c\" key=\"k\"\n{block}}}\n"
        );
        let c = parse(&text).unwrap_or_else(|e| panic!("{}", e.report()));
        let (m, s) = (&c.mirrors[0], &c.sites[0]);
        assert_eq!(m.weights, [10, 1]);
        assert_eq!(m.health.probe.as_deref(), Some("trace/master"));
        assert_eq!(m.health.interval.as_secs(), 5);
        assert_eq!(m.health.timeout.as_secs(), 1);
        assert_eq!((m.health.fail_after, m.health.ok_after), (4, 3));
        assert_eq!(m.health.retry.as_secs(), 60);
        assert_eq!(m.health.retry_max.as_secs(), 3600);
        assert_eq!((&s.weights, &s.health), (&m.weights, &m.health));
        let plain = parse("mirror \"m\" {\n    upstream \"http://a.test/\"\n}\n").unwrap();
        assert_eq!(plain.mirrors[0].weights, [1]);
        assert_eq!(
            plain.mirrors[0].health,
            crate::config::HealthConfig::default()
        );
        assert_eq!(
            plain.mirrors[0].health.probe, None,
            "no probes unless asked"
        );
    }

    #[test]
    fn bad_weights_and_health_settings_are_refused_with_their_place() {
        let cases = [
            (
                "upstream \"http://a.test/\" weight=0",
                "`weight`: 0 is out of range (1 to 4294967295)",
            ),
            (
                "upstream \"http://a.test/\" weight=\"heavy\"",
                "`weight` expects a whole number here",
            ),
            ("upstream \"http://a.test/\" wait=2", "wait"),
            (
                "upstream \"http://a.test/\"\n    health {\n        probe \"../x\"\n    }",
                "cannot climb above",
            ),
            (
                "upstream \"http://a.test/\"\n    health {\n        probe \"http://x/\"\n    }",
                "not a URL",
            ),
            (
                "upstream \"http://a.test/\"\n    health {\n        fail-after 0\n    }",
                "`fail-after`: 0 is out of range",
            ),
            (
                "upstream \"http://a.test/\"\n    health {\n        interval \"0s\"\n    }",
                "`interval` must be longer than zero",
            ),
            (
                "upstream \"http://a.test/\"\n    health {\n        retry \"5m\"\n        retry-max \"1m\"\n    }",
                "retry-max (60s) is shorter than retry (300s)",
            ),
            (
                "upstream \"http://a.test/\"\n    health {\n        probes \"/x\"\n    }",
                "probe",
            ),
        ];
        for (body, want) in cases {
            let text = format!("mirror \"m\" {{\n    {body}\n}}\n");
            let report = parse(&text).expect_err(&text).report();
            assert!(report.contains(want), "{text}\nwant {want:?}\ngot {report}");
        }
    }
}
