//! The generic KDL walker: the walk's context [`Cx`], the [`Rule`]s a block
//! accepts, a node's [`Shape`] and its [`Entries`], the typed value readers
//! and the diagnostics (positions, suggestions for misspelt names).
//!
//! It knows no block: each block's rules live in a file of their own next
//! to this one and read their nodes through these helpers, so every
//! problem carries file, line and column the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};
use miette::SourceSpan;

use crate::config::error::Problem;
use crate::config::model::RequestRate;
use crate::config::units::{parse_duration, parse_size};

/// A KDL syntax error as a problem. KDL v1's bare `true`, `false` and
/// `null` are the likeliest mistake and kdl's message for them ("Expected
/// identifier string") does not say so, so they get their own.
pub(super) fn syntax_problem(text: &str, d: &kdl::KdlDiagnostic) -> Problem {
    let start = d.span.offset();
    let token = text.get(start..start + d.span.len()).unwrap_or("").trim();
    if let Some(fix) = match token {
        "true" | "false" | "null" => Some(format!("#{token}")),
        _ => None,
    } {
        let mut p = Problem::new(
            text,
            d.span,
            format!("bare `{token}` is not a KDL v2 value; write {fix}"),
        );
        p.help = Some("KDL v2 writes keywords with a hash: #true, #false, #null".to_owned());
        return p;
    }
    let mut p = Problem::new(
        text,
        d.span,
        d.message
            .clone()
            .unwrap_or_else(|| "invalid KDL".to_owned()),
    );
    p.label = d.label.clone();
    p.help = d.help.clone();
    p
}

/// The walk's context: the text (for positions), the directory relative
/// paths resolve against, and every problem so far.
pub(super) struct Cx<'t> {
    pub(super) text: &'t str,
    pub(super) base: PathBuf,
    pub(super) check_files: bool,
    pub(super) problems: Vec<Problem>,
}

/// Reads one child node into the block's draft `T`.
type Handler<T> = fn(&mut Cx<'_>, &KdlNode, &mut T);

/// A child node a block accepts.
pub(super) struct Rule<T> {
    name: &'static str,
    /// May the node appear more than once in its block?
    repeat: bool,
    read: Handler<T>,
}

/// A node that may appear once in its block.
pub(super) const fn once<T>(name: &'static str, read: Handler<T>) -> Rule<T> {
    Rule {
        name,
        repeat: false,
        read,
    }
}

/// A node that may repeat in its block.
pub(super) const fn many<T>(name: &'static str, read: Handler<T>) -> Rule<T> {
    Rule {
        name,
        repeat: true,
        read,
    }
}

/// What a node may carry besides its name.
pub(super) struct Shape {
    /// Fewest and most positional arguments.
    pub(super) args: (usize, usize),
    /// Property names accepted.
    pub(super) props: &'static [&'static str],
    /// Whether a `{ … }` block is accepted.
    pub(super) children: bool,
    /// How to write the node, for "wrong arguments" help. `NAME` stands
    /// for the node's own name, so one shape serves several nodes.
    pub(super) usage: &'static str,
}

impl Shape {
    /// A node with `args` positional arguments (fewest, most) and neither
    /// properties nor a block.
    pub(super) const fn leaf(args: (usize, usize), usage: &'static str) -> Shape {
        Shape {
            args,
            props: &[],
            children: false,
            usage,
        }
    }

    /// A named block, `NAME "name" { … }`: one argument, no properties.
    pub(super) const fn named_block(usage: &'static str) -> Shape {
        Shape {
            args: (1, 1),
            props: &[],
            children: true,
            usage,
        }
    }
}

/// A node's entries after the shape checks: positional arguments in order
/// and the accepted properties by name.
pub(super) struct Entries<'n> {
    pub(super) name: &'n str,
    pub(super) args: Vec<&'n KdlEntry>,
    props: HashMap<&'n str, &'n KdlEntry>,
}

impl<'n> Entries<'n> {
    pub(super) fn arg(&self, i: usize) -> Option<&'n KdlEntry> {
        self.args.get(i).copied()
    }

    pub(super) fn prop(&self, name: &str) -> Option<&'n KdlEntry> {
        self.props.get(name).copied()
    }
}

impl Cx<'_> {
    /// Records a problem; returns it for adding a label or help.
    pub(super) fn error(&mut self, span: SourceSpan, message: impl Into<String>) -> &mut Problem {
        let span = self.trim(span);
        self.problems.push(Problem::new(self.text, span, message));
        self.problems.last_mut().expect("just pushed")
    }

    /// kdl's entry and node spans include surrounding whitespace; point at
    /// the text itself so the column is where the user looks.
    fn trim(&self, span: SourceSpan) -> SourceSpan {
        let start = span.offset().min(self.text.len());
        let end = (start + span.len()).min(self.text.len());
        let Some(slice) = self.text.get(start..end) else {
            return span;
        };
        let lead = slice.len() - slice.trim_start().len();
        let trimmed = slice.trim();
        if trimmed.is_empty() {
            return span;
        }
        SourceSpan::new((start + lead).into(), trimmed.len())
    }

    pub(super) fn line_of(&self, span: SourceSpan) -> usize {
        Problem::new(self.text, self.trim(span), "").line
    }

    /// Records that the `kind` named `name` is declared at `span`; a second
    /// declaration of the name is a problem. Returns whether it is the first.
    pub(super) fn declare(
        &mut self,
        names: &mut HashMap<String, SourceSpan>,
        kind: &str,
        name: &str,
        span: SourceSpan,
    ) -> bool {
        if let Some(first) = names.get(name) {
            let line = self.line_of(*first);
            self.error(
                span,
                format!("{kind} {name:?} is declared twice (first on line {line})"),
            );
            return false;
        }
        names.insert(name.to_owned(), span);
        true
    }

    /// Walks a block's children against its rules: unknown names and
    /// repeats of single nodes are problems; the rest go to their readers.
    pub(super) fn block<T>(&mut self, doc: &KdlDocument, rules: &[Rule<T>], draft: &mut T) {
        self.walk(doc, &[rules], draft);
    }

    /// [`Cx::block`] over several tables read as one, in order: a block's
    /// own rules and the rule sets it shares with other blocks.
    fn walk<T>(&mut self, doc: &KdlDocument, tables: &[&[Rule<T>]], draft: &mut T) {
        let rules = || tables.iter().flat_map(|t| t.iter());
        let mut seen: HashMap<&'static str, SourceSpan> = HashMap::new();
        for node in doc.nodes() {
            let name = node.name().value();
            let Some(rule) = rules().find(|r| r.name == name) else {
                let names: Vec<&str> = rules().map(|r| r.name).collect();
                let help = match suggest(name, &names) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("expected one of: {}", names.join(", ")),
                };
                self.error(node.name().span(), format!("unknown node `{name}`"))
                    .help = Some(help);
                continue;
            };
            if !rule.repeat {
                if let Some(first) = seen.get(rule.name) {
                    let line = self.line_of(*first);
                    self.error(
                        node.name().span(),
                        format!("`{name}` is given twice (first on line {line})"),
                    )
                    .help = Some("keep one of them".to_owned());
                    continue;
                }
                seen.insert(rule.name, node.name().span());
            }
            (rule.read)(self, node, draft);
        }
    }

    /// Walks `node`'s children block, if any, against `rules`.
    pub(super) fn children<T>(&mut self, node: &KdlNode, rules: &[Rule<T>], draft: &mut T) {
        if let Some(doc) = node.children() {
            self.block(doc, rules, draft);
        }
    }

    /// Walks `node`'s children block, if any, against its own `rules` and
    /// then a `shared` rule set (one several blocks include, like the
    /// upstream block of `mirror` and `site`).
    pub(super) fn children_with<T>(
        &mut self,
        node: &KdlNode,
        rules: &[Rule<T>],
        shared: &[Rule<T>],
        draft: &mut T,
    ) {
        if let Some(doc) = node.children() {
            self.walk(doc, &[rules, shared], draft);
        }
    }

    /// Checks `node` against `shape` and splits its entries. Problems with
    /// the shape are recorded; the entries are still returned so the values
    /// that are there get checked too.
    pub(super) fn entries<'n>(&mut self, node: &'n KdlNode, shape: &Shape) -> Entries<'n> {
        let name = node.name().value();
        let usage = shape.usage.replace("NAME", name);
        if let Some(ty) = node.ty() {
            self.error(
                ty.span(),
                format!("`{name}` has a type annotation; config.kdl does not use them"),
            );
        }
        let mut args = Vec::new();
        let mut props: HashMap<&str, &KdlEntry> = HashMap::new();
        for entry in node.entries() {
            if let Some(ty) = entry.ty() {
                self.error(
                    ty.span(),
                    "type annotations are not used in config.kdl; remove `(…)`",
                );
            }
            match entry.name() {
                None => args.push(entry),
                Some(key) => {
                    let key = key.value();
                    if !shape.props.contains(&key) {
                        let help = match suggest(key, shape.props) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None if shape.props.is_empty() => {
                                format!("`{name}` takes no properties; usage: {usage}")
                            }
                            None => format!("`{name}` accepts: {}", shape.props.join(", ")),
                        };
                        self.error(
                            entry.span(),
                            format!("unknown property `{key}` on `{name}`"),
                        )
                        .help = Some(help);
                    } else if let Some(first) = props.get(key) {
                        let line = self.line_of(first.span());
                        self.error(
                            entry.span(),
                            format!("property `{key}` is given twice (first on line {line})"),
                        );
                    } else {
                        props.insert(key, entry);
                    }
                }
            }
        }
        let (min, max) = shape.args;
        if args.len() < min || args.len() > max {
            let expected = match (min, max) {
                (0, 0) => "no arguments".to_owned(),
                (a, b) if a == b => format!("{a} argument{}", if a == 1 { "" } else { "s" }),
                (a, usize::MAX) => {
                    format!("at least {a} argument{}", if a == 1 { "" } else { "s" })
                }
                (a, b) => format!("{a} to {b} arguments"),
            };
            // Point at the first surplus argument, or at the name if some
            // are missing.
            let span = if args.len() > max {
                args[max].span()
            } else {
                node.name().span()
            };
            self.error(
                span,
                format!("`{name}` takes {expected}, found {}", args.len()),
            )
            .help = Some(format!("usage: {usage}"));
        }
        if !shape.children
            && let Some(doc) = node.children()
        {
            // The document's span starts inside the braces; point at `{`.
            let inner = doc.span().offset().min(self.text.len());
            let brace = self
                .text
                .get(..inner)
                .and_then(|t| t.rfind('{'))
                .unwrap_or(inner);
            self.error(
                (brace, 1).into(),
                format!("`{name}` takes no `{{ … }}` block"),
            )
            .help = Some(format!("usage: {usage}"));
        }
        Entries {
            name: node.name().value(),
            args,
            props,
        }
    }

    /// A string value.
    pub(super) fn string<'n>(&mut self, node: &str, entry: &'n KdlEntry) -> Option<&'n str> {
        match entry.value() {
            KdlValue::String(s) => Some(s),
            other => {
                self.error(
                    entry.span(),
                    format!("`{node}` expects a string here, found {}", describe(other)),
                )
                .help = Some("quote it: \"…\"".to_owned());
                None
            }
        }
    }

    /// A `listen` address: a string holding an IP address and a port. `hint`
    /// ends the help shown for a bad one (examples for this node).
    pub(super) fn socket_addr(
        &mut self,
        node: &str,
        entry: &KdlEntry,
        hint: &str,
    ) -> Option<SocketAddr> {
        let text = self.string(node, entry)?;
        match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    entry.span(),
                    format!("`{node}`: {text:?} is not an IP address and port"),
                )
                .help = Some(format!("write an IP address and a port: {hint}"));
                None
            }
        }
    }

    /// `#true` or `#false`.
    pub(super) fn boolean(&mut self, node: &str, entry: &KdlEntry) -> Option<bool> {
        match entry.value() {
            KdlValue::Bool(b) => Some(*b),
            other => {
                let p = self.error(
                    entry.span(),
                    format!(
                        "`{node}` expects #true or #false, found {}",
                        describe(other)
                    ),
                );
                if matches!(other, KdlValue::String(s) if s == "true" || s == "false") {
                    p.help = Some("KDL v2 writes booleans with a hash: #true, #false".to_owned());
                }
                None
            }
        }
    }

    /// An integer within `T`'s range and at least `min`.
    pub(super) fn integer<T>(&mut self, node: &str, entry: &KdlEntry, min: T) -> Option<T>
    where
        T: TryFrom<i128> + Into<i128> + Copy + std::fmt::Display + Bounded,
    {
        let KdlValue::Integer(n) = entry.value() else {
            self.error(
                entry.span(),
                format!(
                    "`{node}` expects a whole number here, found {}",
                    describe(entry.value())
                ),
            );
            return None;
        };
        match T::try_from(*n) {
            Ok(v) if v.into() >= min.into() => Some(v),
            _ => {
                self.error(
                    entry.span(),
                    format!("`{node}`: {n} is out of range ({min} to {})", T::MAX),
                );
                None
            }
        }
    }

    /// A size: `"20GiB"` or a bare number of bytes.
    pub(super) fn size(&mut self, node: &str, entry: &KdlEntry) -> Option<u64> {
        match entry.value() {
            KdlValue::Integer(n) => match u64::try_from(*n) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(
                        entry.span(),
                        format!("`{node}`: {n} is not a size in bytes"),
                    );
                    None
                }
            },
            KdlValue::String(s) => match parse_size(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.error(entry.span(), format!("`{node}`: {e}"));
                    None
                }
            },
            other => {
                self.error(
                    entry.span(),
                    format!(
                        "`{node}` expects a size like \"20GiB\", found {}",
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    /// A duration: `"15s"`. A bare number is refused: its unit would be a
    /// guess.
    pub(super) fn duration(&mut self, node: &str, entry: &KdlEntry) -> Option<Duration> {
        match entry.value() {
            KdlValue::String(s) => match parse_duration(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.error(entry.span(), format!("`{node}`: {e}"));
                    None
                }
            },
            KdlValue::Integer(n) => {
                self.error(entry.span(), format!("`{node}`: {n} has no unit"))
                    .help = Some(format!(
                    "write a quoted duration with a unit, like \"{n}s\""
                ));
                None
            }
            other => {
                self.error(
                    entry.span(),
                    format!(
                        "`{node}` expects a duration like \"15s\", found {}",
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    /// A non-zero duration.
    pub(super) fn positive_duration(&mut self, node: &str, entry: &KdlEntry) -> Option<Duration> {
        let d = self.duration(node, entry)?;
        if d.is_zero() {
            self.error(entry.span(), format!("`{node}` must be longer than zero"));
            return None;
        }
        Some(d)
    }

    /// A path, resolved against the config file's directory.
    pub(super) fn path(&mut self, node: &str, entry: &KdlEntry) -> Option<PathBuf> {
        let s = self.string(node, entry)?;
        if s.is_empty() {
            self.error(entry.span(), format!("`{node}`: the path is empty"));
            return None;
        }
        Some(self.base.join(s))
    }

    /// With file checks on, `path` must be a readable file.
    pub(super) fn existing_file(&mut self, node: &str, entry: &KdlEntry, path: &Path) {
        if !self.check_files {
            return;
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                self.error(
                    entry.span(),
                    format!("`{node}`: {} is not a file", path.display()),
                );
            }
            Err(e) => {
                self.error(
                    entry.span(),
                    format!("`{node}`: cannot read {}: {e}", path.display()),
                );
            }
        }
    }

    /// A name for a mirror, policy or limiter: used in logs, URLs of the
    /// admin UI and default prefixes, so kept to a safe alphabet.
    pub(super) fn ident<'n>(&mut self, node: &str, entry: &'n KdlEntry) -> Option<&'n str> {
        let s = self.string(node, entry)?;
        let ok = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.error(entry.span(), format!("`{node}`: {s:?} is not a valid name"))
                .help = Some("use letters, digits, '-', '_' and '.'".to_owned());
            return None;
        }
        Some(s)
    }

    /// A request rate from `count`, `per=` and `burst=`.
    pub(super) fn rate(
        &mut self,
        node: &str,
        count: Option<&KdlEntry>,
        e: &Entries<'_>,
    ) -> Option<RequestRate> {
        let count = count.and_then(|c| self.integer::<u32>(node, c, 1));
        let period = match e.prop("per") {
            Some(per) => self.positive_duration(node, per),
            None => Some(Duration::from_secs(1)),
        };
        let burst = match e.prop("burst") {
            Some(b) => self.integer::<u32>(node, b, 1).map(Some),
            None => Some(None),
        };
        let count = count?;
        Some(RequestRate {
            count,
            period: period?,
            burst: burst?.unwrap_or(count),
        })
    }
}

/// Upper bound of an integer type, for range messages.
pub(super) trait Bounded {
    const MAX: Self;
}
impl Bounded for u16 {
    const MAX: u16 = u16::MAX;
}
impl Bounded for u32 {
    const MAX: u32 = u32::MAX;
}

/// How a value reads in a message.
fn describe(v: &KdlValue) -> String {
    match v {
        KdlValue::String(s) => format!("the string {s:?}"),
        KdlValue::Integer(n) => format!("the number {n}"),
        KdlValue::Float(f) => format!("the number {f}"),
        KdlValue::Bool(b) => format!("#{b}"),
        KdlValue::Null => "#null".to_owned(),
    }
}

/// The closest candidate to a misspelt name, if one is close enough to be a
/// likely typo.
pub(super) fn suggest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------
// Node shapes and leaf readers shared by several blocks

/// A block node: no arguments, no properties, a `{ … }` of children.
pub(super) const BLOCK: Shape = Shape {
    args: (0, 0),
    props: &[],
    children: true,
    usage: "NAME { … }",
};

/// A leaf holding one path.
pub(super) const PATH_ARG: Shape = Shape::leaf((1, 1), "NAME \"path\"");

/// A leaf holding one boolean.
const BOOL_ARG: Shape = Shape::leaf((1, 1), "NAME #true  // or #false");

/// `NAME #true` or `NAME #false`.
pub(super) fn bool_node(cx: &mut Cx<'_>, node: &KdlNode) -> Option<bool> {
    let e = cx.entries(node, &BOOL_ARG);
    e.arg(0).and_then(|a| cx.boolean(e.name, a))
}

/// `NAME "15s"`: a leaf holding one duration, zero allowed only with
/// `zero_ok`.
pub(super) fn duration_node(cx: &mut Cx<'_>, node: &KdlNode, zero_ok: bool) -> Option<Duration> {
    let e = cx.entries(
        node,
        &Shape::leaf((1, 1), "NAME \"15s\"  // units: ms, s, m, h, d"),
    );
    let arg = e.arg(0)?;
    if zero_ok {
        cx.duration(e.name, arg)
    } else {
        cx.positive_duration(e.name, arg)
    }
}
